"""Shared by the model tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cinesr.model.bundle import build_networks, save_bundle
from cinesr.model.configs import load_config


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> object:
    """One torch thread: much faster than two on the shared, oversubscribed test machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def micro_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle of untrained micro networks (16x16 latent grid): fast to evaluate, not to learn from."""
    torch.manual_seed(0)
    cfg = {**load_config("tiny"), "name": "micro"}
    cfg["unet_config"] = {**cfg["unet_config"], "image_size": 16, "lq_size": 16, "channel_mult": [1, 1],
                          "num_res_blocks": [1, 1], "attention_resolutions": [8], "window_size": 4}
    unet, ae = build_networks(cfg)
    return save_bundle(tmp_path_factory.mktemp("b") / "micro", unet, ae, cfg)
