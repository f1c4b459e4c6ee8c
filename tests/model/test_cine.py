"""Cine reading on real files shipped by pydicom/pydicom-data and on synthetic studies."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from cinesr.model.cine import ENHANCED_MR_IMAGE_STORAGE, read_series
from cinesr.model.errors import InputError
from pydicom.data import get_testdata_file

from ..conformance.realfiles import enhanced_cine


def _cine_from(source: str, folder: Path, triggers: list[float | None], numbers: list[int]) -> list[Path]:
    """Copies of one real MR file made into a cine: same position, new SOP UIDs, given timing."""
    ds = pydicom.dcmread(get_testdata_file(source))
    paths = []
    for k, (trigger, number) in enumerate(zip(triggers, numbers, strict=True)):
        copy = ds.copy()
        copy.SOPInstanceUID = f"{ds.SOPInstanceUID}.{k + 1}"
        copy.file_meta.MediaStorageSOPInstanceUID = copy.SOPInstanceUID
        copy.InstanceNumber = number
        if trigger is None:
            if "TriggerTime" in copy:
                del copy.TriggerTime
        else:
            copy.TriggerTime = trigger
        # Mark each frame so the order can be checked after reading.
        arr = copy.pixel_array.copy()
        arr[0, 0] = k
        copy.PixelData = arr.tobytes()
        path = folder / f"f{k}.dcm"
        copy.save_as(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("name", ["emri_small.dcm", "emri_small_RLE.dcm", "emri_small_jpeg_ls_lossless.dcm",
                                  "emri_small_jpeg_2k_lossless.dcm", "emri_small_big_endian.dcm"])
def test_enhanced_mr_multiframe_all_transfer_syntaxes_read_identically(name: str, tmp_path: Path) -> None:
    # pydicom's encodings of one Enhanced MR, given the functional groups of a 2-slice, 5-phase cine
    reference = pydicom.dcmread(get_testdata_file("emri_small.dcm")).pixel_array.astype(np.float32)
    [series] = read_series(enhanced_cine(tmp_path / "EMR", name, slope=2.0, intercept=-500.0))
    assert series.sop_class_uid == ENHANCED_MR_IMAGE_STORAGE
    assert series.shape == (2, 5, 64, 64)
    np.testing.assert_array_equal(series.slices[1].frames, reference[5:] * 2 - 500)
    assert [s.frame_number for s in series.slices[1].sources] == list(range(6, 11))
    assert series.slices[0].slice_thickness == 5.0 and series.slices[0].rr_interval == 800.0


@pytest.mark.parametrize("name", ["emri_small.dcm", "emri_small_big_endian.dcm"])
def test_enhanced_mr_without_geometry_is_refused(name: str) -> None:
    # emri_small as shipped: a 3D head volume, no plane positions, cardiac synchronisation NONE
    with pytest.raises(InputError, match="not a cine: no ImagePositionPatient"):
        read_series(get_testdata_file(name))


@pytest.mark.parametrize("name", ["MR2_UNCR.dcm", "MR2_J2KR.dcm", "MR_small.dcm"])
def test_single_frame_mr_is_rejected_as_not_cine(name: str) -> None:
    with pytest.raises(InputError, match="not cine") as info:
        read_series(get_testdata_file(name))
    assert Path(get_testdata_file(name)).name in str(info.value)


def test_truncated_file_names_file_and_reason() -> None:
    with pytest.raises(InputError, match="MR_truncated.dcm: cannot decode pixel data"):
        read_series(get_testdata_file("MR_truncated.dcm"))


def test_not_dicom(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="notes.txt: not a DICOM file"):
        read_series(tmp_path)


def test_frames_ordered_by_trigger_time_or_by_instance_number_when_asked(tmp_path: Path) -> None:
    by_trigger = tmp_path / "a"
    by_trigger.mkdir()
    _cine_from("MR_small.dcm", by_trigger, [300.0, 0.0, 200.0, 100.0], [1, 2, 3, 4])
    [series] = read_series(by_trigger)
    marks = series.slices[0].frames[:, 0, 0]
    slope = float(pydicom.dcmread(get_testdata_file("MR_small.dcm")).get("RescaleSlope", 1))
    np.testing.assert_array_equal(marks / slope, [1, 3, 2, 0])
    np.testing.assert_array_equal(series.slices[0].trigger_times, [0, 100, 200, 300])

    by_number = tmp_path / "b"
    by_number.mkdir()
    _cine_from("MR_small.dcm", by_number, [None] * 3, [3, 1, 2])
    with pytest.raises(InputError, match="no cardiac timing"):
        read_series(by_number)
    [series] = read_series(by_number, untimed_cine=True)  # the user says: one cycle in InstanceNumber order
    np.testing.assert_array_equal(series.slices[0].frames[:, 0, 0], [1, 2, 0])
    assert np.isnan(series.slices[0].trigger_times).all()


def test_phantom_acquisition_geometry_and_timing(lowres_study: Path) -> None:
    [low] = read_series(lowres_study / "lowres")
    [truth] = read_series(lowres_study / "truth")
    assert low.study_uid == truth.study_uid and low.series_uid != truth.series_uid
    assert low.shape == (2, 4, 64, 64) and truth.shape == (2, 32, 256, 256)
    np.testing.assert_allclose(low.slices[0].pixel_spacing, truth.slices[0].pixel_spacing * 4, rtol=1e-5)
    np.testing.assert_allclose(low.slices[0].trigger_times, truth.slices[0].trigger_times[::8], atol=1e-3)
    # Slices are sorted along the normal.
    d = [float(s.position @ s.normal) for s in truth.slices]
    assert d == sorted(d)


def test_mixed_matrix_sizes_are_rejected(lowres_study: Path, tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    shutil.copytree(lowres_study / "lowres", mixed)
    victim = sorted(mixed.iterdir())[0]
    ds = pydicom.dcmread(victim)
    ds.Rows, ds.Columns = 32, 128
    ds.save_as(victim)
    with pytest.raises(InputError, match="mixes matrix sizes"):
        read_series(mixed)


def test_non_mr_is_rejected(tmp_path: Path) -> None:
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path)
    with pytest.raises(InputError, match="not MR"):
        read_series(tmp_path)
