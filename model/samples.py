"""Training and evaluation samples built as in the paper.

From one cine slice take a 9-frame mini-clip, keep only its first and last frame (a temporal
acquisition 8x coarser), interpolate the 7 frames between them by optical flow (the same
interpolation as the baseline), pick 3 consecutive interpolated frames and degrade them spatially:
that is the low-resolution input (3, h, w). The ground truth is the 3 true frames at the same
times (3, 4h, 4w). The model thus learns to undo both the spatial degradation and the errors of
the flow interpolation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .degrade import DegradationConfig, degrade
from .flow import interpolate_pair

CLIP_LENGTH = 9  # frames 0 and 8 are kept, 1..7 interpolated (8x temporal decimation)
WINDOW = 3  # consecutive frames per sample: the 3 channels of the networks
INTERPOLATED = CLIP_LENGTH - 2
WINDOW_STARTS = INTERPOLATED - WINDOW + 1  # 5 possible windows among the 7 interpolated frames
MIDDLE_WINDOW = (INTERPOLATED - WINDOW) // 2  # frames 3, 4, 5 of the clip (evaluation: middle = 4)


@dataclass(frozen=True)
class Sample:
    """One (low-resolution input, ground truth) pair, images in [0, 1]."""

    lq: np.ndarray  # (3, h, w) float32: degraded flow-interpolated frames
    gt: np.ndarray  # (3, H, W) float32: true frames at the same times
    interpolated: np.ndarray  # (3, H, W) float32: the flow-interpolated frames before degradation
    clip_frames: tuple[int, int, int]  # indices of the 3 frames within the 9-frame clip (1..7)


def clip_indices(num_frames: int, start: int) -> np.ndarray:
    """Frame indices of the 9-frame mini-clip starting at `start`; cine is periodic, so it wraps."""
    return (start + np.arange(CLIP_LENGTH)) % num_frames


def interpolate_clip(clip: np.ndarray) -> np.ndarray:
    """(9, H, W) clip -> (7, H, W): frames 1..7 re-made by flow interpolation between frames 0 and 8."""
    phases = np.arange(1, CLIP_LENGTH - 1, dtype=np.float32) / (CLIP_LENGTH - 1)
    return interpolate_pair(clip[0], clip[-1], phases)


def sample_from_clip(
    clip: np.ndarray,
    rng: np.random.Generator,
    degradation: DegradationConfig | None = None,
    window_start: int | None = None,
    interpolated: np.ndarray | None = None,
) -> Sample:
    """Build one sample from a (9, H, W) clip in [0, 1].

    `window_start` in 0..4 picks interpolated frames window_start+1 .. window_start+3 of the clip
    (random from `rng` when None). `interpolated` may pass precomputed `interpolate_clip(clip)`.
    """
    clip = np.asarray(clip, dtype=np.float32)
    if clip.ndim != 3 or clip.shape[0] != CLIP_LENGTH:
        raise ValueError(f"need a ({CLIP_LENGTH}, H, W) clip, got {clip.shape}")
    if window_start is None:
        window_start = int(rng.integers(WINDOW_STARTS))
    if not 0 <= window_start < WINDOW_STARTS:
        raise ValueError(f"window_start must be in [0, {WINDOW_STARTS}), got {window_start}")
    inter = interpolate_clip(clip) if interpolated is None else interpolated
    window = np.clip(inter[window_start : window_start + WINDOW], 0.0, 1.0)
    frames = tuple(range(window_start + 1, window_start + 1 + WINDOW))
    lq = degrade(window, rng, degradation)
    return Sample(
        lq=lq.astype(np.float32),
        gt=clip[list(frames)].copy(),
        interpolated=window.astype(np.float32),
        clip_frames=frames,  # type: ignore[arg-type]
    )


def sample_from_slice(
    frames: np.ndarray,
    rng: np.random.Generator,
    degradation: DegradationConfig | None = None,
    clip_start: int | None = None,
    window_start: int | None = None,
) -> Sample:
    """A sample from a whole (T, H, W) cine slice: random (or given) mini-clip start, then as above."""
    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.shape[0] < 2:
        raise ValueError(f"need (T>=2, H, W) frames, got {frames.shape}")
    if clip_start is None:
        clip_start = int(rng.integers(frames.shape[0]))
    clip = frames[clip_indices(frames.shape[0], clip_start)]
    return sample_from_clip(clip, rng, degradation, window_start)
