"""Cancel on the real Celery path: a job cancelled while its message waits in the durable embedded queue is
consumed and dropped by the worker (it does not come back after a restart); the next job still runs."""

from __future__ import annotations

from pathlib import Path

from cinesr.service.settings import Settings
from cinesr.worker.queue.dispatch import enqueue_job, start_embedded_worker
from cinesr.worker.queue.jobs import open_job_store

from tests.waiting import wait_for
from tests.worker.celery_helpers import stage_series


def test_a_cancelled_queued_job_is_dropped_by_the_worker(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", heartbeat_file=tmp_path / "heartbeat", default_method="baseline",
                        task_soft_time_limit=60.0, task_time_limit=90.0)
    cancelled_series = stage_series(settings.data_dir, 7, slices=1, frames=16, size=64)
    later_series = stage_series(settings.data_dir, 8, slices=1, frames=16, size=64)
    store = open_job_store(settings)
    cancelled, _ = store.create_or_get(cancelled_series.study_uid, [cancelled_series.series_uid],
                                       {"method": "baseline"})
    later, _ = store.create_or_get(later_series.study_uid, [later_series.series_uid], {"method": "baseline"})
    enqueue_job(cancelled.job_id, settings)  # first in the queue ...
    enqueue_job(later.job_id, settings)
    assert store.cancel(cancelled.job_id).status == "cancelled"  # ... and cancelled before any worker runs
    worker = start_embedded_worker(settings, loglevel="INFO")
    try:
        done = wait_for(lambda: (j := store.get(later.job_id)).status in ("succeeded", "failed") and j, 120,
                        what="the later job")
        assert done.status == "succeeded", done.error
        log = worker.log_file.read_text()
        assert f"superresolve of {cancelled.job_id}/{cancelled_series.series_uid} already done; skipped" in log
    finally:
        worker.stop()
    job = store.get(cancelled.job_id)
    assert job.status == "cancelled" and job.entry(cancelled_series.series_uid).output_series_uid is None
    assert not (settings.data_dir / "outputs" / cancelled.job_id).exists()
    store.close()
