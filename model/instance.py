"""Building MR Image Storage instances: deterministic UIDs, pixel encoding, transfer syntax and a conformant header.

Used for synthetic acquisitions (phantoms) and for derived series built from Enhanced MR input, where the
single-frame MR Image IOD is written from scratch rather than copied from a source instance.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from collections.abc import Iterable, Mapping

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from .cine import MR_IMAGE_STORAGE
from .errors import CineSRError

# Output transfer syntaxes, all lossless (derived images go to PACS storage). JPEG 2000 lossless is the default:
# the smallest of the four on cine frames, decoded by PACS, viewers, dcm2niix and pydicom alike.
OUTPUT_TRANSFER_SYNTAXES: dict[str, UID] = {
    "jpeg2000-lossless": JPEG2000Lossless,
    "jpeg-ls-lossless": JPEGLSLossless,
    "rle-lossless": RLELossless,
    "explicit-little-endian": ExplicitVRLittleEndian,
}
DEFAULT_OUTPUT_TRANSFER_SYNTAX = "jpeg2000-lossless"
# The encoder each uses (all installed with the package): pylibjpeg-openjpeg, pyjpegls, pylibjpeg-rle.
_ENCODER_PLUGIN = {JPEG2000Lossless: "pylibjpeg", JPEGLSLossless: "pyjpegls", RLELossless: "pylibjpeg"}

# The classic MR Image module's acquisition attributes; new_mr_image's defaults describe the synthetic
# acquisitions (a balanced SSFP cine, ECG-gated). Derived images pass what their source says instead.
SYNTHETIC_SSFP_ACQUISITION: dict[str, object] = {
    "ScanningSequence": "GR", "SequenceVariant": "SS", "ScanOptions": "CG", "MRAcquisitionType": "2D",
    "RepetitionTime": 3.0, "EchoTime": 1.5, "EchoTrainLength": 1, "FlipAngle": 60,
}

# Identity attributes copied from a source into every new instance of the same patient and study.
PATIENT_STUDY_KEYWORDS = (
    "SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "PatientWeight", "PatientSize", "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName",
    "StudyID", "AccessionNumber", "StudyDescription", "FrameOfReferenceUID", "PositionReferenceIndicator",
    "Manufacturer", "InstitutionName", "MagneticFieldStrength", "BodyPartExamined", "PatientPosition",
)


def uid_from(*parts: object) -> str:
    """A UID derived deterministically from its parts (ISO/IEC 9834-8 '2.25.' form of a 128-bit hash)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def stored_range(bits_stored: int, signed: bool) -> tuple[int, int]:
    return (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)


def encode_pixels(values: np.ndarray, *, slope: float = 1.0, intercept: float = 0.0, bits_stored: int = 16,
                  signed: bool = False) -> np.ndarray:
    """Real-world values -> stored integers (inverse modality rescale, rounded and clipped to BitsStored)."""
    raw = np.rint((np.asarray(values, dtype=np.float64) - intercept) / slope)
    lo, hi = stored_range(bits_stored, signed)
    return np.clip(raw, lo, hi).astype(np.int16 if signed else np.uint16)


def window_for(values: Iterable[np.ndarray]) -> tuple[float, float]:
    """Window centre/width covering the 1st to 99.5th percentile of the values (what a reader shows first)."""
    sample = np.concatenate([np.asarray(v, dtype=np.float32)[::4, ::4].ravel() for v in values])
    lo, hi = np.percentile(sample, [1.0, 99.5])
    width = max(float(hi - lo), 1.0)
    return round(float(lo) + width / 2, 2), round(width, 2)


def file_meta_for(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def output_transfer_syntax(name: str | None) -> UID:
    """The transfer syntax UID for a setting value: a name from OUTPUT_TRANSFER_SYNTAXES or one of their UIDs."""
    name = name or DEFAULT_OUTPUT_TRANSFER_SYNTAX
    if name in OUTPUT_TRANSFER_SYNTAXES:
        return OUTPUT_TRANSFER_SYNTAXES[name]
    if name in OUTPUT_TRANSFER_SYNTAXES.values():
        return UID(name)
    raise CineSRError(f"unknown output transfer syntax {name!r} (available: {', '.join(OUTPUT_TRANSFER_SYNTAXES)})")


def encode_as(ds: Dataset, transfer_syntax: str) -> None:
    """Set the file meta for `transfer_syntax` and, for a compressed one, compress the (native) pixel data."""
    uid = output_transfer_syntax(transfer_syntax)
    ds.file_meta = file_meta_for(ds)  # native pixel data, as set_pixels wrote it
    if uid.is_compressed:
        ds.compress(uid, encoding_plugin=_ENCODER_PLUGIN[uid], generate_instance_uid=False)
        ds.file_meta = file_meta_for(ds, uid)


def set_pixels(ds: Dataset, stored: np.ndarray, *, bits_stored: int = 16) -> None:
    """Image Pixel module for a single greyscale frame of stored integers."""
    signed = stored.dtype.kind == "i"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2"
    ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = np.ascontiguousarray(stored.astype("<i2" if signed else "<u2")).tobytes()
    ds["PixelData"].VR = "OW"  # 16-bit words; avoids the ambiguous 'OB or OW' when the header was copied


def now_da_tm() -> tuple[str, str]:
    now = _dt.datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S")


def new_mr_image(identity: Dataset, *, series_uid: str, sop_uid: str, series_number: int, instance_number: int,
                 position: np.ndarray, orientation: np.ndarray, pixel_spacing: tuple[float, float],
                 slice_thickness: float | None, trigger_time: float | None, cardiac_images: int,
                 nominal_interval: float | None, stored: np.ndarray, bits_stored: int = 16,
                 series_description: str = "", image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "OTHER"),
                 slope: float = 1.0, intercept: float = 0.0,
                 acquisition: Mapping[str, object] | None = None) -> Dataset:
    """A complete single-frame MR Image Storage instance (cine frame), conformant to the MR Image IOD.

    acquisition: the MR Image module's acquisition attributes (keyword -> value; None writes an empty value);
    by default those of the synthetic SSFP cine. slice_thickness None writes an empty SliceThickness.
    """
    ds = Dataset()
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in identity:
            setattr(ds, keyword, identity.data_element(keyword).value)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "StudyID", "AccessionNumber", "PositionReferenceIndicator",
                    "Manufacturer"):
        if keyword not in ds:
            setattr(ds, keyword, "")
    da, tm = now_da_tm()
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = da, tm
    ds.ImageType = list(image_type)
    ds.Modality = "MR"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description[:64]
    ds.SeriesDate = ds.get("StudyDate", "")
    ds.SeriesTime = ds.get("StudyTime", "")
    ds.ContentDate, ds.ContentTime = da, tm
    ds.InstanceNumber = instance_number
    for keyword, value in (SYNTHETIC_SSFP_ACQUISITION if acquisition is None else acquisition).items():
        setattr(ds, keyword, "" if value is None else value)
    if trigger_time is not None and np.isfinite(trigger_time):
        ds.TriggerTime = round(float(trigger_time), 3)
    if nominal_interval:
        ds.NominalInterval = int(round(float(nominal_interval)))  # IS
    ds.CardiacNumberOfImages = cardiac_images
    ds.SliceThickness = round(float(slice_thickness), 4) if slice_thickness is not None else ""
    ds.PixelSpacing = [round(float(s), 6) for s in pixel_spacing]
    ds.ImageOrientationPatient = [round(float(v), 6) for v in orientation]
    ds.ImagePositionPatient = [round(float(v), 4) for v in position]
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    ds.SliceLocation = round(float(np.asarray(position, float) @ normal), 4)
    if "FrameOfReferenceUID" not in ds:
        ds.FrameOfReferenceUID = uid_from("frame-of-reference", ds.StudyInstanceUID)
    if (slope, intercept) != (1.0, 0.0):
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
    set_pixels(ds, stored, bits_stored=bits_stored)
    ds.file_meta = file_meta_for(ds)
    return ds
