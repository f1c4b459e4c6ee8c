"""Results over REST without a PACS: the job lists its derived series (UIDs, paths, links), the series
downloads as a streamed zip, and a preview PNG strip shows it (checked in headless Chromium where present)."""

from __future__ import annotations

import io
import shutil
import subprocess
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from cinesr.service.app import Service
from cinesr.service.gateway import create_app
from fastapi.testclient import TestClient
from PIL import Image

from tests.orthanc import write_lowres_study
from tests.service.test_gateway import AUTH, TOKEN, settings_for
from tests.service.test_stow import live_server
from tests.waiting import wait_for


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, dict]]:
    study_uid, _, files = write_lowres_study(tmp_path_factory.mktemp("phantom"), seed=8)
    svc = Service(settings_for(tmp_path_factory.mktemp("data"), auto_process=False), dispatch="inline",
                  min_free_bytes=1 << 20)
    with svc, TestClient(create_app(svc)) as c:
        for path in files:
            svc.store.put_file(path)
        svc.store.flush()
        body = {"method": "baseline"}
        job_id = c.post(f"/studies/{study_uid}/superresolve", headers=AUTH, json=body).json()["job_id"]
        job = wait_for(lambda: (j := c.get(f"/jobs/{job_id}", headers=AUTH).json())["status"]
                       in ("succeeded", "failed") and j, 60, "the job")
        assert job["status"] == "succeeded", job
        yield svc, job


@pytest.fixture(scope="module")
def client(finished: tuple[Service, dict]) -> Iterator[TestClient]:
    with TestClient(create_app(finished[0])) as c:
        yield c


def test_rest_accepts_method_auto(finished: tuple[Service, dict], client: TestClient) -> None:
    """`auto`, the README's default everywhere, is accepted over REST too (it was 422)."""
    svc, job = finished
    response = client.post(f"/studies/{job['study_uid']}/superresolve", headers=AUTH, json={"method": "auto"})
    assert response.status_code == 202, response.text
    assert response.json()["params"]["method"] == "auto"
    assert client.delete(response.headers["location"], headers=AUTH).status_code in (202, 409)  # not needed here
    assert client.post(f"/studies/{job['study_uid']}/superresolve", headers=AUTH,
                       json={"method": "magic"}).status_code == 422


def test_the_job_lists_its_output_series(finished: tuple[Service, dict]) -> None:
    svc, job = finished
    (entry,) = job["series"]
    uid = entry["output_series_uid"]
    assert entry["instances_sent"] == 0  # no PACS: the results stay here, and the job says where
    assert entry["output_path"] == str(Path(svc.settings.data_dir) / "outputs" / job["job_id"] / uid)
    assert len(list(Path(entry["output_path"]).glob("*.dcm"))) == entry["instances_total"] == 64
    assert entry["download"] == f"/jobs/{job['job_id']}/series/{uid}"
    assert entry["preview"] == f"/jobs/{job['job_id']}/series/{uid}/preview.png"


def test_download_streams_a_zip_of_the_derived_series(finished: tuple[Service, dict], client: TestClient) -> None:
    svc, job = finished
    (entry,) = job["series"]
    uid = entry["output_series_uid"]
    with client.stream("GET", entry["download"], headers=AUTH) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/zip"
        assert f'filename="{uid}.zip"' in response.headers["content-disposition"]
        assert "content-length" not in response.headers  # streamed, not built in memory first
        body = b"".join(response.iter_bytes())
    archive = zipfile.ZipFile(io.BytesIO(body))
    assert archive.testzip() is None
    names = sorted(archive.namelist())
    folder = Path(entry["output_path"])
    assert names == sorted(f"{uid}/{p.name}" for p in folder.glob("*.dcm"))
    first = names[0]
    assert archive.read(first) == (folder / Path(first).name).read_bytes()
    ds = pydicom.dcmread(io.BytesIO(archive.read(first)))
    assert ds.SeriesInstanceUID == uid and ds.Rows == 256
    # the input series UID finds the same derived series
    by_input = client.get(f"/jobs/{job['job_id']}/series/{entry['input_series_uid']}", headers=AUTH)
    assert by_input.status_code == 200 and by_input.content == body


def test_download_errors(finished: tuple[Service, dict], client: TestClient) -> None:
    _, job = finished
    uid = job["series"][0]["output_series_uid"]
    assert client.get(f"/jobs/{job['job_id']}/series/{uid}").status_code == 401
    missing = client.get(f"/jobs/{job['job_id']}/series/1.2.3", headers=AUTH)
    assert missing.status_code == 404 and "no series 1.2.3" in missing.json()["detail"]
    assert client.get(f"/jobs/{'0' * 32}/series/{uid}", headers=AUTH).status_code == 404
    assert client.get(f"/jobs/{job['job_id']}/series/1.2.x", headers=AUTH).status_code == 422


def test_preview_is_a_png_strip_of_the_middle_slice(finished: tuple[Service, dict], client: TestClient) -> None:
    _, job = finished
    (entry,) = job["series"]
    response = client.get(entry["preview"], headers=AUTH)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.mode == "L" and image.size == (8 * 256 + 7 * 2, 256)  # 8 times across the cycle, 256 px each
    pixels = np.asarray(image)
    panels = [pixels[:, k * 258:k * 258 + 256] for k in range(8)]
    assert all(p.std() > 10 for p in panels)  # images, not blank panels
    assert np.abs(panels[0].astype(int) - panels[4].astype(int)).mean() > 0.5  # the heart moves between times
    # the derived series folder still holds DICOM only (the preview is cached beside it)
    assert {p.suffix for p in Path(entry["output_path"]).iterdir()} == {".dcm"}


def _chromium() -> str | None:
    names = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
    return next((shutil.which(n) for n in names if shutil.which(n)), None)


@pytest.mark.slow
def test_preview_opens_in_headless_chromium(finished: tuple[Service, dict], tmp_path: Path) -> None:
    """The acceptance check as a person would do it: a browser opens the preview URL and shows the picture.
    The URL needs the bearer token, so the page is a tiny HTML file that fetches it with the token."""
    browser = _chromium()
    if browser is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium-headless-shell)")
    svc, job = finished
    (entry,) = job["series"]
    with live_server(svc) as url:
        page = tmp_path / "preview.html"
        page.write_text(f"""<html><body style="margin:0;background:#fff">
<img id="p" style="display:block"><script>
fetch("{url}{entry['preview']}", {{headers: {{Authorization: "Bearer {TOKEN}"}}}})
  .then(r => r.blob()).then(b => {{ document.getElementById("p").src = URL.createObjectURL(b); }});
</script></body></html>""")
        shot = tmp_path / "shot.png"
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-web-security",
                        "--virtual-time-budget=5000", f"--screenshot={shot}", "--window-size=2100,300",
                        page.as_uri()], capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "Chromium wrote no screenshot"
    grey = np.asarray(Image.open(shot).convert("L"))
    shown = grey[:256, :2060]
    # the page background is white; the preview's dark background and grey heart fill the top strip
    assert (shown < 50).mean() > 0.3 and shown.std() > 20
    shutil.copy(shot, Path(svc.settings.data_dir) / "chromium-preview.png")
