"""Evaluation like the paper's Table 1: the model against the flow + bicubic baseline on ground-truth cine.

Two protocols, each with the Real-ESRGAN and/or the bicubic-only degradation:

* ``paper``: from each slice take 9-frame mini-clips, keep frames 1 and 9, flow-interpolate the 7
  between, take the middle 3 (clip frames 4-6), degrade them -> the low-resolution window. The
  baseline is the bicubic upsampling of that window, the model super-resolves it; metrics are
  computed on the middle frame (clip frame 5) against the true frame.
* ``sequence``: the whole cine as an acquisition would give it: keep every 8th frame, degrade
  each kept frame (one parameter draw per slice, independent noise), flow-interpolate the
  low-resolution frames 8x (cyclically when the frame count is a multiple of 8), then the baseline
  upsamples every frame bicubically while the model super-resolves non-overlapping 3-frame windows
  and keeps each frame from its window. Metrics over every reconstructed frame.

Results: rows for the baseline, the model and the relative gain (model / baseline - 1), written
as Markdown and JSON plus a figure per protocol in the style of the paper's Figures 3-4 (rows:
baseline, model, ground truth; columns: time).
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .baseline import bicubic_up
from .degrade import DegradationConfig, degrade
from .errors import InputError
from .flow import interpolate_cine
from .metrics import lpips, psnr, ssim
from .samples import CLIP_LENGTH, MIDDLE_WINDOW, WINDOW, clip_indices, sample_from_clip

PROTOCOLS = ("paper", "sequence")
DEGRADATIONS = ("realesrgan", "bicubic")
METRICS = ("psnr", "ssim", "lpips")
LABELS = {"realesrgan": "Real-ESRGAN", "bicubic": "bicubic"}
TEMPORAL = 8

Progress = Callable[[int, int, str], None]  # (slices done, slices total, what)


def score_frames(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Mean PSNR, SSIM and LPIPS over frames (N, H, W) in [0, 1]."""
    return {k: float(np.mean(v)) for k, v in frame_metrics(pred, gt).items()}


def frame_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, list[float]]:
    """Per-frame PSNR, SSIM and LPIPS of (N, H, W) predictions in [0, 1] (clipped) against ground truth."""
    pred = np.clip(np.asarray(pred, dtype=np.float32), 0, 1)
    gt = np.asarray(gt, dtype=np.float32)
    if pred.shape != gt.shape:
        raise ValueError(f"shape mismatch: {pred.shape} vs {gt.shape}")
    with torch.no_grad():
        lp = lpips(torch.from_numpy(pred[:, None]), torch.from_numpy(gt[:, None])).tolist()
    return {"psnr": [psnr(a, b) for a, b in zip(pred, gt, strict=True)],
            "ssim": [ssim(a, b) for a, b in zip(pred, gt, strict=True)],
            "lpips": [float(v) for v in lp]}


def _rng(seed: int, *keys: object) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(str(k).encode()) for k in keys)])


@dataclass
class _Acc:
    """Per-frame metric values of one method."""

    values: dict[str, list[float]]

    @classmethod
    def empty(cls) -> _Acc:
        return cls({m: [] for m in METRICS})

    def add(self, scores: dict[str, list[float]]) -> None:
        for m in METRICS:
            self.values[m] += scores[m]

    def mean(self) -> dict[str, float]:
        return {m: float(np.mean(v)) if v else float("nan") for m, v in self.values.items()}


def gains(model: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    """Relative change of each metric, model / baseline - 1 (PSNR/SSIM: positive is better; LPIPS: negative)."""
    return {m: model[m] / baseline[m] - 1.0 if baseline[m] else float("nan") for m in METRICS}


# ------------------------------------------------------------------------------------ protocols


def paper_windows(frames: np.ndarray, rng: np.random.Generator, degradation: DegradationConfig,
                  clips: int) -> tuple[np.ndarray, np.ndarray]:
    """`clips` mini-clips of one slice -> LR windows (clips, 3, h, w) and the true middle frames (clips, H, W)."""
    t = frames.shape[0]
    starts = rng.choice(t, size=min(clips, t), replace=False)
    lqs, gts = [], []
    for start in starts:
        clip = frames[clip_indices(t, int(start))].astype(np.float32)
        s = sample_from_clip(clip, rng, degradation, window_start=MIDDLE_WINDOW)
        lqs.append(s.lq)
        gts.append(s.gt[WINDOW // 2])
    return np.stack(lqs), np.stack(gts)


def sequence_inputs(frames: np.ndarray, rng: np.random.Generator, degradation: DegradationConfig
                    ) -> tuple[np.ndarray, np.ndarray]:
    """A slice (T, H, W) -> flow-interpolated LR frames (8N or 8(N-1)+1, h, w) and the matching true frames."""
    t = frames.shape[0]
    cyclic = t % TEMPORAL == 0
    kept = frames[::TEMPORAL].astype(np.float32)
    if kept.shape[0] < 2:
        raise InputError(f"a slice of {t} frames leaves fewer than 2 after keeping every {TEMPORAL}th")
    lq = degrade(kept, rng, degradation)
    inter = np.clip(interpolate_cine(lq, TEMPORAL, cyclic=cyclic), 0, 1)
    gt = frames[: inter.shape[0]].astype(np.float32)
    return inter, gt


def window_starts(n: int, cyclic: bool) -> list[int]:
    """Starts of non-overlapping 3-frame windows covering n frames (the last one shifted back if needed)."""
    starts = list(range(0, n, WINDOW))
    if not cyclic and starts and starts[-1] + WINDOW > n:
        starts[-1] = max(0, n - WINDOW)
    return starts


def model_sequence(superresolve: Callable[[np.ndarray], np.ndarray], inter: np.ndarray, cyclic: bool) -> np.ndarray:
    """Super-resolve a whole LR sequence (N, h, w) by 3-frame windows; each frame kept from its window."""
    n = inter.shape[0]
    starts = window_starts(n, cyclic)
    windows = np.stack([inter[(s + np.arange(WINDOW)) % n] for s in starts])
    out = superresolve(windows)  # (W, 3, H, W)
    result = np.empty((n, *out.shape[-2:]), dtype=np.float32)
    for w, s in enumerate(starts):
        for j in range(WINDOW):
            k = (s + j) % n
            result[k] = out[w, j]  # later windows overwrite only where they overlap a shifted last window
    return result


# ------------------------------------------------------------------------------------------ API


def evaluate(
    data: str | Path,
    bundle: Any = None,
    out_dir: str | Path | None = None,
    *,
    degradations: Sequence[str] = DEGRADATIONS,
    protocols: Sequence[str] = PROTOCOLS,
    seed: int = 0,
    split: str | None = None,
    clips_per_slice: int = 2,
    max_patients: int | None = None,
    slices_per_patient: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    phantom: dict[str, int] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Evaluate a model bundle (folder, loaded ModelBundle, or None for the bundled model) on `data`.

    data: a folder of ground-truth DICOM cine studies (one sub-folder per patient) or a phantom
    spec `phantom:<seeds>[:<generator>]`. split: only patients of that split ('test', ...) or all.
    Writes evaluation.json, evaluation.md and figure_<protocol>.png into out_dir (if given) and
    returns the report (as in evaluation.json). phantom: options of on-the-fly phantoms (slices,
    frames, size); the defaults are 3 slices of 32 frames at 256x256.
    """
    from .bundle import ModelBundle, load_bundle
    from .datasets import open_source, split_patients
    from .inference import superresolve_windows

    for p in protocols:
        if p not in PROTOCOLS:
            raise InputError(f"unknown protocol {p!r} (one of {', '.join(PROTOCOLS)})")
    for d in degradations:
        if d not in DEGRADATIONS:
            raise InputError(f"unknown degradation {d!r} (one of {', '.join(DEGRADATIONS)})")
    configs = {d: DegradationConfig(kind=d) for d in degradations}
    model = bundle if isinstance(bundle, ModelBundle) else load_bundle(bundle, device=device)
    source = open_source(data, **(phantom or {}))
    patients = split_patients(source, split)
    if max_patients is not None:
        patients = patients[:max_patients]
    if not patients:
        raise InputError(f"no patients to evaluate in {data} (split {split})")

    def sr(windows: np.ndarray) -> np.ndarray:
        return superresolve_windows(model, windows, seed=seed, batch_size=batch_size)

    acc = {(p, d, m): _Acc.empty() for p in protocols for d in degradations for m in ("baseline", "model")}
    figure: dict[str, dict[str, np.ndarray]] = {}
    started = time.monotonic()
    slices_done, n_slices_seen = 0, 0
    loaded = [(patient, source.load(patient)) for patient in patients]
    loaded = [(p, s[:slices_per_patient] if slices_per_patient else s) for p, s in loaded]
    total = sum(len(s) for _, s in loaded) * len(degradations)
    for patient, slices in loaded:
        for k, frames in enumerate(slices):
            n_slices_seen += 1
            for d in degradations:
                if "paper" in protocols:
                    lq, gt = paper_windows(frames, _rng(seed, "paper", d, patient, k), configs[d], clips_per_slice)
                    base = np.clip(bicubic_up(lq[:, WINDOW // 2]), 0, 1)
                    out = sr(lq)[:, WINDOW // 2]
                    acc[("paper", d, "baseline")].add(frame_metrics(base, gt))
                    acc[("paper", d, "model")].add(frame_metrics(out, gt))
                    figure.setdefault(f"paper_{d}", {"baseline": base, "model": out, "ground truth": gt})
                if "sequence" in protocols:
                    inter, gt = sequence_inputs(frames, _rng(seed, "sequence", d, patient, k), configs[d])
                    base = np.clip(bicubic_up(inter), 0, 1)
                    out = model_sequence(sr, inter, cyclic=frames.shape[0] % TEMPORAL == 0)
                    acc[("sequence", d, "baseline")].add(frame_metrics(base, gt))
                    acc[("sequence", d, "model")].add(frame_metrics(out, gt))
                    figure.setdefault(f"sequence_{d}", {"baseline": base, "model": out, "ground truth": gt})
                slices_done += 1
                if progress is not None:
                    progress(slices_done, total, f"{patient} slice {k} {d}")

    rows = []
    for p in protocols:
        for d in degradations:
            b, m = acc[(p, d, "baseline")].mean(), acc[(p, d, "model")].mean()
            rows.append({"protocol": p, "degradation": d, "frames": len(acc[(p, d, "model")].values["psnr"]),
                         "baseline": b, "model": m, "gain": gains(m, b)})
    report = {
        "data": source.describe() | {"spec": str(data), "split": split or "all", "patients": len(patients),
                                      "slices": n_slices_seen},
        "model": {"name": model.name, "version": model.version, "path": str(model.path) if model.path else None},
        "baseline": "cyclic optical-flow interpolation (Farneback) + bicubic upsampling",
        "seed": seed, "clips_per_slice": clips_per_slice, "sampler_steps": model.schedule.steps,
        "wall_time_s": round(time.monotonic() - started, 1),
        "rows": rows,
    }
    if out_dir is not None:
        write_report(report, figure, Path(out_dir))
    return report


def markdown_table(report: dict[str, Any]) -> str:
    """The report's rows as a Markdown table like the paper's Table 1."""
    name = report.get("model", {}).get("name", "model")
    lines = ["| protocol | degradation | method | PSNR (dB) ↑ | SSIM ↑ | LPIPS ↓ |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        label = LABELS.get(r["degradation"], r["degradation"])
        b, m, g = r["baseline"], r["model"], r["gain"]
        lines.append(f"| {r['protocol']} | {label} | baseline (flow + bicubic) | {b['psnr']:.2f} | {b['ssim']:.4f} "
                     f"| {b['lpips']:.4f} |")
        lines.append(f"| | | CineSR ({name}) | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['lpips']:.4f} |")
        lines.append(f"| | | relative gain | {g['psnr']:+.1%} | {g['ssim']:+.1%} | {g['lpips']:+.1%} |")
    return "\n".join(lines)


def write_report(report: dict[str, Any], figure: dict[str, dict[str, np.ndarray]], out_dir: Path) -> None:
    from .plots import strip_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    for key, rows in figure.items():
        path = out_dir / f"figure_{key}.png"
        strip_figure(rows, path, title=f"{key.replace('_', ' / ')}: {report['model']['name']}")
        figures.append(path.name)
    report["figures"] = figures
    (out_dir / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    d = report["data"]
    md = [f"# CineSR evaluation: {report['model']['name']} ({report['model']['version']})", "",
          f"Data: `{d['spec']}` ({d['patients']} patients, {d['slices']} slices, split {d['split']}); "
          f"seed {report['seed']}; {report['sampler_steps']} sampler steps; baseline: {report['baseline']}.", "",
          markdown_table(report), "",
          "Relative gain = model / baseline - 1 (higher PSNR/SSIM and lower LPIPS are better).", ""]
    md += [f"![{f}]({f})" for f in figures]
    (out_dir / "evaluation.md").write_text("\n".join(md) + "\n", encoding="utf-8")


__all__ = ["evaluate", "frame_metrics", "gains", "markdown_table", "score_frames", "CLIP_LENGTH"]
