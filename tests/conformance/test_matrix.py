"""The conformance matrix: real-world inputs (classic and Enhanced MR, every transfer syntax dcmtk, GDCM or
pydicom's test data provide, signed data with a negative intercept, vendor private data and overlays, lossy
input, a DICOMDIR beside the files) are processed by the baseline method and checked by dciodvfy, dcm2niix,
Orthanc and corner geometry; what is not a cine is refused with its reason. Inputs are small (64x64 or
48x64, 2 slices, 4-5 phases), so the whole matrix takes about a minute.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from cinesr.model.cine import read_series
from cinesr.model.errors import InputError
from cinesr.worker.inference.derived import Derivation, write_derived_series
from cinesr.worker.inference.pipeline import BaselineMethod, superresolve_series
from pydicom.dataset import Dataset

from ..orthanc import OrthancServer
from .checks import check_dciodvfy, check_dcm2niix, check_geometry, check_orthanc
from .realfiles import RR_MS, classic_cine, enhanced_cine, real_file, transcode, with_dicomdir

METHOD = BaselineMethod()
DERIVATION = Derivation(METHOD.name, METHOD.version, METHOD.parameters())


@dataclass
class Case:
    inputs: list[Path]  # what is processed
    reference: list[Path]  # the same images, explicit VR little endian (for dciodvfy, geometry and pixels)
    lossy: bool = False


def _classic(tmp: Path, **kwargs: object) -> list[Path]:
    return classic_cine(tmp / "reference", **kwargs)  # type: ignore[arg-type]


def _classic_as(kind: str) -> Callable[[Path], Case]:
    def build(tmp: Path) -> Case:
        reference = _classic(tmp)
        return Case(transcode(reference, tmp / kind, kind), reference)
    return build


def _enhanced_from(source: str) -> Callable[[Path], Case]:
    """pydicom's own re-encodings of emri_small (RLE, JPEG-LS, JPEG 2000, big endian), made into the cine."""
    def build(tmp: Path) -> Case:
        reference = [enhanced_cine(tmp / "reference" / "EMR")]
        return Case([enhanced_cine(tmp / "input" / "EMR", source)], reference)
    return build


def _enhanced_as(kind: str) -> Callable[[Path], Case]:
    def build(tmp: Path) -> Case:
        reference = [enhanced_cine(tmp / "reference" / "EMR")]
        return Case(transcode(reference, tmp / kind, kind), reference)
    return build


def _negative_intercept(ds: Dataset, s: int, t: int) -> None:
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = "2", "-500", "US"


def _siemens(tmp: Path) -> Case:
    reference = _classic(tmp, source="MR-SIEMENS-DICOM-WithOverlays.dcm", crop=(48, 64))
    return Case(reference, reference)


def _siemens_lossy(tmp: Path) -> Case:
    reference = _classic(tmp, source="MR-SIEMENS-DICOM-WithOverlays.dcm", crop=(48, 64))
    return Case(transcode(reference, tmp / "lossy", "jpeg-lossy"), reference, lossy=True)


def _oblique(ds: Dataset, s: int, t: int) -> None:
    # An oblique, anisotropic plane (double-oblique short axis); positions stay along the new normal.
    row, col = np.array([0.8, 0.6, 0.0]), np.array([-0.36, 0.48, 0.8])
    ds.ImageOrientationPatient = [f"{v:.6g}" for v in (*row, *col)]
    ds.PixelSpacing = ["1.4", "1.1"]
    ds.ImagePositionPatient = [f"{v:.6g}" for v in np.array([-60.0, 10.0, 35.0]) + 7.0 * s * np.cross(row, col)]


PROCESSED: dict[str, Callable[[Path], Case]] = {
    "classic-explicit": lambda tmp: Case(_classic(tmp), _classic(tmp)),
    **{f"classic-{kind}": _classic_as(kind) for kind in
       ("implicit", "big-endian", "deflate", "rle", "jpeg-lossless", "jpeg-ls", "j2k")},
    "classic-signed-negative-intercept": lambda tmp: Case(*[_classic(tmp, edit=_negative_intercept)] * 2),
    "classic-oblique-anisotropic": lambda tmp: Case(*[_classic(tmp, edit=_oblique)] * 2),
    "classic-first-trigger-late": lambda tmp: Case(*[_classic(tmp, first_trigger=150.0)] * 2),
    "classic-dicomdir": lambda tmp: Case(with_dicomdir(_classic(tmp), tmp / "withdir"), _classic(tmp)),
    "siemens-csa-overlays": _siemens,
    "siemens-jpeg-lossy": _siemens_lossy,
    "enhanced-explicit": lambda tmp: Case(*[[enhanced_cine(tmp / "reference" / "EMR")]] * 2),
    "enhanced-big-endian": _enhanced_from("emri_small_big_endian.dcm"),
    "enhanced-rle": _enhanced_from("emri_small_RLE.dcm"),
    "enhanced-jpeg-ls": _enhanced_from("emri_small_jpeg_ls_lossless.dcm"),
    "enhanced-j2k": _enhanced_from("emri_small_jpeg_2k_lossless.dcm"),
    **{f"enhanced-{kind}": _enhanced_as(kind) for kind in ("implicit", "deflate", "jpeg-lossless")},
}


def _real_values(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)


@pytest.mark.parametrize("name", sorted(PROCESSED))
def test_processed_and_checked(name: str, tmp_path: Path, pacs: OrthancServer) -> None:
    case = PROCESSED[name](tmp_path)
    [series] = read_series(case.inputs)
    [reference] = read_series(case.reference)
    if not case.lossy:  # every transfer syntax decodes to the reference's values (endianness, sign, rescale)
        for got, want in zip(series.slices, reference.slices, strict=True):
            np.testing.assert_array_equal(got.frames, want.frames)
    result = superresolve_series(series, METHOD)
    derived = write_derived_series(series, result.frames, tmp_path / "out", DERIVATION)
    outputs = derived.files
    n_slices, n_frames, rows, columns = series.shape
    assert len(outputs) == n_slices * 8 * n_frames

    check_dciodvfy(outputs, case.reference[0])
    check_geometry(outputs, case.reference)
    check_dcm2niix(derived.folder, tmp_path / "nifti", 4 * rows, 4 * columns, len(outputs))
    check_orthanc(pacs, outputs)

    # Pixels: what was computed is what a reader gets back, in the input's units (sign and rescale kept).
    first = pydicom.dcmread(outputs[1])
    assert first.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"  # JPEG 2000 lossless, the default
    slope = float(first.get("RescaleSlope", 1) or 1)
    start, step = float(series.slices[0].trigger_times[0]), RR_MS / (8 * n_frames)
    for path in (outputs[0], outputs[1], outputs[13]):  # slice 0; which computed frame by its trigger time
        stored = pydicom.dcmread(path)
        k = int(round(((float(stored.TriggerTime) - start) % RR_MS) / step)) % (8 * n_frames)
        lo = 0 if stored.PixelRepresentation == 0 else -(2 ** 15)
        want = np.maximum(result.frames[0][k], lo * slope + float(stored.get("RescaleIntercept", 0) or 0))
        assert np.abs(_real_values(path) - want).max() <= slope / 2 + 1e-3
    # Lossy input makes a lossy-derived output, whatever the output's own transfer syntax.
    assert (str(first.get("LossyImageCompression", "")) == "01") == case.lossy
    # Vendor private data and overlays do not describe the new pixels: not copied.
    assert not any(tag.is_private or tag.group & 0xFF00 == 0x6000 for tag in first.keys())
    # TriggerTime stays within the R-R interval and rises with InstanceNumber.
    times = [float(pydicom.dcmread(p, stop_before_pixels=True).TriggerTime) for p in outputs[:8 * n_frames]]
    assert 0 <= min(times) and max(times) < RR_MS and times == sorted(times)


def _untimed(ds: Dataset, s: int, t: int) -> None:
    del ds.TriggerTime


def _no_geometry(ds: Dataset, s: int, t: int) -> None:
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        delattr(ds, keyword)


def _two_echoes(ds: Dataset, s: int, t: int) -> None:
    ds.TriggerTime = "0" if t < 2 else "400"  # two images per cardiac phase (e.g. two echoes)


def _unsynchronised(tmp: Path) -> list[Path]:
    path = enhanced_cine(tmp / "in" / "EMR")
    ds = pydicom.dcmread(path)
    ds.CardiacSynchronizationTechnique = "NONE"  # e.g. a dynamic or a 3D acquisition: no heartbeat
    ds.save_as(path)
    return [path]


def _copy(name: str) -> Callable[[Path], list[Path]]:
    def build(tmp: Path) -> list[Path]:
        (tmp / "in").mkdir()
        return [Path(shutil.copy(real_file(name), tmp / "in" / name))]
    return build


REFUSED: dict[str, tuple[Callable[[Path], list[Path]], str]] = {
    "classic-geometry-missing": (lambda tmp: _classic(tmp, edit=_no_geometry), "image geometry is missing"),
    "enhanced-3d-volume-no-geometry": (_copy("emri_small.dcm"), "image geometry is missing"),
    "enhanced-no-cardiac-synchronisation": (_unsynchronised, "no cardiac timing"),
    "classic-no-trigger-time": (lambda tmp: _classic(tmp, edit=_untimed), "no cardiac timing"),
    "classic-two-images-per-phase": (lambda tmp: _classic(tmp, edit=_two_echoes), "not one cine"),
    "classic-single-frame": (_copy("MR_small.dcm"), "single frame"),
    "ct": (_copy("CT_small.dcm"), "not MR"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_with_reason(name: str, tmp_path: Path) -> None:
    build, reason = REFUSED[name]
    inputs = build(tmp_path)
    with pytest.raises(InputError, match=reason) as info:
        read_series(inputs)
    assert info.value.path is not None  # the reason names a file


def test_untimed_cine_is_processed_when_the_user_says_how(tmp_path: Path) -> None:
    inputs = _classic(tmp_path, edit=_untimed)
    [series] = read_series(inputs, untimed_cine=True)
    np.testing.assert_array_equal(series.slices[0].frames[1], np.roll(series.slices[0].frames[0], 1, axis=1))
    assert np.isnan(series.slices[0].trigger_times).all()
    result = superresolve_series(series, METHOD)
    derived = write_derived_series(series, result.frames, tmp_path / "out", DERIVATION)
    ds = pydicom.dcmread(derived.files[3])
    assert ds.get("TriggerTime", "") in ("", None)  # no time to give: empty (Type 2C with ScanOptions CG)
    check_dciodvfy(derived.files, inputs[0])
