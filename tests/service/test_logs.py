"""Issue 14 #11: logs are JSON lines only, with no raw attribute values from pydicom's warnings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

BIRTH_DATE = "1960-01-02"  # not a valid DA: pydicom warns and quotes it


def test_pydicom_warnings_are_json_lines_without_the_value(tmp_path: Path) -> None:
    # what the derived-series writer does with an input's attributes: read them, set them on a new dataset
    source = Dataset()
    source.file_meta = FileMetaDataset()
    source.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    source.add_new(0x00100030, "DA", None)
    source[0x00100030]._value = BIRTH_DATE  # bypasses validation: the file carries the invalid value
    path = tmp_path / "bad.dcm"
    source.save_as(path, enforce_file_format=False, little_endian=True, implicit_vr=False)
    code = ("from cinesr.worker.logs import configure_logging; configure_logging('INFO'); import pydicom; "
            f"read = pydicom.dcmread({str(path)!r}, force=True); copy = pydicom.Dataset(); "
            "copy.PatientBirthDate = read.PatientBirthDate; print(copy.PatientBirthDate)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == BIRTH_DATE  # kept as it is; only the logs withhold it
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines, "pydicom warned"
    records = [json.loads(line) for line in lines]  # every line is JSON
    assert BIRTH_DATE not in run.stderr
    assert any("Invalid value for VR DA" in r["msg"] and "<withheld>" in r["msg"] for r in records)
    assert pydicom.dcmread(path, force=True).PatientBirthDate == BIRTH_DATE
