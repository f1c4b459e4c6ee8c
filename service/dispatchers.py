"""How a queued job reaches the task bodies: Celery, or a thread of this process.

Celery (cinesr.worker.queue.dispatch) puts one message chain per series on the broker (Redis, or the embedded
transport in DATA_DIR that the embedded worker of `cinesr serve` consumes). The in-process dispatcher
(`cinesr serve --inline`, tests, or an install where Celery cannot be imported) calls the same task bodies
(cinesr.worker.queue.process) in one background thread. Both queue what cinesr.worker.queue.lifecycle.plan says.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal, Protocol

from cinesr.service.settings import Settings
from cinesr.worker.errors import JobError
from cinesr.worker.queue.jobs import JobStore, UnknownJob
from cinesr.worker.queue.lifecycle import SeriesStatus, plan
from cinesr.worker.queue.process import BODIES

if TYPE_CHECKING:
    from cinesr.worker.queue.dispatch import EmbeddedWorker

LOGGER = logging.getLogger(__name__)


class Dispatcher(Protocol):
    def enqueue_job(self, job_id: str) -> None: ...

    def enqueue_export(self, job_id: str) -> None: ...

    def stop(self) -> None: ...


class CeleryDispatcher:
    """Tasks on the broker (Redis, or the embedded transport in DATA_DIR)."""

    def __init__(self, settings: Settings) -> None:
        from cinesr.worker.queue import dispatch

        self.settings = settings
        self._dispatch = dispatch

    def enqueue_job(self, job_id: str) -> None:
        self._dispatch.enqueue_job(job_id, self.settings)

    def enqueue_export(self, job_id: str) -> None:
        self._dispatch.enqueue_export(job_id, self.settings)

    def stop(self) -> None:
        return None


class InlineDispatcher:
    """Runs the task bodies in one background thread of this process (one series at a time)."""

    def __init__(self, settings: Settings, jobs: JobStore) -> None:
        self.settings = settings
        self.jobs = jobs
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cinesr-inline-worker")

    def _run(self, job_id: str, export_only: bool) -> None:
        try:
            job = self.jobs.get(job_id)
        except UnknownJob:
            return
        for series_uid, steps in plan(job, export_only):
            try:
                for step in steps:
                    BODIES[step](job_id, series_uid, self.settings)
            except JobError as exc:  # recorded in the job by the task body
                LOGGER.warning("job %s series %s: %s", job_id, series_uid, exc)
            except Exception as exc:  # a bug or an unexpected failure: record it, keep the worker alive
                LOGGER.exception("job %s series %s failed", job_id, series_uid)
                self.jobs.update_series(job_id, series_uid, status=SeriesStatus.FAILED,
                                        error=f"{type(exc).__name__}: {exc}")

    def enqueue_job(self, job_id: str) -> None:
        self._pool.submit(self._run, job_id, False)

    def enqueue_export(self, job_id: str) -> None:
        self._pool.submit(self._run, job_id, True)

    def stop(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def make_dispatcher(settings: Settings, jobs: JobStore, mode: Literal["auto", "celery", "inline"] = "auto",
                    embedded_worker: bool | EmbeddedWorker | None = None) -> tuple[Dispatcher, Any]:
    """The dispatcher for `mode` (auto: Celery when the worker package is installed), and the embedded worker
    it started (None: none; with Celery one is started when wanted, by default when BROKER_URL is empty; one
    already started is used as it is)."""
    if mode == "auto":
        try:
            import cinesr.worker.queue.dispatch  # noqa: F401
            mode = "celery"
        except ImportError:
            LOGGER.warning("cinesr.worker.queue.dispatch is not available: jobs run in this process")
            mode = "inline"
    if mode == "inline":
        return InlineDispatcher(settings, jobs), None
    dispatcher = CeleryDispatcher(settings)
    if embedded_worker is not None and not isinstance(embedded_worker, bool):
        return dispatcher, embedded_worker
    from cinesr.worker.queue.dispatch import start_embedded_worker, wants_embedded_worker

    if not wants_embedded_worker(settings, embedded_worker):
        return dispatcher, None
    return dispatcher, start_embedded_worker(settings)
