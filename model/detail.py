"""The detail gate: the network's added detail is kept only where the acquisition shows structure.

Part of the data-consistency step (it runs before the projection and is off with it). Where the
acquired frame is uniform over a few pixels (its local contrast below `threshold`), the output takes the
acquisition's own bicubic enlargement there instead of the network's detail: texture painted into a
region the acquisition shows flat is invented, and a reader could not tell it from tissue. Near edges
and in textured regions the detail stays whole; in between the weight ramps linearly, so no seam.

Measured (validation seeds 2000, 128-pixel phantoms of six sources, area and k-space acquisitions, the
bundled model, threshold 3% of the range against none): MRPhantom SSIM +0.006 on both acquisitions and LPIPS
-2.1 / -2.8 points (its uniform interiors lose the painted pattern); LPIPS -0.5..-1.6 points on the heart,
dead-leaves, Shepp-Logan and MotionClouds rows; the photograph/texture rows give back part of their large
LPIPS margin (-31% -> -27%) and flicker less (temporal error +3.0% -> +2.0%). PSNR within 0.06 dB
everywhere. Small bright structures keep their detail: their contrast opens the gate.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import uniform_filter

from .consistency import bicubic

BLOCK = 3  # acquired pixels across the neighbourhood whose contrast opens the gate


def local_contrast(acquired: np.ndarray, factor: int = 4, block: int = BLOCK) -> np.ndarray:
    """(..., h, w) acquired frames -> (..., factor*h, factor*w): the standard deviation over block x block
    acquired pixels round each pixel, enlarged to the output grid."""
    x = np.asarray(acquired, np.float64)
    size = (1,) * (x.ndim - 2) + (block, block)
    mean = uniform_filter(x, size=size, mode="reflect")
    var = uniform_filter(x * x, size=size, mode="reflect") - mean * mean
    return bicubic(np.sqrt(np.maximum(var, 0.0)), factor)


def gate(frames: np.ndarray, acquired: np.ndarray, threshold: float, factor: int = 4) -> np.ndarray:
    """(..., H, W) output frames with their detail over the acquisition's bicubic enlargement weighted by
    clip(contrast / threshold - 1, 0, 1): none below `threshold` (acquisition units), all above twice it."""
    if threshold <= 0:
        return np.asarray(frames, np.float32)
    reference = bicubic(acquired, factor)
    weight = np.clip(local_contrast(acquired, factor) / threshold - 1.0, 0.0, 1.0)
    return (reference + weight * (np.asarray(frames, np.float64) - reference)).astype(np.float32)
