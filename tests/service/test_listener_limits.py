"""Memory bounds of the listener against peers that lie: hand-built PDUs on real sockets (issue 14, #1).

The listener runs in a child process so that its peak resident memory (VmHWM) can be read."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cinesr.service.echo import echo
from pydicom.uid import generate_uid
from pynetdicom.sop_class import MRImageStorage

from .conftest import RunningListener, require_dcmtk
from .rawpdu import EXPLICIT_VR_LE, RawAssociation, c_store_command, p_data, read_pdu
from .test_listener import dataset_bytes, mr_dataset, storescu, write_file

CHILD = """
import sys
from cinesr.service.listener import ListenerConfig, start_listener
from cinesr.service.store import InstanceStore
store = InstanceStore(sys.argv[1], segment_size=1 << 20, spare_segments=1, min_free_bytes=0, min_free_fraction=0)
budget = int(sys.argv[2]) if len(sys.argv) > 2 else 256 << 20
handle = start_listener(ListenerConfig(port=0, host="127.0.0.1", receive_buffer_bytes=budget), store)
print(handle.port, flush=True)
sys.stdin.read()
"""


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def test_lying_pdu_lengths_are_aborted_before_any_allocation(tmp_path: Path) -> None:
    """Four associations each send a C-STORE request and then a P-DATA PDU claiming 500 MB, and hold on.
    The listener must abort each (A-ABORT, invalid PDU parameter) at the header, stay within a few MB of
    its idle memory, and keep serving."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "data")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    peers: list[socket.socket] = []
    try:
        port = int(child.stdout.readline())
        assert echo("127.0.0.1", port, "CINESR")
        time.sleep(0.2)
        idle = _kib(child.pid, "VmRSS")
        claim = 500_000_000
        for _ in range(4):
            assoc = RawAssociation(port, [(1, MRImageStorage, EXPLICIT_VR_LE)])
            sock = assoc.sock
            sock.sendall(p_data(1, 0x03, c_store_command(MRImageStorage, generate_uid())))
            # PDU header and PDV header claim 500 MB; only 100 bytes follow
            sock.sendall(struct.pack(">BBI", 0x04, 0, claim) + struct.pack(">IBB", claim - 4, 1, 0x02) + bytes(100))
            peers.append(sock)
        for sock in peers:
            pdu_type, body = read_pdu(sock)  # the answer is an A-ABORT, not a wait for 500 MB
            assert pdu_type == 0x07
            assert body[2:4] == bytes([2, 6])  # source: service provider; reason: invalid PDU parameter value
        peak = _kib(child.pid, "VmHWM")
        print(f"lying PDUs: idle {idle >> 10} MiB, peak {peak >> 10} MiB")
        assert peak - idle < 32 << 10, f"listener grew by {(peak - idle) >> 10} MiB"
        # still serving: an echo and a real instance over a fresh association
        assert echo("127.0.0.1", port, "CINESR")
        ds = mr_dataset(rows=64)
        with RawAssociation(port, [(1, MRImageStorage, EXPLICIT_VR_LE)]) as good:
            write_file(tmp_path / "ok.dcm", ds)
            data, _ts = dataset_bytes(tmp_path / "ok.dcm")
            assert good.c_store(1, MRImageStorage, ds.SOPInstanceUID, data).status == 0x0000
            good.release()
    finally:
        for sock in peers:
            sock.close()
        child.stdin.close()
        child.terminate()
        child.wait(timeout=10)


def test_receive_buffer_budget_refuses_an_instance_larger_than_it(make_listener, tmp_path: Path) -> None:
    """Honest PDUs of the announced size can still add up to any dataset size: the receive buffers of all
    associations share a budget, and an instance beyond it is read and discarded, answered 0xA700; the
    same association goes on."""
    require_dcmtk()
    listener: RunningListener = make_listener(receive_buffer_bytes=1 << 20)
    big_ds, small_ds = mr_dataset(rows=1024), mr_dataset(rows=256)  # 2 MiB and 128 KiB of pixels
    big, _ts = dataset_bytes(write_file(tmp_path / "big.dcm", big_ds))
    small, _ts = dataset_bytes(write_file(tmp_path / "small.dcm", small_ds))
    with RawAssociation(listener.port, [(1, MRImageStorage, EXPLICIT_VR_LE)]) as assoc:
        refused = assoc.c_store(1, MRImageStorage, big_ds.SOPInstanceUID, big, fragment=16000)
        assert (refused.status, refused.comment) == (0xA700, "instance larger than the receive buffer allows")
        assert assoc.c_store(1, MRImageStorage, small_ds.SOPInstanceUID, small, fragment=16000).status == 0
        assoc.release()
    assert [p.stem for p in listener.files()] == [small_ds.SOPInstanceUID]
    assert listener.handle.listener.receive_budget.in_use == 0  # every association gave its share back
    assert storescu(listener.port, tmp_path / "small.dcm").returncode == 0  # dcmtk too: a duplicate, success


@pytest.mark.slow
def test_honest_pdus_of_four_huge_instances_stay_within_the_receive_budget(tmp_path: Path) -> None:
    """Four associations each stream a 64 MiB dataset in PDUs of the announced size: the listener's buffers
    never exceed its receive budget (32 MiB here), each instance is answered 0xA700, and it keeps serving."""
    budget = 32 << 20
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "data"), str(budget)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())
        assert echo("127.0.0.1", port, "CINESR")
        time.sleep(0.2)
        idle = _kib(child.pid, "VmRSS")
        answers: list[tuple[int, str]] = []
        chunk = bytes((1 << 20) - 6)  # one PDV per PDU of the announced 1 MiB

        def send() -> None:
            with RawAssociation(port, [(1, MRImageStorage, EXPLICIT_VR_LE)], timeout=120) as assoc:
                answer = assoc.c_store(1, MRImageStorage, generate_uid(), chunk * 64, fragment=len(chunk))
                answers.append((answer.status, answer.comment))

        senders = [threading.Thread(target=send) for _ in range(4)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(timeout=180)
        assert answers == [(0xA700, "instance larger than the receive buffer allows")] * 4
        peak = _kib(child.pid, "VmHWM")
        print(f"honest PDUs, {budget >> 20} MiB budget: idle {idle >> 10} MiB, peak {peak >> 10} MiB")
        assert peak - idle < (budget >> 10) + (16 << 10), f"listener grew by {(peak - idle) >> 10} MiB"
        assert echo("127.0.0.1", port, "CINESR")
    finally:
        child.stdin.close()
        child.terminate()
        child.wait(timeout=10)
