"""The Celery app, the embedded transport, tasks and dispatch (real worker subprocesses, no Redis needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cinesr.service.cli import CLI
from cinesr.service.settings import Settings
from cinesr.worker.queue.celery_app import celery_config, get_app, visibility_timeout
from cinesr.worker.queue.dispatch import enqueue_export, enqueue_job, settings_environment, start_embedded_worker
from cinesr.worker.queue.embedded_broker import Database
from cinesr.worker.queue.jobs import open_job_store
from cinesr.worker.queue.runtime import heartbeat_age, write_heartbeat
from cinesr.worker.queue.tasks import MAX_REDELIVERIES
from kombu import Connection

from tests.waiting import wait_for
from tests.worker.celery_helpers import stage_series


def _settings(tmp_path: Path, **extra: object) -> Settings:
    values: dict[str, object] = {"data_dir": tmp_path / "data", "heartbeat_file": tmp_path / "heartbeat",
                                 "default_method": "baseline", "task_soft_time_limit": 60.0,
                                 "task_time_limit": 90.0}
    values.update(extra)
    return Settings(**values)


# ---- configuration --------------------------------------------------------------------------------

def test_config_is_chosen_for_long_gpu_jobs(tmp_path: Path) -> None:
    settings = _settings(tmp_path, task_soft_time_limit=1800.0, task_time_limit=2100.0)
    conf = celery_config(settings)
    assert conf["task_acks_late"] is True
    assert conf["task_reject_on_worker_lost"] is True
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["worker_concurrency"] == 1
    assert conf["task_soft_time_limit"] == 1800.0 and conf["task_time_limit"] == 2100.0
    # a task is never handed to a second worker while the first may still legitimately run it
    assert conf["broker_transport_options"]["visibility_timeout"] > conf["task_time_limit"]
    assert visibility_timeout(settings) > 2100
    assert conf["task_ignore_result"] is True
    assert conf["broker_url"] == "cinesr-sqlite://"
    assert conf["broker_transport_options"]["path"] == str(tmp_path / "data" / "queue" / "broker.sqlite3")


def test_redis_url_selects_redis_and_apps_are_cached(tmp_path: Path) -> None:
    redis_settings = _settings(tmp_path, broker_url="redis://127.0.0.1:6379/5")
    conf = celery_config(redis_settings)
    assert conf["broker_url"] == "redis://127.0.0.1:6379/5"
    assert "path" not in conf["broker_transport_options"]
    app = get_app(redis_settings)
    assert app is get_app(redis_settings)
    assert {"cinesr.superresolve_series", "cinesr.export_series"} <= set(app.tasks)
    assert app.conf.task_acks_late is True


def test_settings_travel_to_a_child_process_unchanged(tmp_path: Path) -> None:
    settings = _settings(tmp_path, allowed_calling_aets=["A", "B"], pacs_port=4242, auto_process=False)
    env = {**os.environ, **settings_environment(settings)}
    code = "from cinesr.service.settings import load_settings; print(load_settings().model_dump_json())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == json.loads(settings.model_dump_json())


# ---- embedded transport ---------------------------------------------------------------------------

def _connection(path: Path, visibility: float = 3600) -> Connection:
    return Connection("cinesr-sqlite://", transport_options={"path": str(path), "visibility_timeout": visibility})


def test_embedded_queue_is_fifo_persistent_and_deletes_on_ack(tmp_path: Path) -> None:
    db = tmp_path / "broker.sqlite3"
    with _connection(db) as conn:
        queue = conn.SimpleQueue("q")
        for i in range(3):
            queue.put({"n": i})
        queue.close()
    with _connection(db) as conn:  # a new connection (a restarted process) sees the queued messages
        queue = conn.SimpleQueue("q")
        assert len(queue) == 3
        first = queue.get(timeout=2)
        assert first.payload == {"n": 0}
        assert Database(db).size("q", ready_only=False) == 3  # taken, not yet acknowledged: still stored
        first.ack()
        assert Database(db).size("q", ready_only=False) == 2
        second = queue.get(timeout=2)
        second.reject()  # no requeue: gone
        third = queue.get(timeout=2)
        third.requeue()  # back to the queue
        again = queue.get(timeout=2)
        assert again.payload == {"n": 2}
        again.ack()
        assert Database(db).size("q", ready_only=False) == 0
        queue.close()


def test_message_of_a_killed_consumer_is_delivered_again(tmp_path: Path) -> None:
    db = tmp_path / "broker.sqlite3"
    with _connection(db) as conn:
        queue = conn.SimpleQueue("q")
        queue.put({"series": "1.2.3"})
        queue.close()
    # another process takes the message and dies with SIGKILL before acknowledging it
    code = ("import os, signal; from kombu import Connection; import cinesr.worker.queue.embedded_broker\n"
            f"c = Connection('cinesr-sqlite://', transport_options={{'path': {str(db)!r}}})\n"
            "m = c.SimpleQueue('q').get(timeout=5); print(m.payload, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9 and "1.2.3" in proc.stdout
    assert Database(db).size("q") == 0  # still owned by the dead process until someone reclaims it
    with _connection(db) as conn:
        queue = conn.SimpleQueue("q")
        message = queue.get(timeout=5)
        assert message.payload == {"series": "1.2.3"}
        assert message.delivery_info["redelivered"] is True  # Celery's request.delivery_info sees this
        message.ack()
        queue.close()


def test_visibility_timeout_frees_a_message_held_too_long(tmp_path: Path) -> None:
    db = Database(tmp_path / "broker.sqlite3")
    db.put("q", {"properties": {"delivery_tag": "t1", "delivery_info": {}}, "body": "x"})
    assert db.take("q", f"{os.uname().nodename}:{os.getpid()}") is not None  # alive owner: ours
    assert db.reclaim(visibility_timeout=3600) == 0
    assert db.take("q", "someone") is None
    time.sleep(0.05)
    assert db.reclaim(visibility_timeout=0.01) == 1
    again = db.take("q", "someone")
    assert again["body"] == "x" and again["properties"]["delivery_info"]["redelivered"] is True


# ---- heartbeat and probe --------------------------------------------------------------------------

def _probe(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **settings_environment(settings)}
    return subprocess.run([*CLI, "probe", *args], env=env, capture_output=True, text=True, timeout=60)


def test_probe_worker_reads_the_heartbeat(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    missing = _probe(settings, "worker")
    assert missing.returncode == 1 and "no heartbeat" in missing.stderr
    write_heartbeat(settings.heartbeat_file, {"pid": 1})
    assert heartbeat_age(settings.heartbeat_file) < 5
    fresh = _probe(settings, "worker")
    assert fresh.returncode == 0, fresh.stderr
    old = json.loads(settings.heartbeat_file.read_text())
    old["time"] -= 600
    settings.heartbeat_file.write_text(json.dumps(old))
    stale = _probe(settings, "worker")
    assert stale.returncode == 1 and "stale" in stale.stderr


def test_probe_dicom_fails_when_nothing_listens(tmp_path: Path) -> None:
    from tests.worker.celery_helpers import free_port

    result = _probe(_settings(tmp_path, dicom_port=free_port()), "dicom", "--timeout", "2")
    assert result.returncode == 1 and "dicom not ready" in result.stderr


# ---- the whole path on the embedded transport -----------------------------------------------------

def test_embedded_worker_processes_a_job_and_skips_duplicates(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    staged = stage_series(settings.data_dir, 3, slices=1, frames=16, size=64)
    store = open_job_store(settings)
    job, created = store.create_or_get(staged.study_uid, [staged.series_uid], {"method": "baseline"})
    assert created
    enqueue_job(job.job_id, settings)
    enqueue_job(job.job_id, settings)  # a duplicate delivery of the same work
    worker = start_embedded_worker(settings, loglevel="INFO")
    try:
        done = wait_for(lambda: (j := store.get(job.job_id)).status in ("succeeded", "failed") and j, 90,
                        what="job finished")
        assert done.status == "succeeded", done.error
        entry = done.entry(staged.series_uid)
        assert entry.output_series_uid and entry.instances_total == 8 * 2
        folder = settings.data_dir / "outputs" / job.job_id / entry.output_series_uid
        assert len(list(folder.glob("*.dcm"))) == 16
        assert "queue" in entry.timings and "compute" in entry.timings
        # the worker reports ready only with its engine loaded: the heartbeat names the method
        beat = json.loads(settings.heartbeat_file.read_text())
        assert beat["method"] == "baseline" and beat["pid"] != worker.pid
        assert _probe(settings, "worker").returncode == 0
        # the duplicate did not write the series a second time
        wait_for(lambda: worker.log_file.read_text().count("superresolve_series[") >= 4, 30, what="duplicate run")
        log = worker.log_file.read_text()
        assert log.count("derived series written") == 1, log[-3000:]
        # retry (export only) on a finished series is a no-op
        enqueue_export(job.job_id, settings)
        assert store.get(job.job_id).status == "succeeded"
    finally:
        worker.stop()
    assert not worker.alive()
    assert not settings.heartbeat_file.exists()  # a stopped worker is not ready


def test_poison_job_stops_after_max_redeliveries(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    staged = stage_series(settings.data_dir, 4, slices=1, frames=16, size=64)
    store = open_job_store(settings)
    job, _ = store.create_or_get(staged.study_uid, [staged.series_uid], {"method": "baseline"})
    # as if workers had died MAX_REDELIVERIES times mid-series: the next delivery finds it in flight
    store.update(job.job_id, attempts=MAX_REDELIVERIES)
    store.update_series(job.job_id, staged.series_uid, status="running")
    enqueue_job(job.job_id, settings)
    worker = start_embedded_worker(settings, loglevel="INFO")
    try:
        done = wait_for(lambda: (j := store.get(job.job_id)).status == "failed" and j, 60, what="job failed")
    finally:
        worker.stop()
    assert done.attempts == MAX_REDELIVERIES + 1
    assert "poison" in (done.entry(staged.series_uid).error or "")
    assert not (settings.data_dir / "outputs" / job.job_id).exists()  # not processed again


@pytest.mark.parametrize("method", ["no-such-method"])
def test_permanent_error_fails_the_series_with_its_reason(tmp_path: Path, method: str) -> None:
    settings = _settings(tmp_path)
    staged = stage_series(settings.data_dir, 5, slices=1, frames=16, size=64)
    store = open_job_store(settings)
    job, _ = store.create_or_get(staged.study_uid, [staged.series_uid], {"method": method})
    enqueue_job(job.job_id, settings)
    worker = start_embedded_worker(settings, loglevel="INFO")
    try:
        done = wait_for(lambda: (j := store.get(job.job_id)).status == "failed" and j, 60, what="job failed")
    finally:
        worker.stop()
    assert "unknown method" in (done.error or "")
    assert "export_series[" not in worker.log_file.read_text()  # the chain stopped: nothing exported


def test_embedded_worker_is_restarted_after_it_dies(tmp_path: Path) -> None:
    import os
    import signal

    settings = _settings(tmp_path)
    worker = start_embedded_worker(settings, loglevel="INFO", restart_delay=0.5)
    try:
        wait_for(settings.heartbeat_file.exists, 60, what="worker ready")
        first = worker.pid
        os.killpg(first, signal.SIGKILL)  # the worker and its pool child, as the OOM killer might
        wait_for(lambda: worker.pid != first and worker.alive(), 30, what="worker restarted")
        assert worker.restarts == 1
        # the restarted worker takes new work
        staged = stage_series(settings.data_dir, 6, slices=1, frames=16, size=64)
        store = open_job_store(settings)
        job, _ = store.create_or_get(staged.study_uid, [staged.series_uid], {"method": "baseline"})
        enqueue_job(job.job_id, settings)
        done = wait_for(lambda: (j := store.get(job.job_id)).status in ("succeeded", "failed") and j, 60,
                        what="job finished")
        assert done.status == "succeeded", done.error
    finally:
        worker.stop()
