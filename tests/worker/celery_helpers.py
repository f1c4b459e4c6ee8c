"""Real parts for the worker tests: series in the instance store, redis-server, worker subprocesses."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from cinesr.model.acquisition import write_phantom
from cinesr.model.phantom import make_study
from cinesr.service.settings import Settings
from cinesr.worker.queue.dispatch import settings_environment, worker_command

from tests.waiting import wait_for

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def redis_available() -> bool:
    return Path(REDIS_SERVER).is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class StagedSeries:
    study_uid: str
    series_uid: str
    instances: int
    folder: Path


def stage_series(data_dir: Path, seed: int, *, slices: int = 1, frames: int = 16, size: int = 64,
                 scratch: Path | None = None) -> StagedSeries:
    """A low-resolution phantom series placed in the instance store as the listener would leave it."""
    scratch = scratch or data_dir.parent / f"phantom-{seed}"
    study = make_study(seed, slices=slices, frames=frames, size=size)
    written = write_phantom(study, scratch, seed=seed, truth=False, lowres=True)[0]
    folder = Path(data_dir) / "instances" / written.study_uid / written.series_uid
    folder.mkdir(parents=True, exist_ok=True)
    for path in written.files:
        sop = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID
        shutil.copy(path, folder / f"{sop}.dcm")
    return StagedSeries(written.study_uid, written.series_uid, len(written.files), folder)


class RedisServer:
    """A private redis-server with append-only persistence (fsync on every write) on a free port."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = Path(folder)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15) -> RedisServer:
        import redis

        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "redis.log", "ab")  # noqa: SIM115 - kept open for the process
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "yes"],
            stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        wait_for(lambda: _ping(client), timeout, what="redis-server answering")
        return self

    def kill(self) -> None:
        """SIGKILL: no chance to write anything more than the append-only file already holds."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None


def _ping(client: Any) -> bool:
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001 - not up yet
        return False


class WorkerProcess:
    """`cinesr worker` as a real subprocess with the given settings (and its log file)."""

    def __init__(self, settings: Settings, log: Path, hostname: str, pool: str = "prefork",
                 extra_env: dict[str, str] | None = None) -> None:
        self.settings, self.log, self.hostname, self.pool = settings, Path(log), hostname, pool
        self.extra_env = extra_env or {}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        env = {**os.environ, **settings_environment(self.settings), "OMP_NUM_THREADS": "1",
               "CINESR_TORCH_THREADS": "1", **self.extra_env}
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(worker_command(self.pool, "INFO", self.hostname), env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def children(self) -> list[int]:
        return children_of(self.pid)

    def kill9(self) -> None:
        """SIGKILL the worker and its pool children at once (a node or container dying)."""
        if self.process is None:
            return
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)
        self.process = None

    def stop(self, timeout: float = 20) -> None:
        if self.process is None or self.process.poll() is not None:
            self.process = None
            return
        os.kill(self.pid, signal.SIGTERM)  # as Kubernetes does: PID 1 only
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name is in parentheses and may contain spaces; ppid is the 2nd field after it
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            out.append(int(entry.name))
    return out
