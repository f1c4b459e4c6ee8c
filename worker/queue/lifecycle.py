"""A job's life cycle: its statuses, which steps of a series are done, and what is queued next.

    job:    queued -> [retrieving -> queued] -> running -> exporting -> succeeded | failed | cancelled
    series: queued -> running -> processed -> exporting -> succeeded | failed | cancelled

Each series goes through two steps, superresolve (cinesr.worker.queue.process.process_series) then export
(process.export_series). Here: the statuses, which steps are done, the roll-up of series into the job, the
scheduling policy (plan), and the transitions the service asks for (a pushed series' job, the series a prepared
job processes, cancel, retry). The service (its gateway, wiring and dispatchers) and the
Celery side (cinesr.worker.queue.tasks, dispatch, leases) all decide from these; the records live in
cinesr.worker.queue.jobs, whose store makes each change atomic.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cinesr.worker.queue.jobs import Job, JobStore, SeriesEntry


class JobConflict(RuntimeError):
    """The job is not in a state that allows the operation."""


class JobStatus(StrEnum):
    """A job's status; the values are what the REST API and the job records show."""

    QUEUED = "queued"
    RETRIEVING = "retrieving"  # the study is being fetched from the PACS
    RUNNING = "running"
    EXPORTING = "exporting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class SeriesStatus(StrEnum):
    """A series' status within its job."""

    QUEUED = "queued"
    RUNNING = "running"
    PROCESSED = "processed"  # the derived series is written, export not done yet (or nothing to export to)
    EXPORTING = "exporting"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    # stopped on request; sticky (a worker finishing late cannot turn it back into processed/succeeded)
    CANCELLED = "cancelled"


class Step(StrEnum):
    """The steps of one series, in order (also the stage names of leases and log lines)."""

    SUPERRESOLVE = "superresolve"
    EXPORT = "export"


TERMINAL: frozenset[str] = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
# a series in one of these states can still be cancelled (nothing of it has reached a destination yet)
CANCELLABLE: frozenset[str] = frozenset({SeriesStatus.QUEUED, SeriesStatus.RUNNING, SeriesStatus.PROCESSED})
# an identical request after a job ended like this starts a new job instead of returning it
REPLACEABLE: tuple[str, ...] = (JobStatus.FAILED, JobStatus.CANCELLED)

# the status a series has while a step runs
IN_FLIGHT: dict[Step, SeriesStatus] = {Step.SUPERRESOLVE: SeriesStatus.RUNNING, Step.EXPORT: SeriesStatus.EXPORTING}
# the statuses meaning a step has nothing (more) to do; cancelled: a queued step of it is dropped
DONE: dict[Step, frozenset[str]] = {
    Step.SUPERRESOLVE: frozenset({SeriesStatus.PROCESSED, SeriesStatus.EXPORTING, SeriesStatus.SUCCEEDED,
                                  SeriesStatus.CANCELLED}),
    Step.EXPORT: frozenset({SeriesStatus.SUCCEEDED, SeriesStatus.CANCELLED}),
}
CANCEL_REASON = "cancelled by request"


def is_done(step: Step, entry: SeriesEntry) -> bool:
    """Whether `step` of the series has nothing (more) to do (a duplicate delivery of it is skipped)."""
    return entry.status in DONE[step]


def plan(job: Job, export_only: bool = False) -> list[tuple[str, tuple[Step, ...]]]:
    """The scheduling policy: per series with work left, the steps to queue, in order.

    export_only (POST /jobs/{id}/retry): a series whose derived series exists is only sent again; one without
    (it failed before the derived series was written) is processed again."""
    steps = []
    for entry in job.series:
        if is_done(Step.EXPORT, entry):
            continue
        if export_only and entry.output_series_uid:
            steps.append((entry.input_series_uid, (Step.EXPORT,)))
        else:
            steps.append((entry.input_series_uid, (Step.SUPERRESOLVE, Step.EXPORT)))
    return steps


def steps_from(step: Step) -> tuple[Step, ...]:
    """The step and those after it: what is queued again when a delivery of `step` was lost."""
    order = tuple(Step)
    return order[order.index(step):]


def rollup(job: Job) -> None:
    """Derive the job's progress and status from its series (once series exist and work has started)."""
    if not job.series:
        return
    job.progress = round(sum(e.progress for e in job.series) / len(job.series), 4)
    states = {e.status for e in job.series}
    if states <= TERMINAL:
        failed = [e for e in job.series if e.status == SeriesStatus.FAILED]
        reasons = [f"series {e.input_series_uid}: {e.error or 'failed'}" for e in failed]
        if SeriesStatus.CANCELLED in states:  # the requester's decision wins; failures of other series stay
            job.status = JobStatus.CANCELLED
            job.error = "; ".join([CANCEL_REASON] + reasons)[:2000]
        elif failed:
            job.status = JobStatus.FAILED
            job.error = "; ".join(reasons)[:2000]
        else:
            job.status, job.error, job.progress = JobStatus.SUCCEEDED, None, 1.0
    elif job.status != JobStatus.RETRIEVING:
        if SeriesStatus.EXPORTING in states:
            job.status = JobStatus.EXPORTING
        elif states & {SeriesStatus.RUNNING, SeriesStatus.PROCESSED, SeriesStatus.SUCCEEDED, SeriesStatus.FAILED}:
            job.status = JobStatus.RUNNING
        else:
            job.status = JobStatus.QUEUED


def cancel(job: Job) -> None:
    """Cancel what has not reached a destination: queued, running and computed-but-unsent series end
    `cancelled` (workers see it at their next progress report); a series being exported finishes."""
    if job.status in TERMINAL:
        return
    for entry in job.series:
        if entry.status in CANCELLABLE:
            entry.status, entry.error = SeriesStatus.CANCELLED, CANCEL_REASON
    if job.series:
        rollup(job)
    if not job.series or job.status != JobStatus.EXPORTING:
        job.status = JobStatus.CANCELLED
        job.error = job.error or CANCEL_REASON


def needs_preparation(job: Job) -> bool:
    """Whether the job still has to be prepared (study fetched, series chosen) before its series are queued."""
    return job.status == JobStatus.RETRIEVING or (not job.series and job.status == JobStatus.QUEUED)


# ---- transitions of the stored record (the store makes each one atomic) -------------------------------------

def push_job(jobs: JobStore, study_uid: str, series_uid: str) -> Job | None:
    """AUTO_PROCESS: a new job for a pushed series; None when a job (not failed, not cancelled) already covers it
    (a REST request, or an earlier push)."""
    for job in jobs.list(study_uid=study_uid):
        if job.status not in REPLACEABLE and any(e.input_series_uid == series_uid for e in job.series):
            return None
    job, created = jobs.create_or_get(study_uid, [series_uid], None, source="push")
    return job if created else None


def choose_series(jobs: JobStore, job: Job, eligible: list[str], reasons: dict[str, str]) -> bool:
    """A prepared job's series: the eligible ones are processed (ineligible requested series fail with the
    reason). True when the job is queued; False when it failed, no series being eligible."""
    if not eligible:
        text = "; ".join(f"{uid}: {why}" for uid, why in reasons.items())
        jobs.update(job.job_id, status=JobStatus.FAILED, error=f"no eligible cine series in the study ({text})")
        return False
    if job.requested_series:
        for series_uid, reason in reasons.items():
            jobs.update_series(job.job_id, series_uid, status=SeriesStatus.FAILED, error=f"not eligible: {reason}")
    else:
        jobs.set_series(job.job_id, eligible)
    jobs.update(job.job_id, status=JobStatus.QUEUED, error=None)
    return True


def request_cancel(jobs: JobStore, job_id: str) -> Job:
    """Cancel an unfinished job (cancelling a cancelled job again is harmless); JobConflict for a finished one."""
    job = jobs.get(job_id)
    if job.status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        raise JobConflict(f"job {job_id} is {job.status}; only unfinished jobs can be cancelled")
    return jobs.cancel(job_id)


def request_retry(jobs: JobStore, job_id: str) -> tuple[Job, bool]:
    """A failed job again (JobConflict for any other). Returns the job and whether it must be prepared again (it
    failed before its series were known); else each failed series is reset, to processed when its derived series
    exists (so it is only resent), to queued when not, and the job waits for lifecycle.plan(export_only=True)."""
    job = jobs.get(job_id)
    if job.status != JobStatus.FAILED:
        raise JobConflict(f"job {job_id} is {job.status}; only failed jobs can be retried")
    jobs.update(job_id, attempts=job.attempts + 1, error=None)
    if not job.series:
        return jobs.update(job_id, status=JobStatus.QUEUED), True
    for entry in job.series:
        if entry.status == SeriesStatus.FAILED:
            status = SeriesStatus.PROCESSED if entry.output_series_uid else SeriesStatus.QUEUED
            jobs.update_series(job_id, entry.input_series_uid, status=status, error=None)
    status = JobStatus.EXPORTING if any(e.output_series_uid for e in job.series) else JobStatus.QUEUED
    return jobs.update(job_id, status=status, error=None), False
