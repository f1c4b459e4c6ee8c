"""What 'processed and checked' means for a derived series, each check by a tool that is not ours.

- dciodvfy (dicom3tools) finds no error in the output that the input did not already have;
- dcm2niix converts the output folder, every voxel accounted for;
- Orthanc accepts every instance (its REST API lists them under the derived series);
- the geometry matches to the corner: each output image covers, in patient coordinates, exactly the field of
  view of an input image (all four outer corners), read with pydicom, not with the reader under test.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import numpy as np
import pydicom
from pydicom.dataset import Dataset

from ..dicomcheck import new_errors
from ..orthanc import OrthancServer
from ..tools import require_tool

CORNER_TOLERANCE_MM = 1e-3


def _floats(value: object) -> np.ndarray:
    return np.array([float(v) for v in value], dtype=np.float64)  # type: ignore[union-attr]


def _corners(position: np.ndarray, orientation: np.ndarray, spacing: np.ndarray, rows: int, columns: int):
    """The outer corners (not pixel centres) of an image in patient coordinates, mm."""
    row_dir, col_dir = orientation[:3], orientation[3:]
    row_step, col_step = spacing[1] * row_dir, spacing[0] * col_dir  # along a row: column spacing
    origin = position - 0.5 * row_step - 0.5 * col_step
    return np.stack([origin + i * columns * row_step + j * rows * col_step for i in (0, 1) for j in (0, 1)])


def _macro(ds: Dataset, frame: Dataset | None, group: str) -> Dataset:
    for holder in (frame, (ds.get("SharedFunctionalGroupsSequence") or [None])[0]):
        if holder is not None and group in holder:
            return holder[group][0]
    return ds


def input_fields_of_view(files: list[Path]) -> list[np.ndarray]:
    """Corners of every input image (classic: one per file; Enhanced: one per frame)."""
    out = []
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if "DirectoryRecordSequence" in ds:
            continue
        frames = ds.get("PerFrameFunctionalGroupsSequence") or [None]
        for frame in frames:
            out.append(_corners(_floats(_macro(ds, frame, "PlanePositionSequence").ImagePositionPatient),
                                _floats(_macro(ds, frame, "PlaneOrientationSequence").ImageOrientationPatient),
                                _floats(_macro(ds, frame, "PixelMeasuresSequence").PixelSpacing),
                                int(ds.Rows), int(ds.Columns)))
    return out


def check_geometry(outputs: list[Path], inputs: list[Path], spatial: int = 4) -> None:
    expected = input_fields_of_view(inputs)
    covered = set()
    for path in outputs:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        got = _corners(_floats(ds.ImagePositionPatient), _floats(ds.ImageOrientationPatient),
                       _floats(ds.PixelSpacing), int(ds.Rows), int(ds.Columns))
        errors = [float(np.abs(got - c).max()) for c in expected]
        best = int(np.argmin(errors))
        assert errors[best] < CORNER_TOLERANCE_MM, f"{path.name}: corners {errors[best]:.4f} mm from any input"
        covered.add(best)
        source = pydicom.dcmread(inputs[0], stop_before_pixels=True)
        assert (int(ds.Rows), int(ds.Columns)) == (spatial * int(source.Rows), spatial * int(source.Columns))
    # every input slice position has output images (frames at one position share their corners)
    positions = {tuple(np.round(c[0], 3)) for c in expected}
    assert len({tuple(np.round(expected[i][0], 3)) for i in covered}) == len(positions)


def check_dciodvfy(outputs: list[Path], reference: Path) -> None:
    for path in [outputs[0], outputs[1], outputs[-1]]:
        assert new_errors(path, reference) == set(), path


def _nifti_voxels(path: Path) -> int:
    header = path.read_bytes()[:348]
    dims = np.frombuffer(header[40:56], dtype="<i2")
    if not 1 <= dims[0] <= 7:
        dims = np.frombuffer(header[40:56], dtype=">i2")
    return int(np.prod(dims[1: dims[0] + 1].astype(np.int64)))


def check_dcm2niix(folder: Path, work: Path, rows: int, columns: int, images: int) -> None:
    work.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([require_tool("dcm2niix"), "-z", "n", "-b", "n", "-o", str(work), "-f", "%s_%p",
                             str(folder)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    written = sorted(work.glob("*.nii"))
    assert written, result.stdout[-2000:]
    assert sum(_nifti_voxels(p) for p in written) == rows * columns * images, result.stdout[-2000:]


def check_orthanc(pacs: OrthancServer, outputs: list[Path]) -> None:
    with httpx.Client(base_url=pacs.url, timeout=30) as client:  # one connection: ~8 ms an instance, not ~50
        for path in outputs:
            client.post("/instances", content=path.read_bytes()).raise_for_status()
    series_uid = str(pydicom.dcmread(outputs[0], stop_before_pixels=True).SeriesInstanceUID)
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in outputs}
    assert set(pacs.series_instances(series_uid)) == uids
