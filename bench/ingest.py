"""Ingest benchmark: our DICOM listener (durable writes) against dcmtk storescp, side by side.

Generates a study of 300 MR instances (256x256, 16 bit) with pydicom into a temporary folder and
sends it with dcmtk ``storescu`` to

  (a) the CineSR listener (journal durability: fdatasync before every success status),
  (b) the CineSR listener with per-file durability (fsync + directory fsync per instance),
  (c) dcmtk ``storescp`` (no fsync),

repetitions interleaved, each into an empty folder, every dcmtk process with TCP_NODELAY=1 (dcmtk
leaves Nagle's algorithm on otherwise). Then 4 storescu senders at once (each its own study) to our
listener, checking that every instance arrives, once. Prints a table and writes
bench/results/ingest-<date>.json with the machine, git commit and versions.

    .venv/bin/python bench/ingest.py [--instances 300] [--repeats 7] [--out bench/results]
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

import numpy as np
import pydicom
import pynetdicom
from cinesr.service.listener import ListenerConfig, start_listener
from cinesr.service.store import InstanceStore
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def send(port: int, folder: Path, aet: str = "BENCH") -> float:
    """storescu the whole folder over one association; return wall seconds."""
    t0 = time.perf_counter()
    result = subprocess.run(["storescu", "-aet", aet, "-aec", "CINESR", "127.0.0.1", str(port), str(folder),
                             "+sd"], env=DCMTK_ENV, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed: {result.stderr[-500:]}")
    return elapsed


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listening on {port}")


class StorescpTarget:
    """A long-running dcmtk storescp (TCP_NODELAY=1) writing into a folder emptied between runs."""

    def __init__(self, work: Path) -> None:
        self.out = work / "storescp"
        self.out.mkdir()
        self.port = free_port()
        self.proc = subprocess.Popen(["storescp", "-od", str(self.out), str(self.port)], env=DCMTK_ENV,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def run(self, study: Path) -> tuple[float, float]:
        elapsed = send(self.port, study)
        count = len(list(self.out.iterdir()))
        if count != len(list(study.iterdir())):
            raise RuntimeError(f"storescp stored {count} files")
        for f in self.out.iterdir():
            f.unlink()
        return elapsed, elapsed

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


class OurTarget:
    """Our listener and store, long-running like the service; the study is removed between runs."""

    def __init__(self, work: Path, durability: str, max_pdu_size: int, fsync: bool = True) -> None:
        self.root = work / f"ours-{durability}-{max_pdu_size}-{fsync}"
        self.store = InstanceStore(self.root, durability=durability, min_free_fraction=0.0, min_free_bytes=0)
        self.handle = start_listener(ListenerConfig(port=0, max_pdu_size=max_pdu_size), self.store)
        self.fsync = fsync

    def run(self, study: Path) -> tuple[float, float]:
        """Seconds until storescu finished, and until every file is visible in the store."""
        real = os.fdatasync
        if not self.fsync:  # diagnostic only: what the protocol path costs without the flushes
            os.fdatasync = lambda fd: None
        try:
            t0 = time.perf_counter()
            elapsed = send(self.handle.port, study)
            self.store.flush()
            visible = time.perf_counter() - t0
        finally:
            os.fdatasync = real
        self.store.flush(checkpoint=True)  # untimed: the next run starts with no I/O of ours pending
        studies = self.store.studies()
        count = sum(len(self.store.instances(st, se)) for st in studies for se in self.store.series(st))
        if count != len(list(study.iterdir())):
            raise RuntimeError(f"our listener stored {count} files")
        for st in studies:
            self.store.remove_study(st)
        return elapsed, visible

    def close(self) -> None:
        self.handle.stop()
        self.store.close()


def run_concurrent(work: Path, senders: int, per_sender: int) -> dict[str, object]:
    studies = [make_study(work / f"concurrent-{i}", per_sender, seed=i + 1) for i in range(senders)]
    root = work / "ours-concurrent"
    store = InstanceStore(root, min_free_fraction=0.0, min_free_bytes=0)
    handle = start_listener(ListenerConfig(port=0), store)
    try:
        t0 = time.perf_counter()
        procs = [subprocess.Popen(["storescu", "-aet", f"SENDER{i}", "-aec", "CINESR", "127.0.0.1",
                                   str(handle.port), str(paths[0].parent), "+sd"], env=DCMTK_ENV,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for i, paths in enumerate(studies)]
        codes = [p.wait() for p in procs]
        elapsed = time.perf_counter() - t0
        store.flush()
    finally:
        handle.stop()
        store.close()
    expected = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for paths in studies for p in paths}
    stored = [p.stem for p in (root / "instances").rglob("*.dcm")]
    ok = all(c == 0 for c in codes) and set(stored) == expected and len(stored) == len(expected)
    return {"senders": senders, "instances": len(expected), "stored": len(stored),
            "unique_stored": len(set(stored)), "storescu_exit_codes": codes, "seconds": round(elapsed, 4),
            "lost": len(expected - set(stored)), "ok": ok}


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True).stdout
    except OSError:
        return "absent"
    for line in out.splitlines():
        if "$dcmtk" in line:
            return line.split("v", 1)[-1].split()[0]
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def machine() -> dict[str, object]:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "platform": platform.platform(),
            "load_average_at_start": os.getloadavg()}


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


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--max-pdu", type=int, default=1 << 20, help="maximum PDU length our listener announces")
    parser.add_argument("--diagnose", action="store_true",
                        help="also time our listener with fdatasync disabled (diagnostic, not a product mode)")
    parser.add_argument("--concurrent-senders", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--no-write", action="store_true", help="print only, no JSON file")
    parser.add_argument("--suffix", default="", help="appended to the result file name (ingest-<date><suffix>.json)")
    args = parser.parse_args()
    if shutil.which("storescu") is None or shutil.which("storescp") is None:
        print("dcmtk (storescu, storescp) is not installed", file=sys.stderr)
        return 2
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cinesr-bench-", dir=os.environ.get("BENCH_TMP")) as tmp:
        work = Path(tmp)
        study = work / "study"
        make_study(study, args.instances)
        probe_start = flush_probe(work)
        targets = {
            "ours_journal": OurTarget(work, "journal", args.max_pdu),
            "ours_file": OurTarget(work, "file", args.max_pdu),
            "storescp": StorescpTarget(work),
        }
        if args.diagnose:
            targets["ours_journal_no_fsync_DIAGNOSTIC"] = OurTarget(work, "journal", args.max_pdu, fsync=False)
        times: dict[str, list[float]] = {name: [] for name in targets}
        times["ours_journal_visible"] = []
        try:
            for target in targets.values():  # warm-up: page cache, first segment and folder creation
                target.run(study)
            for _ in range(args.repeats):  # interleaved so that load changes hit all alike
                for name, target in targets.items():
                    elapsed, visible = target.run(study)
                    times[name].append(elapsed)
                    if name == "ours_journal":
                        times["ours_journal_visible"].append(visible)
        finally:
            for target in targets.values():
                target.close()
        concurrent = run_concurrent(work, args.concurrent_senders, args.instances // args.concurrent_senders)
        probe_end = flush_probe(work)
    load_end = os.getloadavg()
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["storescp"] / med["ours_journal"]  # throughput ratio ours / storescp
    ratio_file = med["storescp"] / med["ours_file"]
    # interleaved runs pair up: the median of per-round ratios resists load drifting over the run
    paired = statistics.median(s / o for s, o in zip(times["storescp"], times["ours_journal"], strict=True))
    print(f"{args.instances} MR instances 256x256x16 bit, storescu -> receiver, median of {args.repeats}:")
    for k, v in times.items():
        print(f"  {k:22s} median {med[k]:.3f} s   runs {' '.join(f'{x:.3f}' for x in v)}")
    print(f"  throughput ratio ours(journal)/storescp = {ratio:.2f} (median of per-round ratios {paired:.2f})"
          f"   ours(file)/storescp = {ratio_file:.2f}")
    print(f"  {args.concurrent_senders} concurrent senders: {concurrent}")
    flush_ms = (probe_start["p50_ms"] + probe_end["p50_ms"]) / 2
    floor = None
    if "ours_journal_no_fsync_DIAGNOSTIC" in med:
        # one flush per instance is on the critical path of a synchronous sender
        floor = med["ours_journal_no_fsync_DIAGNOSTIC"] + args.instances * flush_ms / 1000
        print(f"  model (an upper bound: streaming starts writeback early): ours(no fsync) + "
              f"{args.instances} x flush p50 = {floor:.3f} s (measured {med['ours_journal']:.3f} s)")
    print(f"  disk flush latency (pwrite 128 KiB + fdatasync): start {probe_start}, end {probe_end}; "
          f"load average start {load_start[0]:.1f}, end {load_end[0]:.1f}")
    result = {
        "benchmark": "ingest",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "instances": args.instances, "matrix": [256, 256], "bits": 16, "repeats": args.repeats,
        "seconds": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "median_seconds": {k: round(v, 4) for k, v in med.items()},
        "throughput_ratio_ours_vs_storescp": round(ratio, 3),
        "throughput_ratio_ours_vs_storescp_paired_median": round(paired, 3),
        "throughput_ratio_ours_file_durability_vs_storescp": round(ratio_file, 3),
        "acceptance_ratio_min": 0.8, "acceptance_met": ratio >= 0.8 and bool(concurrent["ok"]),
        "concurrent": concurrent,
        "notes": "times are storescu wall clock (process start to exit, one association) with TCP_NODELAY=1; "
                 "ours_journal: success after fdatasync of a write-ahead journal record; "
                 "ours_journal_visible: until every .dcm file is renamed into place; "
                 "ours_file: success after fdatasync + rename + directory fsync per instance; "
                 "storescp does not fsync. Receivers are long-running; the study is deleted between runs. "
                 "The machine is shared: see load_average.",
        "max_pdu_size": args.max_pdu,
        "cpu_pressure_end": _cpu_pressure(),
        "load_average": {"start": load_start, "end": load_end},
        "disk_flush_latency": {"start": probe_start, "end": probe_end},
        "model_seconds_no_fsync_plus_flush_per_instance": round(floor, 4) if floor is not None else None,
        "machine": machine(), "git_commit": git_commit(),
        "versions": {"python": platform.python_version(), "pynetdicom": pynetdicom.__version__,
                     "pydicom": pydicom.__version__, "dcmtk": _version(["storescp", "--version"])},
    }
    if not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"ingest-{datetime.now(timezone.utc):%Y-%m-%d}{args.suffix}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    return 0 if result["acceptance_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
