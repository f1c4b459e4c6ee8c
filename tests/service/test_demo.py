"""`cinesr demo` end to end: the real command, a real `cinesr serve` subprocess, C-STORE in and out."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from cinesr.model.cine import read_series
from cinesr.service.cli import CLI
from cinesr.service.demo import DemoPacs, push_series, short_method
from cinesr.service.demo_report import comparison_picture
from PIL import Image


def _demo(out: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CINESR_BROKER_URL", None)
    return subprocess.run([*CLI, "demo", "-o", str(out), "--quiet", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_demo_with_the_baseline_matches_a_local_baseline(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = _demo(out, "--slices", "1", "--frames", "16", "--size", "64", "--method", "baseline")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((out / "metrics.json").read_text())
    # the derived series went through listener -> queue -> worker -> C-STORE and equals the baseline the demo
    # computes itself (up to the integer pixels of DICOM)
    base, served = report["metrics"]["baseline"], report["metrics"]["cinesr"]
    assert served["psnr"] == pytest.approx(base["psnr"], abs=0.3)
    assert served["ssim"] == pytest.approx(base["ssim"], abs=0.01)
    assert 15 < base["psnr"] < 60
    assert "baseline" in report["method"]
    # what the PACS received: one derived series, 8x the frames at 4x the matrix
    derived = read_series(Path(report["files"]["pacs_folder"]))[0]
    assert derived.shape == (1, 16, 64, 64)
    assert report["job"]["status"] == "succeeded"
    timings = report["timings_seconds"]
    end_to_end = timings["end to end: last instance received -> derived series stored in PACS"]
    assert end_to_end > 0
    assert timings["series completion (quiet period + routing)"] >= 0.4  # the 0.5 s quiet period
    assert {"queue (waiting for the worker)", "compute (SR method)", "export (C-STORE to PACS)"} <= set(timings)
    # the command itself, stage by stage: the stages add up to the total, compute is the worker's own figure
    stages = report["demo_stages_seconds"]
    assert list(stages) == ["start service + PACS (REST and DICOM up)", "make phantom study",
                            "C-STORE to service", "series completion (quiet period)",
                            "queued until the worker has loaded the model", "super-resolve + export",
                            "picture + metrics (baseline, LPIPS)", "stop service (rest of it, after the metrics)",
                            "total"]
    assert sum(v for k, v in stages.items() if k != "total") == pytest.approx(stages["total"], abs=0.05)
    assert report["model_compute_seconds"] == pytest.approx(report["job"]["series"][0]["timings"]["compute"],
                                                            abs=1e-3)
    assert report["outside_model_compute_seconds"] == pytest.approx(stages["total"] - report["model_compute_seconds"],
                                                                    abs=1e-3)
    assert report["machine"]["cpus"] >= 1
    assert "of which model compute" in result.stdout
    # no confusing kombu warning in the embedded worker's or the service's log
    for log in (out / "logs" / "serve.log", out / "service-data" / "logs" / "worker.log"):
        assert "No hostname was supplied" not in log.read_text(errors="replace"), log
    # picture: 4 rows (input, baseline, CineSR, truth) x 8 time columns of 128 px panels (64 px upscaled)
    picture = Image.open(out / "comparison.png")
    assert picture.size == (150 + 8 * 130, 18 + 4 * 130)
    pixels = np.asarray(picture)
    assert pixels[18 + 2 * 130 + 64, 150:].std() > 5  # the CineSR row is an image, not blank
    gif = Image.open(out / "cine.gif")
    assert gif.n_frames == 16
    for name in ("comparison picture:", "animated cine:", "PSNR", "end to end"):
        assert name in result.stdout
    # a re-run over the same folder is refused (nothing is touched) unless --overwrite
    before = (out / "metrics.json").read_bytes()
    again = _demo(out, "--slices", "1", "--frames", "16", "--size", "64", "--method", "baseline", timeout=60)
    assert again.returncode == 2
    lines = [line for line in again.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "holds a previous demo run" in lines[0] and "--overwrite" in lines[0], again.stderr
    assert (out / "metrics.json").read_bytes() == before


@pytest.mark.slow
def test_demo_as_the_readme_runs_it_beats_the_baseline(tmp_path: Path) -> None:
    """The README's main command with its defaults: the service picks the bundled model, and the CineSR row
    beats the baseline on every metric against the ground truth."""
    out = tmp_path / "demo"
    out.mkdir()
    (out / "metrics.json").write_text("{}")  # an earlier run, replaced with --overwrite ...
    (out / "notes.txt").write_text("mine")  # ... which leaves what a run does not write alone
    result = _demo(out, "--overwrite")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "notes.txt").read_text() == "mine"
    report = json.loads((out / "metrics.json").read_text())
    assert report["job"]["status"] == "succeeded"
    assert report["job"]["params"]["method"] is None  # the demo asks for nothing: the service decides
    assert "by model tiny" in report["method"]
    base, model = report["metrics"]["baseline"], report["metrics"]["cinesr"]
    assert model["psnr"] > base["psnr"] and model["ssim"] > base["ssim"] and model["lpips"] < base["lpips"], report


def test_demo_rejects_an_unknown_method(tmp_path: Path) -> None:
    result = _demo(tmp_path / "demo", "--method", "magic", timeout=60)
    assert result.returncode == 2
    assert "unknown method 'magic'" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_pacs_receives_by_c_store(tmp_path: Path, lowres_study: Path) -> None:
    pacs = DemoPacs(tmp_path / "pacs").start()
    try:
        files = sorted((lowres_study / "lowres").glob("*.dcm"))
        assert push_series(files, pacs.port, called_ae=pacs.ae_title) == len(files)
    finally:
        pacs.stop()
    series_uid = read_series(lowres_study / "lowres")[0].series_uid
    assert pacs.count(series_uid) == len(files)
    assert len(list((tmp_path / "pacs" / series_uid).glob("*.dcm"))) == len(files)
    assert read_series(tmp_path / "pacs" / series_uid)[0].shape == read_series(lowres_study / "lowres")[0].shape


def test_long_row_labels_are_not_cut_off(tmp_path: Path) -> None:
    from cinesr.service.demo_report import label_width
    from PIL import ImageDraw

    label = "CineSR\n(model tiny-20261201-502b8287)"  # what the demo writes for the bundled model
    frames = np.full((2, 32, 32), 0.5, dtype=np.float32)
    path = comparison_picture([(label, frames), ("Ground truth", frames)], [0, 1], tmp_path / "p.png",
                              ["0 ms", "9 ms"])
    image = np.asarray(Image.open(path))
    width = label_width([label, "Ground truth"])
    assert image.shape[1] == width + 2 * 130
    longest = ImageDraw.Draw(Image.new("L", (1, 1))).textlength("(model tiny-20261201-502b8287)")
    assert width >= 6 + longest + 4  # the text starts at x=6 and ends before the first panel
    text = image[18:18 + 128, :width]
    columns = np.nonzero((text > 0).any(axis=0))[0]
    assert columns.size and columns.max() < width - 2  # the last letter is drawn inside the label column


def test_comparison_picture_layout(tmp_path: Path) -> None:
    frames = np.linspace(0, 1, 4 * 32 * 32, dtype=np.float32).reshape(4, 32, 32)
    path = comparison_picture([("a", frames), ("b", 1 - frames)], [0, 3], tmp_path / "p.png", ["0 ms", "9 ms"])
    image = np.asarray(Image.open(path))
    assert image.shape == (18 + 2 * 130, 150 + 2 * 130)
    assert short_method("CineSR 0.1.0: x4 by model tiny-49ce093c983d (steps=15)") == "model tiny-49ce093c983d"


def test_demo_scores_are_the_evaluation_protocols() -> None:
    """The demo's stacked metrics equal cinesr.model.evaluate.score_frames' frame-by-frame means."""
    from cinesr.model.evaluate import score_frames
    from cinesr.service.demo_report import score

    rng = np.random.default_rng(3)
    truth = rng.random((2, 3, 48, 48)).astype(np.float32)
    pred = np.clip(truth + rng.normal(0, 0.05 * np.arange(1, 7).reshape(2, 3, 1, 1), truth.shape), -0.1, 1.1)
    expected = score_frames(pred.reshape(-1, 48, 48), truth.reshape(-1, 48, 48))
    got = score(pred.astype(np.float32), truth)
    for name in ("psnr", "ssim", "lpips"):
        assert got[name] == pytest.approx(expected[name], rel=1e-6, abs=1e-6), name


def test_log_watch_reads_only_what_was_appended_and_finds_a_split_line(tmp_path: Path) -> None:
    from cinesr.service.demo import LogWatch

    log = tmp_path / "worker.log"
    watch = LogWatch(log, "engine not loaded")
    assert not watch.seen()  # no file yet
    log.write_text('{"msg": "starting"}\n{"msg": "engine not')
    assert not watch.seen()
    assert watch.offset == log.stat().st_size
    with open(log, "a") as f:
        f.write(' loaded: no backend"}\n')
    assert watch.seen()
