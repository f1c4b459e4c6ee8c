"""Start-up mistakes answered before any work: a port in use (one line naming it, exit code 2) and an output
path that is a file (refused before reading or computing). Real processes, real sockets."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cinesr.service.cli import CLI

from tests.orthanc import free_port


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another program listens on."""
    with socket.socket() as other:
        other.bind(("0.0.0.0", 0))
        other.listen()
        yield other.getsockname()[1]


def _serve(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "CINESR_DATA_DIR": str(tmp_path / "data"), "CINESR_API_TOKENS": "t",
                   "CINESR_BROKER_URL": "", **env}
    return subprocess.run([*CLI, "serve", "--no-worker"], capture_output=True, text=True, timeout=60,
                          env=environment)


@pytest.mark.parametrize("which", ["HTTP", "DICOM"])
def test_a_port_in_use_is_one_line_naming_it_and_exit_2(tmp_path: Path, taken_port: int, which: str) -> None:
    other = str(free_port())
    ports = {"CINESR_HTTP_PORT": str(taken_port), "CINESR_DICOM_PORT": other} if which == "HTTP" else \
        {"CINESR_HTTP_PORT": other, "CINESR_DICOM_PORT": str(taken_port)}
    run = _serve(tmp_path, **ports)
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines == [f"cinesr: error: {which} port {taken_port} on 0.0.0.0 is already in use; set "
                     f"CINESR_{which}_PORT or stop the other program"], run.stderr
    assert "Errno" not in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "data").exists()  # nothing started, nothing written


def test_an_output_path_that_is_a_file_is_refused_before_computing(tmp_path: Path, lowres_study: Path) -> None:
    target = tmp_path / "result.dcm"
    target.write_bytes(b"precious")
    for output in (target, target / "sub"):
        started = time.monotonic()
        run = subprocess.run([*CLI, "superresolve", str(lowres_study / "lowres"), "-o", str(output),
                              "--method", "baseline"], capture_output=True, text=True, timeout=120)
        elapsed = time.monotonic() - started
        assert run.returncode == 2
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"cinesr: error: {output}: ") and "a file, not a folder" \
            in lines[0], run.stderr
        assert target.read_bytes() == b"precious"
        assert elapsed < 30  # start-up only (the CLI imports); no series was read or computed
    # checked first: with a missing input as well, the answer is about the output
    run = subprocess.run([*CLI, "superresolve", str(tmp_path / "missing"), "-o", str(target)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "a file, not a folder" in run.stderr
