"""One DICOM association of the listener: negotiation, then the data loop and C-ECHO/C-STORE until release.

The data phase runs on a small blocking loop instead of pynetdicom's reactor (see cinesr.service.listener):
a dataset's fragments are received straight into one buffer per association and streamed into the store's
journal as they arrive; at the last fragment the instance is committed and answered at once.
Negotiation bytes are ours too (cinesr.service.acse): the A-ASSOCIATE-RQ is read and the AC/RJ built directly.
"""

from __future__ import annotations

import logging
import mmap
import socket
import struct
import threading
from typing import TYPE_CHECKING

from cinesr.service.acse import (
    INVALID_PARAMETER,
    ProposedContext,
    decode_associate_rq,
    encode_associate_ac,
    encode_associate_rj,
)
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
        self.listener.stats.rejected_associations += 1  # counted before the peer can see it
        self.sock.sendall(encode_associate_rj(result, source, reason))
        # PS3.8 9.2 (Sta13): the requester closes the connection once it has read the RJ; closing first can
        # reach a fast peer as a lost connection instead of a rejection. Wait a little for its close.
        try:
            self.sock.settimeout(min(2.0, self.config.acse_timeout))
            while self.sock.recv(4096):
                pass
        except OSError:  # timed out or reset: the listener closes it now either way
            pass

    def negotiate(self) -> bool:
        set_timeout(self.sock, self.config.acse_timeout)
        pdu_type, body = read_pdu(self.sock, self.header)
        if pdu_type != 0x01:
            raise Abort(f"expected A-ASSOCIATE-RQ, got PDU type {pdu_type:#04x}", reason=2)
        request = decode_associate_rq(body)
        self.calling_ae = request.calling_ae_title
        self.writer.source_ae = self.calling_ae
        called = request.called_ae_title
        config = self.config
        if request.application_context != APPLICATION_CONTEXT:
            LOGGER.warning("association from %s (%s) rejected: application context %s",
                           self.calling_ae, self.peer, request.application_context)
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
        results = [self._context_result(proposed) for proposed in request.contexts]
        # The peer's role selection (0x54) and asynchronous window (0x53) proposals go unanswered, as they did
        # when pynetdicom built the AC: we take the default roles (we are SCP) and one operation at a time.
        self.sock.sendall(encode_associate_ac(
            request.called_ae_field, request.calling_ae_field, APPLICATION_CONTEXT, results,
            config.max_pdu_size, IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME))
        self.listener.stats.associations += 1
        LOGGER.info("association accepted from %s (%s), %d of %d contexts",
                    self.calling_ae, self.peer, len(self.contexts), len(results))
        return True

    def _context_result(self, proposed: ProposedContext) -> tuple[int, int, str]:
        """(context id, result, transfer syntax) for one proposed context; an accepted one is remembered."""
        # A context without an abstract or any transfer syntax cannot be answered: the association is aborted,
        # after the AE checks above, as it was when pynetdicom's primitives refused such a context here.
        if proposed.abstract_syntax is None or not proposed.transfer_syntaxes:
            raise Abort(f"presentation context {proposed.context_id} without an abstract or a transfer syntax",
                        reason=INVALID_PARAMETER)
        abstract = proposed.abstract_syntax
        first = proposed.transfer_syntaxes[0]  # what a refused context echoes (its value is not tested)
        if abstract != VERIFICATION and not is_storage_sop_class(abstract):
            return proposed.context_id, 0x03, first  # abstract syntax not supported
        offered = [ts for ts in proposed.transfer_syntaxes if ts in ACCEPTED_SYNTAXES]
        if not offered:
            return proposed.context_id, 0x04, first  # transfer syntaxes not supported
        # The proposer's first choice: usually the syntax its data is already in, so it needs no conversion
        # and we store the bytes as they were made.
        self.contexts[proposed.context_id] = (abstract, offered[0])
        return proposed.context_id, 0x00, offered[0]

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
