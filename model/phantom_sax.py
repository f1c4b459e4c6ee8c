# Over 500 lines: one anatomical model (LV, RV, fat, papillary muscles, motion, acquisition), kept whole.
"""Generator "sax": a detailed short-axis SSFP cine model.

Anatomy: a truncated-ellipsoid LV (endocardium with trabeculation, myocardium whose area is
conserved per angular sector so the wall thickens as the cavity shrinks, two papillary muscles),
an RV crescent (ellipse minus the LV, bounded by the insertion points), epicardial fat,
pericardium (sometimes with an effusion), and a static chest around it (body outline,
subcutaneous fat, chest-wall muscle, ribs, lungs with hilar vessels, liver with vessels, spine
with CSF, descending aorta, stomach). Phenotypes: normal, dilated (big, thin, poorly
contracting), hypertrophic (small cavity, thick wall) and infarct (an akinetic, thinned sector).

Motion: a piecewise cardiac-cycle curve (isovolumic contraction, ejection, isovolumic
relaxation, rapid filling, diastasis, atrial kick) with landmarks scaled to the heart rate,
stronger apical contraction, twist, base descent (through-plane) and a small translation; a
dark mitral inflow jet in basal slices during rapid filling.

Acquisition: partial volume over the slice thickness, water and fat combined with a fat-water
phase (dark rims where they share a voxel), smooth coil shading, white complex noise in a
truncated, windowed k-space (band-limited image with mild ringing, correlated noise) and the
magnitude of it all (Rician statistics).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft
from cinesr.model.phantom_common import (
    coverage,
    ellipse_sd,
    rotate,
    signal_level,
    slice_offsets,
    smooth_min,
    smooth_noise,
    smoothstep,
    von_mises_bump,
)


@dataclass
class SaxParams:
    """Everything random about one synthetic patient (sampled once from the seed)."""

    hr_bpm: float
    rr_ms: float
    fov_mm: float
    thickness_mm: float
    first_slice_mm: float
    # cycle landmarks as fractions of R-R, and volume levels
    t_ivc: float
    t_es: float
    t_ivr: float
    t_rf: float
    t_a0: float
    t_a1: float
    es_area: float
    e_fraction: float
    diastasis_fraction: float
    ejection_skew: float
    rv_delay: float
    rv_es_area: float
    # LV / RV anatomy (mm)
    r0: float
    h0: float
    length: float
    z_eq: float
    apex_gain: float
    ecc: float
    ecc_angle: float
    harm: np.ndarray  # (k, 3): order, amplitude, phase
    trab: np.ndarray  # (k, 3)
    trab_amp: float
    septal_extra: float
    phenotype: str  # "normal", "dilated", "hypertrophic" or "infarct"
    akinesia: float  # 0 = normal regional motion; 1 = the sector does not contract at all
    akinesia_angle: float
    akinesia_width: float  # von Mises concentration of the sector
    scar_thinning: float  # fraction of wall lost in the sector
    pap_angles: np.ndarray
    pap_radius: np.ndarray
    rv_depth: float  # RV cavity thickness at its widest point, end-diastole
    rv_ins: np.ndarray  # anterior and inferior RV insertion angles on the LV (rad)
    rv_dy: float  # vertical shift of the RV ellipse, fraction of the LV epicardial radius
    rv_wall: float
    rv_length: float
    fat0: float
    fat_groove: float
    fat_harm: np.ndarray
    # motion
    twist_deg: float
    base_descent: float
    shift: np.ndarray  # (2,) mm, systolic translation
    # placement in the FOV
    heart_xy: np.ndarray  # (2,) mm from FOV centre
    psi: float  # in-plane rotation of the whole anatomy
    # chest
    body_xy: np.ndarray
    body_ab: np.ndarray
    body_p: float
    body_harm: np.ndarray
    subq_fat: float
    muscle: float
    liver_xy: np.ndarray
    liver_ab: np.ndarray
    stomach_xy: np.ndarray
    stomach_ab: np.ndarray
    stomach_fluid: bool
    spine_xy: np.ndarray
    aorta_r: float
    # contrast (relative signal), noise and acquisition
    blood: float
    myo: float
    fat: float
    liver: float
    muscle_sig: float
    lung: float
    spleen: float
    marrow: float
    csf: float
    noise: float
    kspace_phase: float
    kspace_read: float
    phase_axis: int
    bias_coef: np.ndarray
    bias_radial: float
    fat_phase: float  # fat-water phase at the echo: near pi cancels partial-volume voxels (dark rims)
    effusion: float  # pericardial fluid thickness (mm) at its thickest, 0 for most patients
    effusion_angle: float
    jet: float  # strength of the dark mitral inflow jet in basal slices during rapid filling


def sample_params(rng: np.random.Generator) -> SaxParams:
    u = rng.uniform
    hr = u(50.0, 95.0)
    rr = 60000.0 / hr
    # systolic duration scales with sqrt(RR) (Bazett-like); landmarks in ms, then phase
    es_ms = u(0.30, 0.35) * np.sqrt(rr / 1000.0) * 1000.0
    ivc_ms = u(30.0, 55.0)
    ivr_ms = u(55.0, 90.0)
    a_end_ms = rr - u(10.0, 30.0)
    a_start_ms = a_end_ms - u(90.0, 140.0)
    rf_ms = u(110.0, 180.0)
    rf_end = min(es_ms + ivr_ms + rf_ms, a_start_ms - 20.0)
    rf_end = max(rf_end, es_ms + ivr_ms + 60.0)
    a_start_ms = max(a_start_ms, rf_end + 10.0)
    fov = u(280.0, 350.0)
    # a share of patients with the phenotypes a cine model must not smooth away
    phenotype = str(rng.choice(["normal", "dilated", "hypertrophic", "infarct"], p=[0.55, 0.15, 0.15, 0.15]))
    r0, h0, es_area = u(23.0, 31.0), u(7.0, 11.0), u(0.30, 0.50)
    if phenotype == "dilated":
        r0, h0, es_area = u(31.0, 38.0), u(5.5, 8.0), u(0.55, 0.78)
    elif phenotype == "hypertrophic":
        r0, h0, es_area = u(19.0, 25.0), u(12.0, 17.0), u(0.15, 0.35)
    infarct = phenotype == "infarct"
    thickness = float(rng.choice([6.0, 7.0, 8.0, 8.0, 10.0]))
    length = u(72.0, 95.0)
    k_harm = np.arange(3, 6)
    harm = np.stack([k_harm, rng.normal(0.0, 0.018, 3), u(0, 2 * np.pi, 3)], axis=1)
    k_trab = rng.choice(np.arange(9, 31), size=10, replace=False)
    trab = np.stack([k_trab, u(0.3, 1.0, 10), u(0, 2 * np.pi, 10)], axis=1)
    fat_harm = np.stack([np.arange(2, 8), rng.normal(0.0, 0.5, 6), u(0, 2 * np.pi, 6)], axis=1)
    body_harm = np.stack([np.arange(2, 6), rng.normal(0.0, 0.015, 4), u(0, 2 * np.pi, 4)], axis=1)
    body_ab = np.array([u(135.0, 170.0), u(110.0, 130.0)])
    body_xy = np.array([u(-25.0, 5.0), u(15.0, 35.0)])
    spine_xy = np.array([body_xy[0] + u(5.0, 30.0), body_xy[1] + body_ab[1] - u(55.0, 70.0)])
    blood = u(0.85, 1.0)
    return SaxParams(
        hr_bpm=hr,
        rr_ms=rr,
        fov_mm=fov,
        thickness_mm=thickness,
        first_slice_mm=u(4.0, 14.0),
        t_ivc=ivc_ms / rr,
        t_es=es_ms / rr,
        t_ivr=(es_ms + ivr_ms) / rr,
        t_rf=rf_end / rr,
        t_a0=a_start_ms / rr,
        t_a1=a_end_ms / rr,
        es_area=es_area,
        e_fraction=u(0.55, 0.78),
        diastasis_fraction=u(0.03, 0.10),
        ejection_skew=u(1.3, 2.0),
        rv_delay=u(0.01, 0.04),
        rv_es_area=u(0.40, 0.60),
        r0=r0,
        h0=h0,
        length=length,
        z_eq=u(8.0, 20.0),
        apex_gain=u(0.2, 0.9),
        ecc=u(0.0, 0.06),
        ecc_angle=u(0, np.pi),
        harm=harm,
        trab=trab,
        trab_amp=u(0.3, 1.0),
        septal_extra=u(0.0, 0.25),
        phenotype=phenotype,
        akinesia=u(0.6, 1.0) if infarct else 0.0,
        akinesia_angle=u(-np.pi, np.pi),
        akinesia_width=u(1.5, 4.0),
        scar_thinning=u(0.3, 0.55) if infarct else 0.0,
        pap_angles=np.array([np.deg2rad(-40.0 + rng.normal(0, 12)), np.deg2rad(105.0 + rng.normal(0, 12))]),
        pap_radius=u(3.5, 6.0, 2),
        rv_depth=u(17.0, 30.0),
        rv_ins=np.deg2rad([u(-105.0, -70.0), u(105.0, 140.0)]),
        rv_dy=u(-0.12, 0.08),
        rv_wall=u(2.5, 4.0),
        rv_length=u(0.65, 0.85) * length,
        fat0=u(0.0, 1.5),
        fat_groove=u(1.5, 6.0),
        fat_harm=fat_harm,
        twist_deg=u(2.0, 7.0),
        base_descent=u(6.0, 14.0),
        shift=rng.normal(0.0, 1.6, 2),
        heart_xy=np.array([u(-20.0, 25.0), u(-25.0, 15.0)]),
        psi=np.deg2rad(rng.normal(0.0, 12.0)),
        body_xy=body_xy,
        body_ab=body_ab,
        body_p=u(2.0, 2.7),
        body_harm=body_harm,
        subq_fat=u(6.0, 26.0),
        muscle=u(8.0, 16.0),
        liver_xy=np.array([u(-95.0, -55.0), u(75.0, 100.0)]),
        liver_ab=np.array([u(70.0, 95.0), u(50.0, 70.0)]),
        stomach_xy=np.array([u(85.0, 115.0), u(45.0, 75.0)]),
        stomach_ab=np.array([u(25.0, 45.0), u(18.0, 32.0)]),
        stomach_fluid=bool(rng.random() < 0.5),
        spine_xy=spine_xy,
        aorta_r=u(9.0, 13.0),
        blood=blood,
        myo=u(0.17, 0.30),
        fat=u(0.70, 0.95),
        liver=u(0.24, 0.36),
        muscle_sig=u(0.17, 0.27),
        lung=u(0.02, 0.06),
        spleen=u(0.30, 0.42),
        marrow=u(0.40, 0.60),
        csf=u(0.75, 0.95),
        noise=u(0.012, 0.045),
        kspace_phase=u(0.55, 0.85),
        kspace_read=u(0.80, 1.0),
        phase_axis=int(rng.integers(0, 2)),
        bias_coef=rng.normal(0.0, 0.18, 5),
        bias_radial=u(0.05, 0.45),
        fat_phase=u(1.7, 2.6) if rng.random() < 0.6 else u(0.0, 0.7),
        effusion=u(1.0, 4.0) if rng.random() < 0.25 else 0.0,
        effusion_angle=u(0.5, 2.6),
        jet=u(0.3, 1.0) if rng.random() < 0.5 else 0.0,
    )


def area_curve(p: SaxParams, phase: np.ndarray) -> np.ndarray:
    """Relative LV cavity area over the cycle (1 at end-diastole, p.es_area at end-systole).

    Piecewise with C1 joins: isovolumic contraction (flat), ejection (fast early), isovolumic
    relaxation (flat), rapid filling, diastasis (slow), atrial kick, flat until the next R wave.
    Phase is taken modulo 1, so the curve is exactly periodic.
    """
    ph = np.mod(np.asarray(phase, dtype=np.float64), 1.0)
    sv = 1.0 - p.es_area
    v_rf = p.es_area + sv * p.e_fraction
    v_dia = v_rf + sv * p.diastasis_fraction
    out = np.ones_like(ph)
    knots = [
        (p.t_ivc, p.t_es, 1.0, p.es_area, p.ejection_skew),
        (p.t_ivr, p.t_rf, p.es_area, v_rf, 1.4),
        (p.t_rf, p.t_a0, v_rf, v_dia, 1.0),
        (p.t_a0, p.t_a1, v_dia, 1.0, 1.0),
    ]
    out = np.where((ph >= p.t_es) & (ph < p.t_ivr), p.es_area, out)
    for t0, t1, v0, v1, skew in knots:
        sel = (ph >= t0) & (ph < t1)
        x = (ph[sel] - t0) / (t1 - t0)
        out[sel] = v0 + (v1 - v0) * smoothstep(1.0 - (1.0 - x) ** skew)
    return out


def _lv_radii(p: SaxParams, z: float) -> tuple[float, float]:
    """End-diastolic endocardial and epicardial radius at depth z below the base (mm)."""
    span = p.length - p.z_eq
    q = (z - p.z_eq) / span
    r_endo = p.r0 * np.sqrt(max(0.0, 1.0 - q * q)) if z < p.length else 0.0
    h = p.h0 * (1.0 - 0.3 * (max(z, 0.0) / p.length) ** 2)
    qe = (z - p.z_eq) / (span + h)
    r_epi = (p.r0 + h) * np.sqrt(max(0.0, 1.0 - qe * qe))
    return float(r_endo), float(max(r_epi, r_endo))


class _AngleTable:
    """Functions of angle only (shape harmonics, trabeculae, fat), tabulated once per study.

    Evaluating ~10 cosines per pixel per frame dominated the run time; a 4096-entry lookup is
    accurate to 0.1 mm at the radii involved.
    """

    size = 4096

    def __init__(self, table: np.ndarray, extra: np.ndarray | None = None) -> None:
        theta = np.linspace(-np.pi, np.pi, self.size, endpoint=False)
        values = np.zeros_like(theta)
        for order, amp, phase in table:
            values += amp * np.cos(order * theta + phase)
        if extra is not None:
            values += extra
        self.values = values.astype(np.float32)

    @classmethod
    def index(cls, theta: np.ndarray) -> np.ndarray:
        return ((theta + np.pi) * (cls.size / (2 * np.pi))).astype(np.int32) % cls.size


def _harmonics(theta: np.ndarray, table: np.ndarray) -> np.ndarray:
    out = np.zeros_like(theta)
    for order, amp, phase in table:
        out += amp * np.cos(order * theta + phase)
    return out


class _Chest:
    """The static part of one slice (body, lungs, organs), in the anatomy frame."""

    def __init__(self, p: SaxParams, rng: np.random.Generator, x: np.ndarray, y: np.ndarray, z: float,
                 pixel: float) -> None:
        X, Y = rotate(x - p.heart_xy[0], y - p.heart_xy[1], p.psi)
        size = x.shape[0]
        shape = x.shape
        fine = smooth_noise(rng, shape, 0.7)
        medium = smooth_noise(rng, shape, 3.0)
        coarse = smooth_noise(rng, shape, 12.0)
        # water signal in the real part, fat signal in the imaginary part (combined with the
        # fat-water phase after compositing, so partial-volume voxels can cancel)
        img = np.zeros(shape, np.complex64)

        def paint(mask: np.ndarray, value: np.ndarray | complex, win: tuple[slice, slice] | None = None) -> None:
            target = img if win is None else img[win]
            target += mask * (value - target)

        def window(cx: float, cy: float, radius: float) -> tuple[slice, slice]:
            """Pixel window around an anatomy-frame point (small objects are painted locally)."""
            c, s = np.cos(p.psi), np.sin(p.psi)
            xi = c * cx - s * cy + p.heart_xy[0]
            yi = s * cx + c * cy + p.heart_xy[1]
            j = xi / pixel + (size - 1) / 2.0
            i = yi / pixel + (size - 1) / 2.0
            h = radius / pixel + 2.0
            return (slice(int(max(i - h, 0)), int(min(i + h + 1, size))),
                    slice(int(max(j - h, 0)), int(min(j + h + 1, size))))

        # body: superellipse in polar form around its centre, slightly irregular
        bx, by = X - p.body_xy[0], Y - p.body_xy[1]
        rb = np.hypot(bx, by)
        th = np.arctan2(by, bx)
        a, b = p.body_ab
        pw = p.body_p
        r_edge = (np.abs(np.cos(th) / a) ** pw + np.abs(np.sin(th) / b) ** pw) ** (-1.0 / pw)
        r_edge = r_edge * (1.0 + _harmonics(th, p.body_harm))
        sd_body = rb - r_edge
        # fat thicker posteriorly and laterally, muscle thicker anteriorly (pectorals) and at the back
        fat_w = p.subq_fat * (1.0 + 0.35 * np.sin(th) + 0.15 * np.cos(2 * th))
        mus_w = p.muscle * (1.0 + 0.25 * np.abs(np.sin(th)))
        paint(coverage(sd_body, pixel), 1j * p.fat * (1.0 + 0.05 * medium + 0.03 * fine))
        paint(coverage(sd_body + fat_w, pixel), p.muscle_sig * (1.0 + 0.08 * medium + 0.05 * fine))
        sd_cavity = sd_body + fat_w + mus_w
        paint(coverage(sd_cavity, pixel), p.lung * (1.0 + 0.4 * medium + 0.3 * fine))
        inside = coverage(sd_cavity, pixel)
        # paraspinal muscles and the posterior mediastinum merge with the back wall
        px, py = X - p.spine_xy[0], Y - p.spine_xy[1]
        paint(coverage(ellipse_sd(px, py - 10.0, 62.0, 38.0), pixel, 2.0) * inside,
              p.muscle_sig * (1.0 + 0.08 * medium))
        # lung vessels: short tubes radiating from the hila, thicker and brighter near the mediastinum
        hila = np.array([[-45.0, 25.0], [50.0, 35.0]])
        for _ in range(70):
            cx = rng.uniform(-a, a) + p.body_xy[0]
            cy = rng.uniform(-b, b) + p.body_xy[1]
            if np.hypot(cx, cy) < 62.0:  # keep the heart region clean
                continue
            hx, hy = hila[int(cx > 0)]
            dist = np.hypot(cx - hx, cy - hy)
            r = float(np.clip(2.8 - dist / 50.0 + rng.normal(0.0, 0.4), 0.5, 2.5))
            length = rng.uniform(0.5, 2.5) * r
            win = window(cx, cy, length + r + 2.0)
            ux, uy = rotate(X[win] - cx, Y[win] - cy, np.arctan2(cy - hy, cx - hx) + rng.normal(0.0, 0.3))
            sd = ellipse_sd(ux, uy, length + r, r)
            paint(coverage(sd, pixel, 1.3) * inside[win], p.blood * rng.uniform(0.12, 0.35) * (0.6 + r / 6), win)
        # ribs sit along the inner chest wall, anterior and lateral
        for ang in rng.uniform(-np.pi, 0.2, int(rng.integers(8, 14))):
            rr = (np.abs(np.cos(ang) / a) ** pw + np.abs(np.sin(ang) / b) ** pw) ** (-1.0 / pw)
            depth = p.subq_fat * (1.0 + 0.35 * np.sin(ang)) + 0.6 * p.muscle
            cx = p.body_xy[0] + (rr - depth) * np.cos(ang)
            cy = p.body_xy[1] + (rr - depth) * np.sin(ang)
            win = window(cx, cy, 14.0)
            ux, uy = rotate(X[win] - cx, Y[win] - cy, ang)
            sd = ellipse_sd(ux, uy, rng.uniform(4.0, 6.0), rng.uniform(7.0, 12.0))
            paint(coverage(sd, pixel), 0.5 * p.marrow, win)
            paint(coverage(sd + 1.5, pixel), (0.3 + 0.7j) * p.marrow * (1.0 + 0.15 * fine[win]), win)
        # liver (with a dome) grows into more apical (more inferior) slices
        depth = min(z / 90.0, 1.0)
        grow = 0.75 + 0.5 * depth
        lx, ly = X - p.liver_xy[0], Y - p.liver_xy[1] + 15.0 * depth
        lth = np.arctan2(ly, lx)
        sd_liver = ellipse_sd(lx, ly, p.liver_ab[0] * grow, p.liver_ab[1] * grow) - 6.0 * np.cos(3 * lth + 1.0)
        sd_liver = np.maximum(sd_liver, sd_cavity)
        m_liver = coverage(sd_liver, pixel)
        paint(m_liver, p.liver * (1.0 + 0.06 * medium + 0.04 * fine + 0.05 * coarse))
        # hepatic / portal vessels: bright (flowing blood) dots and short tubes inside the liver
        for _ in range(10):
            cx = p.liver_xy[0] + rng.uniform(-0.8, 0.8) * p.liver_ab[0] * grow
            cy = p.liver_xy[1] - 15.0 * depth + rng.uniform(-0.8, 0.8) * p.liver_ab[1] * grow
            win = window(cx, cy, 14.0)
            ux, uy = rotate(X[win] - cx, Y[win] - cy, rng.uniform(0, np.pi))
            sd = ellipse_sd(ux, uy, rng.uniform(1.5, 6.0), rng.uniform(1.2, 3.0))
            paint(coverage(sd, pixel, 1.5) * m_liver[win], p.blood * rng.uniform(0.45, 0.85), win)
        # stomach (fluid: bright; otherwise spleen-like tissue) in the more inferior slices
        if z > 20.0:
            sx, sy = X - p.stomach_xy[0], Y - p.stomach_xy[1]
            sd_st = np.maximum(ellipse_sd(sx, sy, *p.stomach_ab), sd_cavity)
            st_val = p.csf * 0.8 if p.stomach_fluid else p.spleen
            paint(coverage(sd_st, pixel) * smoothstep((z - 20.0) / 30.0), st_val * (1.0 + 0.05 * medium))
        # spine: vertebral body with marrow, cortical rim, spinal canal with bright CSF, the cord
        win = window(p.spine_xy[0], p.spine_xy[1] + 10.0, 45.0)
        qx, qy = px[win], py[win]
        d_vb = ellipse_sd(qx, qy, 19.0, 16.0)
        paint(coverage(d_vb, pixel), 0.12, win)
        paint(coverage(d_vb + 1.8, pixel), (0.5 + 0.5j) * p.marrow * (1.0 + 0.12 * fine[win] + 0.08 * medium[win]),
              win)
        paint(coverage(np.hypot(qx, qy - 28.0) - 7.5, pixel), p.csf, win)
        paint(coverage(np.hypot(qx, qy - 28.0) - 4.0, pixel), p.muscle_sig * 1.4, win)
        # descending aorta, left-anterior of the spine, with a rim of fat
        ax, ay = p.spine_xy[0] + 26.0, p.spine_xy[1] - 24.0
        win = window(ax, ay, p.aorta_r + 6.0)
        d_ao = np.hypot(X[win] - ax, Y[win] - ay)
        paint(coverage(d_ao - p.aorta_r - 1.5, pixel), 0.7j * p.fat, win)
        paint(coverage(d_ao - p.aorta_r, pixel), p.blood * 0.95, win)
        self.image = img
        self.fine = fine


class _Tables:
    """Per-study angle tables used by every frame."""

    def __init__(self, p: SaxParams) -> None:
        self.shape = _AngleTable(p.harm)
        theta = np.linspace(-np.pi, np.pi, _AngleTable.size, endpoint=False)
        self.ecc = (p.ecc * np.cos(2 * (theta - p.ecc_angle))).astype(np.float32)
        self.trab = _AngleTable(p.trab)
        # trabeculae are coarser in the lateral and inferior walls than at the septum
        self.trab.values *= 2.0 / len(p.trab) * (0.3 + von_mises_bump(theta, np.deg2rad(40.0), 1.5))
        self.strand = _AngleTable(p.trab[:4])
        grooves = p.fat_groove * (von_mises_bump(theta, p.rv_ins[0] - 0.35, 12.0)
                                  + von_mises_bump(theta, p.rv_ins[1] + 0.3, 12.0))
        self.fat = _AngleTable(p.fat_harm, p.fat0 - 1.0 + grooves)
        self.fat.values = np.maximum(self.fat.values, 0.0)
        sector = von_mises_bump(theta, p.akinesia_angle, p.akinesia_width)
        thin = 1.0 - p.scar_thinning * sector
        # wall "area" per sector (r_epi^2 - r_endo^2 scales like thickness^2 for thin walls)
        self.wall = ((1.0 + p.septal_extra * von_mises_bump(theta, np.pi, 2.0)) * thin**2).astype(np.float32)
        self.motion = (1.0 - p.akinesia * sector).astype(np.float32)  # share of normal contraction
        self.effusion = (p.effusion * von_mises_bump(theta, p.effusion_angle, 1.2)).astype(np.float32)


def _layers(p: SaxParams, tabs: _Tables, geom: tuple[np.ndarray, ...], z: float, area: float, c: float,
            c_rv: float, pixel: float) -> dict[str, np.ndarray | float]:
    """Coverage of each heart layer at depth z (one sub-slice), on the crop grid of `geom`."""
    u, w, r, k, shape = geom
    # base descent: the plane at depth z sees tissue that lay more basally at end-diastole
    frac = max(0.0, 1.0 - z / (p.length + 10.0))
    z0 = max(0.0, z - p.base_descent * frac * c)
    r_endo_ed, r_epi_ed = _lv_radii(p, z0)
    # apical segments contract more (exponent > 1 keeps area == 1 at ED, so still periodic)
    a_slice = area ** (1.0 + p.apex_gain * min(z0 / p.length, 1.0))
    r_n = r_endo_ed * np.sqrt(a_slice)  # normally contracting segments
    delta = r_epi_ed**2 - r_endo_ed**2
    r_epi_n = np.sqrt(r_n**2 + delta)
    if p.akinesia > 0.0:  # an infarcted sector keeps (part of) its diastolic radius
        r_loc = r_endo_ed * np.sqrt(1.0 - (1.0 - a_slice) * tabs.motion[k])
    else:
        r_loc = r_n
    # trabeculae: fine radial irregularity of the endocardium, compacted in systole
    r_endo = r_loc * shape + (p.trab_amp * (1.0 - 0.7 * c) * (r_n > 4.0)) * tabs.trab.values[k]
    # myocardial area per angular sector is conserved: the wall thickens as the cavity shrinks
    r_epi = shape * np.sqrt(r_loc**2 + delta * tabs.wall[k])
    sd_endo = r - r_endo
    sd_epi = r - r_epi
    # papillary muscles: radially elongated blobs hanging off the wall, present mid-ventricle
    pap_w = smoothstep((z0 - 0.12 * p.length) / (0.15 * p.length)) * smoothstep(
        (0.8 * p.length - z0) / (0.15 * p.length))
    sd_cav = sd_endo
    if pap_w > 0.05 and r_n > 8.0:
        for ang, rad in zip(p.pap_angles, p.pap_radius, strict=True):
            rp = rad * pap_w * (1.0 + 0.25 * c)
            d = r_n * (1.0 + p.ecc * np.cos(2 * (ang - p.ecc_angle))) - 0.8 * rp
            pu, pv = rotate(u - d * np.cos(ang), w - d * np.sin(ang), ang)
            sd_cav = np.maximum(sd_cav, -ellipse_sd(pu, pv, 1.35 * rp, rp))
    # RV: an ellipse centred inside the LV near the septum, minus the LV -> a crescent wrapping the
    # septal side; it thins towards the apex and shrinks towards the septum in systole
    rv_scale = np.sqrt(max(0.0, 1.0 - (z0 / p.rv_length) ** 2))
    depth = p.rv_depth * (1.0 - c_rv * (1.0 - p.rv_es_area)) * rv_scale
    out: dict[str, np.ndarray | float] = {"r_n": r_n, "z0": z0}
    if depth > 1.0:
        # the ellipse passes through both insertion points and reaches `depth` beyond the septum
        x1, y1 = r_epi_n * np.cos(p.rv_ins[0]), r_epi_n * np.sin(p.rv_ins[0])
        x2, y2 = r_epi_n * np.cos(p.rv_ins[1]), r_epi_n * np.sin(p.rv_ins[1])
        cx, cy = 0.5 * (x1 + x2), 0.5 * (y1 + y2) + p.rv_dy * r_epi_n
        a_rv = r_epi_n + depth + cx
        q = min(((x1 - cx) / a_rv) ** 2, 0.95)
        b_rv = max(abs(y1 - cy), abs(y2 - cy)) / np.sqrt(1.0 - q)
        # the chord between the insertion points stops the crescent from wrapping the lateral wall
        nx, ny = y2 - y1, x1 - x2
        norm = np.hypot(nx, ny)
        sd_chord = (nx * (u - x1) + ny * (w - y1)) / norm
        if nx * (cx - a_rv - x1) + ny * (cy - y1) > 0:
            sd_chord = -sd_chord
        sd_rv = np.maximum(ellipse_sd(u - cx, w - cy, a_rv, b_rv), sd_chord)
        rv_wall = p.rv_wall * (1.0 + 0.3 * c_rv)
        # rounded joins: no corner where the RV wall meets the LV at the insertion points
        sd_heart = smooth_min(sd_epi, -smooth_min(rv_wall - sd_rv, -sd_chord, 3.0), 3.0)
        out["rv"] = coverage(np.maximum(sd_rv, -sd_epi), pixel)
        out["rv_band"] = np.exp(np.minimum(sd_rv, 0.0) / 3.0)
    else:
        sd_heart = sd_epi
    # epicardial fat: thick in the interventricular grooves, thin and patchy elsewhere
    sd_fat = sd_heart - tabs.fat.values[k]
    if p.effusion > 0.0:  # pericardial fluid between the epicardial fat and the pericardium
        sd_fluid = sd_fat - tabs.effusion[k]
        out["line"] = coverage(sd_fluid - 1.0, pixel)
        out["fluid"] = coverage(sd_fluid, pixel)
    else:
        out["line"] = coverage(sd_fat - 1.0, pixel)
    out["fat"] = coverage(sd_fat, pixel)
    out["heart"] = coverage(sd_heart, pixel)
    out["lv"] = coverage(sd_cav, pixel)
    # trabecular band along the endocardium (less in systole)
    out["band"] = np.exp(np.minimum(sd_endo, 0.0) / 2.5) * (1.0 - 0.6 * c)
    return out


def _heart(p: SaxParams, tabs: _Tables, x: np.ndarray, y: np.ndarray, zs: np.ndarray, phase: float,
           pixel: float, bg: np.ndarray, tex: np.ndarray, apex_sign: float) -> np.ndarray:
    """Composite the beating heart over the static background of a crop, at one cardiac phase.

    Layer coverages are averaged over the sub-slices `zs` (partial volume across the slice
    thickness) and composited once; the in-plane geometry is shared by all sub-slices.
    """
    area = float(area_curve(p, phase))
    c = (1.0 - area) / (1.0 - p.es_area)  # contraction fraction 0 (ED) .. 1 (ES)
    c_rv = (1.0 - float(area_curve(p, phase - p.rv_delay))) / (1.0 - p.es_area)
    # translation (systolic shift + tiny periodic wobble) and twist (base and apex opposite)
    ph2 = 2 * np.pi * phase
    sx = p.heart_xy[0] + p.shift[0] * c + 0.4 * np.sin(ph2)
    sy = p.heart_xy[1] + p.shift[1] * c + 0.4 * np.sin(2 * ph2)
    twist = np.deg2rad(p.twist_deg) * c * apex_sign
    u, w = rotate(x - sx, y - sy, p.psi + twist)
    r = np.hypot(u, w)
    k = _AngleTable.index(np.arctan2(w, u))
    shape = 1.0 + tabs.ecc[k] + tabs.shape.values[k]
    geom = (u, w, r, k, shape)
    subs = [_layers(p, tabs, geom, float(z), area, c, c_rv, pixel) for z in zs]
    n = float(len(subs))

    def mean(key: str) -> np.ndarray | None:
        vals = [s[key] for s in subs if key in s]
        if not vals:
            return None
        total = vals[0].copy()
        for v in vals[1:]:
            total += v
        return total / n

    mid = subs[len(subs) // 2]
    img = bg.copy()
    img += mean("line") * (0.1 - img)  # pericardium: thin dark line
    fluid = mean("fluid")
    if fluid is not None:
        img += fluid * (0.9 * p.csf - img)
    img += mean("fat") * (1j * p.fat * (1.0 + 0.06 * tex) - img)
    img += mean("heart") * (p.myo * (1.0 + 0.05 * tex) - img)
    # blood: trabecular strands darken a band along the endocardium
    strands = (0.5 + 0.5 * np.cos(tabs.strand.values[k] * 3.0 + 0.6 * r)) ** 6
    lv_blood = p.blood * (1.0 - 0.55 * mean("band") * strands)
    # mitral inflow: a dephasing (dark) jet in basal slices during rapid filling
    r_n = float(mid["r_n"])
    jet = p.jet * np.sin(np.pi * np.clip((phase - p.t_ivr) / (p.t_rf - p.t_ivr), 0.0, 1.0)) ** 2
    jet *= smoothstep((0.4 * p.length - float(mid["z0"])) / (0.2 * p.length))
    if jet > 0.02 and r_n > 8.0:
        d2 = (u - 0.15 * r_n) ** 2 + (w - 0.2 * r_n) ** 2
        lv_blood = lv_blood * (1.0 - 0.4 * jet * np.exp(-d2 / (2.0 * (0.3 * r_n) ** 2)))
    img += mean("lv") * (lv_blood - img)
    rv = mean("rv")
    if rv is not None:
        rv_blood = p.blood * 0.97 * (1.0 - 0.4 * mean("rv_band") * strands)
        img += rv * (rv_blood - img)
    return img


def lv_region(p: SaxParams) -> tuple[np.ndarray, float]:
    """LV centre (FOV mm) and end-diastolic cavity radius at the first slice."""
    return p.heart_xy.copy(), _lv_radii(p, p.first_slice_mm)[0]


def coil_bias(p: SaxParams, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Smooth multiplicative coil shading: a random quadratic log-field, brighter near the body
    surface (where the coil elements are), 1.0 at the LV centre."""

    def log_field(xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
        xn, yn = xx / (p.fov_mm / 2), yy / (p.fov_mm / 2)
        b = p.bias_coef
        out = b[0] * xn + b[1] * yn + b[2] * xn * xn + b[3] * yn * yn + b[4] * xn * yn
        bx = (xx - p.heart_xy[0] - p.body_xy[0]) / p.body_ab[0]
        by = (yy - p.heart_xy[1] - p.body_xy[1]) / p.body_ab[1]
        return out + p.bias_radial * np.minimum(bx * bx + by * by, 1.5)

    at_heart = log_field(np.array(p.heart_xy[0]), np.array(p.heart_xy[1]))
    return np.exp(log_field(x, y) - at_heart).astype(np.float32)


def render(p: SaxParams, rng: np.random.Generator, slices: int, frames: int, size: int, noise: bool = True
           ) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Noise-free anatomy -> shading -> noisy band-limited magnitude, shape (S, T, H, W)."""
    pixel = p.fov_mm / size
    coords = (np.arange(size, dtype=np.float32) - (size - 1) / 2.0) * pixel
    y, x = np.meshgrid(coords, coords, indexing="ij")
    zs = slice_offsets(slices, p.length, p.thickness_mm, p.first_slice_mm)
    tabs = _Tables(p)
    # heart crop: everything that moves lies within this radius of the LV centre
    reach = p.r0 + p.h0 + p.rv_depth + p.rv_wall + p.fat0 + p.fat_groove + 2.5 * float(
        np.abs(p.fat_harm[:, 1]).sum()) + float(np.abs(p.shift).max()) + 8.0
    half = int(np.ceil(reach / pixel))
    ci = int(round(p.heart_xy[1] / pixel + (size - 1) / 2.0))
    cj = int(round(p.heart_xy[0] / pixel + (size - 1) / 2.0))
    i0, i1 = max(ci - half, 0), min(ci + half, size)
    j0, j1 = max(cj - half, 0), min(cj + half, size)
    xc, yc = x[i0:i1, j0:j1], y[i0:i1, j0:j1]
    bias = coil_bias(p, x, y)

    out = np.empty((slices, frames, size, size), np.complex64)
    phases = np.arange(frames) / frames
    fat_rot = np.complex64(np.exp(1j * p.fat_phase))
    for s, z in enumerate(zs):
        chest = _Chest(p, rng, x, y, float(z), pixel)
        bg = chest.image[i0:i1, j0:j1]
        tex = chest.fine[i0:i1, j0:j1]
        apex_sign = 1.0 if z > 0.5 * p.length else -1.0
        # the slice profile integrates anatomy over its thickness (partial volume): average
        # sub-slices, as many as the radii change by across the slab (1 at mid-ventricle)
        half_t = 0.5 * p.thickness_mm
        lo, hi = _lv_radii(p, max(float(z) - half_t, 0.0)), _lv_radii(p, float(z) + half_t)
        rv = [np.sqrt(max(0.0, 1.0 - (zz / p.rv_length) ** 2)) for zz in (max(float(z) - half_t, 0.0), z + half_t)]
        change = max(abs(lo[0] - hi[0]), abs(lo[1] - hi[1]), p.rv_depth * abs(rv[0] - rv[1]))
        n_sub = int(np.clip(np.ceil(change / (0.8 * pixel)), 1, 4))
        subs = float(z) + p.thickness_mm * ((np.arange(n_sub) + 0.5) / n_sub - 0.5)
        for t, ph in enumerate(phases):
            out[s, t] = chest.image
            out[s, t, i0:i1, j0:j1] = _heart(p, tabs, xc, yc, subs, float(ph), pixel, bg, tex, apex_sign)
    out = (out.real + out.imag * fat_rot) * bias
    # everything random about the anatomy is drawn by now: noise comes last, so a noise-free
    # twin of the same seed has exactly the same anatomy
    level = signal_level(out)
    return _acquire(p, rng, out, noise), zs, pixel, level


def _acquire(p: SaxParams, rng: np.random.Generator, clean: np.ndarray, noise: bool = True) -> np.ndarray:
    """Complex image -> finite, windowed k-space + white noise -> magnitude.

    The magnitude of signal plus complex Gaussian noise is Rician; the truncated k-space makes
    the image band-limited with mild ringing, and the noise correlated like a zero-filled recon.
    """
    size_y, size_x = clean.shape[-2:]

    def window(freq: np.ndarray, frac: float) -> np.ndarray:
        f = np.abs(freq) * 2.0  # 0 .. 1 (Nyquist)
        edge = 0.15 * frac  # raised-cosine roll-off over the outer 15% of the acquired range
        ramp = np.clip((f - frac + edge) / edge, 0.0, 1.0)
        return (0.5 + 0.5 * np.cos(np.pi * ramp)) * (f <= frac)

    fy, fx = (p.kspace_phase, p.kspace_read) if p.phase_axis == 0 else (p.kspace_read, p.kspace_phase)
    wy = window(np.fft.fftfreq(size_y), fy)[:, None]
    win = (wy * window(np.fft.fftfreq(size_x), fx)[None, :]).astype(np.float32)
    kspace = sfft.fft2(clean.astype(np.complex64), workers=1, overwrite_x=True)
    # white complex k-space noise through the same window: image noise std = p.noise per channel
    # (the sqrt(N) turns the orthonormal noise level into fft2's unnormalised convention)
    scale = p.noise / np.sqrt(float(np.mean(win**2))) * np.sqrt(size_y * size_x)
    # noise is only drawn where the window is non-zero (the rest is discarded anyway); real and
    # imaginary parts go straight into a complex64 buffer (no float64 temporaries)
    if noise:
        rows = np.flatnonzero(win.any(axis=1))
        cols = np.flatnonzero(win.any(axis=0))
        shape = clean.shape[:-2] + (rows.size, cols.size)
        white = rng.standard_normal(shape + (2,), dtype=np.float32).view(np.complex64)[..., 0]
        white *= np.float32(scale)
        kspace[..., rows[:, None], cols[None, :]] += white
    kspace *= win
    image = sfft.ifft2(kspace, workers=1, overwrite_x=True)
    return np.abs(image).astype(np.float32)
