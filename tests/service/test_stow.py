"""STOW-RS in (POST /dicomweb/studies) against a real in-process service: the store response, durability and
routing shared with C-STORE, and every kind of bad body answered with a 4xx and its reason while the
service keeps serving. Orthanc as the peer is in tests/service/test_dicomweb_e2e.py."""

from __future__ import annotations

import io
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
import uvicorn
from cinesr.service.app import Service
from cinesr.service.gateway import create_app
from cinesr.worker.network.multipart import encode_related
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from tests.orthanc import free_port, write_lowres_study
from tests.service.test_gateway import AUTH, TOKEN, settings_for
from tests.waiting import wait_for

BOUNDARY = "stow-test-boundary"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'
MAX_PART = 200_000
MAX_REQUEST = 2_000_000


def small_instance(study_uid: str | None = None, sop_class: str = MRImageStorage) -> tuple[bytes, str, str]:
    """A one-frame 16x16 MR instance as Part 10 bytes (a series of its own: never a cine); (bytes, study, sop)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    sop = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop_class, sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID = "MR", "Stow^Test", "STOW1"
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.arange(256, dtype=np.uint16).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue(), str(ds.StudyInstanceUID), sop


def post(client: TestClient, parts: list[bytes] | bytes, path: str = "/dicomweb/studies",
         content_type: str = STOW_TYPE, headers: dict[str, str] | None = None):  # noqa: ANN201
    body = parts if isinstance(parts, bytes) else encode_related(parts, BOUNDARY)
    return client.post(path, content=body, headers={**AUTH, "Content-Type": content_type, **(headers or {})})


def referenced(response) -> list[str]:  # noqa: ANN001
    return [i["00081155"]["Value"][0] for i in response.json()["00081199"].get("Value", [])]


def failed(response) -> list[dict]:  # noqa: ANN001
    return [{"uid": (i.get("00081155", {}).get("Value") or [""])[0], "reason": i["00081197"]["Value"][0],
             "comment": i["00000902"]["Value"][0]} for i in response.json().get("00081198", {}).get("Value", [])]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    settings = settings_for(tmp_path_factory.mktemp("data"), auto_process=True, series_stable_seconds=0.3,
                            stow_max_part_bytes=MAX_PART, stow_max_request_bytes=MAX_REQUEST)
    with Service(settings, dispatch="inline", min_free_bytes=1 << 20) as svc:
        yield svc


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[TestClient]:
    with TestClient(create_app(service)) as c:
        yield c


@contextmanager
def live_server(service: Service, port: int | None = None) -> Iterator[str]:
    """The gateway on a real HTTP server (uvicorn, in a thread, on a free port unless given): its URL."""
    config = uvicorn.Config(create_app(service), host="127.0.0.1", port=port or free_port(), log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 10, what="uvicorn to start")
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(10)


def stored_bytes(service: Service, sop: str) -> bytes:
    service.store.flush()
    path = service.store.instance_path(sop)
    assert path is not None, f"{sop} not stored"
    return path.read_bytes()


def dataset_bytes(part10: bytes) -> bytes:
    group_length = struct.unpack_from("<I", part10, 140)[0]
    return part10[144 + group_length:]


def test_stowed_instances_are_stored_durably_as_sent(client: TestClient, service: Service) -> None:
    instances = [small_instance() for _ in range(3)]
    response = post(client, [data for data, _, _ in instances])
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    assert referenced(response) == [sop for _, _, sop in instances]
    assert "00081198" not in response.json()
    for data, _, sop in instances:  # the dataset bytes exactly as sent, under a file meta of ours
        kept = stored_bytes(service, sop)
        assert dataset_bytes(kept) == dataset_bytes(data)
        assert pydicom.dcmread(io.BytesIO(kept)).SOPInstanceUID == sop
    # the same instances again: duplicates are success, as over C-STORE
    again = post(client, [data for data, _, _ in instances])
    assert again.status_code == 200 and referenced(again) == [sop for _, _, sop in instances]


def test_stowed_cine_is_processed_like_a_pushed_one(client: TestClient, service: Service, tmp_path: Path) -> None:
    study_uid, series_uid, files = write_lowres_study(tmp_path, seed=5)
    response = post(client, [p.read_bytes() for p in files], path=f"/dicomweb/studies/{study_uid}")
    assert response.status_code == 200, response.text
    assert len(referenced(response)) == len(files) == 8

    def finished() -> dict | None:
        jobs = client.get("/jobs", headers=AUTH, params={"study_uid": study_uid}).json()["jobs"]
        return jobs[0] if jobs and jobs[0]["status"] in ("succeeded", "failed") else None

    job = wait_for(finished, 120, what="the STOW-RS series to be processed")
    assert job["status"] == "succeeded", job
    assert job["source"] == "push"
    (entry,) = job["series"]
    assert entry["input_series_uid"] == series_uid and entry["instances_total"] == 64
    out = Path(service.settings.data_dir) / "outputs" / job["job_id"] / entry["output_series_uid"]
    assert len(list(out.glob("*.dcm"))) == 64


def test_mixed_request_stores_the_good_parts_and_lists_the_bad(client: TestClient, service: Service) -> None:
    good1, _, sop1 = small_instance()
    good2, _, sop2 = small_instance()
    truncated, _, sop_cut = small_instance()
    no_uid, _, _ = small_instance()
    ds = pydicom.dcmread(io.BytesIO(no_uid))
    del ds.SeriesInstanceUID
    buffer = io.BytesIO()
    ds.save_as(buffer)
    response = post(client, [good1, b"this is not DICOM at all", truncated[:-100], good2, buffer.getvalue()])
    assert response.status_code == 202, response.text
    assert referenced(response) == [sop1, sop2]
    failures = failed(response)
    assert [f["comment"].split(":")[0] for f in failures] == ["part 2", "part 3", "part 5"]
    assert "not a DICOM Part 10 file" in failures[0]["comment"] and failures[0]["reason"] == 0xC210
    assert "truncated" in failures[1]["comment"] and failures[1]["reason"] == 0xC210
    assert "SeriesInstanceUID" in failures[2]["comment"] and failures[2]["reason"] == 0xA900
    assert service.store.has_instance(sop1) and service.store.has_instance(sop2)
    assert not service.store.has_instance(sop_cut)


@pytest.mark.parametrize(("content_type", "status", "words"), [
    ("application/dicom", 415, "multipart/related"),
    ("application/json", 415, "multipart/related"),
    ('multipart/related; type="application/dicom+json"; boundary=' + BOUNDARY, 415, "application/dicom"),
    ('multipart/related; type="application/octet-stream"; boundary=' + BOUNDARY, 415, "application/dicom"),
    ('multipart/related; type="application/dicom"', 400, "boundary"),
])
def test_wrong_media_type_is_refused_with_the_reason(client: TestClient, content_type: str, status: int,
                                                     words: str) -> None:
    data, _, sop = small_instance()
    response = post(client, [data], content_type=content_type)
    assert response.status_code == status
    assert words in response.json()["detail"]


def test_bodies_that_are_not_multipart_or_hold_nothing_are_400(client: TestClient) -> None:
    response = post(client, b"not a multipart body at all")
    assert response.status_code == 400 and "no multipart boundary" in response.json()["detail"]
    response = post(client, f"--{BOUNDARY}--\r\n".encode())
    assert response.status_code == 400 and "no parts" in response.json()["detail"]


@pytest.mark.parametrize("kind", ["truncated", "not-dicom", "other-class", "wrong-part-type"])
def test_a_single_bad_part_is_409_with_the_reason(client: TestClient, kind: str) -> None:
    data, _, sop = small_instance(sop_class="1.2.840.10008.5.1.4.1.2.2.1" if kind == "other-class" else MRImageStorage)
    if kind == "truncated":  # the body ends inside the part (no closing boundary)
        body = encode_related([data], BOUNDARY)[:len(data) // 2]
    elif kind == "not-dicom":
        body = encode_related([b"\0" * 128 + b"DICX" + b"junk" * 100], BOUNDARY)
    elif kind == "wrong-part-type":
        body = encode_related([data], BOUNDARY, content_type="application/pdf")
    else:
        body = encode_related([data], BOUNDARY)
    response = post(client, body)
    assert response.status_code == 409, response.text
    assert referenced(response) == []
    (failure,) = failed(response)
    expected = {"truncated": (0xC210, "truncated part"), "not-dicom": (0xC210, "not a DICOM Part 10 file"),
                "other-class": (0x0122, "not a storage SOP class"), "wrong-part-type": (0xC210, "application/pdf")}
    assert failure["reason"] == expected[kind][0]
    assert expected[kind][1] in failure["comment"]


def test_instances_of_another_study_fail_on_the_study_path(client: TestClient, service: Service) -> None:
    study_uid = generate_uid()
    mine, _, sop_mine = small_instance(study_uid)
    other, other_study, sop_other = small_instance()
    response = post(client, [mine, other], path=f"/dicomweb/studies/{study_uid}")
    assert response.status_code == 202
    assert referenced(response) == [sop_mine]
    (failure,) = failed(response)
    assert failure["uid"] == sop_other and failure["reason"] == 0xC409 and "another study" in failure["comment"]
    assert not service.store.has_instance(sop_other)
    assert post(client, [mine], path="/dicomweb/studies/1.2.abc").status_code == 422


def test_size_limits(client: TestClient, service: Service) -> None:
    data, _, sop = small_instance()
    # a declared length over the limit: refused before the body is read
    body = encode_related([data] + [b"x" * 100_000] * 21, BOUNDARY)
    assert len(body) > MAX_REQUEST
    response = post(client, body)
    assert response.status_code == 413 and "limit of 2000000 bytes" in response.json()["detail"]
    assert not service.store.has_instance(sop)

    # no length declared (chunked, over a real HTTP server): refused once the stream passes the limit; the
    # instance that came before is kept
    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 65536):
            yield body[i:i + 65536]

    with live_server(service) as url:
        response = httpx.post(f"{url}/dicomweb/studies", content=chunks(), timeout=30,
                              headers={**AUTH, "Content-Type": STOW_TYPE})
    assert response.status_code == 413, response.text
    assert "1 instances before it were stored" in response.json()["detail"]
    assert service.store.has_instance(sop)

    # one part over the part limit fails; the others are stored
    good, _, sop_good = small_instance()
    response = post(client, [good, b"\0" * (MAX_PART + 1)])
    assert response.status_code == 202
    assert referenced(response) == [sop_good]
    (failure,) = failed(response)
    assert failure["reason"] == 0xA700 and f"limit of {MAX_PART} bytes" in failure["comment"]


def test_stow_needs_the_bearer_token_before_the_body(client: TestClient, service: Service) -> None:
    data, _, sop = small_instance()
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"}):
        response = client.post("/dicomweb/studies", content=encode_related([data], BOUNDARY),
                               headers={"Content-Type": STOW_TYPE, **headers})
        assert response.status_code == 401
    assert not service.store.has_instance(sop)


def test_the_service_keeps_serving_after_bad_bodies(client: TestClient) -> None:
    for body in (b"", b"\r\n--x", b"--" + BOUNDARY.encode() + b"\r\n" + b"H: v\r\n" * 5000, b"\xff" * 1000):
        assert 400 <= post(client, body).status_code < 500
    data, _, sop = small_instance()
    response = post(client, [data])
    assert response.status_code == 200 and referenced(response) == [sop]
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json()["ready"] is True


def test_openapi_documents_stow(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path in ("/dicomweb/studies", "/dicomweb/studies/{study_uid}"):
        operation = spec["paths"][path]["post"]
        assert 'multipart/related; type="application/dicom"' in operation["requestBody"]["content"]
        assert {"200", "202", "409", "400", "401", "413", "415"} <= set(operation["responses"])
        assert operation["security"] == [{"HTTPBearer": []}]


def test_duplicate_with_other_content_is_a_warning(client: TestClient, service: Service) -> None:
    """Issue 14 #9 over STOW-RS: the same SOPInstanceUID with other pixels is referenced with WarningReason
    0xB006 (202); the first copy is kept. The same bytes again are a plain success."""
    data, _study, sop = small_instance()
    assert post(client, [data]).status_code == 200
    assert post(client, [data]).status_code == 200
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PixelData = bytes(reversed(ds.PixelData))
    changed = io.BytesIO()
    ds.save_as(changed, enforce_file_format=True)
    response = post(client, [changed.getvalue()])
    assert response.status_code == 202
    [item] = response.json()["00081199"]["Value"]
    assert item["00081155"]["Value"] == [sop] and item["00081196"]["Value"] == [0xB006]
    service.store.flush(timeout=10)
    kept = service.store.instance_path(sop).read_bytes()
    assert kept.endswith(bytes(pydicom.dcmread(io.BytesIO(data)).PixelData))


def test_undecodable_pixel_data_fails_with_c212(client: TestClient) -> None:
    data, _study, sop = small_instance()
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PixelData = ds.PixelData[:100]
    short = io.BytesIO()
    ds.save_as(short, enforce_file_format=True)
    response = post(client, [short.getvalue()])
    assert response.status_code == 409
    assert failed(response) == [{"uid": sop, "reason": 0xC212,
                                 "comment": "part 1: Pixel Data has 100 bytes, its description needs 512"}]
