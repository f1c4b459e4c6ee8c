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
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # a DICOMDIR: an index of files, not an image
# Positions closer than this (mm) along the slice normal are the same slice.
_POSITION_TOLERANCE_MM = 0.01


@dataclass(frozen=True)
class FrameSource:
    """Where one input frame came from (for SourceImageSequence and for copying attributes)."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None  # 1-based within a multi-frame instance; None for single-frame instances
    slope: float = 1.0  # the modality rescale this frame was stored with
    intercept: float = 0.0

    @property
    def key(self) -> str:
        """What identifies this input frame everywhere (SOP Instance UID, and the frame in a multi-frame)."""
        return self.sop_instance_uid if self.frame_number is None else f"{self.sop_instance_uid}#{self.frame_number}"


@dataclass
class CineSlice:
    """One slice position over the cardiac cycle."""

    frames: np.ndarray  # (T, H, W) float32, after rescale
    trigger_times: np.ndarray  # (T,) ms; NaN where the input had none
    position: np.ndarray  # (3,) ImagePositionPatient of the first pixel centre
    orientation: np.ndarray  # (6,) ImageOrientationPatient
    pixel_spacing: np.ndarray  # (2,) row spacing, column spacing (mm)
    sources: list[FrameSource]
    slice_thickness: float | None = None  # mm, where the input says (PixelMeasuresSequence for Enhanced MR)
    rr_interval: float | None = None  # nominal R-R interval (ms), where the input says

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
    transfer_syntaxes: tuple[str, ...] = ()  # of the input files (a lossy one makes every output lossy too)

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


def _number(value: object) -> float | None:
    """A DS/IS/FD value as a float; None where absent, empty or not a finite number."""
    if value in (None, ""):
        return None
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _geometry(holder: Dataset | None, keyword: str, n: int, path: Path) -> np.ndarray:
    """A required geometry attribute: without it the output cannot be placed in the patient, so it is refused."""
    value = holder.get(keyword) if holder is not None else None
    if value in (None, "") or (hasattr(value, "__len__") and len(value) == 0):  # type: ignore[arg-type]
        raise InputError(f"not a cine: no {keyword} (the image geometry is missing)", path)
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[union-attr]
    except Exception:
        raise InputError(f"invalid {keyword}", path) from None
    if out.shape != (n,) or not np.all(np.isfinite(out)):
        raise InputError(f"invalid {keyword} (expected {n} numbers)", path)
    if keyword == "PixelSpacing" and np.any(out <= 0):
        raise InputError("invalid PixelSpacing (not positive)", path)
    if keyword == "ImageOrientationPatient":
        row, col = out[:3], out[3:]
        if abs(np.linalg.norm(row) - 1) > 1e-2 or abs(np.linalg.norm(col) - 1) > 1e-2 or abs(row @ col) > 1e-2:
            raise InputError("invalid ImageOrientationPatient (not two orthogonal unit vectors)", path)
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
    thickness: float | None = None
    rr_interval: float | None = None


def _rescale(holder: Dataset) -> tuple[float, float]:
    slope, intercept = _number(holder.get("RescaleSlope")), _number(holder.get("RescaleIntercept"))
    return (slope if slope else 1.0, intercept if intercept is not None else 0.0)


def _rescaled(arr: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    return arr * np.float32(slope) + np.float32(intercept) if (slope, intercept) != (1.0, 0.0) else arr


def _classic_frames(ds: Dataset, path: Path) -> list[_Frame]:
    arr = _pixels(ds, path)
    if arr.shape[0] != 1:
        raise InputError("multi-frame data in a single-frame SOP class is not supported", path)
    slope, intercept = _rescale(ds)
    trigger = _number(ds.get("TriggerTime"))
    number = _number(ds.get("InstanceNumber"))
    return [_Frame(
        pixels=_rescaled(arr[0], slope, intercept),
        position=_geometry(ds, "ImagePositionPatient", 3, path),
        orientation=_geometry(ds, "ImageOrientationPatient", 6, path),
        spacing=_geometry(ds, "PixelSpacing", 2, path),
        trigger_time=trigger if trigger is not None else float("nan"),
        order=number if number is not None else 0.0,
        source=FrameSource(path, str(ds.SOPClassUID), str(ds.SOPInstanceUID), None, slope, intercept),
        thickness=_number(ds.get("SliceThickness")),
        rr_interval=_number(ds.get("NominalInterval")),
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
    # Without cardiac synchronisation the trigger delays (if any) do not place frames in a heartbeat.
    synchronised = str(ds.get("CardiacSynchronizationTechnique", "") or "").upper() != "NONE"
    frames = []
    for index, item in enumerate(per_frame):
        plane_pos = _group(ds, item, "PlanePositionSequence")
        plane_ori = _group(ds, item, "PlaneOrientationSequence")
        measures = _group(ds, item, "PixelMeasuresSequence")
        cardiac = _group(ds, item, "CardiacSynchronizationSequence") if synchronised else None
        content = _group(ds, item, "FrameContentSequence")
        slope, intercept = _rescale(_group(ds, item, "PixelValueTransformationSequence") or ds)
        trigger = _number(cardiac.get("NominalCardiacTriggerDelayTime")) if cardiac is not None else None
        temporal = _number(content.get("TemporalPositionIndex")) if content is not None else None
        frames.append(_Frame(
            pixels=_rescaled(arr[index], slope, intercept),
            position=_geometry(plane_pos or ds, "ImagePositionPatient", 3, path),
            orientation=_geometry(plane_ori or ds, "ImageOrientationPatient", 6, path),
            spacing=_geometry(measures or ds, "PixelSpacing", 2, path),
            trigger_time=trigger if trigger is not None else float("nan"),
            order=temporal if temporal is not None else float(index),
            source=FrameSource(path, str(ds.SOPClassUID), str(ds.SOPInstanceUID), index + 1, slope, intercept),
            thickness=_number((measures or ds).get("SliceThickness")),
            rr_interval=_number(cardiac.get("RRIntervalTimeNominal")) if cardiac is not None else None,
        ))
    return frames


def _median(values: Iterable[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return float(np.median(found)) if found else None


def _build_slices(frames: list[_Frame], series_uid: str, untimed_cine: bool = False) -> list[CineSlice]:
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
        where = f"series {series_uid} at slice position {distance:.2f} mm"
        if len(group) < 2:
            raise InputError(f"not cine: {where} has a single frame", group[0].source.path)
        shapes = {g.pixels.shape for g in group}
        if len(shapes) > 1:
            raise InputError(f"{where} mixes matrix sizes {sorted(shapes)}", group[0].source.path)
        triggers = np.array([g.trigger_time for g in group])
        timed = bool(np.all(np.isfinite(triggers)))
        if timed and len(np.unique(triggers)) == len(triggers):
            group.sort(key=lambda g: g.trigger_time)
            ordered_triggers = np.array([g.trigger_time for g in group])
        elif timed and not untimed_cine:
            # Several images per cardiac phase (echoes, flow components, repeats): not one cine.
            raise InputError(f"not one cine: {where} has {len(group)} images for {len(np.unique(triggers))} "
                             "trigger times", group[0].source.path)
        elif untimed_cine:  # the user says: one cycle, in InstanceNumber / temporal index order
            group.sort(key=lambda g: g.order)
            ordered_triggers = np.full(len(group), np.nan)
        else:
            raise InputError(f"not a cine: {where} has no cardiac timing (TriggerTime, or "
                             "NominalCardiacTriggerDelayTime with cardiac synchronisation)", group[0].source.path)
        slices.append(CineSlice(
            frames=np.stack([g.pixels for g in group]).astype(np.float32, copy=False),
            trigger_times=ordered_triggers,
            position=group[0].position,
            orientation=orientation,
            pixel_spacing=group[0].spacing,
            sources=[g.source for g in group],
            slice_thickness=_median(g.thickness for g in group),
            rr_interval=_median(g.rr_interval for g in group),
        ))
    counts = {s.num_frames for s in slices}
    if len(counts) > 1:
        raise InputError(f"series {series_uid} has different frame counts per slice: {sorted(counts)}",
                         slices[0].sources[0].path)
    return slices


def _is_directory(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    return (str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else "") == MEDIA_STORAGE_DIRECTORY \
        or "DirectoryRecordSequence" in ds


def read_series(inputs: Sequence[str | os.PathLike[str]] | str | os.PathLike[str], *,
                untimed_cine: bool = False) -> list[CineSeries]:
    """Read DICOM files/folders into cine series (one per SeriesInstanceUID).

    Raises InputError naming the file and the reason for anything that is not a readable MR cine series:
    no image geometry, no cardiac timing (unless untimed_cine: frames without timing are then one cardiac
    cycle in InstanceNumber order), a single frame per position. DICOMDIR files are skipped (an index).
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files = collect_files(inputs)
    grouped: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    for path in files:
        ds = read_dataset(path)
        if _is_directory(ds):
            continue  # the files it indexes are read from the folder itself
        for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
            if not ds.get(keyword):
                raise InputError(f"missing {keyword}", path)
        grouped[str(ds.SeriesInstanceUID)].append((path, ds))
    if not grouped:
        raise InputError("no DICOM images found (only a DICOMDIR)", ", ".join(str(Path(i)) for i in inputs))
    series = []
    for series_uid, members in grouped.items():
        first_path, first = members[0]
        modality = str(first.get("Modality", ""))
        if modality != "MR":
            raise InputError(f"not MR (Modality {modality or 'missing'}): series {series_uid}", first_path)
        frames: list[_Frame] = []
        sop_classes = set()
        syntaxes = set()
        for path, ds in members:
            sop_classes.add(str(ds.SOPClassUID))
            syntaxes.add(str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or ""))
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
            slices=_build_slices(frames, series_uid, untimed_cine), header=header, files=[p for p, _ in members],
            transfer_syntaxes=tuple(sorted(s for s in syntaxes if s)),
        ))
    return series
