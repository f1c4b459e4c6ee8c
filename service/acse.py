"""Association-establishment PDUs as bytes (PS3.8 9.3.2-9.3.4): the A-ASSOCIATE-RQ we receive, the
A-ASSOCIATE-AC and -RJ we answer with.

Pure functions, no policy: what is accepted is decided in cinesr.service.association. Anything that cannot be
read raises Abort, which the listener answers with an A-ABORT. The checks on AE titles, UIDs, context ids and
user-information sub-items reproduce what pynetdicom's decoder refused before these bytes were ours, so the
same requests are aborted as before; two differences: items of unknown types are skipped (PS3.8 9.3.1) where
pynetdicom raised, and a request too short for its fixed fields is aborted where pynetdicom read what there
was and the association rejected it for its missing application context.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cinesr.service.dimse import Abort, pdu

INVALID_PARAMETER = 6  # A-ABORT reason: invalid PDU parameter value (PS3.8 Table 9-26)

_FIXED = 68  # protocol version, reserved, called AE, calling AE, 32 reserved bytes: the variable items follow
_ITEM = struct.Struct(">BxH")  # item type, reserved, item length
_UINT16 = struct.Struct(">H")
_UINT32 = struct.Struct(">I")


@dataclass(frozen=True)
class ProposedContext:
    """One presentation context item (0x20) of the request."""

    context_id: int
    abstract_syntax: str | None  # None: the item had no abstract syntax sub-item
    transfer_syntaxes: tuple[str, ...]  # in the proposer's order, empty and repeated ones dropped


@dataclass(frozen=True)
class RoleSelection:
    """An SCP/SCU role selection sub-item (0x54) the requestor proposed."""

    sop_class_uid: str
    scu_role: int
    scp_role: int


@dataclass(frozen=True)
class AssociateRequest:
    """What an A-ASSOCIATE-RQ carries. The AE title fields are kept as the 16 bytes received: the AC echoes them."""

    protocol_version: int
    called_ae_field: bytes
    calling_ae_field: bytes
    called_ae_title: str  # without leading and trailing spaces (they are not significant)
    calling_ae_title: str
    application_context: str | None  # None: no application context item
    contexts: tuple[ProposedContext, ...]
    max_length: int | None = None
    implementation_class_uid: str | None = None
    implementation_version_name: str | None = None
    async_ops_window: tuple[int, int] | None = None  # (invoked, performed)
    roles: tuple[RoleSelection, ...] = ()


def _items(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """(item type, value start, value end) of each item in data[start:end]; Abort if one runs past the end."""
    found = []
    while start < end:
        if start + 4 > end:
            raise Abort("truncated item header in A-ASSOCIATE-RQ", reason=INVALID_PARAMETER)
        item_type, length = _ITEM.unpack_from(data, start)
        value_end = start + 4 + length
        if value_end > end:
            raise Abort(f"item {item_type:#04x} runs past its parent in A-ASSOCIATE-RQ", reason=INVALID_PARAMETER)
        found.append((item_type, start + 4, value_end))
        start = value_end
    return found


def _ascii(raw: bytes, what: str) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise Abort(f"{what} is not ASCII", reason=INVALID_PARAMETER) from None


def _valid_ae_text(text: str) -> bool:
    """PS3.5 AE rules: no control characters (0x00-0x1F, 0x7F), no backslash."""
    return not any(ord(c) < 0x20 or c == "\x7f" or c == "\\" for c in text)


def _ae_title(field: bytes, what: str) -> str:
    """An AE title field: leading and trailing spaces dropped; empty or control characters -> Abort."""
    title = _ascii(field, what).strip()
    if not title or not _valid_ae_text(title):
        raise Abort(f"invalid {what} {field!r}", reason=INVALID_PARAMETER)
    return title


def _uid(data: bytes, start: int, end: int, what: str) -> str:
    """A UID value: one trailing NUL (the pad some senders add) and surrounding whitespace dropped; over 64
    characters -> Abort. Its characters are not checked, only compared against the UIDs we know."""
    if end > start and data[end - 1] == 0:
        end -= 1
    uid = _ascii(data[start:end], what).strip()
    if len(uid) > 64:
        raise Abort(f"{what} longer than 64 characters", reason=INVALID_PARAMETER)
    return uid


def _presentation_context(data: bytes, start: int, end: int) -> ProposedContext:
    if end - start < 4:
        raise Abort("truncated presentation context item", reason=INVALID_PARAMETER)
    context_id = data[start]
    if context_id % 2 == 0:  # odd, 1-255 (PS3.8 9.3.2.2)
        raise Abort(f"presentation context id {context_id} is not odd", reason=INVALID_PARAMETER)
    abstract: str | None = None
    syntaxes: list[str] = []
    for item_type, value_start, value_end in _items(data, start + 4, end):
        if item_type == 0x30:
            abstract = _uid(data, value_start, value_end, "abstract syntax")  # a repeated one replaces it
        elif item_type == 0x40:
            syntax = _uid(data, value_start, value_end, "transfer syntax")
            if syntax and syntax not in syntaxes:
                syntaxes.append(syntax)
    return ProposedContext(context_id, abstract, tuple(syntaxes))


def _role_selection(data: bytes, start: int, end: int) -> RoleSelection:
    if end - start < 2:
        raise Abort("truncated role selection sub-item", reason=INVALID_PARAMETER)
    uid_end = start + 2 + _UINT16.unpack_from(data, start)[0]
    if uid_end + 2 > end:
        raise Abort("role selection sub-item shorter than its UID length", reason=INVALID_PARAMETER)
    scu_role, scp_role = data[uid_end], data[uid_end + 1]
    if scu_role > 1 or scp_role > 1:
        raise Abort("role selection values must be 0 or 1", reason=INVALID_PARAMETER)
    return RoleSelection(_uid(data, start + 2, uid_end, "role selection SOP class"), scu_role, scp_role)


def _user_information(data: bytes, start: int, end: int) -> dict[str, object]:
    """The sub-items we read, as AssociateRequest fields. Extended negotiation (0x56, 0x57), user identity
    (0x58) and unknown sub-items are skipped: we answer none of them."""
    fields: dict[str, object] = {}
    roles: list[RoleSelection] = []
    for item_type, value_start, value_end in _items(data, start, end):
        length = value_end - value_start
        if item_type == 0x51:
            if length != 4:
                raise Abort("maximum length sub-item is not 4 bytes", reason=INVALID_PARAMETER)
            fields["max_length"] = _UINT32.unpack_from(data, value_start)[0]
        elif item_type == 0x52:
            fields["implementation_class_uid"] = _uid(data, value_start, value_end, "implementation class UID")
        elif item_type == 0x55:
            name = _ascii(data[value_start:value_end], "implementation version name")
            if len(name) > 16 or not _valid_ae_text(name):
                raise Abort(f"invalid implementation version name {name!r}", reason=INVALID_PARAMETER)
            fields["implementation_version_name"] = name
        elif item_type == 0x53:
            if length < 4:
                raise Abort("truncated asynchronous operations window sub-item", reason=INVALID_PARAMETER)
            fields["async_ops_window"] = (_UINT16.unpack_from(data, value_start)[0],
                                          _UINT16.unpack_from(data, value_start + 2)[0])
        elif item_type == 0x54:
            roles.append(_role_selection(data, value_start, value_end))
    fields["roles"] = tuple(roles)
    return fields


def decode_associate_rq(body: bytes) -> AssociateRequest:
    """An A-ASSOCIATE-RQ from its PDU body (the bytes after the 6-byte PDU header)."""
    if len(body) < _FIXED:
        raise Abort(f"A-ASSOCIATE-RQ of {len(body)} bytes is shorter than its fixed fields", reason=INVALID_PARAMETER)
    body = bytes(body)
    called_field, calling_field = body[4:20], body[20:36]
    application_context: str | None = None
    contexts: list[ProposedContext] = []
    user: dict[str, object] = {}
    # Items of types we do not know are skipped (PS3.8 9.3.1); so are 0x21 and sub-item types at this level.
    for item_type, start, end in _items(body, _FIXED, len(body)):
        if item_type == 0x10:
            name = _uid(body, start, end, "application context name")
            if application_context is None:  # the first one counts
                application_context = name
        elif item_type == 0x20:
            contexts.append(_presentation_context(body, start, end))
        elif item_type == 0x50:
            user = _user_information(body, start, end)  # a repeated one replaces it
    return AssociateRequest(
        protocol_version=_UINT16.unpack_from(body, 0)[0],
        called_ae_field=called_field,
        calling_ae_field=calling_field,
        called_ae_title=_ae_title(called_field, "called AE title"),
        calling_ae_title=_ae_title(calling_field, "calling AE title"),
        application_context=application_context,
        contexts=tuple(contexts),
        **user,  # type: ignore[arg-type]
    )


def _item(item_type: int, value: bytes) -> bytes:
    return _ITEM.pack(item_type, len(value)) + value


def encode_associate_ac(called_ae_field: bytes, calling_ae_field: bytes, application_context: str,
                        results: list[tuple[int, int, str]], max_length: int, implementation_class_uid: str,
                        implementation_version_name: str) -> bytes:
    """An A-ASSOCIATE-AC PDU. ``results``: (context id, result, transfer syntax) per proposed context, in the
    proposer's order. UIDs go unpadded (PS3.8 Annex F: no padding in negotiation); the AE title fields are
    sent back as received (PS3.8 Table 9-17)."""
    items = [_item(0x10, application_context.encode("ascii"))]
    for context_id, result, syntax in results:
        items.append(_item(0x21, bytes((context_id, 0, result, 0)) + _item(0x40, syntax.encode("ascii"))))
    user = [_item(0x51, _UINT32.pack(max_length)), _item(0x52, implementation_class_uid.encode("ascii"))]
    if implementation_version_name:
        user.append(_item(0x55, implementation_version_name.encode("ascii")))
    items.append(_item(0x50, b"".join(user)))
    fixed = _UINT16.pack(1) + bytes(2) + called_ae_field.ljust(16)[:16] + calling_ae_field.ljust(16)[:16] + bytes(32)
    return pdu(0x02, fixed + b"".join(items))


def encode_associate_rj(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4): result 1 permanent / 2 transient, source, reason/diagnostic."""
    return pdu(0x03, bytes((0, result, source, reason)))
