"""DICOM listener (SCP): C-ECHO and C-STORE into the InstanceStore.

Association negotiation uses pynetdicom's PDU codecs (A-ASSOCIATE-RQ decode, A-ASSOCIATE-AC/RJ
encode). The data phase runs on a small blocking loop per association instead of pynetdicom's
reactor: that reactor polls its queues with 1 ms sleeps in two threads, which costs 2-3 ms per
C-STORE (~0.9 s for 300 small MR instances, against ~0.13 s for dcmtk storescp). Here a
thread reads a PDU, and when a message is complete, stores it (durably) and answers at once.

The dataset is never decoded: the store walks its element structure to check it is complete
and to read the Study/Series/SOP Instance UIDs, then writes the bytes as received.
Memory per association is bounded before it is allocated: PDUs above the announced maximum abort the
association, and dataset buffers come out of one receive budget shared by all associations.
Logs carry UIDs, AE titles and addresses, never patient attributes.
"""

from __future__ import annotations

import logging
import mmap
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cinesr.service.store import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    InstanceStore,
    InvalidDataset,
    StoredInstance,
    StoreFull,
    StoreHalted,
)
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import _STORAGE_CLASSES

LOGGER = logging.getLogger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"

# Transfer syntaxes we accept (the proposer's order decides among them).
TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
)
_TS_RANK = frozenset(TRANSFER_SYNTAXES)

STORAGE_SOP_CLASSES: frozenset[str] = frozenset(str(uid) for uid in _STORAGE_CLASSES.values())
_STORAGE_PREFIX = "1.2.840.10008.5.1.4.1.1."  # every standard storage SOP class, present and future

# DIMSE status codes
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # disk below the watermark, or an instance beyond the receive budget
STORE_HALTED = 0xA701  # out of resources: the store's background filing is failing (it retries)
CANNOT_UNDERSTAND = 0xC210
DATASET_DOES_NOT_MATCH = 0xA900
DUPLICATE_CONFLICT = 0xB006  # warning, elements discarded: a duplicate SOPInstanceUID with other content
PROCESSING_FAILURE = 0x0110
UNRECOGNIZED_OPERATION = 0x0211

_C_STORE_RQ, _C_ECHO_RQ, _C_CANCEL_RQ = 0x0001, 0x0030, 0x0FFF
_NO_DATASET = 0x0101


def is_storage_sop_class(uid: str) -> bool:
    return uid in STORAGE_SOP_CLASSES or uid.startswith(_STORAGE_PREFIX)


@dataclass
class ListenerConfig:
    """Network knobs of the listener. ``from_settings`` maps the service settings onto it."""

    ae_title: str = "CINESR"
    port: int = 11112
    host: str = "0.0.0.0"
    allowed_calling_aets: list[str] = field(default_factory=list)  # empty: accept any (logged)
    require_called_aet: bool = False  # True: reject associations not addressed to ae_title
    max_associations: int = 32
    acse_timeout: float = 30.0  # waiting for A-ASSOCIATE-RQ / A-RELEASE
    dimse_timeout: float = 60.0  # between the PDUs of one message
    network_timeout: float = 120.0  # idle association between messages
    max_pdu_size: int = 1 << 20  # announced maximum PDU length we receive (0 = unlimited); longer ones abort
    receive_buffer_bytes: int = 256 << 20  # dataset buffers of all associations together (beyond: 0xA700)
    tls_cert: str | None = None  # PEM certificate; with tls_key turns TLS on
    tls_key: str | None = None
    tls_ca: str | None = None  # if set, clients must present a certificate signed by it

    @classmethod
    def from_settings(cls, settings: Any) -> ListenerConfig:
        """Build from cinesr Settings (or any object with those attribute names)."""
        defaults = cls()
        values = {}
        for name in cls.__dataclass_fields__:
            src = "dicom_port" if name == "port" else ("dicom_host" if name == "host" else name)
            value = getattr(settings, src, None)
            if value is not None and value != "":
                values[name] = value
        config = cls(**{**defaults.__dict__, **values})
        config.allowed_calling_aets = [str(a).strip() for a in config.allowed_calling_aets if str(a).strip()]
        return config

    def ssl_context(self) -> ssl.SSLContext | None:
        if not (self.tls_cert and self.tls_key):
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.tls_cert, self.tls_key)
        if self.tls_ca:
            context.load_verify_locations(self.tls_ca)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


@dataclass
class ListenerStats:
    """Counters for metrics; read them, don't write them."""

    associations: int = 0
    rejected_associations: int = 0
    echoes: int = 0
    stored: int = 0
    duplicates: int = 0
    conflicts: int = 0  # duplicates whose content differed from the copy kept
    failed: int = 0
    out_of_resources: int = 0


class _Closed(Exception):
    """The peer closed the connection."""


class _Abort(Exception):
    """Protocol error: abort the association (source, reason)."""

    def __init__(self, message: str, reason: int = 0) -> None:
        super().__init__(message)
        self.reason = reason


_WAITALL = getattr(socket, "MSG_WAITALL", 0)
_BASE_BUFFER = 1 << 18  # each association's dataset buffer to start with (not counted in the budget)
_KEPT_BUFFER = 4 << 20  # a grown buffer up to this size is kept for the next message


def _release(buffer: bytearray | mmap.mmap, budget: ReceiveBudget) -> None:
    """Give a dataset buffer's share back to the budget, and its memory back to the system."""
    budget.give(len(buffer) - _BASE_BUFFER)
    if isinstance(buffer, mmap.mmap):
        try:
            buffer.close()
        except BufferError:  # a view of it still exists: unmapped when that goes
            pass


class ReceiveBudget:
    """Bytes of dataset buffer the listener's associations may hold beyond their base buffers, together."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if self.in_use + n > self.limit:
                return False
            self.in_use += n
            return True

    def give(self, n: int) -> None:
        if n > 0:
            with self._lock:
                self.in_use -= n


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    # MSG_WAITALL: the kernel gathers the whole fragment before returning (one trip through
    # Python per PDV, not one per TCP segment). TLS sockets take no flags.
    flags = 0 if isinstance(sock, ssl.SSLSocket) else _WAITALL
    while view:
        try:
            n = sock.recv_into(view, len(view), flags)
        except BlockingIOError:  # SO_RCVTIMEO expired (see _set_timeout)
            raise TimeoutError("receive timed out") from None
        if n == 0:
            raise _Closed()
        view = view[n:]


def _set_timeout(sock: socket.socket, seconds: float) -> None:
    """Timeouts for a blocking socket. Plain TCP: kernel timeouts (SO_RCVTIMEO/SO_SNDTIMEO), so
    the socket stays blocking and MSG_WAITALL works; Python's settimeout would make it non-blocking."""
    if isinstance(sock, ssl.SSLSocket):
        sock.settimeout(seconds)
        return
    if sock.gettimeout() is not None:
        sock.settimeout(None)
    whole = int(seconds)
    timeval = struct.pack("ll", whole, int((seconds - whole) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def _read_pdu(sock: socket.socket, header: bytearray) -> tuple[int, bytearray]:
    _recv_exact(sock, memoryview(header))
    pdu_type = header[0]
    length = struct.unpack_from(">I", header, 2)[0]
    if length > 1 << 20:  # only association-phase PDUs come through here
        raise _Abort(f"PDU of {length} bytes is too large", reason=6)
    body = bytearray(length)
    _recv_exact(sock, memoryview(body))
    return pdu_type, body


def _parse_command(data: bytes) -> dict[int, bytes]:
    """Elements of a DIMSE command set (always Implicit VR Little Endian)."""
    elements = {}
    pos, end = 0, len(data)
    while pos + 8 <= end:
        _group, elem, length = struct.unpack_from("<HHI", data, pos)
        elements[elem] = data[pos + 8:pos + 8 + length]
        pos += 8 + length
    if pos != end:
        raise _Abort("malformed DIMSE command set")
    return elements


def _uid_text(value: bytes | None) -> str:
    return value.decode("ascii", "replace").rstrip("\0 ") if value else ""


def _us(value: bytes | None) -> int:
    if not value or len(value) < 2:
        return -1
    return struct.unpack_from("<H", value)[0]


def _element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, elem, len(value)) + value


def _uid_value(uid: str) -> bytes:
    raw = uid.encode()
    return raw + b"\0" if len(raw) % 2 else raw


def encode_response(command_field: int, message_id: int, status: int, sop_class_uid: str,
                    sop_instance_uid: str = "", error_comment: str = "") -> bytes:
    """A DIMSE response command set (Implicit VR Little Endian)."""
    body = [_element(0x0002, _uid_value(sop_class_uid)),
            _element(0x0100, struct.pack("<H", command_field)),
            _element(0x0120, struct.pack("<H", message_id)),
            _element(0x0800, struct.pack("<H", _NO_DATASET)),
            _element(0x0900, struct.pack("<H", status))]
    if error_comment:
        comment = error_comment.encode("ascii", "replace")[:64]
        body.append(_element(0x0902, comment + b" " if len(comment) % 2 else comment))
    if sop_instance_uid:
        body.append(_element(0x1000, _uid_value(sop_instance_uid)))
    joined = b"".join(body)
    return _element(0x0000, struct.pack("<I", len(joined))) + joined


def _p_data(context_id: int, command: bytes) -> bytes:
    pdv = struct.pack(">IBB", len(command) + 2, context_id, 0x03) + command
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


_RELEASE_RP = struct.pack(">BBI", 0x06, 0, 4) + b"\0\0\0\0"


def _abort_pdu(source: int = 2, reason: int = 0) -> bytes:
    return struct.pack(">BBIBBBB", 0x07, 0, 4, 0, 0, source, reason)


class _Association:
    """One accepted connection: negotiation, then C-ECHO/C-STORE until release or abort."""

    def __init__(self, listener: DicomListener, sock: socket.socket, address: tuple[str, int]) -> None:
        self.listener = listener
        self.config = listener.config
        self.sock = sock
        self.peer = f"{address[0]}:{address[1]}"
        self.calling_ae = ""
        self.contexts: dict[int, tuple[str, str]] = {}  # context id -> (abstract, transfer syntax)
        self.header = bytearray(6)
        self.writer = listener.store.open_writer()
        self.admitted = False

    # ---- negotiation -----------------------------------------------------------------------

    def _reject(self, result: int, source: int, reason: int) -> None:
        primitive = A_ASSOCIATE()
        primitive.result, primitive.result_source, primitive.diagnostic = result, source, reason
        pdu = A_ASSOCIATE_RJ()
        pdu.from_primitive(primitive)
        self.listener.stats.rejected_associations += 1  # counted before the peer can see it
        self.sock.sendall(pdu.encode())

    def negotiate(self) -> bool:
        _set_timeout(self.sock, self.config.acse_timeout)
        pdu_type, body = _read_pdu(self.sock, self.header)
        if pdu_type != 0x01:
            raise _Abort(f"expected A-ASSOCIATE-RQ, got PDU type {pdu_type:#04x}", reason=2)
        rq = A_ASSOCIATE_RQ()
        rq.decode(bytes(self.header) + bytes(body))
        request = rq.to_primitive()
        self.calling_ae = request.calling_ae_title.strip()
        self.writer.source_ae = self.calling_ae
        called = request.called_ae_title.strip()
        config = self.config
        if request.application_context_name != APPLICATION_CONTEXT:
            LOGGER.warning("association from %s (%s) rejected: application context %s",
                           self.calling_ae, self.peer, request.application_context_name)
            self._reject(1, 1, 2)
            return False
        if config.allowed_calling_aets and self.calling_ae not in config.allowed_calling_aets:
            LOGGER.warning("association from %s (%s) rejected: calling AE title not allowed",
                           self.calling_ae, self.peer)
            self._reject(1, 1, 3)
            return False
        if config.require_called_aet and called != config.ae_title:
            LOGGER.warning("association from %s (%s) rejected: called AE title %r is not ours",
                           self.calling_ae, self.peer, called)
            self._reject(1, 1, 7)
            return False
        if not self.listener._admit():
            LOGGER.warning("association from %s (%s) rejected: %d associations already active",
                           self.calling_ae, self.peer, config.max_associations)
            self._reject(2, 3, 2)  # transient, local limit exceeded
            return False
        self.admitted = True  # from here on it holds a slot, released however it ends
        if not config.allowed_calling_aets:
            LOGGER.info("accepting association from %s (%s): no calling AE allow-list set",
                        self.calling_ae, self.peer)
        results = []
        for proposed in request.presentation_context_definition_list:
            result = PresentationContext()
            result.context_id = proposed.context_id
            result.abstract_syntax = proposed.abstract_syntax
            abstract = str(proposed.abstract_syntax)
            if abstract != VERIFICATION and not is_storage_sop_class(abstract):
                result.result = 0x03  # abstract syntax not supported
                result.transfer_syntax = [proposed.transfer_syntax[0]]
            else:
                offered = [str(ts) for ts in proposed.transfer_syntax if str(ts) in _TS_RANK]
                if offered:
                    # The proposer's first choice: usually the syntax its data is already in, so it
                    # needs no conversion and we store the bytes as they were made.
                    chosen = offered[0]
                    result.result = 0x00
                    result.transfer_syntax = [chosen]
                    self.contexts[proposed.context_id] = (abstract, chosen)
                else:
                    result.result = 0x04  # transfer syntaxes not supported
                    result.transfer_syntax = [proposed.transfer_syntax[0]]
            results.append(result)
        ac = A_ASSOCIATE()
        ac.application_context_name = APPLICATION_CONTEXT
        ac.calling_ae_title = request.calling_ae_title
        ac.called_ae_title = request.called_ae_title
        ac.result = 0x00
        ac.presentation_context_definition_results_list = results
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = config.max_pdu_size
        impl_uid = ImplementationClassUIDNotification()
        impl_uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        impl_name = ImplementationVersionNameNotification()
        impl_name.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ac.user_information = [max_length, impl_uid, impl_name]
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(ac)
        self.sock.sendall(pdu.encode())
        self.listener.stats.associations += 1
        LOGGER.info("association accepted from %s (%s), %d of %d contexts",
                    self.calling_ae, self.peer, len(self.contexts), len(results))
        return True

    # ---- data phase ------------------------------------------------------------------------

    def serve(self) -> None:
        """Data phase. Dataset fragments are received straight into one reusable buffer per
        association (no per-PDU allocation, no join): large fresh allocations cost page faults.

        Memory is bounded before it is taken: a P-DATA PDU longer than the maximum we announced aborts
        the association at its header, and the buffer grows only out of the listener's shared receive
        budget; an instance beyond it (or one refused at its start) is read and discarded, then answered
        with the failure status."""
        config, sock = self.config, self.sock
        budget = self.listener.receive_budget
        header, pdv_header = self.header, bytearray(6)
        header_view, pdv_view = memoryview(header), memoryview(pdv_header)
        buffer = bytearray(_BASE_BUFFER)
        scratch = memoryview(bytearray(1 << 16))  # where a refused instance's bytes are discarded
        filled = 0
        command_bytes = bytearray()
        command: dict[int, bytes] | None = None
        context_id = 0
        streaming = False
        refusal: tuple[int, str] | None = None  # the status a refused instance gets at its last fragment
        _set_timeout(sock, config.network_timeout)
        try:
            while True:
                _recv_exact(sock, header_view)
                pdu_type = header[0]
                remaining = struct.unpack_from(">I", header, 2)[0]
                if pdu_type != 0x04:
                    if remaining > 1 << 16:
                        raise _Abort(f"PDU type {pdu_type:#04x} of {remaining} bytes", reason=6)
                    body = bytearray(remaining)
                    _recv_exact(sock, memoryview(body))
                    if pdu_type == 0x05:  # A-RELEASE-RQ
                        sock.sendall(_RELEASE_RP)
                        LOGGER.info("association with %s (%s) released", self.calling_ae, self.peer)
                        return
                    if pdu_type == 0x07:  # A-ABORT
                        LOGGER.warning("association with %s (%s) aborted by the peer", self.calling_ae, self.peer)
                        return
                    raise _Abort(f"unexpected PDU type {pdu_type:#04x}", reason=2)
                if config.max_pdu_size and remaining > config.max_pdu_size:
                    raise _Abort(f"P-DATA-TF PDU of {remaining} bytes, above the {config.max_pdu_size} we announced",
                                 reason=6)
                while remaining > 0:  # P-DATA-TF: one or more PDV items
                    if remaining < 6:
                        raise _Abort("truncated PDV item", reason=6)
                    _recv_exact(sock, pdv_view)
                    item_length, pc_id, control = struct.unpack_from(">IBB", pdv_header)
                    remaining -= 4 + item_length
                    size = item_length - 2
                    if size < 0 or remaining < 0:
                        raise _Abort("invalid PDV item length", reason=6)
                    if pc_id not in self.contexts:
                        raise _Abort(f"PDV on presentation context {pc_id} that was not accepted")
                    if control & 0x01:  # command fragment
                        if size > 1 << 16 or len(command_bytes) + size > 1 << 16:
                            raise _Abort("oversized DIMSE command", reason=6)
                        fragment = bytearray(size)
                        _recv_exact(sock, memoryview(fragment))
                        command_bytes += fragment
                        context_id = pc_id
                        if control & 0x02:
                            command = _parse_command(bytes(command_bytes))
                            command_bytes = bytearray()
                            if _us(command.get(0x0800)) == _NO_DATASET:
                                self._handle(command, context_id, None)
                                command = None
                                _set_timeout(sock, config.network_timeout)
                            else:
                                streaming, refusal = self._begin(command, context_id)
                                _set_timeout(sock, config.dimse_timeout)
                        continue
                    if command is None or pc_id != context_id:
                        raise _Abort("dataset fragment without its command")
                    if refusal is None and filled + size > len(buffer):
                        grown = self._grow(buffer, filled, filled + size)
                        if grown is None:
                            refusal = (OUT_OF_RESOURCES, "instance larger than the receive buffer allows")
                            LOGGER.warning("C-STORE from %s (%s): dataset above %d bytes, beyond the receive "
                                           "budget; discarding it", self.calling_ae, self.peer, filled + size)
                        else:
                            buffer = grown
                    if refusal is not None:
                        left = size
                        while left > 0:  # read and drop: the peer gets its answer at the last fragment
                            chunk = min(left, len(scratch))
                            _recv_exact(sock, scratch[:chunk])
                            left -= chunk
                        if control & 0x02:
                            self._refuse(command, context_id, *refusal)
                            refusal, filled, command, streaming = None, 0, None, False
                            _set_timeout(sock, config.network_timeout)
                        continue
                    with memoryview(buffer) as view:
                        _recv_exact(sock, view[filled:filled + size])
                        filled += size
                        if streaming and not control & 0x02:
                            try:
                                self.writer.feed(view[:filled])
                            except StoreFull:  # checked before these bytes went to disk
                                refusal, streaming, filled = (OUT_OF_RESOURCES, "disk space below watermark"), False, 0
                            except StoreHalted as exc:
                                refusal, streaming, filled = (STORE_HALTED, str(exc)), False, 0
                            except OSError as exc:  # e.g. disk full: answered at the last fragment
                                LOGGER.warning("streaming to the journal failed: %s", exc)
                                streaming = False
                        if control & 0x02 and refusal is None:
                            self._handle(command, context_id, view[:filled])
                            filled = 0
                            command = None
                            _set_timeout(sock, config.network_timeout)
                    if control & 0x02 and refusal is not None:  # refused at its last fragment
                        self._refuse(command, context_id, *refusal)
                        refusal, filled, command = None, 0, None
                        _set_timeout(sock, config.network_timeout)
                    if filled == 0 and len(buffer) > _KEPT_BUFFER:
                        _release(buffer, budget)  # don't hold a big share between messages
                        buffer = bytearray(_BASE_BUFFER)
        finally:
            _release(buffer, budget)

    def _grow(self, buffer: bytearray | mmap.mmap, filled: int, needed: int) -> mmap.mmap | None:
        """A larger buffer holding the first ``filled`` bytes, taken from the receive budget; None if the
        budget cannot cover it. The new buffer is counted in full before it exists (old and new are both
        alive while the bytes are copied), the old one given back once it is dropped."""
        budget = self.listener.receive_budget
        for size in (max(2 * len(buffer), needed), needed):
            if budget.take(size - _BASE_BUFFER):
                # An anonymous mapping, not a bytearray: its pages go back to the system when it is closed,
                # where malloc would keep freed large buffers in its arenas (measured: 54 MiB resident for
                # a 32 MiB budget with four associations).
                grown = mmap.mmap(-1, size)
                with memoryview(buffer) as old:
                    grown[:filled] = old[:filled]  # a view, not a copy of what was received
                _release(buffer, budget)
                return grown
        return None

    def _begin(self, command: dict[int, bytes], context_id: int) -> tuple[bool, tuple[int, str] | None]:
        """A C-STORE request arrived: start streaming its dataset into the store.

        Returns (streaming, refusal): a request that will fail whatever its dataset is refused now, and
        its dataset discarded as it arrives."""
        if _us(command.get(0x0100)) != _C_STORE_RQ:
            return False, None
        abstract, transfer_syntax = self.contexts[context_id]
        sop_class = _uid_text(command.get(0x0002))
        if sop_class != abstract:
            return False, (DATASET_DOES_NOT_MATCH, "SOP Class UID is not its presentation context's")
        try:
            self.writer.begin(transfer_syntax, sop_class, _uid_text(command.get(0x1000)))
            return True, None
        except StoreHalted as exc:
            return False, (STORE_HALTED, str(exc))
        except StoreFull:
            return False, (OUT_OF_RESOURCES, "disk space below watermark")
        except OSError as exc:
            LOGGER.warning("cannot stream to the journal: %s", exc)
            return False, None

    def _refuse(self, command: dict[int, bytes], context_id: int, status: int, comment: str) -> None:
        """Answer a C-STORE whose dataset was discarded."""
        stats = self.listener.stats
        stats.failed += 1
        if status in (OUT_OF_RESOURCES, STORE_HALTED):
            stats.out_of_resources += 1
        self.writer.abandon()  # bytes streamed before the refusal are dropped; the next request begins afresh
        sop_class, sop_instance = _uid_text(command.get(0x0002)), _uid_text(command.get(0x1000))
        LOGGER.warning("C-STORE of SOPInstanceUID %s from %s failed with status %#06x: %s",
                       sop_instance, self.calling_ae, status, comment)
        self._respond(context_id, _us(command.get(0x0100)), _us(command.get(0x0110)), status, sop_class,
                      sop_instance, comment)

    def _respond(self, context_id: int, command_field: int, message_id: int, status: int,
                 sop_class: str, sop_instance: str = "", comment: str = "") -> None:
        self.sock.sendall(_p_data(context_id, encode_response(
            command_field | 0x8000, message_id, status, sop_class, sop_instance, comment)))

    def _handle(self, command: dict[int, bytes], context_id: int, data: bytes | memoryview | None) -> None:
        command_field = _us(command.get(0x0100))
        message_id = _us(command.get(0x0110))
        sop_class = _uid_text(command.get(0x0002))
        stats = self.listener.stats
        if command_field == _C_ECHO_RQ:
            stats.echoes += 1
            self._respond(context_id, command_field, message_id, SUCCESS, sop_class or VERIFICATION)
            return
        if command_field == _C_CANCEL_RQ:
            return
        if command_field != _C_STORE_RQ:
            self._respond(context_id, command_field, message_id, UNRECOGNIZED_OPERATION, sop_class)
            return
        sop_instance = _uid_text(command.get(0x1000))
        abstract, transfer_syntax = self.contexts[context_id]
        status, comment = SUCCESS, ""
        if data is None:
            status, comment = CANNOT_UNDERSTAND, "C-STORE without a dataset"
        else:
            try:
                if not self.writer.transfer_syntax:  # not begun (e.g. streaming failed to start)
                    self.writer.begin(transfer_syntax, sop_class or abstract, sop_instance)
                stored = self.writer.commit(data)
            except InvalidDataset as exc:  # its status says which failure (0xA900, 0xC210-0xC212)
                status, comment = exc.status, str(exc)
            except StoreFull:
                status, comment = OUT_OF_RESOURCES, "disk space below watermark"
                stats.out_of_resources += 1
            except StoreHalted as exc:
                status, comment = STORE_HALTED, str(exc)
                stats.out_of_resources += 1
            except OSError as exc:
                LOGGER.exception("could not store SOPInstanceUID %s", sop_instance)
                status, comment = (OUT_OF_RESOURCES if exc.errno in (28, 122) else PROCESSING_FAILURE,
                                   exc.strerror or "storage error")
            else:
                if stored.duplicate and stored.conflict:  # the store logged it at WARNING
                    stats.duplicates += 1
                    stats.conflicts += 1
                    status, comment = DUPLICATE_CONFLICT, "duplicate SOPInstanceUID, other content; first kept"
                elif stored.duplicate:
                    stats.duplicates += 1
                    LOGGER.info("duplicate SOPInstanceUID %s from %s ignored", sop_instance, self.calling_ae)
                else:
                    stats.stored += 1
                    LOGGER.debug("stored SOPInstanceUID %s (series %s)", sop_instance, stored.series_uid)
        if status != SUCCESS and status != DUPLICATE_CONFLICT:
            stats.failed += 1
            LOGGER.warning("C-STORE of SOPInstanceUID %s from %s failed with status %#06x: %s",
                           sop_instance, self.calling_ae, status, comment)
        self._respond(context_id, command_field, message_id, status, sop_class, sop_instance, comment)


def _server_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = socket.socket(family, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # A receive buffer that holds a whole instance or two: fewer wakeups per C-STORE. Set before
    # listen() so that accepted sockets inherit it (and the TCP window scale that goes with it).
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    server.bind((host, port))
    server.listen(64)
    return server


class DicomListener:
    """A running listener: accept thread plus one thread per association."""

    def __init__(self, config: ListenerConfig, store: InstanceStore) -> None:
        self.config = config
        self.store = store
        self.stats = ListenerStats()
        self.receive_budget = ReceiveBudget(config.receive_buffer_bytes)
        self._ssl = config.ssl_context()
        self._active = 0
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server = _server_socket(config.host, config.port)
        self.host, self.port = self._server.getsockname()[:2]
        self._thread: threading.Thread | None = None

    @property
    def active_associations(self) -> int:
        return self._active

    def _admit(self) -> bool:
        with self._lock:
            if self._active >= self.config.max_associations:
                return False
            self._active += 1
            return True

    def serve_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, address = self._server.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.01)
                continue
            thread = threading.Thread(target=self._serve_connection, args=(conn, address),
                                      name=f"cinesr-assoc-{address[0]}:{address[1]}", daemon=True)
            thread.start()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name="cinesr-listener", daemon=True)
        self._thread.start()

    def _serve_connection(self, conn: socket.socket, address: tuple[str, int]) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle delay on small responses
        raw = conn
        with self._lock:
            self._connections.add(raw)
        assoc: _Association | None = None
        try:
            if self._ssl is not None:
                conn.settimeout(self.config.acse_timeout)
                conn = self._ssl.wrap_socket(conn, server_side=True)
            assoc = _Association(self, conn, address)
            if assoc.negotiate():
                assoc.serve()
        except _Closed:
            if assoc is not None and assoc.admitted:
                LOGGER.warning("connection from %s closed without release", address[0])
        except _Abort as exc:
            LOGGER.warning("aborting association from %s: %s", address[0], exc)
            try:
                conn.sendall(_abort_pdu(2, exc.reason))
            except OSError:
                pass
        except TimeoutError:
            LOGGER.warning("association from %s timed out", address[0])
            try:
                conn.sendall(_abort_pdu(2, 0))
            except OSError:
                pass
        except (OSError, ssl.SSLError) as exc:
            if not self._stopping.is_set():
                LOGGER.warning("connection from %s failed: %s", address[0], exc)
        except Exception:  # never let one association take the listener down
            LOGGER.exception("association from %s failed", address[0])
            try:
                conn.sendall(_abort_pdu(2, 0))
            except OSError:
                pass
        finally:
            if assoc is not None:
                try:
                    assoc.writer.close()
                except OSError:
                    LOGGER.exception("closing the journal writer failed")
            if assoc is not None and assoc.admitted:
                with self._lock:
                    self._active -= 1
            with self._lock:
                self._connections.discard(raw)
            try:
                conn.close()
            except OSError:
                pass

    def stop(self) -> None:
        """Stop accepting, abort open associations, and wait for the accept thread."""
        self._stopping.set()
        try:
            self._server.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._server.close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)


@dataclass
class ListenerHandle:
    """What ``start_listener`` returns: the bound address, counters, and ``stop()``."""

    listener: DicomListener
    _callback: Callable[[StoredInstance], None] | None = None

    @property
    def port(self) -> int:
        return self.listener.port

    @property
    def host(self) -> str:
        return self.listener.host

    @property
    def ae_title(self) -> str:
        return self.listener.config.ae_title

    @property
    def stats(self) -> ListenerStats:
        return self.listener.stats

    def stop(self) -> None:
        self.listener.stop()
        if self._callback is not None:
            self.listener.store.unsubscribe(self._callback)
            self._callback = None


def start_listener(settings: Any, store: InstanceStore,
                   on_instance: Callable[[StoredInstance], None] | None = None,
                   block: bool = False) -> ListenerHandle:
    """Start the DICOM listener.

    ``settings``: cinesr Settings (ae_title, dicom_port, allowed_calling_aets, and optionally
    max_associations, acse_timeout, dimse_timeout, network_timeout, max_pdu_size, tls_cert,
    tls_key, tls_ca, dicom_host) or a ListenerConfig. Port 0 binds a free port (see ``.port``).
    ``on_instance(StoredInstance)`` is called once per newly stored instance, when its file is
    visible. With ``block=True`` this serves until interrupted, then stops.
    """
    config = settings if isinstance(settings, ListenerConfig) else ListenerConfig.from_settings(settings)
    listener = DicomListener(config, store)
    if on_instance is not None:
        store.subscribe(on_instance)
    handle = ListenerHandle(listener, on_instance)
    LOGGER.info("DICOM listener %s on %s:%d%s", config.ae_title, listener.host, listener.port,
                " (TLS)" if listener._ssl else "")
    if block:
        try:
            listener.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            handle.stop()
    else:
        listener.start()
    return handle
