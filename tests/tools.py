"""External tools the tests use; .ci/run installs them, so a missing one fails loudly instead of skipping."""

from __future__ import annotations

import shutil

import pytest


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (run .ci/run, or: apt-get install dcmtk dicom3tools orthanc)")
    return path
