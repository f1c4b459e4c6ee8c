"""Torch inference with a model bundle: batches of 3-frame low-resolution windows -> 4x larger windows.

A window is 3 consecutive (flow-interpolated) cine frames as the 3 channels, in [0, 1]. The VQGAN
encodes the bicubic-upsampled window (the shift target y), the 15-step residual-shifting sampler
runs the Swin-UNet conditioned on the window, and the VQGAN decodes the result.

The networks work on `lq_size` x `lq_size` windows (64 for the bundled configs). Other sizes are
handled here: smaller inputs are reflect-padded, larger ones are cut into overlapping tiles whose
outputs are blended with a smooth weight, so any (h, w) >= 2 works.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .bundle import ModelBundle
from .diffusion import sample, sample_deterministic, unet_denoiser, upsample_lq

Progress = Callable[[int, int], None]  # (windows done, windows total)


def _tiles(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size `tile` covering [0, length) with at least `overlap` overlap."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return sorted(set(starts))


def _blend_weight(size: int, scale: int) -> torch.Tensor:
    """(size*scale,)^2 weight: a raised cosine that stays positive at the borders (tiles overlap)."""
    n = size * scale
    ramp = 0.5 - 0.5 * torch.cos((torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 * torch.pi)
    w = ramp.clamp_min(1e-3)
    return w[:, None] * w[None, :]


@torch.no_grad()
def sample_latents(
    bundle: ModelBundle,
    lq: torch.Tensor,
    generators: list[torch.Generator],
    deterministic: bool = False,
) -> torch.Tensor:
    """(B, 3, s, s) windows in [-1, 1] on the bundle's device -> the sampler's final latents (B, C, s, s).

    Window b draws all its noise from generators[b] (on the CPU), so its result does not depend
    on which other windows share the batch, nor on the device.
    """
    schedule = bundle.schedule
    y = bundle.autoencoder.encode(upsample_lq(lq, bundle.scale))

    def noise() -> torch.Tensor:
        return torch.stack([torch.randn(y.shape[1:], generator=g) for g in generators]).to(y)

    denoise = unet_denoiser(bundle.unet)
    if deterministic:
        return sample_deterministic(denoise, y, lq, schedule, noise=noise())
    return sample(denoise, y, lq, schedule, noise=noise(), step_noise=noise)  # ResShift's ancestral sampler


@torch.no_grad()
def _run_windows(
    bundle: ModelBundle,
    lq: torch.Tensor,
    generators: list[torch.Generator],
    deterministic: bool,
) -> torch.Tensor:
    """(B, 3, s, s) windows in [-1, 1] on the bundle's device -> (B, 3, 4s, 4s) in [-1, 1]."""
    return bundle.autoencoder.decode(sample_latents(bundle, lq, generators, deterministic)).clamp(-1.0, 1.0)


def superresolve_windows(
    bundle: ModelBundle,
    windows: np.ndarray | torch.Tensor,
    *,
    seed: int = 0,
    batch_size: int = 8,
    deterministic: bool = False,
    progress: Progress | None = None,
) -> np.ndarray:
    """Super-resolve (B, 3, h, w) windows in [0, 1] -> (B, 3, 4h, 4w) float32 in [0, 1].

    `seed` fixes the sampler's noise: window i draws from its own stream (seed, i), so the same
    inputs and seed give the same output whatever the batch size. `deterministic=True` uses the
    DDIM-like sampler (noise only at the start) instead of ResShift's ancestral one.
    `progress(done, total)` is called after each batch of windows.
    """
    x = torch.as_tensor(np.asarray(windows, dtype=np.float32) if isinstance(windows, np.ndarray) else windows)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected (B, 3, h, w) windows, got {tuple(x.shape)}")
    x = x.float().clamp(0.0, 1.0) * 2.0 - 1.0
    b, _, h, w = x.shape
    size, sf = bundle.lq_size, bundle.scale
    # reflect-pad small inputs up to the network size (reflect needs pad < dim: repeat if necessary)
    while x.shape[-2] < size or x.shape[-1] < size:
        ph, pw = max(0, min(size - x.shape[-2], x.shape[-2] - 1)), max(0, min(size - x.shape[-1], x.shape[-1] - 1))
        x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="reflect")
    hp, wp = x.shape[-2:]
    rows, cols = _tiles(hp, size, size // 4), _tiles(wp, size, size // 4)
    tiles = [(r, c) for r in rows for c in cols]
    weight = _blend_weight(size, sf) if len(tiles) > 1 else torch.ones(size * sf, size * sf)
    out = torch.zeros(b, 3, hp * sf, wp * sf)
    norm = torch.zeros(1, 1, hp * sf, wp * sf)
    device = bundle.device
    total, done = b * len(tiles), 0
    jobs = [(i, r, c) for i in range(b) for r, c in tiles]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        batch = torch.stack([x[i, :, r : r + size, c : c + size] for i, r, c in chunk]).to(device)
        # one noise stream per (window, tile), from the seed and its position in this call
        gens = [torch.Generator().manual_seed((int(seed) * 1_000_003 + start + j) % 2**63) for j in range(len(chunk))]
        result = _run_windows(bundle, batch, gens, deterministic).float().cpu()
        for (i, r, c), tile in zip(chunk, result, strict=True):
            out[i, :, r * sf : (r + size) * sf, c * sf : (c + size) * sf] += tile * weight
            if i == 0:
                norm[0, 0, r * sf : (r + size) * sf, c * sf : (c + size) * sf] += weight
        done += len(chunk)
        if progress is not None:
            progress(done, total)
    out = out / norm
    out = out[:, :, : h * sf, : w * sf]
    return ((out + 1.0) / 2.0).clamp(0.0, 1.0).numpy().astype(np.float32)
