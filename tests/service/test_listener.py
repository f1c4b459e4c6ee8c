"""The DICOM listener against real peers: dcmtk echoscu/storescu, and pynetdicom as a raw SCU."""

from __future__ import annotations

import struct
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from cinesr.service.echo import echo
from cinesr.service.store import InstanceStore, is_valid_uid, scan_dataset
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import BasicTextSRStorage, MRImageStorage, Verification

from .conftest import DCMTK_ENV, RunningListener, dcmtk, new_store, require_dcmtk

# storescu option proposing each transfer syntax (it only proposes uncompressed ones by default)
STORESCU_TS_FLAG = {
    "1.2.840.10008.1.2": "-xi", "1.2.840.10008.1.2.1": "-xe", "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd", "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.4.51": "-xx", "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw",
}


def dataset_bytes(path: str | Path) -> tuple[bytes, str]:
    """The encoded dataset of a Part 10 file (everything after the file meta) and its syntax."""
    data = Path(path).read_bytes()
    meta_end = 144 + struct.unpack_from("<I", data, 140)[0]
    ts = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    return data[meta_end:], str(ts)


def storescu(port: int, *paths: str | Path, aet: str = "STORESCU", extra: tuple[str, ...] = ()) \
        -> subprocess.CompletedProcess[str]:
    return dcmtk("storescu", "-aet", aet, "-aec", "CINESR", *extra, "127.0.0.1", str(port),
                 *[str(p) for p in paths])


@pytest.fixture
def raw_scu(monkeypatch: pytest.MonkeyPatch):
    """pynetdicom SCU sending files' dataset bytes as they are (no decode/re-encode)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="RAWSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    yield ae
    ae.shutdown()


def write_file(path: Path, ds: Dataset, ts: str = ExplicitVRLittleEndian) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ts
    ds.save_as(path, enforce_file_format=True)
    return path


def mr_dataset(study: str | None = None, series: str | None = None, rows: int = 8) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study or generate_uid(), series or generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "Test^Listener", "LISTENER01", "MR"
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = (bytes(range(256)) * (rows * rows * 2 // 256 + 1))[:rows * rows * 2]  # complete, even small
    return ds


# ---- C-ECHO ---------------------------------------------------------------------------------


def test_echoscu_and_echo_probe(listener: RunningListener) -> None:
    require_dcmtk()
    result = dcmtk("echoscu", "-aec", "CINESR", "127.0.0.1", str(listener.port))
    assert result.returncode == 0, result.stderr
    assert listener.handle.stats.echoes == 1
    assert echo("127.0.0.1", listener.port, "CINESR") is True
    assert listener.handle.stats.echoes == 2


def test_echo_probe_false_when_nothing_listens(listener: RunningListener) -> None:
    port = listener.port
    listener.handle.stop()
    assert echo("127.0.0.1", port, "CINESR", timeout=2) is False


# ---- C-STORE ----------------------------------------------------------------------------------


def test_storescu_mr_file_lands_byte_identical(listener: RunningListener, tmp_path: Path) -> None:
    require_dcmtk()
    # a clean file (even lengths, no group lengths) that storescu sends exactly as it is on disk
    source = write_file(tmp_path / "mr.dcm", mr_dataset(rows=64))
    result = storescu(listener.port, source, aet="MODALITY1")
    assert result.returncode == 0, result.stderr
    original = pydicom.dcmread(source)
    [path] = listener.files()
    assert path == (listener.root / "instances" / original.StudyInstanceUID / original.SeriesInstanceUID
                    / f"{original.SOPInstanceUID}.dcm")
    assert dataset_bytes(path)[0] == dataset_bytes(source)[0]
    stored = pydicom.dcmread(path)
    assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert stored.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert stored.file_meta.SourceApplicationEntityTitle == "MODALITY1"
    [info] = listener.received
    assert (info.study_uid, info.series_uid, info.sop_instance_uid, info.modality) == (
        original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID, "MR")
    assert info.path == path
    assert listener.store.studies() == [original.StudyInstanceUID]
    assert listener.store.series(original.StudyInstanceUID) == [original.SeriesInstanceUID]
    assert listener.store.instances(original.StudyInstanceUID, original.SeriesInstanceUID) == [path]


def test_storescu_pydicom_mr_small(listener: RunningListener) -> None:
    require_dcmtk()
    source = get_testdata_file("MR_small.dcm")
    assert storescu(listener.port, source).returncode == 0
    [path] = listener.files()
    original, stored = pydicom.dcmread(source), pydicom.dcmread(path)
    assert stored.SOPInstanceUID == original.SOPInstanceUID
    assert (stored.pixel_array == original.pixel_array).all()


@pytest.mark.parametrize("name", [
    "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm", "MR2_J2KR.dcm", "emri_small_jpeg_2k_lossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm", "JPEG-LL.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEG-lossy.dcm",
    "JPEG2000.dcm", "image_dfl.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm",
])
def test_storescu_transfer_syntaxes_kept_as_sent(make_listener, name: str) -> None:
    require_dcmtk()
    listener = make_listener()
    source = get_testdata_file(name)
    original = pydicom.dcmread(source)
    ts = str(original.file_meta.TransferSyntaxUID)
    result = storescu(listener.port, source, extra=("-R", STORESCU_TS_FLAG[ts]))
    assert result.returncode == 0, result.stderr
    [path] = listener.files()
    stored = pydicom.dcmread(path)
    assert stored.file_meta.TransferSyntaxUID == ts  # no conversion on either side
    assert stored.SOPInstanceUID == original.SOPInstanceUID
    if ts not in ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"):  # lossy: decoders may differ
        assert (stored.pixel_array == original.pixel_array).all()


@pytest.mark.parametrize("name", ["MR_small_jp2klossless.dcm", "MR_small_RLE.dcm", "MR2_J2KR.dcm",
                                  "emri_small_jpeg_2k_lossless.dcm", "image_dfl.dcm"])
def test_raw_scu_dataset_bytes_identical(listener: RunningListener, raw_scu: AE, name: str) -> None:
    source = get_testdata_file(name)
    sent, ts = dataset_bytes(source)
    original = pydicom.dcmread(source, stop_before_pixels=True)
    raw_scu.add_requested_context(original.SOPClassUID, ts)
    assoc = raw_scu.associate("127.0.0.1", listener.port, ae_title="CINESR")
    assert assoc.is_established
    status = assoc.send_c_store(source)
    assoc.release()
    assert status.Status == 0x0000
    [path] = listener.files()
    assert dataset_bytes(path)[0] == sent


def test_non_image_sop_class_is_stored(listener: RunningListener, tmp_path: Path) -> None:
    require_dcmtk()
    sr = Dataset()
    sr.SOPClassUID, sr.SOPInstanceUID = BasicTextSRStorage, generate_uid()
    sr.StudyInstanceUID, sr.SeriesInstanceUID = generate_uid(), generate_uid()
    sr.Modality, sr.PatientID, sr.ValueType = "SR", "SR01", "CONTAINER"
    sr.ContinuityOfContent, sr.CompletionFlag, sr.VerificationFlag = "SEPARATE", "COMPLETE", "UNVERIFIED"
    item = Dataset()
    item.RelationshipType, item.ValueType, item.TextValue = "CONTAINS", "TEXT", "no findings"
    sr.ContentSequence = [item]
    path = write_file(tmp_path / "sr.dcm", sr)
    result = storescu(listener.port, path)
    assert result.returncode == 0, result.stderr
    [stored] = listener.files()
    assert stored.stem == sr.SOPInstanceUID
    assert pydicom.dcmread(stored).ContentSequence[0].TextValue == "no findings"
    assert listener.received[0].sop_class_uid == BasicTextSRStorage
    assert listener.received[0].modality == "SR"


def test_duplicate_instance_is_not_written_twice(listener: RunningListener) -> None:
    require_dcmtk()
    source = get_testdata_file("MR_small.dcm")
    assert storescu(listener.port, source).returncode == 0
    [path] = listener.files()
    first = path.stat()
    result = storescu(listener.port, source)
    assert result.returncode == 0, result.stderr  # success for the sender, no new work for us
    assert listener.files() == [path]
    assert path.stat().st_mtime_ns == first.st_mtime_ns and path.stat().st_ino == first.st_ino
    assert listener.handle.stats.duplicates == 1 and listener.handle.stats.stored == 1
    assert len(listener.received) == 1


# ---- bad input ----------------------------------------------------------------------------------


def test_truncated_and_garbage_datasets_fail_and_service_stays_up(listener: RunningListener,
                                                                  raw_scu: AE, tmp_path: Path) -> None:
    source = Path(get_testdata_file("MR_small.dcm"))
    data = source.read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[:-1000])  # cut inside the pixel data
    garbage = tmp_path / "garbage.dcm"
    meta_end = 144 + struct.unpack_from("<I", data, 140)[0]
    garbage.write_bytes(data[:meta_end] + b"\x08\x00\x16\x00ZZ\xff\xff" + bytes(range(200)))
    raw_scu.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    raw_scu.add_requested_context(Verification)
    assoc = raw_scu.associate("127.0.0.1", listener.port, ae_title="CINESR")
    assert assoc.is_established
    assert assoc.send_c_store(truncated).Status == 0xC210
    assert assoc.send_c_store(garbage).Status == 0xC210
    # the same association carries on: a good instance, then C-ECHO
    assert assoc.send_c_store(source).Status == 0x0000
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    assert [p.stem for p in listener.files()] == [pydicom.dcmread(source).SOPInstanceUID]
    assert listener.handle.stats.failed == 2
    assert echo("127.0.0.1", listener.port, "CINESR")


def test_missing_or_hostile_uids_are_refused(listener: RunningListener, raw_scu: AE, tmp_path: Path) -> None:
    no_study = mr_dataset()
    del no_study.StudyInstanceUID
    hostile = mr_dataset(study="../../../../tmp/evil")
    raw_scu.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = raw_scu.associate("127.0.0.1", listener.port, ae_title="CINESR")
    assert assoc.send_c_store(write_file(tmp_path / "a.dcm", no_study)).Status == 0xA900
    assert assoc.send_c_store(write_file(tmp_path / "b.dcm", hostile)).Status == 0xA900
    assoc.release()
    assert listener.files() == []
    assert not list(listener.root.rglob("*evil*"))


def test_unknown_calling_ae_is_rejected(make_listener) -> None:
    require_dcmtk()
    listener = make_listener(allowed_calling_aets=["GOODPACS"])
    bad = dcmtk("echoscu", "-aet", "INTRUDER", "-aec", "CINESR", "127.0.0.1", str(listener.port))
    assert bad.returncode != 0
    assert "Calling AE Title Not Recognized" in bad.stderr + bad.stdout
    source = get_testdata_file("MR_small.dcm")
    assert storescu(listener.port, source, aet="INTRUDER").returncode != 0
    assert listener.files() == []
    assert listener.handle.stats.rejected_associations == 2
    good = dcmtk("echoscu", "-aet", "GOODPACS", "-aec", "CINESR", "127.0.0.1", str(listener.port))
    assert good.returncode == 0, good.stderr


def test_disk_watermark_gives_out_of_resources_and_writes_nothing(make_listener, raw_scu: AE) -> None:
    require_dcmtk()
    listener = make_listener(store_kwargs={"min_free_fraction": 1.0})  # "always full"
    source = get_testdata_file("MR_small.dcm")
    raw_scu.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = raw_scu.associate("127.0.0.1", listener.port, ae_title="CINESR")
    assert assoc.send_c_store(source).Status == 0xA700
    assoc.release()
    result = storescu(listener.port, source)
    assert result.returncode != 0 or "Out of Resources" in result.stderr + result.stdout
    assert listener.files() == []
    assert not listener.store.has_instance(pydicom.dcmread(source).SOPInstanceUID)
    assert listener.handle.stats.out_of_resources == 2
    # nothing half-written anywhere, and nothing for a restart to replay
    assert not [p for p in (listener.root / "instances").rglob("*") if p.is_file()]
    listener.handle.stop()
    listener.store.close()
    reopened = new_store(listener.root)
    assert reopened.studies() == []
    reopened.close()
    assert echo("127.0.0.1", make_listener().port, "CINESR")


def test_max_associations_rejects_the_extra_one(make_listener) -> None:
    listener = make_listener(max_associations=1)
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", listener.port, ae_title="CINESR")
    assert held.is_established
    second = ae.associate("127.0.0.1", listener.port, ae_title="CINESR")
    assert second.is_rejected
    held.release()
    time.sleep(0.2)
    third = ae.associate("127.0.0.1", listener.port, ae_title="CINESR")
    assert third.is_established
    third.release()
    ae.shutdown()


def test_four_concurrent_senders_lose_nothing(listener: RunningListener, tmp_path: Path) -> None:
    require_dcmtk()
    expected = set()
    folders = []
    for sender in range(4):
        folder = tmp_path / f"sender{sender}"
        folder.mkdir()
        study, series = generate_uid(), generate_uid()
        for i in range(25):
            ds = mr_dataset(study, series, rows=64)
            write_file(folder / f"{i:03d}.dcm", ds)
            expected.add(ds.SOPInstanceUID)
        folders.append(folder)
    procs = [subprocess.Popen(["storescu", "-aet", f"SENDER{i}", "-aec", "CINESR", "127.0.0.1",
                               str(listener.port), str(folder), "+sd"], env=DCMTK_ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i, folder in enumerate(folders)]
    codes = [p.wait(timeout=120) for p in procs]
    assert codes == [0, 0, 0, 0]
    files = listener.files()
    assert {p.stem for p in files} == expected and len(files) == 100
    assert len(listener.received) == 100 and {r.sop_instance_uid for r in listener.received} == expected
    for path in files[:5]:
        assert pydicom.dcmread(path).PixelData == mr_dataset(rows=64).PixelData


def test_tls_association(make_listener, tmp_path: Path) -> None:
    import shutil
    import ssl
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True)
    listener = make_listener(tls_cert=str(cert), tls_key=str(key))
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    context.check_hostname = False
    ae = AE(ae_title="TLSSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="CINESR", tls_args=(context, None))
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    # a plain-TCP peer gets nowhere, and the listener keeps serving TLS
    assert echo("127.0.0.1", listener.port, "CINESR", timeout=2) is False
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="CINESR", tls_args=(context, None))
    assert assoc.is_established
    assoc.release()
    ae.shutdown()


# ---- the store on its own ------------------------------------------------------------------------


def test_scan_dataset_rejects_truncation_and_reads_uids() -> None:
    data, ts = dataset_bytes(get_testdata_file("MR_small.dcm"))
    found = scan_dataset(data, ts)
    original = pydicom.dcmread(get_testdata_file("MR_small.dcm"), stop_before_pixels=True)
    assert found["study_uid"] == original.StudyInstanceUID and found["modality"] == "MR"
    from cinesr.service.store import InvalidDataset
    for cut in (1, 100, len(data) // 2, len(data) - 1):
        with pytest.raises(InvalidDataset):
            scan_dataset(data[:cut], ts)
    for good in ("1.2.840.10008.1.2", "1.2.3.4.5678"):
        assert is_valid_uid(good)
    for bad in ("", "../1.2", "1.2.a", "1..2", "1.2/3", "1" * 65):
        assert not is_valid_uid(bad)


def test_journal_replay_after_crash(tmp_path: Path) -> None:
    """Acknowledged instances survive a kill -9 before they were written out as files."""
    files = [get_testdata_file(n) for n in ("MR_small.dcm", "CT_small.dcm", "emri_small_jpeg_2k_lossless.dcm")]
    root = tmp_path / "data"
    script = (
        "import sys, time\n"
        "from cinesr.service.store import InstanceStore\n"
        f"s = InstanceStore({str(root)!r}, segment_size=4 << 20, spare_segments=1, min_free_fraction=0,"
        " min_free_bytes=0, apply_idle_seconds=3600)\n"
        f"for f in {files!r}:\n    s.put_file(f)\n"
        "print('acknowledged', flush=True)\ntime.sleep(3600)\n")
    proc = subprocess.Popen([__import__("sys").executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "acknowledged"
        assert not list((root / "instances").rglob("*.dcm"))  # still only in the journal
    finally:
        proc.kill()
        proc.wait()
    store = new_store(root)  # recovery replays the journal
    try:
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            path = store.instance_path(ds.SOPInstanceUID)
            assert path is not None and path.exists()
            assert dataset_bytes(path)[0] == dataset_bytes(f)[0]
    finally:
        store.close()
    assert not list((root / "journal").glob("*.wal"))  # checkpointed and recycled


def test_torn_journal_tail_is_ignored(tmp_path: Path) -> None:
    store = new_store(tmp_path / "d", apply_idle_seconds=3600)
    store.put_file(get_testdata_file("MR_small.dcm"))
    [segment] = list((tmp_path / "d" / "journal").glob("*.wal"))
    # simulate a crash: add bytes that look like the start of a record after the committed one
    with open(segment, "r+b") as fh:
        blob = fh.read()
        end = blob.rfind(b"1.2.840.10008.1.2.1") + 200
        fh.seek(end)
        fh.write(b"CSRJ" + b"\x01" * 60)
    reopened = InstanceStore(tmp_path / "d", segment_size=4 << 20, spare_segments=1, min_free_fraction=0,
                             min_free_bytes=0)
    assert len(reopened.studies()) == 1
    reopened.close()


def test_file_durability_mode_and_concurrent_puts(tmp_path: Path) -> None:
    store = new_store(tmp_path / "f", durability="file")
    datasets = [mr_dataset() for _ in range(20)]
    paths = [write_file(tmp_path / f"{i}.dcm", ds) for i, ds in enumerate(datasets)]
    threads = [threading.Thread(target=store.put_file, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stored = sorted((tmp_path / "f" / "instances").rglob("*.dcm"))
    assert {p.stem for p in stored} == {ds.SOPInstanceUID for ds in datasets}
    assert not [p for p in (tmp_path / "f" / "instances").rglob(".*")]  # no temp files left
    store.close()


@pytest.mark.parametrize("max_pdu", [16384, 1 << 20])
def test_instances_spanning_journal_segments(make_listener, tmp_path: Path, max_pdu: int) -> None:
    """Instances bigger than what is left in a segment move to the next one; none is lost."""
    require_dcmtk()
    listener = make_listener(store_kwargs={"segment_size": 1 << 20, "spare_segments": 1}, max_pdu_size=max_pdu)
    folder = tmp_path / "big"
    folder.mkdir()
    study, series = generate_uid(), generate_uid()
    expected = {}
    for i in range(12):
        ds = mr_dataset(study, series, rows=256)  # ~128 KiB each, 8 per 1 MiB segment at most
        expected[ds.SOPInstanceUID] = write_file(folder / f"{i:03d}.dcm", ds)
    for _ in range(2):
        result = storescu(listener.port, folder, extra=("+sd",))
        assert result.returncode == 0, result.stderr
    files = listener.files()
    assert {p.stem for p in files} == set(expected)
    for path in files:
        assert dataset_bytes(path)[0] == dataset_bytes(expected[path.stem])[0]
    assert listener.handle.stats.duplicates == 12  # the second pass


def test_silent_peer_is_dropped_after_the_acse_timeout(make_listener) -> None:
    import socket
    listener = make_listener(acse_timeout=0.5)
    with socket.create_connection(("127.0.0.1", listener.port)) as peer:
        peer.settimeout(5)
        start = time.monotonic()
        data = peer.recv(100)  # an A-ABORT, then the connection closes
        assert data[:1] in (b"\x07", b"")
        assert 0.4 <= time.monotonic() - start < 4
    assert echo("127.0.0.1", listener.port, "CINESR")


def test_idle_association_is_aborted_after_the_network_timeout(make_listener) -> None:
    listener = make_listener(network_timeout=0.5)
    ae = AE(ae_title="IDLE")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="CINESR")
    assert assoc.is_established
    deadline = time.monotonic() + 5
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted
    ae.shutdown()


def test_instance_larger_than_a_journal_segment(listener: RunningListener, tmp_path: Path) -> None:
    """An oversized matrix (8 MiB of pixels, twice the test segment size) is stored intact."""
    require_dcmtk()
    ds = mr_dataset(rows=2048)
    source = write_file(tmp_path / "huge.dcm", ds)
    result = storescu(listener.port, source)
    assert result.returncode == 0, result.stderr
    [path] = listener.files()
    assert dataset_bytes(path)[0] == dataset_bytes(source)[0]
    listener.store.flush(checkpoint=True)
    assert echo("127.0.0.1", listener.port, "CINESR")


def test_pdata_on_a_context_never_accepted_aborts_only_that_association(listener: RunningListener) -> None:
    import socket
    ae = AE(ae_title="GOOD")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="CINESR")
    assert assoc.is_established
    # hand-made P-DATA-TF on presentation context 99, which was never proposed
    pdv = struct.pack(">IBB", 6, 99, 0x03) + b"\0\0\0\0"
    raw = assoc.dul.socket.socket
    assert isinstance(raw, socket.socket)
    raw.sendall(struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv)
    deadline = time.monotonic() + 5
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted
    ae.shutdown()
    assert echo("127.0.0.1", listener.port, "CINESR")
