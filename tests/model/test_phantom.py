"""Synthetic cine phantoms: shapes, determinism, physiology of the motion, geometry of the degraded copy."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from cinesr.model.phantom import (
    GENERATORS,
    HEART_GENERATORS,
    THIRD_PARTY,
    PhantomStudy,
    degrade_acquisition,
    lv_region,
    make_study,
    motion_curve,
)


@pytest.fixture(scope="module", params=HEART_GENERATORS)
def small_study(request: pytest.FixtureRequest) -> PhantomStudy:
    return make_study(5, slices=2, frames=16, size=128, generator=request.param)


def test_at_least_two_generators() -> None:
    assert len(GENERATORS) >= 2
    assert {"sax", "sax-fourier", "lax"} <= set(GENERATORS)


@pytest.mark.parametrize("generator", HEART_GENERATORS)
def test_default_study_shape_range_and_timing(generator: str) -> None:
    study = make_study(7, generator=generator)
    assert study.frames.shape == (3, 32, 256, 256)
    assert study.frames.dtype == np.float32
    assert float(study.frames.min()) >= 0.0 and float(study.frames.max()) <= 1.0
    # the image is not blank: bright blood and fat, dark lungs and air
    assert float(study.frames.max()) > 0.9
    assert 0.03 < float(study.frames.mean()) < 0.5
    assert study.patient_id == "PHANTOM-0007"
    assert study.generator == generator
    assert study.trigger_times_ms.shape == (32,)
    assert study.trigger_times_ms[0] == 0.0
    np.testing.assert_allclose(np.diff(study.trigger_times_ms), study.rr_interval_ms / 32)
    np.testing.assert_allclose(study.heart_rate_bpm, 60000.0 / study.rr_interval_ms)
    assert 40.0 <= study.heart_rate_bpm <= 110.0
    assert 0.8 <= study.pixel_spacing_mm <= 1.6
    assert 4.0 <= study.slice_thickness_mm <= 10.0


def test_geometry_is_a_valid_cardiac_stack(small_study: PhantomStudy) -> None:
    row, col = small_study.image_orientation[:3], small_study.image_orientation[3:]
    np.testing.assert_allclose([np.linalg.norm(row), np.linalg.norm(col)], [1.0, 1.0], atol=1e-12)
    assert abs(row @ col) < 1e-12
    # oblique, like real cardiac planes: not aligned with any patient axis
    normal = np.cross(row, col)
    assert np.max(np.abs(normal)) < 0.95
    # rows run to the patient's left (LV on the image right)
    assert row[0] > 0.3
    if small_study.generator == "lax":
        # four-chamber: apex up, so columns run from apex to base (posterior, superior)
        assert col @ np.array([0.0, 1.0, 0.0]) > 0.0 and col[2] > 0.0
    else:
        # short axis: columns posterior / inferior (anterior is up in the image)
        assert col @ np.array([0.0, 1.0, -1.0]) > 0.0
    positions = small_study.image_positions
    assert positions.shape == (2, 3)
    # slices are parallel: successive positions differ along the normal only, by >= the thickness
    step = positions[1] - positions[0]
    in_plane = step - (step @ normal) * normal
    assert np.linalg.norm(in_plane) < 1e-9
    assert abs(step @ normal) >= small_study.slice_thickness_mm


def test_deterministic(small_study: PhantomStudy) -> None:
    again = make_study(5, slices=2, frames=16, size=128, generator=small_study.generator)
    np.testing.assert_array_equal(again.frames, small_study.frames)
    np.testing.assert_array_equal(again.image_positions, small_study.image_positions)
    np.testing.assert_array_equal(again.image_orientation, small_study.image_orientation)
    assert again.heart_rate_bpm == small_study.heart_rate_bpm


def test_seeds_give_different_patients(small_study: PhantomStudy) -> None:
    other = make_study(6, slices=2, frames=16, size=128, generator=small_study.generator)
    assert other.patient_id != small_study.patient_id
    assert other.heart_rate_bpm != small_study.heart_rate_bpm
    assert other.pixel_spacing_mm != small_study.pixel_spacing_mm
    assert float(np.abs(other.frames - small_study.frames).mean()) > 0.03
    assert not np.allclose(other.image_positions, small_study.image_positions)


def test_patient_does_not_depend_on_requested_size() -> None:
    a = make_study(9, slices=1, frames=8, size=64)
    b = make_study(9, slices=2, frames=16, size=128)
    assert a.heart_rate_bpm == b.heart_rate_bpm
    np.testing.assert_allclose(a.pixel_spacing_mm * 64, b.pixel_spacing_mm * 128)


def test_rician_noise_floor_in_air(small_study: PhantomStudy) -> None:
    # corners are air: magnitude noise has a positive mean and no negative values
    corner = small_study.frames[:, :, :6, :6]
    assert 0.0 < float(corner.mean()) < 0.08
    assert float(corner.std()) > 0.0
    # noise differs from frame to frame
    assert not np.array_equal(small_study.frames[0, 0, :6, :6], small_study.frames[0, 1, :6, :6])


@pytest.mark.parametrize("generator", HEART_GENERATORS)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_motion_curve_is_periodic_and_physiological(generator: str, seed: int) -> None:
    ends = motion_curve(seed, np.array([0.0, 1.0, 2.0, 1.0 - 1e-7]), generator)
    assert ends[0] == ends[1] == ends[2]
    assert abs(ends[3] - ends[0]) < 1e-4  # continuous across the wrap (frame T == frame 0)
    phase = np.linspace(0.0, 1.0, 1001)
    curve = motion_curve(seed, phase, generator)
    assert curve.max() <= 1.0 + 1e-12
    assert curve.max() == pytest.approx(1.0, abs=1e-3)
    # end-systolic area 12-80 % of end-diastolic: normal, hypertrophic and dilated ventricles
    assert 0.12 <= curve.min() <= 0.8
    assert curve[0] > 0.95  # the R wave (first frame) is at or near end-diastole
    es = phase[np.argmin(curve)]
    assert 0.2 <= es <= 0.47  # systole is the fast first part of the cycle
    # contraction is faster than relaxation-and-filling
    assert es < 1.0 - es


@pytest.mark.parametrize("seed", range(6))
def test_sax_curve_has_filling_diastasis_and_atrial_kick(seed: int) -> None:
    phase = np.linspace(0.0, 1.0, 2001)
    curve = motion_curve(seed, phase, "sax")
    sv = 1.0 - curve.min()
    es = int(np.argmin(curve))
    # rapid filling: before the atrial kick (phase 0.8) more than half of the stroke area is back
    assert es < 1000
    assert curve[1600] - curve.min() > 0.5 * sv
    # atrial kick: a late rise over the last fifth of the cycle, from a level below end-diastole
    assert curve[-2] - curve[1600] > 0.03
    # isovolumic contraction: flat just after the R wave
    assert curve[10] == 1.0


def _lv_blood_pixels(study: PhantomStudy, seed: int, frame: int) -> int:
    """Bright pixels within the end-diastolic LV cavity radius around the LV centre (slice 0)."""
    centre_mm, radius_mm = lv_region(seed, study.generator)
    size = study.frames.shape[-1]
    centre = centre_mm / study.pixel_spacing_mm + (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size]
    disk = np.hypot(xx - centre[0], yy - centre[1]) < (radius_mm + 2.0) / study.pixel_spacing_mm
    image = study.frames[0, frame]
    threshold = 0.5 * float(np.percentile(study.frames[0, 0][disk], 95))
    return int(np.count_nonzero(image[disk] > threshold))


@pytest.mark.parametrize("generator", HEART_GENERATORS)
@pytest.mark.parametrize("seed", [1, 4])
def test_systole_shrinks_the_lv_blood_pool(generator: str, seed: int) -> None:
    study = make_study(seed, slices=2, frames=24, size=128, generator=generator)
    phases = study.trigger_times_ms / study.rr_interval_ms
    es = int(np.argmin(motion_curve(seed, phases, generator)))
    ed_count = _lv_blood_pixels(study, seed, 0)
    es_count = _lv_blood_pixels(study, seed, es)
    assert ed_count > 100
    assert es_count < 0.8 * ed_count
    # and it refills: the last frame (just before the next R wave) is close to end-diastole again
    assert _lv_blood_pixels(study, seed, 23) > 0.85 * ed_count


def test_cavity_shrinks_from_base_to_apex() -> None:
    study = make_study(2, slices=3, frames=8, size=128, generator="sax")
    counts = [int(np.count_nonzero(study.frames[s, 0] > 0.55)) for s in range(3)]
    # bright pixels: blood pools plus fat; the base has the largest ventricles
    assert counts[0] > counts[2]


def test_generators_differ() -> None:
    a = make_study(3, slices=1, frames=8, size=128, generator=GENERATORS[0])
    b = make_study(3, slices=1, frames=8, size=128, generator=GENERATORS[1])
    c = make_study(3, slices=1, frames=8, size=128, generator="lax")
    assert float(np.abs(a.frames - b.frames).mean()) > 0.03
    assert float(np.abs(a.frames - c.frames).mean()) > 0.01  # same chest, different view of the heart
    assert not np.allclose(a.image_orientation, c.image_orientation)
    phase = np.linspace(0, 1, 200, endpoint=False)
    ca, cb = motion_curve(3, phase, GENERATORS[0]), motion_curve(3, phase, GENERATORS[1])
    assert np.abs(ca - cb).max() > 0.05
    # different constructions: sax has exactly flat isovolumic phases right after the R wave
    assert np.all(ca[:2] == 1.0)
    assert not np.all(cb[:2] == 1.0)


def test_degrade_acquisition_exact_geometry() -> None:
    frames = np.arange(2 * 16 * 8 * 8, dtype=np.float32).reshape(2, 16, 8, 8) / (2 * 16 * 64)
    study = PhantomStudy(
        patient_id="PHANTOM-0001",
        frames=frames,
        trigger_times_ms=np.arange(16) * 50.0,
        rr_interval_ms=800.0,
        pixel_spacing_mm=1.25,
        slice_thickness_mm=8.0,
        image_orientation=np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]),
        image_positions=np.array([[-100.0, -50.0, 20.0], [-100.0, -50.0, 30.0]]),
        heart_rate_bpm=75.0,
        generator="sax",
    )
    low = degrade_acquisition(study, temporal=8, spatial=4)
    assert low.frames.shape == (2, 2, 2, 2)
    np.testing.assert_array_equal(low.trigger_times_ms, [0.0, 400.0])
    assert low.pixel_spacing_mm == 5.0
    np.testing.assert_allclose(low.image_positions, [[-98.125, -48.125, 20.0], [-98.125, -48.125, 30.0]])
    np.testing.assert_array_equal(low.image_orientation, study.image_orientation)
    # area averaging of 4x4 blocks of frames 0 and 8
    np.testing.assert_allclose(low.frames[1, 1, 0, 1], frames[1, 8, 0:4, 4:8].mean(), rtol=1e-6)
    np.testing.assert_allclose(low.frames[0, 0, 1, 0], frames[0, 0, 4:8, 0:4].mean(), rtol=1e-6)
    assert low.rr_interval_ms == 800.0 and low.patient_id == study.patient_id
    # the input is untouched
    assert study.frames.shape == (2, 16, 8, 8)


def test_degrade_keeps_the_field_of_view_centre_on_an_oblique_stack() -> None:
    study = make_study(8, slices=2, frames=32, size=128)
    low = degrade_acquisition(study)
    assert low.frames.shape == (2, 4, 32, 32)
    np.testing.assert_array_equal(low.trigger_times_ms, study.trigger_times_ms[[0, 8, 16, 24]])
    assert low.pixel_spacing_mm == pytest.approx(4 * study.pixel_spacing_mm)
    row, col = study.image_orientation[:3], study.image_orientation[3:]

    def centre(s: PhantomStudy) -> np.ndarray:
        n = s.frames.shape[-1]
        return s.image_positions + (n - 1) / 2 * s.pixel_spacing_mm * (row + col)

    np.testing.assert_allclose(centre(low), centre(study), atol=1e-9)
    np.testing.assert_allclose(low.image_positions - study.image_positions,
                               np.tile(1.5 * study.pixel_spacing_mm * (row + col), (2, 1)), atol=1e-12)
    assert float(low.frames.max()) <= 1.0 and float(low.frames.min()) >= 0.0


def test_lv_region_points_at_the_lv_blood_pool() -> None:
    for generator in HEART_GENERATORS:
        study = make_study(12, slices=1, frames=2, size=128, generator=generator)
        centre, radius = lv_region(12, generator)
        assert 15.0 < radius < 45.0
        j, i = np.round(centre / study.pixel_spacing_mm + 63.5).astype(int)
        patch = study.frames[0, 0, i - 2:i + 3, j - 2:j + 3]
        # blood is among the brightest tissue: far above the image median
        assert float(patch.mean()) > 3.0 * float(np.median(study.frames[0, 0]))


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown phantom generator"):
        make_study(1, generator="nope")
    with pytest.raises(ValueError):
        make_study(-1)
    study = make_study(1, slices=1, frames=8, size=30)
    with pytest.raises(ValueError, match="not divisible"):
        degrade_acquisition(study, spatial=4)
    assert dataclasses.is_dataclass(study)


@pytest.mark.parametrize("generator", HEART_GENERATORS)
def test_frames_follow_the_motion_curve(generator: str) -> None:
    # the LV blood pool seen in the frames rises and falls with the published motion curve
    study = make_study(4, slices=1, frames=16, size=128, generator=generator)
    phases = study.trigger_times_ms / study.rr_interval_ms
    curve = motion_curve(4, phases, generator)
    counts = np.array([_lv_blood_pixels(study, 4, t) for t in range(16)], dtype=float)
    assert np.corrcoef(curve, counts)[0, 1] > 0.75


def test_rendered_heart_is_periodic() -> None:
    """The noise-free heart at phase 1 (the next R wave) is the heart at phase 0, for every generator."""
    from cinesr.model import phantom_fourier, phantom_lax, phantom_sax

    grid = (np.arange(96, dtype=np.float32) - 47.5) * 1.4
    y, x = np.meshgrid(grid, grid, indexing="ij")
    bg = np.zeros_like(x, dtype=np.complex64)
    tex = np.zeros_like(x)

    sax = phantom_sax.sample_params(np.random.default_rng(3))
    x_h, y_h = x + sax.heart_xy[0], y + sax.heart_xy[1]
    tabs = phantom_sax._Tables(sax)
    zs = np.array([30.0, 34.0])
    at = [phantom_sax._heart(sax, tabs, x_h, y_h, zs, ph, 1.4, bg, tex, 1.0) for ph in (0.0, 1.0, 0.4)]
    np.testing.assert_allclose(at[0], at[1], atol=1e-6)
    assert np.abs(at[0] - at[2]).max() > 0.5  # and it does move in between

    lax = phantom_lax.sample_params(np.random.default_rng(3))
    x_l, y_l = x + lax.heart_xy[0], y + lax.heart_xy[1]
    at = [phantom_lax._heart(lax, x_l, y_l, 0.0, ph, 1.4, bg, tex) for ph in (0.0, 1.0, 0.4)]
    np.testing.assert_allclose(at[0], at[1], atol=1e-6)
    assert np.abs(at[0] - at[2]).max() > 0.5

    four = phantom_fourier.sample_params(np.random.default_rng(3))
    prof = phantom_fourier._Profiles(four)
    x_f, y_f = x + four.heart_xy[0], y + four.heart_xy[1]
    ftex = np.ones((x.shape[0] + 20, x.shape[1] + 20), np.float32)
    bg_f = np.zeros_like(x)
    at = [phantom_fourier._heart(four, prof, x_f, y_f, 20.0, ph, bg_f, ftex, 0.7) for ph in (0.0, 1.0, 0.4)]
    np.testing.assert_allclose(at[0], at[1], atol=1e-6)
    assert np.abs(at[0] - at[2]).max() > 0.5


@pytest.mark.parametrize("generator", HEART_GENERATORS)
def test_noise_free_twin(generator: str) -> None:
    noisy = make_study(6, slices=1, frames=4, size=96, generator=generator)
    clean = make_study(6, slices=1, frames=4, size=96, generator=generator, noise=False)
    # same anatomy and scale: the difference is zero-mean-ish noise of a few percent
    diff = noisy.frames - clean.frames
    assert 0.003 < float(diff.std()) < 0.08
    inside = clean.frames > 0.3  # where the signal dominates, Rician noise is nearly unbiased
    assert abs(float(diff[inside].mean())) < 0.01
    # air is black without noise, not with it
    assert float(clean.frames[..., :6, :6].max()) < 0.01
    assert float(noisy.frames[..., :6, :6].mean()) > 0.004
    np.testing.assert_array_equal(clean.image_positions, noisy.image_positions)
    assert clean.heart_rate_bpm == noisy.heart_rate_bpm


CONTENT = [g for g in GENERATORS if g not in HEART_GENERATORS]


@pytest.mark.parametrize("generator", CONTENT)
def test_other_content_is_a_periodic_seeded_cine(generator: str) -> None:
    """Dead leaves, textures, Shepp-Logan and the third-party sources: (slices, frames) cines in [0, 1],
    not blank, moving, seeded, each slice different, and periodic (the last frame leads back to the first
    as smoothly as any frame to the next)."""
    study = make_study(3, slices=2, frames=16, size=128, generator=generator)
    f = study.frames
    assert f.shape == (2, 16, 128, 128) and f.dtype == np.float32
    assert 0.0 <= float(f.min()) and float(f.max()) <= 1.0 and float(f.std()) > 0.05
    steps = np.abs(np.diff(f[0], axis=0)).mean(axis=(1, 2))
    wrap = float(np.abs(f[0, 0] - f[0, -1]).mean())
    assert steps.max() > 1e-3, "it moves"
    assert wrap < 2.5 * float(np.median(steps)) + 1e-3, "the cycle closes"
    assert float(np.abs(f[0] - f[1]).mean()) > 0.01, "slices differ"
    np.testing.assert_array_equal(make_study(3, slices=2, frames=16, size=128, generator=generator).frames, f)
    assert float(np.abs(make_study(4, slices=1, frames=16, size=128, generator=generator).frames[0]
                        - f[0]).mean()) > 0.02
    assert study.generator == generator and study.trigger_times_ms.shape == (16,)


def test_third_party_sources_are_kept_apart() -> None:
    assert set(THIRD_PARTY) <= set(CONTENT) and not set(THIRD_PARTY) & set(HEART_GENERATORS)
    with pytest.raises(ValueError, match="not a heart phantom"):
        lv_region(1, generator="deadleaves")
