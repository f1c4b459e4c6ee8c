"""Shared fixtures: synthetic cine studies written as DICOM, and the external tools the tests rely on."""

from __future__ import annotations

from pathlib import Path

import pytest
from cinesr.model.acquisition import write_phantom
from cinesr.model.phantom import make_study


@pytest.fixture(scope="session")
def lowres_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-slice phantom acquisition: 4 frames of 64x64 per slice (and its 32-frame 256x256 truth)."""
    root = tmp_path_factory.mktemp("phantom")
    study = make_study(11, slices=2, frames=32, size=256)
    write_phantom(study, root, seed=11, truth=True, lowres=True)
    return root / study.patient_id
