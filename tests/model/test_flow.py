"""Cyclic optical-flow interpolation and the baseline."""

from __future__ import annotations

import numpy as np
import pytest
from cinesr.model.baseline import baseline_superresolve, bicubic_up
from cinesr.model.flow import cine_flows, interpolate_cine, interpolate_times, scale_flows


def _moving_disk(frames: int, size: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    out = []
    for k in range(frames):
        cx = size * 0.35 + size * 0.15 * np.sin(2 * np.pi * k / frames)
        out.append(1 / (1 + np.exp(((xx - cx) ** 2 + (yy - size / 2) ** 2) ** 0.5 - size * 0.15)))
    return np.stack(out).astype(np.float32)


def test_interpolation_keeps_input_frames_and_wraps() -> None:
    truth = _moving_disk(32)
    low = truth[::8]
    up = interpolate_cine(low, 8)
    assert up.shape == (32, 64, 64)
    np.testing.assert_array_equal(up[::8], low)
    # Motion-compensated interpolation beats a cross-fade, including across the wrap (frames 24..31).
    fade = np.concatenate([[(1 - a) * low[i] + a * low[(i + 1) % 4] for a in np.arange(8) / 8] for i in range(4)])
    err_flow = np.abs(up - truth).mean(axis=(1, 2))
    err_fade = np.abs(fade - truth).mean(axis=(1, 2))
    assert err_flow.mean() < 0.7 * err_fade.mean()
    assert err_flow[25:].mean() < err_fade[25:].mean()


def test_flows_follow_the_motion_on_a_finer_grid() -> None:
    """The flows of a cine, computed once, interpolate it as its own do; enlarged, they carry the same motion
    on the finer grid: the 4x enlargement of the truth interpolated with them is the 4x enlargement of the
    coarse interpolation (to the warps' own resampling)."""
    truth = _moving_disk(32)
    low = truth[::8]
    flows = cine_flows(low)
    np.testing.assert_array_equal(interpolate_cine(low, 8, flows=flows), interpolate_cine(low, 8))
    fine = scale_flows(flows, 4)
    assert fine[0][0].shape == (256, 256, 2)
    assert np.abs(fine[0][0]).max() == pytest.approx(4 * np.abs(flows[0][0]).max(), rel=0.05)
    up = interpolate_cine(bicubic_up(low, 4), 8, flows=fine)
    coarse = bicubic_up(interpolate_cine(low, 8), 4)
    still = bicubic_up(np.repeat(low, 8, axis=0), 4)  # no motion carried at all
    assert np.abs(up - coarse).mean() < 0.05 * np.abs(still - coarse).mean()


def test_non_cyclic_count() -> None:
    assert interpolate_cine(_moving_disk(4), 8, cyclic=False).shape[0] == 25


def test_trigger_times_interpolate_over_the_cycle() -> None:
    times = interpolate_times(np.array([0.0, 200.0, 400.0, 600.0]), 8, rr_interval=800.0)
    np.testing.assert_allclose(times, np.arange(32) * 25.0)
    # Without R-R, the cycle is last + median spacing.
    np.testing.assert_allclose(interpolate_times(np.array([0.0, 100.0]), 2), [0, 50, 100, 150])
    assert np.isnan(interpolate_times(np.array([np.nan, np.nan]), 8)).all()


def test_bicubic_preserves_constant_and_pixel_centres() -> None:
    np.testing.assert_allclose(bicubic_up(np.full((2, 8, 8), 3.0, np.float32)), 3.0, atol=1e-5)
    # A linear ramp stays linear: value at new pixel j equals the ramp at old coordinate (j + 0.5)/4 - 0.5.
    ramp = np.tile(np.arange(16, dtype=np.float32), (16, 1))
    up = bicubic_up(ramp, 4)
    j = np.arange(8, 56)
    np.testing.assert_allclose(up[30, j], (j + 0.5) / 4 - 0.5, atol=1e-3)


def test_baseline_shape() -> None:
    assert baseline_superresolve(_moving_disk(4, 16)).shape == (32, 64, 64)
