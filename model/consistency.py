"""Data consistency: the output, put through the acquisition model, reproduces what was acquired.

A super-resolved frame may add detail above the acquisition's band; it must not contradict what was
measured. Two acquisition models are known here, both on the output grid of the pipeline (low-
resolution pixel i sits at the centre of output pixels 4i..4i+3, the half-pixel convention of the
derived series' geometry):

* ``area``: each low-resolution pixel is the mean of its 4x4 block of output pixels (a coarser pixel
  integrating the signal). Enforced by iterative back-projection with a bicubic lift of the residual:
  the correction is smooth, so no blocks come back (a nearest-neighbour lift would be the exact
  projection and would paint the 4x4 grid into the frame).
* ``area`` keeps a nonnegative acquisition's output nonnegative, alternating that bound with the
  consistency step: a dark halo below black round bright rims otherwise (measured on a ring phantom, undershoot -0.155
  of the range against the bicubic baseline's -0.067; -0.029 with the bound).
* ``kspace``: each low-resolution frame is the magnitude of the central 1/4 of k-space in each direction
  (an MR scanner's lower-resolution acquisition), sampled at the block centres. Enforced by replacing the
  output's central band with the acquisition's (the acquired magnitude takes a minus sign only where the
  output's band is negative and the acquisition comes near zero: a Gibbs lobe beside an edge on black),
  alternating with the nonnegative bound like ``area``; the last steps are unbounded. The band is exact
  below its outer 40% per direction (`taper`, the pipeline's ``kspace_taper``); across that edge the
  acquisition's weight falls to zero (a Tukey window) and the network's own band fills the rest. Exact to
  the edge, the projection put the truncation's Gibbs rings back into the output (the true band holds them,
  and the network's detail above the band cancelled them only in part). Validation seeds 2000-2002, k-space
  rows of the heart and MR phantoms (bench/results/options-20261207T200455Z.json): the fidelity bar met on 3
  of 5 rows tapered, 2 exact; MRPhantom SSIM -0.025 -> -0.009 against the baseline, Shepp-Logan -0.008 ->
  +0.000, at 1-4 points of LPIPS gain.
* ``both``: the mean of the two projections, for a series that does not say how it was acquired; each
  model is wrong for the other acquisition: ``area`` matches block means to a k-space acquisition's
  Gibbs overshoot and amplifies it (SSIM -0.021 against the baseline on the heart phantoms' k-space rows,
  validation seed 2000), ``kspace`` puts band-limited ringing beside sharp area-acquired edges on black
  (MRPhantom/area SSIM -0.080). The mean is within half their disagreement of either, and the two agree
  closely at low frequencies. Measured, it met the fidelity bar on 10 of 16 rows of validation seed 2000
  against 6 for ``area``, but on the model card's test seeds on 5 against ``area``'s 6 (it closed most of
  the k-space SSIM deficits and gave back LPIPS margin on area-acquired MRPhantom and MotionClouds), so it
  is an option, not the default (model.json `inference`).

``auto`` tells the acquisition from the acquired frames themselves (`detect`, cinesr.model.ringing):
``kspace`` where they ring beside bright edges on a dark background, else ``area``. An earlier ``auto``
took the model whose re-acquisition of the network's output was closer to the input (`choose`, still the
model the fidelity figure is measured with for ``both`` and ``off``); on the bundled model's output that
picked the same model for both acquisitions on seven of eight sources.

In time, frame 8i of the output is at the trigger time of acquired frame i: that frame is what was
measured, and the pipeline (cinesr.model.pipeline, `consistent_frames`) projects those frames only. The frames
between take the acquired frames' corrections carried along the acquisition's motion (the flows the temporal
interpolation followed), so nothing jumps at an acquired frame. Projecting every frame onto the flow
interpolation of the acquisition at its time (`all`, the earlier rule) held the output to something nobody
measured, and it flickered: on validation seeds 2000-2001 the temporal error against the truth was up to 9.9%
above the baseline's (MotionClouds, k-space), +0.9% with the acquired frames alone, lower on 15 of 16 rows.

Noise: an acquisition holds noise, which is no structure. Consistency can be enforced up to a tolerance
(`tolerance`, in the acquisition's units; the pipeline sets it to a multiple of the noise level that
`noise_sigma` estimates from the acquired frames): residuals within it are left alone, larger ones are
corrected by their excess (soft thresholding). So a network that removes the noise keeps its work, while
a structure it erased or invented (a residual well above the noise) comes back or goes. The shipped
multiple is 0 (exact consistency): on small or busy frames (an edge or texture in every block)
`noise_sigma` reads structure as noise (0.04-0.08 of the range on noise-free 32x32 acquisitions), and a
tolerance then leaves haze and halos in place.

`fidelity_db` measures the agreement: the PSNR between the output's acquired frames re-acquired and
the acquired frames (beyond the tolerance), over the acquisition's own range.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import minimum_filter

from .kspace import band, tukey, unband
from .phantom_common import area_downsample
from .ringing import rings

KINDS = ("area", "kspace")
MODES = ("both", "auto", *KINDS, "off")
# share of the acquisition's range below which an acquired magnitude counts as a zero crossing
ZERO_CROSSING = 0.02


def bicubic(x: np.ndarray, factor: int) -> np.ndarray:
    """(..., h, w) -> (..., factor*h, factor*w), bicubic (the lift of the consistency steps and the gate)."""
    flat = torch.from_numpy(np.ascontiguousarray(x.reshape(-1, 1, *x.shape[-2:]), dtype=np.float32))
    with torch.no_grad():
        up = F.interpolate(flat, scale_factor=factor, mode="bicubic", align_corners=False)
    return up.numpy().astype(np.float64).reshape(*x.shape[:-2], *up.shape[-2:])


def acquire(frames: np.ndarray, kind: str, factor: int = 4) -> np.ndarray:
    """The acquisition model: (..., H, W) output frames -> (..., H/factor, W/factor), noise-free."""
    x = np.asarray(frames, dtype=np.float64)
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"frames of {h}x{w} are not a multiple of {factor}")
    if kind == "area":
        return area_downsample(x, factor)
    if kind == "kspace":
        return np.abs(np.real(band(x, factor)))  # scanners store magnitude images
    raise ValueError(f"unknown acquisition model {kind!r} (one of {', '.join(KINDS)})")


def noise_sigma(acquired: list[np.ndarray], block: int = 4, percentile: float = 10.0) -> float:
    """The noise level of acquired frames (their units), from their flattest parts: the diagonal Haar
    details (a/2 - b/2 - c/2 + d/2 of each 2x2 group, whose standard deviation is that of white noise) in
    blocks of block x block, and the `percentile`-th block RMS. Flat background shows the noise alone; edges
    and texture, which fill most blocks of a busy low-resolution frame, do not count."""
    rms = []
    for frames in acquired:
        f = np.asarray(frames, np.float64)
        f = f.reshape(-1, *f.shape[-2:])
        n = 2 * block
        h, w = f.shape[-2] // n * n, f.shape[-1] // n * n
        if h == 0 or w == 0:
            continue
        f = f[:, :h, :w]
        hh = (f[:, 0::2, 0::2] - f[:, 0::2, 1::2] - f[:, 1::2, 0::2] + f[:, 1::2, 1::2]) / 2.0
        blocks = hh.reshape(hh.shape[0], h // n, block, w // n, block)
        rms.append(np.sqrt(np.mean(blocks**2, axis=(2, 4))).ravel())
    if not rms:
        return 0.0
    # the percentile of a block RMS of pure noise sits below sigma: sqrt(chi2 quantile / dof)
    from scipy.stats import chi2

    bias = math.sqrt(chi2.ppf(percentile / 100.0, block * block) / (block * block))
    return float(np.percentile(np.concatenate(rms), percentile)) / bias


def _tolerated(residual: np.ndarray, tolerance: float) -> np.ndarray:
    """The part of a residual beyond the tolerance (soft threshold)."""
    if tolerance <= 0:
        return residual
    return np.sign(residual) * np.maximum(np.abs(residual) - tolerance, 0.0)


def enforce(frames: np.ndarray, acquired: np.ndarray, kind: str, factor: int = 4, iterations: int = 8,
            tolerance: float = 0.0, nonnegative: bool | None = None, taper: float = 0.0) -> np.ndarray:
    """(..., H, W) frames made consistent with (..., H/f, W/f) acquired frames under the model `kind`, up
    to `tolerance` (acquisition units) per low-resolution pixel.

    nonnegative (None: when every acquired value is >= 0, as in MR magnitude images; area model only): the
    steps first keep the output at or above zero, alternating the two constraints (projections onto convex
    sets; the truth satisfies both). Without it, a blurred bright edge's excess outside the edge is
    subtracted smoothly over the dark side and digs a dark halo below black round bright rims; with it that
    excess is taken from the pixels that hold it.

    taper (kspace model only): the outer share of the band, per direction, where the acquisition's weight
    falls from 1 to 0 (a Tukey window); there the output's band is the weighted mean of the acquisition's and
    the network's own. Below it the band is the acquisition's, exactly. 0: the whole band is exact."""
    if kind == "both":
        # the acquisition's point-spread is not known: the mean of the two projections is consistent with
        # whichever made the input to within half their disagreement (measured: see the module docstring)
        return ((enforce(frames, acquired, "area", factor, iterations, tolerance, nonnegative)
                 + enforce(frames, acquired, "kspace", factor, iterations, tolerance, nonnegative, taper)) / 2.0)
    x = np.asarray(frames, dtype=np.float64)
    y = np.asarray(acquired, dtype=np.float64)
    floor = 0.0 if (nonnegative if nonnegative is not None else bool(y.size and y.min() >= 0)) else None
    if kind == "kspace":
        # The acquisition is a magnitude: where the band-limited signal dips below zero (a Gibbs lobe beside
        # an edge on black) the acquired value is its absolute value. Such a dip passes through zero, so the
        # acquired magnitude comes near zero next to it: only there does the output's own band (negative)
        # give the acquired value a minus sign. Elsewhere a negative band is the network's error, and flipping
        # it (as an earlier rule did) changed sign from frame to frame: texture flickered (temporal error
        # +58% against +1.4% with this rule, validation seed 2000). Each step is an exact projection for the
        # signs it assumes; with the bound, the first steps alternate it (the truth is >= 0) and the last
        # ones are unbounded, so the output reproduces the acquisition.
        span = float(np.percentile(y, 99.5) - np.percentile(y, 0.5)) if y.size else 0.0
        near_zero = minimum_filter(y, size=(1,) * (y.ndim - 2) + (3, 3)) < ZERO_CROSSING * span
        steps = iterations if floor is not None else max(1, iterations // 2)
        # The band's outer edge is where the truncation's Gibbs rings live: an exact edge puts them back into
        # the output, and the network's detail above the band cancels them only in part. Tapered, that edge
        # keeps some of the network's own band (weights on the small grid's unshifted spectrum).
        keep = None if taper <= 0 else 1.0 - np.fft.ifftshift(np.outer(tukey(y.shape[-2], taper),
                                                                       tukey(y.shape[-1], taper)))
        own = np.real(band(x, factor)) if keep is not None else None
        for step in range(steps):
            if floor is not None and step < steps - 2:
                x = np.maximum(x, floor)
            current = np.real(band(x, factor))
            target = np.where((current < 0) & (y > 0) & near_zero, -y, y)
            if keep is not None:
                target = target + np.real(np.fft.ifft2(keep * np.fft.fft2(own - target)))
            x = x + unband(_tolerated(target - current, tolerance), factor)
        return x.astype(np.float32)
    if kind != "area":
        raise ValueError(f"unknown acquisition model {kind!r} (one of {', '.join(KINDS)}, both)")
    # converges geometrically: the block mean of a bicubic lift keeps most of it. With the bound, the last
    # steps are unbounded, so that the output reproduces the acquisition to rounding (their lift is tiny).
    for step in range(iterations + (iterations // 2 if floor is not None else 0)):
        if floor is not None and step < iterations:
            x = np.maximum(x, floor)
        x = x + bicubic(_tolerated(y - acquire(x, kind, factor), tolerance), factor)
    return x.astype(np.float32)


def residual_rms(frames: np.ndarray, acquired: np.ndarray, kind: str, factor: int = 4,
                 tolerance: float = 0.0) -> float:
    """Root mean square of (re-acquired frames - acquired frames), beyond the tolerance."""
    residual = acquire(frames, kind, factor) - np.asarray(acquired, np.float64)
    return float(np.sqrt(np.mean(_tolerated(residual, tolerance) ** 2)))


def detect(acquired: list[np.ndarray]) -> str:
    """The acquisition model of these acquired frames: kspace where they show Gibbs ringing, else area."""
    return "kspace" if rings(acquired) else "area"


def choose(frames: list[np.ndarray], acquired: list[np.ndarray], factor: int = 4) -> str:
    """The acquisition model that explains the acquired frames best from the network's output."""
    errors = {k: sum(residual_rms(f, a, k, factor) ** 2 for f, a in zip(frames, acquired, strict=True))
              for k in KINDS}
    return min(errors, key=errors.__getitem__)


FIDELITY_CAP_DB = 99.0  # agreement to rounding: a finite number, for JSON and metrics


def fidelity_db(frames: np.ndarray, acquired: np.ndarray, kind: str, factor: int = 4,
                data_range: float | None = None, tolerance: float = 0.0) -> float:
    """PSNR (dB) of the re-acquired frames against the acquired ones (disagreement beyond the tolerance),
    capped at FIDELITY_CAP_DB; the range defaults to the acquired frames' own (max - min) (the pipeline
    passes its intensity map's span)."""
    y = np.asarray(acquired, np.float64)
    rng = float(data_range if data_range is not None else (y.max() - y.min()) or 1.0)
    rms = residual_rms(frames, y, kind, factor, tolerance)
    if rms <= rng * 10 ** (-FIDELITY_CAP_DB / 20):
        return FIDELITY_CAP_DB
    return round(20.0 * math.log10(rng / rms), 2)
