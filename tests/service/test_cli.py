"""The command line as a user runs it: real processes, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from cinesr.model.cine import read_series

CLI = [sys.executable, "-m", "cinesr.service.cli"]


def cinesr(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_phantom_then_baseline_superresolve_acceptance(tmp_path: Path) -> None:
    made = cinesr("phantom", str(tmp_path / "in"), "--slices", "2", "--degraded", "--seed", "5")
    assert made.returncode == 0, made.stderr
    [patient] = list((tmp_path / "in").iterdir())
    run = cinesr("superresolve", str(patient / "lowres"), "-o", str(tmp_path / "out"), "--method", "baseline",
                 "--json")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    [item] = summary["series"]
    assert item["output_shape"] == [2, 32, 256, 256] and item["instances"] == 64
    [out] = read_series(item["folder"])
    [low] = read_series(patient / "lowres")
    assert out.shape == (2, 32, 256, 256) and out.study_uid == low.study_uid
    assert pydicom.dcmread(out.files[0]).PatientID == pydicom.dcmread(low.files[0]).PatientID
    again = json.loads(cinesr("superresolve", str(patient / "lowres"), "-o", str(tmp_path / "out2"),
                              "--method", "baseline", "--json").stdout)
    assert again["series"][0]["output_series_uid"] == item["output_series_uid"]
    uids = sorted(pydicom.dcmread(p).SOPInstanceUID for p in Path(item["folder"]).iterdir())
    uids2 = sorted(pydicom.dcmread(p).SOPInstanceUID for p in Path(again["series"][0]["folder"]).iterdir())
    assert uids == uids2


@pytest.mark.parametrize("case", ["missing", "not-dicom", "not-cine", "truncated"])
def test_bad_input_one_line_nonzero_nothing_written(case: str, tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    src = tmp_path / "in"
    src.mkdir()
    if case == "not-dicom":
        (src / "x.dcm").write_bytes(b"\x00" * 300)
    elif case == "not-cine":
        (src / "a.dcm").write_bytes(Path(get_testdata_file("MR_small.dcm")).read_bytes())
    elif case == "truncated":
        (src / "t.dcm").write_bytes(Path(get_testdata_file("MR_truncated.dcm")).read_bytes())
    target = src if case != "missing" else tmp_path / "nope"
    out = tmp_path / "out"
    run = cinesr("superresolve", str(target), "-o", str(out))
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cinesr: error:"), run.stderr
    assert "Traceback" not in run.stderr
    assert not out.exists()


def test_partial_failure_removes_everything(tmp_path: Path, lowres_study: Path) -> None:
    """One good series and one non-cine series: validation fails before anything is written."""
    from pydicom.data import get_testdata_file

    src = tmp_path / "in"
    (src / "good").mkdir(parents=True)
    for f in (lowres_study / "lowres").iterdir():
        (src / "good" / f.name).write_bytes(f.read_bytes())
    (src / "bad.dcm").write_bytes(Path(get_testdata_file("MR_small.dcm")).read_bytes())
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("existing")
    run = cinesr("superresolve", str(src), "-o", str(out))
    assert run.returncode == 2 and "not cine" in run.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_help_everywhere() -> None:
    assert cinesr("--help").returncode == 0
    for command in ("superresolve", "phantom"):
        run = cinesr(command, "--help")
        assert run.returncode == 0 and "Usage" in run.stdout


def test_usage_errors_are_one_line() -> None:
    run = cinesr("superresolve")
    assert run.returncode == 2 and "Traceback" not in run.stderr
    run = cinesr("phantom", "/tmp/x", "--generator", "nope")
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0
    assert "'nope' is not one of 'sax', 'sax-fourier', 'lax'," in run.stderr


def test_settings_from_environment_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cinesr.service.settings import load_settings

    cfg = tmp_path / "cinesr.yaml"
    cfg.write_text("AE_TITLE: FROMFILE\nDICOM_PORT: 1104\nALLOWED_CALLING_AETS: A,B\n")
    monkeypatch.setenv("CINESR_DICOM_PORT", "2204")
    settings = load_settings(cfg)
    assert settings.ae_title == "FROMFILE" and settings.dicom_port == 2204
    assert settings.allowed_calling_aets == ["A", "B"]
    monkeypatch.setenv("CINESR_API_TOKENS", "t1, t2")
    assert load_settings().api_tokens == ["t1", "t2"]


def test_evaluate_command_reports_per_source(tmp_path: Path) -> None:
    """`cinesr evaluate` with two sources and two acquisitions: a table per source, the files, and a clear
    error for an acquisition it does not know."""
    from tests import models

    bundle = models.micro_bundle(tmp_path / "micro", 0, {"steps": 2, "overlap": 4, "stride": 3})
    args = ["evaluate", "--data", "phantom:3", "--data", "phantom:3:deadleaves", "--model", str(bundle),
            "--protocol", "sequence", "--acquisition", "area", "--acquisition", "kspace", "-o", str(tmp_path / "ev"),
            "--phantom-slices", "1", "--phantom-frames", "16", "--phantom-size", "64"]
    run = cinesr(*args, timeout=900)
    assert run.returncode == 0, run.stderr
    report = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert {(r["source"], r["acquisition"]) for r in report["rows"]} == {
        (s, a) for s in ("sax", "deadleaves") for a in ("area", "kspace")}
    assert all("temporal" in r["model"] for r in report["rows"])
    assert "| deadleaves | sequence | k-space |" in run.stdout
    bad = cinesr("evaluate", "--data", "phantom:3", "--model", str(bundle), "--acquisition", "jpeg", "-o",
                 str(tmp_path / "bad"))
    assert bad.returncode == 2 and "unknown acquisition 'jpeg'" in bad.stderr and bad.stderr.count("\n") == 1


def test_superresolve_with_an_uncertainty_series(tmp_path: Path) -> None:
    """--uncertainty N: a second derived series beside the output (same frames, its own UIDs and description);
    mistakes end in one line and exit code 2, with nothing written."""
    from tests import models

    bundle = models.micro_bundle(tmp_path / "micro", 0, {"steps": 2, "overlap": 4, "stride": 3})
    made = cinesr("phantom", str(tmp_path / "in"), "--slices", "1", "--frames", "16", "--size", "64", "--degraded",
                  "--no-truth", "--seed", "3")
    assert made.returncode == 0, made.stderr
    [patient] = list((tmp_path / "in").iterdir())
    args = ["superresolve", str(patient / "lowres"), "--method", "model", "--model", str(bundle), "--json"]
    run = cinesr(*args, "-o", str(tmp_path / "out"), "--uncertainty", "3")
    assert run.returncode == 0, run.stderr
    [item] = json.loads(run.stdout)["series"]
    assert item["uncertainty_draws"] == 3 and item["uncertainty_series_uid"] != item["output_series_uid"]
    [out], [spread] = read_series(item["folder"]), read_series(item["uncertainty_folder"])
    assert out.shape == spread.shape == (1, 16, 64, 64)
    assert spread.slices[0].frames.min() >= 0 and spread.slices[0].frames.max() > 0
    assert pydicom.dcmread(spread.files[0]).SeriesDescription.endswith("CineSR uncertainty")
    plain = json.loads(cinesr(*args, "-o", str(tmp_path / "plain")).stdout)["series"][0]
    assert "uncertainty_folder" not in plain and plain["output_series_uid"] == item["output_series_uid"]
    for bad, reason in ((["--uncertainty", "1"], "at least 2 draws"),
                        (["--uncertainty", "2", "--method", "baseline"], "needs the model method")):
        failed = cinesr(*args, "-o", str(tmp_path / "bad"), *bad)
        assert failed.returncode == 2 and reason in failed.stderr and failed.stderr.count("\n") == 1, failed.stderr
        assert not (tmp_path / "bad").exists()
