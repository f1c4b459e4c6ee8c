"""The derived series writer: super-resolved frames -> a new DICOM series in the same study.

Rules (ARCHITECTURE section 7): Rows/Columns x4, PixelSpacing /4, ImagePositionPatient moved to the new first
pixel centre, frames x8 over the cardiac cycle with TriggerTime interpolated, CardiacNumberOfImages updated,
UIDs derived deterministically from the input UIDs + method/version + parameters, DERIVED\\SECONDARY image type,
DerivationDescription, SourceImageSequence, ContributingEquipmentSequence, a SeriesDescription suffix and a
window. Classic MR input is copied and modified frame by frame; Enhanced MR input is written as classic MR Image
Storage (the single-frame IOD can be built completely from the enhanced header).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from cinesr.model.cine import ENHANCED_MR_IMAGE_STORAGE, MR_IMAGE_STORAGE, CineSeries, CineSlice
from cinesr.model.flow import interpolate_times
from cinesr.model.folders import staged_folder
from cinesr.model.instance import (
    encode_pixels,
    file_meta_for,
    new_mr_image,
    now_da_tm,
    set_pixels,
    uid_from,
    window_for,
)
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from . import __version__

log = logging.getLogger(__name__)

SOFTWARE = "CineSR"
SERIES_SUFFIX = " CineSR"
# Attributes describing the old pixels that would be wrong for the new ones.
_STALE = (
    "LargestImagePixelValue", "SmallestImagePixelValue", "LargestPixelValueInSeries", "SmallestPixelValueInSeries",
    "PixelPaddingValue", "PixelPaddingRangeLimit", "WindowCenterWidthExplanation", "VOILUTSequence",
    "IconImageSequence", "PixelDataProviderURL", "ReferencedImageSequence", "AcquisitionMatrix",
    "PercentPhaseFieldOfView", "NumberOfFrames", "FrameIncrementPointer",
)


@dataclass(frozen=True)
class Derivation:
    """What produced the output; everything here that changes pixels enters the UIDs."""

    method: str
    version: str
    parameters: dict[str, object]
    temporal: int = 8
    spatial: int = 4

    @property
    def key(self) -> str:
        return json.dumps({"method": self.method, "version": self.version, "parameters": self.parameters,
                           "temporal": self.temporal, "spatial": self.spatial}, sort_keys=True)

    @property
    def description(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in sorted(self.parameters.items()))
        return (f"{SOFTWARE} {__version__}: x{self.spatial} spatial, x{self.temporal} temporal super-resolution "
                f"by {self.method} {self.version} ({params})")[:1024]


def derived_series_uid(series_uid: str, derivation: Derivation) -> str:
    return uid_from("series", series_uid, derivation.key)


def derived_instance_uid(series_uid: str, derivation: Derivation, slice_index: int, frame_index: int) -> str:
    return uid_from("instance", series_uid, derivation.key, slice_index, frame_index)


@dataclass
class DerivedSeries:
    series_uid: str
    folder: Path
    files: list[Path]
    sop_instance_uids: list[str]


def _first_pixel_position(s: CineSlice, spatial: int) -> np.ndarray:
    # Half-pixel convention: the new first centre lies (f-1)/2 new pixels before the old one, along rows and
    # columns. ImageOrientationPatient: first triplet = row direction (along columns index), second = column dir.
    new_row_spacing, new_col_spacing = s.pixel_spacing / spatial
    shift = (spatial - 1) / 2
    return (s.position - shift * new_col_spacing * s.orientation[:3] - shift * new_row_spacing * s.orientation[3:])


def _rescale_of(ds: Dataset) -> tuple[float, float]:
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    return (float(slope) if slope not in (None, "") else 1.0, float(intercept) if intercept not in (None, "") else 0.0)


def _source_refs(s: CineSlice, indices: list[int]) -> Sequence:
    items = []
    for i in indices:
        src = s.sources[i]
        item = Dataset()
        item.ReferencedSOPClassUID = src.sop_class_uid
        item.ReferencedSOPInstanceUID = src.sop_instance_uid
        if src.frame_number is not None:
            item.ReferencedFrameNumber = src.frame_number
        items.append(item)
    return Sequence(items)


def _contributing_equipment(derivation: Derivation) -> Sequence:
    item = Dataset()
    item.Manufacturer = SOFTWARE
    item.ManufacturerModelName = f"{SOFTWARE} {derivation.method}"
    item.SoftwareVersions = [__version__, f"{derivation.method}-{derivation.version}"]
    da, tm = now_da_tm()
    item.ContributionDateTime = da + tm
    item.ContributionDescription = derivation.description[:64]
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "109103", "DCM", "Modifying Equipment"
    item.PurposeOfReferenceCodeSequence = Sequence([code])
    return Sequence([item])


def _series_number(header: Dataset) -> int:
    try:
        return (int(header.get("SeriesNumber") or 0) + 1000) % 2**31
    except (TypeError, ValueError):
        return 1000


def _cycle_length(s: CineSlice, header: Dataset) -> float | None:
    nominal = header.get("NominalInterval")
    try:
        rr = float(nominal) if nominal not in (None, "") else None
    except (TypeError, ValueError):
        rr = None
    t = s.trigger_times
    if rr and np.all(np.isfinite(t)) and rr > float(t[-1] - t[0]):
        return rr
    return None


def write_derived_series(series: CineSeries, frames: list[np.ndarray], out_dir: str | os.PathLike[str],
                         derivation: Derivation, progress: Callable[[int, int], None] | None = None) -> DerivedSeries:
    """Write the derived series into out_dir/<new SeriesInstanceUID>/, atomically (all files or none).

    frames[i] is slice i's output (temporal*T, spatial*h, spatial*w) in the series' intensity units.
    A re-run with the same input and derivation produces the same UIDs and replaces the earlier folder.
    """
    if len(frames) != len(series.slices):
        raise ValueError(f"{len(frames)} frame stacks for {len(series.slices)} slices")
    out_root = Path(out_dir)
    out_root.mkdir(parents=True, exist_ok=True)
    new_series_uid = derived_series_uid(series.series_uid, derivation)
    final = out_root / new_series_uid
    enhanced = series.sop_class_uid == ENHANCED_MR_IMAGE_STORAGE
    header = series.header
    description = (str(header.get("SeriesDescription", "")) + SERIES_SUFFIX).strip()[:64]
    centre, width = window_for(f[:: max(1, len(f) // 8)] for f in frames)
    series_number = _series_number(header)
    total = sum(len(f) for f in frames)
    files: list[Path] = []
    uids: list[str] = []
    with staged_folder(final) as staging:
        source_cache: dict[Path, Dataset] = {}
        for slice_index, (s, out) in enumerate(zip(series.slices, frames, strict=True)):
            n_in, n_out = s.num_frames, len(out)
            expected = (n_in * derivation.temporal, s.frames.shape[1] * derivation.spatial,
                        s.frames.shape[2] * derivation.spatial)
            if out.shape != expected:
                raise ValueError(f"slice {slice_index}: output shape {out.shape}, expected {expected}")
            times = interpolate_times(s.trigger_times, derivation.temporal, _cycle_length(s, header))
            position = _first_pixel_position(s, derivation.spatial)
            spacing = s.pixel_spacing / derivation.spatial
            for k in range(n_out):
                before = k // derivation.temporal
                neighbours = sorted({before, (before + 1) % n_in}) if k % derivation.temporal else [before]
                sop_uid = derived_instance_uid(series.series_uid, derivation, slice_index, k)
                instance_number = slice_index * n_out + k + 1
                if enhanced:
                    ds = _from_enhanced(header, s, out[k], sop_uid, new_series_uid, series_number, instance_number,
                                        position, spacing, times[k], n_out, description)
                else:
                    src_path = s.sources[before].path
                    if src_path not in source_cache:
                        source_cache[src_path] = pydicom.dcmread(src_path, stop_before_pixels=True)
                    ds = _from_classic(source_cache[src_path], out[k], sop_uid, new_series_uid, series_number,
                                       instance_number, position, spacing, times[k], n_out, description)
                ds.ImageType = ["DERIVED", "SECONDARY", *list(_image_type_rest(ds))]
                ds.DerivationDescription = derivation.description
                ds.SourceImageSequence = _source_refs(s, neighbours)
                ds.ContributingEquipmentSequence = _contributing_equipment(derivation)
                ds.WindowCenter, ds.WindowWidth = centre, width
                path = staging / f"IM{slice_index + 1:03d}_{k + 1:04d}.dcm"
                ds.save_as(path, enforce_file_format=True)
                files.append(final / path.name)
                uids.append(sop_uid)
                if progress:
                    progress(len(files), total)
    log.info("derived series written", extra={"series_uid": new_series_uid, "source_series_uid": series.series_uid,
                                              "instances": len(files)})
    return DerivedSeries(new_series_uid, final, files, uids)


_image_type_rest_default = ("OTHER",)


def _image_type_rest(ds: Dataset) -> tuple[str, ...]:
    values = list(ds.get("ImageType") or [])
    return tuple(str(v) for v in values[2:]) or _image_type_rest_default


def _from_classic(source: Dataset, pixels: np.ndarray, sop_uid: str, series_uid: str, series_number: int,
                  instance_number: int, position: np.ndarray, spacing: np.ndarray, trigger: float, n_out: int,
                  description: str) -> Dataset:
    ds = source.copy()
    for tag in [t for t in ds.keys() if t.group & 0xFF00 == 0x6000 or t.group == 0x7FE0 or t.is_private]:
        del ds[tag]
    for keyword in _STALE:
        if keyword in ds:
            delattr(ds, keyword)
    slope, intercept = _rescale_of(source)
    bits = 16  # bicubic/model overshoot may exceed the input's BitsStored; 16 keeps it instead of clipping
    signed = int(source.get("PixelRepresentation", 0) or 0) == 1
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.InstanceNumber = instance_number
    da, tm = now_da_tm()
    ds.InstanceCreationDate, ds.InstanceCreationTime = da, tm
    ds.ContentDate, ds.ContentTime = da, tm
    ds.SeriesDate, ds.SeriesTime = da, tm
    ds.ImagePositionPatient = [round(float(v), 4) for v in position]
    ds.PixelSpacing = [round(float(v), 6) for v in spacing]
    if np.isfinite(trigger):
        ds.TriggerTime = round(float(trigger), 3)
    elif "TriggerTime" in ds:
        del ds.TriggerTime
    ds.CardiacNumberOfImages = n_out
    set_pixels(ds, encode_pixels(pixels, slope=slope, intercept=intercept, bits_stored=bits, signed=signed),
               bits_stored=bits)
    ds.file_meta = file_meta_for(ds)
    return ds


def _from_enhanced(header: Dataset, s: CineSlice, pixels: np.ndarray, sop_uid: str, series_uid: str,
                   series_number: int, instance_number: int, position: np.ndarray, spacing: np.ndarray,
                   trigger: float, n_out: int, description: str) -> Dataset:
    bits = 16
    signed = int(header.get("PixelRepresentation", 0) or 0) == 1
    thickness = header.get("SliceThickness") or header.get("SpacingBetweenSlices") or 1.0
    return new_mr_image(
        header, series_uid=series_uid, sop_uid=sop_uid, series_number=series_number,
        instance_number=instance_number, position=position, orientation=s.orientation,
        pixel_spacing=(float(spacing[0]), float(spacing[1])), slice_thickness=float(thickness),
        trigger_time=trigger, cardiac_images=n_out, nominal_interval=None,
        stored=encode_pixels(pixels, bits_stored=bits, signed=signed), bits_stored=bits,
        series_description=description, image_type=("DERIVED", "SECONDARY", "OTHER"),
    )
