"""Series leases (issue 14 #12) on the real stores: the embedded SQLite file and a real redis-server."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cinesr.worker.queue.leases import LeaseStore, RedisLeaseStore, SqliteLeaseStore
from cinesr.worker.queue.owner import owner_id

from tests.worker.celery_helpers import RedisServer, redis_available

FOREIGN = "gpu-node-7/4026531836:4242"  # a process of another node: only its lease's age tells it is gone


@pytest.fixture(params=["sqlite", "redis"])
def leases(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LeaseStore]:
    if request.param == "sqlite":
        store: LeaseStore = SqliteLeaseStore(tmp_path / "jobs.sqlite3")
        yield store
        store.close()
        return
    if not redis_available():
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path / "redis").start()
    try:
        store = RedisLeaseStore(server.url)
        yield store
        store.close()
    finally:
        server.stop()


def test_a_fresh_lease_of_a_live_owner_keeps_duplicates_out(leases: LeaseStore) -> None:
    assert leases.take("j", "1.2", "superresolve", FOREIGN, 60) is not None
    assert leases.take("j", "1.2", "superresolve", owner_id(), 60) is None  # a duplicate delivery
    assert leases.claim_expired(60) == []
    assert leases.renew("j", "1.2", FOREIGN) and not leases.renew("j", "1.2", owner_id())


def test_an_old_lease_is_claimed_once_and_then_free(leases: LeaseStore) -> None:
    leases.take("j", "1.2", "export", FOREIGN, 60)
    time.sleep(1.2)
    claimed = leases.claim_expired(1.0)
    assert [(c.job_id, c.series_uid, c.stage, c.owner) for c in claimed] == [("j", "1.2", "export", FOREIGN)]
    assert leases.claim_expired(1.0) == []  # a second scanner gets nothing
    assert not leases.renew("j", "1.2", FOREIGN)  # the stalled owner learns it lost the lease
    assert leases.take("j", "1.2", "superresolve", owner_id(), 60) is not None


def test_a_dead_owner_on_this_host_frees_its_lease_at_once(leases: LeaseStore) -> None:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = owner_id().rsplit(":", 1)[0] + ":" + child.stdout.strip()
    leases.take("j", "1.2", "superresolve", dead, 3600)
    assert leases.take("j", "1.2", "superresolve", owner_id(), 3600) is not None  # taken over, not refused
    leases.release("j", "1.2", owner_id())
    leases.take("j", "1.3", "superresolve", dead, 3600)
    assert [c.series_uid for c in leases.claim_expired(3600)] == ["1.3"]
    assert leases.all() == []


def test_release_drops_only_our_own_lease(leases: LeaseStore) -> None:
    leases.take("j", "1.2", "superresolve", FOREIGN, 60)
    leases.release("j", "1.2", owner_id())
    assert [lease.owner for lease in leases.all()] == [FOREIGN]
    leases.release("j", "1.2", FOREIGN)
    assert leases.all() == []


@pytest.mark.slow
def test_a_delivery_for_a_series_held_elsewhere_is_dropped_then_requeued_when_its_lease_expires(
        tmp_path: Path) -> None:
    """A real embedded worker: the series is held by a live worker of another node (its lease), so the delivery
    is a duplicate and is dropped; that worker never renews (it died), so after SERIES_LEASE_SECONDS the lease is
    claimed and the series queued again, and done once."""
    from cinesr.service.settings import Settings
    from cinesr.worker.queue.dispatch import enqueue_job, start_embedded_worker
    from cinesr.worker.queue.jobs import open_job_store

    from tests.waiting import wait_for
    from tests.worker.celery_helpers import stage_series

    settings = Settings(data_dir=tmp_path / "data", broker_url="", heartbeat_file=tmp_path / "heartbeat",
                        default_method="baseline", series_lease_seconds=6)
    staged = stage_series(settings.data_dir, 7, slices=1, frames=16, size=64)
    store = open_job_store(settings)
    job, _ = store.create_or_get(staged.study_uid, [staged.series_uid], {"method": "baseline"})
    leases = SqliteLeaseStore(settings.data_dir / "jobs.sqlite3")
    assert leases.take(job.job_id, staged.series_uid, "superresolve", FOREIGN, 6) is not None
    enqueue_job(job.job_id, settings)
    worker = start_embedded_worker(settings, loglevel="INFO")
    try:
        wait_for(lambda: "duplicate delivery dropped" in worker.log_file.read_text(), 60, what="duplicate dropped")
        assert store.get(job.job_id).status == "queued"  # nothing ran while the other owner held it
        done = wait_for(lambda: (j := store.get(job.job_id)).status in ("succeeded", "failed") and j, 60,
                        what="job finished")
    finally:
        worker.stop()
    assert done.status == "succeeded", done.error
    log = worker.log_file.read_text()
    assert "queued again" in log and FOREIGN in log
    assert log.count("derived series written") == 1
    assert leases.all() == []
    leases.close()


def test_a_stale_lease_of_an_ended_series_is_dropped_not_requeued(tmp_path: Path) -> None:
    """A pool child killed by the hard time limit leaves its lease behind, but its series is recorded failed (and
    its message acknowledged): it must not run again by itself. A running series is queued again."""
    from cinesr.service.settings import Settings
    from cinesr.worker.queue.celery_app import QUEUE, embedded_broker_path
    from cinesr.worker.queue.embedded_broker import Database
    from cinesr.worker.queue.jobs import open_job_store
    from cinesr.worker.queue.leases import requeue_expired

    settings = Settings(data_dir=tmp_path / "data", broker_url="", series_lease_seconds=5)
    jobs = open_job_store(settings)
    job, _ = jobs.create_or_get("1.2.3", ["1.2.3.1", "1.2.3.2"], {"method": "baseline"})
    jobs.update_series(job.job_id, "1.2.3.1", status="failed", error="hard time limit")
    jobs.update_series(job.job_id, "1.2.3.2", status="running")
    leases = SqliteLeaseStore(settings.data_dir / "jobs.sqlite3")
    for series in ("1.2.3.1", "1.2.3.2"):
        leases.take(job.job_id, series, "superresolve", FOREIGN, 5)
    time.sleep(5.5)
    requeued = requeue_expired(settings, leases, jobs)
    assert [lease.series_uid for lease in requeued] == ["1.2.3.2"]
    assert leases.all() == []
    queued = Database(embedded_broker_path(settings)).size(QUEUE)
    assert queued == 1  # one chain: super-resolve of the running series (its export follows it)
    leases.close()
    jobs.close()
