"""Putting jobs on the queue, and the embedded worker of `cinesr serve` without a broker.

    enqueue_job(job_id, settings)      one chain per series: superresolve_series -> export_series
    enqueue_export(job_id, settings)   export only, for POST /jobs/{id}/retry (no recomputation)
    start_embedded_worker(settings)    a supervised `cinesr worker` subprocess on the embedded transport

Messages carry the job id and the series UID only; the enqueue time travels as a message header so the
worker can record the time a series waited in the queue.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from celery import chain
from cinesr.worker.queue.celery_app import EXPORT, SUPERRESOLVE, get_app, is_embedded
from cinesr.worker.queue.jobs import open_job_store
from cinesr.worker.queue.lifecycle import Step, plan
from cinesr.worker.queue.lifeline import PARENT_ENV
from cinesr.worker.settings import WorkerSettings

log = logging.getLogger("cinesr.worker.queue.dispatch")


def queue_steps(app: Any, job_id: str, series_uid: str, steps: tuple[Step, ...]) -> None:
    """Queue the steps of one series (lifecycle.plan): the chain superresolve -> export, or the export alone."""
    export = app.signature(EXPORT, args=(job_id, series_uid), immutable=True)
    if steps == (Step.EXPORT,):
        export.apply_async(headers=_headers())
    else:
        chain(app.signature(SUPERRESOLVE, args=(job_id, series_uid), immutable=True), export,
              app=app).apply_async(headers=_headers())


def _headers() -> dict[str, Any]:
    return {"cinesr_enqueued_at": time.time()}


def _queue(job_id: str, settings: WorkerSettings, export_only: bool) -> None:
    """Queue the series of the job that have work left, as lifecycle.plan says (the job store is closed again)."""

    store = open_job_store(settings)
    try:
        job = store.get(job_id)
    finally:
        store.close()
    app = get_app(settings)
    for series_uid, steps in plan(job, export_only):
        queue_steps(app, job_id, series_uid, steps)


def enqueue_job(job_id: str, settings: WorkerSettings) -> None:
    """Queue every series of the job that has work left: super-resolve, then export."""
    _queue(job_id, settings, export_only=False)


def enqueue_export(job_id: str, settings: WorkerSettings) -> None:
    """Resend the derived series of the job without recomputing them; series that have no derived
    series yet (they failed before it was written) are queued for processing again."""
    _queue(job_id, settings, export_only=True)


def settings_environment(settings: WorkerSettings) -> dict[str, str]:
    """The settings as CINESR_* environment variables, so a child process sees exactly these settings."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            text = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        env[f"CINESR_{name.upper()}"] = text
    return env


def worker_command(pool: str = "prefork", loglevel: str = "WARNING", hostname: str | None = None) -> list[str]:
    """The command line of a worker process (the worker's own entry point, same interpreter)."""
    cmd = [sys.executable, "-m", "cinesr.worker", "--log-level", loglevel, "--pool", pool]
    if hostname:
        cmd += ["--hostname", hostname]
    return cmd


class EmbeddedWorker:
    """A `cinesr worker` subprocess on the embedded transport, restarted if it dies, dying with us.

    A separate process, not a thread: the worker's CUDA context, signal handling and memory stay out
    of the listener's process, and a crash of the engine does not take the DICOM listener with it. The
    queue is a SQLite file in DATA_DIR, so queued tasks survive a restart of `cinesr serve`; a task that
    was running when the worker died is handed out again when the next worker starts.
    """

    def __init__(self, settings: WorkerSettings, pool: str = "prefork", loglevel: str = "WARNING",
                 log_file: Path | None = None, restart_delay: float = 2.0) -> None:
        self.settings = settings
        self.pool = pool
        self.loglevel = loglevel
        self.log_file = log_file or Path(settings.data_dir) / "logs" / "worker.log"
        self.restart_delay = restart_delay
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._supervise, name="cinesr-embedded-worker", daemon=True)

    def start(self) -> EmbeddedWorker:
        self._spawn()
        self._thread.start()
        return self

    def _spawn(self) -> None:
        # the worker (and its pool child) dies with this process, even on kill -9 (cinesr.worker.queue.lifeline)
        env = {**os.environ, **settings_environment(self.settings), PARENT_ENV: str(os.getpid())}
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if self._stopping.is_set():
                return
            with open(self.log_file, "ab") as logf:
                self.process = subprocess.Popen(worker_command(self.pool, self.loglevel), env=env, stdout=logf,
                                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                start_new_session=True)  # our stop() decides, not the tty
        log.info("embedded worker started (pid %d), log %s", self.process.pid, self.log_file)

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            proc = self.process
            if proc is None:
                return
            code = proc.wait()
            if self._stopping.is_set():
                return
            self.restarts += 1
            log.warning("embedded worker exited with %s; restarting in %.0f s", code, self.restart_delay)
            if self._stopping.wait(self.restart_delay):
                return
            self._spawn()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (soft shutdown: the running task may finish, else it is requeued), then SIGKILL."""
        self._stopping.set()
        with self._lock:
            proc = self.process
        if proc is None or proc.poll() is not None:
            return
        try:
            os.kill(proc.pid, signal.SIGTERM)  # the main process only: it stops its pool child itself
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        self._thread.join(5)


def wants_embedded_worker(settings: WorkerSettings, requested: bool | None = None) -> bool:
    """Whether `cinesr serve` runs its own worker: as requested (--worker / --no-worker), else when BROKER_URL
    is empty (then nothing else consumes the embedded queue)."""
    return requested if requested is not None else not settings.broker_url


def start_embedded_worker(settings: WorkerSettings, **kwargs: Any) -> EmbeddedWorker:
    """Start the worker of `cinesr serve` when BROKER_URL is empty (same tasks, embedded transport)."""
    if not is_embedded(settings):
        raise ValueError("start_embedded_worker is for the embedded transport (BROKER_URL empty)")
    return EmbeddedWorker(settings, **kwargs).start()
