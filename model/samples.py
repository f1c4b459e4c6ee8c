"""Training and evaluation samples: (low-resolution window, true window) pairs from a cine slice.

Two ways, both giving a low-resolution input (3, h, w) and the 3 true frames at the same times
(3, 4h, 4w), so that the model learns to undo both the spatial acquisition and the errors of the
flow interpolation:

* as in the paper (`sample_from_clip`): take a 9-frame mini-clip, keep its first and last frame
  (a temporal acquisition 8x coarser), interpolate the 7 between by optical flow at full resolution,
  pick 3 consecutive interpolated frames and degrade them spatially;
* as the pipeline sees an acquisition (`sample_acquired`): acquire every 8th frame at low resolution
  (one acquisition draw for the slice, noise per frame), interpolate between the acquired frames at
  low resolution, as `cinesr.model.pipeline` does, and take any 3 consecutive frames, acquired ones
  included. This is what the shipped model trains on.
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


def sample_acquired(
    frames: np.ndarray,
    rng: np.random.Generator,
    acquisition: DegradationConfig | None = None,
    start: int | None = None,
    window: int | None = None,
) -> Sample:
    """A sample from a (T, H, W) cine slice in [0, 1] as the pipeline would see it acquired.

    Frames start-8, start and start+8 (cyclic) are acquired together; the two intervals between them
    are flow-interpolated at low resolution into 17 frames; the window is frames window..window+2 of
    those (random when None, 0..14). `clip_frames` holds the window's true frame indices."""
    frames = np.asarray(frames)
    t = frames.shape[0]
    if frames.ndim != 3 or t < 2:
        raise ValueError(f"need (T>=2, H, W) frames, got {frames.shape}")
    step = CLIP_LENGTH - 1
    start = int(rng.integers(t)) if start is None else start
    window = int(rng.integers(2 * step - 1)) if window is None else window
    if not 0 <= window <= 2 * step - 2:
        raise ValueError(f"window must be in [0, {2 * step - 2}], got {window}")
    kept = frames[[(start - step) % t, start % t, (start + step) % t]].astype(np.float32)
    low = degrade(kept, rng, acquisition)
    phases = np.arange(step, dtype=np.float32) / step
    lr = np.concatenate([interpolate_pair(low[0], low[1], phases), interpolate_pair(low[1], low[2], phases),
                         low[2:]])
    index = [(start - step + window + c) % t for c in range(WINDOW)]
    return Sample(lq=lr[window : window + WINDOW].astype(np.float32), gt=frames[index].astype(np.float32),
                  interpolated=frames[index].astype(np.float32), clip_frames=tuple(index))  # type: ignore[arg-type]


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
