"""One inference path: what `cinesr evaluate` measures is what `cinesr superresolve` writes.

The evaluation's model output for a series (cinesr.model.evaluate.model_output: the pipeline with the
bundle's networks in torch) equals, to the bit, the derived series the command line writes for the same
input and seed (the pipeline through the torch engine), once both are stored as DICOM integers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cinesr.model.bundle import load_bundle
from cinesr.model.cine import read_series
from cinesr.model.evaluate import model_output
from cinesr.model.inference import TorchRunner
from cinesr.model.instance import encode_pixels
from cinesr.model.pipeline import Options

from tests import models

CLI = [sys.executable, "-m", "cinesr.service.cli"]


@pytest.mark.slow
def test_evaluate_measures_what_superresolve_writes(tmp_path: Path) -> None:
    bundle_dir = models.micro_bundle(tmp_path / "micro", 2, {"steps": 3, "overlap": 4, "stride": 1})
    made = subprocess.run([*CLI, "phantom", str(tmp_path / "in"), "--slices", "2", "--frames", "16", "--size", "96",
                           "--degraded", "--no-truth", "--seed", "9"], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    [patient] = list((tmp_path / "in").iterdir())
    run = subprocess.run([*CLI, "superresolve", str(patient / "lowres"), "-o", str(tmp_path / "out"), "--model",
                          str(bundle_dir), "--backend", "torch", "--device", "cpu", "--seed", "7", "--json"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "CINESR_BACKEND": "torch"})
    assert run.returncode == 0, run.stderr
    [item] = json.loads(run.stdout)["series"]
    [written] = read_series(item["folder"])
    [acquired] = read_series(patient / "lowres")
    bundle = load_bundle(bundle_dir)
    options = Options.from_mapping(bundle.meta["inference"], seed=7)
    measured = model_output([s.frames for s in acquired.slices], TorchRunner.for_options(bundle, options), options)
    for stored, frames in zip(written.slices, measured, strict=True):
        assert stored.frames.shape == frames.shape == (16, 96, 96)
        np.testing.assert_array_equal(stored.frames, encode_pixels(frames).astype(stored.frames.dtype))
    assert item["fidelity_db"] > 0 and item["consistency"] in ("both", "area", "kspace")
