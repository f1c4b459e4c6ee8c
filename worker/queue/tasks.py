"""Celery tasks: thin wrappers that carry job_id + series_uid and call cinesr.worker.queue.process.

    superresolve_series(job_id, series_uid) -> export_series(job_id, series_uid)   (a chain per series)

Pixel data never travels through the broker. Each delivery first looks at the job record:
- work already done (a duplicate or a redelivery after the ack was lost) is skipped, so the chain goes on
  without recomputing;
- a delivery that finds the series mid-flight, or that the broker marks as redelivered, follows a worker
  that died on it; those are counted in the job record (`attempts`, per job), and once they exceed
  MAX_REDELIVERIES the series is marked failed instead of killing worker after worker (a poison job);
- TransientError (PACS down, store busy) is retried with exponential backoff and jitter; PermanentError
  and exhausted retries end the series `failed` with the reason.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from celery import Celery, Task, signals
from celery.exceptions import Ignore, SoftTimeLimitExceeded, TimeLimitExceeded
from cinesr.worker.errors import JobError, PermanentError, TransientError
from cinesr.worker.queue import runtime
from cinesr.worker.queue.celery_app import EXPORT, SUPERRESOLVE
from cinesr.worker.queue.jobs import UnknownJob
from cinesr.worker.queue.leases import HeldLease, Reaper
from cinesr.worker.queue.lifecycle import IN_FLIGHT, SeriesStatus, Step, is_done
from cinesr.worker.queue.lifeline import PARENT_ENV, follow_parent
from cinesr.worker.queue.owner import owner_id
from cinesr.worker.queue.process import BODIES

log = logging.getLogger("cinesr.worker.queue.tasks")

MAX_REDELIVERIES = 3  # worker deaths tolerated per job before the series is declared poison
MAX_RETRIES = 5  # Celery retries of a TransientError (on top of process.py's own retries)
RETRY_BACKOFF_MAX = 600  # seconds; must stay below the visibility timeout


class JobTask(Task):
    """Base of CineSR tasks: retries only transient errors; records final failures in the job."""

    autoretry_for = (TransientError,)
    retry_backoff = 5  # first retry after ~5 s, then 10, 20, ... (exponential)
    retry_backoff_max = RETRY_BACKOFF_MAX
    retry_jitter = True  # several workers hitting the same PACS do not retry in lockstep
    max_retries = MAX_RETRIES
    acks_late = True
    reject_on_worker_lost = True

    def on_failure(self, exc: BaseException, task_id: str, args: tuple, kwargs: dict, einfo: Any) -> None:
        job_id, series_uid = _ids(args, kwargs)
        stage = self.name.rsplit(".", 1)[-1]
        if isinstance(exc, SoftTimeLimitExceeded):
            reason = f"{stage} took longer than the soft time limit (TASK_SOFT_TIME_LIMIT) and was stopped"
        elif isinstance(exc, TimeLimitExceeded):
            reason = f"{stage} took longer than the hard time limit (TASK_TIME_LIMIT); its process was killed"
        elif isinstance(exc, JobError):
            reason = str(exc) or type(exc).__name__
        else:
            reason = f"{type(exc).__name__}: {exc}"
        _record_failure(job_id, series_uid, reason)


def _ids(args: tuple, kwargs: dict) -> tuple[str, str]:
    values = list(args) + [kwargs.get("job_id"), kwargs.get("series_uid")]
    return str(values[0]), str(values[1])


def _record_failure(job_id: str, series_uid: str, reason: str) -> None:

    try:
        runtime.job_store().update_series(job_id, series_uid, status=SeriesStatus.FAILED, error=reason[:2000])
    except (UnknownJob, KeyError):
        pass
    except Exception as exc:  # noqa: BLE001 - the store itself is down; the log keeps the reason
        log.error("could not record failure of job %s: %s (%s)", job_id, reason, exc)


def _begin(task: Task, stage: Step, job_id: str, series_uid: str) -> HeldLease | None:
    """Decide whether this delivery runs: None = already done (skip); raises Ignore to stop the chain.

    A delivery that runs holds the series' lease (cinesr.worker.queue.leases) until the caller releases it."""

    store = runtime.job_store()
    try:
        job = store.get(job_id)
        entry = job.entry(series_uid)
    except (UnknownJob, KeyError):
        log.warning("%s: job %s / series %s no longer exists; dropped", stage, job_id, series_uid)
        raise Ignore() from None
    if is_done(stage, entry):
        log.info("%s of %s/%s already done; skipped", stage, job_id, series_uid)
        return None
    request = task.request
    redelivered = bool((request.delivery_info or {}).get("redelivered"))
    if redelivered and entry.status == SeriesStatus.FAILED:
        # the broker's late redelivery of a message whose series has since failed (its failure is recorded;
        # POST /jobs/{id}/retry is the way to run it again)
        log.info("%s of %s/%s redelivered after it failed; dropped", stage, job_id, series_uid)
        raise Ignore()
    settings = runtime.settings()
    leases = runtime.lease_store()
    lease = leases.take(job_id, series_uid, stage, owner_id(), settings.series_lease_seconds)
    if lease is None:
        # another live worker holds this series: this is a duplicate (a late redelivery, or a requeue that
        # raced a restart); that worker finishes it, or its lease expires and the series is queued again
        log.info("%s of %s/%s is running elsewhere; duplicate delivery dropped", stage, job_id, series_uid)
        raise Ignore()
    held = HeldLease(leases, lease, settings.series_lease_seconds)
    try:
        _count_delivery(task, stage, store, job, entry, redelivered)
    except BaseException:
        held.release()
        raise
    return held


def _count_delivery(task: Task, stage: Step, store: Any, job: Any, entry: Any, redelivered: bool) -> None:
    job_id, series_uid, request = job.job_id, entry.input_series_uid, task.request
    crashed = redelivered or (entry.status == IN_FLIGHT[stage] and not request.retries)
    if crashed:
        count = store.update(job_id, attempts=job.attempts + 1).attempts
        log.warning("%s of %s/%s redelivered after a lost worker (%d so far)", stage, job_id, series_uid, count)
        if count > MAX_REDELIVERIES:
            _record_failure(job_id, series_uid, f"the worker was lost {count} times while processing this "
                                                f"series (poison job?); not retried again")
            raise Ignore()
    enqueued = _header(request, "cinesr_enqueued_at")
    if enqueued and not request.retries and not crashed:
        store.add_timing(job_id, "queue", max(0.0, time.time() - float(enqueued)), series_uid)


def _header(request: Any, name: str) -> Any:
    value = getattr(request, name, None)
    if value is None:
        value = (getattr(request, "headers", None) or {}).get(name)
    return value


def _expected_failure(stage: Step, job_id: str, series_uid: str, exc: PermanentError) -> Ignore:
    # bad input, an ineligible series, an export that exhausted its retries: recorded in the job by the task
    # body; a warning without a traceback (Celery would log it at ERROR as "unexpected"), and the chain stops
    log.warning("%s of %s/%s failed: %s", stage, job_id, series_uid, exc,
                extra={"job_id": job_id, "series_uid": series_uid, "reason": type(exc).__name__})
    _record_failure(job_id, series_uid, str(exc) or type(exc).__name__)
    return Ignore()


def _run_step(task: Task, stage: Step, job_id: str, series_uid: str) -> bool:
    """Run the step's task body (process.BODIES) under the series' lease; False when it was already done."""
    held = _begin(task, stage, job_id, series_uid)
    if held is None:
        return False

    try:
        BODIES[stage](job_id, series_uid, runtime.settings())
    except PermanentError as exc:
        raise _expected_failure(stage, job_id, series_uid, exc) from None
    finally:
        held.release()
    return True


def superresolve_series(self: Task, job_id: str, series_uid: str) -> None:
    """Read the series, super-resolve it, write the derived series (process.process_series)."""
    if not _run_step(self, Step.SUPERRESOLVE, job_id, series_uid):
        return
    # a series that failed inside process_series without raising must not be exported
    entry = runtime.job_store().get(job_id).entry(series_uid)
    if entry.status in (SeriesStatus.FAILED, SeriesStatus.CANCELLED):
        raise Ignore()


def export_series(self: Task, job_id: str, series_uid: str) -> None:
    """C-STORE the derived series to the destination (process.export_series); skips acknowledged ones."""
    _run_step(self, Step.EXPORT, job_id, series_uid)


def register(app: Celery) -> None:
    """Register the tasks on an app (one app per broker; see celery_app.get_app)."""

    app.task(name=SUPERRESOLVE, base=JobTask, bind=True)(superresolve_series)
    app.task(name=EXPORT, base=JobTask, bind=True)(export_series)
    _connect_signals()


_signals_connected = False


def _connect_signals() -> None:
    # Engine loading happens in the process that runs tasks, after fork (see runtime).
    global _signals_connected
    if _signals_connected:
        return
    _signals_connected = True

    @signals.worker_process_init.connect(weak=False)
    def _child_start(**_: Any) -> None:
        if os.environ.get(PARENT_ENV):  # an embedded worker: the pool child dies with the worker process too
            follow_parent(os.getppid())
        runtime.start()

    @signals.worker_init.connect(weak=False)
    def _main_start(sender: Any = None, **_: Any) -> None:
        pool = getattr(sender, "pool_cls", None)
        name = pool if isinstance(pool, str) else getattr(pool, "__module__", "") + str(pool)
        if "solo" in name or "threads" in name:  # no children: this process runs the tasks
            runtime.start()

    @signals.worker_process_shutdown.connect(weak=False)
    def _child_stop(**_: Any) -> None:
        runtime.stop()

    @signals.worker_ready.connect(weak=False)
    def _main_ready(**_: Any) -> None:
        # the main process (never the pool child) looks for series whose worker died
        _reaper[0] = Reaper(runtime.settings()).start()

    @signals.worker_shutdown.connect(weak=False)
    def _main_stop(**_: Any) -> None:
        if _reaper[0] is not None:
            _reaper[0].stop()
        runtime.stop()


_reaper: list[Reaper | None] = [None]
