"""End to end against real peers: dcmtk storescu as the modality, Orthanc as the PACS, the service in-process
(listener + assembler + routing + gateway + dispatch, as `cinesr serve` wires them).

- a study pushed with AUTO_PROCESS on comes back to Orthanc as a derived series, every instance once;
- a REST request for a study only Orthanc has is pulled (C-MOVE), processed and exported;
- PACS down: the job fails with the reason; once it is back, POST /jobs/{id}/retry succeeds without
  recomputing.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from cinesr.service.app import Service
from cinesr.service.gateway import create_app
from fastapi.testclient import TestClient

from tests.orthanc import OrthancServer, orthanc_available, storescu, write_lowres_study
from tests.service.test_gateway import AUTH, settings_for
from tests.waiting import wait_for

pytestmark = pytest.mark.skipif(not (orthanc_available() and shutil.which("storescu")),
                                reason="needs the Orthanc binary and dcmtk storescu")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, pacs: OrthancServer) -> Iterator[Service]:
    settings = settings_for(tmp_path_factory.mktemp("data"), pacs_ae_title=pacs.ae_title, pacs_host=pacs.host,
                            pacs_port=pacs.dicom_port, auto_process=True, series_stable_seconds=0.3)
    # "auto": Celery with the embedded worker process, as `cinesr serve` runs it (in-process thread only
    # where the worker package is missing)
    with Service(settings, dispatch="auto", min_free_bytes=1 << 20) as svc:
        pacs.register_modality(settings.ae_title, "127.0.0.1", svc.listener.port)
        yield svc


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[TestClient]:
    with TestClient(create_app(service)) as c:
        yield c


def _finished_job(client: TestClient, study_uid: str, timeout: float = 60) -> dict:
    def check() -> dict | None:
        jobs = client.get("/jobs", headers=AUTH, params={"study_uid": study_uid}).json()["jobs"]
        done = [j for j in jobs if j["status"] in ("succeeded", "failed")]
        return done[0] if done else None
    return wait_for(check, timeout, f"a finished job for study {study_uid}")


def _assert_exported_once(pacs: OrthancServer, job: dict) -> None:
    (entry,) = job["series"]
    uids = pacs.series_instances(entry["output_series_uid"])
    assert len(uids) == 64 == entry["instances_total"] == entry["instances_sent"]
    assert len(set(uids)) == len(uids)


def test_pushed_study_comes_back_as_a_derived_series(tmp_path: Path, service: Service, client: TestClient,
                                                     pacs: OrthancServer) -> None:
    study_uid, series_uid, files = write_lowres_study(tmp_path, seed=11)
    storescu(service.listener.port, files)
    job = _finished_job(client, study_uid)
    assert job["status"] == "succeeded", job
    assert job["source"] == "push"
    assert job["series"][0]["input_series_uid"] == series_uid
    _assert_exported_once(pacs, job)
    assert "export" in job["timings"]
    assert pacs.study_series(study_uid) == [job["series"][0]["output_series_uid"]]  # only the result went back
    # the same series completing again (a resend) does not start a second job
    storescu(service.listener.port, files[:2])
    service.assembler.stop(flush=True)
    service.assembler.start()
    jobs = client.get("/jobs", headers=AUTH, params={"study_uid": study_uid}).json()["jobs"]
    assert len(jobs) == 1
    metrics = {line.split(" ")[0]: float(line.split(" ")[1]) for line in client.get("/metrics").text.splitlines()
               if line and not line.startswith("#")}
    assert metrics['cinesr_received_instances_total{outcome="stored"}'] >= len(files)
    assert metrics['cinesr_received_instances_total{outcome="duplicate"}'] >= 2
    assert metrics['cinesr_job_stage_seconds_count{stage="export"}'] >= 1


def test_rest_request_pulls_a_study_only_the_pacs_has(tmp_path: Path, service: Service, client: TestClient,
                                                      pacs: OrthancServer) -> None:
    study_uid, series_uid, files = write_lowres_study(tmp_path, seed=12)
    pacs.upload(files)
    assert service.store.series(study_uid) == []
    response = client.post(f"/studies/{study_uid}/superresolve", headers=AUTH)
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    job = wait_for(lambda: (j := client.get(f"/jobs/{job_id}", headers=AUTH).json())["status"]
                   in ("succeeded", "failed") and j, 60, "the pulled job")
    assert job["status"] == "succeeded", job
    assert job["source"] == "rest" and "retrieve" in job["timings"]
    assert service.store.series(study_uid) == [series_uid]
    assert len(service.store.instances(study_uid, series_uid)) == len(files)
    _assert_exported_once(pacs, job)
    # the pulled series did not also start an automatic job
    assert [j["job_id"] for j in client.get("/jobs", headers=AUTH, params={"study_uid": study_uid}).json()["jobs"]] \
        == [job_id]
    # a study that neither side has is 404
    assert client.post("/studies/1.2.826.0.1.3680043.8.498.4040/superresolve", headers=AUTH).status_code == 404


def test_pacs_down_fails_the_job_and_retry_resends(tmp_path: Path, service: Service, client: TestClient,
                                                  pacs: OrthancServer) -> None:
    study_uid, _series_uid, files = write_lowres_study(tmp_path, seed=13)
    pacs.stop()
    try:
        storescu(service.listener.port, files)
        job = _finished_job(client, study_uid)
        assert job["status"] == "failed"
        assert "export to ORTHANC" in job["error"] and "attempts" in job["error"]
        entry = job["series"][0]
        assert entry["output_series_uid"] and entry["instances_sent"] == 0
        # not here and PACS down: cannot tell whether the study exists -> 503 with the reason
        response = client.post("/studies/1.2.826.0.1.3680043.8.498.5030/superresolve", headers=AUTH)
        assert response.status_code == 503 and "PACS" in response.json()["detail"]
    finally:
        pacs.start()
    computed = job["timings"]["compute"]
    response = client.post(f"/jobs/{job['job_id']}/retry", headers=AUTH)
    assert response.status_code == 202
    done = wait_for(lambda: (j := client.get(f"/jobs/{job['job_id']}", headers=AUTH).json())["status"]
                    in ("succeeded", "failed") and j, 60, "the retried job")
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 1 and done["error"] is None
    assert done["timings"]["compute"] == computed  # resent, not recomputed
    _assert_exported_once(pacs, done)


def test_cinesr_serve_runs_the_whole_service(tmp_path: Path) -> None:
    """The real command: REST and DICOM answer, a token is generated (its path logged, never the token), and
    SIGTERM stops the service and its embedded worker."""
    import os
    import signal
    import subprocess

    import httpx

    from tests.orthanc import free_port

    http_port, dicom_port = free_port(), free_port()
    env = {**os.environ, "CINESR_DATA_DIR": str(tmp_path / "data"), "CINESR_HTTP_PORT": str(http_port),
           "CINESR_DICOM_PORT": str(dicom_port), "CINESR_API_TOKENS": "", "CINESR_DEFAULT_METHOD": "baseline"}
    cinesr = Path(shutil.which("cinesr") or Path(os.sys.executable).with_name("cinesr"))
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([str(cinesr), "--log-level", "INFO", "serve", "--host", "127.0.0.1"], env=env,
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{http_port}"

        def up() -> bool:
            try:
                return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return process.poll() is not None  # exited: stop waiting, the asserts below say why
        wait_for(up, 60, what="cinesr serve to answer")
        assert process.poll() is None, log.read_text()
        token = (tmp_path / "data" / "api-token").read_text().strip()
        echo = subprocess.run(["echoscu", "-aec", "CINESR", "127.0.0.1", str(dicom_port)], capture_output=True,
                              env={**os.environ, "TCP_NODELAY": "1"}, timeout=30)
        assert echo.returncode == 0, echo.stderr
        headers = {"Authorization": f"Bearer {token}"}
        assert httpx.get(f"{url}/jobs", headers=headers).json() == {"jobs": []}
        assert httpx.post(f"{url}/studies/1.2.3/superresolve", headers=headers).status_code == 404
        ready = httpx.get(f"{url}/readyz").json()
        assert ready["checks"]["storage"]["ok"] and ready["checks"]["broker"]["ok"]
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    text = log.read_text()
    assert code == 0, text
    assert str(tmp_path / "data" / "api-token") in text and token not in text
    import re

    worker = re.search(r"embedded worker started \(pid (\d+)\)", text)
    assert worker, text
    assert not Path(f"/proc/{worker.group(1)}").exists() or \
        Path(f"/proc/{worker.group(1)}/stat").read_text().split()[2] == "Z"  # stopped with the service


def test_requested_series_missing_here_is_pulled(tmp_path: Path, service: Service, client: TestClient,
                                                 pacs: OrthancServer) -> None:
    import pydicom

    study_uid, series_uid, files = write_lowres_study(tmp_path, seed=14)
    other = series_uid + ".9"
    copies = []
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = other
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{other}.{i + 1}"
        ds.save_as(tmp_path / f"other{i}.dcm")
        copies.append(tmp_path / f"other{i}.dcm")
    pacs.upload(copies)  # the second series only at the PACS
    for path in files:  # the first one only here
        service.store.put_file(path)
    service.store.flush()
    response = client.post(f"/studies/{study_uid}/superresolve", headers=AUTH, json={"series": [other]})
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    job = wait_for(lambda: (j := client.get(f"/jobs/{job_id}", headers=AUTH).json())["status"]
                   in ("succeeded", "failed") and j, 60, "the job for the missing series")
    assert job["status"] == "succeeded", job
    assert [e["input_series_uid"] for e in job["series"]] == [other]
    assert sorted(service.store.series(study_uid)) == sorted([series_uid, other])
    _assert_exported_once(pacs, job)
    # a series neither here nor at the PACS is 404
    missing = client.post(f"/studies/{study_uid}/superresolve", headers=AUTH, json={"series": [other + ".1"]})
    assert missing.status_code == 404
    # AUTO_PROCESS also took the series that was stored here; let that job finish before the worker stops
    wait_for(lambda: all(j["status"] in ("succeeded", "failed") for j in
                         client.get("/jobs", headers=AUTH, params={"study_uid": study_uid}).json()["jobs"]),
             60, "the automatic job")
