"""Dead-leaves cines: occluding discs and ellipses of power-law sizes, each moving periodically.

Dead-leaves images share the edge and size statistics of natural images (Lee, Mumford and Huang,
2001) and are a standard test chart for texture loss in super-resolution: what a model paints in
or smooths away shows at every scale. Here each leaf also moves on its own periodic path, so a
cine of them is a hard temporal test too. Edges are anti-aliased by area coverage.
"""

from __future__ import annotations

import numpy as np

from .phantom_common import coverage


def dead_leaves_cine(rng: np.random.Generator, frames: int, size: int, leaves: int | None = None,
                     r_min: float = 3.0, r_max: float | None = None) -> np.ndarray:
    """(frames, size, size) float32 in [0, 1]; radii follow the 1/r^3 law between r_min and r_max px."""
    r_max = r_max or size / 3.0
    n = leaves or int(rng.integers(800, 1500))
    # inverse-CDF draw of p(r) ~ r^-3 on [r_min, r_max]
    u = rng.uniform(size=n)
    radii = (r_min**-2 - u * (r_min**-2 - r_max**-2)) ** -0.5
    aspect = rng.uniform(0.5, 1.0, n)
    angle0 = rng.uniform(0, np.pi, n)
    grey = rng.beta(0.8, 0.8, n) * rng.uniform(0.6, 1.0) + rng.uniform(0, 0.1)
    centre = rng.uniform(-0.1 * size, 1.1 * size, (n, 2))
    amplitude = rng.uniform(0, 0.06 * size, (n, 2)) * (rng.uniform(size=(n, 1)) < 0.8)
    phase = rng.uniform(0, 2 * np.pi, (n, 2))
    pulse = rng.uniform(0, 0.25, n) * (rng.uniform(size=n) < 0.4)  # some leaves breathe, as a ventricle does
    spin = rng.uniform(-0.3, 0.3, n)
    background = rng.uniform(0, 0.3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    out = np.empty((frames, size, size), np.float32)
    for f in range(frames):
        t = 2 * np.pi * f / frames
        img = np.full((size, size), background, np.float32)
        for i in range(n):  # later leaves fall on top
            cx = centre[i, 0] + amplitude[i, 0] * np.sin(t + phase[i, 0])
            cy = centre[i, 1] + amplitude[i, 1] * np.sin(t + phase[i, 1])
            r = radii[i] * (1.0 + pulse[i] * np.sin(t + phase[i, 0]))
            a, b = r, r * aspect[i]
            x0, x1 = int(max(0, cx - a - 2)), int(min(size, cx + a + 3))
            y0, y1 = int(max(0, cy - a - 2)), int(min(size, cy + a + 3))
            if x0 >= x1 or y0 >= y1:
                continue
            ang = angle0[i] + spin[i] * np.sin(t)
            dx, dy = xx[y0:y1, x0:x1] - cx, yy[y0:y1, x0:x1] - cy
            u_, v_ = np.cos(ang) * dx + np.sin(ang) * dy, -np.sin(ang) * dx + np.cos(ang) * dy
            rho = np.sqrt((u_ / a) ** 2 + (v_ / b) ** 2)
            sd = (rho - 1.0) * b  # distance in px, exact on the boundary for circles
            cover = coverage(sd, 1.0)
            patch = img[y0:y1, x0:x1]
            patch += cover * (grey[i] - patch)
        out[f] = img
    return np.clip(out, 0.0, 1.0)
