"""Per-worker-process state: settings, the job store, the SR method (engine loaded once), the heartbeat.

Celery's prefork pool forks children from a parent that must never initialise CUDA (a CUDA context does
not survive fork). So nothing here runs at import: `start()` is called in the child (worker_process_init)
or, for the solo pool, in the worker process itself (worker_init). It picks the device from the
environment (CUDA_VISIBLE_DEVICES, set per worker by `cinesr worker --gpu N` or by the orchestrator),
loads the default method's engine once, and only then writes the heartbeat file that
`cinesr probe worker` reads, refreshing it every HEARTBEAT_INTERVAL seconds from a daemon thread.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cinesr.model.folders import atomic_write
from cinesr.worker.queue.jobs import open_job_store
from cinesr.worker.queue.leases import open_lease_store
from cinesr.worker.queue.process import make_method
from cinesr.worker.settings import WorkerSettings, load_settings

log = logging.getLogger("cinesr.worker.queue.runtime")

HEARTBEAT_INTERVAL = 10.0  # seconds between refreshes
HEARTBEAT_MAX_AGE = 60.0  # a heartbeat older than this means the worker is stuck or gone

_state: dict[str, Any] = {"pid": None}
_lock = threading.RLock()


def _fresh_process() -> None:
    # Objects holding sockets or SQLite handles must not be shared with a forked child.
    if _state.get("pid") != os.getpid():
        _state.clear()
        _state["pid"] = os.getpid()


def _per_process(key: str, make: Callable[[], Any]) -> Any:
    """The object under `key`, made once per process (a forked child makes its own)."""
    with _lock:
        _fresh_process()
        if key not in _state:
            _state[key] = make()
        return _state[key]


def settings() -> WorkerSettings:
    """The worker's settings (from the environment, read once per process)."""
    return _per_process("settings", load_settings)


def job_store() -> Any:
    """The job store of this process (opened once per process)."""
    return _per_process("store", lambda: open_job_store(settings()))


def lease_store() -> Any:
    """The series lease store of this process (cinesr.worker.queue.leases; opened once per process)."""
    return _per_process("leases", lambda: open_lease_store(settings()))


def device() -> str:
    """'cuda' where a GPU is visible to this process, else 'cpu' (torch is imported here, in the child)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return "cpu"
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001 - no torch or a broken driver: CPU
        return "cpu"


def get_method(name: str | None = None, steps: int | None = None) -> Any:
    """The SR method; process.make_method keeps it per process, so the engine loaded here at start is the
    one the tasks use."""

    t0 = time.perf_counter()
    method = make_method(name, steps, settings())
    log.info("method %s ready in %.1f s", getattr(method, "name", "?"), time.perf_counter() - t0)
    return method


def write_heartbeat(path: Path, info: dict[str, Any]) -> None:
    """Atomically replace the heartbeat file (a probe never reads half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps({**info, "time": time.time()}))


def heartbeat_age(path: Path) -> float | None:
    """Seconds since the heartbeat was written, or None when there is none."""
    try:
        data = json.loads(path.read_text())
        return max(0.0, time.time() - float(data["time"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def start(background: bool = True) -> None:
    """Load the engine for the default method, then start the heartbeat (idempotent per process).

    In the background by default: Celery waits only a few seconds (worker_proc_alive_timeout) for a new
    pool child to report, and building TensorRT engines takes minutes. A task that arrives meanwhile waits
    for the engine (process.make_method holds its lock while loading); the probe says "not ready" until then.
    """
    with _lock:
        _fresh_process()
        if _state.get("started"):
            return
        _state["started"] = True
        stop_event = threading.Event()
        _state["heartbeat_stop"] = stop_event
    if background:
        threading.Thread(target=_load_and_beat, args=(stop_event,), name="cinesr-engine-loader",
                         daemon=True).start()
    else:
        _load_and_beat(stop_event)


def _load_and_beat(stop_event: threading.Event) -> None:
    s = settings()
    try:
        method = get_method(None)
    except Exception as exc:  # noqa: BLE001 - stay up (tasks record the reason); the probe reports not ready
        log.error("engine not loaded, worker not ready: %s", exc)
        return
    info = {"pid": os.getpid(), "method": getattr(method, "name", "?"), "version": getattr(method, "version", ""),
            "device": device(), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    engine = getattr(method, "engine", None)
    if engine is not None and hasattr(engine, "describe"):
        try:
            info["engine"] = engine.describe()
        except Exception:  # noqa: BLE001 - description is informative only
            pass
    path = Path(s.heartbeat_file)
    if stop_event.is_set():  # stopped while loading: never claim readiness
        return
    write_heartbeat(path, info)
    log.info("worker ready: %s", info)
    while not stop_event.wait(HEARTBEAT_INTERVAL):
        try:
            write_heartbeat(path, info)
        except OSError as exc:  # a full /tmp must not kill the worker; the probe will notice
            log.warning("heartbeat not written: %s", exc)


def stop() -> None:
    """Stop the heartbeat and remove its file (the worker is going away)."""
    event = _state.get("heartbeat_stop")
    if event is not None:
        event.set()
        try:
            Path(settings().heartbeat_file).unlink(missing_ok=True)
        except OSError:
            pass
