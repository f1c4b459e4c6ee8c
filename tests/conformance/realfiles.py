"""Cine inputs built from real DICOM files the project did not write, re-encoded by third-party tools.

Sources: pydicom's test files and the pydicom-data package (MR_small: a Toshiba MR, signed 16 bit; the Siemens
MR with CSA headers and overlays; emri_small: an Enhanced MR written by a Philips scanner and dcmtk). A classic
cine is copies of one real instance, one per cardiac phase and slice (new SOP Instance UIDs, TriggerTime,
slice positions, the image shifted a little per phase so that there is motion); everything else in the header
stays as the scanner wrote it. The Enhanced cine keeps emri_small's header and encoded frames and gains the
functional groups of a 2-slice cine. Re-encodings come from dcmtk (dcmconv, dcmcrle, dcmcjpeg, dcmcjpls) and
GDCM (JPEG 2000), never from the code under test. Nothing here downloads: pydicom's data files are looked up
with download=False.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from ..tools import require_tool

RR_MS = 800.0
SLICE_GAP_MM = 6.0


def real_file(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        raise FileNotFoundError(f"{name} is not installed (pydicom's test files / pydicom-data)")
    return Path(str(path))


def _item(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def classic_cine(folder: Path, source: str = "MR_small.dcm", *, slices: int = 2, frames: int = 4,
                 first_trigger: float = 0.0, rr: float | None = RR_MS, crop: tuple[int, int] | None = None,
                 edit: Callable[[Dataset, int, int], None] | None = None) -> list[Path]:
    """A classic MR cine from copies of one real instance: `slices` positions along the normal, `frames` phases.

    crop=(rows, columns) keeps the top-left corner (ImagePositionPatient unchanged). edit(ds, slice, frame) may
    change each copy before it is written (explicit VR little endian, as the source).
    """
    folder.mkdir(parents=True, exist_ok=True)
    original = pydicom.dcmread(real_file(source))
    pixels = original.pixel_array
    if crop:
        pixels = pixels[: crop[0], : crop[1]]
    orientation = np.array([float(v) for v in original.ImageOrientationPatient])
    normal = np.cross(orientation[:3], orientation[3:])
    position = np.array([float(v) for v in original.ImagePositionPatient])
    paths = []
    for s in range(slices):
        for t in range(frames):
            ds = copy.deepcopy(original)
            ds.SOPInstanceUID = generate_uid(None, [str(original.SOPInstanceUID), source, str(s), str(t)])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = s * frames + t + 1
            ds.ImagePositionPatient = [f"{v:.6g}" for v in position + s * SLICE_GAP_MM * normal]
            ds.SliceLocation = f"{float(position @ normal) + s * SLICE_GAP_MM:.6g}"
            ds.TriggerTime = f"{first_trigger + t * (rr or RR_MS) / frames:.6g}"
            if rr:
                ds.NominalInterval = int(rr)
            given = ds.get("ScanOptions") or []
            options = [str(o) for o in ([given] if isinstance(given, str) else given) if str(o)]
            ds.ScanOptions = [*options, "CG"] if "CG" not in options else options  # an ECG-gated cine
            ds.CardiacNumberOfImages = frames
            moved = np.roll(pixels, t, axis=1)  # a little motion from phase to phase
            ds.Rows, ds.Columns = moved.shape
            ds.PixelData = np.ascontiguousarray(moved).tobytes()
            if edit:
                edit(ds, s, t)
            path = folder / f"S{s + 1}F{t + 1:02d}"  # 8.3 names, as dcmmkdir wants them
            ds.save_as(path)
            paths.append(path)
    return paths


def enhanced_cine(path: Path, source: str = "emri_small.dcm", *, slices: int = 2, slope: float = 2.0,
                  intercept: float = -500.0, thickness: float = 5.0, rr: float = RR_MS,
                  phase_ms: float | None = None) -> Path:
    """emri_small (10 encoded frames) made into an Enhanced MR cine: `slices` positions x 10/slices phases,
    with the functional groups of one: plane position/orientation, pixel measures, cardiac synchronisation
    (trigger delay, nominal R-R), frame content, MR timing and echo, pixel value transformation. Phases are
    phase_ms apart (default: R-R / phases)."""
    ds = pydicom.dcmread(real_file(source))
    n = int(ds.NumberOfFrames)
    frames = n // slices
    orientation = [1.0, 0.0, 0.0, 0.0, 0.8, -0.6]  # oblique
    normal = np.cross(orientation[:3], orientation[3:])
    ds.CardiacSynchronizationTechnique = "RETROSPECTIVE"
    ds.CardiacSignalSource = "ECG"
    ds.CardiacRRIntervalSpecified = rr
    ds.CardiacBeatRejectionTechnique = "NONE"
    ds.MRAcquisitionType = "2D"
    ds.SpacingBetweenSlices = f"{SLICE_GAP_MM:g}"  # differs from SliceThickness on purpose
    ds.BurnedInAnnotation = "NO"
    ds.SeriesDescription = "cine sax"
    shared = _item(
        PixelMeasuresSequence=Sequence([_item(PixelSpacing=[1.5, 1.25], SliceThickness=thickness)]),
        PlaneOrientationSequence=Sequence([_item(ImageOrientationPatient=orientation)]),
        PixelValueTransformationSequence=Sequence([_item(RescaleSlope=slope, RescaleIntercept=intercept,
                                                         RescaleType="US")]),
        MRTimingAndRelatedParametersSequence=Sequence([_item(RepetitionTime=3.4, FlipAngle=55.0,
                                                             EchoTrainLength=1)]),
        MREchoSequence=Sequence([_item(EffectiveEchoTime=1.7)]),
    )
    per_frame = []
    for index in range(n):
        s, t = divmod(index, frames)
        where = np.array([-40.0, -30.0, 20.0]) + s * SLICE_GAP_MM * normal
        per_frame.append(_item(
            PlanePositionSequence=Sequence([_item(ImagePositionPatient=[f"{v:.6g}" for v in where])]),
            CardiacSynchronizationSequence=Sequence([_item(NominalCardiacTriggerDelayTime=t * (phase_ms or rr / frames),
                                                           RRIntervalTimeNominal=rr)]),
            FrameContentSequence=Sequence([_item(TemporalPositionIndex=t + 1, StackID="1",
                                                 InStackPositionNumber=s + 1, DimensionIndexValues=[s + 1, t + 1])]),
        ))
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    return path


# ---- third-party re-encodings --------------------------------------------------------------------------------

DCMTK = {
    "implicit": ["dcmconv", "+ti"],
    "explicit": ["dcmconv", "+te"],
    "big-endian": ["dcmconv", "+tb"],
    "deflate": ["dcmconv", "+td"],
    "rle": ["dcmcrle"],
    "jpeg-lossless": ["dcmcjpeg", "+e1"],  # process 14, selection value 1
    "jpeg-ls": ["dcmcjpls"],  # lossless by default
    "jpeg-lossy": ["dcmcjpeg", "+ee"],  # extended sequential (12 bit), lossy
}


def _gdcm_j2k(src: Path, dst: Path) -> None:
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    if not reader.Read():
        raise RuntimeError(f"GDCM cannot read {src}")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEG2000Lossless))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise RuntimeError(f"GDCM cannot encode {src} as JPEG 2000")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise RuntimeError(f"GDCM cannot write {dst}")


def transcode(files: list[Path], folder: Path, kind: str) -> list[Path]:
    """Copies of `files` in `folder`, re-encoded by dcmtk (or GDCM for 'j2k')."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for src in files:
        dst = folder / src.name
        if kind == "j2k":
            _gdcm_j2k(src, dst)
        else:
            tool, *args = DCMTK[kind]
            subprocess.run([require_tool(tool), *args, str(src), str(dst)], check=True, capture_output=True,
                           timeout=60)
        out.append(dst)
    return out


def with_dicomdir(files: list[Path], folder: Path) -> list[Path]:
    """The files copied into `folder` with a DICOMDIR beside them, made by dcmtk's dcmmkdir."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = [Path(shutil.copy(f, folder / f.name)) for f in files]
    subprocess.run([require_tool("dcmmkdir"), "--recurse", "--input-directory", str(folder),
                    "--output-file", str(folder / "DICOMDIR"), "--invent"], check=True, capture_output=True,
                   timeout=60, cwd=folder)
    return copies
