"""Ingest benchmark: our DICOM listener (durable) against Orthanc's C-STORE (durable) and dcmtk storescp
(not durable), side by side in one run on the same instances.

Generates one study of 320 MR instances (256x256, 16 bit) with pydicom into a temporary folder and sends it
with dcmtk ``storescu`` to

  ours      the CineSR listener + InstanceStore (journal durability: a success status only after fdatasync
            of the instance's journal record),
  orthanc   Orthanc's C-STORE SCP with its default durable settings (SyncStorageArea: fdatasync of each
            stored file; SQLite index committed, WAL), the Debian binary, no plugins,
  storescp  dcmtk storescp (-od; never fsyncs), as dcmtk runs it by default (one association at a time) and
            with --fork (a process per association); the faster one is the reference for several senders,

first with 1 sender (all 320 instances on one association), then with 4 concurrent senders (the same 320
instances split 80/80/80/80, each sender its own association). Rounds are interleaved across the receivers so
that load changes on a shared machine hit all alike; every dcmtk process (storescu, storescp, and Orthanc,
whose DICOM layer is dcmtk) runs with TCP_NODELAY=1. Receivers are long-running; what a run stored is
checked (every SOP Instance UID once: nothing lost) and removed, untimed, before the next run. Prints a table
and writes bench/results/ingest-<date><suffix>.json with the machine, the git commit and versions.

    .venv/bin/python bench/ingest.py [--instances 320] [--repeats 5] [--senders 4] [--out bench/results]

Acceptance (issue 17): 1 sender, ours' wall time <= Orthanc's; 4 senders, ours' throughput >= 0.8 x storescp's;
nothing lost anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pynetdicom
from cinesr.bench.machine import git_commit, machine
from cinesr.service.listener import ListenerConfig, start_listener
from cinesr.service.store import InstanceStore
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
ORTHANC_BINARY = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


def make_study(folder: Path, instances: int, rows: int = 256, cols: int = 256, seed: int = 0) -> list[Path]:
    """A synthetic MR study: one series of ``instances`` 16-bit images, Explicit VR LE."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(instances):
        sop = generate_uid()
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientName, ds.PatientID = "Bench^Ingest", "BENCH0001"
        ds.Modality, ds.InstanceNumber, ds.SeriesNumber = "MR", i + 1, 1
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = rng.integers(0, 4096, (rows, cols), dtype=np.uint16).tobytes()
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def split(files: list[Path], folder: Path, senders: int) -> list[Path]:
    """The same files split into ``senders`` folders (hard links), one per storescu."""
    folders = []
    for k in range(senders):
        sub = folder / f"sender{k}"
        sub.mkdir(parents=True)
        for path in files[k::senders]:
            os.link(path, sub / path.name)
        folders.append(sub)
    return folders


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listening on {port}")


def send(port: int, folders: list[Path], called_ae: str) -> float:
    """One storescu per folder, all at once, each one association; wall seconds until the last one exits."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aet", f"BENCH{i}", "-aec", called_ae, "127.0.0.1", str(port),
                               str(folder), "+sd"], env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for i, folder in enumerate(folders)]
    errors = [p.communicate()[1] for p in procs]
    elapsed = time.perf_counter() - t0
    failed = [(p.returncode, e[-300:]) for p, e in zip(procs, errors, strict=True) if p.returncode != 0]
    if failed:
        raise RuntimeError(f"storescu failed: {failed}")
    return elapsed


class Ours:
    """Our listener and store (journal durability), long-running like the service. ``fsync=False`` is a
    diagnostic only (fdatasync disabled): the most that fewer flushes (group commit) could give."""

    def __init__(self, work: Path, max_pdu_size: int, fsync: bool = True) -> None:
        self.name = "ours" if fsync else "ours_no_fsync_DIAGNOSTIC"
        self.root = work / self.name
        self.store = InstanceStore(self.root, min_free_fraction=0.0, min_free_bytes=0)
        self.handle = start_listener(ListenerConfig(port=0, max_pdu_size=max_pdu_size), self.store)
        self.fsync = fsync
        self.visible: list[float] = []

    def run(self, folders: list[Path]) -> float:
        real = os.fdatasync
        if not self.fsync:
            os.fdatasync = lambda fd: None
        try:
            t0 = time.perf_counter()
            elapsed = send(self.handle.port, folders, "CINESR")
            self.store.flush()
            self.visible.append(time.perf_counter() - t0)  # until every .dcm file is renamed into place
        finally:
            os.fdatasync = real
        return elapsed

    def stored(self) -> list[str]:
        return [p.stem for p in (self.root / "instances").rglob("*.dcm")]

    def clear(self) -> None:
        self.store.flush(checkpoint=True)  # untimed: the next run starts with no I/O of ours pending
        for study in self.store.studies():
            self.store.remove_study(study)

    def close(self) -> None:
        self.handle.stop()
        self.store.close()


class Orthanc:
    """Orthanc's C-STORE SCP with its default durability (only ports, folders and the AE title set)."""

    name = "orthanc"

    def __init__(self, work: Path) -> None:
        self.folder = work / "orthanc"
        self.folder.mkdir()
        self.port, http = free_port(), free_port()
        self.url = f"http://127.0.0.1:{http}"
        config = {"Name": "ingest-bench", "StorageDirectory": str(self.folder / "db"),
                  "IndexDirectory": str(self.folder / "db"), "DicomAet": "ORTHANC", "DicomPort": self.port,
                  "HttpPort": http, "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "Plugins": []}
        (self.folder / "orthanc.json").write_text(json.dumps(config))
        self.log = open(self.folder / "orthanc.log", "wb")  # noqa: SIM115 - open for the process's lifetime
        self.proc = subprocess.Popen([ORTHANC_BINARY, str(self.folder / "orthanc.json")], env=DCMTK_ENV,
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=self.folder)
        deadline = time.time() + 60
        while True:
            try:
                self.system = httpx.get(f"{self.url}/system", timeout=2).json()
                break
            except httpx.HTTPError:
                if self.proc.poll() is not None or time.time() > deadline:
                    log = (self.folder / "orthanc.log").read_text()[-800:]
                    raise RuntimeError(f"Orthanc did not start: {log}") from None
                time.sleep(0.1)
        wait_port(self.port)

    def run(self, folders: list[Path]) -> float:
        return send(self.port, folders, "ORTHANC")

    def stored(self) -> list[str]:
        instances = httpx.get(f"{self.url}/instances", params={"expand": ""}, timeout=120).json()
        return [i["MainDicomTags"]["SOPInstanceUID"] for i in instances]

    def clear(self) -> None:
        for study in httpx.get(f"{self.url}/studies", timeout=60).json():
            httpx.delete(f"{self.url}/studies/{study}", timeout=300).raise_for_status()

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class Storescp:
    """dcmtk storescp writing into a folder; no fsync. By default one association at a time (later senders wait
    in the listen backlog); with ``fork`` a process per association."""

    def __init__(self, work: Path, fork: bool = False) -> None:
        self.name = "storescp_fork" if fork else "storescp"
        self.out = work / self.name
        self.out.mkdir()
        self.port = free_port()
        self.proc = subprocess.Popen(["storescp", *(["--fork"] if fork else []), "-od", str(self.out),
                                      str(self.port)], env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def run(self, folders: list[Path]) -> float:
        return send(self.port, folders, "STORESCP")

    def stored(self) -> list[str]:
        time.sleep(0.05)  # forked children may still be closing their last file
        return [str(pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
                for p in self.out.iterdir()]

    def clear(self) -> None:
        for path in self.out.iterdir():
            path.unlink()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True).stdout
    except OSError:
        return "absent"
    for line in out.splitlines():
        if "$dcmtk" in line:
            return line.split("v", 1)[-1].split()[0]
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def flush_probe(folder: Path, n: int = 100, size: int = 131072) -> dict[str, float]:
    """This disk's durable-write latency: pwrite of an instance-sized block + fdatasync (ms)."""
    path = folder / "flush-probe"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, bytes(n * size))
        os.fsync(fd)
        block, samples = os.urandom(size), []
        for i in range(n):
            t0 = time.perf_counter()
            os.pwrite(fd, block, i * size)
            os.fdatasync(fd)
            samples.append(1000 * (time.perf_counter() - t0))
    finally:
        os.close(fd)
        path.unlink()
    samples.sort()
    return {"p10_ms": round(samples[n // 10], 3), "p50_ms": round(samples[n // 2], 3),
            "p90_ms": round(samples[9 * n // 10], 3)}


def _cpu_pressure() -> str:
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return "unavailable"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per sender count")
    parser.add_argument("--senders", type=int, default=4, help="concurrent senders of the second part")
    parser.add_argument("--max-pdu", type=int, default=1 << 20, help="maximum PDU length our listener announces")
    parser.add_argument("--diagnose", action="store_true",
                        help="also time our listener with fdatasync disabled (diagnostic, not a product mode)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--no-write", action="store_true", help="print only, no JSON file")
    parser.add_argument("--suffix", default="", help="appended to the result file name (ingest-<date><suffix>.json)")
    args = parser.parse_args()
    missing = [t for t in ("storescu", "storescp") if shutil.which(t) is None]
    if missing or not Path(ORTHANC_BINARY).is_file():
        print(f"needs dcmtk (storescu, storescp) and Orthanc; missing: {missing or [ORTHANC_BINARY]}", file=sys.stderr)
        return 2
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cinesr-bench-", dir=os.environ.get("BENCH_TMP")) as tmp:
        work = Path(tmp)
        files = make_study(work / "study", args.instances)
        expected = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
        layouts = {1: [work / "study"], args.senders: split(files, work / "split", args.senders)}
        probe_start = flush_probe(work)
        targets = [Ours(work, args.max_pdu), Orthanc(work), Storescp(work), Storescp(work, fork=True)]
        if args.diagnose:
            targets.append(Ours(work, args.max_pdu, fsync=False))
        times: dict[str, dict[str, list[float]]] = {f"{n}_sender{'s' if n > 1 else ''}": {t.name: [] for t in targets}
                                                    for n in layouts}
        checks: dict[str, dict[str, int]] = {}
        try:
            for target in targets:  # warm-up (page cache, first journal segment, SQLite, folders): not timed
                target.run(layouts[1])
                target.clear()
                if isinstance(target, Ours):
                    target.visible.clear()
            for senders, folders in layouts.items():
                key = f"{senders}_sender{'s' if senders > 1 else ''}"
                for _ in range(args.repeats):
                    for target in targets:
                        times[key][target.name].append(target.run(folders))
                        stored = target.stored()
                        check = checks.setdefault(f"{key}/{target.name}", {"runs": 0, "lost": 0, "extra": 0})
                        check["runs"] += 1
                        check["lost"] += len(expected - set(stored))
                        check["extra"] += len(stored) - len(set(stored)) + len(set(stored) - expected)  # duplicates
                        target.clear()
        finally:
            ours_visible = targets[0].visible  # type: ignore[attr-defined]
            orthanc_version = targets[1].system.get("Version", "?")  # type: ignore[attr-defined]
            for target in targets:
                target.close()
        probe_end = flush_probe(work)
    load_end = os.getloadavg()
    med = {key: {name: statistics.median(v) for name, v in runs.items()} for key, runs in times.items()}
    one, many = "1_sender", f"{args.senders}_senders"
    lost_total = sum(c["lost"] + c["extra"] for c in checks.values())
    ratio_one_vs_orthanc = med[one]["orthanc"] / med[one]["ours"]  # > 1: we are faster
    # storescp's better mode (one process, or a process per association) for this layout is the reference
    best = min(("storescp", "storescp_fork"), key=lambda name: med[many][name])
    throughput_many_vs_storescp = med[many][best] / med[many]["ours"]
    paired_many = statistics.median(s / o for s, o in zip(times[many][best], times[many]["ours"], strict=True))
    paired_one = statistics.median(o / u for o, u in zip(times[one]["orthanc"], times[one]["ours"], strict=True))
    criteria = {
        "one_sender_ours_wall_time_at_most_orthancs": med[one]["ours"] <= med[one]["orthanc"],
        "many_senders_ours_throughput_at_least_0.8x_storescp": throughput_many_vs_storescp >= 0.8,
        "nothing_lost": lost_total == 0,
    }
    print(f"{args.instances} MR instances 256x256x16 bit by storescu, median of {args.repeats} interleaved rounds:")
    for key, runs in times.items():
        for name, values in runs.items():
            rate = args.instances / med[key][name]
            print(f"  {key:10s} {name:24s} median {med[key][name]:.3f} s ({rate:6.0f} inst/s)   runs "
                  + " ".join(f"{x:.3f}" for x in values))
    print(f"  1 sender: Orthanc / ours wall time = {ratio_one_vs_orthanc:.2f} (paired median {paired_one:.2f}); "
          f"{args.senders} senders: ours / {best} throughput = {throughput_many_vs_storescp:.2f} "
          f"(paired median {paired_many:.2f})")
    print(f"  nothing lost: {lost_total == 0} {checks}")
    print(f"  disk flush latency (pwrite 128 KiB + fdatasync): start {probe_start}, end {probe_end}; "
          f"load average start {load_start[0]:.1f}, end {load_end[0]:.1f}")
    print(f"  criteria: {criteria}")
    result = {
        "benchmark": "ingest",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "instances": args.instances, "matrix": [256, 256], "bits": 16, "repeats": args.repeats,
        "senders": [1, args.senders],
        "seconds": {k: {n: [round(x, 4) for x in v] for n, v in runs.items()} for k, runs in times.items()},
        "median_seconds": {k: {n: round(v, 4) for n, v in runs.items()} for k, runs in med.items()},
        "ours_visible_seconds": [round(x, 4) for x in ours_visible],  # the 1-sender rounds, then the others
        "one_sender_orthanc_over_ours_wall_time": round(ratio_one_vs_orthanc, 3),
        "one_sender_orthanc_over_ours_paired_median": round(paired_one, 3),
        "many_senders_ours_over_storescp_throughput": round(throughput_many_vs_storescp, 3),
        "many_senders_ours_over_storescp_paired_median": round(paired_many, 3),
        "many_senders_storescp_reference": best,
        "checks": checks, "criteria": criteria, "acceptance_met": all(criteria.values()),
        "notes": "times are storescu wall clock (process start to exit; with several senders, first start to last "
                 "exit), TCP_NODELAY=1 for every dcmtk process including Orthanc. ours: success after fdatasync of "
                 "a write-ahead journal record (one flush per instance, per association); ours_visible: until "
                 "every .dcm file is renamed into place. orthanc: default durability (SyncStorageArea true, "
                 "SQLite index). storescp: no fsync; one association at a time (dcmtk's default); storescp_fork: "
                 "a process per association; the faster of the two is the several-senders reference. The same "
                 "instances for every receiver; the several-senders layout splits them evenly. The machine may be "
                 "shared: see load_average and cpu_pressure_end.",
        "max_pdu_size": args.max_pdu,
        "cpu_pressure_end": _cpu_pressure(),
        "load_average": {"start": load_start, "end": load_end},
        "disk_flush_latency": {"start": probe_start, "end": probe_end},
        "machine": machine(), "git_commit": git_commit(),
        "versions": {"python": platform.python_version(), "pynetdicom": pynetdicom.__version__,
                     "pydicom": pydicom.__version__, "dcmtk": _version(["storescp", "--version"]),
                     "orthanc": orthanc_version},
    }
    if not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"ingest-{datetime.now(timezone.utc):%Y-%m-%d}{args.suffix}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    return 0 if result["acceptance_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
