"""DICOM upper layer and DIMSE codec of the listener: what it accepts, and PDUs and command sets as bytes.

Association-phase PDUs are read here and decoded in cinesr.service.acse; P-DATA PDUs,
DIMSE command sets and the few PDUs the data phase sends are read and built here directly.
"""

from __future__ import annotations

import socket
import ssl
import struct

from pynetdicom.sop_class import _STORAGE_CLASSES

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
ACCEPTED_SYNTAXES = frozenset(TRANSFER_SYNTAXES)

STORAGE_SOP_CLASSES: frozenset[str] = frozenset(str(uid) for uid in _STORAGE_CLASSES.values())
_STORAGE_PREFIX = "1.2.840.10008.5.1.4.1.1."  # every standard storage SOP class, present and future

C_STORE_RQ, C_ECHO_RQ, C_CANCEL_RQ = 0x0001, 0x0030, 0x0FFF
NO_DATASET = 0x0101  # Command Data Set Type: no dataset follows


def is_storage_sop_class(uid: str) -> bool:
    """Whether we accept instances of this SOP class (any standard storage class, present or future)."""
    return uid in STORAGE_SOP_CLASSES or uid.startswith(_STORAGE_PREFIX)


class Closed(Exception):
    """The peer closed the connection."""


class Abort(Exception):
    """Protocol error: abort the association (source, reason)."""

    def __init__(self, message: str, reason: int = 0) -> None:
        super().__init__(message)
        self.reason = reason


WAITALL = getattr(socket, "MSG_WAITALL", 0)


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from the socket; Closed if the peer closes first, TimeoutError if it stalls."""
    # MSG_WAITALL: the kernel gathers the whole fragment before returning (one trip through
    # Python per PDV, not one per TCP segment). TLS sockets take no flags.
    flags = 0 if isinstance(sock, ssl.SSLSocket) else WAITALL
    while view:
        try:
            n = sock.recv_into(view, len(view), flags)
        except BlockingIOError:  # SO_RCVTIMEO expired (see set_timeout)
            raise TimeoutError("receive timed out") from None
        if n == 0:
            raise Closed()
        view = view[n:]


def set_timeout(sock: socket.socket, seconds: float) -> None:
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


def read_pdu(sock: socket.socket, header: bytearray) -> tuple[int, bytearray]:
    """An association-phase PDU: (type, body); ``header`` is the 6-byte buffer its header is read into."""
    recv_exact(sock, memoryview(header))
    pdu_type = header[0]
    length = struct.unpack_from(">I", header, 2)[0]
    if length > 1 << 20:  # only association-phase PDUs come through here
        raise Abort(f"PDU of {length} bytes is too large", reason=6)
    body = bytearray(length)
    recv_exact(sock, memoryview(body))
    return pdu_type, body


def parse_command(data: bytes) -> dict[int, bytes]:
    """Elements of a DIMSE command set (always Implicit VR Little Endian)."""
    elements = {}
    pos, end = 0, len(data)
    while pos + 8 <= end:
        _group, elem, length = struct.unpack_from("<HHI", data, pos)
        elements[elem] = data[pos + 8:pos + 8 + length]
        pos += 8 + length
    if pos != end:
        raise Abort("malformed DIMSE command set")
    return elements


def uid_text(value: bytes | None) -> str:
    """A UI (or other text) value of a command element, without its padding."""
    return value.decode("ascii", "replace").rstrip("\0 ") if value else ""


def us(value: bytes | None) -> int:
    """A US value of a command element; -1 if absent."""
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
            _element(0x0800, struct.pack("<H", NO_DATASET)),
            _element(0x0900, struct.pack("<H", status))]
    if error_comment:
        comment = error_comment.encode("ascii", "replace")[:64]
        body.append(_element(0x0902, comment + b" " if len(comment) % 2 else comment))
    if sop_instance_uid:
        body.append(_element(0x1000, _uid_value(sop_instance_uid)))
    joined = b"".join(body)
    return _element(0x0000, struct.pack("<I", len(joined))) + joined


def pdu(pdu_type: int, body: bytes) -> bytes:
    """An upper-layer PDU: type, reserved byte, big-endian length, body (PS3.8 9.3.1)."""
    return struct.pack(">BxI", pdu_type, len(body)) + body


def p_data(context_id: int, command: bytes) -> bytes:
    """A P-DATA-TF PDU carrying one whole command set on a presentation context."""
    pdv = struct.pack(">IBB", len(command) + 2, context_id, 0x03) + command
    return pdu(0x04, pdv)


RELEASE_RP = pdu(0x06, bytes(4))


def abort_pdu(source: int = 2, reason: int = 0) -> bytes:
    """An A-ABORT PDU (source 2: the service provider)."""
    return pdu(0x07, bytes((0, 0, source, reason)))
