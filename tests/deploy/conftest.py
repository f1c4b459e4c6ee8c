"""Fixtures for the deployment tests (rendered chart objects); helpers live in deploy_helpers."""

from __future__ import annotations

from typing import Any

import pytest
from deploy_helpers import GPU_VALUES, Manifest, load_values, render


@pytest.fixture(scope="session")
def default_objects() -> list[Manifest]:
    return render()


@pytest.fixture(scope="session")
def gpu_values() -> dict[str, Any]:
    return load_values(GPU_VALUES)


@pytest.fixture(scope="session")
def gpu_objects(gpu_values: dict[str, Any]) -> list[Manifest]:
    return render(gpu_values)
