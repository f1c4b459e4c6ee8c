"""Series leases: a dead worker's series is taken up again within about a minute.

The broker alone recovers a task of a worker that died outright (kill -9, a lost node, an OOM kill of the pod)
only after its visibility timeout, which must exceed the task's hard time limit (about 40 minutes by default).
So each delivery that works on a series holds a lease: (owner, stage, time of the last renewal), renewed by a
thread every SERIES_LEASE_SECONDS / 6 while the task runs and removed when it ends. Every worker scans the
leases; one that is older than SERIES_LEASE_SECONDS, or whose owner process is gone (same host), is claimed
(removed atomically, so exactly one scanner wins) and its stage queued again.

Exactly once still holds: output UIDs are deterministic and the export skips what the destination already
acknowledged. A delivery that finds a fresh lease of another live owner is a duplicate (the broker's late
redelivery of the original message, or a requeue racing a restart) and is dropped; the live owner finishes,
and should it die too, its lease goes stale and is claimed again. A late redelivery after the series is done
finds it done (tasks._begin) and is skipped.

Leases live next to the job records: a Redis hash when the broker is Redis, a table in DATA_DIR/jobs.sqlite3
for the embedded queue.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from cinesr.worker.queue.celery_app import get_app
from cinesr.worker.queue.dispatch import queue_steps
from cinesr.worker.queue.jobs import UnknownJob, open_job_store
from cinesr.worker.queue.lifecycle import TERMINAL, Step, steps_from
from cinesr.worker.queue.owner import owner_alive
from cinesr.worker.settings import WorkerSettings

log = logging.getLogger("cinesr.worker.queue.leases")

RENEWALS_PER_LEASE = 6  # renewals within one lease period: a few missed writes do not expire it

@dataclass(frozen=True)
class Lease:
    job_id: str
    series_uid: str
    stage: str  # "superresolve" | "export": what to queue again
    owner: str
    renewed_at: float

    def expired(self, max_age: float, now: float | None = None) -> bool:
        return (now or time.time()) - self.renewed_at > max_age or not owner_alive(self.owner)


class LeaseStore(ABC):
    """Atomic per series: take (unless another live owner holds it), renew, release, claim the expired."""

    @abstractmethod
    def take(self, job_id: str, series_uid: str, stage: str, owner: str, max_age: float) -> Lease | None:
        """Take the lease; None when another owner holds one that has not expired."""

    @abstractmethod
    def renew(self, job_id: str, series_uid: str, owner: str) -> bool:
        """Refresh the lease's time; False when it is no longer ours (claimed as expired)."""

    @abstractmethod
    def release(self, job_id: str, series_uid: str, owner: str) -> None:
        """Drop the lease if it is still ours."""

    @abstractmethod
    def claim_expired(self, max_age: float) -> list[Lease]:
        """Remove and return the expired leases (each is returned to exactly one caller)."""

    @abstractmethod
    def all(self) -> list[Lease]: ...

    def close(self) -> None:
        return None


def _key(job_id: str, series_uid: str) -> str:
    return f"{job_id} {series_uid}"


def _decode(key: str, raw: bytes | str) -> Lease:
    job_id, _, series_uid = key.partition(" ")
    data = json.loads(raw)
    return Lease(job_id, series_uid, data["stage"], data["owner"], float(data["renewed_at"]))


def _encode(stage: str, owner: str, renewed_at: float) -> str:
    return json.dumps({"stage": stage, "owner": owner, "renewed_at": renewed_at})


class RedisLeaseStore(LeaseStore):
    """One hash, cinesr:leases: "job_id series_uid" -> {stage, owner, renewed_at}; WATCH/MULTI per change."""

    def __init__(self, url: str, name: str = "cinesr:leases") -> None:

        self.redis = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self.name = name

    def _change(self, decide: Any) -> Any:

        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(self.name)
                    current = {k.decode(): v for k, v in pipe.hgetall(self.name).items()}
                    result, writes, deletes = decide(current)
                    if not writes and not deletes:
                        pipe.unwatch()
                        return result
                    pipe.multi()
                    if writes:
                        pipe.hset(self.name, mapping=writes)
                    if deletes:
                        pipe.hdel(self.name, *deletes)
                    pipe.execute()
                    return result
                except redis.WatchError:
                    time.sleep(0.005)

    def take(self, job_id: str, series_uid: str, stage: str, owner: str, max_age: float) -> Lease | None:
        key = _key(job_id, series_uid)

        def decide(current: dict[str, bytes]) -> Any:
            held = current.get(key)
            if held is not None:
                lease = _decode(key, held)
                if lease.owner != owner and not lease.expired(max_age):
                    return None, {}, []
            now = time.time()
            return Lease(job_id, series_uid, stage, owner, now), {key: _encode(stage, owner, now)}, []
        return self._change(decide)

    def renew(self, job_id: str, series_uid: str, owner: str) -> bool:
        key = _key(job_id, series_uid)

        def decide(current: dict[str, bytes]) -> Any:
            held = current.get(key)
            if held is None or _decode(key, held).owner != owner:
                return False, {}, []
            return True, {key: _encode(_decode(key, held).stage, owner, time.time())}, []
        return self._change(decide)

    def release(self, job_id: str, series_uid: str, owner: str) -> None:
        key = _key(job_id, series_uid)

        def decide(current: dict[str, bytes]) -> Any:
            held = current.get(key)
            if held is None or _decode(key, held).owner != owner:
                return None, {}, []
            return None, {}, [key]
        self._change(decide)

    def claim_expired(self, max_age: float) -> list[Lease]:
        def decide(current: dict[str, bytes]) -> Any:
            now = time.time()
            expired = [lease for k, v in current.items() if (lease := _decode(k, v)).expired(max_age, now)]
            return expired, {}, [_key(e.job_id, e.series_uid) for e in expired]
        return self._change(decide)

    def all(self) -> list[Lease]:
        return [_decode(k.decode(), v) for k, v in self.redis.hgetall(self.name).items()]

    def close(self) -> None:
        self.redis.close()


class SqliteLeaseStore(LeaseStore):
    """A `leases` table in the embedded job database; BEGIN IMMEDIATE per change (safe across processes)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._conn().execute("CREATE TABLE IF NOT EXISTS leases (job_id TEXT, series_uid TEXT, stage TEXT, "
                             "owner TEXT, renewed_at REAL, PRIMARY KEY (job_id, series_uid))")

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def _change(self, decide: Any) -> Any:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = decide(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    @staticmethod
    def _row(row: tuple[Any, ...]) -> Lease:
        return Lease(row[0], row[1], row[2], row[3], float(row[4]))

    def take(self, job_id: str, series_uid: str, stage: str, owner: str, max_age: float) -> Lease | None:
        def decide(db: sqlite3.Connection) -> Lease | None:
            row = db.execute("SELECT job_id, series_uid, stage, owner, renewed_at FROM leases WHERE job_id=? AND "
                             "series_uid=?", (job_id, series_uid)).fetchone()
            if row is not None:
                lease = self._row(row)
                if lease.owner != owner and not lease.expired(max_age):
                    return None
            now = time.time()
            db.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?, ?)", (job_id, series_uid, stage, owner, now))
            return Lease(job_id, series_uid, stage, owner, now)
        return self._change(decide)

    def renew(self, job_id: str, series_uid: str, owner: str) -> bool:
        cur = self._conn().execute("UPDATE leases SET renewed_at=? WHERE job_id=? AND series_uid=? AND owner=?",
                                   (time.time(), job_id, series_uid, owner))
        return cur.rowcount == 1

    def release(self, job_id: str, series_uid: str, owner: str) -> None:
        self._conn().execute("DELETE FROM leases WHERE job_id=? AND series_uid=? AND owner=?",
                             (job_id, series_uid, owner))

    def claim_expired(self, max_age: float) -> list[Lease]:
        def decide(db: sqlite3.Connection) -> list[Lease]:
            now = time.time()
            rows = db.execute("SELECT job_id, series_uid, stage, owner, renewed_at FROM leases").fetchall()
            expired = [lease for r in rows if (lease := self._row(r)).expired(max_age, now)]
            for e in expired:
                db.execute("DELETE FROM leases WHERE job_id=? AND series_uid=?", (e.job_id, e.series_uid))
            return expired
        return self._change(decide)

    def all(self) -> list[Lease]:
        rows = self._conn().execute("SELECT job_id, series_uid, stage, owner, renewed_at FROM leases").fetchall()
        return [self._row(r) for r in rows]

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def open_lease_store(settings: WorkerSettings) -> LeaseStore:
    """Where the job records are: Redis when the broker is Redis, else the embedded SQLite file."""
    url = settings.broker_url or ""
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisLeaseStore(url)
    return SqliteLeaseStore(Path(settings.data_dir) / "jobs.sqlite3")


class HeldLease:
    """The lease of one running delivery, renewed by a daemon thread until release()."""

    def __init__(self, store: LeaseStore, lease: Lease, period: float) -> None:
        self.store, self.lease, self.period = store, lease, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="cinesr-series-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.period / RENEWALS_PER_LEASE):
            try:
                if not self.store.renew(self.lease.job_id, self.lease.series_uid, self.lease.owner):
                    # claimed as expired (this process stalled): another delivery may now run; ours goes on,
                    # and deterministic UIDs keep the outcome the same
                    log.warning("lease of %s/%s lost; another worker may take the series", self.lease.job_id,
                                self.lease.series_uid)
                    return
            except Exception as exc:  # noqa: BLE001 - a broker blip; the next renewal may work
                log.warning("lease of %s/%s not renewed: %s", self.lease.job_id, self.lease.series_uid, exc)

    def release(self) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            self.store.release(self.lease.job_id, self.lease.series_uid, self.lease.owner)
        except Exception as exc:  # noqa: BLE001 - it expires by itself; a later claim finds the series done
            log.warning("lease of %s/%s not released: %s", self.lease.job_id, self.lease.series_uid, exc)


def requeue_expired(settings: WorkerSettings, store: LeaseStore, jobs: Any) -> list[Lease]:
    """Claim the expired leases and queue their stage again; returns what was requeued.

    A series that has ended meanwhile (a child killed by the hard time limit is recorded as failed, and its
    message acknowledged) is not queued again: only POST /jobs/{id}/retry runs a failed series again."""

    app = get_app(settings)
    requeued = []
    for lease in store.claim_expired(settings.series_lease_seconds):
        try:
            status = jobs.get(lease.job_id).entry(lease.series_uid).status
            if status in TERMINAL:
                log.info("series %s of job %s is %s; its stale lease is dropped", lease.series_uid, lease.job_id,
                         status)
                continue
            queue_steps(app, lease.job_id, lease.series_uid, steps_from(Step(lease.stage)))
        except (UnknownJob, KeyError):
            continue
        except Exception as exc:  # noqa: BLE001 - the store or broker failed: the others still get their turn
            log.error("series %s of job %s not queued again (%s); the broker's visibility timeout will bring it "
                      "back", lease.series_uid, lease.job_id, exc)
            continue
        requeued.append(lease)
        age = time.time() - lease.renewed_at
        log.warning("series %s of job %s: its worker %s is gone (lease %.0f s old); %s queued again",
                    lease.series_uid, lease.job_id, lease.owner, age, lease.stage)
    return requeued


class Reaper:
    """A daemon thread of a worker's main process: requeues the series of dead workers."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.interval = settings.series_lease_seconds / RENEWALS_PER_LEASE
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cinesr-lease-reaper", daemon=True)

    def start(self) -> Reaper:
        self._thread.start()
        return self

    def _run(self) -> None:

        store, jobs = open_lease_store(self.settings), open_job_store(self.settings)
        try:
            while True:
                try:
                    requeue_expired(self.settings, store, jobs)
                except Exception as exc:  # noqa: BLE001 - the broker is down; try again next round
                    log.warning("lease scan failed: %s", exc)
                if self._stop.wait(self.interval):
                    return
        finally:
            store.close()
            jobs.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
