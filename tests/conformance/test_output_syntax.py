"""Output transfer syntaxes: every kind the OUTPUT_TRANSFER_SYNTAX setting offers is dciodvfy-clean and reads
back to identical pixels (unsigned phantom data and signed MR_small data with a negative intercept); the
compressed kinds are measured against the uncompressed output; a peer that only takes uncompressed data still
receives every instance (dcmtk's storescp accepts no compressed syntax by default)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from cinesr.model.cine import read_series
from cinesr.model.instance import DEFAULT_OUTPUT_TRANSFER_SYNTAX, OUTPUT_TRANSFER_SYNTAXES
from cinesr.service.settings import Settings
from cinesr.worker.inference.derived import Derivation, write_derived_series
from cinesr.worker.inference.pipeline import BaselineMethod, superresolve_series
from cinesr.worker.network.pacs import DicomNode, store_files
from pydicom.dataset import Dataset

from ..dicomcheck import new_errors
from ..orthanc import free_port
from ..tools import require_tool
from .realfiles import classic_cine

DERIVATION = Derivation("baseline", "1", {"temporal": 8, "spatial": 4})


def _negative_values(ds: Dataset, s: int, t: int) -> None:
    # stored values from -873 up (signed 16 bit), and a negative intercept on top
    ds.PixelData = (np.frombuffer(ds.PixelData, "<i2") - 1000).astype("<i2").tobytes()
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "1", "-1000", "US"


@pytest.fixture(scope="module")
def computed(lowres_study: Path, tmp_path_factory: pytest.TempPathFactory):
    """(series, frames) for the phantom (unsigned) and for MR_small (signed, negative values and intercept)."""
    signed = classic_cine(tmp_path_factory.mktemp("signed"), edit=_negative_values)
    out = {}
    for name, inputs in (("phantom", lowres_study / "lowres"), ("signed", signed)):
        [series] = read_series(inputs)
        out[name] = (series, superresolve_series(series, BaselineMethod()).frames)
    return out


def _stored(files: list[Path]) -> tuple[np.ndarray, int]:
    arrays = [pydicom.dcmread(p).pixel_array for p in files]
    return np.stack(arrays), sum(p.stat().st_size for p in files)


@pytest.mark.parametrize("data", ["phantom", "signed"])
def test_every_output_syntax_is_clean_and_lossless(data: str, computed, tmp_path: Path) -> None:
    series, frames = computed[data]
    written = {}
    for name, uid in OUTPUT_TRANSFER_SYNTAXES.items():
        derived = write_derived_series(series, frames, tmp_path / name, DERIVATION, transfer_syntax=name)
        for path in (derived.files[0], derived.files[-1]):
            assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == uid
            assert new_errors(path, series.files[0]) == set(), (name, path)
        written[name] = _stored(derived.files)
    plain, plain_size = written["explicit-little-endian"]
    assert plain.dtype == (np.int16 if data == "signed" else np.uint16)
    if data == "signed":
        assert plain.min() < 0  # MR_small's signed values survive the encoders that must handle the sign bit
    for name, (pixels, size) in written.items():
        np.testing.assert_array_equal(pixels, plain, err_msg=name)
        print(f"{data} {name}: {size} bytes, {plain_size / size:.2f}x smaller than uncompressed")
    # The acceptance figure: the default (lossless) output of a 64x64 cine is at most a third of uncompressed.
    assert written[DEFAULT_OUTPUT_TRANSFER_SYNTAX][1] * 3 <= plain_size
    assert written["rle-lossless"][1] < plain_size and written["jpeg-ls-lossless"][1] < plain_size


def test_the_setting_chooses_the_syntax(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().output_transfer_syntax == DEFAULT_OUTPUT_TRANSFER_SYNTAX == "jpeg2000-lossless"
    monkeypatch.setenv("CINESR_OUTPUT_TRANSFER_SYNTAX", "rle-lossless")
    assert Settings().output_transfer_syntax == "rle-lossless"
    # every value the setting accepts is one the writer offers
    allowed = Settings.model_fields["output_transfer_syntax"].annotation.__args__  # type: ignore[union-attr]
    assert set(allowed) == set(OUTPUT_TRANSFER_SYNTAXES)


def test_a_peer_without_compressed_syntaxes_gets_the_pixels_uncompressed(computed, tmp_path: Path) -> None:
    series, frames = computed["phantom"]
    derived = write_derived_series(series, frames, tmp_path / "out", DERIVATION)  # JPEG 2000 lossless
    received = tmp_path / "received"
    received.mkdir()
    port = free_port()
    # storescp with its defaults accepts the uncompressed transfer syntaxes only
    scp = subprocess.Popen([require_tool("storescp"), "--output-directory", str(received), str(port)],
                           env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        outcome = store_files(DicomNode("STORESCP", "127.0.0.1", port), derived.files[:6], "CINESR")
    finally:
        scp.terminate()
        scp.wait(timeout=10)
    assert len(outcome.acknowledged) == 6 and not outcome.failures
    got = {}
    for path in received.iterdir():
        ds = pydicom.dcmread(path)
        assert not ds.file_meta.TransferSyntaxUID.is_compressed
        got[str(ds.SOPInstanceUID)] = ds.pixel_array
    for path in derived.files[:6]:
        ds = pydicom.dcmread(path)
        np.testing.assert_array_equal(got[str(ds.SOPInstanceUID)], ds.pixel_array)
