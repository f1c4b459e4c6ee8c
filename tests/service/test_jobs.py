"""Job records: the SQLite (embedded) and Redis stores behave the same, persist, and never lose an update."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest
from cinesr.service.settings import Settings
from cinesr.worker.queue.jobs import JobParams, RedisJobStore, SqliteJobStore, UnknownJob, open_job_store

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES_A = "1.2.826.0.1.3680043.8.498.1.1"
SERIES_B = "1.2.826.0.1.3680043.8.498.1.2"


def _redis_available() -> bool:
    try:
        import redis

        redis.Redis.from_url("redis://127.0.0.1:6379/0", socket_connect_timeout=1).ping()
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path):  # noqa: ANN201
    if request.param == "sqlite":
        s = SqliteJobStore(tmp_path / "jobs.sqlite3")
        yield s
        s.close()
        return
    if not _redis_available():
        pytest.skip("no Redis at 127.0.0.1:6379")
    prefix = f"cinesr-test-{uuid.uuid4().hex[:8]}"
    s = RedisJobStore("redis://127.0.0.1:6379/0", prefix=prefix)
    yield s
    for key in s.redis.scan_iter(f"{prefix}:*"):
        s.redis.delete(key)
    s.close()


def test_create_is_idempotent_on_study_series_and_params(store) -> None:  # noqa: ANN001
    job, created = store.create_or_get(STUDY, [SERIES_B, SERIES_A], {"method": "baseline"})
    again, created_again = store.create_or_get(STUDY, [SERIES_A, SERIES_B], JobParams(method="baseline"))
    assert created and not created_again
    assert again.job_id == job.job_id
    assert [e.input_series_uid for e in job.series] == [SERIES_A, SERIES_B]
    other, created_other = store.create_or_get(STUDY, [SERIES_A, SERIES_B], {"method": "baseline", "steps": 4})
    assert created_other and other.job_id != job.job_id
    whole, _ = store.create_or_get(STUDY, None, {})
    assert whole.series == [] and whole.job_id not in (job.job_id, other.job_id)


def test_failed_job_is_not_reused(store) -> None:  # noqa: ANN001
    job, _ = store.create_or_get(STUDY, [SERIES_A], {})
    store.update(job.job_id, status="failed", error="PACS down")
    fresh, created = store.create_or_get(STUDY, [SERIES_A], {})
    assert created and fresh.job_id != job.job_id
    assert store.get(job.job_id).error == "PACS down"


def test_series_updates_roll_up_into_the_job(store) -> None:  # noqa: ANN001
    job, _ = store.create_or_get(STUDY, [SERIES_A, SERIES_B], {})
    assert job.status == "queued" and job.progress == 0
    job = store.update_series(job.job_id, SERIES_A, status="running", progress=0.5)
    assert job.status == "running" and job.progress == pytest.approx(0.25)
    job = store.update_series(job.job_id, SERIES_A, status="exporting", progress=0.9, output_series_uid="2.25.1")
    assert job.status == "exporting"
    job = store.update_series(job.job_id, SERIES_A, status="succeeded", progress=1.0)
    job = store.update_series(job.job_id, SERIES_B, status="failed", error="not MR")
    assert job.status == "failed"
    assert SERIES_B in job.error and "not MR" in job.error
    job = store.update_series(job.job_id, SERIES_B, status="succeeded", progress=1.0, error=None)
    assert job.status == "succeeded" and job.progress == 1.0 and job.error is None
    assert store.get(job.job_id).entry(SERIES_A).output_series_uid == "2.25.1"


def test_list_filters_and_unknown_job(store) -> None:  # noqa: ANN001
    a, _ = store.create_or_get(STUDY, [SERIES_A], {})
    b, _ = store.create_or_get("1.2.3", [SERIES_B], {})
    store.update(b.job_id, status="failed")
    assert {j.job_id for j in store.list()} == {a.job_id, b.job_id}
    assert [j.job_id for j in store.list(study_uid=STUDY)] == [a.job_id]
    assert [j.job_id for j in store.list(status="failed")] == [b.job_id]
    assert store.list(study_uid=STUDY, status="failed") == []
    with pytest.raises(UnknownJob):
        store.get("0" * 32)
    with pytest.raises(UnknownJob):
        store.update("0" * 32, status="failed")


def test_concurrent_updates_are_not_lost(store) -> None:  # noqa: ANN001
    job, _ = store.create_or_get(STUDY, [SERIES_A, SERIES_B], {})
    n = 40

    def send(series: str) -> None:
        for i in range(n):
            store.acknowledge(job.job_id, series, [f"{series}.{i}"])
            store.add_timing(job.job_id, "export", 0.5, series)

    threads = [threading.Thread(target=send, args=(s,)) for s in (SERIES_A, SERIES_B)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = store.get(job.job_id)
    assert final.entry(SERIES_A).instances_sent == n and final.entry(SERIES_B).instances_sent == n
    assert final.timings["export"] == pytest.approx(2 * n * 0.5)
    assert final.entry(SERIES_A).timings["export"] == pytest.approx(n * 0.5)


def test_acknowledge_records_per_instance_outcome(store) -> None:  # noqa: ANN001
    job, _ = store.create_or_get(STUDY, [SERIES_A], {})
    store.acknowledge(job.job_id, SERIES_A, ["1.1", "1.2"], {"1.3": "status 0xA700"})
    entry = store.acknowledge(job.job_id, SERIES_A, ["1.3", "1.1"]).entry(SERIES_A)
    assert entry.acknowledged == ["1.1", "1.2", "1.3"]
    assert entry.instances_sent == 3 and entry.export_failures == {}


def test_sqlite_records_survive_a_restart(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    first = open_job_store(settings)
    assert isinstance(first, SqliteJobStore)
    job, _ = first.create_or_get(STUDY, [SERIES_A], {"steps": 3})
    first.update_series(job.job_id, SERIES_A, status="processed", output_series_uid="2.25.7", progress=0.8)
    first.close()
    second = open_job_store(settings)
    again, created = second.create_or_get(STUDY, [SERIES_A], {"steps": 3})
    assert not created and again.job_id == job.job_id
    assert again.entry(SERIES_A).output_series_uid == "2.25.7" and again.params.steps == 3
    assert (tmp_path / "jobs.sqlite3").is_file()


def test_redis_broker_selects_the_redis_store(tmp_path: Path) -> None:
    store = open_job_store(Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/0"))
    assert isinstance(store, RedisJobStore)
    store.close()
