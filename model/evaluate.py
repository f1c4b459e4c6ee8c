"""Evaluation like the paper's Table 1, through the one inference path: the model against the baseline.

The model's outputs come from `cinesr.model.pipeline.superresolve_slices`, the code that
`cinesr superresolve` and the service run; the baseline is the paper's (cyclic optical flow in time,
bicubic in space). Acquisitions (spatial x4, `cinesr.model.degrade`): ``realesrgan`` (the paper's
training degradation), ``bicubic``, ``area`` (4x4 block means) and ``kspace`` (the central quarter of
k-space, as an MR scanner measures), all noise-free but the first. Two protocols:

* ``paper``: from each slice take 9-frame mini-clips, keep frames 1 and 9, flow-interpolate the 7
  between, take the middle 3 (clip frames 4-6) and acquire them -> one low-resolution window. The
  baseline upsamples it bicubically, the model super-resolves it (the window as a series of its own,
  no temporal step); metrics on the middle frame (clip frame 5) against the true frame.
* ``sequence``: the whole cine as an acquisition gives it: every 8th frame, acquired (one parameter
  draw per slice), all slices of a patient as one series through the pipeline (8x in time, 4x in
  space, data consistency); metrics over every output frame, and temporal consistency: the RMSE of
  frame-to-frame changes against the truth's, the cycle wrapping (lower is better). Needs a frame
  count that is a multiple of 8; other slices are counted as skipped.

Rows per source (generator or folder), protocol and acquisition: baseline, model, relative gain.
Written as Markdown and JSON plus figures: comparison strips (low-resolution input, baseline, model,
truth and the differences to the truth over time) with a zoomed crop where the acquisition lost the
most detail.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .baseline import baseline_superresolve, bicubic_up
from .degrade import DegradationConfig, degrade
from .errors import InputError
from .metrics import lpips, psnr, ssim
from .pipeline import Options, WindowRunner, superresolve_slices
from .samples import CLIP_LENGTH, MIDDLE_WINDOW, WINDOW, clip_indices, sample_from_clip

PROTOCOLS = ("paper", "sequence")
ACQUISITIONS = ("realesrgan", "bicubic", "area", "kspace")
METRICS = ("psnr", "ssim", "lpips")
LOWER_IS_BETTER = ("lpips", "temporal")
LABELS = {"realesrgan": "Real-ESRGAN", "bicubic": "bicubic", "area": "area (4x4 mean)", "kspace": "k-space"}
TEMPORAL = 8

Progress = Callable[[int, int, str], None]  # (slices done, slices total, what)


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


def score_frames(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Mean PSNR, SSIM and LPIPS over frames (N, H, W) in [0, 1]."""
    return {k: float(np.mean(v)) for k, v in frame_metrics(pred, gt).items()}


def temporal_error(pred: np.ndarray, gt: np.ndarray) -> float:
    """RMSE of frame-to-frame changes of a cine (N, H, W) against the truth's; the cycle wraps."""
    p, g = np.clip(np.asarray(pred, np.float64), 0, 1), np.asarray(gt, np.float64)
    return float(np.sqrt(np.mean(((np.roll(p, -1, 0) - p) - (np.roll(g, -1, 0) - g)) ** 2)))


def gains(model: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    """Relative change of each metric, model / baseline - 1 (PSNR/SSIM: positive is better; LPIPS and
    temporal error: negative is better)."""
    return {m: model[m] / baseline[m] - 1.0 if baseline.get(m) else float("nan") for m in model}


def _rng(seed: int, *keys: object) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(str(k).encode()) for k in keys)])


@dataclass
class _Acc:
    """Per-frame metric values of one method (and per-slice temporal errors)."""

    values: dict[str, list[float]]

    @classmethod
    def empty(cls) -> _Acc:
        return cls({m: [] for m in (*METRICS, "temporal")})

    def add(self, scores: dict[str, list[float]], temporal: float | None = None) -> None:
        for m in METRICS:
            self.values[m] += scores[m]
        if temporal is not None:
            self.values["temporal"].append(temporal)

    def mean(self) -> dict[str, float]:
        return {m: float(np.mean(v)) for m, v in self.values.items() if v}


# ------------------------------------------------------------------------------------ protocols


def paper_windows(frames: np.ndarray, rng: np.random.Generator, acquisition: DegradationConfig,
                  clips: int) -> tuple[np.ndarray, np.ndarray]:
    """`clips` mini-clips of one slice -> LR windows (clips, 3, h, w) and the true middle frames (clips, H, W)."""
    t = frames.shape[0]
    starts = rng.choice(t, size=min(clips, t), replace=False)
    lqs, gts = [], []
    for start in starts:
        clip = frames[clip_indices(t, int(start))].astype(np.float32)
        s = sample_from_clip(clip, rng, acquisition, window_start=MIDDLE_WINDOW)
        lqs.append(s.lq)
        gts.append(s.gt[WINDOW // 2])
    return np.stack(lqs), np.stack(gts)


def acquire_sequence(frames: np.ndarray, rng: np.random.Generator, acquisition: DegradationConfig) -> np.ndarray:
    """A slice (T, H, W), T a multiple of 8 -> its acquisition: every 8th frame, acquired (T/8, h, w)."""
    if frames.shape[0] % TEMPORAL:
        raise InputError(f"a slice of {frames.shape[0]} frames is not a whole number of {TEMPORAL}-frame steps")
    return degrade(frames[::TEMPORAL].astype(np.float32), rng, acquisition)


def model_output(lr_slices: list[np.ndarray], runner: WindowRunner, options: Options, temporal: int = TEMPORAL,
                 batch_size: int = 1) -> list[np.ndarray]:
    """What the model makes of an acquisition: the shipped path (`cinesr superresolve` runs the same code
    through an engine). temporal=1: a 3-frame window of the paper's protocol, as a series of its own."""
    opts = options if temporal == TEMPORAL else options.with_(temporal=1, stride=WINDOW)
    return superresolve_slices(lr_slices, runner, opts, batch_size=batch_size).frames


# ------------------------------------------------------------------------------------------ API


def evaluate(
    data: str | Path | Sequence[str | Path],
    bundle: Any = None,
    out_dir: str | Path | None = None,
    *,
    acquisitions: Sequence[str] = ACQUISITIONS,
    protocols: Sequence[str] = PROTOCOLS,
    seed: int = 0,
    split: str | None = None,
    clips_per_slice: int = 2,
    max_patients: int | None = None,
    slices_per_patient: int | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    phantom: dict[str, int] | None = None,
    options: Options | None = None,
    runner: WindowRunner | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Evaluate a model bundle (folder, loaded ModelBundle, or None for the bundled model) on `data`.

    data: one or several sources, each a folder of ground-truth DICOM cine studies (one sub-folder per
    patient) or a phantom spec `phantom:<seeds>[:<generator>]`; rows are reported per source. split:
    only patients of that split ('test', ...) or all. options: the pipeline's options (default: the
    bundle's shipped `inference` section). runner: what runs the windows (default: the bundle's networks
    in torch; `cinesr evaluate --backend` passes an inference engine). Writes evaluation.json,
    evaluation.md and figure_<source>_<protocol>_<acquisition>.png into out_dir (if given) and returns
    the report (as in evaluation.json). phantom: options of on-the-fly phantoms (slices, frames, size).
    """
    from .bundle import ModelBundle, load_bundle
    from .datasets import open_source, split_patients
    from .inference import TorchRunner

    for p in protocols:
        if p not in PROTOCOLS:
            raise InputError(f"unknown protocol {p!r} (one of {', '.join(PROTOCOLS)})")
    for a in acquisitions:
        if a not in ACQUISITIONS:
            raise InputError(f"unknown acquisition {a!r} (one of {', '.join(ACQUISITIONS)})")
    configs = {a: DegradationConfig(kind=a) for a in acquisitions}
    model = bundle if isinstance(bundle, ModelBundle) else load_bundle(bundle, device=device)
    opts = (options or Options.from_mapping(model.meta.get("inference"))).for_model(model.student_steps)
    run = runner or TorchRunner.for_options(model, opts)
    specs = [data] if isinstance(data, (str, Path)) else list(data)
    sources = []
    for spec in specs:
        source = open_source(spec, **(phantom or {}))
        patients = split_patients(source, split)[: max_patients or None]
        if not patients:
            raise InputError(f"no patients to evaluate in {spec} (split {split})")
        sources.append((str(spec), source, patients))

    def sr(lr_slices: list[np.ndarray], temporal: int) -> list[np.ndarray]:
        return model_output(lr_slices, run, opts, temporal, batch_size)

    started = time.monotonic()
    reports, figures = [], {}
    total = sum(len(p) for _, _, p in sources) * len(acquisitions)
    done = 0
    for spec, source, patients in sources:
        label = str(source.describe().get("generator") or Path(spec).name)
        acc = {(p, a, m): _Acc.empty() for p in protocols for a in acquisitions for m in ("baseline", "model")}
        skipped, n_slices = 0, 0
        for patient in patients:
            slices = source.load(patient)[:slices_per_patient or None]
            n_slices += len(slices)
            for a in acquisitions:
                if "paper" in protocols:
                    for k, frames in enumerate(slices):
                        lq, gt = paper_windows(frames, _rng(seed, "paper", a, patient, k), configs[a],
                                               clips_per_slice)
                        base = np.clip(bicubic_up(lq[:, WINDOW // 2]), 0, 1)
                        out = np.stack([sr([w], 1)[0][WINDOW // 2] for w in lq])
                        acc[("paper", a, "baseline")].add(frame_metrics(base, gt))
                        acc[("paper", a, "model")].add(frame_metrics(out, gt))
                if "sequence" in protocols:
                    usable = [f for f in slices if f.shape[0] % TEMPORAL == 0]
                    skipped += len(slices) - len(usable)
                    if usable:
                        lr = [acquire_sequence(f, _rng(seed, "sequence", a, patient, k), configs[a])
                              for k, f in enumerate(usable)]
                        outs = sr(lr, TEMPORAL)
                        for frames, low, out in zip(usable, lr, outs, strict=True):
                            base = np.clip(baseline_superresolve(low), 0, 1)
                            acc[("sequence", a, "baseline")].add(frame_metrics(base, frames),
                                                                 temporal_error(base, frames))
                            acc[("sequence", a, "model")].add(frame_metrics(out, frames), temporal_error(out, frames))
                            key = f"{label}_sequence_{a}"
                            if key not in figures:
                                figures[key] = {"input": np.repeat(low, TEMPORAL, axis=0), "baseline": base,
                                                "model": np.clip(out, 0, 1), "truth": frames}
                done += 1
                if progress is not None:
                    progress(done, total, f"{label} {patient} {a}")
        rows = []
        for p in protocols:
            for a in acquisitions:
                b, m = acc[(p, a, "baseline")].mean(), acc[(p, a, "model")].mean()
                if not m:
                    continue
                rows.append({"source": label, "protocol": p, "acquisition": a,
                             "frames": len(acc[(p, a, "model")].values["psnr"]), "baseline": b, "model": m,
                             "gain": gains(m, b)})
        reports.append({"data": source.describe() | {"spec": spec, "split": split or "all",
                                                     "patients": len(patients), "slices": n_slices,
                                                     "skipped_slices": skipped},
                        "rows": rows})
    report = {
        "sources": reports,
        "rows": [r for rep in reports for r in rep["rows"]],
        "model": {"name": model.name, "version": model.version, "path": str(model.path) if model.path else None},
        "options": opts.parameters(),
        "baseline": "cyclic optical-flow interpolation (Farneback) + bicubic upsampling",
        "seed": seed, "clips_per_slice": clips_per_slice,
        "wall_time_s": round(time.monotonic() - started, 1),
    }
    if out_dir is not None:
        write_report(report, figures, Path(out_dir))
    return report


def _fmt(metric: str, value: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.2f}" if metric == "psnr" else f"{value:.4f}"


def markdown_table(report: dict[str, Any]) -> str:
    """The report's rows as a Markdown table like the paper's Table 1 (plus temporal error where measured)."""
    name = report.get("model", {}).get("name", "model")
    lines = ["| source | protocol | acquisition | method | PSNR (dB) ↑ | SSIM ↑ | LPIPS ↓ | temporal error ↓ |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        label = LABELS.get(r["acquisition"], r["acquisition"])
        b, m, g = r["baseline"], r["model"], r["gain"]
        tb, tm = _fmt("temporal", b.get("temporal", math.nan)), _fmt("temporal", m.get("temporal", math.nan))
        lines.append(f"| {r['source']} | {r['protocol']} | {label} | baseline (flow + bicubic) "
                     f"| {_fmt('psnr', b['psnr'])} | {b['ssim']:.4f} | {b['lpips']:.4f} | {tb} |")
        lines.append(f"| | | | CineSR ({name}) | {_fmt('psnr', m['psnr'])} | {m['ssim']:.4f} | {m['lpips']:.4f} "
                     f"| {tm} |")
        tg = f"{g['temporal']:+.1%}" if "temporal" in g else ""
        lines.append(f"| | | | relative gain | {g['psnr']:+.1%} | {g['ssim']:+.1%} | {g['lpips']:+.1%} | {tg} |")
    return "\n".join(lines)


def write_report(report: dict[str, Any], figures: dict[str, dict[str, np.ndarray]], out_dir: Path) -> None:
    from .plots import comparison_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for key, rows in figures.items():
        path = out_dir / f"figure_{key}.png"
        comparison_figure(rows, path, title=f"{key.replace('_', ' / ')}: {report['model']['name']}")
        names.append(path.name)
    report["figures"] = names
    (out_dir / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    md = [f"# CineSR evaluation: {report['model']['name']} ({report['model']['version']})", ""]
    for rep in report["sources"]:
        d = rep["data"]
        md.append(f"- `{d['spec']}`: {d['patients']} patients, {d['slices']} slices, split {d['split']}"
                  + (f", {d['skipped_slices']} slices skipped (frames not a multiple of 8)" if d["skipped_slices"]
                     else ""))
    md += ["", f"Seed {report['seed']}; options {json.dumps(report['options'])}; baseline: {report['baseline']}.", "",
           markdown_table(report), "",
           "Relative gain = model / baseline - 1 (higher PSNR/SSIM and lower LPIPS and temporal error are better).",
           ""]
    md += [f"![{f}]({f})" for f in names]
    (out_dir / "evaluation.md").write_text("\n".join(md) + "\n", encoding="utf-8")


__all__ = ["ACQUISITIONS", "CLIP_LENGTH", "evaluate", "frame_metrics", "gains", "markdown_table", "model_output",
           "score_frames", "temporal_error"]
