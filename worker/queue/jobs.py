"""Job records: one job per request for one study, one entry per series in it.

A job is written by the gateway (create), the workers (progress, output UIDs, timings, per-instance export
outcome) and read by the REST API. Two stores share one interface: Redis (when the broker is Redis, so the
gateway and any number of workers see the same records) and an embedded SQLite file in DATA_DIR (WAL mode,
safe for several processes on one machine). Every read-modify-write is atomic (Redis WATCH/MULTI, SQLite
BEGIN IMMEDIATE), because the series of one job may be processed by different workers at the same time.
What the statuses mean and how they follow each other is cinesr.worker.queue.lifecycle's.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from cinesr.worker.queue.lifecycle import REPLACEABLE, JobStatus, SeriesStatus, cancel, rollup
from pydantic import BaseModel, Field, field_validator

if TYPE_CHECKING:
    from cinesr.worker.settings import WorkerSettings

MAX_DRAWS = 32  # draws of an uncertainty series: each costs one more run of the model


class UnknownJob(KeyError):
    """No job with that id."""


def _now() -> datetime:
    return datetime.now(UTC)


class JobParams(BaseModel):
    """What the requester chose; everything here enters the idempotency key."""

    method: str | None = None  # "model" | "baseline"; None: the service default
    steps: int | None = Field(None, ge=1, le=1000)
    destination: str | None = None  # AE title of a configured destination; None: the configured PACS
    # draws of the model for an uncertainty series: 0 none, N >= 2 that many; None: the UNCERTAINTY_DRAWS setting
    uncertainty: int | None = Field(None, ge=0, le=MAX_DRAWS)

    @field_validator("uncertainty")
    @classmethod
    def _draws(cls, value: int | None) -> int | None:
        if value == 1:
            raise ValueError("an uncertainty series needs at least 2 draws (0: none)")
        return value


class SeriesEntry(BaseModel):
    input_series_uid: str
    output_series_uid: str | None = None
    # the uncertainty series written beside the output (when the job asked for one); exported with it
    uncertainty_series_uid: str | None = None
    status: SeriesStatus = SeriesStatus.QUEUED
    progress: float = Field(0.0, ge=0.0, le=1.0)
    instances_total: int = 0  # of both derived series
    instances_sent: int = 0
    error: str | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    # SOP Instance UIDs the destination acknowledged (export skips them on a retry)
    acknowledged: list[str] = Field(default_factory=list)
    # per-instance export outcome for instances that were not acknowledged: SOPInstanceUID -> reason
    export_failures: dict[str, str] = Field(default_factory=dict)
    # the model's agreement with the acquisition (dB; cinesr.model.consistency) and the model used for it
    fidelity_db: float | None = None
    consistency: str | None = None
    warnings: list[str] = Field(default_factory=list)  # e.g. fidelity below FIDELITY_FLOOR_DB


class Job(BaseModel):
    job_id: str
    study_uid: str
    status: JobStatus = JobStatus.QUEUED
    progress: float = Field(0.0, ge=0.0, le=1.0)
    series: list[SeriesEntry] = Field(default_factory=list)
    requested_series: list[str] = Field(default_factory=list)  # empty: every eligible series
    params: JobParams = Field(default_factory=JobParams)
    timings: dict[str, float] = Field(default_factory=dict)
    error: str | None = None
    created_at: datetime = Field(default_factory=_now)
    updated_at: datetime = Field(default_factory=_now)
    attempts: int = 0
    source: str = "rest"  # rest | push (AUTO_PROCESS)
    key: str = ""  # idempotency key

    def entry(self, series_uid: str) -> SeriesEntry:
        for entry in self.series:
            if entry.input_series_uid == series_uid:
                return entry
        raise KeyError(f"job {self.job_id} has no series {series_uid}")


def idempotency_key(study_uid: str, series_uids: list[str] | None, params: JobParams) -> str:
    data = json.dumps({"study": study_uid, "series": sorted(set(series_uids or [])),
                       "params": params.model_dump(mode="json")}, sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:32]


class JobStore(ABC):
    """Persistent job records. All methods are thread-safe and atomic per job."""

    def create_or_get(self, study_uid: str, series_uids: list[str] | None, params: JobParams | dict | None = None,
                      source: str = "rest") -> tuple[Job, bool]:
        """The existing job (not failed, not cancelled) for this study + series + params, or a new one (created=True).

        With series_uids given the job's series entries exist at once; without, they are filled in when the
        study is here (set_series)."""
        params = params if isinstance(params, JobParams) else JobParams(**(params or {}))
        key = idempotency_key(study_uid, series_uids, params)
        series = sorted(set(series_uids or []))
        job = Job(job_id=uuid.uuid4().hex, study_uid=study_uid, requested_series=series, params=params,
                  series=[SeriesEntry(input_series_uid=s) for s in series], source=source, key=key)
        return self._create_or_get(job)

    @abstractmethod
    def _create_or_get(self, job: Job) -> tuple[Job, bool]: ...

    @abstractmethod
    def get(self, job_id: str) -> Job:
        """The job; raises UnknownJob."""

    @abstractmethod
    def list(self, study_uid: str | None = None, status: str | None = None, limit: int = 1000) -> list[Job]:
        """Jobs, newest first, optionally filtered."""

    @abstractmethod
    def _modify(self, job_id: str, change: Callable[[Job], None]) -> Job:
        """Apply change to the stored job atomically; return the new job."""

    def update(self, job_id: str, **fields: Any) -> Job:
        """Set job fields (series entries are replaced when `series` is given)."""
        def change(job: Job) -> None:
            for name, value in fields.items():
                if name == "status" and job.status == JobStatus.CANCELLED:
                    continue  # cancelled is final (e.g. a preparation that ends after the cancel)
                if name == "status":
                    value = JobStatus(value)  # a plain string too (the records serialize the enum)
                elif name == "series":
                    value = [v if isinstance(v, SeriesEntry) else SeriesEntry(**v) for v in value]
                elif name == "params" and isinstance(value, dict):
                    value = JobParams(**value)
                setattr(job, name, value)
        return self._modify(job_id, change)

    def update_series(self, job_id: str, series_uid: str, **fields: Any) -> Job:
        """Set fields of one series entry, then re-derive the job's progress and status."""
        def change(job: Job) -> None:
            entry = job.entry(series_uid)
            for name, value in fields.items():
                if entry.status == SeriesStatus.CANCELLED and name in ("status", "output_series_uid", "progress"):
                    continue  # a worker that finishes after the cancel must not revive the series
                setattr(entry, name, SeriesStatus(value) if name == "status" else value)
            rollup(job)
        return self._modify(job_id, change)

    def set_series(self, job_id: str, series_uids: list[str]) -> Job:
        """Add entries for series not yet in the job (after the study arrived); keeps existing ones."""
        def change(job: Job) -> None:
            if job.status == JobStatus.CANCELLED:
                return
            known = {e.input_series_uid for e in job.series}
            job.series += [SeriesEntry(input_series_uid=s) for s in sorted(set(series_uids)) if s not in known]
        return self._modify(job_id, change)

    def cancel(self, job_id: str) -> Job:
        """Cancel what has not reached a destination (cinesr.worker.queue.lifecycle.cancel)."""
        return self._modify(job_id, cancel)

    def add_timing(self, job_id: str, stage: str, seconds: float, series_uid: str | None = None) -> Job:
        """Add seconds to a stage's total (job level, and the series' own when given)."""
        def change(job: Job) -> None:
            job.timings[stage] = round(job.timings.get(stage, 0.0) + seconds, 4)
            if series_uid is not None:
                entry = job.entry(series_uid)
                entry.timings[stage] = round(entry.timings.get(stage, 0.0) + seconds, 4)
        return self._modify(job_id, change)

    def acknowledge(self, job_id: str, series_uid: str, sop_instance_uids: list[str],
                    failures: dict[str, str] | None = None) -> Job:
        """Record instances the destination accepted (and the reasons of those it did not)."""
        def change(job: Job) -> None:
            entry = job.entry(series_uid)
            have = set(entry.acknowledged)
            entry.acknowledged += [u for u in sop_instance_uids if u not in have]
            for uid in sop_instance_uids:
                entry.export_failures.pop(uid, None)
            entry.export_failures.update(failures or {})
            entry.instances_sent = len(entry.acknowledged)
        return self._modify(job_id, change)

    @abstractmethod
    def ping(self) -> None:
        """Raise if the backing store is unreachable (readiness)."""

    @abstractmethod
    def close(self) -> None:
        """Release connections."""


class SqliteJobStore(JobStore):
    """Job records in one SQLite file (WAL), for `cinesr serve` without a broker."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._conn() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("CREATE TABLE IF NOT EXISTS jobs (job_id TEXT PRIMARY KEY, key TEXT, study_uid TEXT, "
                         "status TEXT, created REAL, data TEXT NOT NULL)")
            conn.execute("CREATE INDEX IF NOT EXISTS jobs_key ON jobs (key)")
            conn.execute("CREATE INDEX IF NOT EXISTS jobs_study ON jobs (study_uid)")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # autocommit mode; explicit BEGIN IMMEDIATE for read-modify-write (across processes too)
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def _write(self, conn: sqlite3.Connection, job: Job, insert: bool = False) -> None:
        data = job.model_dump_json()
        if insert:
            conn.execute("INSERT INTO jobs (job_id, key, study_uid, status, created, data) VALUES (?,?,?,?,?,?)",
                         (job.job_id, job.key, job.study_uid, job.status, job.created_at.timestamp(), data))
        else:
            conn.execute("UPDATE jobs SET status=?, data=? WHERE job_id=?", (job.status, data, job.job_id))

    def _create_or_get(self, job: Job) -> tuple[Job, bool]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT data FROM jobs WHERE key=? AND status NOT IN (?, ?) ORDER BY created DESC "
                               "LIMIT 1", (job.key, *REPLACEABLE)).fetchone()
            if row is not None:
                conn.execute("COMMIT")
                return Job.model_validate_json(row[0]), False
            self._write(conn, job, insert=True)
            conn.execute("COMMIT")
            return job, True
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def get(self, job_id: str) -> Job:
        row = self._conn().execute("SELECT data FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        if row is None:
            raise UnknownJob(job_id)
        return Job.model_validate_json(row[0])

    def list(self, study_uid: str | None = None, status: str | None = None, limit: int = 1000) -> list[Job]:
        sql, args = "SELECT data FROM jobs WHERE 1=1", []
        if study_uid:
            sql, args = sql + " AND study_uid=?", [*args, study_uid]
        if status:
            sql, args = sql + " AND status=?", [*args, status]
        rows = self._conn().execute(sql + " ORDER BY created DESC LIMIT ?", [*args, limit]).fetchall()
        return [Job.model_validate_json(r[0]) for r in rows]

    def _modify(self, job_id: str, change: Callable[[Job], None]) -> Job:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT data FROM jobs WHERE job_id=?", (job_id,)).fetchone()
            if row is None:
                raise UnknownJob(job_id)
            job = Job.model_validate_json(row[0])
            change(job)
            job.updated_at = _now()
            self._write(conn, job)
            conn.execute("COMMIT")
            return job
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def ping(self) -> None:
        self._conn().execute("SELECT 1").fetchone()

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


class RedisJobStore(JobStore):
    """Job records in Redis: cinesr:job:<id> (JSON), cinesr:jobkey:<key> -> id, cinesr:jobs (by creation)."""

    def __init__(self, url: str, prefix: str = "cinesr") -> None:

        self.redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self.prefix = prefix

    def _job_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def _create_or_get(self, job: Job) -> tuple[Job, bool]:

        index = f"{self.prefix}:jobkey:{job.key}"
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(index)
                    existing_id = pipe.get(index)
                    if existing_id is not None:
                        raw = pipe.get(self._job_key(existing_id.decode()))
                        if raw is not None:
                            existing = Job.model_validate_json(raw)
                            if existing.status not in REPLACEABLE:
                                pipe.unwatch()
                                return existing, False
                    pipe.multi()
                    pipe.set(self._job_key(job.job_id), job.model_dump_json())
                    pipe.set(index, job.job_id)
                    pipe.zadd(f"{self.prefix}:jobs", {job.job_id: job.created_at.timestamp()})
                    pipe.execute()
                    return job, True
                except redis.WatchError:
                    continue

    def get(self, job_id: str) -> Job:
        raw = self.redis.get(self._job_key(job_id))
        if raw is None:
            raise UnknownJob(job_id)
        return Job.model_validate_json(raw)

    def list(self, study_uid: str | None = None, status: str | None = None, limit: int = 1000) -> list[Job]:
        ids = [i.decode() for i in self.redis.zrevrange(f"{self.prefix}:jobs", 0, -1)]
        jobs = []
        for start in range(0, len(ids), 200):
            chunk = ids[start:start + 200]
            for raw in self.redis.mget([self._job_key(i) for i in chunk]):
                if raw is None:
                    continue
                job = Job.model_validate_json(raw)
                if (study_uid is None or job.study_uid == study_uid) and (status is None or job.status == status):
                    jobs.append(job)
                    if len(jobs) >= limit:
                        return jobs
        return jobs

    def _modify(self, job_id: str, change: Callable[[Job], None]) -> Job:

        key = self._job_key(job_id)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        pipe.unwatch()
                        raise UnknownJob(job_id)
                    job = Job.model_validate_json(raw)
                    change(job)
                    job.updated_at = _now()
                    pipe.multi()
                    pipe.set(key, job.model_dump_json())
                    pipe.execute()
                    return job
                except redis.WatchError:
                    time.sleep(0.001)
                    continue

    def ping(self) -> None:
        self.redis.ping()

    def close(self) -> None:
        self.redis.close()


def open_job_store(settings: WorkerSettings) -> JobStore:
    """Redis when the broker is Redis, else the embedded SQLite store in DATA_DIR."""
    url = settings.broker_url or ""
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisJobStore(url)
    return SqliteJobStore(Path(settings.data_dir) / "jobs.sqlite3")
