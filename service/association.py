"""One DICOM association of the listener: negotiation, then the data loop and C-ECHO/C-STORE until release.

The data phase runs on a small blocking loop instead of pynetdicom's reactor (see cinesr.service.listener):
a dataset's fragments are received straight into one buffer per association and streamed into the store's
journal as they arrive; at the last fragment the instance is committed and answered at once.
"""

from __future__ import annotations

import logging
import mmap
import socket
import struct
import threading
from typing import TYPE_CHECKING

from cinesr.service.dimse import (
    ACCEPTED_SYNTAXES,
    APPLICATION_CONTEXT,
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_STORE_RQ,
    NO_DATASET,
    RELEASE_RP,
    VERIFICATION,
    Abort,
    encode_response,
    is_storage_sop_class,
    p_data,
    parse_command,
    read_pdu,
    recv_exact,
    set_timeout,
    uid_text,
    us,
)
from cinesr.service.store_errors import (
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH,
    DUPLICATE_CONFLICT,
    OUT_OF_RESOURCES,
    STORE_HALTED,
    SUCCESS,
    UNRECOGNIZED_OPERATION,
    InvalidDataset,
    StoreFull,
    StoreHalted,
    refusal_status,
)
from cinesr.service.wire import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

if TYPE_CHECKING:  # the listener creates associations; only its type is needed here
    from cinesr.service.listener import DicomListener

LOGGER = logging.getLogger(__name__)

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


class Association:
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
        set_timeout(self.sock, self.config.acse_timeout)
        pdu_type, body = read_pdu(self.sock, self.header)
        if pdu_type != 0x01:
            raise Abort(f"expected A-ASSOCIATE-RQ, got PDU type {pdu_type:#04x}", reason=2)
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
        if not self.listener.admit():
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
                offered = [str(ts) for ts in proposed.transfer_syntax if str(ts) in ACCEPTED_SYNTAXES]
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
        set_timeout(sock, config.network_timeout)
        try:
            while True:
                recv_exact(sock, header_view)
                pdu_type = header[0]
                remaining = struct.unpack_from(">I", header, 2)[0]
                if pdu_type != 0x04:
                    if remaining > 1 << 16:
                        raise Abort(f"PDU type {pdu_type:#04x} of {remaining} bytes", reason=6)
                    body = bytearray(remaining)
                    recv_exact(sock, memoryview(body))
                    if pdu_type == 0x05:  # A-RELEASE-RQ
                        sock.sendall(RELEASE_RP)
                        LOGGER.info("association with %s (%s) released", self.calling_ae, self.peer)
                        return
                    if pdu_type == 0x07:  # A-ABORT
                        LOGGER.warning("association with %s (%s) aborted by the peer", self.calling_ae, self.peer)
                        return
                    raise Abort(f"unexpected PDU type {pdu_type:#04x}", reason=2)
                if config.max_pdu_size and remaining > config.max_pdu_size:
                    raise Abort(f"P-DATA-TF PDU of {remaining} bytes, above the {config.max_pdu_size} we announced",
                                 reason=6)
                while remaining > 0:  # P-DATA-TF: one or more PDV items
                    if remaining < 6:
                        raise Abort("truncated PDV item", reason=6)
                    recv_exact(sock, pdv_view)
                    item_length, pc_id, control = struct.unpack_from(">IBB", pdv_header)
                    remaining -= 4 + item_length
                    size = item_length - 2
                    if size < 0 or remaining < 0:
                        raise Abort("invalid PDV item length", reason=6)
                    if pc_id not in self.contexts:
                        raise Abort(f"PDV on presentation context {pc_id} that was not accepted")
                    if control & 0x01:  # command fragment
                        if size > 1 << 16 or len(command_bytes) + size > 1 << 16:
                            raise Abort("oversized DIMSE command", reason=6)
                        fragment = bytearray(size)
                        recv_exact(sock, memoryview(fragment))
                        command_bytes += fragment
                        context_id = pc_id
                        if control & 0x02:
                            command = parse_command(bytes(command_bytes))
                            command_bytes = bytearray()
                            if us(command.get(0x0800)) == NO_DATASET:
                                self._handle(command, context_id, None)
                                command = None
                                set_timeout(sock, config.network_timeout)
                            else:
                                streaming, refusal = self._begin(command, context_id)
                                set_timeout(sock, config.dimse_timeout)
                        continue
                    if command is None or pc_id != context_id:
                        raise Abort("dataset fragment without its command")
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
                            recv_exact(sock, scratch[:chunk])
                            left -= chunk
                        if control & 0x02:
                            self._refuse(command, context_id, *refusal)
                            refusal, filled, command, streaming = None, 0, None, False
                            set_timeout(sock, config.network_timeout)
                        continue
                    with memoryview(buffer) as view:
                        recv_exact(sock, view[filled:filled + size])
                        filled += size
                        if streaming and not control & 0x02:
                            try:
                                self.writer.feed(view[:filled])
                            except (StoreFull, StoreHalted) as exc:  # StoreFull: checked before the bytes went to disk
                                refusal, streaming, filled = refusal_status(exc), False, 0
                            except OSError as exc:  # e.g. disk full: answered at the last fragment
                                LOGGER.warning("streaming to the journal failed: %s", exc)
                                streaming = False
                        if control & 0x02 and refusal is None:
                            self._handle(command, context_id, view[:filled])
                            filled = 0
                            command = None
                            set_timeout(sock, config.network_timeout)
                    if control & 0x02 and refusal is not None:  # refused at its last fragment
                        self._refuse(command, context_id, *refusal)
                        refusal, filled, command = None, 0, None
                        set_timeout(sock, config.network_timeout)
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
        if us(command.get(0x0100)) != C_STORE_RQ:
            return False, None
        abstract, transfer_syntax = self.contexts[context_id]
        sop_class = uid_text(command.get(0x0002))
        if sop_class != abstract:
            return False, (DATASET_DOES_NOT_MATCH, "SOP Class UID is not its presentation context's")
        try:
            self.writer.begin(transfer_syntax, sop_class, uid_text(command.get(0x1000)))
            return True, None
        except (StoreHalted, StoreFull) as exc:
            return False, refusal_status(exc)
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
        sop_class, sop_instance = uid_text(command.get(0x0002)), uid_text(command.get(0x1000))
        LOGGER.warning("C-STORE of SOPInstanceUID %s from %s failed with status %#06x: %s",
                       sop_instance, self.calling_ae, status, comment)
        self._respond(context_id, us(command.get(0x0100)), us(command.get(0x0110)), status, sop_class,
                      sop_instance, comment)

    def _respond(self, context_id: int, command_field: int, message_id: int, status: int,
                 sop_class: str, sop_instance: str = "", comment: str = "") -> None:
        self.sock.sendall(p_data(context_id, encode_response(
            command_field | 0x8000, message_id, status, sop_class, sop_instance, comment)))

    def _handle(self, command: dict[int, bytes], context_id: int, data: bytes | memoryview | None) -> None:
        command_field = us(command.get(0x0100))
        message_id = us(command.get(0x0110))
        sop_class = uid_text(command.get(0x0002))
        stats = self.listener.stats
        if command_field == C_ECHO_RQ:
            stats.echoes += 1
            self._respond(context_id, command_field, message_id, SUCCESS, sop_class or VERIFICATION)
            return
        if command_field == C_CANCEL_RQ:
            return
        if command_field != C_STORE_RQ:
            self._respond(context_id, command_field, message_id, UNRECOGNIZED_OPERATION, sop_class)
            return
        sop_instance = uid_text(command.get(0x1000))
        abstract, transfer_syntax = self.contexts[context_id]
        status, comment = SUCCESS, ""
        if data is None:
            status, comment = CANNOT_UNDERSTAND, "C-STORE without a dataset"
        else:
            try:
                if not self.writer.transfer_syntax:  # not begun (e.g. streaming failed to start)
                    self.writer.begin(transfer_syntax, sop_class or abstract, sop_instance)
                stored = self.writer.commit(data)
            except (InvalidDataset, OSError) as exc:  # InvalidDataset's status says which (0xA900, 0xC210-0xC212)
                if isinstance(exc, (StoreFull, StoreHalted)):
                    stats.out_of_resources += 1
                elif isinstance(exc, OSError):
                    LOGGER.exception("could not store SOPInstanceUID %s", sop_instance)
                status, comment = refusal_status(exc)
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
