"""Small models and cines shared by the model, worker and service tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from cinesr.model.bundle import build_networks, save_bundle, write_meta
from cinesr.model.configs import load_config

# tiny at 16x16 latent tiles: the same code paths, a fraction of the cost
MICRO_UNET = {"image_size": 16, "lq_size": 16, "channel_mult": [1, 1], "num_res_blocks": [1, 1],
              "attention_resolutions": [8], "window_size": 4}


def micro_bundle(folder: Path, seed: int = 0, inference: dict[str, Any] | None = None) -> Path:
    """A bundle of untrained micro networks (fast to run, not to learn from); `inference`: its shipped options."""
    torch.manual_seed(seed)
    cfg = {**load_config("tiny"), "name": "micro"}
    cfg["unet_config"] = {**cfg["unet_config"], **MICRO_UNET}
    path = save_bundle(folder, *build_networks(cfg), cfg)
    if inference:
        write_meta(path, {"inference": inference})
    return path


def moving_disc(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """A moving bright disc on a dim background with noise, in scanner-like units: (t, h, w) float32."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    frames = []
    for k in range(t):
        cx = w / 2 + 0.1 * w * np.sin(2 * np.pi * k / t)
        disc = ((yy - h / 2) ** 2 + (xx - cx) ** 2 < (0.25 * min(h, w)) ** 2).astype(np.float32)
        frames.append(150 + 600 * disc + 15 * rng.standard_normal((h, w)))
    return np.stack(frames).astype(np.float32)


def micro_student_bundle(folder: Path, seed: int = 0, inference: dict[str, Any] | None = None,
                         steps: tuple[int, ...] = (1, 2, 4)) -> Path:
    """A micro bundle with an (untrained) distilled student serving `steps` beside its 15-step teacher."""
    torch.manual_seed(seed)
    cfg = {**load_config("tiny"), "name": "micro-student"}
    cfg["unet_config"] = {**cfg["unet_config"], **MICRO_UNET}
    unet, autoencoder = build_networks(cfg)
    student = build_networks(cfg)[0]
    meta: dict[str, Any] = {"distilled": {"steps": list(steps)}}
    if inference:
        meta["inference"] = inference
    return save_bundle(folder, unet, autoencoder, cfg, meta, student=student)
