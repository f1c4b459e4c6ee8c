"""The derived series: geometry, timing, references, deterministic UIDs and dciodvfy conformance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from cinesr.model.baseline import bicubic_up
from cinesr.model.cine import read_series
from cinesr.model.errors import CineSRError
from cinesr.worker.inference.derived import Derivation, write_derived_series
from cinesr.worker.inference.pipeline import BaselineMethod, superresolve_series
from pydicom.data import get_testdata_file

from ..conformance.realfiles import enhanced_cine
from ..dicomcheck import dciodvfy_errors, new_errors

DERIVATION = Derivation("baseline", "1", {"temporal": 8, "spatial": 4})


def _run(inputs: Path, out: Path):
    [series] = read_series(inputs)
    result = superresolve_series(series, BaselineMethod())
    return series, write_derived_series(series, result.frames, out, DERIVATION)


def test_derived_series_rules(lowres_study: Path, tmp_path: Path) -> None:
    series, derived = _run(lowres_study / "lowres", tmp_path / "a")
    assert len(derived.files) == 2 * 32
    [out] = read_series(derived.folder)
    assert out.shape == (2, 32, 256, 256)
    assert out.study_uid == series.study_uid and out.series_uid == derived.series_uid != series.series_uid
    src, dst = series.slices[0], out.slices[0]
    np.testing.assert_allclose(dst.pixel_spacing, src.pixel_spacing / 4, rtol=1e-5)
    # New first pixel centre: 1.5 new pixels back along rows and columns.
    expected = src.position - 1.5 * dst.pixel_spacing[1] * src.orientation[:3] - 1.5 * dst.pixel_spacing[0] * \
        src.orientation[3:]
    np.testing.assert_allclose(dst.position, expected, atol=1e-3)
    # Trigger times: 8 per input interval, the last interval wrapping over the nominal R-R interval.
    ds0 = pydicom.dcmread(derived.files[0])
    rr = float(pydicom.dcmread(series.files[0]).NominalInterval)
    np.testing.assert_allclose(dst.trigger_times, np.arange(32) * rr / 32, atol=0.01)
    assert ds0.CardiacNumberOfImages == 32
    assert list(ds0.ImageType[:2]) == ["DERIVED", "SECONDARY"]
    assert "baseline" in ds0.DerivationDescription
    assert ds0.SeriesDescription.endswith("CineSR")
    assert ds0.PatientID == pydicom.dcmread(series.files[0]).PatientID
    assert ds0.ContributingEquipmentSequence[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109103"
    assert float(ds0.WindowWidth) > 0
    # Frame 1 (between inputs 0 and 1) references both neighbours.
    ds1 = pydicom.dcmread(derived.files[1])
    refs = {item.ReferencedSOPInstanceUID for item in ds1.SourceImageSequence}
    assert refs == {s.sop_instance_uid for s in src.sources[:2]}
    # Output frame 8 is input frame 1 upsampled (stored as integers, clipped at 0), not its neighbour in time.
    expected = np.clip(np.rint(bicubic_up(src.frames[1])), 0, None)
    assert np.abs(dst.frames[8] - expected).max() <= 0.5
    assert np.abs(dst.frames[8] - np.clip(np.rint(bicubic_up(src.frames[2])), 0, None)).max() > 10


def test_uids_are_deterministic_and_parameter_dependent(lowres_study: Path, tmp_path: Path) -> None:
    _, first = _run(lowres_study / "lowres", tmp_path / "a")
    _, again = _run(lowres_study / "lowres", tmp_path / "b")
    assert first.series_uid == again.series_uid
    assert first.sop_instance_uids == again.sop_instance_uids
    assert len(set(first.sop_instance_uids)) == len(first.sop_instance_uids)
    [series] = read_series(lowres_study / "lowres")
    other = write_derived_series(series, superresolve_series(series, BaselineMethod()).frames, tmp_path / "c",
                                 Derivation("baseline", "2", {"temporal": 8, "spatial": 4}))
    assert other.series_uid != first.series_uid
    assert not set(other.sop_instance_uids) & set(first.sop_instance_uids)


def test_output_passes_dciodvfy(lowres_study: Path, tmp_path: Path) -> None:
    series, derived = _run(lowres_study / "lowres", tmp_path / "a")
    for path in derived.files[:3] + derived.files[-2:]:
        assert new_errors(path, series.files[0]) == set(), path
    assert dciodvfy_errors(series.files[0]) == set()  # our phantom acquisitions are clean too


def test_real_scanner_header_survives(tmp_path: Path) -> None:
    """A real MR header (MR_small.dcm made into a 4-frame cine) -> no dciodvfy error the input did not have."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    src = tmp_path / "in"
    src.mkdir()
    for k in range(4):
        copy = ds.copy()
        copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = f"{ds.SOPInstanceUID}.{k + 1}"
        copy.TriggerTime = 100.0 * k
        copy.save_as(src / f"{k}.dcm")
    series, derived = _run(src, tmp_path / "out")
    assert len(derived.files) == 32
    assert pydicom.dcmread(derived.files[5]).Rows == 256
    for path in derived.files[:2]:
        assert new_errors(path, series.files[0]) == set()


def test_enhanced_input_becomes_conformant_mr_images(tmp_path: Path) -> None:
    source = enhanced_cine(tmp_path / "in" / "EMR")  # emri_small as a 2-slice, 5-phase cine
    [series] = read_series(source)
    result = superresolve_series(series, BaselineMethod())
    derived = write_derived_series(series, result.frames, tmp_path / "out", DERIVATION)
    assert len(derived.files) == 80
    ds = pydicom.dcmread(derived.files[3])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4" and (ds.Rows, ds.Columns) == (256, 256)
    assert ds.SourceImageSequence[0].ReferencedFrameNumber in (1, 2)
    assert new_errors(derived.files[3], source) == set()


def test_image_comments_and_transfer_syntax_are_the_callers(lowres_study: Path, tmp_path: Path) -> None:
    [series] = read_series(lowres_study / "lowres")
    frames = superresolve_series(series, BaselineMethod()).frames
    derived = write_derived_series(series, frames, tmp_path, DERIVATION, transfer_syntax="explicit-little-endian",
                                   image_comments="fidelity: 41.2 dB against the acquired frames")
    ds = pydicom.dcmread(derived.files[0])
    assert ds.ImageComments == "fidelity: 41.2 dB against the acquired frames"
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    with pytest.raises(CineSRError, match="unknown output transfer syntax"):
        write_derived_series(series, frames, tmp_path, DERIVATION, transfer_syntax="jpeg-lossy")


def test_failed_write_leaves_nothing(lowres_study: Path, tmp_path: Path) -> None:
    [series] = read_series(lowres_study / "lowres")
    bad = [np.zeros((32, 256, 256), np.float32), np.zeros((3, 3, 3), np.float32)]
    with pytest.raises(ValueError, match="output shape"):
        write_derived_series(series, bad, tmp_path, DERIVATION)
    assert list(tmp_path.iterdir()) == []
