"""Periodic smooth motion for content that has none of its own (still images, static phantoms).

A cine is one cardiac cycle, so every deformation here returns to its start after `frames` frames:
displacements are sums of a few harmonics of the cycle, applied to smooth random fields (elastic
part) and to a global affine map (breathing-like scale, shift and rotation).
"""

from __future__ import annotations

import cv2
import numpy as np

from .phantom_common import smooth_noise


def cycle_weights(rng: np.random.Generator, frames: int, harmonics: int = 2) -> np.ndarray:
    """(frames,) periodic curve in [-1, 1]: a random mix of the first harmonics of the cycle."""
    t = np.arange(frames) / frames
    curve = np.zeros(frames)
    for k in range(1, harmonics + 1):
        curve += rng.uniform(0.2, 1.0) / k * np.sin(2 * np.pi * k * t + rng.uniform(0, 2 * np.pi))
    peak = np.abs(curve).max()
    return curve / peak if peak > 0 else curve


def periodic_warp(image: np.ndarray, rng: np.random.Generator, frames: int, size: int,
                  elastic_px: float = 4.0, affine: float = 0.04, smoothness_px: float = 24.0) -> np.ndarray:
    """(frames, size, size) views of a larger `image`, deformed periodically over the cycle.

    The centre `size` x `size` region of `image` (which should be somewhat larger, so that the
    deformation never reaches its border) moves elastically by up to about `elastic_px` pixels and
    is scaled/rotated by up to `affine` (relative) over the cycle.
    """
    h, w = image.shape
    fields = [smooth_noise(rng, (size, size), smoothness_px) for _ in range(2)]
    elastic_curve = cycle_weights(rng, frames)
    affine_curve = cycle_weights(rng, frames)
    angle_scale = rng.uniform(-1, 1) * affine
    zoom_scale = rng.uniform(-1, 1) * affine
    gy, gx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = (size - 1) / 2.0, (size - 1) / 2.0
    oy, ox = (h - size) / 2.0, (w - size) / 2.0
    out = np.empty((frames, size, size), np.float32)
    src = np.asarray(image, np.float32)
    for f in range(frames):
        a = affine_curve[f]
        ang, zoom = angle_scale * a, 1.0 + zoom_scale * a
        c, s = np.cos(ang) / zoom, np.sin(ang) / zoom
        x = c * (gx - cx) - s * (gy - cy) + cx + ox + elastic_px * elastic_curve[f] * fields[0]
        y = s * (gx - cx) + c * (gy - cy) + cy + oy + elastic_px * elastic_curve[f] * fields[1]
        out[f] = cv2.remap(src, x.astype(np.float32), y.astype(np.float32), interpolation=cv2.INTER_CUBIC,
                           borderMode=cv2.BORDER_REFLECT)
    return np.clip(out, 0.0, 1.0)
