"""Windows and tiles: how a temporally upsampled cine becomes network-sized jobs, and back.

    (N, h, w) frames in model units
    --(pad to at least the network grid, mirrored)--> tiles of lq_size x lq_size, `overlap` shared
    --(3-frame windows every `stride` frames, cyclic)--> jobs = windows x tiles
    --(batches of jobs through a WindowRunner: encode(bicubic x4) -> sampler -> decode)--> 4x windows
    --(blend: windows covering a frame weighted by channel, tiles by a linear taper; crop)--> (N, 4h, 4w)

A `WindowRunner` is anything with the network geometry, a sampler plan and
`superresolve(lq (B, 3, s, s), noise (steps, B, C, s/f*4, ...), on_step) -> (B, 3, 4s, 4s)`: every
inference engine of the worker package, and `cinesr.model.inference.TorchRunner` for a bundle in memory.
The noise of every job comes from its own generator, seeded by (seed, window, tile), so the result
does not depend on the batch size, the order of the jobs or the backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from .diffusion import SamplerPlan, draw_noise

WINDOW = 3  # frames per window: the three channels of the networks

StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class Geometry:
    """Fixed shapes of one window: lq (3, lq_size^2) -> image (3, (sf*lq_size)^2); the latent has
    `latent_channels` channels at 1/`latent_factor` of the image size."""

    lq_size: int = 64
    sf: int = 4
    channels: int = 3
    latent_channels: int = 3
    latent_factor: int = 4

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], latent_factor: int) -> Geometry:
        """From a network config (unet_config, diffusion) and the autoencoder's downsampling factor."""
        ucfg = cfg["unet_config"].get("params", cfg["unet_config"])
        diffusion = cfg.get("diffusion") or {}
        return cls(
            lq_size=int(ucfg.get("lq_size") or ucfg["image_size"]),
            sf=int(diffusion.get("params", diffusion).get("sf", 4)),
            channels=WINDOW,
            latent_channels=int(ucfg.get("in_channels", 3)),
            latent_factor=int(latent_factor),
        )

    @property
    def image_size(self) -> int:
        return self.lq_size * self.sf

    @property
    def latent_size(self) -> int:
        return self.image_size // self.latent_factor

    def shapes(self, batch: int | str = "B") -> dict[str, list[int | str]]:
        lat = [batch, self.latent_channels, self.latent_size, self.latent_size]
        img = [batch, self.channels, self.image_size, self.image_size]
        return {
            "encoder.images": img,
            "encoder.latents": lat,
            "unet.x": lat,
            "unet.t": [batch],
            "unet.lq": [batch, self.channels, self.lq_size, self.lq_size],
            "unet.x0": lat,
            "decoder.latents": lat,
            "decoder.images": img,
        }


class WindowRunner(Protocol):
    geometry: Geometry
    plan: SamplerPlan

    def superresolve(self, lq: torch.Tensor, noise: torch.Tensor,
                     on_step: StepCallback | None = None) -> torch.Tensor: ...


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` pixels covering `size` (>= tile) with at least `overlap`."""
    if size <= tile:
        return [0]
    step = tile - overlap
    n = math.ceil((size - tile) / step) + 1
    # spread the tiles evenly so every overlap is about the same width
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def window_starts(frames: int, stride: int) -> list[int]:
    """Cyclic 3-frame windows every `stride` frames; with stride <= 3 every frame is covered."""
    return list(range(0, frames, stride))


def ramp(n: int, taper: int) -> np.ndarray:
    """1-D blending weight: linear taper over `taper` pixels at both ends, never zero."""
    i = np.arange(n, dtype=np.float32)
    if taper <= 0:
        return np.ones(n, np.float32)
    return np.clip(np.minimum(i + 0.5, n - i - 0.5) / taper, 1e-3, 1.0).astype(np.float32)


def pad_to(frames: np.ndarray, height: int, width: int) -> tuple[np.ndarray, int, int]:
    """Pad (N, h, w) to at least (height, width) with the mirror image (edge pixel repeated, as often as
    needed), the frame centred: the network sees continuous content and no artificial edge, and a frame
    smaller than a tile keeps its borders away from the tile's. Returns the padded frames and the offset
    (top, left) of the frame in them. Measured on 128-pixel phantoms (32-pixel acquisitions in a 64-pixel
    tile): edge replication at the bottom/right left long flat streaks that the network answered with a
    global brightness lift (+0.05 of the range; mirroring: sax raw PSNR -1.8 -> +0.1 dB of the baseline)."""
    n, h, w = frames.shape
    ph, pw = max(height - h, 0), max(width - w, 0)
    if ph == 0 and pw == 0:
        return frames, 0, 0
    top, left = ph // 2, pw // 2
    return np.pad(frames, ((0, 0), (top, ph - top), (left, pw - left)), mode="symmetric"), top, left


@dataclass(frozen=True)
class Tiling:
    """Where the jobs of one stack of frames lie: window starts (frames) and tile starts (lq pixels)."""

    frames: int
    height: int  # padded lq grid
    width: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    windows: tuple[int, ...]

    @classmethod
    def of(cls, frames: int, h: int, w: int, lq_size: int, stride: int, overlap: int) -> Tiling:
        hp, wp = max(h, lq_size), max(w, lq_size)
        return cls(frames, hp, wp, tuple(tile_starts(hp, lq_size, overlap)), tuple(tile_starts(wp, lq_size, overlap)),
                   tuple(window_starts(frames, stride)))

    @property
    def jobs(self) -> int:
        return len(self.windows) * len(self.ys) * len(self.xs)


def job_noise(seed: int, window: int, y: int, x: int, geometry: Geometry, steps: int) -> torch.Tensor:
    """(steps, 1, C, s, s) sampler noise of one job, from its own seeded generator."""
    key = (seed * 1_000_003 + window) * 1_000_003 + y * 4099 + x
    gen = torch.Generator().manual_seed(key % (1 << 63))
    g = geometry
    return draw_noise((1, g.latent_channels, g.latent_size, g.latent_size), steps, gen)


def superresolve_stacks(
    stacks: list[np.ndarray],
    runner: WindowRunner,
    *,
    seed: int = 0,
    stride: int = 1,
    overlap: int = 16,
    channel_weights: tuple[float, float, float] = (1.0, 2.0, 1.0),
    batch_size: int = 1,
    clip: tuple[float, float] | None = None,
    step: Callable[[int], None] | None = None,
    shared_noise: bool = False,
) -> list[np.ndarray]:
    """Several stacks of (N_i, h_i, w_i) frames in model units at once -> (N_i, 4h_i, 4w_i).

    Batches are filled across stacks (a GPU batch of 8 is then rarely partial); the result equals
    running each stack on its own. `step(n)` is called as n progress units (sampler steps of one job)
    complete. `clip` bounds the result (the model's range). shared_noise: every window of a tile starts
    from the same noise (windows overlap in time, so what the noise decides stays put from frame to frame
    instead of changing with the window); otherwise each window draws its own."""
    g = runner.geometry
    size, sf = g.lq_size, g.sf
    steps = runner.plan.steps
    taper = overlap * sf
    tile_w = np.outer(ramp(size * sf, taper), ramp(size * sf, taper))
    cw = np.asarray(channel_weights, np.float32)
    padded, offsets, accs, wsums = [], [], [], []
    jobs: list[tuple[int, int, int, int, int]] = []  # (stack, window index, start, y, x)
    for i, lq in enumerate(stacks):
        n, h, w = lq.shape
        tiling = Tiling.of(n, h, w, size, stride, overlap)
        frames, top, left = pad_to(np.asarray(lq, np.float32), tiling.height, tiling.width)
        padded.append(frames)
        offsets.append((top * sf, left * sf))
        accs.append(np.zeros((n, tiling.height * sf, tiling.width * sf), np.float32))
        wsums.append(np.zeros_like(accs[-1]))
        jobs += [(i, wi, s, y, x) for wi, s in enumerate(tiling.windows) for y in tiling.ys for x in tiling.xs]
    for first in range(0, len(jobs), batch_size):
        batch = jobs[first : first + batch_size]
        windows = np.stack([
            padded[i][[(s + c) % len(padded[i]) for c in range(WINDOW)], y : y + size, x : x + size]
            for i, _, s, y, x in batch
        ])
        noise = torch.cat([job_noise(seed, 0 if shared_noise else wi, y, x, g, steps) for _, wi, _, y, x in batch],
                          dim=1)
        report = (lambda k, total, m=len(batch): step(m)) if step is not None else None
        images = runner.superresolve(torch.from_numpy(windows), noise, report).numpy()
        for (i, _, s, y, x), img in zip(batch, images, strict=True):
            n = len(padded[i])
            ys, xs = slice(y * sf, (y + size) * sf), slice(x * sf, (x + size) * sf)
            for c in range(WINDOW):
                f = (s + c) % n
                accs[i][f, ys, xs] += cw[c] * tile_w * img[c]
                wsums[i][f, ys, xs] += cw[c] * tile_w
    out = []
    for lq, acc, wsum, (top, left) in zip(stacks, accs, wsums, offsets, strict=True):
        h, w = lq.shape[1:]
        blended = (acc / np.maximum(wsum, 1e-12))[:, top : top + h * sf, left : left + w * sf]
        out.append(np.clip(blended, *clip) if clip else blended)
    return out


def progress_units(shapes: list[tuple[int, int, int]], runner: WindowRunner, stride: int, overlap: int) -> int:
    """Progress units of superresolve_stacks over stacks of these (N, h, w) shapes."""
    size = runner.geometry.lq_size
    return sum(Tiling.of(n, h, w, size, stride, overlap).jobs for n, h, w in shapes) * runner.plan.steps
