"""Routing limits (ROUTING_* settings): a series outside them is recorded ineligible with the reason and not
queued. Real parts: a phantom cine pushed by dcmtk storescu to the real listener of a running Service."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from cinesr.service.app import Service
from cinesr.service.gateway import create_app
from cinesr.service.routing import RoutingLimits, check_series
from cinesr.service.settings import Settings
from fastapi.testclient import TestClient
from pydantic import ValidationError

from tests.orthanc import storescu, write_lowres_study
from tests.service.conftest import require_dcmtk
from tests.service.test_gateway import AUTH, settings_for
from tests.waiting import wait_for


@pytest.fixture(scope="module")
def hires_cine(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, list[Path]]:
    """An already high-resolution cine: the phantom's 256x256 ground truth (2 slices x 32 frames)."""
    from cinesr.model.acquisition import write_phantom
    from cinesr.model.phantom import make_study

    (written,) = write_phantom(make_study(5, slices=2, frames=32), tmp_path_factory.mktemp("hires"), seed=5,
                               truth=True, lowres=False)
    return written.study_uid, written.series_uid, list(written.files)


@pytest.fixture(scope="module")
def lowres(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, list[Path]]:
    return write_lowres_study(tmp_path_factory.mktemp("lowres"), seed=4)


def test_defaults_make_sense_for_cine_sr() -> None:
    settings = Settings()
    assert settings.routing_max_matrix == 192  # a 64-256 px acquisition grid passes, 256 is refused
    assert settings.routing_max_frames >= 50 and settings.routing_max_slices >= 20
    assert settings.routing_include_pattern == settings.routing_exclude_pattern == ""


def test_a_bad_pattern_is_a_setting_error() -> None:
    with pytest.raises(ValidationError, match="not a regular expression"):
        Settings(routing_exclude_pattern="(unclosed")


def test_pushed_256_cine_is_ineligible_within_a_second_of_completion(
        tmp_path: Path, hires_cine: tuple[str, str, list[Path]]) -> None:
    require_dcmtk()
    study_uid, series_uid, files = hires_cine
    stable = 0.3
    settings = settings_for(tmp_path / "data", auto_process=True, series_stable_seconds=stable,
                            dicom_host="127.0.0.1")  # default limits
    with Service(settings, dispatch="inline", min_free_bytes=1 << 20) as svc:
        storescu(svc.listener.port, files)
        sent = time.monotonic()  # storescu returns once the last instance is acknowledged
        decided = wait_for(lambda: svc.routing.get(series_uid), 10, what="the routing decision")
        elapsed = time.monotonic() - sent
        assert not decided.eligible
        assert decided.instances == len(files) == 64
        assert "matrix 256x256" in decided.reason and "ROUTING_MAX_MATRIX 192" in decided.reason
        # completion is `stable` s after the last instance; the decision follows within a second of it
        assert elapsed - stable < 1.0, elapsed
        time.sleep(0.5)
        assert svc.jobs.list(study_uid=study_uid) == []  # not queued
        assert [e.series_uid for e in svc.routing.ineligible()] == [series_uid]


def _check(lowres: tuple[str, str, list[Path]], root: Path, **limits: Any) -> Any:
    from tests.service.conftest import new_store

    store = new_store(root)
    try:
        for path in lowres[2]:
            store.put_file(path)
        store.flush()
        return check_series(store, lowres[0], lowres[1], RoutingLimits(**limits))
    finally:
        store.close()


def test_each_limit_refuses_with_its_reason(tmp_path: Path, lowres: tuple[str, str, list[Path]]) -> None:
    # the phantom acquisition: 2 slices x 4 frames of 64x64
    assert _check(lowres, tmp_path / "a", max_matrix=64, max_frames=4, max_slices=2).eligible
    result = _check(lowres, tmp_path / "b", max_matrix=63)
    assert not result.eligible and "matrix 64x64" in result.reason
    result = _check(lowres, tmp_path / "c", max_frames=3, max_slices=40)
    assert not result.eligible and result.reason == "4 frames per slice are more than ROUTING_MAX_FRAMES 3"
    result = _check(lowres, tmp_path / "d", max_slices=1, max_frames=128)
    assert not result.eligible and result.reason == "2 slices are more than ROUTING_MAX_SLICES 1"
    description = str(pydicom.dcmread(lowres[2][0], stop_before_pixels=True).get("SeriesDescription", ""))
    assert description, "the phantom series has a SeriesDescription"
    word = description.split()[0]
    assert _check(lowres, tmp_path / "e", include=word.lower()).eligible  # case-insensitive search
    result = _check(lowres, tmp_path / "f", include="^localizer$")
    assert not result.eligible and "ROUTING_INCLUDE_PATTERN" in result.reason
    result = _check(lowres, tmp_path / "g", exclude=word.upper())
    assert not result.eligible and "ROUTING_EXCLUDE_PATTERN" in result.reason and description in result.reason


def test_a_rest_request_outside_the_limits_fails_with_the_reason(
        tmp_path: Path, lowres: tuple[str, str, list[Path]]) -> None:
    settings = settings_for(tmp_path / "data", auto_process=False, routing_max_slices=1)
    with Service(settings, dispatch="inline", min_free_bytes=1 << 20) as svc, TestClient(create_app(svc)) as c:
        for path in lowres[2]:
            svc.store.put_file(path)
        svc.store.flush()
        job_id = c.post(f"/studies/{lowres[0]}/superresolve", headers=AUTH).json()["job_id"]
        done = wait_for(lambda: (j := c.get(f"/jobs/{job_id}", headers=AUTH).json())["status"] == "failed" and j,
                        what="the job to fail")
        assert "ROUTING_MAX_SLICES 1" in done["error"]
        assert not svc.routing.get(lowres[1]).eligible
