"""What a C-STORE must carry to be stored (issue 14, #7 #8 #9): request UIDs that are the dataset's, a SOP
class on its own presentation context, pixel data that can be decoded, and duplicates that differ reported.

Hand-built PDUs (tests/service/rawpdu.py) send what toolkits would not."""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom.sop_class import CTImageStorage, MRImageStorage

from .conftest import RunningListener
from .rawpdu import EXPLICIT_VR_LE, RawAssociation
from .test_listener import dataset_bytes, mr_dataset, write_file

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_2000 = "1.2.840.10008.1.2.4.90"


def encoded(tmp_path: Path, ds: pydicom.Dataset) -> bytes:
    return dataset_bytes(write_file(tmp_path / f"{ds.SOPInstanceUID}.dcm", ds))[0]


def stored_dataset(listener: RunningListener, sop_uid: str) -> bytes:
    [path] = [p for p in listener.files() if p.stem == sop_uid]
    return dataset_bytes(path)[0]


# ---- #7: the request's SOP Class and Instance UIDs --------------------------------------------------------


def test_request_instance_uid_must_be_the_datasets(listener: RunningListener, tmp_path: Path) -> None:
    """A request naming another instance's UID cannot take that name: refused 0xC211, and the real
    instance, sent afterwards, is stored as itself."""
    study, series = generate_uid(), generate_uid()
    impostor, real = mr_dataset(study, series, rows=16), mr_dataset(study, series, rows=16)
    with RawAssociation(listener.port, [(1, MRImageStorage, EXPLICIT_VR_LE)]) as assoc:
        answer = assoc.c_store(1, MRImageStorage, real.SOPInstanceUID, encoded(tmp_path, impostor))
        assert (answer.status, answer.comment) == (0xC211, "request SOP Instance UID is not the dataset's")
        assert assoc.c_store(1, MRImageStorage, real.SOPInstanceUID, encoded(tmp_path, real)).status == 0x0000
        assoc.release()
    assert [p.stem for p in listener.files()] == [real.SOPInstanceUID]
    assert stored_dataset(listener, real.SOPInstanceUID) == encoded(tmp_path, real)
    assert listener.handle.stats.duplicates == 0


def test_sop_class_must_match_dataset_and_context(listener: RunningListener, tmp_path: Path) -> None:
    """A CT dataset on the MR context, or an MR request carrying a CT dataset, is refused 0xA900."""
    ct = mr_dataset(rows=16)
    ct.SOPClassUID, ct.Modality = CTImageStorage, "CT"
    mr = mr_dataset(rows=16)
    with RawAssociation(listener.port, [(1, MRImageStorage, EXPLICIT_VR_LE),
                                        (3, CTImageStorage, EXPLICIT_VR_LE)]) as assoc:
        # the request says CT (as the dataset does) but uses the MR presentation context
        on_mr = assoc.c_store(1, CTImageStorage, ct.SOPInstanceUID, encoded(tmp_path, ct))
        assert (on_mr.status, on_mr.comment) == (0xA900, "SOP Class UID is not its presentation context's")
        # the request says MR, on the MR context, but the dataset is CT
        lying = assoc.c_store(1, MRImageStorage, ct.SOPInstanceUID, encoded(tmp_path, ct))
        assert (lying.status, lying.comment) == (0xA900, "request SOP Class UID is not the dataset's")
        # both right: stored
        assert assoc.c_store(3, CTImageStorage, ct.SOPInstanceUID, encoded(tmp_path, ct)).status == 0x0000
        assert assoc.c_store(1, MRImageStorage, mr.SOPInstanceUID, encoded(tmp_path, mr)).status == 0x0000
        assoc.release()
    assert {p.stem for p in listener.files()} == {ct.SOPInstanceUID, mr.SOPInstanceUID}
    assert listener.handle.stats.failed == 2


# ---- #8: pixel data that cannot be decoded ---------------------------------------------------------------


@pytest.mark.parametrize("case", ["empty", "short", "native-as-jpeg", "native-as-j2k", "no-pixel-description"])
def test_undecodable_pixel_data_is_refused(listener: RunningListener, tmp_path: Path, case: str) -> None:
    ds = mr_dataset(rows=64)
    syntax = EXPLICIT_VR_LE
    reason = {"empty": "empty Pixel Data",
              "short": "Pixel Data has 4096 bytes, its description needs 8192",
              "native-as-jpeg": "Pixel Data not encapsulated, as its compressed transfer syntax requires",
              "native-as-j2k": "Pixel Data not encapsulated, as its compressed transfer syntax requires",
              "no-pixel-description": "Pixel Data without Rows, Columns or Bits Allocated"}[case]
    if case == "empty":
        ds.PixelData = b""
    elif case == "short":
        ds.PixelData = ds.PixelData[:4096]
    elif case == "native-as-jpeg":
        syntax = JPEG_BASELINE  # uncompressed bytes, declared JPEG (same element encoding)
    elif case == "native-as-j2k":
        syntax = JPEG_2000
    else:
        del ds.Rows
    data = encoded(tmp_path, ds)
    with RawAssociation(listener.port, [(1, MRImageStorage, syntax)]) as assoc:
        answer = assoc.c_store(1, MRImageStorage, ds.SOPInstanceUID, data)
        assert (answer.status, answer.comment) == (0xC212, reason[:64])
        assoc.release()
    assert listener.files() == []
    assert not listener.store.has_instance(ds.SOPInstanceUID)


def test_encapsulated_pixel_data_with_a_foreign_stream_is_refused(listener: RunningListener, tmp_path: Path) -> None:
    """Properly encapsulated fragments that hold raw bytes, declared JPEG 2000: no SOC/SIZ markers."""
    from pydicom.encaps import encapsulate
    ds = mr_dataset(rows=64)
    ds.PixelData = encapsulate([bytes(ds.PixelData)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    path = write_file(tmp_path / "fake-j2k.dcm", ds, ts=JPEG_2000)
    with RawAssociation(listener.port, [(1, MRImageStorage, JPEG_2000)]) as assoc:
        answer = assoc.c_store(1, MRImageStorage, ds.SOPInstanceUID, dataset_bytes(path)[0])
        assert (answer.status, answer.comment) == (0xC212, "Pixel Data is not a JPEG 2000 stream (no SOC/SIZ markers)")
        assoc.release()
    assert listener.files() == []


# ---- #9: duplicates whose content differs ----------------------------------------------------------------


def test_duplicate_with_other_content_gets_a_warning_and_the_first_is_kept(
        listener: RunningListener, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = mr_dataset(rows=16)
    changed = mr_dataset(first.StudyInstanceUID, first.SeriesInstanceUID, rows=16)
    changed.SOPInstanceUID = first.SOPInstanceUID
    changed.PixelData = bytes(reversed(first.PixelData))
    elsewhere = mr_dataset(rows=16)  # another study, same SOPInstanceUID
    elsewhere.SOPInstanceUID = first.SOPInstanceUID
    original = encoded(tmp_path, first)
    caplog.set_level(logging.INFO, logger="cinesr.service")
    with RawAssociation(listener.port, [(1, MRImageStorage, EXPLICIT_VR_LE)]) as assoc:
        assert assoc.c_store(1, MRImageStorage, first.SOPInstanceUID, original).status == 0x0000
        # the same bytes again (the first may still be in the journal): an ordinary duplicate, success
        assert assoc.c_store(1, MRImageStorage, first.SOPInstanceUID, original).status == 0x0000
        other = assoc.c_store(1, MRImageStorage, first.SOPInstanceUID, encoded(tmp_path, changed))
        assert (other.status, other.comment) == (0xB006, "duplicate SOPInstanceUID, other content; first kept")
        moved = assoc.c_store(1, MRImageStorage, first.SOPInstanceUID, encoded(tmp_path, elsewhere))
        assert moved.status == 0xB006
        assoc.release()
    assert stored_dataset(listener, first.SOPInstanceUID) == original  # policy: the first copy is kept
    assert len(listener.files()) == 1
    stats = listener.handle.stats
    assert (stats.stored, stats.duplicates, stats.conflicts, stats.failed) == (1, 3, 2, 0)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "different content" in r.getMessage()]
    assert len(warnings) == 2
    assert "same series" in warnings[0].getMessage()
    assert f"now in study {elsewhere.StudyInstanceUID}" in warnings[1].getMessage()
    assert all("Test^Listener" not in r.getMessage() and "LISTENER01" not in r.getMessage() for r in caplog.records)
