"""Cancelling jobs: DELETE /jobs/{id} (and POST /jobs/{id}/cancel), `cinesr cancel`, and what a cancel does to
queued, running and computed series. Real parts: the in-process service with its task bodies, a real DICOM
storage SCP as the PACS (nothing partial may reach it), a real HTTP server for the command line."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cinesr.service.app import Service
from cinesr.service.cli import CLI
from cinesr.service.demo import DemoPacs
from cinesr.service.gateway import create_app
from cinesr.worker.queue.process import export_series, process_series
from fastapi.testclient import TestClient

from tests.orthanc import write_lowres_study
from tests.service.test_gateway import AUTH, TOKEN, settings_for
from tests.service.test_stow import live_server
from tests.waiting import wait_for


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, list[Path]]:
    return write_lowres_study(tmp_path_factory.mktemp("phantom"), seed=6)


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[DemoPacs]:
    server = DemoPacs(tmp_path / "pacs").start()
    yield server
    server.stop()


def _service(tmp_path: Path, pacs: DemoPacs, **extra: Any) -> Service:
    return Service(settings_for(tmp_path / "data", auto_process=False, pacs_ae_title=pacs.ae_title,
                                pacs_host="127.0.0.1", pacs_port=pacs.port, **extra),
                   dispatch="inline", min_free_bytes=1 << 20)


def _store(svc: Service, files: list[Path]) -> None:
    for path in files:
        svc.store.put_file(path)
    svc.store.flush()


def _idle(svc: Service, timeout: float = 120) -> None:
    """Wait until the in-process worker has finished what it was doing (its one thread takes this next)."""
    svc.dispatcher._pool.submit(lambda: None).result(timeout=timeout)


def test_a_cancelled_queued_series_is_never_processed_nor_sent(tmp_path: Path, pacs: DemoPacs,
                                                              study: tuple[str, str, list[Path]]) -> None:
    study_uid, series_uid, files = study
    with _service(tmp_path, pacs) as svc:
        _store(svc, files)
        job, _ = svc.jobs.create_or_get(study_uid, [series_uid], {"method": "baseline"})
        cancelled = svc.cancel(job.job_id)  # as if its message were still in the queue
        assert cancelled.status == "cancelled" and cancelled.entry(series_uid).status == "cancelled"
        # the message comes up later (or after a restart): the task bodies do nothing with it
        process_series(job.job_id, series_uid, svc.settings)
        export_series(job.job_id, series_uid, svc.settings)
        after = svc.jobs.get(job.job_id)
        assert after.status == "cancelled" and after.entry(series_uid).output_series_uid is None
        assert not (Path(svc.settings.data_dir) / "outputs" / job.job_id).exists()
        assert pacs.received == {}
        # a worker that finishes late cannot revive it; a new identical request is a new job
        svc.jobs.update_series(job.job_id, series_uid, status="processed", output_series_uid="1.2.3")
        assert svc.jobs.get(job.job_id).entry(series_uid).status == "cancelled"
        again, created = svc.jobs.create_or_get(study_uid, [series_uid], {"method": "baseline"})
        assert created and again.job_id != job.job_id


def test_a_computed_but_unsent_series_is_not_sent(tmp_path: Path, pacs: DemoPacs,
                                                 study: tuple[str, str, list[Path]]) -> None:
    study_uid, series_uid, files = study
    with _service(tmp_path, pacs) as svc:
        _store(svc, files)
        job, _ = svc.jobs.create_or_get(study_uid, [series_uid], {"method": "baseline"})
        process_series(job.job_id, series_uid, svc.settings)
        assert svc.jobs.get(job.job_id).entry(series_uid).status == "processed"
        svc.cancel(job.job_id)
        export_series(job.job_id, series_uid, svc.settings)
        assert svc.jobs.get(job.job_id).status == "cancelled"
        assert pacs.received == {}


def test_rest_cancel_codes_and_listing(tmp_path: Path, pacs: DemoPacs, study: tuple[str, str, list[Path]]) -> None:
    study_uid, series_uid, files = study
    with _service(tmp_path, pacs) as svc, TestClient(create_app(svc)) as c:
        _store(svc, files)
        assert c.delete(f"/jobs/{'0' * 32}", headers=AUTH).status_code == 404
        assert c.delete(f"/jobs/{'0' * 32}").status_code == 401
        job = c.post(f"/studies/{study_uid}/superresolve", headers=AUTH, json={"method": "baseline"}).json()
        done = wait_for(lambda: (j := c.get(f"/jobs/{job['job_id']}", headers=AUTH).json())["status"]
                        in ("succeeded", "failed") and j, 60, "the job")
        assert done["status"] == "succeeded", done
        response = c.delete(f"/jobs/{job['job_id']}", headers=AUTH)
        assert response.status_code == 409 and "succeeded" in response.json()["detail"]
        # a job that is still waiting: POST .../cancel is the same as DELETE, and repeating it is harmless
        queued, _ = svc.jobs.create_or_get(study_uid, [series_uid], {"method": "baseline", "steps": 2})
        for _ in range(2):
            response = c.post(f"/jobs/{queued.job_id}/cancel", headers=AUTH)
            assert response.status_code == 202 and response.json()["status"] == "cancelled"
        listed = c.get("/jobs", headers=AUTH, params={"status": "cancelled"}).json()["jobs"]
        assert [j["job_id"] for j in listed] == [queued.job_id]
        assert 'cinesr_jobs{status="cancelled"} 1.0' in c.get("/metrics").text
        paths = c.get("/openapi.json").json()["paths"]
        assert "delete" in paths["/jobs/{job_id}"] and "/jobs/{job_id}/cancel" in paths
        assert {"/jobs/{job_id}/series/{series_uid}", "/jobs/{job_id}/series/{series_uid}/preview.png"} <= set(paths)


@pytest.mark.slow  # loads the learned model (~15-20 s on 2 busy cores)
def test_cancelling_a_running_model_job_stops_it_within_a_window(tmp_path: Path, pacs: DemoPacs,
                                                                 study: tuple[str, str, list[Path]]) -> None:
    study_uid, series_uid, files = study
    with _service(tmp_path, pacs, default_method="model") as svc, TestClient(create_app(svc)) as c:
        _store(svc, files)
        job_id = c.post(f"/studies/{study_uid}/superresolve", headers=AUTH).json()["job_id"]
        # running, the model loaded and windows going through the sampler
        def entry() -> Any:
            series = svc.jobs.get(job_id).series
            return series[0] if series else None

        first = wait_for(lambda: (e := entry()) and e.status == "running" and e.progress > 0
                         and (time.monotonic(), e.progress), 180, "the model to start")
        second = wait_for(lambda: (e := entry()).progress > first[1] and (time.monotonic(), e.progress), 60,
                          "progress")
        response = c.delete(f"/jobs/{job_id}", headers=AUTH)
        asked = time.monotonic()
        assert response.status_code == 202 and response.json()["status"] == "cancelled"
        _idle(svc)
        stopped = time.monotonic() - asked
        # one window = the sampler's steps over one 3-frame window; units are steps x windows (x tiles)
        from cinesr.worker.queue.process import COMPUTE_SHARE, make_method

        method = make_method("model", None, svc.settings)
        from cinesr.model.cine import read_series

        total = method.units(read_series(files)[0])
        rate = (second[1] - first[1]) / (COMPUTE_SHARE * 0.9) * total / (second[0] - first[0])  # units per s
        window = method.engine.plan.steps / rate
        print(f"cancel: worker stopped {stopped:.2f} s after the request; one window takes {window:.2f} s")
        assert stopped < window + 0.5, (stopped, window)
        job = svc.jobs.get(job_id)
        assert job.status == "cancelled" and job.series[0].progress < COMPUTE_SHARE
        assert not any((Path(svc.settings.data_dir) / "outputs").glob(f"{job_id}/*/*.dcm"))
        time.sleep(0.5)
        assert pacs.received == {}  # nothing reached the PACS


def test_cinesr_cancel_on_the_command_line(tmp_path: Path, pacs: DemoPacs,
                                           study: tuple[str, str, list[Path]]) -> None:
    study_uid, series_uid, files = study
    env = {**os.environ, "CINESR_API_TOKENS": TOKEN}
    with _service(tmp_path, pacs) as svc, live_server(svc) as url:
        _store(svc, files)
        job, _ = svc.jobs.create_or_get(study_uid, [series_uid], {"method": "baseline", "steps": 3})
        result = subprocess.run([*CLI, "cancel", job.job_id, "--url", url], capture_output=True, text=True,
                                env=env, timeout=60)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["status"] == "cancelled"
        assert svc.jobs.get(job.job_id).status == "cancelled"
        unknown = subprocess.run([*CLI, "cancel", "0" * 32, "--url", url], capture_output=True, text=True,
                                 env=env, timeout=60)
        assert unknown.returncode == 2
        assert unknown.stderr.strip() == f"cinesr: error: job {'0' * 32}: unknown job {'0' * 32} (HTTP 404)"
