"""Cine sources written by others, for evaluation only: the model never trains on them.

* ``mrphantom``: the MRPhantom package's dynamic slime phantom (a body with a beating heart:
  blood pool, myocardium, small bright inclusions), bSSFP steady-state contrast at 1.5 T, its own
  cardiac motion model driven over one cycle; random flips and rotations per patient.
* ``motioncloud``: MotionClouds random dynamic textures (Leon, Vanzetta, Masson and Perrinet,
  2012): band-pass textures drifting at a random velocity. Generated in the Fourier domain, they
  are periodic in time, as a cine is.

Both are optional packages (the project's `dev` extra); a missing one raises ImportError saying so.
"""

from __future__ import annotations

import numpy as np


def mrphantom_cine(rng: np.random.Generator, frames: int, size: int) -> np.ndarray:
    """(frames, size, size) float32 in [0, 1]."""
    try:
        import mrphantom
    except ImportError as exc:
        raise ImportError("the mrphantom source needs the MRPhantom package (pip install mrphantom)") from exc
    mrphantom.initSS_bSSFP(1.5)
    amplitude = rng.uniform(0.02, 0.05)
    start = rng.uniform(0, 1)
    out = []
    for f in range(frames):
        # end-diastole at amplitude 0, contraction as a raised cosine over the cycle
        a = amplitude * (0.5 - 0.5 * np.cos(2 * np.pi * (f / frames + start)))
        out.append(np.abs(mrphantom.Enum2SS(mrphantom.genPhant((size, size), 0.0, float(a)))))
    cine = np.stack(out).astype(np.float32)
    if rng.uniform() < 0.5:
        cine = cine[:, :, ::-1]
    cine = np.rot90(cine, int(rng.integers(4)), axes=(1, 2))
    level = float(np.percentile(cine, 99.9))
    return np.ascontiguousarray(np.clip(cine / max(level, 1e-9), 0, 1), np.float32)


def motioncloud_cine(rng: np.random.Generator, frames: int, size: int) -> np.ndarray:
    """(frames, size, size) float32 in [0, 1]."""
    try:
        import MotionClouds as mc
    except ImportError as exc:
        raise ImportError("the motioncloud source needs the MotionClouds package (pip install MotionClouds)") from exc
    fx, fy, ft = mc.get_grids(size, size, frames)
    envelope = mc.envelope_gabor(fx, fy, ft, V_X=rng.uniform(-1, 1), V_Y=rng.uniform(-1, 1), B_V=0.3,
                                 sf_0=rng.uniform(0.03, 0.12), B_sf=rng.uniform(0.03, 0.1),
                                 theta=rng.uniform(0, np.pi), B_theta=rng.uniform(0.2, 1.5))
    movie = mc.rectif(mc.random_cloud(envelope, seed=int(rng.integers(2**31))), contrast=0.9)
    return np.ascontiguousarray(np.transpose(movie, (2, 0, 1)), np.float32).clip(0, 1)
