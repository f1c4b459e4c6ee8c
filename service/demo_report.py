"""What `cinesr demo` shows: the comparison picture, the cine GIF, and the scores of the baseline and of the
service's output against the phantom's ground truth (the evaluation's metrics)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TEMPORAL = 8
SPATIAL = 4


def stack_frames(series: Any) -> np.ndarray:
    return np.stack([s.frames for s in series.slices]).astype(np.float32)  # (S, T, H, W)


def _panel(frame: np.ndarray, size: int) -> Any:
    from PIL import Image

    img = Image.fromarray((np.clip(frame, 0, 1) * 255).astype(np.uint8), mode="L")
    return img if img.size == (size, size) else img.resize((size, size), Image.NEAREST)


def label_width(labels: list[str], minimum: int = 150, margin: int = 6) -> int:
    """Width of the label column: the widest line of any label in the default font, plus margins (so that
    no label runs under the first picture column)."""
    from PIL import Image, ImageDraw

    draw = ImageDraw.Draw(Image.new("L", (1, 1)))
    widest = max((draw.textlength(line) for label in labels for line in label.split("\n")), default=0.0)
    return max(minimum, int(np.ceil(widest)) + 2 * margin)


def comparison_picture(rows: list[tuple[str, np.ndarray]], times: list[int], path: Path,
                       time_labels: list[str]) -> Path:
    """A grid: one row per (label, (T, H, W) frames in [0, 1]), one column per time index."""
    from PIL import Image, ImageDraw

    size = max(rows[-1][1].shape[1], 128)
    label_w, head_h, pad = label_width([label for label, _ in rows]), 18, 2
    width = label_w + len(times) * (size + pad)
    height = head_h + len(rows) * (size + pad)
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(time_labels):
        draw.text((label_w + c * (size + pad) + 4, 3), label, fill=255)
    for r, (label, frames) in enumerate(rows):
        y = head_h + r * (size + pad)
        for i, line in enumerate(label.split("\n")):
            draw.text((6, y + size // 2 - 12 + 12 * i), line, fill=255)
        for c, t in enumerate(times):
            canvas.paste(_panel(frames[t], size), (label_w + c * (size + pad), y))
    canvas.save(path)
    return path


def cine_gif(panels: list[tuple[str, np.ndarray]], path: Path, frame_ms: float) -> Path:
    """Side-by-side animation of (label, (T, H, W)) cines with the same T, one loop per cardiac cycle."""
    from PIL import Image, ImageDraw

    size = max(panels[-1][1].shape[1], 128)
    head_h, pad = 16, 2
    n = panels[-1][1].shape[0]
    images = []
    for t in range(n):
        canvas = Image.new("L", (len(panels) * (size + pad), head_h + size), 0)
        draw = ImageDraw.Draw(canvas)
        for i, (label, frames) in enumerate(panels):
            draw.text((i * (size + pad) + 3, 2), label, fill=255)
            canvas.paste(_panel(frames[t], size), (i * (size + pad), head_h))
        images.append(canvas.convert("P"))
    images[0].save(path, save_all=True, append_images=images[1:], loop=0, duration=max(20, int(round(frame_ms))),
                   optimize=False)
    return path


class TruthScorer:
    """PSNR / SSIM / LPIPS (cinesr.model.metrics) of predictions against one ground truth, over every frame of
    every slice, values in [0, 1]: the means of cinesr.model.evaluate.score_frames. Each metric runs on the
    whole stack at once (5x faster on 2 cores than frame by frame; all frames have the same size, so the mean
    over the stack is the mean of the per-frame values), and the truth's LPIPS features are computed once for
    every method scored against it."""

    def __init__(self, truth: np.ndarray) -> None:
        import torch
        from cinesr.model.metrics import lpips_features

        self.truth = np.asarray(truth, np.float32).reshape(-1, *truth.shape[-2:])
        with torch.no_grad():
            self._features = lpips_features(torch.from_numpy(self.truth[:, None]))

    def score(self, pred: np.ndarray) -> dict[str, float]:
        import torch
        from cinesr.model.metrics import lpips_distance, lpips_features, ssim

        p = np.clip(np.asarray(pred, np.float32).reshape(-1, *pred.shape[-2:]), 0, 1)
        g = self.truth
        if p.shape != g.shape:
            raise ValueError(f"shape mismatch: {p.shape} vs {g.shape}")
        mse = ((p.astype(np.float64) - g.astype(np.float64)) ** 2).mean(axis=(1, 2))
        with np.errstate(divide="ignore"):
            psnr = float(np.mean(10.0 * np.log10(1.0 / mse)))
        with torch.no_grad():
            perceptual = float(lpips_distance(lpips_features(torch.from_numpy(p[:, None])), self._features).mean())
        return {"psnr": psnr, "ssim": float(ssim(p, g)), "lpips": perceptual}


def score(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """One prediction's PSNR / SSIM / LPIPS against the truth (TruthScorer, for a single method)."""
    return TruthScorer(truth).score(pred)


@dataclass
class Reference:
    """What the demo scores the service's output against, made while the service works: the ground truth and
    the acquisition (scaled to [0, 1] by the truth's maximum), the baseline and the baseline's scores."""

    truth: np.ndarray  # (S, T, H, W)
    lowres: np.ndarray  # (S, T / 8, H / 4, W / 4)
    scale: float
    baseline: np.ndarray
    scorer: TruthScorer
    baseline_metrics: dict[str, float]


def make_reference(truth_folder: Path, lowres_folder: Path) -> Reference:
    """Read the phantom's truth and acquisition back from DICOM, run the baseline and score it."""
    from cinesr.model.baseline import baseline_superresolve
    from cinesr.model.cine import read_series

    truth_raw = stack_frames(read_series(truth_folder)[0])
    scale = max(float(np.max(truth_raw)), 1.0)
    truth = truth_raw / scale
    lowres = stack_frames(read_series(lowres_folder)[0]) / scale
    baseline = np.stack([baseline_superresolve(s, TEMPORAL, SPATIAL) for s in lowres]).astype(np.float32)
    scorer = TruthScorer(truth)
    return Reference(truth=truth, lowres=lowres, scale=scale, baseline=baseline, scorer=scorer,
                     baseline_metrics=scorer.score(baseline))
