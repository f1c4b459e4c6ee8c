# Over 500 lines: one writer and the attribute rules it applies to classic and Enhanced MR input, kept together.
"""The derived series writer: super-resolved frames -> a new DICOM series in the same study.

Rules (README "Output"): Rows/Columns x4, PixelSpacing /4, ImagePositionPatient moved to the new first
pixel centre, frames x8 over the cardiac cycle with TriggerTime interpolated, CardiacNumberOfImages updated,
UIDs derived deterministically from what each image is, DERIVED\\SECONDARY image type, DerivationDescription,
SourceImageSequence, ContributingEquipmentSequence, a SeriesDescription suffix and a window. Classic MR input is
copied and modified frame by frame (only attributes that stay true are kept); Enhanced MR input is written as
classic MR Image Storage, its acquisition attributes mapped from the functional groups, never made up.
Output is little endian in the chosen transfer syntax (lossless; JPEG 2000 lossless by default).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
from cinesr.model.cine import ENHANCED_MR_IMAGE_STORAGE, MR_IMAGE_STORAGE, CineSeries, CineSlice, FrameSource
from cinesr.model.flow import interpolate_times
from cinesr.model.folders import staged_folder
from cinesr.model.instance import (
    encode_as,
    encode_pixels,
    new_mr_image,
    now_da_tm,
    output_transfer_syntax,
    set_pixels,
    uid_from,
    window_for,
)
from cinesr.worker import __version__
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

log = logging.getLogger(__name__)

SOFTWARE = "CineSR"
SERIES_SUFFIX = " CineSR"
UNCERTAINTY_SUFFIX = " CineSR uncertainty"
# Attributes describing the old pixels, the old instance or its own derivation, which would be wrong here.
_STALE = (
    "LargestImagePixelValue", "SmallestImagePixelValue", "LargestPixelValueInSeries", "SmallestPixelValueInSeries",
    "PixelPaddingValue", "PixelPaddingRangeLimit", "WindowCenterWidthExplanation", "VOILUTSequence",
    "IconImageSequence", "PixelDataProviderURL", "ReferencedImageSequence", "AcquisitionMatrix",
    "PercentPhaseFieldOfView", "NumberOfFrames", "FrameIncrementPointer", "ImageComments", "InstanceCreatorUID",
    "DerivationCodeSequence", "DataSetTrailingPadding", "SourceImageSequence",
)
# Binary VRs whose bytes are words in the source's byte order (a big-endian source needs them swapped).
_WORD_SIZE = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
# Transfer syntaxes that lose information, with the method code of LossyImageCompressionMethod. JPEG 2000
# (and HTJ2K) may also be lossless: then the input's LossyImageCompression "00" says so.
_LOSSY = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1", "1.2.840.10008.1.2.4.51": "ISO_10918_1",
    "1.2.840.10008.1.2.4.81": "ISO_14495_1", "1.2.840.10008.1.2.4.91": "ISO_15444_1",
    "1.2.840.10008.1.2.4.93": "ISO_15444_2", "1.2.840.10008.1.2.4.203": "ISO_15444_15",
    "1.2.840.10008.1.2.4.112": "ISO_18181_1",
}
_MAYBE_LOSSLESS = {"1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.203"}
# Enhanced MR -> classic MR: attributes copied as they are (still true of every derived frame).
_ENHANCED_KEPT = (
    "LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod", "PatientIdentityRemoved",
    "DeidentificationMethod", "DeidentificationMethodCodeSequence", "BurnedInAnnotation", "RecognizableVisualFeatures",
    "LongitudinalTemporalInformationModified", "ProtocolName", "StationName", "ManufacturerModelName",
    "DeviceSerialNumber", "SoftwareVersions", "SpacingBetweenSlices", "HeartRate", "PixelBandwidth",
    "AcquisitionNumber", "ImagingFrequency",
)


@dataclass(frozen=True)
class Derivation:
    """What produced the output; everything here that changes pixels enters the UIDs.

    uncertainty: 0 for the super-resolved series; N for its uncertainty series (the per-pixel standard deviation
    over N draws of the method), whose UIDs come from a derivation of their own.
    """

    method: str
    version: str
    parameters: dict[str, object]
    temporal: int = 8
    spatial: int = 4
    uncertainty: int = 0

    @property
    def key(self) -> str:
        values = {"method": self.method, "version": self.version, "parameters": self.parameters,
                  "temporal": self.temporal, "spatial": self.spatial}
        if self.uncertainty:  # only here, so that the SR series keeps the UIDs it always had
            values["uncertainty_draws"] = self.uncertainty
        return json.dumps(values, sort_keys=True)

    @property
    def role(self) -> str:
        """The prefix of this output's UID derivation: an uncertainty UID never collides with an SR one."""
        return "uncertainty-" if self.uncertainty else ""

    def uncertainty_of(self, draws: int) -> Derivation:
        """The derivation of this output's uncertainty series over `draws` draws."""
        return replace(self, uncertainty=draws)

    @property
    def description(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in sorted(self.parameters.items()))
        if self.uncertainty:
            return (f"{SOFTWARE} {__version__}: uncertainty of x{self.spatial} spatial, x{self.temporal} temporal "
                    f"super-resolution: per-pixel standard deviation over {self.uncertainty} draws (seeds "
                    f"seed..seed+{self.uncertainty - 1}) of {self.method} {self.version} ({params})")[:1024]
        return (f"{SOFTWARE} {__version__}: x{self.spatial} spatial, x{self.temporal} temporal super-resolution "
                f"by {self.method} {self.version} ({params})")[:1024]


def input_digest(series: CineSeries) -> str:
    """The exact set of input frames a derivation read (a method may use all of them for any one output frame,
    e.g. series-wide intensity normalisation), independent of file names and order."""
    keys = sorted(src.key for s in series.slices for src in s.sources)
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def derived_series_uid(series: CineSeries, derivation: Derivation) -> str:
    """One derived series per (input series, exact input frames, derivation): more input, a new series."""
    return uid_from(derivation.role + "series", series.series_uid, input_digest(series), derivation.key)


def derived_instance_uid(inputs: str, derivation: Derivation, sources: tuple[str, ...], phase: int,
                         position: np.ndarray, time: float) -> str:
    """An output frame's UID from what it is: its input frames, its phase between them, where and when it lies,
    and the derivation (never from an index, which shifts when the input changes)."""
    where = ",".join(f"{v:.4f}" for v in position)
    when = f"{time:.3f}" if np.isfinite(time) else "untimed"
    return uid_from(derivation.role + "instance", inputs, derivation.key, *sources, phase, where, when)


def derived_series_number(header: Dataset, series_uid: str) -> int:
    """SeriesNumber of a derived series: 100000 x the input's number + 1..99999 from the derived series UID.

    Vendors number acquired series below 100000, so derived numbers never take one of theirs; the prefix shows
    which input series it came from (301 -> 301xxxxx), and the hash part separates derivations of one input
    (baseline, model, other parameters). Inputs without a usable number (or above 21473) share the range
    2147400001..2147483647 (the IS maximum), separated by the hash alone.
    """
    digest = int.from_bytes(hashlib.sha256(series_uid.encode()).digest()[:8], "big")
    try:
        number = int(str(header.get("SeriesNumber", "")).strip())
    except ValueError:
        number = 0
    if 1 <= number <= 21473:
        return number * 100000 + 1 + digest % 99999
    return 2147400000 + 1 + digest % 83647


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


def _contributing_equipment(derivation: Derivation, when: str) -> Dataset:
    item = Dataset()
    item.Manufacturer = SOFTWARE
    item.ManufacturerModelName = f"{SOFTWARE} {derivation.method}"
    item.SoftwareVersions = [__version__, f"{derivation.method}-{derivation.version}"]
    item.ContributionDateTime = when
    item.ContributionDescription = derivation.description[:64]
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "109103", "DCM", "Modifying Equipment"
    item.PurposeOfReferenceCodeSequence = Sequence([code])
    return item


def _cycle_length(s: CineSlice) -> float | None:
    """The nominal R-R interval when it can hold the frames (else the cycle is estimated from their spacing)."""
    rr, t = s.rr_interval, s.trigger_times
    if rr and np.all(np.isfinite(t)) and rr > float(t[-1] - t[0]):
        return float(rr)
    return None


def _lossy(series: CineSeries) -> tuple[bool, list[str]]:
    """Whether the input was lossy compressed (its attributes or its transfer syntax), and the methods used."""
    header = series.header
    said = str(header.get("LossyImageCompression", "") or "")
    given = header.get("LossyImageCompressionMethod") or []
    methods = [str(m) for m in ([given] if isinstance(given, str) else given)]
    lossy = said == "01"
    for ts in series.transfer_syntaxes:
        if ts in _LOSSY and not (ts in _MAYBE_LOSSLESS and said == "00"):
            lossy = True
            if _LOSSY[ts] not in methods:
                methods.append(_LOSSY[ts])
    return lossy, methods


def write_derived_series(series: CineSeries, frames: list[np.ndarray], out_dir: str | os.PathLike[str],
                         derivation: Derivation, progress: Callable[[int, int], None] | None = None, *,
                         transfer_syntax: str | None = None, image_comments: str | None = None) -> DerivedSeries:
    """Write the derived series into out_dir/<new SeriesInstanceUID>/, atomically (all files or none).

    frames[i] is slice i's output (temporal*T, spatial*h, spatial*w) in the series' intensity units (for an
    uncertainty derivation: the per-pixel standard deviation, in the same units).
    transfer_syntax: a name of cinesr.model.instance.OUTPUT_TRANSFER_SYNTAXES (None: the default, JPEG 2000
    lossless). image_comments: ImageComments for every instance (e.g. a note on the output's fidelity).
    A re-run with the same input and derivation produces the same UIDs and replaces the earlier folder.
    """
    if len(frames) != len(series.slices):
        raise ValueError(f"{len(frames)} frame stacks for {len(series.slices)} slices")
    syntax = output_transfer_syntax(transfer_syntax)
    out_root = Path(out_dir)
    out_root.mkdir(parents=True, exist_ok=True)
    new_series_uid = derived_series_uid(series, derivation)
    inputs = input_digest(series)
    final = out_root / new_series_uid
    enhanced = series.sop_class_uid == ENHANCED_MR_IMAGE_STORAGE
    header = series.header
    context = _SeriesContext(
        series_uid=new_series_uid,
        series_number=derived_series_number(header, new_series_uid),
        description=_series_description(header, derivation),
        window=window_for(f[:: max(1, len(f) // 8)] for f in frames),
        created=now_da_tm(),  # one time for the whole series: SeriesTime must not vary between its instances
        lossy=_lossy(series),
        derivation=derivation,
        image_comments=_uncertainty_comment(derivation, image_comments),
    )
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
            times = interpolate_times(s.trigger_times, derivation.temporal, _cycle_length(s))
            # Instances follow the heartbeat: times wrapped past the R-R interval come first.
            order = np.argsort(times, kind="stable") if np.all(np.isfinite(times)) else np.arange(n_out)
            position = _first_pixel_position(s, derivation.spatial)
            spacing = s.pixel_spacing / derivation.spatial
            for rank, k in enumerate(int(i) for i in order):
                phase = k % derivation.temporal
                before, after = k // derivation.temporal, (k // derivation.temporal + 1) % n_in
                neighbours = sorted({before, after}) if phase else [before]
                source = s.sources[before]
                keys = (source.key, s.sources[after].key) if phase else (source.key,)
                sop_uid = derived_instance_uid(inputs, derivation, keys, phase, position, float(times[k]))
                frame = _Frame(sop_uid, slice_index * n_out + rank + 1, rank + 1, n_out, position, spacing,
                               float(times[k]), source)
                if enhanced:
                    ds = _from_enhanced(header, s, out[k], frame, context)
                else:
                    if source.path not in source_cache:
                        source_cache[source.path] = pydicom.dcmread(source.path, stop_before_pixels=True)
                    ds = _from_classic(source_cache[source.path], out[k], frame, context)
                ds.SourceImageSequence = _source_refs(s, neighbours)
                encode_as(ds, syntax)
                path = staging / f"IM{slice_index + 1:03d}_{rank + 1:04d}.dcm"
                pydicom.dcmwrite(path, ds, enforce_file_format=True)
                files.append(final / path.name)
                uids.append(sop_uid)
                if progress:
                    progress(len(files), total)
    log.info("derived series written", extra={"series_uid": new_series_uid, "source_series_uid": series.series_uid,
                                              "instances": len(files), "transfer_syntax": str(syntax)})
    return DerivedSeries(new_series_uid, final, files, uids)


def _series_description(header: Dataset, derivation: Derivation) -> str:
    suffix = UNCERTAINTY_SUFFIX if derivation.uncertainty else SERIES_SUFFIX
    base = str(header.get("SeriesDescription", "")).strip()
    # the suffix is what tells the two series apart: shorten the input's description, never the suffix
    return (base[: 64 - len(suffix)] + suffix).strip()


def _uncertainty_comment(derivation: Derivation, comments: str | None) -> str | None:
    if not derivation.uncertainty:
        return comments
    note = (f"CineSR uncertainty: per-pixel standard deviation over {derivation.uncertainty} draws of the model, "
            "in the intensity units of the super-resolved series. Bright areas are detail the model is unsure of: "
            "look twice before trusting it there.")
    return f"{note} {comments}" if comments else note


@dataclass(frozen=True)
class _SeriesContext:
    """What every instance of one derived series shares."""

    series_uid: str
    series_number: int
    description: str
    window: tuple[float, float]
    created: tuple[str, str]
    lossy: tuple[bool, list[str]]
    derivation: Derivation
    image_comments: str | None


@dataclass(frozen=True)
class _Frame:
    """One output frame: its identity, place in the series, geometry and time, and the input frame it follows."""

    sop_uid: str
    instance_number: int
    temporal_position: int  # 1-based, in time order within its slice
    temporal_positions: int
    position: np.ndarray
    spacing: np.ndarray
    trigger_time: float
    source: FrameSource


def _values(value: object) -> list[object]:
    """A multi-valued attribute's values (a single value is one)."""
    if value in (None, ""):
        return []
    return [value] if isinstance(value, (str, bytes, int, float)) else list(value)  # type: ignore[call-overload]


def _image_type_rest(ds: Dataset) -> tuple[str, ...]:
    values = [str(v) for v in (ds.get("ImageType") or [])]
    return tuple(values[2:]) or ("OTHER",)


def _finish(ds: Dataset, frame: _Frame, context: _SeriesContext, image_type_rest: tuple[str, ...]) -> None:
    """Attributes set the same way for classic and Enhanced input."""
    da, tm = context.created
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.SOPInstanceUID = frame.sop_uid
    ds.SeriesInstanceUID = context.series_uid
    ds.SeriesNumber = context.series_number
    ds.SeriesDescription = context.description
    ds.InstanceNumber = frame.instance_number
    ds.InstanceCreationDate, ds.InstanceCreationTime = da, tm
    ds.ContentDate, ds.ContentTime = da, tm
    ds.SeriesDate, ds.SeriesTime = da, tm
    # an uncertainty map is neither magnitude nor any acquired contrast: value 3 OTHER, nothing after it
    rest = ("OTHER",) if context.derivation.uncertainty else image_type_rest
    ds.ImageType = ["DERIVED", "SECONDARY", *rest]
    ds.DerivationDescription = context.derivation.description
    ds.ImagePositionPatient = [round(float(v), 4) for v in frame.position]
    ds.PixelSpacing = [round(float(v), 6) for v in frame.spacing]
    if np.isfinite(frame.trigger_time):
        ds.TriggerTime = round(frame.trigger_time, 3)
    elif {"CG", "PPG"} & {str(o) for o in _values(ds.get("ScanOptions"))}:
        ds.TriggerTime = ""  # untimed input (the user's choice) of a gated scan: required, but no time to give
    elif "TriggerTime" in ds:
        del ds.TriggerTime
    ds.CardiacNumberOfImages = frame.temporal_positions
    ds.NumberOfTemporalPositions = frame.temporal_positions
    ds.TemporalPositionIdentifier = frame.temporal_position
    earlier = list(ds.get("ContributingEquipmentSequence") or [])
    ds.ContributingEquipmentSequence = Sequence([*earlier, _contributing_equipment(context.derivation, da + tm)])
    ds.WindowCenter, ds.WindowWidth = context.window
    lossy, methods = context.lossy
    if lossy:  # an image derived from lossy pixels is lossy too, whatever its own transfer syntax
        ds.LossyImageCompression = "01"
        if methods:
            ds.LossyImageCompressionMethod = methods
    if context.image_comments:
        ds.ImageComments = context.image_comments[:10240]


def _little_endian_copy(source: Dataset, big_endian: bool, top: bool = True) -> Dataset:
    """A fresh dataset with the source's public elements, values decoded, binary words in little-endian order.

    Private elements (vendor data such as Siemens CSA headers), overlays, curves and pixel data are not copied:
    none of them can be known to hold for the new pixels.
    """
    out = Dataset()
    for elem in source:  # iteration decodes raw elements with the source's own encoding
        tag = elem.tag
        if tag.is_private or tag.element == 0 or (top and (tag.group & 0xFF00 in (0x5000, 0x6000)
                                                            or tag.group in (0x7FE0, 0xFFFA, 0xFFFC))):
            continue
        if elem.VR == "UN" and big_endian:
            continue  # unknown content in an unknown byte order
        value = elem.value
        if elem.VR == "SQ":
            value = Sequence([_little_endian_copy(item, big_endian, top=False) for item in value or []])
        elif big_endian and elem.VR in _WORD_SIZE and isinstance(value, bytes) and value:
            size = _WORD_SIZE[elem.VR]
            value = np.frombuffer(value, dtype=f">u{size}").astype(f"<u{size}").tobytes()
        out.add(DataElement(tag, elem.VR, value))
    return out


def _from_classic(source: Dataset, pixels: np.ndarray, frame: _Frame, context: _SeriesContext) -> Dataset:
    big_endian = source.original_encoding[1] is False
    ds = _little_endian_copy(source, big_endian)
    for keyword in _STALE:
        if keyword in ds:
            delattr(ds, keyword)
    signed = int(source.get("PixelRepresentation", 0) or 0) == 1
    bits = 16  # bicubic/model overshoot may exceed the input's BitsStored; 16 keeps it instead of clipping
    _finish(ds, frame, context, _image_type_rest(source))
    set_pixels(ds, encode_pixels(pixels, slope=frame.source.slope, intercept=frame.source.intercept,
                                 bits_stored=bits, signed=signed), bits_stored=bits)
    return ds


# ---- Enhanced MR -> classic MR Image ------------------------------------------------------------------------

def _frame_item(header: Dataset, frame_number: int | None) -> Dataset | None:
    per_frame = header.get("PerFrameFunctionalGroupsSequence") or []
    return per_frame[frame_number - 1] if frame_number and frame_number <= len(per_frame) else None


def _lookup(header: Dataset, item: Dataset | None, group: str, keyword: str) -> object:
    """A value from a functional group (per-frame, then shared), else from the top level; None when absent."""
    shared = (header.get("SharedFunctionalGroupsSequence") or [None])[0]
    for holder in (item, shared):
        if holder is not None and group in holder and len(holder[group].value):
            macro = holder[group].value[0]
            if keyword in macro and macro[keyword].value not in (None, ""):
                return macro[keyword].value
    value = header.get(keyword)
    return value if value not in (None, "") else None


def _word(value: object) -> str:
    return str(value or "").strip().upper()


def _ds(value: object) -> object:
    """A number as a DS-sized string (16 characters at most); None stays None."""
    if value is None:
        return None
    try:
        return f"{float(value):.6g}"  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _enhanced_acquisition(header: Dataset, item: Dataset | None) -> dict[str, object]:
    """The classic MR Image module's acquisition attributes, mapped from the Enhanced MR pulse sequence and
    functional groups. Type 1 ScanningSequence / SequenceVariant that the input does not describe are RM /
    NONE (the classic IOD needs a value); Type 2 values that it does not give are left empty."""
    def get(keyword: str, group: str = "MRModifierSequence") -> object:
        return _lookup(header, item, group, keyword)

    echo = _word(get("EchoPulseSequence"))
    scanning = [code for code, on in (("SE", echo in ("SPIN", "BOTH")), ("GR", echo in ("GRADIENT", "BOTH")),
                                      ("IR", _word(get("InversionRecovery")) == "YES"),
                                      ("EP", _word(get("EchoPlanarPulseSequence")) == "YES")) if on]
    steady = _word(get("SteadyStatePulseSequence"))
    variant = [code for code, on in (
        ("SK", _word(get("SegmentedKSpaceTraversal")) in ("PARTIAL", "FULL")),
        ("MTC", _word(get("MagnetizationTransfer")) not in ("", "NONE")),
        ("SS", steady not in ("", "NONE", "TIME_REVERSED")), ("TRSS", steady == "TIME_REVERSED"),
        ("SP", _word(get("Spoiling")) not in ("", "NONE")),
        ("OSP", _word(get("OversamplingPhase")) not in ("", "NONE"))) if on]
    technique = _word(header.get("CardiacSynchronizationTechnique"))
    cardiac = technique not in ("", "NONE")
    pulse = _word(header.get("CardiacSignalSource")) == "PP"
    partial = _word(get("PartialFourier")) == "YES"
    direction = _word(get("PartialFourierDirection"))
    options = [code for code, on in (
        ("CG", cardiac and not pulse), ("PPG", cardiac and pulse),
        ("RG", _word(header.get("RespiratoryMotionCompensationTechnique")) not in ("", "NONE", "BREATH_HOLD")),
        ("FC", _word(get("FlowCompensation")) not in ("", "NONE")),
        ("PFF", partial and direction == "FREQUENCY"), ("PFP", partial and direction == "PHASE"),
        ("SP", _word(get("SpatialPresaturation")) == "SLAB"),
        ("FS", "FAT" in _word(get("SpectrallySelectedSuppression")))) if on]
    timing = "MRTimingAndRelatedParametersSequence"
    acquisition: dict[str, object] = {
        "ScanningSequence": scanning or "RM",
        "SequenceVariant": variant or "NONE",
        "ScanOptions": options or None,
        "MRAcquisitionType": _word(header.get("MRAcquisitionType")) or None,
        "RepetitionTime": _ds(get("RepetitionTime", timing)),
        "EchoTime": _ds(get("EffectiveEchoTime", "MREchoSequence")),
        "EchoTrainLength": get("EchoTrainLength", timing),
        "FlipAngle": _ds(get("FlipAngle", timing)),
    }
    if "IR" in scanning:  # InversionTime is then required (Type 2C)
        times = get("InversionTimes")
        acquisition["InversionTime"] = _ds(times[0] if isinstance(times, (list, tuple, MultiValue)) else times)
    return acquisition


def _from_enhanced(header: Dataset, s: CineSlice, pixels: np.ndarray, frame: _Frame,
                   context: _SeriesContext) -> Dataset:
    bits = 16
    signed = int(header.get("PixelRepresentation", 0) or 0) == 1
    slope, intercept = frame.source.slope, frame.source.intercept
    item = _frame_item(header, frame.source.frame_number)
    ds = new_mr_image(
        header, series_uid=context.series_uid, sop_uid=frame.sop_uid, series_number=context.series_number,
        instance_number=frame.instance_number, position=frame.position, orientation=s.orientation,
        pixel_spacing=(float(frame.spacing[0]), float(frame.spacing[1])), slice_thickness=s.slice_thickness,
        trigger_time=frame.trigger_time, cardiac_images=frame.temporal_positions, nominal_interval=s.rr_interval,
        stored=encode_pixels(pixels, slope=slope, intercept=intercept, bits_stored=bits, signed=signed),
        bits_stored=bits, series_description=context.description, slope=slope, intercept=intercept,
        acquisition=_enhanced_acquisition(header, item),
    )
    kept = Dataset()
    for keyword in _ENHANCED_KEPT:
        if keyword in header and keyword not in ds:
            kept.add(header[keyword])
    ds.update(_little_endian_copy(kept, header.original_encoding[1] is False, top=False))
    # Enhanced MR Image Type value 4 (derived pixel contrast) has no place in the classic Image Type.
    _finish(ds, frame, context, _image_type_rest(header)[:1])
    return ds
