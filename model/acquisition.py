"""Synthetic acquisitions written as DICOM: a phantom study becomes an MR cine series per resolution.

The ground-truth series (full resolution, every frame) and the degraded acquisition (every 8th frame, 4x
smaller) share one study and frame of reference, as two series of one examination would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from .folders import staged_folder
from .instance import encode_pixels, new_mr_image, uid_from
from .phantom import PhantomStudy, degrade_acquisition

# Phantom magnitudes in [0, 1] are stored as 12-bit integers, as scanners commonly do.
_BITS = 12
_SCALE = 4000.0


@dataclass(frozen=True)
class WrittenSeries:
    role: str  # "truth" or "lowres"
    study_uid: str
    series_uid: str
    folder: Path
    files: list[Path]


def _identity(study: PhantomStudy, seed: int) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = f"Phantom^{study.patient_id}"
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = uid_from("phantom-study", study.patient_id, seed, study.generator)
    ds.StudyDate, ds.StudyTime = "20260101", "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CineSR synthetic cardiac cine"
    ds.FrameOfReferenceUID = uid_from("phantom-for", study.patient_id, seed, study.generator)
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "CineSR phantom"
    ds.MagneticFieldStrength = 1.5
    ds.BodyPartExamined = "HEART"
    ds.PatientPosition = "HFS"
    return ds


def _write_series(study: PhantomStudy, identity: Dataset, role: str, series_number: int, folder: Path,
                  seed: int) -> WrittenSeries:
    series_uid = uid_from("phantom-series", identity.StudyInstanceUID, role)
    folder.mkdir(parents=True, exist_ok=True)
    n_slices, n_frames = study.frames.shape[:2]
    files = []
    for s in range(n_slices):
        for t in range(n_frames):
            ds = new_mr_image(
                identity, series_uid=series_uid, sop_uid=uid_from("phantom-instance", series_uid, s, t),
                series_number=series_number, instance_number=s * n_frames + t + 1,
                position=study.image_positions[s], orientation=study.image_orientation,
                pixel_spacing=(study.pixel_spacing_mm, study.pixel_spacing_mm),
                slice_thickness=study.slice_thickness_mm, trigger_time=float(study.trigger_times_ms[t]),
                cardiac_images=n_frames, nominal_interval=study.rr_interval_ms,
                stored=encode_pixels(study.frames[s, t] * _SCALE, bits_stored=_BITS), bits_stored=_BITS,
                series_description=f"CINE SAX {role}",
            )
            ds.WindowCenter, ds.WindowWidth = _SCALE * 0.4, _SCALE * 0.8
            ds.HeartRate = int(round(study.heart_rate_bpm))
            path = folder / f"IM{s + 1:03d}_{t + 1:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return WrittenSeries(role, str(identity.StudyInstanceUID), series_uid, folder, files)


def write_phantom(study: PhantomStudy, out_dir: str | os.PathLike[str], *, seed: int, truth: bool = True,
                  lowres: bool = False, temporal: int = 8, spatial: int = 4) -> list[WrittenSeries]:
    """Write out_dir/<patient>/truth and/or out_dir/<patient>/lowres, each folder complete or absent."""
    root = Path(out_dir) / study.patient_id
    identity = _identity(study, seed)
    written = []
    for role, wanted, data, number in (("truth", truth, study, 1),
                                       ("lowres", lowres, None, 2)):
        if not wanted:
            continue
        data = data or degrade_acquisition(study, temporal=temporal, spatial=spatial)
        final = root / role
        with staged_folder(final) as staging:
            series = _write_series(data, identity, role, number, staging, seed)
        written.append(WrittenSeries(role, series.study_uid, series.series_uid, final,
                                     [final / p.name for p in series.files]))
    return written


def phantom_values(frames: np.ndarray) -> np.ndarray:
    """Phantom [0, 1] magnitudes in the stored DICOM units (for comparing against read-back series)."""
    return np.rint(np.clip(frames, 0, None) * _SCALE)
