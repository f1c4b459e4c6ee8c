"""Fixtures shared by the engine, export and model-method tests."""

from __future__ import annotations

import pytest
import torch
from cinesr.worker.inference.engines import load_model


@pytest.fixture(scope="module", autouse=True)
def _threads():
    """Two torch threads: the CI machine has two cores and the tests compare backends at equal threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny():
    """The tiny configuration with seeded random weights (parity and speed need no trained weights)."""
    return load_model("tiny", seed=0)
