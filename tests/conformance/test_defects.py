"""One test per defect of issue 15 (DICOM correctness on real-world input), each on real files.

Each of these failed on the code before the fix (checked by running this file against it) and passes now.
Defect 11 (pydicom warnings printed raw beside the JSON logs) belongs to the logging set-up, not here.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from cinesr.model import instance
from cinesr.model.cine import read_series
from cinesr.model.errors import InputError
from cinesr.worker.inference.derived import Derivation, write_derived_series
from cinesr.worker.inference.pipeline import BaselineMethod, superresolve_series
from pydicom.dataset import Dataset

from ..dicomcheck import new_errors
from .realfiles import RR_MS, classic_cine, enhanced_cine, real_file, transcode, with_dicomdir

DERIVATION = Derivation("baseline", "1", {"temporal": 8, "spatial": 4})


def _run(inputs: list[Path] | Path, out: Path, derivation: Derivation = DERIVATION):
    [series] = read_series(inputs)
    result = superresolve_series(series, BaselineMethod())
    return series, result, write_derived_series(series, result.frames, out, derivation)


def _real(ds: Dataset) -> np.ndarray:
    return ds.pixel_array * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)


def _images(files: list[Path]) -> dict[str, tuple[tuple[float, ...], float, bytes]]:
    """SOP Instance UID -> (position, trigger time, decoded pixels) of every output image."""
    out = {}
    for path in files:
        ds = pydicom.dcmread(path)
        out[str(ds.SOPInstanceUID)] = (tuple(float(v) for v in ds.ImagePositionPatient), float(ds.TriggerTime),
                                       np.ascontiguousarray(_real(ds)).tobytes())
    return out


def test_1_nested_inputs_never_share_a_uid_between_different_images(tmp_path: Path) -> None:
    files = classic_cine(tmp_path / "all", slices=2)
    upper = tmp_path / "upper"
    upper.mkdir()
    for path in files:
        if path.name.startswith("S2"):  # the second slice position only
            shutil.copy(path, upper / path.name)
    _, _, part = _run(upper, tmp_path / "a")
    _, _, whole = _run(tmp_path / "all", tmp_path / "b")
    _, _, again = _run(tmp_path / "all", tmp_path / "c")
    first, second = _images(part.files), _images(whole.files)
    assert len(first) == len(part.files) and len(second) == len(whole.files)  # unique within a run
    for uid in first.keys() & second.keys():  # a UID in both runs must be one and the same image
        assert first[uid] == second[uid], uid
    assert whole.sop_instance_uids == again.sop_instance_uids and whole.series_uid == again.series_uid


def test_2_big_endian_input_is_written(tmp_path: Path) -> None:
    files = classic_cine(tmp_path / "le")
    _, little, _ = _run(tmp_path / "le", tmp_path / "out-le")
    transcode(files, tmp_path / "be", "big-endian")
    _, big, derived = _run(tmp_path / "be", tmp_path / "out-be")
    assert len(derived.files) == 64
    for a, b in zip(little.frames, big.frames, strict=True):
        np.testing.assert_array_equal(a, b)
    ds = pydicom.dcmread(derived.files[9])
    assert ds.file_meta.TransferSyntaxUID.is_little_endian
    assert ds.PixelRepresentation == 1  # MR_small is signed
    assert np.abs(_real(ds) - big.frames[0][9]).max() <= 0.5


def test_3_enhanced_negative_intercept_is_kept(tmp_path: Path) -> None:
    path = enhanced_cine(tmp_path / "in" / "EMR", slope=2.0, intercept=-500.0)
    _, result, derived = _run([path], tmp_path / "out")
    computed = result.frames[0][:8]
    assert (computed < 0).mean() > 0.5  # most of this image lies below 0 in real-world units
    decoded = np.stack([_real(pydicom.dcmread(p)) for p in derived.files[:8]])
    representable = np.maximum(computed, -500.0)  # the input's lowest value (stored 0): undershoot stops there
    assert np.abs(decoded - representable).max() <= 1.0 + 1e-3  # half the slope


def test_4_enhanced_meaning_is_kept_not_invented(tmp_path: Path) -> None:
    source = enhanced_cine(tmp_path / "in" / "EMR", thickness=5.0, rr=1000.0, phase_ms=160.0)
    series, _, derived = _run([source], tmp_path / "out")
    ds = pydicom.dcmread(derived.files[39])  # slice 1, last frame in time
    assert float(ds.SliceThickness) == 5.0  # PixelMeasuresSequence, not SpacingBetweenSlices (6)
    assert int(ds.NominalInterval) == 1000  # RRIntervalTimeNominal
    # The last interval runs from 640 ms to the next R wave at 1000 ms, not to 800 (estimated from spacing).
    assert float(ds.TriggerTime) == pytest.approx(640 + 7 * (1000 - 640) / 8)
    # Acquisition attributes come from the pulse sequence and functional groups of the input.
    assert ds.ScanningSequence == "GR"  # EchoPulseSequence GRADIENT
    assert list(ds.SequenceVariant) == ["SK", "SS", "SP"]  # segmented k-space, steady state (longitudinal), RF spoiled
    assert float(ds.RepetitionTime) == 3.4 and float(ds.EchoTime) == 1.7 and float(ds.FlipAngle) == 55
    assert ds.ScanOptions == "CG" and ds.MRAcquisitionType == "2D"
    for keyword in ("LossyImageCompression", "PatientIdentityRemoved", "DeidentificationMethod", "BurnedInAnnotation"):
        assert ds.get(keyword) == series.header.get(keyword), keyword
    for path in derived.files[:2]:
        assert new_errors(path, source) == set()


def _no_geometry(ds: Dataset, s: int, t: int) -> None:
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        delattr(ds, keyword)


def test_5_what_is_not_a_cine_is_refused(tmp_path: Path) -> None:
    classic_cine(tmp_path / "stripped", edit=_no_geometry)
    with pytest.raises(InputError, match="no ImagePositionPatient"):
        read_series(tmp_path / "stripped")
    with pytest.raises(InputError, match="not a cine"):  # a 3D head volume, cardiac synchronisation NONE
        read_series(real_file("emri_small.dcm"))


def _number(value: str | None):
    def edit(ds: Dataset, s: int, t: int) -> None:
        if value is None:
            del ds.SeriesNumber
        else:
            ds.SeriesNumber = value
    return edit


def test_6_series_numbers_do_not_collide(tmp_path: Path) -> None:
    def number(folder: Path, derivation: Derivation = DERIVATION) -> int:
        return int(pydicom.dcmread(_run(folder, tmp_path / "out" / folder.name / derivation.method, derivation)[2]
                                   .files[0]).SeriesNumber)

    classic_cine(tmp_path / "vendor", edit=_number("301"))
    vendor = number(tmp_path / "vendor")
    assert vendor >= 100000 and str(vendor).startswith("301")  # outside vendor numbering, shows its input
    model = number(tmp_path / "vendor", Derivation("model", "1", {"steps": 15}))
    assert model != vendor
    classic_cine(tmp_path / "unnumbered", edit=_number(None))
    other = tmp_path / "other"
    for path in sorted((tmp_path / "unnumbered").iterdir()):  # another series without a number
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = ds.SeriesInstanceUID + ".2"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID + ".2"
        other.mkdir(exist_ok=True)
        ds.save_as(other / path.name)
    unnumbered, another = number(tmp_path / "unnumbered"), number(other)
    assert unnumbered != another and min(unnumbered, another) >= 100000


class _TickingClock:
    """datetime.now() one second later at every call: instances written one after another, slowly."""

    start = dt.datetime(2026, 1, 1, 12, 0, 0)
    calls = 0

    @classmethod
    def now(cls) -> dt.datetime:
        cls.calls += 1
        return cls.start + dt.timedelta(seconds=cls.calls)


def test_7_no_stale_or_varying_attributes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def edit(ds: Dataset, s: int, t: int) -> None:
        ds.NumberOfTemporalPositions = 4
        ds.TemporalPositionIdentifier = t + 1

    classic_cine(tmp_path / "in", first_trigger=150.0, edit=edit)
    monkeypatch.setattr(instance, "_dt", SimpleNamespace(datetime=_TickingClock))
    _, _, derived = _run(tmp_path / "in", tmp_path / "out")
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in derived.files]
    first_slice = [h for h in headers if h.ImagePositionPatient == headers[0].ImagePositionPatient]
    assert {int(h.NumberOfTemporalPositions) for h in headers} == {32}
    assert sorted(int(h.TemporalPositionIdentifier) for h in first_slice) == list(range(1, 33))
    assert len({(h.SeriesDate, h.SeriesTime) for h in headers}) == 1
    times = [float(h.TriggerTime) for h in first_slice]
    assert max(times) < RR_MS and min(times) >= 0  # first trigger 150 ms: the last ones wrap past the R wave
    assert len(set(times)) == 32


def test_8_a_dicomdir_in_the_folder_is_skipped(tmp_path: Path) -> None:
    with_dicomdir(classic_cine(tmp_path / "plain"), tmp_path / "withdir")
    assert (tmp_path / "withdir" / "DICOMDIR").is_file()
    series, _, derived = _run(tmp_path / "withdir", tmp_path / "out")
    assert series.shape == (2, 4, 64, 64) and len(derived.files) == 64


def test_9_output_is_compressed_losslessly(lowres_study: Path, tmp_path: Path) -> None:
    _, _, derived = _run(lowres_study / "lowres", tmp_path / "out")  # the default transfer syntax
    compressed = uncompressed = 0
    for path in derived.files:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID.is_compressed
        pixels = ds.pixel_array.copy()
        ds.decompress(generate_instance_uid=False)
        plain = tmp_path / "plain.dcm"
        ds.save_as(plain, enforce_file_format=True)
        np.testing.assert_array_equal(pydicom.dcmread(plain).pixel_array, pixels)
        compressed += path.stat().st_size
        uncompressed += plain.stat().st_size
    assert compressed * 3 <= uncompressed, (compressed, uncompressed)


def test_10_output_folders_follow_the_umask(lowres_study: Path, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        _, _, derived = _run(lowres_study / "lowres", tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE(derived.folder.stat().st_mode) == 0o755
