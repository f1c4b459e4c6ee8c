"""Refusing what is not a cine where users meet it: the service's routing records the reason (and does not
process the series), the command line ends with one line and exit code 2, or processes it when told how."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from cinesr.service.routing import check_series
from cinesr.service.store import InstanceStore
from pydicom.dataset import Dataset

from .realfiles import classic_cine

CLI = [sys.executable, "-m", "cinesr.service.cli"]


def _untimed(ds: Dataset, s: int, t: int) -> None:
    del ds.TriggerTime


def _no_geometry(ds: Dataset, s: int, t: int) -> None:
    del ds.ImagePositionPatient


@pytest.mark.parametrize(("edit", "reason"), [(_untimed, "no cardiac timing"), (_no_geometry, "geometry is missing"),
                                              (None, "")])
def test_routing_records_why_a_series_is_not_processed(edit, reason: str, tmp_path: Path) -> None:
    files = classic_cine(tmp_path / "in", edit=edit)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    with InstanceStore(tmp_path / "data", min_free_bytes=1 << 20) as store:
        for path in files:
            store.put_file(path)
        store.flush(timeout=30)
        decision = check_series(store, str(first.StudyInstanceUID), str(first.SeriesInstanceUID))
    assert decision.eligible == (not reason) and decision.instances == len(files)
    assert reason in decision.reason and (decision.reason == "") == (not reason)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, env={**os.environ})


def test_cli_refuses_untimed_frames_unless_told_how(tmp_path: Path) -> None:
    classic_cine(tmp_path / "in", edit=_untimed)
    refused = _cli("superresolve", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--method", "baseline")
    assert refused.returncode == 2 and not (tmp_path / "out").exists()
    [line] = refused.stderr.strip().splitlines()
    assert line.startswith("cinesr: error: ") and "no cardiac timing" in line
    told = _cli("superresolve", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--method", "baseline",
                "--untimed-cine", "--transfer-syntax", "rle-lossless", "--json")
    assert told.returncode == 0, told.stderr
    [item] = json.loads(told.stdout)["series"]
    assert item["instances"] == 64
    ds = pydicom.dcmread(sorted(Path(item["folder"]).iterdir())[0])
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"
    bad = _cli("superresolve", str(tmp_path / "in"), "-o", str(tmp_path / "out2"), "--transfer-syntax", "jpeg")
    assert bad.returncode == 2 and "unknown output transfer syntax" in bad.stderr and not (tmp_path / "out2").exists()
