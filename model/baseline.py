"""The paper's non-learned baseline: cyclic optical-flow interpolation in time, then bicubic upsampling."""

from __future__ import annotations

import numpy as np
import torch

from .flow import interpolate_cine


def bicubic_up(frames: np.ndarray, factor: int = 4) -> np.ndarray:
    """(..., H, W) -> (..., factor*H, factor*W), bicubic with pixel centres aligned (half-pixel convention).

    Keys' cubic with a = -0.5 (as MATLAB's imresize and PIL; it reproduces linear ramps exactly), the same
    kernel family as the bicubic degradation in cinesr.model.degrade.

    The output's first pixel centre sits (factor-1)/(2*factor) input pixels before the input's first centre;
    the derived-series writer moves ImagePositionPatient accordingly.
    """
    frames = np.asarray(frames, dtype=np.float32)
    flat = frames.reshape(-1, *frames.shape[-2:])
    h, w = flat.shape[-2:]
    with torch.no_grad():
        out = torch.nn.functional.interpolate(torch.from_numpy(np.ascontiguousarray(flat))[:, None],
                                              scale_factor=factor, mode="bicubic", antialias=True,
                                              align_corners=False)[:, 0].numpy()
    return out.reshape(*frames.shape[:-2], h * factor, w * factor)


def baseline_superresolve(frames: np.ndarray, temporal: int = 8, spatial: int = 4) -> np.ndarray:
    """(T, h, w) low-resolution cine -> (temporal*T, spatial*h, spatial*w)."""
    return bicubic_up(interpolate_cine(frames, temporal), spatial)
