"""Shared by the model tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests import models


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
    return models.micro_bundle(tmp_path_factory.mktemp("b") / "micro")
