"""`cinesr serve` as a real process (issue 14 #10, #11): its embedded worker dies with it, even on kill -9; a
port in use is named, exit code 2, and leaves no worker behind; what it and its worker log is JSON lines only."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cinesr.service.cli import CLI

from tests.waiting import wait_for
from tests.worker.celery_helpers import children_of, free_port

pytestmark = pytest.mark.slow


def _env(data: Path, dicom_port: int, http_port: int) -> dict[str, str]:
    return {**os.environ, "CINESR_DATA_DIR": str(data), "CINESR_DICOM_PORT": str(dicom_port),
            "CINESR_HTTP_PORT": str(http_port), "CINESR_API_TOKENS": "t0ken", "CINESR_DEFAULT_METHOD": "baseline",
            "CINESR_HEARTBEAT_FILE": str(data.parent / "heartbeat"), "OMP_NUM_THREADS": "1",
            "CINESR_TORCH_THREADS": "1"}


def _serve(data: Path, dicom_port: int, http_port: int, stderr: Path) -> subprocess.Popen[bytes]:
    with open(stderr, "wb") as err:
        return subprocess.Popen([*CLI, "--log-level", "INFO", "serve", "--host", "127.0.0.1"],
                                env=_env(data, dicom_port, http_port), stdout=subprocess.DEVNULL, stderr=err)


def _workers_of(data: Path) -> list[int]:
    """PIDs of `cinesr worker` processes (and their pool children) serving this DATA_DIR."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if f"CINESR_DATA_DIR={data}".encode() in environ and b"worker" in cmdline and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def cleanup() -> Iterator[list[int]]:
    pids: list[int] = []
    yield pids
    for pid in pids:  # only what this test started
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _json_lines_only(text: str, where: str) -> list[dict]:
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"{where}: not a JSON line: {line[:200]!r}") from None
    return records


def test_kill9_of_serve_takes_the_embedded_worker_with_it(tmp_path: Path, cleanup: list[int]) -> None:
    data = tmp_path / "data"
    http_port = free_port()
    serve = _serve(data, free_port(), http_port, tmp_path / "serve.err")
    cleanup.append(serve.pid)
    # the worker process and its pool child are up
    wait_for(lambda: len(_workers_of(data)) >= 2, 90, interval=0.2, what="embedded worker and its pool child")
    workers = _workers_of(data)
    cleanup.extend(workers)
    assert children_of(serve.pid), "the worker is a child of serve"
    wait_for(lambda: _healthy(http_port), 60, interval=0.2, what="REST up")
    serve.send_signal(signal.SIGKILL)
    serve.wait(10)
    t0 = time.monotonic()
    wait_for(lambda: not any(_alive(p) for p in workers), 10, interval=0.05, what="the worker to die with serve")
    print(f"worker and pool child gone {time.monotonic() - t0:.2f} s after kill -9 of serve")
    # what serve and its worker logged is JSON lines only (uvicorn's lines included)
    _json_lines_only((tmp_path / "serve.err").read_text(), "serve stderr")
    records = _json_lines_only((data / "logs" / "worker.log").read_text(), "worker log")
    assert records and not any("Warning: " in r["msg"] and r["logger"] != "py.warnings" for r in records)


def _healthy(port: int) -> bool:
    """/healthz answers 200; not yet while the port is closed or a busy machine answers slowly (a read
    timeout here is no verdict: the probe asks again until wait_for's deadline)."""
    if not _port_open(port):
        return False
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("busy", ["http", "dicom"])
def test_a_port_in_use_is_named_and_leaves_no_worker(tmp_path: Path, busy: str, cleanup: list[int]) -> None:
    data = tmp_path / "data"
    blocker = socket.socket()
    blocker.bind(("0.0.0.0" if busy == "dicom" else "127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    http_port, dicom_port = (port, free_port()) if busy == "http" else (free_port(), port)
    try:
        serve = _serve(data, dicom_port, http_port, tmp_path / "serve.err")
        cleanup.append(serve.pid)
        code = serve.wait(90)
    finally:
        blocker.close()
    err = (tmp_path / "serve.err").read_text()
    lines = [line for line in err.splitlines() if line.startswith("cinesr: error:")]
    assert code == 2, err[-2000:]
    what = "HTTP" if busy == "http" else "DICOM"
    assert lines and what in lines[0] and f"port {port}" in lines[0] and "in use" in lines[0], err[-2000:]
    time.sleep(2)  # a worker that was started would still be there now
    left = [p for p in _workers_of(data) if _alive(p)]
    cleanup.extend(left)
    assert left == []
    # everything but the one error line is a JSON log line
    _json_lines_only("\n".join(line for line in err.splitlines() if not line.startswith("cinesr: error:")),
                     "serve stderr")
