"""The learned super-resolution method: one cine slice (T, h, w) -> (8T, 4h, 4w) through an engine.

    intensities --(robust per-series affine map to [-1, 1])--> normalised frames
    --(cyclic optical flow, x8 in time)--> 8T frames at h x w
    --(pad to the model grid, tiles of 64x64 with overlap)--> tiles
    --(3-frame windows every `stride` frames, cyclic)--> jobs = windows x tiles
    --(batches of `batch_size` jobs: encode(bicubic x4) -> sampler -> decode)--> 256x256 windows
    --(blend the windows covering each frame and the tiles covering each pixel; crop)--> 8T x 4h x 4w
    --(exact inverse of the intensity map)--> series units

Only one batch of windows is in flight at a time, so engine memory depends on the batch size, not on
the series length. The noise of every window is drawn from a generator seeded by (seed, window, tile),
so the output does not depend on the backend, the batch size or the order the jobs run in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from cinesr.model.cine import CineSeries
from cinesr.model.flow import interpolate_cine
from cinesr.worker.engines.base import Engine, draw_noise

TEMPORAL_FACTOR = 8
WINDOW = 3  # frames per window: the three channels of the networks
# each frame from one window: a third of the cost of stride 1; a bundle may record a measured choice
DEFAULT_STRIDE = 3


@dataclass(frozen=True)
class Normalisation:
    """Affine map of intensities to the model's range: lo -> -1, hi -> +1 (and back, exactly)."""

    lo: float
    hi: float

    @classmethod
    def fit(cls, arrays: list[np.ndarray], low_pct: float = 0.5, high_pct: float = 99.5,
            max_samples: int = 1 << 20) -> Normalisation:
        """Percentiles over all pixels of all arrays (a strided subsample for very large series),
        robust to a few hot pixels; a flat series maps to a unit range around its value."""
        flat = np.concatenate([np.asarray(a, dtype=np.float32).ravel() for a in arrays])
        if flat.size > max_samples:
            flat = flat[:: math.ceil(flat.size / max_samples)]
        flat = flat[np.isfinite(flat)]
        if flat.size == 0:
            return cls(0.0, 1.0)
        lo, hi = (float(v) for v in np.percentile(flat, [low_pct, high_pct]))
        if not hi > lo:
            lo, hi = lo - 0.5, lo + 0.5
        return cls(lo, hi)

    def forward(self, x: np.ndarray) -> np.ndarray:
        scale = 2.0 / (self.hi - self.lo)
        return ((np.asarray(x, dtype=np.float64) - self.lo) * scale - 1.0).astype(np.float32)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        scale = (self.hi - self.lo) / 2.0
        return ((np.asarray(y, dtype=np.float64) + 1.0) * scale + self.lo).astype(np.float32)


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` pixels covering `size` (>= tile) with at least `overlap`."""
    if size <= tile:
        return [0]
    step = tile - overlap
    n = math.ceil((size - tile) / step) + 1
    # spread the tiles evenly so every overlap is about the same width
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def _ramp(n: int, taper: int) -> np.ndarray:
    """1-D blending weight: linear taper over `taper` pixels at both ends, never zero."""
    i = np.arange(n, dtype=np.float32)
    if taper <= 0:
        return np.ones(n, np.float32)
    return np.clip(np.minimum(i + 0.5, n - i - 0.5) / taper, 1e-3, 1.0).astype(np.float32)


def window_starts(frames: int, stride: int) -> list[int]:
    """Cyclic 3-frame windows every `stride` frames; with stride <= 3 every frame is covered."""
    return list(range(0, frames, stride))


@dataclass
class _Plan:
    """How one slice splits into jobs."""

    frames: int  # after temporal upsampling
    height: int  # padded lq grid
    width: int
    ys: list[int]
    xs: list[int]
    windows: list[int]

    @property
    def tiles(self) -> list[tuple[int, int]]:
        return [(y, x) for y in self.ys for x in self.xs]

    @property
    def jobs(self) -> int:
        return len(self.windows) * len(self.ys) * len(self.xs)


@dataclass
class ModelMethod:
    """The latent diffusion model as a pipeline `Method` (see cinesr.worker.pipeline).

    engine: any Engine (create_engine(...)). steps: sampler steps (<= the model's T; fewer = respaced).
    seed: noise seed. stride: frames between window starts (1..3; 3 covers each frame once, 1 blends three
    windows per frame at 3x the cost). batch_size: windows per engine call. overlap: lq pixels shared by
    neighbouring tiles of images larger than the model grid. percentiles: robust intensity range.
    """

    engine: Engine
    steps: int = 15
    seed: int = 0
    stride: int | None = None  # None: the bundle's model.json "inference.stride", else DEFAULT_STRIDE
    batch_size: int | None = None  # None: the engine's preferred batch
    overlap: int = 16
    percentiles: tuple[float, float] = (0.5, 99.5)
    channel_weights: tuple[float, float, float] = (1.0, 2.0, 1.0)  # centre frame of a window counts most
    name: str = "model"
    version: str = ""
    _series_norm: tuple[list[np.ndarray], Normalisation] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.stride is None:
            inference = self.engine.model.meta.get("inference") or {}
            self.stride = int(inference.get("stride", DEFAULT_STRIDE))
        if not 1 <= self.stride <= WINDOW:
            raise ValueError(f"stride must be 1..{WINDOW} (larger strides leave frames uncovered)")
        if self.batch_size is None:
            self.batch_size = self.engine.preferred_batch
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        g = self.engine.geometry
        if not 0 <= self.overlap < g.lq_size // 2:
            raise ValueError(f"overlap must be in [0, {g.lq_size // 2})")
        self.engine.set_steps(self.steps)
        if not self.version:
            src = self.engine.model.source
            self.version = str(src.get("version") or f"{src.get('name', 'model')}-{str(src['sha256'])[:12]}")

    # -- Method protocol ---------------------------------------------------------------------------
    def parameters(self) -> dict[str, object]:
        # no backend/device/batch size here: they do not change the output beyond rounding, and the
        # derived UIDs must not change with them
        return {
            "steps": self.engine.plan.steps,
            "seed": self.seed,
            "stride": self.stride,
            "overlap": self.overlap,
            "percentiles": list(self.percentiles),
            "weights": str(self.engine.model.source["sha256"])[:16],
        }

    def units(self, series: CineSeries) -> int:
        """Progress units: sampler steps x windows x tiles over all slices. Also fixes the intensity
        normalisation for the whole series (the pipeline calls this before the slices)."""
        self.prepare(series)
        return sum(self._plan(s.frames.shape).jobs for s in series.slices) * self.engine.plan.steps

    def prepare(self, series: CineSeries) -> Normalisation:
        """Fit one intensity normalisation over every slice of the series (used for its slices)."""
        arrays = [s.frames for s in series.slices]
        norm = Normalisation.fit(arrays, *self.percentiles)
        self._series_norm = (arrays, norm)
        return norm

    def normalisation_for(self, frames: np.ndarray) -> Normalisation:
        if self._series_norm is not None and any(frames is a for a in self._series_norm[0]):
            return self._series_norm[1]
        return Normalisation.fit([frames], *self.percentiles)

    def superresolve_slice(self, frames: np.ndarray, step: Callable[[int], None]) -> np.ndarray:
        """(T, h, w) in series units -> (8T, 4h, 4w) in series units."""
        frames = np.asarray(frames)
        if frames.ndim != 3 or frames.shape[0] < 2:
            raise ValueError(f"need (T>=2, h, w) frames, got {frames.shape}")
        norm = self.normalisation_for(frames)
        lq = np.clip(interpolate_cine(norm.forward(frames), TEMPORAL_FACTOR), -1.0, 1.0)
        out = self.superresolve_frames(lq, step)
        return norm.inverse(out)

    # -- the work ---------------------------------------------------------------------------------
    def _plan(self, shape: tuple[int, ...]) -> _Plan:
        t, h, w = int(shape[0]), int(shape[1]), int(shape[2])
        size = self.engine.geometry.lq_size
        hp, wp = max(h, size), max(w, size)
        n = t * TEMPORAL_FACTOR
        return _Plan(n, hp, wp, tile_starts(hp, size, self.overlap), tile_starts(wp, size, self.overlap),
                     window_starts(n, self.stride))

    def _jobs(self, plan: _Plan) -> Iterator[tuple[int, int, int, int]]:
        """(window index, window start, tile y, tile x), windows outermost."""
        for wi, start in enumerate(plan.windows):
            for y, x in plan.tiles:
                yield wi, start, y, x

    def superresolve_frames(self, lq: np.ndarray, step: Callable[[int], None] | None = None) -> np.ndarray:
        """(N, h, w) temporally upsampled frames in [-1, 1] -> (N, 4h, 4w) in [-1, 1] (model units)."""
        return self.superresolve_stacks([lq], step)[0]

    def superresolve_stacks(
        self, stacks: list[np.ndarray], step: Callable[[int], None] | None = None
    ) -> list[np.ndarray]:
        """Several slices' (N_i, h_i, w_i) upsampled frames at once, batches filled across slices (a GPU
        batch of 8 is then rarely partial). The result equals running each stack on its own."""
        g = self.engine.geometry
        size, sf = g.lq_size, g.sf
        taper = self.overlap * sf
        tile_w = np.outer(_ramp(size * sf, taper), _ramp(size * sf, taper))
        cw = np.asarray(self.channel_weights, np.float32)
        padded, accs, wsums = [], [], []
        jobs: list[tuple[int, int, int, int, int]] = []  # (stack, window index, start, y, x)
        for i, lq in enumerate(stacks):
            n, h, w = lq.shape
            plan = self._plan((n // TEMPORAL_FACTOR, h, w))
            plan.frames, plan.windows = n, window_starts(n, self.stride)
            padded.append(_pad_to(lq, plan.height, plan.width))
            accs.append(np.zeros((n, plan.height * sf, plan.width * sf), np.float32))
            wsums.append(np.zeros_like(accs[-1]))
            jobs += [(i, *job) for job in self._jobs(plan)]
        for first in range(0, len(jobs), self.batch_size):
            batch = jobs[first : first + self.batch_size]
            windows = np.stack([
                padded[i][[(s + c) % len(padded[i]) for c in range(WINDOW)], y : y + size, x : x + size]
                for i, _, s, y, x in batch
            ])
            noise = torch.cat([self._noise(wi, y, x) for _, wi, _, y, x in batch], dim=1)
            report = (lambda k, total, m=len(batch): step(m)) if step is not None else None
            images = self.engine.superresolve(torch.from_numpy(windows), noise, report).numpy()
            for (i, _, s, y, x), img in zip(batch, images, strict=True):
                n = len(padded[i])
                ys, xs = slice(y * sf, (y + size) * sf), slice(x * sf, (x + size) * sf)
                for c in range(WINDOW):
                    f = (s + c) % n
                    accs[i][f, ys, xs] += cw[c] * tile_w * img[c]
                    wsums[i][f, ys, xs] += cw[c] * tile_w
        out = []
        for lq, acc, wsum in zip(stacks, accs, wsums, strict=True):
            h, w = lq.shape[1:]
            # the model's range, as in training; the intensity map's inverse then brings back series units
            out.append(np.clip((acc / np.maximum(wsum, 1e-12))[:, : h * sf, : w * sf], -1.0, 1.0))
        return out

    def superresolve_series(self, series: CineSeries, step: Callable[[int], None] | None = None) -> list[np.ndarray]:
        """All slices of a series with batches across slices: per slice (8T, 4h, 4w) in series units.
        Same result as the pipeline's slice-by-slice calls; `step` counts the same units as units()."""
        norm = self.prepare(series)
        stacks = [np.clip(interpolate_cine(norm.forward(s.frames), TEMPORAL_FACTOR), -1.0, 1.0) for s in series.slices]
        return [norm.inverse(o) for o in self.superresolve_stacks(stacks, step)]

    def _noise(self, window: int, y: int, x: int) -> torch.Tensor:
        """(steps, 1, C, s, s) noise for one job, from its own seeded generator."""
        g = self.engine.geometry
        key = (self.seed * 1_000_003 + window) * 1_000_003 + y * 4099 + x
        gen = torch.Generator().manual_seed(key % (1 << 63))
        return draw_noise((1, g.latent_channels, g.latent_size, g.latent_size), self.engine.plan.steps, gen)

    def describe(self) -> dict[str, Any]:
        return {"method": self.name, "version": self.version, **self.parameters(),
                "batch_size": self.batch_size, "engine": self.engine.describe()}


def _pad_to(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pad (N, h, w) at the bottom/right to at least (height, width): reflection where the image is
    large enough (no artificial edge for the network), edge replication otherwise."""
    n, h, w = frames.shape
    ph, pw = height - h, width - w
    if ph <= 0 and pw <= 0:
        return frames
    mode = "reflect" if ph < h and pw < w else "edge"
    return np.pad(frames, ((0, 0), (0, max(ph, 0)), (0, max(pw, 0))), mode=mode)
