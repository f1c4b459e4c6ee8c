"""Synthetic short-axis cardiac cine studies (arrays + geometry) for training and testing.

`make_study(seed, generator=...)` returns a `PhantomStudy`: magnitude frames (S, T, H, W) in
[0, 1] over one R-R interval, plus the DICOM geometry (orientation, positions, spacing) and
timing. Structurally different generators exist so that a model trained on one can be tested on
another:

* ``"sax"``: a detailed anatomical model (ellipsoidal LV with trabeculae and papillary muscles,
  RV crescent, epicardial fat, chest with lungs/liver/spine/aorta), a piecewise physiological
  volume curve, soft-edge rendering and band-limited (truncated k-space) Rician acquisition.
* ``"sax-fourier"``: Fourier-descriptor contours, a polar-band RV, a von Mises mixture volume
  curve, spectral-synthesis textures, 2x supersampled hard-edge rendering with a Gaussian PSF,
  coil-array shading and image-domain Rician noise.
* ``"lax"``: a four-chamber long-axis view (ventricles, atria, valves, AV-plane descent) over
  the "sax" chest and acquisition: a different view for generalisation tests. Its
  ``image_orientation`` is a four-chamber plane and its slices are parallel four-chamber planes.

Content that is not one of these hearts, so that a prior learned from it is not a cartoon of one phantom
(each slice an independent noise-free cine in a generic short-axis geometry):

* ``"deadleaves"``: occluding leaves of power-law sizes, each on its own periodic path (ours).
* ``"texture"``: photographs and textures shipped with scikit-image, deformed periodically.
* ``"shepp-logan"``: phantominator's modified Shepp-Logan ellipses, moved periodically.
* ``"mrphantom"``, ``"motioncloud"``: third-party cine generators kept for evaluation only
  (`THIRD_PARTY`, see cinesr.model.external).

`degrade_acquisition` makes the matching low-resolution acquisition (every 8th frame, 4x
smaller by area averaging) with consistent geometry.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
from cinesr.model import phantom_fourier, phantom_lax, phantom_sax
from cinesr.model.deadleaves import dead_leaves_cine
from cinesr.model.external import motioncloud_cine, mrphantom_cine
from cinesr.model.phantom_common import PhantomStudy, area_downsample, normalise_study, sax_geometry
from cinesr.model.shepp_logan import shepp_logan_cine
from cinesr.model.textures import texture_cine

__all__ = ["GENERATORS", "HEART_GENERATORS", "THIRD_PARTY", "PhantomStudy", "degrade_acquisition", "lv_region",
           "make_study", "motion_curve"]

_MODULES = {"sax": phantom_sax, "sax-fourier": phantom_fourier, "lax": phantom_lax}
# Content that is not one of our hearts: (seed-free) functions (rng, frames, size) -> (T, H, W) in [0, 1].
_CONTENT = {"deadleaves": dead_leaves_cine, "texture": texture_cine, "shepp-logan": shepp_logan_cine,
            "mrphantom": mrphantom_cine, "motioncloud": motioncloud_cine}

HEART_GENERATORS: tuple[str, ...] = tuple(_MODULES)
GENERATORS: tuple[str, ...] = (*_MODULES, *_CONTENT)
# Sources written by others, kept out of training: the honest "never seen" test (cinesr.model.external).
THIRD_PARTY: tuple[str, ...] = ("mrphantom", "motioncloud")


def _streams(seed: int, generator: str) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    """Independent random streams: patient parameters, rendering (textures, noise), geometry.

    Parameters come from their own stream so that the patient (and its motion curve) does not
    depend on the requested size, slice or frame count.
    """
    if generator not in GENERATORS:
        raise ValueError(f"unknown phantom generator {generator!r}; choose one of {', '.join(GENERATORS)}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    ss = np.random.SeedSequence([seed, zlib.crc32(generator.encode())])
    a, b, c = ss.spawn(3)
    return np.random.default_rng(a), np.random.default_rng(b), np.random.default_rng(c)


def motion_curve(seed: int, phase: np.ndarray, generator: str = "sax") -> np.ndarray:
    """Relative LV cavity area of patient `seed` at cardiac `phase` (fraction of R-R; periodic).

    1.0 is end-diastole; the minimum is end-systole. This is the curve that drives the frames of
    `make_study(seed, generator=generator)`.
    """
    params_rng, _, _ = _streams(seed, generator)
    module = _heart(generator)
    return module.area_curve(module.sample_params(params_rng), np.asarray(phase, dtype=np.float64))


def lv_region(seed: int, generator: str = "sax") -> tuple[np.ndarray, float]:
    """Where the LV cavity of patient `seed` is: centre (mm from the FOV centre, x to the right,
    y down) and its end-diastolic radius (mm) in the first slice. For heart-centred crops and
    ROI metrics; multiply by size / FOV (i.e. divide by pixel spacing) for pixels."""
    params_rng, _, _ = _streams(seed, generator)
    module = _heart(generator)
    centre, radius = module.lv_region(module.sample_params(params_rng))
    return np.asarray(centre, dtype=np.float64), float(radius)


def make_study(seed: int, *, slices: int = 3, frames: int = 32, size: int = 256,
               generator: str = "sax", noise: bool = True) -> PhantomStudy:
    """One synthetic patient's cine study; deterministic in all arguments.

    `noise=False` gives the noise-free twin: the same anatomy, motion, shading, band limit and
    intensity scale, without the acquisition noise (a clean reference for evaluation).
    """
    if slices < 1 or frames < 2 or size < 16:
        raise ValueError(f"need slices >= 1, frames >= 2, size >= 16; got {slices}, {frames}, {size}")
    params_rng, render_rng, geom_rng = _streams(seed, generator)
    if generator in _CONTENT:
        return _content_study(seed, generator, render_rng, geom_rng, slices, frames, size)
    module = _MODULES[generator]
    params = module.sample_params(params_rng)
    raw, offsets, pixel, level = module.render(params, render_rng, slices, frames, size, noise)
    if generator == "lax":
        orientation, positions = phantom_lax.lax_geometry(geom_rng, params, offsets, size, pixel)
    else:
        orientation, positions = sax_geometry(geom_rng, offsets, size, pixel,
                                              (float(params.heart_xy[0]), float(params.heart_xy[1])))
    rr = float(params.rr_ms)
    return PhantomStudy(
        patient_id=f"PHANTOM-{seed:04d}",
        frames=normalise_study(raw, level),
        trigger_times_ms=np.arange(frames, dtype=np.float64) * rr / frames,
        rr_interval_ms=rr,
        pixel_spacing_mm=float(pixel),
        slice_thickness_mm=float(params.thickness_mm),
        image_orientation=orientation,
        image_positions=positions,
        heart_rate_bpm=float(params.hr_bpm),
        generator=generator,
    )


def _heart(generator: str):  # noqa: ANN202 - one of the phantom_* modules
    if generator not in _MODULES:
        raise ValueError(f"{generator!r} is not a heart phantom (one of {', '.join(_MODULES)})")
    return _MODULES[generator]


def _content_study(seed: int, generator: str, render_rng: np.random.Generator, geom_rng: np.random.Generator,
                   slices: int, frames: int, size: int) -> PhantomStudy:
    """A study of non-heart content: one independent cine per slice, in a generic short-axis geometry.

    The content is its own noise-free twin (the acquisition adds the noise), so `noise` does not apply."""
    fov_mm, thickness, rr = 360.0, 8.0, 1000.0
    pixel = fov_mm / size
    cines = [_CONTENT[generator](np.random.default_rng(s), frames, size) for s in render_rng.spawn(slices)]
    offsets = np.arange(slices) * (thickness + 2.0)
    orientation, positions = sax_geometry(geom_rng, offsets, size, pixel, (0.0, 0.0))
    return PhantomStudy(
        patient_id=f"{generator.upper()}-{seed:04d}", frames=np.stack(cines).astype(np.float32),
        trigger_times_ms=np.arange(frames, dtype=np.float64) * rr / frames, rr_interval_ms=rr,
        pixel_spacing_mm=pixel, slice_thickness_mm=thickness, image_orientation=orientation,
        image_positions=positions, heart_rate_bpm=60.0, generator=generator)


def degrade_acquisition(study: PhantomStudy, temporal: int = 8, spatial: int = 4) -> PhantomStudy:
    """The low-resolution acquisition of a study: every `temporal`-th frame, `spatial`x fewer pixels.

    Pixels are averaged over spatial x spatial blocks (what a coarser acquisition integrates), so
    the new first pixel centre lies (spatial - 1) / 2 old pixels along the row and column
    directions from the old one.
    """
    if temporal < 1 or spatial < 1:
        raise ValueError("temporal and spatial factors must be >= 1")
    frames = area_downsample(study.frames[:, ::temporal], spatial).astype(np.float32)
    row = study.image_orientation[:3]
    col = study.image_orientation[3:]
    shift = (spatial - 1) / 2.0 * study.pixel_spacing_mm * (row + col)
    return dataclasses.replace(
        study,
        frames=frames,
        trigger_times_ms=study.trigger_times_ms[::temporal].copy(),
        pixel_spacing_mm=study.pixel_spacing_mm * spatial,
        image_positions=study.image_positions + shift[None, :],
    )
