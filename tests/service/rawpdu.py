"""A DICOM SCU built from hand-made PDUs on a plain socket (PS3.8), for sending what no toolkit would:
lying PDU lengths, request UIDs that disagree with the dataset, a SOP class on another class's context."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"


def _uid(uid: str) -> bytes:
    raw = uid.encode()
    return raw + b"\0" if len(raw) % 2 else raw


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def associate_rq(contexts: list[tuple[int, str, str]], calling: str = "RAWPDU", called: str = "CINESR",
                 max_pdu: int = 16384) -> bytes:
    """A-ASSOCIATE-RQ proposing (context id, abstract syntax, transfer syntax) contexts."""
    items = _item(0x10, APPLICATION_CONTEXT.encode())
    for context_id, abstract, syntax in contexts:
        items += _item(0x20, struct.pack(">BBBB", context_id, 0, 0, 0)
                       + _item(0x30, abstract.encode()) + _item(0x40, syntax.encode()))
    items += _item(0x50, _item(0x51, struct.pack(">I", max_pdu)))
    body = (struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16)
            + bytes(32) + items)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def _element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, elem, len(value)) + value


def c_store_command(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set (Implicit VR Little Endian), a dataset follows."""
    body = b"".join([_element(0x0002, _uid(sop_class)), _element(0x0100, struct.pack("<H", 0x0001)),
                     _element(0x0110, struct.pack("<H", message_id)), _element(0x0700, struct.pack("<H", 0)),
                     _element(0x0800, struct.pack("<H", 0x0000)), _element(0x1000, _uid(sop_instance))])
    return _element(0x0000, struct.pack("<I", len(body))) + body


def p_data(context_id: int, control: int, data: bytes) -> bytes:
    """One P-DATA-TF PDU carrying one PDV (control: bit 0 command, bit 1 last fragment)."""
    pdv = struct.pack(">IBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    header = recv_exact(sock, 6)
    length = struct.unpack_from(">I", header, 2)[0]
    return header[0], recv_exact(sock, length)


@dataclass
class Response:
    status: int
    comment: str


def _parse_response(body: bytes) -> Response:
    """Status (0000,0900) and ErrorComment (0000,0902) of a one-PDV response command."""
    data = body[6:]  # PDV length, context id, control
    status, comment, pos = -1, "", 0
    while pos + 8 <= len(data):
        _group, elem, length = struct.unpack_from("<HHI", data, pos)
        value = data[pos + 8:pos + 8 + length]
        if elem == 0x0900:
            status = struct.unpack("<H", value)[0]
        elif elem == 0x0902:
            comment = value.decode("ascii", "replace").strip()
        pos += 8 + length
    return Response(status, comment)


class RawAssociation:
    """An established association on a plain socket."""

    def __init__(self, port: int, contexts: list[tuple[int, str, str]], timeout: float = 10) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.sendall(associate_rq(contexts))
        pdu_type, body = read_pdu(self.sock)
        if pdu_type != 0x02:
            raise ConnectionError(f"association not accepted: PDU type {pdu_type:#04x}")
        self.message_id = 0

    def c_store(self, context_id: int, sop_class: str, sop_instance: str, dataset: bytes,
                fragment: int = 8192) -> Response:
        self.message_id += 1
        self.sock.sendall(p_data(context_id, 0x03, c_store_command(sop_class, sop_instance, self.message_id)))
        for start in range(0, max(len(dataset), 1), fragment):
            last = start + fragment >= len(dataset)
            self.sock.sendall(p_data(context_id, 0x02 if last else 0x00, dataset[start:start + fragment]))
        pdu_type, body = read_pdu(self.sock)
        if pdu_type != 0x04:
            raise ConnectionError(f"expected a C-STORE response, got PDU type {pdu_type:#04x}")
        return _parse_response(body)

    def release(self) -> None:
        self.sock.sendall(struct.pack(">BBI", 0x05, 0, 4) + bytes(4))
        read_pdu(self.sock)
        self.sock.close()

    def __enter__(self) -> RawAssociation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
