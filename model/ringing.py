"""Gibbs ringing in an acquisition: how `auto` consistency tells a k-space acquisition from an area-averaged one.

A series does not say how it was acquired, and the two acquisition models of cinesr.model.consistency are
each wrong for the other acquisition. What tells them apart is in the acquired frames themselves: a
k-space-truncated frame is band-limited, so a bright edge on a dark background rings, and the magnitude
image shows the lobes as small bumps in the dark beside the edge, 1-4 pixels out. An area-averaged frame
integrates the edge into one intermediate pixel and is flat beyond it.

The measure: among dark pixels (below 12% of the acquisition's range) 1.5-4 pixels from a bright one
(above 40%), the share that is a local maximum along a row or column by more than a small amplitude (1% or
2% of the range), and the same share among dark pixels more than 5 pixels from any bright one. Noise makes
bumps near and far alike; ringing makes them near. Where the dark regions ring everywhere (small ones, between
several edges), near and far are alike too, and what tells ringing from noise is the bumps' height: by 4% of
the range on 12% or more of the pixels near edges (area acquisitions with noise of 2% of the range showed at
most 7%, with 3% up to about 12%: 2 of 160 were called k-space). Measured on the project's sources (128-pixel truth,
32-pixel acquisitions, validation seeds 2000-2009, noise-free acquisitions): at 2%, area acquisitions show
at most 0.043 near, k-space acquisitions of the heart phantoms and dead leaves 0.094-0.31; MRPhantom and
Shepp-Logan ring more faintly (0.065-0.13 near at 1%, with few bumps far). Content without dark regions
(textures, MotionClouds) shows neither and counts as area-averaged. The verdicts of `rings` on those seeds:
no area acquisition called k-space (80 noise-free, 80 with noise of 1% and 80 of 2% of the range, clipped at
zero as magnitude images are); k-space acquisitions found: 41 of 80 noise-free (MRPhantom 10, `sax-fourier` 8,
`lax` 8, `sax` 7, Shepp-Logan 7, textures 1, dead leaves and MotionClouds 0), 24 with 1% noise, 6 with 2%: noise
hides the ringing, and such a series counts as area-averaged, the model the default had before it could tell.
With the 4% rule added, on seeds 1000-1009 and 2000-2009 together (160 acquisitions of each kind per noise
level): k-space found 90 noise-free (was 85), 56 with 1% noise (48), 43 with 2% (9), 55 with 3% (0); area
acquisitions called k-space: 3 noise-free (`sax` 1001 and 1008, `lax` 1003, by the faint 1% rule, as before),
none with 1% or 2% noise, 2 of 160 with 3% (`lax`, by the 4% rule).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import distance_transform_edt

DARK, BRIGHT = 0.12, 0.40  # shares of the acquisition's range
NEAR, FAR = (1.5, 4.0), 5.0  # pixels from the nearest bright pixel
MIN_PIXELS = 50  # dark pixels near bright ones needed for a verdict


def bump_rates(frames: Sequence[np.ndarray], by: float) -> tuple[float, float, int, int]:
    """(near rate, far rate, dark pixels near bright ones, dark pixels far from them) of bumps higher than
    `by` (share of the range) over (..., h, w) acquired frames; see the module docstring. Rates are 0 where
    there are no such pixels."""
    return _rates(frames, (by,))[0]


def _rates(frames: Sequence[np.ndarray], amplitudes: Sequence[float]) -> list[tuple[float, float, int, int]]:
    """bump_rates for several amplitudes in one pass (the normalisation and distance map once per frame)."""
    stacks = [np.asarray(f, np.float64).reshape(-1, *np.shape(f)[-2:]) for f in frames]
    values = np.concatenate([s.ravel() for s in stacks]) if stacks else np.zeros(0)
    none = [(0.0, 0.0, 0, 0)] * len(amplitudes)
    if values.size == 0:
        return none
    lo, hi = np.percentile(values, [0.5, 99.5])
    if hi <= lo:
        return none
    near_bumps, far_bumps = np.zeros(len(amplitudes), int), np.zeros(len(amplitudes), int)
    near_count = far_count = 0
    for stack in stacks:
        for frame in (stack - lo) / (hi - lo):
            dark, bright = frame < DARK, frame > BRIGHT
            if not dark.any() or not bright.any():
                continue
            distance = distance_transform_edt(~bright)
            near = dark & (distance >= NEAR[0]) & (distance <= NEAR[1])
            far = dark & (distance > FAR)
            near_count += int(near.sum())
            far_count += int(far.sum())
            for i, by in enumerate(amplitudes):
                bumps = _local_maxima(frame, by)
                near_bumps[i] += int(bumps[near].sum())
                far_bumps[i] += int(bumps[far].sum())
    return [(int(n) / max(near_count, 1), int(f) / max(far_count, 1), near_count, far_count)
            for n, f in zip(near_bumps, far_bumps, strict=True)]


def _local_maxima(frame: np.ndarray, by: float) -> np.ndarray:
    """Pixels above both neighbours by more than `by`, along rows or along columns."""
    out = np.zeros(frame.shape, bool)
    for axis in (0, 1):
        a = np.moveaxis(frame, axis, -1)
        m = np.zeros(a.shape, bool)
        m[..., 1:-1] = (a[..., 1:-1] > a[..., :-2] + by) & (a[..., 1:-1] > a[..., 2:] + by)
        out |= np.moveaxis(m, -1, axis)
    return out


def rings(frames: Sequence[np.ndarray]) -> bool:
    """Does this acquisition ring like a k-space truncation? Clear bumps (2% of the range) beside bright
    edges in the dark on at least a tenth of those pixels, or faint ones (1%) on 6%, either way clearly more
    than far from edges, where noise would put as many (so dark pixels far from edges are needed too); or
    bumps of 4% on at least 12% of them, near or far alike: more than noise of up to 3% of the range makes
    (at most 11% of them on area acquisitions; see the module docstring)."""
    (near2, far2, count, far_count), (near1, far1, _, _), (near4, _, _, _) = _rates(frames, (0.02, 0.01, 0.04))
    if min(count, far_count) < MIN_PIXELS:
        return False
    return ((near2 >= 0.1 and near2 >= 1.5 * far2 + 0.02) or (near1 >= 0.06 and near1 >= 1.5 * far1 + 0.03)
            or near4 >= 0.12)
