"""The REST gateway against a real (in-process) service: auth, validation, idempotency, jobs, health, metrics.

No PACS here (tests/service/test_e2e.py has Orthanc): results stay in DATA_DIR/outputs.
"""

from __future__ import annotations

import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from cinesr.service.app import Service
from cinesr.service.gateway import create_app
from cinesr.service.settings import Settings
from fastapi.testclient import TestClient

from tests.orthanc import write_lowres_study
from tests.waiting import wait_for

TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def settings_for(data: Path, **extra: Any) -> Settings:
    values: dict[str, Any] = {"data_dir": data, "dicom_port": 0, "api_tokens": [TOKEN], "series_stable_seconds": 0.2,
                              "default_method": "baseline", "export_retries": 1, "export_backoff_seconds": 0.05}
    return Settings(**{**values, **extra})


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, list[Path]]:
    return write_lowres_study(tmp_path_factory.mktemp("phantom"), seed=3)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    # AUTO_PROCESS off: these tests submit over REST only. The model is a micro bundle with a distilled student,
    # so that a 1-step request is one the bundle serves (the shipped tiny bundle serves 15 steps only).
    from tests import models

    bundle = models.micro_student_bundle(tmp_path_factory.mktemp("m") / "micro", 1, {"overlap": 4, "stride": 3})
    svc = Service(settings_for(tmp_path_factory.mktemp("data"), auto_process=False, model_dir=bundle),
                  dispatch="inline", min_free_bytes=1 << 20)
    with svc:
        yield svc


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[TestClient]:
    with TestClient(create_app(service)) as c:
        yield c


def store_study(service: Service, files: list[Path]) -> None:
    for path in files:
        service.store.put_file(path)
    service.store.flush()


def test_health_needs_no_token(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["ready"] is True
    assert {"broker", "storage", "model", "listener"} <= set(body["checks"])
    assert body["checks"]["model"]["method"] == "baseline"


def test_missing_or_wrong_token_is_401(client: TestClient) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"}):
        response = client.post("/studies/1.2.3/superresolve", headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"] == "Bearer"
        assert "token" in response.json()["detail"]
    assert client.get("/jobs", headers={"Authorization": "Bearer nope"}).status_code == 401


@pytest.mark.parametrize("uid", ["1.2.abc", "01.2.3", "1..2", "1.2.", "1" + ".2" * 40])
def test_malformed_study_uid_is_422(client: TestClient, uid: str) -> None:
    response = client.post(f"/studies/{uid}/superresolve", headers=AUTH)
    assert response.status_code == 422
    assert response.json()["detail"]


@pytest.mark.parametrize("body", [{"steps": 0}, {"series": ["x.1"]}, {"colour": "red"}, {"method": "magic"}])
def test_malformed_body_is_422(client: TestClient, study: tuple[str, str, list[Path]], body: dict) -> None:
    response = client.post(f"/studies/{study[0]}/superresolve", headers=AUTH, json=body)
    assert response.status_code == 422


def test_unknown_study_without_pacs_is_404(client: TestClient) -> None:
    response = client.post("/studies/1.2.826.0.1.3680043.8.498.999/superresolve", headers=AUTH)
    assert response.status_code == 404
    assert "no PACS" in response.json()["detail"]


def test_unknown_destination_is_422(client: TestClient, service: Service, study: tuple[str, str, list[Path]]) -> None:
    store_study(service, study[2])
    response = client.post(f"/studies/{study[0]}/superresolve", headers=AUTH, json={"destination": "ELSEWHERE"})
    assert response.status_code == 422
    assert "ELSEWHERE" in response.json()["detail"]


def test_submit_process_and_follow_a_job(client: TestClient, service: Service,
                                         study: tuple[str, str, list[Path]]) -> None:
    study_uid, series_uid, files = study
    store_study(service, files)
    response = client.post(f"/studies/{study_uid}/superresolve", headers=AUTH, json={"method": "baseline"})
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/jobs/{job['job_id']}" == job["location"]
    assert job["status"] in ("queued", "running", "exporting", "succeeded")
    again = client.post(f"/studies/{study_uid}/superresolve", headers=AUTH, json={"method": "baseline"})
    assert again.status_code == 202 and again.json()["job_id"] == job["job_id"]
    assert again.headers.get("x-cinesr-existing-job") == "true"

    def finished() -> dict | None:
        current = client.get(f"/jobs/{job['job_id']}", headers=AUTH).json()
        return current if current["status"] in ("succeeded", "failed") else None

    done = wait_for(finished, what="job to finish")
    assert done["status"] == "succeeded", done
    assert done["progress"] == 1.0
    (entry,) = done["series"]
    assert entry["input_series_uid"] == series_uid
    assert entry["output_series_uid"] and entry["output_series_uid"] != series_uid
    assert entry["instances_total"] == 2 * 4 * 8
    assert {"load", "compute", "write"} <= set(done["timings"])
    out = Path(service.settings.data_dir) / "outputs" / job["job_id"] / entry["output_series_uid"]
    outputs = sorted(out.glob("*.dcm"))
    assert len(outputs) == 64
    ds = pydicom.dcmread(outputs[0], stop_before_pixels=True)
    assert ds.StudyInstanceUID == study_uid and ds.Rows == 256 and ds.Columns == 256

    listed = client.get("/jobs", headers=AUTH, params={"study_uid": study_uid}).json()["jobs"]
    assert job["job_id"] in [j["job_id"] for j in listed]
    assert all(j["study_uid"] == study_uid for j in listed)
    failed = client.get("/jobs", headers=AUTH, params={"status": "failed"}).json()["jobs"]
    assert job["job_id"] not in [j["job_id"] for j in failed]
    assert client.get("/jobs", headers=AUTH, params={"status": "bogus"}).status_code == 422
    # a finished job cannot be retried; an unknown one is 404
    assert client.post(f"/jobs/{job['job_id']}/retry", headers=AUTH).status_code == 409
    assert client.get(f"/jobs/{'0' * 32}", headers=AUTH).status_code == 404
    assert client.post(f"/jobs/{'0' * 32}/retry", headers=AUTH).status_code == 404
    assert client.get("/jobs/not-a-job", headers=AUTH).status_code == 422

    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    text = metrics.text
    assert 'cinesr_jobs{status="succeeded"}' in text
    assert 'cinesr_job_stage_seconds_count{stage="compute"}' in text
    assert "cinesr_queue_depth" in text and "cinesr_received_instances_total" in text


def test_series_not_in_study_is_404(client: TestClient, service: Service, study: tuple[str, str, list[Path]]) -> None:
    store_study(service, study[2])
    response = client.post(f"/studies/{study[0]}/superresolve", headers=AUTH, json={"series": ["1.2.3.4.5"]})
    assert response.status_code == 404
    assert "1.2.3.4.5" in response.json()["detail"]


def test_ineligible_study_fails_with_the_reason(client: TestClient, service: Service, tmp_path: Path,
                                                study: tuple[str, str, list[Path]]) -> None:
    # one frame per slice position is not a cine
    study_uid = "1.2.826.0.1.3680043.8.498.77"
    for i, path in enumerate(study[2][:1]):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = study_uid + ".1"
        ds.SOPInstanceUID = f"{study_uid}.1.{i + 1}"
        ds.save_as(tmp_path / f"{i}.dcm")
        service.store.put_file(tmp_path / f"{i}.dcm")
    service.store.flush()
    response = client.post(f"/studies/{study_uid}/superresolve", headers=AUTH)
    assert response.status_code == 202
    job_id = response.json()["job_id"]
    done = wait_for(lambda: (j := client.get(f"/jobs/{job_id}", headers=AUTH).json())["status"] == "failed" and j,
                    what="job to fail")
    assert "no eligible cine series" in done["error"]


def test_openapi_documents_the_api(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/studies/{study_uid}/superresolve", "/jobs", "/jobs/{job_id}", "/jobs/{job_id}/retry", "/healthz",
            "/readyz", "/metrics"} <= set(spec["paths"])
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    assert client.get("/docs").status_code == 404  # off unless DOCS_ENABLED (test_gateway_guard.py)


def test_token_is_generated_once_into_the_data_dir(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, api_tokens=[])
    with Service(settings, dispatch="inline", min_free_bytes=1 << 20) as svc:
        token_file = svc.token_file
        assert token_file == tmp_path / "api-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32
        with TestClient(create_app(svc)) as c:
            assert c.get("/jobs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
            assert c.get("/jobs", headers=AUTH).status_code == 401
    with Service(settings, dispatch="inline", min_free_bytes=1 << 20) as svc:
        assert svc.tokens == [token]  # the same token after a restart


def _copy_as(source: Path, target: Path, study_uid: str, series_uid: str, sop_uid: str, **changes: Any) -> Path:
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(target)
    return target


def test_routing_auto_processes_eligible_series_and_cleans_up_the_rest(
        tmp_path: Path, study: tuple[str, str, list[Path]]) -> None:
    from cinesr.service.routing import sweep_ineligible

    settings = settings_for(tmp_path / "data", auto_process=True)
    study_uid = "1.2.826.0.1.3680043.8.498.88"
    ct, report, cine = f"{study_uid}.1", f"{study_uid}.2", f"{study_uid}.3"
    files = []
    for i, path in enumerate(study[2]):
        # a CT series, a non-image instance (SR document), and an MR cine (without TriggerTime it would be
        # refused as not a cine: tests/conformance/test_eligibility.py)
        if i < 2:
            files.append(_copy_as(path, tmp_path / f"ct{i}.dcm", study_uid, ct, f"{ct}.{i + 1}", Modality="CT"))
        files.append(_copy_as(path, tmp_path / f"mr{i}.dcm", study_uid, cine, f"{cine}.{i + 1}"))
    files.append(_copy_as(study[2][0], tmp_path / "sr.dcm", study_uid, report, f"{report}.1", Modality="SR",
                          SOPClassUID="1.2.840.10008.5.1.4.1.1.88.11", PixelData=None))
    with Service(settings, dispatch="inline", min_free_bytes=1 << 20) as svc:
        for path in files:
            svc.store.put_file(path)
        svc.store.flush()
        job = wait_for(lambda: next(iter(svc.jobs.list(study_uid=study_uid, status="succeeded")), None),
                       what="the automatic job")
        assert [e.input_series_uid for e in job.series] == [cine] and job.source == "push"
        assert len(svc.jobs.list(study_uid=study_uid)) == 1  # ineligible series start no job
        ineligible = {e.series_uid: e.reason for e in wait_for(lambda: len(svc.routing.ineligible()) == 2
                                                               and svc.routing.ineligible(), what="routing")}
        assert "not MR" in ineligible[ct] and "not MR" in ineligible[report]
        assert svc.routing.get(cine).eligible
        # retention: nothing is old enough yet; an hour later both ineligible series are gone, the cine stays
        assert sweep_ineligible(svc.store, svc.routing, retention_hours=1) == 0
        assert sweep_ineligible(svc.store, svc.routing, retention_hours=1, now=time.time() + 3601) == 3
        assert svc.store.series(study_uid) == [cine]
        assert svc.routing.ineligible() == []
        with TestClient(create_app(svc)) as c:
            text = c.get("/metrics").text
            assert "cinesr_ineligible_series 0.0" in text


def test_redis_mode_keeps_jobs_in_redis(tmp_path: Path, study: tuple[str, str, list[Path]]) -> None:
    from cinesr.worker.queue.jobs import RedisJobStore

    settings = settings_for(tmp_path, broker_url="redis://127.0.0.1:6379/0", auto_process=False)
    try:
        svc = Service(settings, dispatch="inline", min_free_bytes=1 << 20).start()
        svc.jobs.ping()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"no Redis: {exc}")
    try:
        assert isinstance(svc.jobs, RedisJobStore)
        store_study(svc, study[2])
        with TestClient(create_app(svc)) as c:
            job_id = c.post(f"/studies/{study[0]}/superresolve", headers=AUTH, json={"steps": 3}).json()["job_id"]
            assert c.get("/readyz").json()["checks"]["broker"]["kind"] == "redis"
        assert wait_for(lambda: svc.jobs.get(job_id).status == "succeeded", what="job in Redis mode")
        assert RedisJobStore("redis://127.0.0.1:6379/0").get(job_id).study_uid == study[0]
    finally:
        job = svc.jobs.get(job_id)
        svc.jobs.redis.delete(f"cinesr:job:{job_id}", f"cinesr:jobkey:{job.key}")
        svc.jobs.redis.zrem("cinesr:jobs", job_id)
        svc.stop()


def test_concurrent_identical_requests_share_one_job(client: TestClient, service: Service,
                                                     study: tuple[str, str, list[Path]]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    store_study(service, study[2])
    body = {"method": "baseline", "steps": 7}
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: client.post(f"/studies/{study[0]}/superresolve", headers=AUTH,
                                                        json=body), range(6)))
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["job_id"] for r in responses}) == 1


def test_steps_are_checked_against_the_bundle(tmp_path: Path) -> None:
    """A bundle without a student serves its 15-step teacher only; one with a student (the shipped tiny bundle
    among them) also its distilled counts."""
    from cinesr.worker.errors import PermanentError
    from cinesr.worker.queue.process import check_steps, supported_steps

    from tests import models

    assert supported_steps(None) == (1, 2, 4, 15)
    check_steps(2, Settings(data_dir=tmp_path))
    plain = models.micro_bundle(tmp_path / "plain")
    assert supported_steps(plain) == (15,)
    with pytest.raises(PermanentError, match=r"steps=1 is not supported .*no distilled few-step student.*: use one "
                                             r"of 15$"):
        check_steps(1, Settings(data_dir=tmp_path, model_dir=plain))
    check_steps(15, Settings(data_dir=tmp_path, model_dir=plain))
    bundle = models.micro_student_bundle(tmp_path / "b", 0, steps=(1, 4))
    assert supported_steps(bundle) == (1, 4, 15)
    check_steps(4, Settings(data_dir=tmp_path, model_dir=bundle))
    with pytest.raises(PermanentError, match="use one of 1, 4, 15"):
        check_steps(2, Settings(data_dir=tmp_path, model_dir=bundle))
    # the STEPS setting is held to the same counts before any model loads
    from cinesr.worker.queue.process import make_method

    with pytest.raises(PermanentError, match="STEPS setting: steps=2 is not supported"):
        make_method("model", None, Settings(data_dir=tmp_path, model_dir=bundle, steps=2))
    with pytest.raises(ValueError, match="at least 2 draws"):
        Settings(data_dir=tmp_path, uncertainty_draws=1)


@pytest.mark.parametrize("body", [{"uncertainty": 1}, {"uncertainty": 33}, {"uncertainty": "yes"},
                                  {"uncertainty": -2}, {"method": "baseline", "uncertainty": 4},
                                  {"method": "model", "steps": 3}])
def test_unservable_model_options_are_422(client: TestClient, service: Service, study: tuple[str, str, list[Path]],
                                          body: dict) -> None:
    store_study(service, study[2])
    response = client.post(f"/studies/{study[0]}/superresolve", headers=AUTH, json=body)
    assert response.status_code == 422
    assert response.json()["detail"]


@pytest.mark.slow  # loads the learned model (~15-20 s on 2 busy cores)
def test_model_method_and_odd_matrix(client: TestClient, service: Service, tmp_path: Path,
                                     study: tuple[str, str, list[Path]]) -> None:
    """params.method selects the learned model; an odd matrix (62 x 66) comes out exactly 4x."""
    import numpy as np

    study_uid = "1.2.826.0.1.3680043.8.498.66"
    for i, path in enumerate(study[2]):
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array[1:63, :]
        pixels = np.pad(pixels, ((0, 0), (0, 2)), mode="edge")
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        target = _copy_dataset(ds, tmp_path / f"{i}.dcm", study_uid, f"{study_uid}.1", f"{study_uid}.1.{i + 1}")
        service.store.put_file(target)
    service.store.flush()
    response = client.post(f"/studies/{study_uid}/superresolve", headers=AUTH, json={"method": "model", "steps": 1})
    assert response.status_code == 202
    job_id = response.json()["job_id"]
    done = wait_for(lambda: (j := client.get(f"/jobs/{job_id}", headers=AUTH).json())["status"]
                    in ("succeeded", "failed") and j, 120, "the model job")
    assert done["status"] == "succeeded", done
    out = Path(service.settings.data_dir) / "outputs" / job_id / done["series"][0]["output_series_uid"]
    ds = pydicom.dcmread(sorted(out.glob("*.dcm"))[0], stop_before_pixels=True)
    assert (ds.Rows, ds.Columns) == (62 * 4, 66 * 4)
    assert "by model" in ds.DerivationDescription


def _copy_dataset(ds: pydicom.Dataset, target: Path, study_uid: str, series_uid: str, sop_uid: str) -> Path:
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.save_as(target)
    return target
