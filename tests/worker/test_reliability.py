"""Reliability with real parts: worker subprocesses (`cinesr worker`), a private redis-server with AOF, Orthanc.

- kill -9 mid-series (the pool child, then the whole worker) -> the job completes once a worker is back, and
  Orthanc holds each derived instance exactly once;
- the same on the embedded transport (no Redis);
- a Redis restart (SIGKILL, append-only file) loses no queued job;
- PACS down -> retries, then `failed` with the reason; export retry succeeds once it is back;
- two workers on one queue process every series exactly once.

The slow workload is real: the learned method (tiny config) with few sampler steps on CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cinesr.service.settings import Settings
from cinesr.worker.queue.celery_app import visibility_timeout
from cinesr.worker.queue.dispatch import enqueue_export, enqueue_job
from cinesr.worker.queue.jobs import Job, JobStore, open_job_store

from tests.orthanc import OrthancServer, orthanc_available
from tests.waiting import wait_for
from tests.worker.celery_helpers import (
    RedisServer,
    StagedSeries,
    WorkerProcess,
    redis_available,
    stage_series,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not redis_available(), reason="redis-server is not installed (apt-get install redis-server)"),
    pytest.mark.skipif(not orthanc_available(), reason="Orthanc is not installed (apt-get install orthanc)"),
]

JOB_TIMEOUT = 180.0


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path / "orthanc")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _settings(tmp_path: Path, broker_url: str, pacs: OrthancServer | None, **extra: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": tmp_path / "data", "broker_url": broker_url, "heartbeat_file": tmp_path / "heartbeat",
        # the limits leave room for a 2x32x128 series on a loaded 2-core CI machine (about 20 s when idle)
        "default_method": "model", "task_soft_time_limit": 90.0, "task_time_limit": 100.0,
        "export_retries": 2, "export_backoff_seconds": 0.2,
    }
    if pacs is not None:
        values.update(pacs_ae_title=pacs.ae_title, pacs_host=pacs.host, pacs_port=pacs.dicom_port)
    values.update(extra)
    return Settings(**values)


def _worker(settings: Settings, tmp_path: Path, name: str) -> WorkerProcess:
    beat = tmp_path / f"heartbeat-{name}"
    worker = WorkerProcess(settings, tmp_path / f"{name}.log", f"{name}@%h",
                           extra_env={"CINESR_HEARTBEAT_FILE": str(beat)}).start()
    worker.heartbeat = beat  # type: ignore[attr-defined]
    return worker


def _ready(worker: WorkerProcess, timeout: float = 90) -> None:
    wait_for(lambda: worker.heartbeat.exists(), timeout, what=f"{worker.hostname} ready")  # type: ignore[attr-defined]


def _finished(store: JobStore, job_id: str, timeout: float = JOB_TIMEOUT) -> Job:
    return wait_for(lambda: (j := store.get(job_id)).status in ("succeeded", "failed") and j, timeout, interval=0.2,
                    what=f"job {job_id} finished")


def _computing(store: JobStore, job_id: str, series_uid: str, timeout: float = 120) -> None:
    def check() -> bool:
        entry = store.get(job_id).entry(series_uid)
        return entry.status == "running" and entry.progress > 0
    wait_for(check, timeout, interval=0.05, what="series computing")


def _new_job(settings: Settings, staged: StagedSeries, steps: int = 2) -> tuple[JobStore, str]:
    store = open_job_store(settings)
    job, created = store.create_or_get(staged.study_uid, [staged.series_uid], {"method": "model", "steps": steps})
    assert created
    return store, job.job_id


def _assert_in_pacs_exactly_once(pacs: OrthancServer, job: Job) -> None:
    for entry in job.series:
        held = pacs.series_instances(entry.output_series_uid or "")
        assert len(held) == entry.instances_total > 0
        assert len(set(held)) == len(held)
    assert pacs.instance_count() == sum(e.instances_total for e in job.series)


def test_kill9_mid_series_redis(tmp_path: Path, redis_server: RedisServer, pacs: OrthancServer) -> None:
    settings = _settings(tmp_path, redis_server.url, pacs)
    staged = stage_series(settings.data_dir, 21, slices=2, frames=32, size=128)
    worker = _worker(settings, tmp_path, "w1")
    try:
        _ready(worker)
        store, job_id = _new_job(settings, staged)
        enqueue_job(job_id, settings)
        # 1. the pool child dies (OOM killer, segfault): the worker rejects the message back to the queue
        _computing(store, job_id, staged.series_uid)
        children = worker.children()
        assert children, "the prefork worker has a pool child"
        for pid in children:
            import os
            import signal

            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: store.get(job_id).attempts == 1, 60, what="redelivery counted")
        # 2. the whole worker dies mid-series (node lost): nothing acknowledges the message
        _computing(store, job_id, staged.series_uid)
        worker.kill9()
        assert store.get(job_id).status == "running"
    finally:
        worker.stop()
    # a new worker: the dead worker's lease is claimed (same host: its PID is gone) and the series requeued
    replacement = _worker(settings, tmp_path, "w2")
    try:
        job = _finished(store, job_id, timeout=visibility_timeout(settings) + JOB_TIMEOUT)
    finally:
        replacement.stop()
    assert job.status == "succeeded", job.error
    assert job.attempts == 2
    _assert_in_pacs_exactly_once(pacs, job)
    # the re-runs recreated the same derived series: one output folder, same UIDs as stored in PACS
    outputs = list((settings.data_dir / "outputs" / job_id).iterdir())
    assert [p.name for p in outputs] == [job.series[0].output_series_uid]


def test_kill9_of_the_only_worker_default_limits_redis(tmp_path: Path, redis_server: RedisServer,
                                                      pacs: OrthancServer) -> None:
    """Issue 14 #12: with the default time limits (visibility timeout about 2320 s) a worker started right
    after the only worker was killed finishes the job within the series' compute + 2 minutes."""
    import json
    import time

    import redis

    settings = _settings(tmp_path, redis_server.url, pacs, task_soft_time_limit=1800.0, task_time_limit=2100.0)
    assert visibility_timeout(settings) > 2000
    staged = stage_series(settings.data_dir, 25, slices=2, frames=32, size=128)
    worker = _worker(settings, tmp_path, "d1")
    try:
        _ready(worker)
        store, job_id = _new_job(settings, staged)
        enqueue_job(job_id, settings)
        _computing(store, job_id, staged.series_uid)
        worker.kill9()  # the node is lost: nothing acknowledges, releases or rejects anything
    finally:
        worker.stop()
    client = redis.Redis.from_url(redis_server.url)
    leases = client.hgetall("cinesr:leases")
    key = f"{job_id} {staged.series_uid}".encode()
    assert key in leases, "a running series holds a lease"
    # make the dead worker a process of another node (as on a cluster), so that only the lease's age can
    # tell it is gone: the slow path, not the same-host PID check
    lease = json.loads(leases[key])
    lease["owner"] = "gpu-node-7/4026531836:4242"
    client.hset("cinesr:leases", key, json.dumps(lease))
    started = time.monotonic()
    replacement = _worker(settings, tmp_path, "d2")
    try:
        job = _finished(store, job_id, timeout=420)
    finally:
        replacement.stop()
    elapsed = time.monotonic() - started
    assert job.status == "succeeded", job.error
    entry = job.entry(staged.series_uid)
    work = sum(entry.timings.get(k, 0.0) for k in ("load", "compute", "write", "export"))
    print(f"requeued and finished in {elapsed:.0f} s; series work {work:.0f} s")
    assert elapsed <= work + 120, f"{elapsed:.0f} s > {work:.0f} s of work + 120 s"
    assert job.attempts == 1
    _assert_in_pacs_exactly_once(pacs, job)
    assert client.hlen("cinesr:leases") == 0  # released once done


def test_kill9_mid_series_embedded(tmp_path: Path, pacs: OrthancServer) -> None:
    settings = _settings(tmp_path, "", pacs)
    staged = stage_series(settings.data_dir, 22, slices=2, frames=32, size=128)
    store, job_id = _new_job(settings, staged)
    enqueue_job(job_id, settings)
    worker = _worker(settings, tmp_path, "e1")
    try:
        _computing(store, job_id, staged.series_uid)
        worker.kill9()
    finally:
        worker.stop()
    # the embedded broker sees the owner is dead and hands the task out again at once
    replacement = _worker(settings, tmp_path, "e2")
    try:
        job = _finished(store, job_id)
    finally:
        replacement.stop()
    assert job.status == "succeeded", job.error
    assert job.attempts == 1
    _assert_in_pacs_exactly_once(pacs, job)


def test_redis_restart_loses_no_queued_job(tmp_path: Path, redis_server: RedisServer) -> None:
    settings = _settings(tmp_path, redis_server.url, None, default_method="baseline")
    store = open_job_store(settings)
    job_ids = []
    for seed in (31, 32, 33):
        staged = stage_series(settings.data_dir, seed, slices=1, frames=16, size=64)
        job, _ = store.create_or_get(staged.study_uid, [staged.series_uid], {"method": "baseline"})
        enqueue_job(job.job_id, settings)
        job_ids.append(job.job_id)
    store.close()
    redis_server.kill()  # SIGKILL: only what the append-only file holds survives
    redis_server.start()
    store = open_job_store(settings)
    assert [store.get(j).status for j in job_ids] == ["queued"] * 3
    worker = _worker(settings, tmp_path, "r1")
    try:
        jobs = [_finished(store, j) for j in job_ids]
    finally:
        worker.stop()
    assert [j.status for j in jobs] == ["succeeded"] * 3


def test_pacs_down_fails_with_reason_then_retry_succeeds(tmp_path: Path, redis_server: RedisServer,
                                                         pacs: OrthancServer) -> None:
    settings = _settings(tmp_path, redis_server.url, pacs, default_method="baseline")
    staged = stage_series(settings.data_dir, 41, slices=1, frames=16, size=64)
    store = open_job_store(settings)
    job, _ = store.create_or_get(staged.study_uid, [staged.series_uid], {"method": "baseline"})
    pacs.stop()
    worker = _worker(settings, tmp_path, "p1")
    try:
        enqueue_job(job.job_id, settings)
        failed = _finished(store, job.job_id)
        assert failed.status == "failed"
        assert "after 3 attempts" in (failed.error or "") and str(pacs.dicom_port) in (failed.error or "")
        entry = failed.entry(staged.series_uid)
        assert entry.output_series_uid and entry.instances_sent == 0  # computed, not sent
        pacs.start()
        enqueue_export(job.job_id, settings)  # what POST /jobs/{id}/retry does
        done = wait_for(lambda: (j := store.get(job.job_id)).status == "succeeded" and j, JOB_TIMEOUT,
                        what="retry succeeded")
    finally:
        worker.stop()
    assert done.entry(staged.series_uid).output_series_uid == entry.output_series_uid  # not recomputed
    assert worker.log_text().count("derived series written") == 1
    _assert_in_pacs_exactly_once(pacs, done)


def test_two_workers_share_a_queue_without_double_processing(tmp_path: Path, redis_server: RedisServer,
                                                             pacs: OrthancServer) -> None:
    settings = _settings(tmp_path, redis_server.url, pacs)
    workers = [_worker(settings, tmp_path, "a"), _worker(settings, tmp_path, "b")]
    try:
        for w in workers:
            _ready(w)
        store = open_job_store(settings)
        series = [stage_series(settings.data_dir, 50 + k, slices=1, frames=16, size=128) for k in range(4)]
        job_ids = []
        for staged in series:
            job, _ = store.create_or_get(staged.study_uid, [staged.series_uid], {"method": "model", "steps": 1})
            enqueue_job(job.job_id, settings)
            job_ids.append(job.job_id)
        jobs = [_finished(store, j) for j in job_ids]
    finally:
        for w in workers:
            w.stop()
    assert [j.status for j in jobs] == ["succeeded"] * 4, [j.error for j in jobs]
    logs = [w.log_text() for w in workers]
    for staged in series:
        writes = sum(log.count(f'"source_series_uid": "{staged.series_uid}"') for log in logs)
        assert writes == 1, f"series {staged.series_uid} written {writes} times"
    assert all("derived series written" in log for log in logs), "both workers took work"
    for job in jobs:
        assert job.attempts == 0
    held = sum(len(pacs.series_instances(j.series[0].output_series_uid or "")) for j in jobs)
    assert held == pacs.instance_count() == sum(j.series[0].instances_total for j in jobs)


def test_sigterm_lets_the_running_series_finish(tmp_path: Path) -> None:
    settings = _settings(tmp_path, "", None)
    staged = stage_series(settings.data_dir, 23, slices=2, frames=32, size=128)
    store, job_id = _new_job(settings, staged)
    enqueue_job(job_id, settings)
    worker = _worker(settings, tmp_path, "t1")
    _computing(store, job_id, staged.series_uid)
    assert worker.process is not None
    process = worker.process
    import os
    import signal

    os.kill(process.pid, signal.SIGTERM)  # pod stop / scale-down: warm shutdown
    assert process.wait(JOB_TIMEOUT) == 0
    # the series in progress was finished, not abandoned; the export queued after it waits for a worker
    entry = store.get(job_id).entry(staged.series_uid)
    assert entry.status == "processed" and entry.output_series_uid
    assert "derived series written" in worker.log_text()
    nxt = _worker(settings, tmp_path, "t2")
    try:
        job = _finished(store, job_id)
    finally:
        nxt.stop()
    assert job.status == "succeeded" and job.attempts == 0
    assert nxt.log_text().count("derived series written") == 0  # not recomputed


def test_soft_time_limit_fails_the_series_with_the_reason(tmp_path: Path) -> None:
    settings = _settings(tmp_path, "", None, task_soft_time_limit=2.0, task_time_limit=30.0)
    staged = stage_series(settings.data_dir, 24, slices=2, frames=32, size=128)
    store, job_id = _new_job(settings, staged, steps=4)
    worker = _worker(settings, tmp_path, "l1")
    try:
        _ready(worker)  # the limit applies to the task, not to loading the engine
        enqueue_job(job_id, settings)
        job = _finished(store, job_id)
    finally:
        worker.stop()
    assert job.status == "failed"
    assert "soft time limit" in (job.error or "")
    assert job.attempts == 0  # a timeout is a failure, not a lost worker: no redelivery loop
