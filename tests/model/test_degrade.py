"""Degradation pipeline: determinism, sampled ranges, shapes, kernels, bicubic and temporal decimation."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from cinesr.model.degrade import (
    DegradationConfig,
    DegradationParams,
    KernelParams,
    StageParams,
    apply_degradation,
    bicubic_down,
    decimate_time,
    degrade,
    make_kernel,
    sample_kernel,
    sample_params,
)


def _window(h: int = 128, w: int = 128, seed: int = 0) -> np.ndarray:
    """Three consecutive 'frames': a smooth moving blob with texture, float32 in [0, 1]."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = []
    for t in range(3):
        blob = np.exp(-(((xx - w / 2 - 3 * t) / (w / 6)) ** 2 + ((yy - h / 2) / (h / 5)) ** 2))
        stripes = 0.15 * np.sin(xx / 3.0 + t) * np.cos(yy / 5.0)
        frames.append(np.clip(0.2 + 0.6 * blob + stripes, 0, 1))
    return np.stack(frames).astype(np.float32)


def _stage(**overrides: object) -> StageParams:
    base = dict(
        kernel=None,
        resize="keep",
        resize_scale=1.0,
        resize_mode="area",
        noise="gaussian",
        noise_level=10.0,
        gray_noise=True,
        jpeg_quality=90,
    )
    base.update(overrides)
    return StageParams(**base)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("second_order_prob", [0.0, 1.0])
def test_same_seed_same_output_and_seeds_differ(second_order_prob: float) -> None:
    frames = _window()
    cfg = DegradationConfig(second_order_prob=second_order_prob)
    a = degrade(frames, np.random.default_rng(7), cfg)
    b = degrade(frames, np.random.default_rng(7), cfg)
    np.testing.assert_array_equal(a, b)
    others = [degrade(frames, np.random.default_rng(s), cfg) for s in (8, 9)]
    assert all(np.abs(o - a).mean() > 1e-3 for o in others)
    assert sample_params(np.random.default_rng(7), cfg) == sample_params(np.random.default_rng(7), cfg)


def test_output_shape_dtype_range_and_quantisation() -> None:
    frames = _window(128, 96)
    for seed in range(6):
        for cfg in (DegradationConfig(), DegradationConfig(second_order_prob=1.0)):
            out = degrade(frames, np.random.default_rng(seed), cfg)
            assert out.shape == (3, 32, 24) and out.dtype == np.float32
            assert out.min() >= 0.0 and out.max() <= 1.0
            np.testing.assert_allclose(out * 255, np.round(out * 255), atol=1e-3)  # 8-bit levels
            # still an image of the input, not noise: correlates with the bicubic reference
            ref = bicubic_down(frames)
            assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.5
    single = degrade(frames[0], np.random.default_rng(0))
    assert single.shape == (32, 24)


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        degrade(np.zeros((2, 3, 8, 8), np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError):
        degrade(np.zeros((3, 8, 8), np.uint8), np.random.default_rng(0))
    with pytest.raises(ValueError):
        bicubic_down(np.zeros((3, 2, 2), np.float32))


# ----------------------------------------------------------------------------- one image, 3 frames


def test_same_parameters_for_all_frames() -> None:
    """Three identical frames with grey noise degrade identically, and equal the single-frame result."""
    frame = _window()[0]
    kernel = KernelParams("aniso", 9, 1.5, 0.7, 0.4)
    params = DegradationParams(
        first=_stage(kernel=kernel, resize="down", resize_scale=0.5, resize_mode="bicubic", noise_level=20.0),
        second=None,
        final_mode="bilinear",
        noise_seed=123,
    )
    stacked = apply_degradation(np.stack([frame] * 3), params)
    single = apply_degradation(frame, params)
    for i in range(3):
        np.testing.assert_array_equal(stacked[i], single)
    # colour (per-frame) noise makes the frames differ
    colour = DegradationParams(**{**params.__dict__, "first": _stage(noise_level=20.0, gray_noise=False)})
    out = apply_degradation(np.stack([frame] * 3), colour)
    assert np.abs(out[0] - out[1]).max() > 0


def test_gaussian_noise_level_is_on_the_8bit_scale() -> None:
    flat = np.full((3, 256, 256), 0.5, np.float32)
    params = DegradationParams(
        first=_stage(noise_level=20.0, gray_noise=False, jpeg_quality=95), second=None, final_mode="area"
    )
    out = apply_degradation(flat, params)
    # i.i.d. noise of sigma 20/255 averaged over 4x4 pixels by the final area resize
    expected = 20.0 / 255.0 / 4.0
    assert out.std() == pytest.approx(expected, rel=0.3)
    assert out.mean() == pytest.approx(0.5, abs=0.01)


def test_poisson_noise_scales_with_its_parameter() -> None:
    ramp = np.tile(np.linspace(0.1, 0.9, 256, dtype=np.float32), (3, 256, 1))
    stds = []
    for scale in (0.1, 2.0):
        params = DegradationParams(
            first=_stage(noise="poisson", noise_level=scale, gray_noise=True, jpeg_quality=95),
            second=None,
            final_mode="area",
        )
        stds.append(np.std(apply_degradation(ramp, params) - bicubic_down(ramp)))
    assert stds[1] > 5 * stds[0]


# ----------------------------------------------------------------------------------------- ranges


def test_sampled_parameters_respect_the_ranges() -> None:
    rng = np.random.default_rng(0)
    cfg = DegradationConfig(second_order_prob=0.5)
    samples = [sample_params(rng, cfg) for _ in range(3000)]
    firsts = [p.first for p in samples]
    seconds = [p.second for p in samples if p.second is not None]

    def check_kernel(k: KernelParams, sizes: range, sigma: tuple[float, float]) -> None:
        assert k.size in sizes and k.size % 2 == 1
        if k.kind == "sinc":
            low = math.pi / 3 if k.size < 13 else math.pi / 5
            assert low <= k.omega_c <= math.pi
            return
        assert sigma[0] <= k.sigma_x <= sigma[1] and sigma[0] <= k.sigma_y <= sigma[1]
        assert -math.pi <= k.theta <= math.pi
        if k.kind.endswith("iso") and not k.kind.endswith("aniso"):
            assert k.sigma_x == k.sigma_y and k.theta == 0.0
        if k.kind.startswith("generalized"):
            assert 0.5 <= k.beta <= 4.0
        elif k.kind.startswith("plateau"):
            assert 1.0 <= k.beta <= 2.0
        else:
            assert k.beta == 1.0

    def check_stage(s: StageParams, resize: tuple[float, float], noise: tuple[float, float], poisson) -> None:
        if s.resize == "up":
            assert 1.0 <= s.resize_scale <= resize[1]
        elif s.resize == "down":
            assert resize[0] <= s.resize_scale <= 1.0
        else:
            assert s.resize_scale == 1.0
        assert s.resize_mode in ("area", "bilinear", "bicubic")
        lo, hi = noise if s.noise == "gaussian" else poisson
        assert lo <= s.noise_level <= hi

    for s in firsts:
        assert s.kernel is not None  # the first order always blurs
        check_kernel(s.kernel, range(3, 20), (0.2, 3.0))
        check_stage(s, (0.15, 1.5), (1.0, 30.0), (0.05, 3.0))
        assert s.jpeg_quality is not None and 30 <= s.jpeg_quality <= 95
    for s in seconds:
        if s.kernel is not None:
            check_kernel(s.kernel, range(3, 14), (0.2, 1.5))
        check_stage(s, (0.3, 1.2), (1.0, 25.0), (0.05, 2.5))
        assert s.jpeg_quality is None
    for p in samples:
        if p.second is not None:
            assert 30 <= p.final_jpeg_quality <= 95  # type: ignore[operator]
            if p.final_sinc is not None:
                assert math.pi / 3 <= p.final_sinc.omega_c <= math.pi and p.final_sinc.size <= 13

    n = len(samples)
    updown = Counter(s.resize for s in firsts)
    assert updown["up"] / n == pytest.approx(0.2, abs=0.03)
    assert updown["down"] / n == pytest.approx(0.7, abs=0.03)
    assert updown["keep"] / n == pytest.approx(0.1, abs=0.03)
    assert sum(s.noise == "gaussian" for s in firsts) / n == pytest.approx(0.5, abs=0.04)
    assert sum(s.gray_noise for s in firsts) / n == pytest.approx(0.4, abs=0.04)
    assert sum(s.kernel.kind == "sinc" for s in firsts) / n == pytest.approx(0.1, abs=0.02)  # type: ignore[union-attr]
    assert len(seconds) / n == pytest.approx(0.5, abs=0.04)
    assert sum(s.kernel is not None for s in seconds) / len(seconds) == pytest.approx(0.8, abs=0.04)
    kinds = Counter(s.kernel.kind for s in firsts if s.kernel.kind != "sinc")  # type: ignore[union-attr]
    assert kinds["iso"] / sum(kinds.values()) == pytest.approx(0.45, abs=0.04)
    assert {k.size for s in firsts if (k := s.kernel)} == set(range(3, 20, 2))
    qualities = [s.jpeg_quality for s in firsts]
    assert min(qualities) == 30 and max(qualities) == 95  # type: ignore[type-var]
    # first order only by default
    assert all(sample_params(rng).second is None for _ in range(50))


# ---------------------------------------------------------------------------------------- kernels


def test_kernels_sum_to_one_and_are_point_symmetric() -> None:
    rng = np.random.default_rng(1)
    cfg = DegradationConfig()
    kinds = set()
    for _ in range(400):
        kp = sample_kernel(rng, cfg.first)
        k = make_kernel(kp)
        kinds.add(kp.kind)
        assert k.shape == (kp.size, kp.size)
        assert k.sum() == pytest.approx(1.0, abs=1e-9)
        np.testing.assert_allclose(k, k[::-1, ::-1], atol=1e-12)
        assert np.argmax(k) == k.size // 2  # peak at the centre
    assert kinds == {
        "iso",
        "aniso",
        "generalized_iso",
        "generalized_aniso",
        "plateau_iso",
        "plateau_aniso",
        "sinc",
    }


def test_isotropic_kernel_is_the_gaussian() -> None:
    k = make_kernel(KernelParams("iso", 9, 1.3, 1.3))
    ax = np.arange(9) - 4.0
    g = np.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * 1.3**2))
    np.testing.assert_allclose(k, g / g.sum(), atol=1e-12)
    # anisotropic: second moments are sigma_x^2 along x and sigma_y^2 along y; theta rotates them
    ax21 = np.arange(21) - 10.0
    xx, yy = np.meshgrid(ax21, ax21)
    for theta, (vx, vy) in ((0.0, (4.0, 2.25)), (math.pi / 2, (2.25, 4.0))):
        a = make_kernel(KernelParams("aniso", 21, 2.0, 1.5, theta))
        assert (a * xx**2).sum() == pytest.approx(vx, rel=0.02)
        assert (a * yy**2).sum() == pytest.approx(vy, rel=0.02)
        assert (a * xx * yy).sum() == pytest.approx(0.0, abs=1e-9)
    diag = make_kernel(KernelParams("aniso", 21, 2.0, 1.5, math.pi / 4))
    assert (diag * xx * yy).sum() == pytest.approx((4.0 - 2.25) / 2, rel=0.03)
    # generalised Gaussian with beta = 1 is the Gaussian
    np.testing.assert_allclose(make_kernel(KernelParams("generalized_iso", 9, 1.3, 1.3, beta=1.0)), k)


def test_sinc_kernel_has_the_lowpass_cutoff() -> None:
    k = make_kernel(KernelParams("sinc", 19, omega_c=math.pi / 2))
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2(k, s=(128, 128))))
    freqs = np.fft.fftshift(np.fft.fftfreq(128)) * 2 * math.pi
    assert spectrum[64, 64] == pytest.approx(1.0, abs=1e-9)  # DC gain 1 (sums to one)
    row = spectrum[64]
    assert row[np.abs(freqs) < math.pi / 4].min() > 0.8  # passes well below the cut-off
    assert row[np.abs(freqs) > 3 * math.pi / 4].max() < 0.2  # stops well above it


# ---------------------------------------------------------------------------------------- bicubic


def test_bicubic_of_constant_is_constant() -> None:
    const = np.full((3, 64, 48), 0.37, np.float32)
    out = bicubic_down(const)
    assert out.shape == (3, 16, 12)
    np.testing.assert_allclose(out, 0.37, atol=1e-6)
    cfg = DegradationConfig(kind="bicubic")
    np.testing.assert_array_equal(degrade(const, np.random.default_rng(0), cfg), out)


def test_bicubic_of_linear_ramp_is_block_mean_in_the_interior() -> None:
    ramp = np.tile(np.linspace(0.0, 1.0, 128, dtype=np.float32), (128, 1))
    out = bicubic_down(ramp)
    block_mean = ramp.reshape(32, 4, 32, 4).mean(axis=(1, 3))
    np.testing.assert_allclose(out[4:-4, 4:-4], block_mean[4:-4, 4:-4], atol=1e-5)
    frames = _window()
    assert np.abs(bicubic_down(frames) - frames.reshape(3, 32, 4, 32, 4).mean(axis=(2, 4))).mean() < 0.02


# ------------------------------------------------------------------------------------------ config


def test_config_from_dict() -> None:
    cfg = DegradationConfig.from_dict({"second_order_prob": 0.5, "first": {"noise_range": [2, 10]}})
    assert cfg.second_order_prob == 0.5 and cfg.first.noise_range == (2, 10)
    assert cfg.first.jpeg_range == (30, 95) and cfg.second.blur_sigma == (0.2, 1.5)
    with pytest.raises(ValueError):
        DegradationConfig.from_dict({"noise": 3})
    with pytest.raises(ValueError):
        DegradationConfig.from_dict({"first": {"kernel_sizes": [4]}})


# ------------------------------------------------------------------------------------------- time


def test_decimate_time_keeps_every_eighth_frame() -> None:
    cine = np.arange(24)[:, None, None] * np.ones((24, 4, 4))
    low = decimate_time(cine)
    assert low.shape == (3, 4, 4)
    assert [int(f[0, 0]) for f in low] == [0, 8, 16]
    assert [int(f[0, 0]) for f in decimate_time(cine, 8, offset=3)] == [3, 11, 19]
    assert torch.equal(decimate_time(torch.from_numpy(cine)), torch.from_numpy(cine[::8]))
    with pytest.raises(ValueError):
        decimate_time(cine, 0)
    with pytest.raises(ValueError):
        decimate_time(cine, 8, offset=8)
