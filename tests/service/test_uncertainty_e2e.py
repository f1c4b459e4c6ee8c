"""The uncertainty series over REST, end to end: dcmtk storescu as the modality, Orthanc as the PACS, the service
in-process with its embedded Celery worker, and a micro model bundle with a distilled student (fast, untrained:
what is checked here is the plumbing, not the map's meaning; tests/worker/test_uncertainty.py checks that).

- {"uncertainty": 3} brings back two derived series to Orthanc, every instance once, both dciodvfy-clean;
- steps the bundle does not serve, and an uncertainty series of the baseline, are 422 with the reason.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from cinesr.service.app import Service
from cinesr.service.gateway import create_app
from fastapi.testclient import TestClient

from tests import models
from tests.dicomcheck import new_errors
from tests.orthanc import OrthancServer, orthanc_available, write_lowres_study
from tests.service.test_gateway import AUTH, settings_for, store_study
from tests.waiting import wait_for

pytestmark = pytest.mark.skipif(not (orthanc_available() and shutil.which("dciodvfy")),
                                reason="needs the Orthanc binary and dciodvfy")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, pacs: OrthancServer) -> Iterator[Service]:
    bundle = models.micro_student_bundle(tmp_path_factory.mktemp("m") / "micro", 6,
                                         {"steps": 1, "overlap": 0, "stride": 3})
    settings = settings_for(tmp_path_factory.mktemp("data"), pacs_ae_title=pacs.ae_title, pacs_host=pacs.host,
                            pacs_port=pacs.dicom_port, auto_process=False, default_method="model",
                            model_dir=bundle)
    with Service(settings, dispatch="auto", min_free_bytes=1 << 20) as svc:
        pacs.register_modality(settings.ae_title, "127.0.0.1", svc.listener.port)
        yield svc


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[TestClient]:
    with TestClient(create_app(service)) as c:
        yield c


@pytest.mark.slow  # the embedded worker loads torch and the model (~10-20 s on 2 busy cores)
def test_uncertainty_series_travels_to_the_pacs_with_the_output(tmp_path: Path, service: Service,
                                                                client: TestClient, pacs: OrthancServer) -> None:
    study_uid, _series_uid, files = write_lowres_study(tmp_path / "in", seed=21)
    store_study(service, files)
    response = client.post(f"/studies/{study_uid}/superresolve", headers=AUTH, json={"uncertainty": 3, "steps": 1})
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    assert response.json()["params"]["uncertainty"] == 3
    job = wait_for(lambda: (j := client.get(f"/jobs/{job_id}", headers=AUTH).json())["status"]
                   in ("succeeded", "failed") and j, 180, "the uncertainty job")
    assert job["status"] == "succeeded", job
    (entry,) = job["series"]
    output, spread = entry["output_series_uid"], entry["uncertainty_series_uid"]
    assert output and spread and output != spread
    sr_uids, spread_uids = pacs.series_instances(output), pacs.series_instances(spread)
    assert len(sr_uids) == len(spread_uids) == 64
    assert entry["instances_total"] == entry["instances_sent"] == 128
    assert len(set(sr_uids) | set(spread_uids)) == 128  # each once, none shared
    assert sorted(pacs.study_series(study_uid)) == sorted([output, spread])
    # as the PACS holds them: same geometry, their own descriptions, no dciodvfy error the input lacks
    source = files[0]
    for k, (a, b) in enumerate([(sr_uids[0], spread_uids[0]), (sr_uids[-1], spread_uids[-1])]):
        got = []
        for name, uid in (("sr", a), ("unc", b)):
            path = tmp_path / f"{name}{k}.dcm"
            path.write_bytes(pacs.instance_file(uid))
            assert new_errors(path, source) == set(), (name, path)
            got.append(pydicom.dcmread(path))
        sr, unc = got
        assert (sr.Rows, sr.Columns) == (unc.Rows, unc.Columns) == (256, 256)
        assert sr.StudyInstanceUID == unc.StudyInstanceUID == study_uid
        assert unc.SeriesDescription.endswith("CineSR uncertainty") and sr.SeriesDescription.endswith(" CineSR")
        assert list(unc.ImageType) == ["DERIVED", "SECONDARY", "OTHER"]
    # the same request again is the same job; without the field it is another
    again = client.post(f"/studies/{study_uid}/superresolve", headers=AUTH, json={"uncertainty": 3, "steps": 1})
    assert again.json()["job_id"] == job_id


@pytest.mark.parametrize(("body", "reason"), [
    ({"steps": 3}, "use one of 1, 2, 4, 15"),
    ({"method": "baseline", "uncertainty": True}, "needs the model method"),
    ({"uncertainty": 1}, "at least 2 draws"),
])
def test_unsupported_requests_are_422_with_the_reason(tmp_path: Path, service: Service, client: TestClient,
                                                      body: dict, reason: str) -> None:
    study_uid, _series_uid, files = write_lowres_study(tmp_path, seed=22)
    store_study(service, files)
    response = client.post(f"/studies/{study_uid}/superresolve", headers=AUTH, json=body)
    assert response.status_code == 422, response.text
    assert reason in str(response.json()["detail"])
