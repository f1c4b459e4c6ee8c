"""The fidelity figure of a processed series: in the job record, in /metrics, in `--json`; below the floor
the series is flagged with a job warning and an ImageComments note on every output instance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from cinesr.service.settings import Settings
from cinesr.worker.queue.jobs import open_job_store
from cinesr.worker.queue.process import outputs_dir, process_series

from tests import models
from tests.worker.celery_helpers import stage_series


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Untrained micro networks (16x16 tiles) with quick shipped options: fast, and a fidelity figure all the same."""
    return models.micro_bundle(tmp_path_factory.mktemp("m") / "micro", 3, {"steps": 2, "overlap": 4, "stride": 3})


def _processed(tmp_path: Path, model: Path, floor: float) -> tuple[dict, list[Path], Settings]:
    settings = Settings(data_dir=tmp_path / "data", model_dir=model, backend="torch", default_method="model",
                        fidelity_floor_db=floor)
    staged = stage_series(settings.data_dir, 31, slices=1, frames=16, size=64)
    store = open_job_store(settings)
    job, _ = store.create_or_get(staged.study_uid, [staged.series_uid], {"method": "model"})
    process_series(job.job_id, staged.series_uid, settings)
    entry = store.get(job.job_id).entry(staged.series_uid)
    files = sorted((outputs_dir(settings, job.job_id) / entry.output_series_uid).glob("*.dcm"))
    return entry.model_dump(), files, settings


def test_job_record_and_metrics_carry_the_fidelity(tmp_path: Path, micro_model: Path) -> None:
    from cinesr.service.metrics import ServiceCollector, make_registry, render

    entry, files, settings = _processed(tmp_path / "ok", micro_model, floor=1.0)
    assert entry["status"] == "processed" and entry["consistency"] in ("both", "area", "kspace")
    assert entry["fidelity_db"] > 30 and entry["warnings"] == []  # data consistency: the acquisition comes back
    assert "ImageComments" not in pydicom.dcmread(files[0], stop_before_pixels=True)
    text = render(make_registry(ServiceCollector(open_job_store(settings), lambda: None))).decode()
    assert "cinesr_series_fidelity_db_count 1.0" in text
    assert f"cinesr_series_fidelity_db_sum {entry['fidelity_db']}" in text
    assert "cinesr_low_fidelity_series 0.0" in text


def test_below_the_floor_the_series_is_flagged(tmp_path: Path, micro_model: Path) -> None:
    entry, files, _ = _processed(tmp_path / "low", micro_model, floor=200.0)  # no output reaches 200 dB
    assert entry["status"] == "processed" and len(entry["warnings"]) == 1
    assert "low fidelity" in entry["warnings"][0] and f"{entry['fidelity_db']:.1f} dB" in entry["warnings"][0]
    for path in files[:3]:
        assert "low fidelity" in str(pydicom.dcmread(path, stop_before_pixels=True).ImageComments)


def test_superresolve_json_reports_and_flags(tmp_path: Path, micro_model: Path) -> None:
    made = subprocess.run([sys.executable, "-m", "cinesr.service.cli", "phantom", str(tmp_path / "in"), "--slices",
                           "1", "--frames", "16", "--size", "64", "--degraded", "--no-truth"],
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    [patient] = list((tmp_path / "in").iterdir())
    for floor, flagged in (("1", False), ("200", True)):
        run = subprocess.run([sys.executable, "-m", "cinesr.service.cli", "superresolve", str(patient / "lowres"),
                              "-o", str(tmp_path / f"out{floor}"), "--model", str(micro_model), "--backend", "torch",
                              "--json"], capture_output=True, text=True, timeout=600,
                             env={**os.environ, "CINESR_FIDELITY_FLOOR_DB": floor})
        assert run.returncode == 0, run.stderr
        [item] = json.loads(run.stdout)["series"]
        assert item["fidelity_db"] > 30 and item["fidelity_flagged"] is flagged
        assert ("low fidelity" in run.stderr) is flagged
