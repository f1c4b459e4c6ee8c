"""MR Shepp-Logan cines from the phantominator package: ellipses of another author, moved periodically.

phantominator draws the modified Shepp-Logan phantom from a table of ellipses (grey value, semi-axes,
centre, angle). Here each patient jitters that table, and over the cycle the ellipses scale and shift
periodically (the large ones slightly, the small ones more), so the inner structures move as in a
beating, breathing body. phantominator renders hard (aliased) edges, so it is drawn at 2x and area
averaged to the requested size.
"""

from __future__ import annotations

import numpy as np

from .motion import cycle_weights
from .phantom_common import area_downsample


def shepp_logan_cine(rng: np.random.Generator, frames: int, size: int) -> np.ndarray:
    """(frames, size, size) float32 in [0, 1]."""
    try:
        from phantominator import ct_shepp_logan
        from phantominator.ct_shepp_logan import ct_modified_shepp_logan_params_2d
    except ImportError as exc:
        raise ImportError("Shepp-Logan cines need phantominator (pip install phantominator)") from exc
    table = ct_modified_shepp_logan_params_2d()
    n = table.shape[0]
    # rows 0 and 1 are the skull and the brain inside it: they keep their values and move together
    table[2:, 0] *= rng.uniform(0.5, 2.0, n - 2) * rng.choice([-1.0, 1.0], n - 2, p=[0.3, 0.7])
    table[:, 1:3] *= rng.uniform(0.85, 1.15, (n, 2))
    table[1, 1:3] = np.minimum(table[1, 1:3], table[0, 1:3] - 0.02)
    table[2:, 3:5] += rng.normal(0, 0.03, (n - 2, 2))
    table[2:, 5] += rng.normal(0, 0.15, n - 2)
    small = (table[:, 1] < 0.2).astype(np.float64)
    curve = cycle_weights(rng, frames)
    grow = rng.uniform(0.02, 0.12, n) * (1 + 2 * small)
    grow[1] = grow[0]
    shift = rng.normal(0, 0.02, (n, 2)) * (1 + 2 * small[:, None])
    shift[1] = shift[0]
    zoom = rng.uniform(0.75, 1.15)
    out = []
    for f in range(frames):
        e = table.copy()
        e[:, 1:3] *= zoom * (1 + grow[:, None] * curve[f])
        e[:, 3:5] = e[:, 3:5] * zoom + shift * curve[f]
        img = ct_shepp_logan((2 * size, 2 * size), E=e)
        out.append(area_downsample(np.asarray(img, np.float64), 2))
    cine = np.stack(out)
    hi = float(np.percentile(cine, 99.9))  # the background (0) stays black
    return np.clip(cine / max(hi, 1e-6), 0, 1).astype(np.float32)
