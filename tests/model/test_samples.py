"""Paper-style training samples: shapes, time alignment of input and ground truth, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from cinesr.model.degrade import DegradationConfig, bicubic_down
from cinesr.model.flow import interpolate_pair
from cinesr.model.samples import (
    CLIP_LENGTH,
    MIDDLE_WINDOW,
    WINDOW_STARTS,
    clip_indices,
    interpolate_clip,
    sample_from_clip,
    sample_from_slice,
)


def moving_disc(frames: int = CLIP_LENGTH, size: int = 64, speed: float = 1.5) -> np.ndarray:
    """A bright disc moving right by `speed` pixels per frame on a dim background."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = []
    for t in range(frames):
        cx = size * 0.3 + speed * t
        r = np.hypot(xx - cx, yy - size / 2)
        out.append(0.1 + 0.8 * np.clip(10.0 - r, 0, 1))
    return np.stack(out).astype(np.float32)


def test_sample_shapes_and_ranges() -> None:
    clip = moving_disc(size=64)
    s = sample_from_clip(clip, np.random.default_rng(0))
    assert s.lq.shape == (3, 16, 16) and s.lq.dtype == np.float32
    assert s.gt.shape == (3, 64, 64) and s.interpolated.shape == (3, 64, 64)
    assert 0.0 <= s.lq.min() and s.lq.max() <= 1.0
    assert len(s.clip_frames) == 3 and list(np.diff(s.clip_frames)) == [1, 1]
    assert 1 <= s.clip_frames[0] and s.clip_frames[-1] <= CLIP_LENGTH - 2


@pytest.mark.parametrize("window_start", range(WINDOW_STARTS))
def test_ground_truth_is_the_true_frames_at_the_interpolated_times(window_start: int) -> None:
    clip = moving_disc()
    s = sample_from_clip(clip, np.random.default_rng(1), DegradationConfig(kind="bicubic"),
                         window_start=window_start)
    frames = [window_start + 1, window_start + 2, window_start + 3]
    assert list(s.clip_frames) == frames
    np.testing.assert_array_equal(s.gt, clip[frames])
    # the input frames are the flow interpolation between clip frames 0 and 8 at phases k/8 ...
    expected = interpolate_pair(clip[0], clip[-1], np.array(frames, dtype=np.float32) / 8)
    np.testing.assert_allclose(s.interpolated, np.clip(expected, 0, 1), atol=1e-6)
    # ... and the degraded input is exactly that, bicubic-downsampled 4x
    np.testing.assert_allclose(s.lq, bicubic_down(s.interpolated, 4), atol=1e-6)
    # each interpolated frame matches its own true frame better than the true frame 2 steps away
    for j, k in enumerate(frames):
        own = np.abs(s.interpolated[j] - clip[k]).mean()
        other = np.abs(s.interpolated[j] - clip[k + 2 if k + 2 < CLIP_LENGTH else k - 2]).mean()
        assert own < other


def test_interpolation_uses_only_the_end_frames() -> None:
    clip = moving_disc()
    scrambled = clip.copy()
    scrambled[1:-1] = np.random.default_rng(0).random(scrambled[1:-1].shape, dtype=np.float32)
    np.testing.assert_array_equal(interpolate_clip(clip), interpolate_clip(scrambled))


def test_realesrgan_samples_are_seeded() -> None:
    clip = moving_disc()
    a = sample_from_clip(clip, np.random.default_rng(7))
    b = sample_from_clip(clip, np.random.default_rng(7))
    c = sample_from_clip(clip, np.random.default_rng(8))
    np.testing.assert_array_equal(a.lq, b.lq)
    assert a.clip_frames == b.clip_frames
    assert not np.array_equal(a.lq, c.lq) or a.clip_frames != c.clip_frames


def test_slice_clips_wrap_around_the_cardiac_cycle() -> None:
    np.testing.assert_array_equal(clip_indices(12, 8), [8, 9, 10, 11, 0, 1, 2, 3, 4])
    cine = moving_disc(frames=12)
    s = sample_from_slice(cine, np.random.default_rng(0), DegradationConfig(kind="bicubic"), clip_start=8,
                          window_start=MIDDLE_WINDOW)
    # clip frames 3, 4, 5 of a clip starting at 8 are cine frames 11, 0, 1
    np.testing.assert_array_equal(s.gt, cine[[11, 0, 1]])


def test_bad_clip_is_rejected() -> None:
    with pytest.raises(ValueError):
        sample_from_clip(np.zeros((5, 32, 32), np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError):
        sample_from_clip(moving_disc(), np.random.default_rng(0), window_start=WINDOW_STARTS)
