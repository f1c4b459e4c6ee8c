"""Data consistency: each acquisition model is enforced exactly (k-space) or to convergence (area),
the correction brings no 4x4 blocks or ringing of its own, the right model is chosen, fidelity is measured."""

from __future__ import annotations

import numpy as np
import pytest
from cinesr.model import consistency
from cinesr.model.baseline import bicubic_up
from cinesr.model.degrade import area_down, kspace_down
from cinesr.model.phantom import make_study


@pytest.fixture(scope="module")
def truth() -> np.ndarray:
    return make_study(3, slices=1, frames=2, size=128, generator="sax", noise=False).frames[0].astype(np.float64)


def _acquire(kind: str, frames: np.ndarray) -> np.ndarray:
    return area_down(frames) if kind == "area" else kspace_down(frames)


@pytest.mark.parametrize("kind", consistency.KINDS)
def test_the_model_of_an_acquisition_reproduces_it(truth: np.ndarray, kind: str) -> None:
    """The acquisition model applied to the truth gives the acquisition (k-space: up to the magnitude)."""
    lr = _acquire(kind, truth)
    assert consistency.residual_rms(truth, lr, kind) < 2e-3


@pytest.mark.parametrize("kind", consistency.KINDS)
def test_enforcing_makes_the_output_reproduce_the_acquisition(truth: np.ndarray, kind: str) -> None:
    lr = _acquire(kind, truth)
    guess = np.clip(bicubic_up(lr) + 0.05 * np.sin(np.arange(128) / 3.0), 0, 1)  # a wrong guess
    before = consistency.residual_rms(guess, lr, kind)
    fixed = consistency.enforce(guess, lr, kind)
    after = consistency.residual_rms(fixed, lr, kind)
    assert after < before / 50 and after < 2e-4, (before, after)
    # it moves the guess towards the truth, not away
    assert np.sqrt(np.mean((fixed - truth) ** 2)) < np.sqrt(np.mean((guess - truth) ** 2))


def test_the_area_correction_paints_no_blocks(truth: np.ndarray) -> None:
    """A nearest-neighbour lift would be exact but would leave steps on the 4x4 grid; the bicubic lift
    must not: the correction is as smooth across block edges as inside blocks."""
    lr = area_down(truth)
    guess = np.full_like(truth, float(truth.mean()))
    correction = consistency.enforce(guess, lr, "area") - guess
    dx = np.abs(np.diff(correction, axis=-1))
    at_edges = dx[..., 3::4].mean()  # differences across block borders (columns 3|4, 7|8, ...)
    inside = np.delete(dx, np.s_[3::4], axis=-1).mean()
    assert at_edges < 1.3 * inside, (at_edges, inside)


def test_the_kspace_correction_is_band_limited(truth: np.ndarray) -> None:
    """Without the nonnegative bound the correction is band-limited (it adds no ringing of its own)."""
    lr = kspace_down(truth)
    guess = np.clip(bicubic_up(lr), 0, 1)
    correction = consistency.enforce(guess, lr, "kspace", nonnegative=False) - guess
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2(correction), axes=(-2, -1)))
    h = truth.shape[-1]
    # the measured band, with its +Nyquist row and column (the Nyquist frequency is split between both signs)
    centre = spectrum[..., h // 2 - h // 8 : h // 2 + h // 8 + 1, h // 2 - h // 8 : h // 2 + h // 8 + 1]
    assert spectrum.sum() - centre.sum() < 1e-5 * spectrum.sum()  # nothing outside the measured band


def test_the_kspace_bound_takes_ringing_out_of_black(truth: np.ndarray) -> None:
    """A magnitude acquisition is >= 0: with the bound (the default for such an acquisition) a blurred guess's
    band-limited correction rings less below black, still reproduces the acquisition and is closer to the truth."""
    from scipy.ndimage import gaussian_filter

    lr = kspace_down(truth)
    guess = gaussian_filter(truth, (0, 2, 2))
    plain = consistency.enforce(guess, lr, "kspace", nonnegative=False)
    bounded = consistency.enforce(guess, lr, "kspace")
    assert bounded.min() > 0.5 * plain.min()
    assert consistency.residual_rms(bounded, lr, "kspace") < 2e-3
    assert np.sqrt(np.mean((bounded - truth) ** 2)) < np.sqrt(np.mean((plain - truth) ** 2))


def test_the_kspace_sign_flips_only_where_the_magnitude_crosses_zero() -> None:
    """A guess whose band dips below zero where the acquisition is far from zero (a network error in a
    bright textured region) is corrected to the acquired value, not to its negative: flipping it there made
    texture flicker from frame to frame."""
    yy, xx = np.mgrid[:128, :128]
    truth = (0.4 + 0.2 * np.sin(xx / 5.0) * np.cos(yy / 7.0))[None]  # nowhere near zero
    lr = kspace_down(truth)
    guess = truth.copy()
    guess[:, 40:80, 40:80] -= 0.7  # its band is negative there
    fixed = consistency.enforce(guess, lr, "kspace", nonnegative=False)
    assert float(np.abs(fixed - truth)[:, 48:72, 48:72].max()) < 0.1
    assert consistency.residual_rms(fixed, lr, "kspace") < 2e-4


def test_the_kspace_taper_keeps_the_low_band_exact_and_rings_less() -> None:
    """Tapered, the k-space projection still reproduces the inner band exactly, blends the guess's own band
    into the acquisition's at its outer edge, and so puts less of the truncation's Gibbs ringing back into a
    guess without the detail above the band (a network that cannot cancel the rings)."""
    from cinesr.model.kspace import band
    from scipy.ndimage import distance_transform_edt, gaussian_filter

    yy, xx = np.mgrid[:128, :128]
    disc = (((yy - 61.3) ** 2 + (xx - 66.7) ** 2) < 30.5**2).astype(np.float64)
    truth = (0.3 + 0.7 * disc)[None]  # on grey: the band has no zero crossing, so no sign to choose
    lr = kspace_down(truth)
    guess = gaussian_filter(truth, (0, 2.5, 2.5))
    exact = consistency.enforce(guess, lr, "kspace", nonnegative=False)
    tapered = consistency.enforce(guess, lr, "kspace", nonnegative=False, taper=0.4)
    # the inner band (where the Tukey weight is 1) is the acquisition's in both
    spectrum = lambda x: np.fft.fftshift(np.fft.fft2(np.real(band(x, 4))), axes=(-2, -1))  # noqa: E731
    wanted = spectrum(truth)
    inner = (slice(None), slice(16 - 9, 16 + 10), slice(16 - 9, 16 + 10))  # |k| <= 9 of the 16 per side
    for out in (exact, tapered):
        assert np.abs(spectrum(out) - wanted)[inner].max() < 1e-6 * np.abs(wanted).max()
    # at the band's edge the tapered output keeps part of the guess's own (smaller) band
    edge = np.abs(spectrum(tapered) - wanted)[:, 1, :].max()
    assert edge > 1e-3 * np.abs(wanted).max()
    # away from the disc's edge the truth is flat: the exact projection rings there, the tapered one less
    flat = (distance_transform_edt(disc) > 4) | (distance_transform_edt(1 - disc) > 4)
    ring = lambda x: float(np.abs(x - truth)[:, flat].max())  # noqa: E731
    assert ring(tapered) < 0.9 * ring(exact), (ring(tapered), ring(exact))  # 0.078 against 0.091


@pytest.mark.parametrize("kind", consistency.KINDS)
def test_both_is_consistent_with_either_acquisition_to_half_their_disagreement(truth: np.ndarray,
                                                                                kind: str) -> None:
    """`both` (an option for an unknown acquisition) is the mean of the two projections: it moves a wrong
    guess towards what was acquired under whichever model made the input, without reproducing it exactly."""
    lr = _acquire(kind, truth)
    guess = np.clip(bicubic_up(lr) + 0.05 * np.sin(np.arange(128) / 3.0), 0, 1)
    both = consistency.enforce(guess, lr, "both")
    exact = {k: consistency.enforce(guess, lr, k) for k in consistency.KINDS}
    np.testing.assert_allclose(both, (exact["area"] + exact["kspace"]) / 2, atol=1e-5)
    assert consistency.residual_rms(both, lr, kind) < consistency.residual_rms(guess, lr, kind) / 3
    err = lambda x: float(np.sqrt(np.mean((x - truth) ** 2)))  # noqa: E731
    assert err(both) < err(guess)


@pytest.mark.parametrize("kind", consistency.KINDS)
def test_auto_chooses_the_model_that_made_the_input(truth: np.ndarray, kind: str) -> None:
    """Given a good reconstruction (here the truth with a little noise), the acquisition that made the
    input explains it better than the other one."""
    lr = _acquire(kind, truth)
    recon = truth + np.random.default_rng(0).normal(0, 0.01, truth.shape)
    assert consistency.choose([recon], [lr]) == kind


def test_fidelity_figure(truth: np.ndarray) -> None:
    lr = area_down(truth)
    assert consistency.fidelity_db(truth, lr, "area") == consistency.FIDELITY_CAP_DB
    blurred = np.clip(bicubic_up(area_down(area_down(truth), 2), 8), 0, 1)
    low, high = consistency.fidelity_db(blurred, lr, "area"), consistency.fidelity_db(truth, lr, "area")
    assert low < 30 < high


def test_noise_level_and_tolerance() -> None:
    """The noise estimate reads the noise of an acquisition, not its edges; with a tolerance of twice that
    level a denoised output keeps its work, while a bright dot the output erased comes back."""
    rng = np.random.default_rng(1)
    truth = make_study(4, slices=1, frames=2, size=256, noise=False).frames[0].astype(np.float64)
    clean = area_down(truth)
    assert consistency.noise_sigma([clean]) < 0.005
    noisy = clean + rng.normal(0, 0.02, clean.shape)
    assert consistency.noise_sigma([noisy]) == pytest.approx(0.02, rel=0.3)
    tol = 2 * consistency.noise_sigma([noisy])
    denoised = consistency.enforce(truth, noisy, "area", tolerance=tol)
    exact = consistency.enforce(truth, noisy, "area")
    err = lambda x: float(np.sqrt(np.mean((x - truth) ** 2)))  # noqa: E731
    assert err(denoised) < 0.5 * err(exact)  # the noise does not come back in
    dotted = truth.copy()
    dotted[:, 120:128, 120:128] += 0.6  # a bright 8x8 structure the acquisition shows...
    lr = area_down(dotted) + rng.normal(0, 0.02, clean.shape)
    erased = consistency.enforce(truth, lr, "area", tolerance=tol)  # ...and an output without it
    assert float(erased[:, 120:128, 120:128].mean() - truth[:, 120:128, 120:128].mean()) > 0.4


def test_a_nonnegative_acquisition_gets_no_dark_halo_round_a_bright_rim() -> None:
    """A blurred bright rim on black: its excess outside the rim, taken back smoothly, dug below black (a dark
    halo); with the nonnegative bound (the default for such an acquisition) the excess comes from the pixels
    that hold it. Both reproduce the acquisition; the bounded one is also closer to the truth."""
    from scipy.ndimage import gaussian_filter

    yy, xx = np.mgrid[:128, :128] + 0.5
    d = np.hypot(yy - 64, xx - 64)
    truth = np.where((d >= 30) & (d < 36), 0.9, np.where(d < 30, 0.35, 0.0))[None]
    lr = area_down(truth)
    guess = gaussian_filter(truth, (0, 2, 2))
    plain = consistency.enforce(guess, lr, "area", nonnegative=False)
    bounded = consistency.enforce(guess, lr, "area")
    assert plain.min() < -0.1  # the halo, reproduced
    assert bounded.min() > -0.05
    for fixed in (plain, bounded):
        assert consistency.residual_rms(fixed, lr, "area") < 2e-4
    assert np.sqrt(np.mean((bounded - truth) ** 2)) < np.sqrt(np.mean((plain - truth) ** 2))
