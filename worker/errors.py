"""Errors of job processing, split so a task queue retries only what a retry can fix.

TransientError: the peer or the network is down, a lock is busy: the same call later may succeed.
PermanentError: bad input, ineligible series, missing files, or retries already exhausted: retrying the
task as it is will fail again (an operator's POST /jobs/{id}/retry starts a fresh attempt).
"""

from __future__ import annotations


class JobError(Exception):
    """Base of errors that end or pause one task of a job; the message is the job's error text."""


class TransientError(JobError):
    """Worth retrying later (Celery autoretry_for=TransientError)."""


class PermanentError(JobError):
    """Not worth retrying as it is."""


class PacsUnavailable(TransientError):
    """The PACS refused or dropped the association, or could not be reached."""


class RetrieveFailed(PermanentError):
    """The study could not be fetched from the PACS (not there, or the move/get did not deliver)."""


class ExportFailed(PermanentError):
    """The destination stayed down (or kept refusing instances) through every retry; recorded in the job."""


class SeriesNotEligible(PermanentError):
    """The series is not an MR cine series the method can process; the reason says why."""


class NotConfigured(PermanentError):
    """A setting the task needs (PACS address, destination) is missing."""


class JobCancelled(JobError):
    """The job was cancelled (DELETE /jobs/{id}): the series stops at the next sampler step and writes nothing."""
