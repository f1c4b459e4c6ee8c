"""Shared pieces of the synthetic cine phantoms: study container, geometry, rendering helpers.

Coordinates used by the generators: millimetres in the image plane, x to the right (increasing
column), y downwards (increasing row), origin at the centre of the field of view. Every shape is
described by an (approximate) signed distance in mm, negative inside, so anti-aliased coverage is
a clipped ramp one pixel wide.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PhantomStudy:
    """One synthetic cine study: magnitude frames plus the geometry a DICOM writer needs."""

    patient_id: str
    frames: np.ndarray  # (S, T, H, W) float32 in [0, 1]
    trigger_times_ms: np.ndarray  # (T,) evenly spaced over one R-R interval, first = 0
    rr_interval_ms: float
    pixel_spacing_mm: float
    slice_thickness_mm: float
    image_orientation: np.ndarray  # (6,) row then column direction cosines, patient LPS
    image_positions: np.ndarray  # (S, 3) centre of each slice's first pixel, mm
    heart_rate_bpm: float
    generator: str


def smoothstep(x: np.ndarray) -> np.ndarray:
    """C1 ramp 0 -> 1 on [0, 1] with zero slope at both ends (joins segments smoothly)."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Union of two signed distances with the join rounded over ~k mm (polynomial smooth min)."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def coverage(sd_mm: np.ndarray, pixel_mm: float, soften: float = 1.0) -> np.ndarray:
    """Fraction of a pixel covered by the inside (sd < 0) of a shape: box-filter anti-aliasing."""
    return np.clip(0.5 - sd_mm / (pixel_mm * soften), 0.0, 1.0)


def ellipse_sd(x: np.ndarray, y: np.ndarray, a: float, b: float) -> np.ndarray:
    """First-order signed distance (mm) to an axis-aligned ellipse with semi-axes a, b.

    (rho - 1) / |grad rho| is exact on the boundary to first order, which is all that a one-pixel
    anti-aliasing ramp needs; far from the boundary it is only monotone, which is enough for masks.
    """
    a = max(a, 1e-3)
    b = max(b, 1e-3)
    xa = x / a
    yb = y / b
    rho = np.sqrt(xa * xa + yb * yb) + 1e-9
    grad = np.sqrt((xa / a) ** 2 + (yb / b) ** 2) / rho + 1e-9
    return (rho - 1.0) / grad


def rotate(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates of (x, y) in a frame rotated by `angle` (radians)."""
    c, s = np.cos(angle), np.sin(angle)
    return c * x + s * y, -s * x + c * y


def von_mises_bump(angle: np.ndarray, centre: float, kappa: float) -> np.ndarray:
    """Periodic bump in angle, 1 at `centre`, decaying with concentration kappa."""
    return np.exp(kappa * (np.cos(angle - centre) - 1.0))


def sax_geometry(
    rng: np.random.Generator,
    slice_offsets_mm: np.ndarray,
    size: int,
    pixel_mm: float,
    heart_offset_mm: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """A plausible short-axis orientation (LPS) and the ImagePositionPatient of every slice.

    The slice normal follows the LV long axis from base to apex, which points to the patient's
    left, anterior and inferior; rows run roughly towards the patient's left and columns towards
    posterior/inferior, so the RV sits on the image left and anterior is up, as on a scanner.
    `slice_offsets_mm` are distances of the slices from the base plane along the long axis and
    `heart_offset_mm` is where the LV centre lies in the image (x right, y down, from FOV centre).
    """
    axis = np.array([0.58, -0.45, -0.62]) + rng.normal(0.0, 0.08, 3)
    axis /= np.linalg.norm(axis)
    left = np.array([1.0, 0.0, 0.0])
    row = left - (left @ axis) * axis
    row /= np.linalg.norm(row)
    col = np.cross(axis, row)
    if col @ np.array([0.0, 1.0, -1.0]) < 0:  # columns must run posterior / inferior
        col = -col
    # a little in-plane spin of the prescription
    spin = rng.normal(0.0, np.deg2rad(6.0))
    row, col = np.cos(spin) * row + np.sin(spin) * col, -np.sin(spin) * row + np.cos(spin) * col
    # centre of the LV at the base plane, somewhere near the magnet isocentre
    base_centre = np.array([15.0, -10.0, 25.0]) + rng.normal(0.0, 12.0, 3)
    half = (size - 1) / 2.0
    positions = []
    for z in slice_offsets_mm:
        lv_centre = base_centre + z * axis
        fov_centre = lv_centre - heart_offset_mm[0] * row - heart_offset_mm[1] * col
        positions.append(fov_centre - half * pixel_mm * row - half * pixel_mm * col)
    orientation = np.concatenate([row, col])
    return orientation.astype(np.float64), np.asarray(positions, dtype=np.float64)


def slice_offsets(n: int, lv_length_mm: float, thickness_mm: float, first_mm: float) -> np.ndarray:
    """Slice positions from just below the base towards the apex.

    Real stacks are contiguous at ~10 mm; with few slices we spread them over the ventricle so
    they show base, mid and apex (gaps are legal in a cine stack).
    """
    if n == 1:
        return np.array([first_mm + 0.35 * lv_length_mm])
    spacing = max(thickness_mm + 2.0, 0.66 * lv_length_mm / (n - 1))
    return first_mm + spacing * np.arange(n)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length sigma_px (FFT filtering)."""
    h, w = shape
    white = rng.standard_normal(shape).astype(np.float32)
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    gain = np.exp(-2.0 * (np.pi * sigma_px) ** 2 * (fx * fx + fy * fy))
    field = np.fft.irfft2(np.fft.rfft2(white) * gain, s=shape).astype(np.float32)
    field -= field.mean()
    std = field.std()
    return field / std if std > 0 else field


def signal_level(frames: np.ndarray, percentile: float = 99.9) -> float:
    """A high percentile of the (noise-free) magnitude: the brightest tissue, robust to outliers."""
    return float(np.percentile(np.abs(frames).reshape(-1)[::7], percentile))


def normalise_study(frames: np.ndarray, level: float) -> np.ndarray:
    """Scale to [0, 1] by the noise-free signal level and clip (noise spikes may reach 1).

    Using the level of the noise-free image means a study and its noise-free twin
    (`make_study(..., noise=False)`) share one intensity scale.
    """
    out = frames / (level * 1.02 if level > 0 else 1.0)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def area_downsample(frames: np.ndarray, factor: int) -> np.ndarray:
    """Average non-overlapping factor x factor blocks over the last two axes."""
    h, w = frames.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"image size {h}x{w} is not divisible by {factor}")
    shape = frames.shape[:-2] + (h // factor, factor, w // factor, factor)
    return frames.reshape(shape).mean(axis=(-3, -1))
