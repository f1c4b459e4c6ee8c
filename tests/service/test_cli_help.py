"""The command line's help and output as a new user meets them: --version, -h, flags and arguments shown
readably with choices and descriptions, progress on stderr with --json, and what the JSON says was used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "cinesr.service.cli"]


def cinesr(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "160", "OMP_NUM_THREADS": "1"})


def test_version_and_short_help() -> None:
    from importlib.metadata import version

    run = cinesr("--version")
    assert run.returncode == 0 and run.stdout.strip() == f"cinesr {version('cinesr')}"
    for args in (("-h",), ("superresolve", "-h"), ("cancel", "-h"), ("serve", "-h")):
        run = cinesr(*args)
        assert run.returncode == 0 and "Usage: cinesr" in run.stdout, args


def test_every_parameter_is_described_and_shown_readably() -> None:
    from cinesr.service.cli import command
    from cinesr.service.commands import load_all

    load_all()
    root = command()
    for name, cmd in root.commands.items():
        for param in cmd.params:
            assert (param.help or "").strip(), f"cinesr {name}: {param.name} has no description"
        text = cinesr(name, "--help").stdout
        assert "<bool>" not in text and "<list[" not in text, (name, text)


def test_phantom_help_lists_choices_and_true_defaults() -> None:
    from cinesr.model.phantom import GENERATORS
    from cinesr.service.cli import command
    from cinesr.service.commands import load_all

    load_all()
    (generator,) = [p for p in command().commands["phantom"].params if p.name == "generator"]
    assert tuple(generator.type_descriptor.choices) == GENERATORS  # the choices are the generators that exist
    text = cinesr("phantom", "--help").stdout
    assert "<sax|sax-fourier|lax|" in text
    assert "--truth" in text and "--no-truth" in text and "[default: truth]" in text
    assert "[default: True]" not in text
    assert "Slice positions per study" in text and "OUTPUT" in text
    superresolve = cinesr("superresolve", "--help").stdout
    for choices in ("<auto|model|baseline>", "<auto|tensorrt|onnx|torch>", "<auto|cpu|cuda>"):
        assert choices in superresolve
    assert "INPUTS" in superresolve


def test_json_keeps_progress_on_stderr_and_names_the_baseline(tmp_path: Path, lowres_study: Path) -> None:
    run = cinesr("superresolve", str(lowres_study / "lowres"), "-o", str(tmp_path / "out"), "--method", "baseline",
                 "--json")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)  # stdout is the JSON alone
    assert summary["method"] == "baseline" and summary["backend"] is None and summary["model_bundle"] is None
    assert "series …" in run.stderr and "writing" in run.stderr  # the progress bar, on stderr


@pytest.mark.slow  # loads the model (~10-20 s on 2 busy cores)
def test_json_names_the_backend_and_model_bundle(tmp_path: Path, lowres_study: Path) -> None:
    from cinesr.model.bundle import DEFAULT_BUNDLE

    run = cinesr("superresolve", str(lowres_study / "lowres"), "-o", str(tmp_path / "out"), "--method", "model",
                 "--steps", "1", "--backend", "onnx", "--device", "cpu", "--json")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["method"] == "model" and summary["backend"] == "onnx" and summary["device"] == "cpu"
    bundle = summary["model_bundle"]
    assert Path(bundle["path"]).resolve() == Path(DEFAULT_BUNDLE).resolve()
    assert bundle["version"] and len(bundle["sha256"]) >= 16
    assert "series …" in run.stderr
