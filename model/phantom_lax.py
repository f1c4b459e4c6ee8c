"""Generator "lax": a long-axis four-chamber SSFP cine, for tests on a view the SAX models never saw.

The four chambers are built in a frame attached to the long axis (s: from the atrioventricular
plane towards the apex; q: across, LV to the image right): bullet-shaped ventricles (half
ellipses cut at the AV plane), elliptical atria below it, a septum between them, mitral and
tricuspid leaflets that open in early diastole, partly close in diastasis, reopen with the atrial
kick and close at end-diastole, an anterolateral papillary muscle and the RV moderator band, and
fat in the AV grooves. Motion: the AV plane descends towards the apex in systole (long-axis
shortening) while the ventricles narrow and the atria fill; the atria empty with the atrial kick.
Several slices are parallel four-chamber planes, offset across the heart. The chest, contrast,
timing curve, coil shading and acquisition (fat-water phase, truncated k-space, Rician noise) are
those of the "sax" generator, so the difference is the view and the heart model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from cinesr.model import phantom_sax
from cinesr.model.phantom_common import coverage, ellipse_sd, signal_level, smooth_min, smoothstep
from cinesr.model.phantom_sax import SaxParams


@dataclass
class LaxParams:
    base: SaxParams  # chest, contrast, timing and acquisition
    axis_angle: float  # image angle of the long axis (0 = apex straight up)
    w_lv: float  # LV cavity half-width at the base (mm)
    l_lv: float  # LV cavity length, AV plane to apex
    h_lv: float  # LV wall thickness
    w_rv: float
    l_rv: float
    h_rv: float
    septum: float
    la: np.ndarray  # (2,) LA half-width and depth
    ra: np.ndarray
    avpd: float  # systolic descent of the AV plane (mm)
    apex_shift: float
    leaflet: np.ndarray  # (4,) mitral anterior/posterior, tricuspid septal/anterior lengths (fractions)
    pap: np.ndarray  # (2,) papillary position (fraction of length) and size (mm)
    band: np.ndarray  # (2,) moderator band height (fraction of RV length) and thickness (mm)
    groove_fat: float
    trab: np.ndarray  # (k, 3) wave numbers (1/mm), amplitudes (mm), phases
    spacing: float  # between the parallel four-chamber slices (mm)

    # make_study reads these, like for the other generators
    @property
    def hr_bpm(self) -> float:
        return self.base.hr_bpm

    @property
    def rr_ms(self) -> float:
        return self.base.rr_ms

    @property
    def thickness_mm(self) -> float:
        return self.base.thickness_mm

    @property
    def heart_xy(self) -> np.ndarray:
        return self.base.heart_xy


def sample_params(rng: np.random.Generator) -> LaxParams:
    base = phantom_sax.sample_params(rng)
    u = rng.uniform
    scale = base.r0 / 26.0  # dilated hearts are bigger in every direction
    w_lv = u(20.0, 26.0) * scale
    return LaxParams(
        base=base,
        axis_angle=np.deg2rad(u(-20.0, 25.0)),
        w_lv=w_lv,
        l_lv=u(68.0, 85.0) * scale**0.7,
        h_lv=base.h0,
        w_rv=u(16.0, 24.0) * scale,
        l_rv=u(0.65, 0.82),
        h_rv=u(2.5, 4.0),
        septum=base.h0 * u(0.9, 1.2),
        la=np.array([u(15.0, 21.0), u(17.0, 25.0)]),
        ra=np.array([u(15.0, 21.0), u(17.0, 26.0)]),
        avpd=u(9.0, 17.0) * (0.5 if base.phenotype == "dilated" else 1.0),
        apex_shift=u(0.0, 3.0),
        leaflet=np.array([u(0.55, 0.75), u(0.35, 0.5), u(0.45, 0.6), u(0.45, 0.65)]),
        pap=np.array([u(0.35, 0.55), u(4.0, 6.5)]),
        band=np.array([u(0.65, 0.8), u(2.0, 3.5)]),
        groove_fat=u(3.0, 9.0),
        trab=np.stack([u(0.3, 1.2, 6), u(0.1, 0.45, 6), u(0.0, 2 * np.pi, 6)], axis=1),
        spacing=base.thickness_mm + u(0.0, 4.0),
    )


def area_curve(p: LaxParams, phase: np.ndarray) -> np.ndarray:
    """Relative ventricular cross-section area over the cycle (the sax piecewise curve)."""
    return phantom_sax.area_curve(p.base, phase)


def _valve_opening(b: SaxParams, phase: float) -> float:
    """0 = closed, 1 = fully open: opens after isovolumic relaxation, half closes in diastasis,
    reopens with the atrial kick, closes at end-diastole."""
    opening = smoothstep((phase - b.t_ivr) / 0.06)
    mid_dia = 0.5 * (b.t_rf + b.t_a0)
    opening -= 0.5 * smoothstep((phase - b.t_rf) / max(mid_dia - b.t_rf, 0.02))
    opening += 0.5 * smoothstep((phase - b.t_a0) / 0.05)
    opening -= smoothstep((phase - b.t_a1 + 0.02) / 0.03)
    return float(np.clip(opening, 0.0, 1.0))


def _segment_sd(q: np.ndarray, s: np.ndarray, q0: float, s0: float, ang: float, length: float,
                half_width: float) -> np.ndarray:
    """Signed distance to a thick segment starting at (q0, s0) in direction ang."""
    dq, ds = np.cos(ang), np.sin(ang)
    t = np.clip((q - q0) * dq + (s - s0) * ds, 0.0, length)
    return np.hypot(q - q0 - t * dq, s - s0 - t * ds) - half_width


def _heart(p: LaxParams, x: np.ndarray, y: np.ndarray, offset: float, phase: float, pixel: float,
           bg: np.ndarray, tex: np.ndarray) -> np.ndarray:
    b = p.base
    area = float(area_curve(p, phase))
    c = (1.0 - area) / (1.0 - b.es_area)
    kick = np.sin(np.pi * np.clip((phase - b.t_a0) / (b.t_a1 - b.t_a0), 0.0, 1.0)) ** 2
    # long-axis frame: s towards the apex from the end-diastolic AV plane, q across (LV positive)
    ca, sa = np.cos(p.axis_angle), np.sin(p.axis_angle)
    dx, dy = x - b.heart_xy[0], y - b.heart_xy[1]
    q = ca * dx + sa * dy
    s = sa * dx - ca * dy

    def cut(half: float, d: float = offset) -> float:  # cross-section of a chamber off-centre
        return float(np.sqrt(max(0.0, 1.0 - (d / max(half, 1e-3)) ** 2)))

    s_b = p.avpd * c  # AV plane descends in systole
    apex = p.l_lv - p.apex_shift * c
    k_lv = cut(p.w_lv + p.h_lv)
    w_lv = p.w_lv * np.sqrt(area) * cut(p.w_lv)
    l_lv = (apex - s_b) * np.sqrt(max(cut(p.w_lv), 0.05))
    h_lv = p.h_lv * (1.0 + 0.45 * c)
    q_lv = 0.5 * p.septum + w_lv
    # the ellipse is centred a third of the way up, so the cavity is widest there and the
    # annulus (where it is cut) is narrower, as in a real ventricle
    s_c = s_b + 0.3 * l_lv
    l_up = 0.7 * l_lv
    w_ann = w_lv * np.sqrt(1.0 - (0.3 / 0.7) ** 2)
    # trabeculae: a wavy endocardium, stronger towards the apex, compacted in systole
    wave = np.zeros_like(s)
    for kk, amp, ph in p.trab:
        wave += amp * np.cos(kk * s + ph)
    wave *= (1.0 - 0.6 * c) * np.clip((s - s_b) / max(l_lv, 1.0), 0.0, 1.0)
    base_cut = s_b - s
    sd_lv = np.maximum(ellipse_sd(q - q_lv, s - s_c, w_lv, l_up) + wave, base_cut)
    sd_lv_epi = np.maximum(ellipse_sd(q - q_lv, s - s_c, (w_lv + h_lv) * (k_lv > 0), l_up + 0.7 * h_lv),
                           base_cut - 2.0)
    # RV: narrower, shorter, on the other side of the septum, contracting with a small delay
    area_rv = float(area_curve(p, phase - b.rv_delay))
    c_rv = (1.0 - area_rv) / (1.0 - b.es_area)
    w_rv = p.w_rv * (1.0 - 0.45 * c_rv) * cut(p.w_rv)
    l_rv = p.l_rv * (apex - s_b) * np.sqrt(max(cut(p.w_rv), 0.05))
    q_rv = -(0.5 * p.septum + w_rv)
    s_rc = s_b + 0.2 * l_rv
    sd_rv = np.maximum(ellipse_sd(q - q_rv, s - s_rc, w_rv, 0.8 * l_rv), base_cut)
    sd_rv = np.maximum(sd_rv, -sd_lv_epi)
    sd_rv_epi = np.maximum(ellipse_sd(q - q_rv, s - s_rc, w_rv + p.h_rv, 0.8 * l_rv + p.h_rv), base_cut - 2.0)
    w_tri = w_rv * np.sqrt(1.0 - (0.2 / 0.8) ** 2)
    # atria below the AV plane: they fill while the ventricles empty and empty with the atrial kick
    fill = 1.0 + 0.25 * c - 0.2 * kick
    la_w, la_d = p.la[0] * cut(p.la[0]) * (1.0 + 0.08 * c), p.la[1] * fill
    ra_w, ra_d = p.ra[0] * cut(p.ra[0]) * (1.0 + 0.08 * c), p.ra[1] * fill
    q_la, q_ra = 0.5 * p.septum + 2.0 + la_w, -(0.5 * p.septum + 2.0 + ra_w)
    top = s - s_b
    sd_la = np.maximum(ellipse_sd(q - q_la, s - (s_b - 0.85 * la_d), la_w, la_d), top)
    sd_ra = np.maximum(ellipse_sd(q - q_ra, s - (s_b - 0.85 * ra_d), ra_w, ra_d), top)
    sd_atria_wall = smooth_min(sd_la, sd_ra, 2.0) - 2.0
    sd_heart = smooth_min(smooth_min(sd_lv_epi, sd_rv_epi, 3.0), sd_atria_wall, 4.0)
    # fat in the AV grooves (around the AV plane) and a thin layer elsewhere
    groove = p.groove_fat * np.exp(-(((s - s_b) / 14.0) ** 2)) * (np.abs(q) > 0.7 * p.w_lv)
    sd_fat = sd_heart - 0.5 - groove
    img = bg.copy()
    img += coverage(sd_fat - 1.0, pixel) * (0.1 - img)
    img += coverage(sd_fat, pixel) * (1j * b.fat * (1.0 + 0.06 * tex) - img)
    img += coverage(sd_heart, pixel) * (b.myo * (1.0 + 0.05 * tex) - img)
    blood = b.blood * (1.0 + 0.02 * tex)
    img += coverage(sd_la, pixel) * (0.97 * blood - img)
    img += coverage(sd_ra, pixel) * (0.95 * blood - img)
    # anterolateral papillary muscle hangs from the lateral LV wall
    ps = s_b + p.pap[0] * l_lv
    pq = q_lv + w_lv * np.sqrt(max(0.0, 1.0 - ((ps - s_c) / l_up) ** 2)) - 0.6 * p.pap[1]
    sd_pap = ellipse_sd(q - pq, s - ps, p.pap[1] * (1.0 + 0.3 * c), 2.2 * p.pap[1]) if cut(p.w_lv) > 0.3 else None
    sd_lv_cav = sd_lv if sd_pap is None else np.maximum(sd_lv, -sd_pap)
    img += coverage(sd_lv_cav, pixel) * (blood - img)
    img += coverage(sd_rv, pixel) * (0.97 * blood - img)
    # moderator band across the RV near its apex
    if l_rv > 20.0 and w_rv > 8.0:
        bs = s_b + p.band[0] * l_rv
        band = _segment_sd(q, s, -0.5 * p.septum, bs, np.pi + 0.35, 1.6 * w_rv, 0.5 * p.band[1])
        img += coverage(np.maximum(band, sd_rv), pixel) * (b.myo - img)
    # valve leaflets hinge at the annulus and swing from across the orifice towards the apex
    opening = _valve_opening(b, phase)
    leaflets = None
    for q_hinge, w_ring, lengths, toward in ((q_lv - w_ann, w_ann, p.leaflet[:2], 1.0),
                                              (q_rv + w_tri, w_tri, p.leaflet[2:], -1.0)):
        if w_ring < 6.0:
            continue
        for side, frac in ((1.0, lengths[0]), (-1.0, lengths[1])):
            hinge = q_hinge if side > 0 else q_hinge + 2 * w_ring * toward
            closed = 0.0 if side * toward > 0 else np.pi
            ang = closed + side * toward * (0.15 + 1.25 * opening)
            seg = _segment_sd(q, s, hinge, s_b + 1.0, ang, frac * w_ring * 1.05, 0.8)
            leaflets = seg if leaflets is None else np.minimum(leaflets, seg)
    if leaflets is not None:
        img += coverage(leaflets, pixel) * (b.myo * 0.9 - img)
    return img


def lv_region(p: LaxParams) -> tuple[np.ndarray, float]:
    """Centre (FOV mm) of the LV cavity's basal half and its end-diastolic half-width."""
    q = 0.5 * p.septum + p.w_lv
    s = 0.3 * p.l_lv
    ca, sa = np.cos(p.axis_angle), np.sin(p.axis_angle)
    # invert q = ca*dx + sa*dy, s = sa*dx - ca*dy
    dx, dy = ca * q + sa * s, sa * q - ca * s
    return p.base.heart_xy + np.array([dx, dy]), p.w_lv


def render(p: LaxParams, rng: np.random.Generator, slices: int, frames: int, size: int, noise: bool = True
           ) -> tuple[np.ndarray, np.ndarray, float, float]:
    b = p.base
    pixel = b.fov_mm / size
    coords = (np.arange(size, dtype=np.float32) - (size - 1) / 2.0) * pixel
    y, x = np.meshgrid(coords, coords, indexing="ij")
    offsets = (np.arange(slices) - (slices - 1) / 2.0) * p.spacing
    reach = max(p.l_lv + p.h_lv, p.la[1] * 2.6, p.ra[1] * 2.6) + p.groove_fat + 10.0
    half = int(np.ceil(reach / pixel))
    ci = int(round(b.heart_xy[1] / pixel + (size - 1) / 2.0))
    cj = int(round(b.heart_xy[0] / pixel + (size - 1) / 2.0))
    i0, i1 = max(ci - half, 0), min(ci + half, size)
    j0, j1 = max(cj - half, 0), min(cj + half, size)
    xc, yc = x[i0:i1, j0:j1], y[i0:i1, j0:j1]
    bias = phantom_sax.coil_bias(b, x, y)
    out = np.empty((slices, frames, size, size), np.complex64)
    fat_rot = np.complex64(np.exp(1j * b.fat_phase))
    for si, d in enumerate(offsets):
        # the chest of a mid-ventricular level; lungs, liver, spine and aorta frame the heart
        chest = phantom_sax._Chest(b, rng, x, y, 40.0 + 0.5 * float(d), pixel)
        bg = chest.image[i0:i1, j0:j1]
        tex = chest.fine[i0:i1, j0:j1]
        for t in range(frames):
            out[si, t] = chest.image
            out[si, t, i0:i1, j0:j1] = _heart(p, xc, yc, float(d), t / frames, pixel, bg, tex)
    out = (out.real + out.imag * fat_rot) * bias
    level = signal_level(out)
    return phantom_sax._acquire(b, rng, out, noise), offsets, pixel, level


def lax_geometry(rng: np.random.Generator, p: LaxParams, slice_offsets_mm: np.ndarray, size: int,
                 pixel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """A four-chamber orientation (LPS): the plane holds the LV long axis and the left-right
    direction; the apex points up the image (tilted by axis_angle) and the LV is on the right."""
    axis = np.array([0.58, -0.45, -0.62]) + rng.normal(0.0, 0.08, 3)
    axis /= np.linalg.norm(axis)
    left = np.array([1.0, 0.0, 0.0])
    across = left - (left @ axis) * axis
    across /= np.linalg.norm(across)
    normal = np.cross(axis, across)
    a = p.axis_angle
    row = np.sin(a) * axis + np.cos(a) * across
    col = -np.cos(a) * axis + np.sin(a) * across
    centre = np.array([15.0, -10.0, 25.0]) + rng.normal(0.0, 12.0, 3)
    hx, hy = float(p.heart_xy[0]), float(p.heart_xy[1])
    half = (size - 1) / 2.0
    positions = [centre + d * normal - hx * row - hy * col - half * pixel_mm * (row + col)
                 for d in slice_offsets_mm]
    return np.concatenate([row, col]), np.asarray(positions, dtype=np.float64)
