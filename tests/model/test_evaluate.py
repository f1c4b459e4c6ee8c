"""Evaluation: the baseline rows equal metrics computed directly, the model rows are the pipeline's output,
temporal error, per-source rows, files and gains."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cinesr.model.baseline import bicubic_up
from cinesr.model.bundle import load_bundle
from cinesr.model.degrade import area_down, bicubic_down, kspace_down
from cinesr.model.evaluate import evaluate, frame_metrics, markdown_table, temporal_error
from cinesr.model.flow import interpolate_cine, interpolate_pair
from cinesr.model.inference import TorchRunner
from cinesr.model.phantom import make_study
from cinesr.model.pipeline import Options, superresolve_slices

PHANTOM = {"slices": 1, "frames": 16, "size": 64}
OPTIONS = Options(steps=2, overlap=4)


def direct_baselines(seed: int) -> dict[str, dict[str, float]]:
    """The paper protocol's bicubic and the sequence protocol's area baselines, computed here."""
    frames = make_study(seed, **PHANTOM).frames[0]
    t = frames.shape[0]
    paper_pred, paper_gt = [], []
    for start in range(t):  # every mini-clip start (the evaluation is asked for all of them)
        clip = frames[(start + np.arange(9)) % t]
        inter = np.clip(interpolate_pair(clip[0], clip[8], np.array([3, 4, 5], np.float32) / 8), 0, 1)
        paper_pred.append(np.clip(bicubic_up(bicubic_down(inter, 4)[1]), 0, 1))
        paper_gt.append(clip[4])
    seq_pred = np.clip(bicubic_up(interpolate_cine(area_down(frames[::8]), 8)), 0, 1)
    out = {"paper": {k: float(np.mean(v)) for k, v in frame_metrics(np.stack(paper_pred), np.stack(paper_gt)).items()},
           "sequence": {k: float(np.mean(v)) for k, v in frame_metrics(seq_pred, frames).items()}}
    out["sequence"]["temporal"] = temporal_error(seq_pred, frames)
    return out


def test_rows_equal_direct_computations(micro_bundle: Path, tmp_path: Path) -> None:
    calls: list[tuple[int, int, str]] = []
    report = evaluate("phantom:4", micro_bundle, tmp_path / "eval", acquisitions=("bicubic", "area"),
                      clips_per_slice=PHANTOM["frames"], phantom=PHANTOM, seed=1, options=OPTIONS,
                      progress=lambda d, t, w: calls.append((d, t, w)))
    direct = direct_baselines(4)
    rows = {(r["protocol"], r["acquisition"]): r for r in report["rows"]}
    assert set(rows) == {(p, a) for p in ("paper", "sequence") for a in ("bicubic", "area")}
    assert all(r["source"] == "sax" for r in rows.values())
    for key, metrics in (("paper", ("psnr", "ssim", "lpips")), ("sequence", ("psnr", "ssim", "lpips", "temporal"))):
        row = rows[(key, "bicubic" if key == "paper" else "area")]
        assert row["frames"] == 16
        for metric in metrics:
            assert row["baseline"][metric] == pytest.approx(direct[key][metric], rel=1e-6), (key, metric)
            m, b = row["model"][metric], row["baseline"][metric]
            assert np.isfinite(m) and row["gain"][metric] == pytest.approx(m / b - 1)
    # the model rows are the shipped path's output on the acquisition
    frames = make_study(4, **PHANTOM).frames[0]
    bundle = load_bundle(micro_bundle)
    out = superresolve_slices([area_down(frames[::8])], TorchRunner.for_options(bundle, OPTIONS), OPTIONS).frames[0]
    expected = {k: float(np.mean(v)) for k, v in frame_metrics(out, frames).items()}
    for metric in ("psnr", "ssim", "lpips"):
        assert rows[("sequence", "area")]["model"][metric] == pytest.approx(expected[metric], rel=1e-6)
    assert calls[-1][:2] == (2, 2)
    # the files a person reads
    saved = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert saved["rows"] == report["rows"] and saved["sources"][0]["data"]["patients"] == 1
    md = (tmp_path / "eval" / "evaluation.md").read_text()
    assert "baseline (flow + bicubic)" in md and "CineSR (micro)" in md and "relative gain" in md
    assert "temporal error" in md
    assert (tmp_path / "eval" / "figure_sax_sequence_area.png").stat().st_size > 1000
    assert markdown_table(report).count("\n") == 2 + 3 * 4 - 1


def test_several_sources_report_per_source(micro_bundle: Path) -> None:
    report = evaluate(["phantom:4", "phantom:4:deadleaves"], micro_bundle, acquisitions=("kspace",),
                      protocols=("sequence",), phantom=PHANTOM, options=OPTIONS)
    assert [r["source"] for r in report["rows"]] == ["sax", "deadleaves"]
    assert [s["data"]["generator"] for s in report["sources"]] == ["sax", "deadleaves"]
    frames = make_study(4, **PHANTOM, generator="deadleaves").frames[0]
    base = np.clip(bicubic_up(interpolate_cine(kspace_down(frames[::8]), 8)), 0, 1)
    assert report["rows"][1]["baseline"]["psnr"] == pytest.approx(np.mean(frame_metrics(base, frames)["psnr"]))


def test_realesrgan_evaluation_is_seeded(micro_bundle: Path) -> None:
    bundle = load_bundle(micro_bundle)
    kw = {"acquisitions": ("realesrgan",), "protocols": ("paper",), "phantom": PHANTOM, "clips_per_slice": 2,
          "options": OPTIONS}
    a = evaluate("phantom:4", bundle, seed=3, **kw)["rows"][0]
    b = evaluate("phantom:4", bundle, seed=3, **kw)["rows"][0]
    c = evaluate("phantom:4", bundle, seed=4, **kw)["rows"][0]
    assert a == b
    assert a["baseline"] != c["baseline"]


def test_temporal_error_measures_flicker_not_content() -> None:
    rng = np.random.default_rng(0)
    truth = rng.random((8, 16, 16)).astype(np.float32) * 0.5
    assert temporal_error(truth, truth) == 0.0
    assert temporal_error(truth + 0.1, truth) == pytest.approx(0.0, abs=1e-7)  # a constant offset does not flicker
    flicker = truth + 0.05 * (np.arange(8) % 2)[:, None, None]
    assert temporal_error(flicker, truth) == pytest.approx(0.05, rel=1e-5)
