"""The instance store under a failing or small disk (issue 14, #2 #3 #4): the background filing never stops
silently, the journal's footprint is bounded and its sizes are settings, and the free-space check comes
before bytes are written.

Most use a settings-driven watermark on the test's own disk; those with the ``small_volume`` fixture mount
a size-limited tmpfs (they need root, and are skipped without it)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cinesr.service.app import Service
from cinesr.service.gateway import create_app
from cinesr.service.settings import Settings
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid
from pynetdicom.sop_class import MRImageStorage

from tests.waiting import wait_for

from .conftest import RunningListener, new_store
from .rawpdu import EXPLICIT_VR_LE, RawAssociation
from .test_listener import dataset_bytes, mr_dataset, write_file


def encoded(tmp_path: Path, ds: Any) -> bytes:
    return dataset_bytes(write_file(tmp_path / f"{ds.SOPInstanceUID}.dcm", ds))[0]


def journal_bytes(root: Path) -> int:
    """Disk space the journal takes (allocated blocks, not apparent sizes)."""
    return sum(p.stat().st_blocks * 512 for p in (root / "journal").iterdir() if p.is_file())


def headroom_store(root: Path, headroom: int, **kwargs: object):
    """A store whose watermark leaves only ``headroom`` bytes of this disk's free space to write."""
    root.mkdir(parents=True, exist_ok=True)
    st = os.statvfs(root)
    return new_store(root, min_free_bytes=st.f_bavail * st.f_frsize - headroom, **kwargs)


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """mount(size) -> a fresh tmpfs of that size; unmounted afterwards."""
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        point = tmp_path / f"volume{len(mounts)}"
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounts.append(point)
        return point

    yield mount
    for point in mounts:
        subprocess.run(["umount", "-l", str(point)], check=False)


# ---- #2: a failed background stage ---------------------------------------------------------------------


def test_failed_filing_refuses_new_instances_reports_unready_and_recovers(tmp_path: Path) -> None:
    """The applier cannot file an acknowledged instance (its study folder's name is taken by a file):
    C-STORE answers 0xA701 and /readyz 503 with the reason until the cause is gone; then the store files
    the instance by itself, without a restart, and accepts again."""
    settings = Settings(data_dir=tmp_path / "data", dicom_port=0, dicom_host="127.0.0.1", api_tokens=["t"],
                        auto_process=False, default_method="baseline", disk_min_free_bytes=0,
                        disk_min_free_fraction=0, journal_segment_bytes=1 << 20, journal_spare_segments=1)
    with Service(settings, dispatch="inline") as service, TestClient(create_app(service)) as client:
        study = generate_uid()
        blocker = Path(settings.data_dir) / "instances" / study
        blocker.write_bytes(b"a file where the study's folder must go")
        first, second = mr_dataset(study, rows=16), mr_dataset(rows=16)
        with RawAssociation(service.listener.port, [(1, MRImageStorage, EXPLICIT_VR_LE)]) as assoc:
            assert assoc.c_store(1, MRImageStorage, first.SOPInstanceUID, encoded(tmp_path, first)).status == 0
            time.sleep(1.0)  # the applier has tried (and failed) to file it
            refused = assoc.c_store(1, MRImageStorage, second.SOPInstanceUID, encoded(tmp_path, second))
            assert refused.status == 0xA701
            assert refused.comment.startswith("store not filing: writing an instance file failed")
            ready = client.get("/readyz", headers={"Authorization": "Bearer t"})  # the reason needs the token
            assert ready.status_code == 503
            assert "writing an instance file failed" in ready.json()["checks"]["storage"]["error"]
            blocker.unlink()  # the cause is gone
            wait_for(lambda: client.get("/readyz").status_code == 200, what="readiness after recovery")
            assert assoc.c_store(1, MRImageStorage, second.SOPInstanceUID, encoded(tmp_path, second)).status == 0
            assoc.release()
        assert service.store.flush(timeout=10, checkpoint=True)
        assert service.store.has_instance(first.SOPInstanceUID)
        assert (Path(settings.data_dir) / "instances" / study / first.SeriesInstanceUID
                / f"{first.SOPInstanceUID}.dcm").is_file()
        assert service.store._applier.is_alive()
        # the journal sizes are the settings'
        assert service.store._journal.segment_size == 1 << 20 and service.store._journal.max_spares == 1


@pytest.mark.slow
def test_disk_full_while_filing_then_space_freed(small_volume, tmp_path: Path) -> None:
    """A real ENOSPC: instances are journalled and acknowledged, then the volume fills before the applier
    files them. The store refuses (0xA7xx), never acknowledges while it cannot file, and once space is freed
    files every acknowledged instance without a restart."""
    volume = small_volume("24m")
    store = new_store(volume / "data", segment_size=1 << 20, spare_segments=1, apply_idle_seconds=1.5)
    from cinesr.service.listener import ListenerConfig, start_listener
    handle = start_listener(ListenerConfig(port=0, host="127.0.0.1"), store)
    try:
        sent = [mr_dataset(rows=256) for _ in range(20)]  # 128 KiB each: 2.5 MiB in the journal
        statuses: dict[str, int] = {}
        with RawAssociation(handle.port, [(1, MRImageStorage, EXPLICIT_VR_LE)]) as assoc:
            for ds in sent[:10]:
                statuses[ds.SOPInstanceUID] = assoc.c_store(1, MRImageStorage, ds.SOPInstanceUID,
                                                            encoded(tmp_path, ds)).status
            filler = volume / "filler"
            with open(filler, "wb") as f:  # fill the volume before the applier (idle 1.5 s) starts filing
                try:
                    while True:
                        f.write(bytes(1 << 20))
                        f.flush()
                except OSError:
                    pass
            time.sleep(3)  # the applier (idle 1.5 s) has tried to file them, and failed
            for ds in sent[10:]:
                statuses[ds.SOPInstanceUID] = assoc.c_store(1, MRImageStorage, ds.SOPInstanceUID,
                                                            encoded(tmp_path, ds)).status
            assert all(statuses[ds.SOPInstanceUID] == 0 for ds in sent[:10])
            assert all(statuses[ds.SOPInstanceUID] in (0xA700, 0xA701) for ds in sent[10:])
            filler.unlink()
            instances = volume / "data" / "instances"
            wait_for(lambda: {p.stem for p in instances.rglob("*.dcm")} == set(statuses) - {
                uid for uid, status in statuses.items() if status}, what="every acknowledged instance filed")
            assert store.fault is None
            late = sent[10]
            assert assoc.c_store(1, MRImageStorage, late.SOPInstanceUID, encoded(tmp_path, late)).status == 0
            statuses[late.SOPInstanceUID] = 0
            assoc.release()
        assert store.flush(timeout=10, checkpoint=True)
        acknowledged = {uid for uid, status in statuses.items() if status == 0}
        on_disk = {p.stem for p in (volume / "data" / "instances").rglob("*.dcm")}
        assert on_disk == acknowledged
    finally:
        handle.stop()
        store.close()


@pytest.mark.slow
def test_push_until_a_small_volume_is_full_then_free_space(small_volume, tmp_path: Path) -> None:
    """The issue's probe, scaled down: no watermark, a 32 MiB volume, 128 KiB instances pushed until the
    store refuses five in a row. Every refusal is 0xA7xx; once the store has stopped filing (0xA701) nothing
    more is acknowledged; and after space is freed every acknowledged instance is filed without a restart."""
    volume = small_volume("32m")
    filler = volume / "filler"
    filler.write_bytes(bytes(8 << 20))  # what the operator frees later
    store = new_store(volume / "data", segment_size=1 << 20, spare_segments=1)
    from cinesr.service.listener import ListenerConfig, start_listener
    handle = start_listener(ListenerConfig(port=0, host="127.0.0.1"), store)
    try:
        statuses: list[tuple[str, int]] = []
        with RawAssociation(handle.port, [(1, MRImageStorage, EXPLICIT_VR_LE)]) as assoc:
            refused_in_a_row = 0
            while refused_in_a_row < 5 and len(statuses) < 400:
                ds = mr_dataset(rows=256)
                status = assoc.c_store(1, MRImageStorage, ds.SOPInstanceUID, encoded(tmp_path, ds)).status
                statuses.append((ds.SOPInstanceUID, status))
                refused_in_a_row = refused_in_a_row + 1 if status else 0
            assoc.release()
        codes = [status for _uid, status in statuses]
        assert codes[0] == 0 and set(codes) <= {0, 0xA700, 0xA701}
        if 0xA701 in codes:
            assert 0 not in codes[codes.index(0xA701):]
        filler.unlink()
        acknowledged = {uid for uid, status in statuses if status == 0}
        instances = volume / "data" / "instances"
        wait_for(lambda: {p.stem for p in instances.rglob("*.dcm")} == acknowledged, timeout=20,
                 what="every acknowledged instance filed")
        wait_for(lambda: store.fault is None, what="the store to accept again")
        ds = mr_dataset(rows=256)

        def accepted() -> bool:  # the journal gives its segments back at its next checkpoint: allow for it
            with RawAssociation(handle.port, [(1, MRImageStorage, EXPLICIT_VR_LE)]) as assoc:
                status = assoc.c_store(1, MRImageStorage, ds.SOPInstanceUID, encoded(tmp_path, ds)).status
                assoc.release()
            assert status in (0, 0xA700), hex(status)
            return status == 0
        wait_for(accepted, timeout=20, what="a new instance accepted once space is free")
        print(f"small volume: {len(acknowledged)} acknowledged, then refused {sorted(set(codes) - {0})}")
    finally:
        handle.stop()
        store.close()


# ---- #3: journal sizes are settings, and spares respect the watermark ---------------------------------------


def test_journal_defaults_fit_a_small_volume() -> None:
    settings = Settings()
    assert settings.journal_segment_bytes * settings.journal_spare_segments <= 16 << 20
    assert Settings(journal_segment_bytes=2 << 20, journal_spare_segments=0).journal_spare_segments == 0


def test_spare_segments_never_cross_the_watermark(tmp_path: Path) -> None:
    """With 4 MiB left above the watermark, no 8 MiB spare is made (it would cross it), the store opens,
    and a small instance still goes in (a segment just big enough for it)."""
    store = headroom_store(tmp_path / "data", 4 << 20, segment_size=8 << 20, spare_segments=2)
    try:
        assert journal_bytes(tmp_path / "data") < 1 << 20
        ds = mr_dataset(rows=64)
        stored = store.put(encoded(tmp_path, ds), EXPLICIT_VR_LE)
        assert not stored.duplicate
        assert store.flush(timeout=10, checkpoint=True)
        assert journal_bytes(tmp_path / "data") <= 2 << 20
    finally:
        store.close()


@pytest.mark.slow
def test_service_starts_on_a_50_mb_volume(small_volume) -> None:
    volume = small_volume("50m")
    settings = Settings(data_dir=volume / "data", dicom_port=0, dicom_host="127.0.0.1", api_tokens=["t"],
                        auto_process=False, default_method="baseline", disk_min_free_bytes=0,
                        disk_min_free_fraction=0)
    with Service(settings, dispatch="inline") as service:
        assert journal_bytes(volume / "data") <= 16 << 20
        ds = mr_dataset(rows=256)
        with RawAssociation(service.listener.port, [(1, MRImageStorage, EXPLICIT_VR_LE)]) as assoc:
            assert assoc.c_store(1, MRImageStorage, ds.SOPInstanceUID, encoded(volume, ds)).status == 0
            assoc.release()


# ---- #4: the free-space check before writing; segments released ------------------------------------------


def test_refused_large_instance_takes_no_journal_space(make_listener, tmp_path: Path) -> None:
    """A 32 MiB instance against 16 MiB of headroom: refused 0xA700 while it streams in, the journal holds
    no more than before, and a small instance still fits."""
    big, small = mr_dataset(rows=4096), mr_dataset(rows=64)
    big_bytes, small_bytes = encoded(tmp_path, big), encoded(tmp_path, small)  # before measuring free space
    st = os.statvfs(tmp_path)
    st_free = st.f_bavail * st.f_frsize
    listener: RunningListener = make_listener(store_kwargs={"segment_size": 1 << 20, "spare_segments": 0,
                                                            "min_free_bytes": st_free - (16 << 20)})
    root = listener.root
    before = journal_bytes(root)
    with RawAssociation(listener.port, [(1, MRImageStorage, EXPLICIT_VR_LE)]) as assoc:
        refused = assoc.c_store(1, MRImageStorage, big.SOPInstanceUID, big_bytes, fragment=65536)
        assert (refused.status, refused.comment) == (0xA700, "disk space below watermark")
        during = journal_bytes(root)
        assert assoc.c_store(1, MRImageStorage, small.SOPInstanceUID, small_bytes).status == 0
        assoc.release()
    assert during - before <= 1 << 20, f"journal grew by {(during - before) >> 20} MiB for a refused instance"
    assert [p.stem for p in listener.files()] == [small.SOPInstanceUID]
    listener.store.flush(timeout=10, checkpoint=True)
    wait_for(lambda: journal_bytes(root) <= 1 << 20, what="the journal to shrink back")


def test_segments_are_released_after_concurrent_associations(make_listener, tmp_path: Path) -> None:
    """Eight associations at once each write into a segment of their own; when they end and their
    instances are files, the journal is back to its spares."""
    listener: RunningListener = make_listener(store_kwargs={"segment_size": 1 << 20, "spare_segments": 2})
    sent = [mr_dataset(rows=16) for _ in range(8)]
    associations = [RawAssociation(listener.port, [(1, MRImageStorage, EXPLICIT_VR_LE)]) for _ in sent]
    for assoc, ds in zip(associations, sent, strict=True):
        assert assoc.c_store(1, MRImageStorage, ds.SOPInstanceUID, encoded(tmp_path, ds)).status == 0
    assert len(list((listener.root / "journal").glob("*.wal"))) >= 8  # one each while they are open
    for assoc in associations:
        assoc.release()
    assert {p.stem for p in listener.files()} == {ds.SOPInstanceUID for ds in sent}
    listener.store.flush(timeout=10, checkpoint=True)
    journal = listener.root / "journal"
    wait_for(lambda: not list(journal.glob("*.wal")), what="released segments")
    assert len(list(journal.glob("*.spare"))) <= 2
    assert journal_bytes(listener.root) <= 2 << 20
