"""Generator "sax-fourier": a short-axis cine built differently from "sax", for generalisation tests.

What differs from "sax" (on purpose, so a model trained on one can be tested on the other):

* shapes: Fourier-descriptor contours tested for inside/outside (no distance fields); the RV is a
  band in polar coordinates around the LV (not an ellipse minus the LV); papillary muscles are
  inward bumps of the endocardial contour (not separate bodies); the ventricle tapers as a cone;
* motion: the cavity-area curve is a mixture of two periodic von Mises pulses (not piecewise
  phases), the wall thickens by a gain law (not by area conservation), translation follows a
  Lissajous path with a small rocking rotation (no twist, no through-plane motion);
* chest: a Fourier-perturbed body with elliptical lungs, liver and a few random organ blobs;
  textures by spectral synthesis (random plane waves) instead of filtered noise;
* acquisition: 2x supersampled hard edges, area downsampling and a Gaussian point-spread
  function; coil-array (sum-of-squares) shading; Rician noise added independently per pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from cinesr.model.phantom_common import area_downsample, signal_level, slice_offsets
from scipy import ndimage


@dataclass
class FourierParams:
    hr_bpm: float
    rr_ms: float
    fov_mm: float
    thickness_mm: float
    first_slice_mm: float
    # motion: area(phase) = 1 - (1 - es_area) * normalised pulse mixture
    es_area: float
    mu: np.ndarray  # (2,) pulse centres (fraction of R-R)
    kappa: np.ndarray  # (2,) concentrations
    weight: float  # weight of the diastolic (second) pulse
    rv_lag: float
    thick_gain: float
    lissajous: np.ndarray  # (4,) amplitudes x, y (mm) and phases
    rock_deg: float
    # anatomy
    r0: float
    h0: float
    length: float
    taper: float
    endo_fd: np.ndarray  # (k, 2) Fourier descriptor cos/sin coefficients, orders 1..k
    wall_fd: np.ndarray
    pap_angles: np.ndarray
    pap_depth: np.ndarray
    pap_width: float
    rv_centre: float
    rv_half: float
    rv_depth: float
    rv_power: float
    rv_wall: float
    rv_es_area: float
    fat_width: float
    fat_angle: float
    heart_xy: np.ndarray
    psi: float
    body_ab: np.ndarray
    body_xy: np.ndarray
    body_fd: np.ndarray
    wall_mm: float
    fat_layer: float  # fraction of the body wall that is subcutaneous fat
    lung_l: np.ndarray  # (5,) cx, cy, a, b, rotation
    lung_r: np.ndarray
    liver: np.ndarray  # (5,)
    blobs: np.ndarray  # (n, 6) cx, cy, a, b, rotation, signal
    # contrast, shading, noise
    blood: float
    myo: float
    fat: float
    muscle_sig: float
    liver_sig: float
    lung_sig: float
    coils: np.ndarray  # (n, 2) coil element angles and distances (fractions of body size)
    coil_reach: float
    max_shading: float
    noise: float
    psf_px: float


def sample_params(rng: np.random.Generator) -> FourierParams:
    u = rng.uniform
    hr = u(45.0, 105.0)
    rr = 60000.0 / hr
    # systolic pulse centre: earlier in the cycle at slow heart rates (systole ~fixed in ms)
    mu1 = min(0.42, u(0.26, 0.32) * np.sqrt(1000.0 / rr))
    k_fd = 5
    endo_fd = rng.normal(0.0, 1.0, (k_fd, 2)) * (0.035 / np.arange(1, k_fd + 1))[:, None]
    endo_fd[0] *= 0.3  # first order only shifts the contour
    wall_fd = rng.normal(0.0, 1.0, (3, 2)) * 0.12
    body_fd = rng.normal(0.0, 1.0, (6, 2)) * (0.04 / np.arange(1, 7))[:, None]
    body_ab = np.array([u(130.0, 175.0), u(100.0, 135.0)])
    body_xy = np.array([u(-30.0, 10.0), u(10.0, 45.0)])
    n_blob = int(rng.integers(3, 7))
    blobs = np.stack([
        u(-90.0, 110.0, n_blob), u(50.0, 130.0, n_blob), u(12.0, 35.0, n_blob), u(10.0, 28.0, n_blob),
        u(0.0, np.pi, n_blob), u(0.15, 0.7, n_blob)], axis=1)
    n_coil = int(rng.integers(4, 9))
    coils = np.stack([np.sort(u(-np.pi, np.pi, n_coil)), u(1.0, 1.3, n_coil)], axis=1)
    return FourierParams(
        hr_bpm=hr,
        rr_ms=rr,
        fov_mm=u(260.0, 380.0),
        thickness_mm=float(rng.choice([5.0, 6.0, 8.0, 10.0])),
        first_slice_mm=u(2.0, 12.0),
        es_area=u(0.25, 0.55),
        mu=np.array([mu1, mu1 + u(0.25, 0.42)]),
        kappa=np.array([u(2.5, 5.0), u(1.5, 3.5)]),
        weight=u(0.2, 0.5),
        rv_lag=u(-0.01, 0.04),
        thick_gain=u(0.3, 0.8),
        lissajous=np.array([u(0.5, 3.0), u(0.5, 3.0), u(0, 2 * np.pi), u(0, 2 * np.pi)]),
        rock_deg=u(0.5, 3.0),
        r0=u(20.0, 32.0),
        h0=u(6.0, 12.0),
        length=u(70.0, 100.0),
        taper=u(0.4, 0.7),
        endo_fd=endo_fd,
        wall_fd=wall_fd,
        pap_angles=np.deg2rad([u(-60.0, -20.0), u(80.0, 130.0)]),
        pap_depth=u(1.5, 5.0, 2),
        pap_width=u(0.12, 0.22),
        rv_centre=np.deg2rad(u(165.0, 200.0)),
        rv_half=np.deg2rad(u(65.0, 100.0)),
        rv_depth=u(15.0, 32.0),
        rv_power=u(0.5, 1.2),
        rv_wall=u(2.0, 4.5),
        rv_es_area=u(0.35, 0.65),
        fat_width=u(0.0, 3.0),
        fat_angle=u(-np.pi, np.pi),
        heart_xy=np.array([u(-30.0, 30.0), u(-30.0, 20.0)]),
        psi=np.deg2rad(u(-25.0, 25.0)),
        body_ab=body_ab,
        body_xy=body_xy,
        body_fd=body_fd,
        wall_mm=u(18.0, 45.0),
        fat_layer=u(0.25, 0.7),
        lung_l=np.array([u(-95.0, -60.0), u(-5.0, 25.0), u(45.0, 65.0), u(65.0, 95.0), u(-0.3, 0.3)]),
        lung_r=np.array([u(60.0, 95.0), u(-5.0, 25.0), u(45.0, 70.0), u(70.0, 100.0), u(-0.3, 0.3)]),
        liver=np.array([u(-90.0, -40.0), u(70.0, 110.0), u(60.0, 100.0), u(40.0, 70.0), u(-0.4, 0.4)]),
        blobs=blobs,
        blood=u(0.75, 1.0),
        myo=u(0.12, 0.35),
        fat=u(0.6, 1.0),
        muscle_sig=u(0.12, 0.3),
        liver_sig=u(0.2, 0.42),
        lung_sig=u(0.0, 0.08),
        coils=coils,
        coil_reach=u(0.5, 1.0),
        max_shading=u(1.3, 2.2),
        noise=u(0.008, 0.05),
        psf_px=u(0.3, 0.7),
    )


def _pulse(phase: np.ndarray, mu: float, kappa: float) -> np.ndarray:
    return np.exp(kappa * (np.cos(2 * np.pi * (phase - mu)) - 1.0))


def _mixture(p: FourierParams, phase: np.ndarray) -> np.ndarray:
    return _pulse(phase, p.mu[0], p.kappa[0]) + p.weight * _pulse(phase, p.mu[1], p.kappa[1])


_GRID = 2048


def _deficit_table(p: FourierParams) -> np.ndarray:
    """The normalised volume deficit (0 at the fullest, 1 at the emptiest) on a periodic grid.

    A sharp systolic von Mises pulse plus a broad, later diastolic one. A plain sum would empty
    the ventricle twice; its monotone envelope (non-increasing from end-systole to the fullest
    point, non-decreasing during ejection) gives rapid refilling, a diastasis plateau where the
    second pulse holds the deficit, and a late atrial refill as that pulse decays. A periodic
    Gaussian smoothing removes the envelope's corners.
    """
    cached = getattr(p, "_deficit", None)
    if cached is not None:
        return cached
    grid = np.arange(_GRID) / _GRID
    g = _mixture(p, grid)
    peak = int(np.argmax(g))
    rolled = np.roll(g, -peak)  # end-systole first
    low = int(np.argmin(rolled))
    rolled[:low + 1] = np.minimum.accumulate(rolled[:low + 1])
    rolled[low:] = np.maximum.accumulate(rolled[low:])
    g = ndimage.gaussian_filter1d(np.roll(rolled, peak), sigma=0.006 * _GRID, mode="wrap")
    g = (g - g.min()) / (g.max() - g.min())
    p._deficit = g  # type: ignore[attr-defined]  # computed once per patient
    return g


def area_curve(p: FourierParams, phase: np.ndarray) -> np.ndarray:
    """Relative LV cavity area: 1 at the fullest point of the cycle, es_area at the emptiest.

    Interpolated periodically from `_deficit_table`, so area(phase + 1) == area(phase) exactly.
    """
    table = _deficit_table(p)
    grid = np.arange(_GRID + 1) / _GRID
    ph = np.mod(np.asarray(phase, dtype=np.float64), 1.0)
    return 1.0 - (1.0 - p.es_area) * np.interp(ph, grid, np.append(table, table[0]))


def _fourier_radius(theta: np.ndarray, fd: np.ndarray) -> np.ndarray:
    out = np.ones_like(theta)
    for m, (a, b) in enumerate(fd, start=1):
        out += a * np.cos(m * theta) + b * np.sin(m * theta)
    return out


def _waves(rng: np.random.Generator, n: int, shortest: float, longest: float) -> np.ndarray:
    """Random plane waves (kx, ky, phase, amplitude) with a 1/f-like amplitude spectrum."""
    lam = np.exp(rng.uniform(np.log(shortest), np.log(longest), n))
    ang = rng.uniform(0, np.pi, n)
    k = 2 * np.pi / lam
    amp = lam**0.6
    amp /= np.sqrt(0.5 * np.sum(amp**2))
    return np.stack([k * np.cos(ang), k * np.sin(ang), rng.uniform(0, 2 * np.pi, n), amp], axis=1)


def _synth(x: np.ndarray, y: np.ndarray, waves: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x)
    for kx, ky, ph, amp in waves:
        out += amp * np.cos(kx * x + ky * y + ph)
    return out


def _in_ellipse(x: np.ndarray, y: np.ndarray, e: np.ndarray) -> np.ndarray:
    c, s = np.cos(e[4]), np.sin(e[4])
    dx, dy = x - e[0], y - e[1]
    u, v = c * dx + s * dy, -s * dx + c * dy
    return (u / e[2]) ** 2 + (v / e[3]) ** 2 < 1.0


def _chest(p: FourierParams, rng: np.random.Generator, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
    """Static slice content on the supersampled grid (anatomy frame: heart at the origin)."""
    c, s = np.cos(p.psi), np.sin(p.psi)
    dx, dy = x - p.heart_xy[0], y - p.heart_xy[1]
    X, Y = c * dx + s * dy, -s * dx + c * dy
    # texture synthesised on every other sample (3 mm shortest wavelength needs no finer grid)
    tex = _synth(X[::2, ::2], Y[::2, ::2], _waves(rng, 24, 3.0, 60.0))
    tex = np.repeat(np.repeat(tex, 2, axis=0), 2, axis=1)[: x.shape[0], : x.shape[1]]
    bx, by = X - p.body_xy[0], Y - p.body_xy[1]
    th = np.arctan2(by / p.body_ab[1], bx / p.body_ab[0])
    rho = np.hypot(bx / p.body_ab[0], by / p.body_ab[1]) / _fourier_radius(th, p.body_fd)
    img = np.zeros_like(x)
    img[rho < 1.0] = p.fat
    img[rho < 1.0 - p.fat_layer * p.wall_mm / p.body_ab.mean()] = p.muscle_sig
    inner = rho < 1.0 - p.wall_mm / p.body_ab.mean()
    # inside the chest wall: aerated lung by default (the heart is mostly framed by lung), then
    # organ blobs, the explicit lungs (darker still) and the liver
    img[inner] = p.lung_sig * 1.6 + 0.02
    grow = 1.0 + 0.4 * min(z / 80.0, 1.0)
    for blob in p.blobs:
        img[_in_ellipse(X, Y, blob[:5]) & inner] = blob[5]
    for lung in (p.lung_l, p.lung_r):
        img[_in_ellipse(X, Y, lung) & inner] = p.lung_sig
    liver = p.liver.copy()
    liver[2:4] *= grow
    img[_in_ellipse(X, Y, liver) & inner] = p.liver_sig
    # spine and aorta at the back of the mediastinum
    spine = np.array([p.body_xy[0] + 10.0, p.body_xy[1] + p.body_ab[1] - p.wall_mm - 25.0])
    img[np.hypot(X - spine[0], Y - spine[1]) < 17.0] = 0.45
    img[np.hypot(X - spine[0] + 30.0, Y - spine[1] + 20.0) < 11.0] = p.blood
    return (img * (1.0 + 0.06 * tex)).astype(np.float32)


class _Profiles:
    """Angle-only profiles of one patient, tabulated (the per-pixel cosines dominated run time)."""

    n = 4096

    def __init__(self, p: FourierParams) -> None:
        th = np.linspace(-np.pi, np.pi, self.n, endpoint=False)
        self.endo = _fourier_radius(th, p.endo_fd).astype(np.float32)
        self.wall = _fourier_radius(th, p.wall_fd).astype(np.float32)
        bumps = np.zeros_like(th)
        for pa, pd in zip(p.pap_angles, p.pap_depth, strict=True):
            bumps += pd * np.exp(-0.5 * (np.angle(np.exp(1j * (th - pa))) / p.pap_width) ** 2)
        self.pap = bumps.astype(np.float32)
        span = np.clip(1.0 - (np.angle(np.exp(1j * (th - p.rv_centre))) / p.rv_half) ** 2, 0.0, 1.0)
        self.rv = (span**p.rv_power).astype(np.float32)
        self.rv_wall = (p.rv_wall * span**0.25).astype(np.float32)
        self.fat = (p.fat_width * np.clip(np.cos(th - p.fat_angle), 0.0, 1.0) ** 6).astype(np.float32)

    def index(self, theta: np.ndarray) -> np.ndarray:
        return ((theta + np.pi) * (self.n / (2 * np.pi))).astype(np.int32) % self.n


def _heart(p: FourierParams, prof: _Profiles, x: np.ndarray, y: np.ndarray, z: float, phase: float,
           bg: np.ndarray, tex: np.ndarray, tex_step: float) -> np.ndarray:
    area = float(area_curve(p, phase))
    c = (1.0 - area) / (1.0 - p.es_area)
    c_rv = (1.0 - float(area_curve(p, phase - p.rv_lag))) / (1.0 - p.es_area)
    zf = min(max(z / p.length, 0.0), 1.2)
    cone = max(0.0, 1.0 - zf) ** p.taper
    tau = 2 * np.pi * phase
    ox = p.heart_xy[0] + p.lissajous[0] * np.sin(tau + p.lissajous[2])
    oy = p.heart_xy[1] + p.lissajous[1] * np.sin(2 * tau + p.lissajous[3])
    ang = p.psi + np.deg2rad(p.rock_deg) * np.sin(tau)
    cs, sn = np.cos(ang), np.sin(ang)
    dx, dy = x - ox, y - oy
    u, w = cs * dx + sn * dy, -sn * dx + cs * dy
    r = np.hypot(u, w)
    k = prof.index(np.arctan2(w, u))
    r_cav = p.r0 * cone * np.sqrt(area)
    # thickening by a gain law; towards the apex the wall is thinner and closes over the cavity
    h = p.h0 * (1.0 - 0.35 * zf) * (1.0 + p.thick_gain * c)
    shape = prof.endo[k]
    r_endo = r_cav * shape
    if r_cav > 10.0:  # papillary muscles: inward bumps of the endocardium, bulkier in systole
        r_endo = r_endo - (1.0 + 0.3 * c) * prof.pap[k]
    if zf >= 1.0:  # past the apex: only a shrinking cap of muscle
        r_epi = np.full_like(r, max(0.0, p.h0 * (1.15 - zf) * 4.0))
    else:
        r_epi = r_cav * shape + h * prof.wall[k]
    # RV: polar band over an angular span on the septal side, thinning to the ends
    rv_k = max(0.0, 1.0 - zf / 0.75) * (1.0 - c_rv * (1.0 - p.rv_es_area))
    rv_top = r_epi + p.rv_depth * rv_k * prof.rv[k]
    rv_out = rv_top + prof.rv_wall[k] * (rv_k > 0.05)
    # texture moves with the heart: a window of a larger static field, shifted by the translation
    # to the nearest supersampled pixel (the small rocking is ignored)
    pad = (tex.shape[0] - x.shape[0]) // 2
    si = pad - int(round((oy - p.heart_xy[1]) / tex_step))
    sj = pad - int(round((ox - p.heart_xy[0]) / tex_step))
    blood_tex = tex[si:si + x.shape[0], sj:sj + x.shape[1]]
    img = np.where(r < rv_out + prof.fat[k], p.fat, bg)
    img = np.where(r < rv_out, p.myo * blood_tex, img)
    img = np.where((r >= r_epi) & (r < rv_top), p.blood * 0.96 * blood_tex, img)
    img = np.where(r < r_endo, p.blood * blood_tex, img)
    return img.astype(np.float32)


def lv_region(p: FourierParams) -> tuple[np.ndarray, float]:
    """LV centre (FOV mm) and end-diastolic cavity radius at the first slice."""
    return p.heart_xy.copy(), p.r0 * max(0.0, 1.0 - p.first_slice_mm / p.length) ** p.taper


def render(p: FourierParams, rng: np.random.Generator, slices: int, frames: int, size: int,
           noise: bool = True) -> tuple[np.ndarray, np.ndarray, float, float]:
    pixel = p.fov_mm / size
    sup = 2  # supersampling factor
    n = size * sup
    coords = ((np.arange(n, dtype=np.float32) + 0.5) / sup - size / 2.0) * pixel
    y, x = np.meshgrid(coords, coords, indexing="ij")
    zs = slice_offsets(slices, p.length, p.thickness_mm, p.first_slice_mm)
    reach = p.r0 + p.h0 * (1 + p.thick_gain) + p.rv_depth + p.rv_wall + p.fat_width + 8.0
    half = int(np.ceil(reach / pixel)) * sup
    ci = int(round((p.heart_xy[1] / pixel + size / 2.0) * sup))
    cj = int(round((p.heart_xy[0] / pixel + size / 2.0) * sup))
    # crop bounds on the supersampled grid, aligned to whole output pixels
    i0, i1 = max((ci - half) // sup * sup, 0), min((ci + half) // sup * sup + sup, n)
    j0, j1 = max((cj - half) // sup * sup, 0), min((cj + half) // sup * sup + sup, n)
    xc, yc = x[i0:i1, j0:j1], y[i0:i1, j0:j1]
    # coil array shading: root-sum-of-squares of element sensitivities placed around the body
    cs, sn = np.cos(p.psi), np.sin(p.psi)
    xo = x[::sup, ::sup] + pixel / 2 * (sup - 1) / sup
    yo = y[::sup, ::sup] + pixel / 2 * (sup - 1) / sup
    dx, dy = xo - p.heart_xy[0], yo - p.heart_xy[1]
    X, Y = cs * dx + sn * dy, -sn * dx + cs * dy
    sens = np.zeros_like(X)
    reach_mm = p.coil_reach * p.body_ab.mean()
    for angle, dist in p.coils:
        ex = p.body_xy[0] + dist * p.body_ab[0] * np.cos(angle)
        ey = p.body_xy[1] + dist * p.body_ab[1] * np.sin(angle)
        sens += 1.0 / (1.0 + ((X - ex) ** 2 + (Y - ey) ** 2) / reach_mm**2) ** 2
    bias = np.sqrt(sens)
    bias = bias / bias[min(max(ci // sup, 0), size - 1), min(max(cj // sup, 0), size - 1)]
    # scanners normalise the coil profile partly: keep the periphery at most ~2.2x the heart
    top = float(bias.max())
    if top > p.max_shading:
        bias = bias ** (np.log(p.max_shading) / np.log(top))
    bias = bias.astype(np.float32)

    prof = _Profiles(p)
    # blood/muscle texture: plane waves on the crop grid plus a margin for the heart's translation
    step = pixel / sup
    pad = int(np.ceil((abs(p.lissajous[0]) + abs(p.lissajous[1])) / step)) + 2
    ty, tx = np.meshgrid(yc[0, 0] + step * np.arange(-pad, yc.shape[0] + pad),
                         xc[0, 0] + step * np.arange(-pad, xc.shape[1] + pad), indexing="ij")
    tex = 1.0 + 0.03 * _synth(tx.astype(np.float32), ty.astype(np.float32), _waves(rng, 8, 2.0, 12.0))
    tex = tex.astype(np.float32)
    out = np.empty((slices, frames, size, size), np.float32)
    for s, z in enumerate(zs):
        bg = _chest(p, rng, x, y, float(z))
        bg_crop = bg[i0:i1, j0:j1]
        low_bg = area_downsample(bg, sup)
        for t in range(frames):
            frame = low_bg.copy()
            heart = _heart(p, prof, xc, yc, float(z), t / frames, bg_crop, tex, step)
            frame[i0 // sup:i1 // sup, j0 // sup:j1 // sup] = area_downsample(heart, sup)
            out[s, t] = ndimage.gaussian_filter(frame, p.psf_px, mode="nearest") * bias
    # Rician magnitude: independent complex Gaussian noise per pixel
    level = signal_level(out)
    if noise:  # drawn last: the noise-free twin has the same anatomy
        n1 = rng.standard_normal(out.shape, dtype=np.float32)
        n2 = rng.standard_normal(out.shape, dtype=np.float32)
        out = np.sqrt((out + p.noise * n1) ** 2 + (p.noise * n2) ** 2)
    return out, zs, pixel, level
