"""Pictures without a plotting library (Pillow only): training curves and comparison strips.

* `training_curves(run_dir_or_logs, out_png)`: loss (log scale) per stage from the JSONL logs that
  `cinesr.model.train` writes, plus the validation metrics against the baseline when logged.
* `strip_figure(rows, out_png)`: the paper's Figures 3-4 layout: one row per method (baseline,
  model, ground truth), one column per time point, the heart region cropped.
* `comparison_figure(rows, out_png)`: input, methods and truth over time, each method's difference to
  the truth, and a zoomed crop where the acquisition lost the most detail (evaluation and the card).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189)]


def read_log(path: str | Path) -> list[dict]:
    """Records of a JSONL training log (lines that do not parse are skipped: a run may be writing)."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], title: str,
           series: Mapping[str, tuple[Sequence[float], Sequence[float]]], log_y: bool = False) -> None:
    """One line chart inside box = (left, top, right, bottom)."""
    left, top, right, bottom = box
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((left + 4, top - 14), title, fill=(0, 0, 0), font=_font())
    pts = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys, strict=True)
           if y is not None and math.isfinite(y) and (y > 0 or not log_y)]
    if not pts:
        return
    fy = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(fy(p[1]) for p in pts), max(fy(p[1]) for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-9)
    w, h = right - left - 10, bottom - top - 10

    def to_px(x: float, y: float) -> tuple[float, float]:
        return left + 5 + (x - x0) / (x1 - x0) * w, bottom - 5 - (fy(y) - y0) / (y1 - y0) * h

    for i, (label, (xs, ys)) in enumerate(series.items()):
        line = [to_px(x, y) for x, y in zip(xs, ys, strict=True)
                if y is not None and math.isfinite(y) and (y > 0 or not log_y)]
        colour = _COLOURS[i % len(_COLOURS)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        elif line:
            draw.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=colour)
        draw.text((right - 150, top + 4 + 12 * i), label, fill=colour, font=_font())
    ylab = (lambda v: f"{10 ** v:.3g}") if log_y else (lambda v: f"{v:.3g}")
    draw.text((left + 2, top + 2), ylab(y1), fill=(90, 90, 90), font=_font())
    draw.text((left + 2, bottom - 14), ylab(y0), fill=(90, 90, 90), font=_font())
    draw.text((left + 2, bottom + 2), f"step {x0:g}", fill=(90, 90, 90), font=_font())
    draw.text((right - 70, bottom + 2), f"step {x1:g}", fill=(90, 90, 90), font=_font())


def _smooth(values: list[float], k: int = 9) -> list[float]:
    if len(values) < k:
        return values
    arr = np.convolve(np.asarray(values, dtype=np.float64), np.ones(k) / k, mode="same")
    arr[: k // 2] = values[: k // 2]
    arr[-(k // 2):] = values[-(k // 2):]
    return arr.tolist()


def training_curves(run: str | Path, out_png: str | Path) -> Path:
    """Plot a training run (its folder, its logs/ folder, or one .jsonl file) to a PNG."""
    run = Path(run)
    if run.is_file():
        logs = [run]
    else:
        folder = run / "logs" if (run / "logs").is_dir() else run
        logs = sorted(folder.glob("*.jsonl"))
    if not logs:
        raise FileNotFoundError(f"no training logs (*.jsonl) under {run}")
    panels: list[tuple[str, dict, bool]] = []
    for log in logs:
        recs = [r for r in read_log(log) if "step" in r]
        stage = log.stem
        loss = [(r["step"], r["loss"]) for r in recs if "loss" in r]
        if loss:
            series = {"loss": ([s for s, _ in loss], [v for _, v in loss]),
                      "loss (smoothed)": ([s for s, _ in loss], _smooth([v for _, v in loss]))}
            for part in ("l1", "lpips"):
                pts = [(r["step"], r[part]) for r in recs if part in r]
                if pts:
                    series[part] = ([s for s, _ in pts], [v for _, v in pts])
            panels.append((f"{stage}: training loss (log scale)", series, True))
        for metric in ("psnr", "ssim", "lpips"):
            pts = [(r["step"], r[f"val_{metric}"], r.get(f"val_baseline_{metric}")) for r in recs
                   if f"val_{metric}" in r]
            if pts:
                panels.append((f"{stage}: validation {metric.upper()}", {
                    "model": ([p[0] for p in pts], [p[1] for p in pts]),
                    "baseline": ([p[0] for p in pts], [p[2] for p in pts])}, False))
    width, ph = 900, 240
    img = Image.new("RGB", (width, 30 + len(panels) * (ph + 40)), "white")
    draw = ImageDraw.Draw(img)
    for i, (title, series, log_y) in enumerate(panels):
        top = 30 + i * (ph + 40)
        _panel(draw, (50, top, width - 20, top + ph), title, series, log_y)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    img.save(out_png)
    return out_png


def strip_figure(rows: Mapping[str, np.ndarray], out_png: str | Path, columns: int = 6,
                 crop: float = 0.6, title: str = "") -> Path:
    """Rows of (T, H, W) frames in [0, 1] (same T) -> a grid: one row per entry, `columns` time points.

    `crop` keeps that central fraction of each frame (the heart sits near the centre).
    """
    names = list(rows)
    t = min(np.asarray(rows[n]).shape[0] for n in names)
    cols = np.unique(np.linspace(0, t - 1, min(columns, t)).round().astype(int))
    first = np.asarray(rows[names[0]])
    h, w = first.shape[-2:]
    ch, cw = max(1, int(h * crop)), max(1, int(w * crop))
    top, left = (h - ch) // 2, (w - cw) // 2
    label_w, head = 110, 34
    img = Image.new("L", (label_w + len(cols) * (cw + 4), head + len(names) * (ch + 4)), 255)
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((4, 2), title, fill=0, font=_font())
    for j, k in enumerate(cols):
        draw.text((label_w + j * (cw + 4) + 4, head - 14), f"frame {k}", fill=0, font=_font())
    for i, name in enumerate(names):
        y = head + i * (ch + 4)
        draw.text((4, y + ch // 2 - 6), name, fill=0, font=_font())
        frames = np.asarray(rows[name], dtype=np.float32)
        for j, k in enumerate(cols):
            tile = np.clip(frames[k, top : top + ch, left : left + cw], 0, 1)
            img.paste(Image.fromarray((tile * 255 + 0.5).astype(np.uint8)), (label_w + j * (cw + 4), y))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    img.save(out_png)
    return out_png


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m cinesr.model.plots RUN_DIR OUT.png`: training curves of a run."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m cinesr.model.plots RUN_DIR|LOG.jsonl OUT.png", file=sys.stderr)
        return 2
    print(training_curves(args[0], args[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def detail_box(truth: np.ndarray, baseline: np.ndarray, size: int) -> tuple[int, int]:
    """(top, left) of the size x size box where the truth holds the most detail the baseline lost."""
    err = np.mean((np.asarray(truth, np.float64) - np.asarray(baseline, np.float64)) ** 2, axis=0)
    h, w = err.shape
    integral = np.pad(err, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    sums = integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size] + integral[:-size, :-size]
    top, left = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(min(top, h - size)), int(min(left, w - size))


def comparison_figure(rows: Mapping[str, np.ndarray], out_png: str | Path, columns: int = 5, zoom_size: int = 48,
                      zoom: int = 3, diff_gain: float = 4.0, title: str = "") -> Path:
    """A comparison strip for people who look before they read.

    rows: (T, H, W) frames in [0, 1] with the same T: 'truth' and any methods ('input' may have a smaller
    H, W: it is shown enlarged by pixel replication). One row per entry over `columns` time points, one
    row per method with |method - truth| x `diff_gain`, and a last column that zooms `zoom`x into the box
    where the truth holds the most detail the baseline (or the first method) lost, at the first time point.
    """
    truth = np.asarray(rows["truth"], np.float32)
    t, h, w = truth.shape
    shown: dict[str, np.ndarray] = {}
    for name, frames in rows.items():
        f = np.asarray(frames, np.float32)
        if f.shape[-2:] != (h, w):
            f = f.repeat(h // f.shape[-2], axis=-2).repeat(w // f.shape[-1], axis=-1)
        shown[name] = np.clip(f, 0, 1)
    methods = [n for n in shown if n not in ("truth", "input")]
    for name in methods:
        shown[f"|{name} - truth| x{diff_gain:g}"] = np.clip(np.abs(shown[name] - truth) * diff_gain, 0, 1)
    cols = np.unique(np.linspace(0, t - 1, min(columns, t)).round().astype(int))
    reference = shown.get("baseline", shown[methods[0]] if methods else truth)
    top, left = detail_box(truth, reference, min(zoom_size, h, w))
    zs = min(zoom_size, h, w)
    label_w, head, gap = 170, 34, 4
    zw = zs * zoom
    width = label_w + len(cols) * (w + gap) + zw + gap
    height = head + len(shown) * (max(h, zw) + gap)
    img = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((4, 2), title, fill=0, font=_font())
    for j, k in enumerate(cols):
        draw.text((label_w + j * (w + gap) + 4, head - 14), f"frame {k}", fill=0, font=_font())
    draw.text((label_w + len(cols) * (w + gap) + 4, head - 14), f"frame {cols[0]}, {zoom}x", fill=0, font=_font())
    for i, (name, frames) in enumerate(shown.items()):
        y = head + i * (max(h, zw) + gap)
        draw.text((4, y + h // 2 - 6), name[:28], fill=0, font=_font())
        for j, k in enumerate(cols):
            img.paste(Image.fromarray((frames[k] * 255 + 0.5).astype(np.uint8)), (label_w + j * (w + gap), y))
        crop = frames[cols[0], top : top + zs, left : left + zs]
        tile = Image.fromarray((crop * 255 + 0.5).astype(np.uint8)).resize((zw, zw), Image.NEAREST)
        img.paste(tile, (label_w + len(cols) * (w + gap), y))
        x0 = label_w + left
        draw.rectangle([x0, y + top, x0 + zs, y + top + zs], outline=255)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    img.save(out_png)
    return out_png
