"""Fixtures for the deployment tests (rendered chart objects); helpers live in deploy_helpers."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

# pytest runs with --import-mode=importlib, which puts no test folder on sys.path: add this one so the
# test modules here can import their helpers.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from deploy_helpers import GPU_VALUES, Manifest, load_values, render  # noqa: E402


@pytest.fixture(scope="session")
def default_objects() -> list[Manifest]:
    return render()


@pytest.fixture(scope="session")
def gpu_values() -> dict[str, Any]:
    return load_values(GPU_VALUES)


@pytest.fixture(scope="session")
def gpu_objects(gpu_values: dict[str, Any]) -> list[Manifest]:
    return render(gpu_values)
