"""Intensity normalisation: series units <-> the model's units, the same map in training and inference.

A series' intensities (scanner units, any range) are mapped affinely so that their 0.5th percentile
goes to -1 and their 99.5th to +1. The map is fitted on the low-resolution acquisition, and applied
to its super-resolution too; its inverse brings the output back to series units exactly. Values are
clipped to `CLIP`, which leaves headroom above +1: a small bright structure that area averaging dims
in the acquisition is brighter than the acquisition's 99.5th percentile in the truth, and must not be
cut off there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CLIP = (-2.0, 2.0)  # the model's working range (inputs and outputs)
PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class Normalisation:
    """Affine map of intensities to the model's range: lo -> -1, hi -> +1 (and back, exactly)."""

    lo: float
    hi: float

    @classmethod
    def fit(cls, arrays: list[np.ndarray], low_pct: float = PERCENTILES[0], high_pct: float = PERCENTILES[1],
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


def clip(x: np.ndarray) -> np.ndarray:
    """Values in the model's working range."""
    return np.clip(x, *CLIP)
