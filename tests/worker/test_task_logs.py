"""Issue 14 #11 in a real worker: an expected failure (a series that is not a cine) is one WARNING line with the
reason and no traceback, and every line the worker writes is JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cinesr.service.settings import Settings
from cinesr.worker.queue.dispatch import enqueue_job
from cinesr.worker.queue.jobs import open_job_store

from tests.waiting import wait_for
from tests.worker.celery_helpers import WorkerProcess, stage_series

pytestmark = pytest.mark.slow


def test_a_series_that_is_not_a_cine_is_a_warning_without_traceback(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", broker_url="", heartbeat_file=tmp_path / "heartbeat",
                        default_method="baseline")
    staged = stage_series(settings.data_dir, 61, slices=1, frames=16, size=64)
    for path in sorted(staged.folder.glob("*.dcm"))[1:]:  # one image at its position: not a cine
        path.unlink()
    store = open_job_store(settings)
    job, _ = store.create_or_get(staged.study_uid, [staged.series_uid], {"method": "baseline"})
    enqueue_job(job.job_id, settings)
    worker = WorkerProcess(settings, tmp_path / "worker.log", "n1@%h").start()
    try:
        done = wait_for(lambda: (j := store.get(job.job_id)).status in ("failed", "succeeded") and j, 120, interval=0.2,
                        what="job finished")
    finally:
        worker.stop()
    assert done.status == "failed" and "frame" in (done.error or "")
    records = []
    for line in worker.log_text().splitlines():
        if line.strip():
            records.append(json.loads(line))  # JSON lines only: no banner, no raw warnings, no tracebacks
    failures = [r for r in records if "failed" in r["msg"] and staged.series_uid in r["msg"]]
    assert failures and all(r["level"] == "warning" and "exc" not in r for r in failures), failures
    assert not [r for r in records if r["level"] in ("error", "critical")], records
    assert not any("exc" in r for r in records)
