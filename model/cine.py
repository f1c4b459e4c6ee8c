"""Cine series read from DICOM: files -> series -> slice positions -> frames in cardiac time order.

Classic MR Image Storage (one frame per instance) and Enhanced MR (multi-frame, per-frame functional groups)
are both read. Pixel values are returned after the modality rescale. Nothing here logs patient identifiers.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from .errors import InputError

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
# Positions closer than this (mm) along the slice normal are the same slice.
_POSITION_TOLERANCE_MM = 0.01


@dataclass(frozen=True)
class FrameSource:
    """Where one input frame came from (for SourceImageSequence and for copying attributes)."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None  # 1-based within a multi-frame instance; None for single-frame instances


@dataclass
class CineSlice:
    """One slice position over the cardiac cycle."""

    frames: np.ndarray  # (T, H, W) float32, after rescale
    trigger_times: np.ndarray  # (T,) ms; NaN where the input had none
    position: np.ndarray  # (3,) ImagePositionPatient of the first pixel centre
    orientation: np.ndarray  # (6,) ImageOrientationPatient
    pixel_spacing: np.ndarray  # (2,) row spacing, column spacing (mm)
    sources: list[FrameSource]

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.orientation[:3], self.orientation[3:])

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


@dataclass
class CineSeries:
    """A cine series: slices sorted along the slice normal, each with its frames in time order."""

    study_uid: str
    series_uid: str
    sop_class_uid: str
    slices: list[CineSlice]
    header: Dataset = field(repr=False)  # first instance without pixel data: patient/study/series attributes
    files: list[Path] = field(default_factory=list, repr=False)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        s = self.slices[0]
        return (len(self.slices), s.num_frames, *s.frames.shape[1:])


def collect_files(inputs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files named directly plus every file below named folders (hidden files skipped), in a stable order."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(
                p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                      p.relative_to(path).parts)
            )
        elif path.is_file():
            files.append(path)
        else:
            raise InputError("no such file or folder", path)
    if not files:
        raise InputError("no files found", ", ".join(str(Path(i)) for i in inputs))
    return files


def read_dataset(path: Path, *, pixels: bool = True) -> Dataset:
    """One DICOM file, or an InputError naming the file and why it cannot be read."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except InvalidDicomError:
        raise InputError("not a DICOM file", path) from None
    except Exception as exc:  # pydicom raises many types for truncated or corrupt files
        raise InputError(f"cannot read DICOM ({type(exc).__name__}: {exc})", path) from None


def _pixels(ds: Dataset, path: Path) -> np.ndarray:
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise InputError("has no pixel data", path)
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise InputError("is not a greyscale image (SamplesPerPixel != 1)", path)
    try:
        arr = ds.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise InputError(f"cannot decode pixel data (transfer syntax {syntax}): {exc}", path) from None
    arr = np.asarray(arr, dtype=np.float32)
    return arr[None] if arr.ndim == 2 else arr


def _floats(value: object, n: int, what: str, path: Path) -> np.ndarray:
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[union-attr]
    except Exception:
        raise InputError(f"invalid {what}", path) from None
    if out.shape != (n,):
        raise InputError(f"invalid {what} (expected {n} values)", path)
    return out


@dataclass
class _Frame:
    pixels: np.ndarray
    position: np.ndarray
    orientation: np.ndarray
    spacing: np.ndarray
    trigger_time: float
    order: float  # fallback ordering key (InstanceNumber or frame index)
    source: FrameSource


def _rescaled(arr: np.ndarray, slope: object, intercept: object) -> np.ndarray:
    m = float(slope) if slope not in (None, "") else 1.0
    b = float(intercept) if intercept not in (None, "") else 0.0
    return arr * np.float32(m) + np.float32(b) if (m, b) != (1.0, 0.0) else arr


def _classic_frames(ds: Dataset, path: Path) -> list[_Frame]:
    arr = _pixels(ds, path)
    if arr.shape[0] != 1:
        raise InputError("multi-frame data in a single-frame SOP class is not supported", path)
    position = _floats(ds.get("ImagePositionPatient", [0, 0, 0]), 3, "ImagePositionPatient", path)
    orientation = _floats(ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), 6, "ImageOrientationPatient",
                          path)
    spacing = _floats(ds.get("PixelSpacing", [1, 1]), 2, "PixelSpacing", path)
    trigger = ds.get("TriggerTime")
    number = ds.get("InstanceNumber")
    return [_Frame(
        pixels=_rescaled(arr[0], ds.get("RescaleSlope"), ds.get("RescaleIntercept")),
        position=position, orientation=orientation, spacing=spacing,
        trigger_time=float(trigger) if trigger not in (None, "") else float("nan"),
        order=float(number) if number not in (None, "") else 0.0,
        source=FrameSource(path, str(ds.SOPClassUID), str(ds.SOPInstanceUID), None),
    )]


def _group(ds: Dataset, frame_group: Dataset | None, name: str) -> Dataset | None:
    """A functional group macro item, per-frame first, then shared."""
    for holder in (frame_group, (ds.get("SharedFunctionalGroupsSequence") or [None])[0]):
        if holder is not None and name in holder and len(holder[name].value):
            return holder[name].value[0]
    return None


def _enhanced_frames(ds: Dataset, path: Path) -> list[_Frame]:
    arr = _pixels(ds, path)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or [None] * arr.shape[0]
    if len(per_frame) != arr.shape[0]:
        raise InputError(f"NumberOfFrames ({arr.shape[0]}) does not match the per-frame groups ({len(per_frame)})",
                         path)
    frames = []
    for index, item in enumerate(per_frame):
        plane_pos = _group(ds, item, "PlanePositionSequence")
        plane_ori = _group(ds, item, "PlaneOrientationSequence")
        measures = _group(ds, item, "PixelMeasuresSequence")
        cardiac = _group(ds, item, "CardiacSynchronizationSequence")
        content = _group(ds, item, "FrameContentSequence")
        rescale = _group(ds, item, "PixelValueTransformationSequence")
        trigger = cardiac.get("NominalCardiacTriggerDelayTime") if cardiac is not None else None
        temporal = content.get("TemporalPositionIndex") if content is not None else None
        frames.append(_Frame(
            pixels=_rescaled(arr[index],
                             (rescale or ds).get("RescaleSlope"), (rescale or ds).get("RescaleIntercept")),
            position=_floats((plane_pos or ds).get("ImagePositionPatient", [0, 0, 0]), 3,
                             "ImagePositionPatient", path),
            orientation=_floats((plane_ori or ds).get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), 6,
                                "ImageOrientationPatient", path),
            spacing=_floats((measures or ds).get("PixelSpacing", [1, 1]), 2, "PixelSpacing", path),
            trigger_time=float(trigger) if trigger not in (None, "") else float("nan"),
            order=float(temporal) if temporal not in (None, "") else float(index),
            source=FrameSource(path, str(ds.SOPClassUID), str(ds.SOPInstanceUID), index + 1),
        ))
    return frames


def _build_slices(frames: list[_Frame], series_uid: str) -> list[CineSlice]:
    orientation = frames[0].orientation
    for f in frames:
        if not np.allclose(f.orientation, orientation, atol=1e-4):
            raise InputError(f"series {series_uid} mixes image orientations", f.source.path)
    normal = np.cross(orientation[:3], orientation[3:])
    by_position: dict[float, list[_Frame]] = defaultdict(list)
    for f in frames:
        distance = float(f.position @ normal)
        key = next((k for k in by_position if abs(k - distance) < _POSITION_TOLERANCE_MM), distance)
        by_position[key].append(f)
    slices = []
    for distance in sorted(by_position):
        group = by_position[distance]
        if len(group) < 2:
            raise InputError(
                f"not cine: series {series_uid} has a single frame at slice position {distance:.2f} mm",
                group[0].source.path)
        shapes = {g.pixels.shape for g in group}
        if len(shapes) > 1:
            raise InputError(f"series {series_uid} mixes matrix sizes {sorted(shapes)} at one slice position",
                             group[0].source.path)
        triggers = np.array([g.trigger_time for g in group])
        if np.all(np.isfinite(triggers)) and len(np.unique(triggers)) == len(triggers):
            group.sort(key=lambda g: g.trigger_time)
        else:  # no usable TriggerTime: InstanceNumber / temporal index order
            group.sort(key=lambda g: g.order)
            triggers = np.full(len(group), np.nan)
        ordered_triggers = np.array([g.trigger_time for g in group]) if np.isfinite(triggers).all() else triggers
        slices.append(CineSlice(
            frames=np.stack([g.pixels for g in group]).astype(np.float32, copy=False),
            trigger_times=ordered_triggers,
            position=group[0].position,
            orientation=orientation,
            pixel_spacing=group[0].spacing,
            sources=[g.source for g in group],
        ))
    counts = {s.num_frames for s in slices}
    if len(counts) > 1:
        raise InputError(f"series {series_uid} has different frame counts per slice: {sorted(counts)}",
                         slices[0].sources[0].path)
    return slices


def read_series(inputs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str]) -> list[CineSeries]:
    """Read DICOM files/folders into cine series (one per SeriesInstanceUID).

    Raises InputError naming the file and the reason for anything that is not a readable MR cine series.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files = collect_files(inputs)
    grouped: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    for path in files:
        ds = read_dataset(path)
        for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
            if not ds.get(keyword):
                raise InputError(f"missing {keyword}", path)
        grouped[str(ds.SeriesInstanceUID)].append((path, ds))
    series = []
    for series_uid, members in grouped.items():
        first_path, first = members[0]
        modality = str(first.get("Modality", ""))
        if modality != "MR":
            raise InputError(f"not MR (Modality {modality or 'missing'}): series {series_uid}", first_path)
        frames: list[_Frame] = []
        sop_classes = set()
        for path, ds in members:
            sop_classes.add(str(ds.SOPClassUID))
            if str(ds.StudyInstanceUID) != str(first.StudyInstanceUID):
                raise InputError(f"series {series_uid} spans several studies", path)
            if str(ds.SOPClassUID) == ENHANCED_MR_IMAGE_STORAGE or int(ds.get("NumberOfFrames", 1) or 1) > 1:
                frames += _enhanced_frames(ds, path)
            else:
                frames += _classic_frames(ds, path)
        if len(sop_classes) > 1:
            raise InputError(f"series {series_uid} mixes SOP classes {sorted(sop_classes)}", first_path)
        header = first.copy()
        for tag in [t for t in header.keys() if t.group == 0x7FE0 or t.group & 0xFF00 == 0x6000]:
            del header[tag]  # keep the header small: no pixel data or overlays
        series.append(CineSeries(
            study_uid=str(first.StudyInstanceUID), series_uid=series_uid, sop_class_uid=sop_classes.pop(),
            slices=_build_slices(frames, series_uid), header=header, files=[p for p, _ in members],
        ))
    return series
