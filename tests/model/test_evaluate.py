"""Evaluation: the report's baseline rows equal metrics computed directly; files and gains are right."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cinesr.model.baseline import bicubic_up
from cinesr.model.bundle import load_bundle
from cinesr.model.degrade import bicubic_down
from cinesr.model.evaluate import evaluate, frame_metrics, markdown_table, model_sequence, window_starts
from cinesr.model.flow import interpolate_cine, interpolate_pair
from cinesr.model.phantom import make_study

PHANTOM = {"slices": 1, "frames": 16, "size": 64}


def direct_baselines(seed: int) -> dict[str, dict[str, float]]:
    """Both protocols' bicubic-degradation baselines computed here, without cinesr.model.evaluate."""
    frames = make_study(seed, **PHANTOM).frames[0]
    t = frames.shape[0]
    paper_pred, paper_gt = [], []
    for start in range(t):  # every mini-clip start (the evaluation is asked for all of them)
        clip = frames[(start + np.arange(9)) % t]
        inter = np.clip(interpolate_pair(clip[0], clip[8], np.array([3, 4, 5], np.float32) / 8), 0, 1)
        paper_pred.append(np.clip(bicubic_up(bicubic_down(inter, 4)[1]), 0, 1))
        paper_gt.append(clip[4])
    lr = bicubic_down(frames[::8], 4)
    seq_pred = np.clip(bicubic_up(np.clip(interpolate_cine(lr, 8), 0, 1)), 0, 1)
    out = {}
    for name, (p, g) in {"paper": (np.stack(paper_pred), np.stack(paper_gt)), "sequence": (seq_pred, frames)}.items():
        out[name] = {k: float(np.mean(v)) for k, v in frame_metrics(p, g).items()}
    return out


def test_baseline_rows_equal_direct_metrics(micro_bundle: Path, tmp_path: Path) -> None:
    calls: list[tuple[int, int, str]] = []
    report = evaluate("phantom:4", micro_bundle, tmp_path / "eval", degradations=("bicubic",),
                      clips_per_slice=PHANTOM["frames"], phantom=PHANTOM, seed=1,
                      progress=lambda d, t, w: calls.append((d, t, w)))
    direct = direct_baselines(4)
    rows = {r["protocol"]: r for r in report["rows"]}
    assert set(rows) == {"paper", "sequence"}
    assert rows["paper"]["frames"] == 16 and rows["sequence"]["frames"] == 16
    for protocol in ("paper", "sequence"):
        for metric in ("psnr", "ssim", "lpips"):
            assert rows[protocol]["baseline"][metric] == pytest.approx(direct[protocol][metric], rel=1e-6)
            m, b = rows[protocol]["model"][metric], rows[protocol]["baseline"][metric]
            assert np.isfinite(m)
            assert rows[protocol]["gain"][metric] == pytest.approx(m / b - 1)
    assert calls[-1][:2] == (1, 1)
    # the files a person reads
    saved = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert saved["rows"] == report["rows"] and saved["data"]["patients"] == 1
    md = (tmp_path / "eval" / "evaluation.md").read_text()
    assert "baseline (flow + bicubic)" in md and "CineSR (micro)" in md and "relative gain" in md
    assert (tmp_path / "eval" / "figure_sequence_bicubic.png").stat().st_size > 1000
    assert markdown_table(report).count("\n") == 2 + 3 * 2 - 1


def test_realesrgan_evaluation_is_seeded(micro_bundle: Path) -> None:
    bundle = load_bundle(micro_bundle)
    kw = {"degradations": ("realesrgan",), "protocols": ("paper",), "phantom": PHANTOM, "clips_per_slice": 2}
    a = evaluate("phantom:4", bundle, seed=3, **kw)["rows"][0]
    b = evaluate("phantom:4", bundle, seed=3, **kw)["rows"][0]
    c = evaluate("phantom:4", bundle, seed=4, **kw)["rows"][0]
    assert a == b
    assert a["baseline"] != c["baseline"]


def test_sequence_windows_keep_each_frame_from_its_window() -> None:
    assert window_starts(16, cyclic=True) == [0, 3, 6, 9, 12, 15]
    assert window_starts(17, cyclic=False) == [0, 3, 6, 9, 12, 14]
    inter = np.arange(16, dtype=np.float32)[:, None, None] * np.ones((16, 2, 2), np.float32)

    def fake_sr(windows: np.ndarray) -> np.ndarray:  # an "upsampler" that keeps values: checks the bookkeeping
        return np.repeat(np.repeat(windows, 4, axis=-2), 4, axis=-1)

    out = model_sequence(fake_sr, inter, cyclic=True)
    assert out.shape == (16, 8, 8)
    np.testing.assert_array_equal(out[:, 0, 0], np.arange(16))
