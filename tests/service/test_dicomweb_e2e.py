"""DICOMweb at both edges, end to end: a real Orthanc with its DICOMweb plugin (and HTTP basic auth) as the
PACS configured only by URL, the service in-process with its embedded Celery worker, as `cinesr serve` runs.

- a study pushed to CineSR by STOW-RS is super-resolved and its derived series arrives in Orthanc by STOW-RS
  (Orthanc records the origin of each instance: 'Plugins' for DICOMweb, 'DicomProtocol' for C-STORE);
- a REST request for a study only Orthanc has is found by QIDO-RS, pulled by WADO-RS and processed;
- per-destination choice: a DIMSE destination and a DICOMweb one with bearer auth (CineSR's own STOW-RS)
  next to the DICOMweb PACS; wrong credentials and a PACS that is down fail the job with the reason, and
  a retry once the PACS is back resends without recomputing.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from cinesr.service.app import Service
from cinesr.service.gateway import create_app
from cinesr.worker.network.multipart import encode_related
from fastapi.testclient import TestClient

from tests.orthanc import OrthancServer, dicomweb_plugin, free_port, orthanc_available, write_lowres_study
from tests.service.test_gateway import AUTH, TOKEN, settings_for
from tests.service.test_stow import BOUNDARY, STOW_TYPE, live_server, referenced
from tests.waiting import wait_for

pytestmark = pytest.mark.skipif(not orthanc_available(), reason="needs the Orthanc binary")

PACS_USER, PACS_PASSWORD = "cinesr", "pacs-pw-5e1f09"
SELF_PORT = free_port()  # CineSR's own HTTP server, a STOW-RS destination with bearer auth


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    if dicomweb_plugin() is None:
        pytest.fail("the Orthanc DICOMweb plugin is not installed (run .ci/run, or apt-get install orthanc-dicomweb)")
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-dicomweb"), dicomweb=True,
                           users={PACS_USER: PACS_PASSWORD})
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, pacs: OrthancServer) -> Iterator[Service]:
    self_url = f"http://127.0.0.1:{SELF_PORT}/dicomweb"
    settings = settings_for(
        tmp_path_factory.mktemp("data"), auto_process=True, series_stable_seconds=0.3,
        pacs_dicomweb_url=pacs.dicomweb_url, pacs_dicomweb_user=PACS_USER, pacs_dicomweb_password=PACS_PASSWORD,
        destinations=[f"DIMSE@{pacs.host}:{pacs.dicom_port}", f"SELF={self_url}", f"BADTOKEN={self_url}",
                      f"BADPASS={pacs.dicomweb_url}"],
        dicomweb_credentials=f"SELF=bearer:{TOKEN},BADTOKEN=bearer:wrong-token,BADPASS=basic:{PACS_USER}:nope")
    # "auto": Celery with the embedded worker process (the settings, secrets included, reach it by environment)
    with Service(settings, dispatch="auto", min_free_bytes=1 << 20) as svc:
        yield svc


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[TestClient]:
    with TestClient(create_app(service)) as c:
        yield c


def finished(client: TestClient, job_id: str, timeout: float = 90) -> dict:
    return wait_for(lambda: (j := client.get(f"/jobs/{job_id}", headers=AUTH).json())["status"]
                    in ("succeeded", "failed") and j, timeout, f"job {job_id} to finish")


def stow(client: TestClient, files: list[Path], study_uid: str) -> None:
    response = client.post(f"/dicomweb/studies/{study_uid}", content=encode_related([p.read_bytes() for p in files],
                                                                                     BOUNDARY),
                           headers={**AUTH, "Content-Type": STOW_TYPE})
    assert response.status_code == 200, response.text
    assert len(referenced(response)) == len(files)


def test_stowed_study_comes_back_to_the_pacs_by_stow(tmp_path: Path, service: Service, client: TestClient,
                                                     pacs: OrthancServer) -> None:
    study_uid, series_uid, files = write_lowres_study(tmp_path, seed=21)
    stow(client, files, study_uid)
    job = wait_for(lambda: (jobs := client.get("/jobs", headers=AUTH, params={"study_uid": study_uid}).json()["jobs"])
                   and jobs[0]["status"] in ("succeeded", "failed") and jobs[0], 90, "the pushed study's job")
    assert job["status"] == "succeeded", job
    assert job["source"] == "push"
    (entry,) = job["series"]
    assert entry["input_series_uid"] == series_uid
    uids = pacs.series_instances(entry["output_series_uid"])
    assert len(uids) == len(set(uids)) == 64 == entry["instances_sent"]
    assert pacs.instance_origins(entry["output_series_uid"]) == {"Plugins"}  # DICOMweb, not C-STORE
    assert pacs.study_series(study_uid) == [entry["output_series_uid"]]  # only the result went to the PACS
    ds = pydicom.dcmread(io.BytesIO(pacs.instance_file(uids[0])))
    assert ds.StudyInstanceUID == study_uid and ds.Rows == 256 and "DERIVED" in ds.ImageType


def test_rest_request_pulls_by_qido_and_wado(tmp_path: Path, service: Service, client: TestClient,
                                             pacs: OrthancServer) -> None:
    study_uid, series_uid, files = write_lowres_study(tmp_path, seed=22)
    pacs.upload(files)
    assert service.store.series(study_uid) == []
    response = client.post(f"/studies/{study_uid}/superresolve", headers=AUTH)
    assert response.status_code == 202, response.text
    job = finished(client, response.json()["job_id"])
    assert job["status"] == "succeeded", job
    assert job["source"] == "rest" and "retrieve" in job["timings"]
    # every instance pulled, its dataset exactly as Orthanc holds it
    here = service.store.instances(study_uid, series_uid)
    assert len(here) == len(files)
    sent = {pydicom.dcmread(p).SOPInstanceUID: p for p in files}
    for path in here:
        pulled = pydicom.dcmread(path)
        assert pulled.PixelData == pydicom.dcmread(sent[pulled.SOPInstanceUID]).PixelData
        assert pulled.file_meta.SourceApplicationEntityTitle == "PACS"  # the PACS's name (no PACS_AE_TITLE)
    (entry,) = job["series"]
    assert len(pacs.series_instances(entry["output_series_uid"])) == 64
    # the pulled series did not also start an automatic job
    assert len(client.get("/jobs", headers=AUTH, params={"study_uid": study_uid}).json()["jobs"]) == 1
    # a study that neither side has: QIDO-RS says so -> 404
    response = client.post("/studies/1.2.826.0.1.3680043.8.498.4041/superresolve", headers=AUTH)
    assert response.status_code == 404 and pacs.dicomweb_url in response.json()["detail"]


def test_each_destination_by_its_own_protocol(tmp_path: Path, service: Service, client: TestClient,
                                              pacs: OrthancServer) -> None:
    study_uid, _series_uid, files = write_lowres_study(tmp_path, seed=23)
    stow(client, files, study_uid)
    first = wait_for(lambda: (jobs := client.get("/jobs", headers=AUTH, params={"study_uid": study_uid}).json()
                              ["jobs"]) and jobs[0]["status"] in ("succeeded", "failed") and jobs[0], 90, "push job")
    assert first["status"] == "succeeded", first
    pacs.delete_study(study_uid)  # the derived UIDs do not depend on the destination: start the PACS afresh
    with live_server(service, SELF_PORT):
        jobs = {}
        for destination in ("DIMSE", "SELF", "BADTOKEN", "BADPASS"):
            response = client.post(f"/studies/{study_uid}/superresolve", headers=AUTH,
                                   json={"destination": destination})
            assert response.status_code == 202, response.text
            jobs[destination] = finished(client, response.json()["job_id"])
    dimse, own, bad_token, bad_pass = (jobs[d] for d in ("DIMSE", "SELF", "BADTOKEN", "BADPASS"))
    assert dimse["status"] == "succeeded", dimse
    assert pacs.instance_origins(dimse["series"][0]["output_series_uid"]) == {"DicomProtocol"}
    # CineSR's own STOW-RS with the bearer token: the derived instances are in our store (and, being CineSR
    # output, are not processed again)
    assert own["status"] == "succeeded", own
    output = own["series"][0]["output_series_uid"]
    service.store.flush()
    assert len(service.store.instances(study_uid, output)) == 64
    for job, words in ((bad_token, "authentication refused"), (bad_pass, "authentication refused")):
        assert job["status"] == "failed", job
        assert "attempts" in job["error"] and words in job["error"] and "HTTP 401" in job["error"]
        assert TOKEN not in job["error"] and "nope" not in job["error"] and "wrong-token" not in job["error"]
    assert len(client.get("/jobs", headers=AUTH, params={"study_uid": study_uid}).json()["jobs"]) == 5


def test_pacs_down_fails_with_the_reason_and_retry_resends(tmp_path: Path, service: Service, client: TestClient,
                                                          pacs: OrthancServer) -> None:
    study_uid, _series_uid, files = write_lowres_study(tmp_path, seed=24)
    pacs.stop()
    try:
        stow(client, files, study_uid)
        job = wait_for(lambda: (jobs := client.get("/jobs", headers=AUTH, params={"study_uid": study_uid}).json()
                                ["jobs"]) and jobs[0]["status"] in ("succeeded", "failed") and jobs[0], 90, "push job")
        assert job["status"] == "failed"
        assert f"export to PACS ({pacs.dicomweb_url}) failed after 2 attempts" in job["error"]
        assert "cannot reach" in job["error"]
        response = client.post("/studies/1.2.826.0.1.3680043.8.498.5031/superresolve", headers=AUTH)
        assert response.status_code == 503 and "cannot be asked" in response.json()["detail"]
    finally:
        pacs.start()
    response = client.post(f"/jobs/{job['job_id']}/retry", headers=AUTH)
    assert response.status_code == 202
    done = finished(client, job["job_id"])
    assert done["status"] == "succeeded", done
    assert done["timings"]["compute"] == job["timings"]["compute"]  # resent, not recomputed
    assert len(pacs.series_instances(done["series"][0]["output_series_uid"])) == 64
