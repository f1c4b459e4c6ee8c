"""The association-establishment codec (service/acse.py) against pynetdicom's: requests decode to what
pynetdicom decoded, our AC/RJ decode in pynetdicom to what we meant, malformed requests raise Abort."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess

import pytest
from cinesr.service.acse import AssociateRequest, decode_associate_rq, encode_associate_ac, encode_associate_rj
from cinesr.service.dimse import APPLICATION_CONTEXT, Abort
from cinesr.service.wire import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from pydicom.data import get_testdata_file
from pynetdicom import StoragePresentationContexts
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import PresentationContext

from .conftest import RunningListener
from .rawpdu import EXPLICIT_VR_LE, associate_rq, read_pdu

MR = "1.2.840.10008.5.1.4.1.1.4"
CT = "1.2.840.10008.5.1.4.1.1.2"
UNCOMPRESSED = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"]


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _rq(items: bytes, called: bytes = b"CINESR".ljust(16), calling: bytes = b"MODALITY".ljust(16)) -> bytes:
    """An A-ASSOCIATE-RQ PDU from raw variable items and raw 16-byte AE title fields."""
    body = struct.pack(">HH", 1, 0) + called + calling + bytes(32) + items
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def _context(context_id: int, abstract: bytes, *syntaxes: bytes) -> bytes:
    syntax_items = b"".join(_item(0x40, s) for s in syntaxes)
    return _item(0x20, bytes((context_id, 0, 0, 0)) + _item(0x30, abstract) + syntax_items)


def _user(*sub_items: bytes) -> bytes:
    return _item(0x50, b"".join(sub_items))


def _max_length(n: int = 16384) -> bytes:
    return _item(0x51, struct.pack(">I", n))


APP = _item(0x10, APPLICATION_CONTEXT.encode())


def pynetdicom_rq(contexts: list[PresentationContext], user: list[object], calling: str = "MODALITY",
                  called: str = "CINESR") -> bytes:
    """An A-ASSOCIATE-RQ encoded by pynetdicom."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title, primitive.called_ae_title = calling, called
    primitive.presentation_context_definition_list = contexts
    primitive.user_information = user
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def _context_list(abstracts: list[str], syntaxes: list[str]) -> list[PresentationContext]:
    contexts = []
    for n, abstract in enumerate(abstracts):
        context = PresentationContext()
        context.context_id = 2 * n + 1
        context.abstract_syntax = abstract
        context.transfer_syntax = list(syntaxes)
        contexts.append(context)
    return contexts


def _basic_user(version: str | None = "SOMESCU_1") -> list[object]:
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 32768
    impl_uid = ImplementationClassUIDNotification()
    impl_uid.implementation_class_uid = "1.2.3.4.5"
    user: list[object] = [max_length, impl_uid]
    if version is not None:
        name = ImplementationVersionNameNotification()
        name.implementation_version_name = version
        user.append(name)
    return user


def assert_same_as_pynetdicom(pdu: bytes) -> AssociateRequest:
    """Decode with both; every field the listener reads must agree."""
    ours = decode_associate_rq(pdu[6:])
    rq = A_ASSOCIATE_RQ()
    rq.decode(pdu)
    theirs = rq.to_primitive()
    assert ours.called_ae_title == theirs.called_ae_title
    assert ours.calling_ae_title == theirs.calling_ae_title
    assert ours.called_ae_field == pdu[10:26] and ours.calling_ae_field == pdu[26:42]
    assert ours.application_context == (None if theirs.application_context_name is None
                                        else str(theirs.application_context_name))
    assert ours.protocol_version == rq.protocol_version
    assert [(c.context_id, c.abstract_syntax, c.transfer_syntaxes) for c in ours.contexts] == [
        (c.context_id, None if c.abstract_syntax is None else str(c.abstract_syntax),
         tuple(str(ts) for ts in c.transfer_syntax))
        for c in theirs.presentation_context_definition_list]
    user = theirs.user_information
    lengths = [i.maximum_length_received for i in user if isinstance(i, MaximumLengthNotification)]
    assert ours.max_length == (lengths[-1] if lengths else None)
    uids = [str(i.implementation_class_uid) for i in user if isinstance(i, ImplementationClassUIDNotification)]
    assert ours.implementation_class_uid == (uids[-1] if uids else None)
    names = [i.implementation_version_name for i in user if isinstance(i, ImplementationVersionNameNotification)]
    assert ours.implementation_version_name == (names[-1] if names else None)
    windows = [(i.maximum_number_operations_invoked, i.maximum_number_operations_performed)
               for i in user if isinstance(i, AsynchronousOperationsWindowNegotiation)]
    assert ours.async_ops_window == (windows[-1] if windows else None)
    assert [(r.sop_class_uid, bool(r.scu_role), bool(r.scp_role)) for r in ours.roles] == [
        (str(i.sop_class_uid), i.scu_role, i.scp_role) for i in user if isinstance(i, SCP_SCU_RoleSelectionNegotiation)]
    return ours


# ---- requests: ours decodes as pynetdicom did ------------------------------------------------------------

def capture_storescu_rq() -> bytes:
    """The A-ASSOCIATE-RQ dcmtk's storescu sends (all its storage contexts), caught on a plain socket."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(30)
    port = server.getsockname()[1]
    peer = subprocess.Popen(["storescu", "-aec", "CINESR", "-aet", "MODALITY", "127.0.0.1", str(port),
                             get_testdata_file("CT_small.dcm")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(30)
            pdu_type, body = read_pdu(conn)
        assert pdu_type == 0x01
        return struct.pack(">BBI", pdu_type, 0, len(body)) + body
    finally:
        server.close()
        peer.wait(timeout=30)  # it gives up once the connection closes


@pytest.mark.skipif(shutil.which("storescu") is None, reason="dcmtk storescu is not installed")
def test_storescu_request_decodes_as_pynetdicom_did() -> None:
    pdu = capture_storescu_rq()
    request = assert_same_as_pynetdicom(pdu)
    assert len(request.contexts) > 100  # storescu proposes every storage class it knows
    assert request.calling_ae_title == "MODALITY" and request.called_ae_title == "CINESR"
    assert request.implementation_class_uid and request.max_length


def test_pynetdicom_built_requests_decode_alike() -> None:
    abstracts = [str(c.abstract_syntax) for c in StoragePresentationContexts][:127]
    assert_same_as_pynetdicom(pynetdicom_rq(_context_list(abstracts, UNCOMPRESSED), _basic_user()))
    assert_same_as_pynetdicom(pynetdicom_rq(_context_list([MR], [EXPLICIT_VR_LE]), _basic_user(None),
                                            calling="A", called="B"))


def test_optional_user_information_decodes_alike() -> None:
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked, window.maximum_number_operations_performed = 5, 3
    roles = []
    for uid, scu, scp in ((MR, True, True), (CT, False, True)):
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid, role.scu_role, role.scp_role = uid, scu, scp
        roles.append(role)
    identity = UserIdentityNegotiation()
    identity.user_identity_type, identity.primary_field, identity.positive_response_requested = 1, b"user", True
    extended = SOPClassExtendedNegotiation()
    extended.sop_class_uid, extended.service_class_application_information = MR, b"\x01\x00"
    user = _basic_user() + [window, *roles, identity, extended]
    request = assert_same_as_pynetdicom(pynetdicom_rq(_context_list([MR, CT], UNCOMPRESSED), user))
    assert request.async_ops_window == (5, 3)
    assert [(r.sop_class_uid, r.scu_role, r.scp_role) for r in request.roles] == [(MR, 1, 1), (CT, 0, 1)]


def test_odd_but_valid_requests_decode_alike() -> None:
    cases = [
        # AE titles with leading spaces; UIDs with a NUL pad; a repeated and an empty transfer syntax
        _rq(APP + _context(1, MR.encode() + b"\0", b"1.2.840.10008.1.2\0", b"1.2.840.10008.1.2\0", b"")
            + _user(_max_length()), called=b"  CINESR".ljust(16), calling=b" MOD".ljust(16)),
        # no user information item; a second abstract syntax sub-item replaces the first
        _rq(APP + _item(0x20, bytes((3, 0, 0, 0)) + _item(0x30, CT.encode()) + _item(0x30, MR.encode())
                        + _item(0x40, EXPLICIT_VR_LE.encode()))),
        # no application context item (the association rejects it); a 16-character AE title
        _rq(_context(255, MR.encode(), EXPLICIT_VR_LE.encode()) + _user(_max_length(0)), calling=b"ABCDEFGHIJKLMNOP"),
        # an empty abstract syntax; a transfer syntax surrounded by spaces
        _rq(APP + _context(5, b"", b" 1.2.840.10008.1.2.1 ") + _user(_max_length(), _item(0x55, b""))),
    ]
    for pdu in cases:
        assert_same_as_pynetdicom(pdu)
    assert decode_associate_rq(cases[0][6:]).called_ae_field == b"  CINESR".ljust(16)
    assert decode_associate_rq(cases[2][6:]).application_context is None


def test_unknown_items_are_skipped() -> None:
    """PS3.8 9.3.1: unrecognised items are ignored (pynetdicom raised on these)."""
    pdu = _rq(APP + _item(0x99, b"whatever") + _context(1, MR.encode(), EXPLICIT_VR_LE.encode())
              + _user(_max_length(), _item(0x5A, b"x"), _item(0x58, b"\x01\x00\x00\x01u\x00\x00"),
                      _item(0x52, b"1.2.3")))
    request = decode_associate_rq(pdu[6:])
    assert [(c.context_id, c.abstract_syntax, c.transfer_syntaxes) for c in request.contexts] == [
        (1, MR, (EXPLICIT_VR_LE,))]
    assert request.implementation_class_uid == "1.2.3" and request.max_length == 16384


# ---- malformed requests: Abort ---------------------------------------------------------------------------

GOOD = _rq(APP + _context(1, MR.encode(), EXPLICIT_VR_LE.encode()) + _user(_max_length()))

MALFORMED = {
    "shorter than the fixed fields": GOOD[:6 + 60],
    "item length past the end": GOOD[:-3],
    "truncated item header": GOOD + b"\x10\x00",
    "sub-item past its context": _rq(APP + _item(0x20, bytes((1, 0, 0, 0)) + b"\x30\x00\x00\x40" + MR.encode())),
    "empty presentation context item": _rq(APP + _item(0x20, b"")),
    "even context id": _rq(APP + _context(2, MR.encode(), EXPLICIT_VR_LE.encode())),
    "context id 0": _rq(APP + _context(0, MR.encode(), EXPLICIT_VR_LE.encode())),
    "all-space called AE": _rq(APP, called=b" " * 16),
    "NUL-padded calling AE": _rq(APP, calling=b"MOD".ljust(16, b"\0")),
    "backslash in AE": _rq(APP, calling=b"MO\\D".ljust(16)),
    "non-ASCII AE": _rq(APP, calling="MODÄ".encode("latin-1").ljust(16)),
    "UID over 64 characters": _rq(APP + _context(1, b"1." * 33, EXPLICIT_VR_LE.encode())),
    "non-ASCII UID": _rq(APP + _context(1, "1.2.ä".encode("latin-1"), EXPLICIT_VR_LE.encode())),
    "maximum length of 3 bytes": _rq(APP + _user(_item(0x51, b"\0\0\1"))),
    "maximum length of 5 bytes": _rq(APP + _user(_item(0x51, b"\0\0\1\0\0"))),
    "short async window": _rq(APP + _user(_max_length(), _item(0x53, b"\0\1\0"))),
    "role values of 2": _rq(APP + _user(_max_length(), _item(0x54, struct.pack(">H", 5) + b"1.2.3" + b"\2\1"))),
    "role UID length past the item": _rq(APP + _user(_max_length(), _item(0x54, struct.pack(">H", 40) + b"1.2.3\1\1"))),
    "version name over 16": _rq(APP + _user(_max_length(), _item(0x55, b"A" * 17))),
}


def pynetdicom_refuses(pdu: bytes) -> bool:
    """Whether pynetdicom's decoder raised on it (the listener's catch-all then aborted the association)."""
    try:
        rq = A_ASSOCIATE_RQ()
        rq.decode(pdu)
        rq.to_primitive()
    except Exception:
        return True
    return False


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_requests_abort(case: str) -> None:
    with pytest.raises(Abort) as raised:
        decode_associate_rq(MALFORMED[case][6:])
    assert raised.value.reason == 6  # invalid PDU parameter value
    # Aborted before too, except a request shorter than its fixed fields: pynetdicom read its AE titles as
    # far as they went and found no application context (a rejection).
    assert pynetdicom_refuses(MALFORMED[case]) == (case != "shorter than the fixed fields")


def test_every_truncation_of_a_real_request_aborts_or_decodes() -> None:
    """Cut anywhere, a request either decodes or raises Abort: never another exception."""
    pdu = pynetdicom_rq(_context_list([MR, CT], UNCOMPRESSED), _basic_user())
    for end in range(6, len(pdu)):
        try:
            decode_associate_rq(pdu[6:end])
        except Abort:
            pass


# ---- AC and RJ: pynetdicom reads back what we meant --------------------------------------------------------

def test_ac_decodes_in_pynetdicom() -> None:
    called, calling = b"  CINESR".ljust(16), b"MODALITY".ljust(16)
    results = [(1, 0x00, EXPLICIT_VR_LE), (3, 0x03, "1.2.840.10008.1.2"), (5, 0x04, "1.2.840.10008.1.2.4.100"),
               (255, 0x00, "1.2.840.10008.1.2.4.201")]
    pdu = encode_associate_ac(called, calling, APPLICATION_CONTEXT, results, 16384, IMPLEMENTATION_CLASS_UID,
                              IMPLEMENTATION_VERSION_NAME)
    assert pdu[10:26] == called and pdu[26:42] == calling  # echoed as received, leading spaces kept
    ac = A_ASSOCIATE_AC()
    ac.decode(pdu)
    assert len(ac) == len(pdu) and ac.protocol_version == 1
    primitive = ac.to_primitive()
    assert str(primitive.application_context_name) == APPLICATION_CONTEXT
    assert [(c.context_id, c.result, str(c.transfer_syntax[0]))
            for c in primitive.presentation_context_definition_results_list] == results
    assert primitive.maximum_length_received == 16384
    assert primitive.implementation_class_uid == IMPLEMENTATION_CLASS_UID
    assert [i.implementation_version_name for i in primitive.user_information
            if isinstance(i, ImplementationVersionNameNotification)] == [IMPLEMENTATION_VERSION_NAME]
    assert not [i for i in primitive.user_information if isinstance(i, SCP_SCU_RoleSelectionNegotiation)]
    # pynetdicom re-encodes the items byte for byte (odd-length UIDs unpadded); it would strip the AE titles
    assert ac.encode()[42:] == pdu[42:]


def test_ac_bytes_match_what_pynetdicom_built() -> None:
    """For AE titles without leading spaces the AC is the one pynetdicom's primitives made, byte for byte."""
    results = [(1, 0x00, EXPLICIT_VR_LE), (3, 0x03, "1.2.840.10008.1.2"), (5, 0x04, "1.2.840.10008.1.2.2")]
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title, primitive.called_ae_title = "MODALITY", "CINESR"
    primitive.result = 0x00
    contexts = []
    for context_id, result, syntax in results:
        context = PresentationContext()
        context.context_id, context.result, context.transfer_syntax = context_id, result, [syntax]
        context.abstract_syntax = MR
        contexts.append(context)
    primitive.presentation_context_definition_results_list = contexts
    primitive.user_information = [MaximumLengthNotification(), ImplementationClassUIDNotification(),
                                  ImplementationVersionNameNotification()]
    primitive.user_information[0].maximum_length_received = 0
    primitive.user_information[1].implementation_class_uid = IMPLEMENTATION_CLASS_UID
    primitive.user_information[2].implementation_version_name = IMPLEMENTATION_VERSION_NAME
    theirs = A_ASSOCIATE_AC()
    theirs.from_primitive(primitive)
    ours = encode_associate_ac(b"CINESR".ljust(16), b"MODALITY".ljust(16), APPLICATION_CONTEXT, results, 0,
                               IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME)
    assert ours == theirs.encode()


@pytest.mark.parametrize(("result", "source", "reason"), [(1, 1, 2), (1, 1, 3), (1, 1, 7), (2, 3, 2)])
def test_rj_decodes_in_pynetdicom(result: int, source: int, reason: int) -> None:
    pdu = encode_associate_rj(result, source, reason)
    rj = A_ASSOCIATE_RJ()
    rj.decode(pdu)
    assert (rj.result, rj.source, rj.reason_diagnostic) == (result, source, reason)
    assert rj.encode() == pdu


# ---- the listener: what the peer sees --------------------------------------------------------------------

def _exchange(port: int, pdu: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(pdu)
        return read_pdu(sock)


def test_listener_answers_from_the_bytes(listener: RunningListener) -> None:
    # A role selection proposal goes unanswered (as before); the AE title fields come back as sent.
    role = _item(0x54, struct.pack(">H", len(MR)) + MR.encode() + b"\1\1")
    pdu = _rq(APP + _context(1, MR.encode(), b"1.2.840.10008.1.2.4.100", EXPLICIT_VR_LE.encode())
              + _context(3, b"1.2.3.4", EXPLICIT_VR_LE.encode()) + _context(5, MR.encode(), b"1.2.840.10008.1.2.4.100")
              + _user(_max_length(), role), called=b" CINESR".ljust(16))
    pdu_type, body = _exchange(listener.port, pdu)
    assert pdu_type == 0x02
    ac = A_ASSOCIATE_AC()
    ac.decode(struct.pack(">BBI", pdu_type, 0, len(body)) + body)
    assert body[4:20] == b" CINESR".ljust(16) and body[20:36] == b"MODALITY".ljust(16)
    primitive = ac.to_primitive()
    assert [(c.context_id, c.result, str(c.transfer_syntax[0]))
            for c in primitive.presentation_context_definition_results_list] == [
        (1, 0x00, EXPLICIT_VR_LE), (3, 0x03, EXPLICIT_VR_LE), (5, 0x04, "1.2.840.10008.1.2.4.100")]
    assert not [i for i in primitive.user_information if isinstance(i, SCP_SCU_RoleSelectionNegotiation)]
    assert primitive.implementation_class_uid == IMPLEMENTATION_CLASS_UID


def test_malformed_request_is_aborted_and_the_listener_goes_on(listener: RunningListener) -> None:
    no_transfer_syntax = _rq(APP + _item(0x20, bytes((1, 0, 0, 0)) + _item(0x30, MR.encode())) + _user(_max_length()))
    for pdu in (MALFORMED["item length past the end"], MALFORMED["even context id"], no_transfer_syntax):
        pdu = pdu[:2] + struct.pack(">I", len(pdu) - 6) + pdu[6:]  # the PDU length agrees; an item's does not
        pdu_type, body = _exchange(listener.port, pdu)
        assert (pdu_type, body[2], body[3]) == (0x07, 2, 6)  # A-ABORT from the provider: invalid parameter
    with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as sock:
        sock.sendall(associate_rq([(1, MR, EXPLICIT_VR_LE)]))
        assert read_pdu(sock)[0] == 0x02
    assert listener.handle.stats.rejected_associations == 0


def test_rejections_keep_their_reasons(make_listener) -> None:
    running = make_listener(allowed_calling_aets=("MODALITY",), require_called_aet=True)
    no_context = _rq(_context(1, MR.encode(), EXPLICIT_VR_LE.encode()) + _user(_max_length()))
    wrong_caller = _rq(APP + _context(1, MR.encode(), EXPLICIT_VR_LE.encode()), calling=b"OTHER".ljust(16))
    wrong_called = _rq(APP + _context(1, MR.encode(), EXPLICIT_VR_LE.encode()), called=b"NOTUS".ljust(16))
    for pdu, reason in ((no_context, 2), (wrong_caller, 3), (wrong_called, 7)):
        pdu_type, body = _exchange(running.port, pdu)
        assert (pdu_type, body[1], body[2], body[3]) == (0x03, 1, 1, reason)
