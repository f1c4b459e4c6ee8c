"""`cinesr demo`: a newcomer's first run through the real service path, on one machine, no setup.

    phantom study (truth + low-resolution acquisition, DICOM)
    -> a local PACS (pynetdicom storage SCP writing to a folder) and `cinesr serve` (listener, gateway,
       embedded worker) on free ports
    -> C-STORE of the low-resolution series to the service; the series assembler queues a job (AUTO_PROCESS)
    -> the worker super-resolves it and C-STOREs the derived series to the local PACS
    -> comparison picture (rows: low-res input, baseline, CineSR, ground truth; columns: time), an animated
       cine GIF, metrics against the ground truth and per-stage end-to-end timings

The CineSR row is whatever the service runs by default (DEFAULT_METHOD: the learned model where it loads),
so the demo follows the service's default without changes here.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from cinesr.bench.machine import git_commit, machine
from cinesr.model.errors import CineSRError
from cinesr.model.folders import atomic_write
from cinesr.worker.queue.lifecycle import JobStatus

from .cli import CLI
from .demo_report import SPATIAL, TEMPORAL, Reference, cine_gif, comparison_picture, make_reference, stack_frames

PACS_AE = "DEMOPACS"
SERVICE_AE = "CINESR"

# report(stage, done, total, note): progress of a stage; total None = indeterminate
Report = Callable[[str, float, float | None, str], None]


class DemoError(CineSRError):
    """The demo could not complete (the message says which step and where the logs are)."""


@dataclass
class DemoOptions:
    out: Path
    slices: int = 2
    frames: int = 32  # ground-truth frames per cycle (the acquisition keeps every 8th)
    size: int = 256  # ground-truth matrix (the acquisition is size / 4: 64, the model grid)
    seed: int = 7
    generator: str = "sax"
    method: str | None = None  # None: the service's default method
    steps: int | None = None  # None: the method's default
    stable_seconds: float = 0.5  # the service's SERIES_STABLE_SECONDS: the demo sends one association at once
    timeout: float = 900.0
    columns: int = 8  # time points in the comparison picture
    overwrite: bool = False  # replace a previous run in `out` (else it is refused)


# What a run writes into its folder: a re-run is refused while any of these exist, unless told to replace
# them (then only these are removed; other files in the folder are left alone).
ARTEFACTS = ("study", "pacs", "service-data", "logs", "comparison.png", "cine.gif", "metrics.json")


def previous_run(out: Path) -> list[str]:
    """The artefacts of an earlier demo run in `out` (empty: none)."""
    return [name for name in ARTEFACTS if (out / name).exists()]


class StageClock:
    """Wall-clock time of each demo stage, from the first report of a stage to the first of the next."""

    def __init__(self, report: Report) -> None:
        self._report = report
        self.start = time.perf_counter()
        self.marks: list[tuple[str, float]] = []

    def __call__(self, stage: str, done: float, total: float | None, note: str = "") -> None:
        if not self.marks or self.marks[-1][0] != stage:
            self.marks.append((stage, time.perf_counter()))
        self._report(stage, done, total, note)

    def seconds(self) -> dict[str, float]:
        """Seconds per stage (in order, labelled as on screen) and the total, up to now."""
        end = time.perf_counter()
        bounds = [t for _, t in self.marks[1:]] + [end]
        stages: dict[str, float] = {}
        starts = [self.start] + [t for _, t in self.marks[1:]]  # set-up before the first report counts to it
        for (stage, _), begun, until in zip(self.marks, starts, bounds, strict=True):
            label = STAGE_LABELS.get(stage, stage)
            stages[label] = round(stages.get(label, 0.0) + until - begun, 3)
        stages["total"] = round(end - self.start, 3)
        return stages


STAGE_LABELS = {"phantom": "make phantom study", "service": "start service + PACS (REST and DICOM up)",
                "push": "C-STORE to service", "wait": "series completion (quiet period)",
                "worker": "queued until the worker has loaded the model", "process": "super-resolve + export",
                "metrics": "picture + metrics (baseline, LPIPS)",
                "stop": "stop service (rest of it, after the metrics)"}


@dataclass
class DemoResult:
    out: Path
    picture: Path
    animation: Path
    metrics_file: Path
    pacs_folder: Path
    study_folder: Path
    logs: Path
    method: str
    metrics: dict[str, dict[str, float]]
    timings: dict[str, float]
    job: dict[str, Any] = field(repr=False)
    stages: dict[str, float] = field(default_factory=dict)  # the whole command, stage by stage, and total
    model_compute: float = 0.0  # seconds of SR compute in the worker


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- the local PACS ------------------------------------------------------------------------------

class DemoPacs:
    """A storage SCP that writes what it receives to folder/<SeriesInstanceUID>/<SOPInstanceUID>.dcm."""

    def __init__(self, folder: Path, ae_title: str = PACS_AE) -> None:
        self.folder = Path(folder)
        self.ae_title = ae_title
        self.port = 0
        self.received: dict[str, int] = {}
        self.last_received: dict[str, float] = {}  # series -> wall-clock time of its latest instance
        self._lock = threading.Lock()
        self._server: Any = None

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        series = str(ds.SeriesInstanceUID)
        folder = self.folder / series
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(folder / f"{ds.SOPInstanceUID}.dcm") as tmp:
            tmp.write_bytes(event.encoded_dataset())
        with self._lock:
            self.received[series] = len(list(folder.glob("*.dcm")))
            self.last_received[series] = time.time()
        return 0x0000

    def start(self) -> DemoPacs:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.ae_title)
        # every transfer syntax, compressed ones too: the derived series is JPEG 2000 lossless, and a PACS
        # that accepts it is sent the files as they are (no decompression, no "no presentation context" log)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.maximum_associations = 4
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def count(self, series_uid: str) -> int:
        with self._lock:
            return self.received.get(series_uid, 0)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


# ---- the service ---------------------------------------------------------------------------------

class ServiceProcess:
    """`cinesr serve` as a subprocess with demo settings (the same command a user runs)."""

    def __init__(self, data_dir: Path, pacs: DemoPacs, log: Path, stable_seconds: float,
                 method: str | None = None) -> None:
        self.data_dir = data_dir
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.token = secrets.token_urlsafe(24)
        self.heartbeat = data_dir / "worker-heartbeat"
        self.log = log
        self.env = {
            **os.environ,
            "CINESR_DATA_DIR": str(data_dir), "CINESR_DICOM_PORT": str(self.dicom_port),
            "CINESR_HTTP_PORT": str(self.http_port), "CINESR_AE_TITLE": SERVICE_AE,
            "CINESR_BROKER_URL": "", "CINESR_API_TOKENS": self.token, "CINESR_AUTO_PROCESS": "true",
            "CINESR_PACS_AE_TITLE": pacs.ae_title, "CINESR_PACS_HOST": "127.0.0.1",
            "CINESR_PACS_PORT": str(pacs.port), "CINESR_SERIES_STABLE_SECONDS": str(stable_seconds),
            "CINESR_HEARTBEAT_FILE": str(self.heartbeat), "CINESR_ALLOWED_CALLING_AETS": "",
        }
        if method:  # else the service's own default (DEFAULT_METHOD)
            self.env["CINESR_DEFAULT_METHOD"] = method
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> ServiceProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen([*CLI, "--log-level", "INFO", "serve", "--host", "127.0.0.1"],
                                            env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def get(self, path: str, **params: Any) -> Any:
        import httpx

        response = httpx.get(f"{self.url}{path}", params=params, timeout=10,
                             headers={"Authorization": f"Bearer {self.token}"})
        response.raise_for_status()
        return response.json()

    def healthy(self) -> bool:
        import httpx

        try:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, timeout: float = 30) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def push_series(files: list[Path], port: int, called_ae: str = SERVICE_AE, calling_ae: str = "DEMO-SCANNER") -> int:
    """C-STORE the files on one association (the worker's own SCU); returns how many were stored with Success."""
    from cinesr.worker.errors import PacsUnavailable
    from cinesr.worker.network.pacs import DicomNode, store_files

    try:
        outcome = store_files(DicomNode(called_ae, "127.0.0.1", port), files, calling_ae, batch_size=len(files))
    except PacsUnavailable as exc:
        raise DemoError(f"the service did not accept an association on port {port}: {exc}") from exc
    return len(outcome.acknowledged)


# ---- the run -------------------------------------------------------------------------------------

def _wait(predicate: Callable[[], Any], timeout: float, what: str, logs: Path,
          alive: Callable[[], bool] | None = None, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if alive is not None and not alive():
            raise DemoError(f"the service stopped while {what}; see {logs}")
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:.0f} s {what}; see {logs}")
        time.sleep(every)


def _parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def run_demo(options: DemoOptions, report: Report | None = None) -> DemoResult:
    """Run the whole demo; files go under options.out. Raises DemoError with the step and the logs."""
    from concurrent.futures import Future, ThreadPoolExecutor

    from cinesr.model.acquisition import write_phantom
    from cinesr.model.cine import read_series
    from cinesr.model.phantom import make_study

    clock = StageClock(report or (lambda stage, done, total, note="": None))
    report = clock
    if options.frames % TEMPORAL or options.size % SPATIAL:
        raise DemoError(f"--frames must be a multiple of {TEMPORAL} and --size of {SPATIAL}")
    out = Path(options.out).resolve()
    if out.exists() and not out.is_dir():
        raise DemoError(f"{out} is a file, not a folder")
    previous = previous_run(out)
    if previous and not options.overwrite:
        raise DemoError(f"{out} holds a previous demo run ({', '.join(previous)}); pass --overwrite to replace "
                        f"it, or choose another --out")
    for name in previous:  # --overwrite: only what a run writes, so no earlier job answers for this one
        import shutil

        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    pacs = DemoPacs(out / "pacs").start()
    background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="demo-reference")
    service = ServiceProcess(out / "service-data", pacs, logs / "serve.log", options.stable_seconds,
                             options.method)
    worker_log = out / "service-data" / "logs" / "worker.log"
    try:
        # The service starts first: its imports and the worker's model loading run while this process makes
        # the phantom study and the reference (they overlap instead of adding up).
        report("service", 0, 1, "starting cinesr serve")
        service.start()
        # The worker's start-up (Celery, torch, the model: seconds) is the longest chain before the job can
        # run, so the phantom waits the half-second until `serve` has spawned it instead of slowing that down.
        _wait(worker_log.exists, 60, "starting (embedded worker)", logs / "serve.log", service.alive, every=0.02)
        report("phantom", 0, 1, "synthetic short-axis cine")
        study = make_study(options.seed, slices=options.slices, frames=options.frames, size=options.size,
                           generator=options.generator)
        # the acquisition first (it is what the scanner sends); the ground truth is written after the push
        (lowres_series,) = write_phantom(study, out / "study", seed=options.seed, truth=False, lowres=True)
        report("phantom", 1, 1, f"{len(lowres_series.files)} low-res instances")

        # The truth, the baseline and its scores do not depend on the service's output: they are made here
        # while the service waits out the quiet period and the worker loads its model.
        def truth_and_reference() -> Reference:
            import torch

            # one thread: the worker is still loading its model, and that is what the job waits for
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                (truth_series,) = write_phantom(study, out / "study", seed=options.seed, truth=True,
                                                lowres=False)
                if truth_series.study_uid != lowres_series.study_uid:
                    raise DemoError("the phantom's truth and acquisition were written as different studies")
                return make_reference(truth_series.folder, lowres_series.folder)
            finally:
                torch.set_num_threads(threads)

        reference: Future[Reference] = background.submit(truth_and_reference)

        report("service", 0, 1, "starting cinesr serve")
        _wait(service.healthy, 120, "starting (REST)", logs / "serve.log", service.alive)
        report("service", 1, 1, f"DICOM :{service.dicom_port}, REST {service.url}")

        # The push does not wait for the worker: as from a scanner, the series is stored and queued while the
        # worker still loads its model, and the job waits in the queue for it (the "worker" stage below).
        report("push", 0, len(lowres_series.files), "C-STORE to the service")
        stored = push_series(lowres_series.files, service.dicom_port)
        pushed_at = time.time()
        if stored != len(lowres_series.files):
            raise DemoError(f"the service stored {stored} of {len(lowres_series.files)} instances; see {logs}")
        report("push", stored, len(lowres_series.files), "stored")

        report("wait", 0, None, f"series complete after {options.stable_seconds:g} s quiet")

        def find_job() -> dict[str, Any] | None:
            jobs = service.get("/jobs", study_uid=lowres_series.study_uid)["jobs"]
            return jobs[0] if jobs else None

        job = _wait(find_job, options.stable_seconds + 120, "waiting for the job", logs / "serve.log", service.alive,
                    every=0.1)
        job_id = job["job_id"]
        report("worker", 0, None, "the job waits for the worker to load its model")

        engine_failure = LogWatch(worker_log, "engine not loaded")

        def finished() -> dict[str, Any] | None:
            current = service.get(f"/jobs/{job_id}")
            if current["status"] == JobStatus.QUEUED:
                if engine_failure.seen():
                    raise DemoError(f"the worker could not load its engine; see {worker_log}")
                return None
            report("process", current["progress"], 1.0, current["status"])
            return current if current["status"] in (JobStatus.SUCCEEDED, JobStatus.FAILED) else None

        job = _wait(finished, options.timeout, "processing", worker_log, service.alive, every=0.25)
        if job["status"] != JobStatus.SUCCEEDED:
            raise DemoError(f"the job failed: {job['error']}; see {worker_log}")
        entry = job["series"][0]
        output_uid = entry["output_series_uid"]
        total = entry["instances_total"]
        _wait(lambda: pacs.count(output_uid) >= total, 60, "waiting for the PACS", worker_log)
        stored_at = pacs.last_received[output_uid]
        report("process", 1.0, 1.0, "derived series stored in the PACS")
    except BaseException:
        service.stop()
        pacs.stop()
        background.shutdown(wait=True, cancel_futures=True)
        raise
    # Done with the service: its graceful stop (the worker's warm shutdown takes seconds) runs while the
    # pictures and metrics are made here, instead of before them.
    stopper = threading.Thread(target=lambda: (service.stop(), pacs.stop()), name="demo-stop", daemon=True)
    stopper.start()

    report("metrics", 0, 3, "reading the derived series")
    derived_cine = read_series(out / "pacs" / output_uid)[0]
    report("metrics", 1, 3, "baseline (made while the service worked)")
    ref = reference.result()
    background.shutdown()
    truth, lowres, baseline = ref.truth, ref.lowres, ref.baseline
    cinesr = stack_frames(derived_cine) / ref.scale
    method = str(derived_cine.header.get("DerivationDescription", "") or "CineSR")
    if cinesr.shape != truth.shape:
        raise DemoError(f"derived series shape {cinesr.shape} differs from the ground truth {truth.shape}")
    report("metrics", 2, 3, "PSNR / SSIM / LPIPS")
    metrics = {"baseline": ref.baseline_metrics, "cinesr": ref.scorer.score(cinesr)}

    # picture and animation of the middle slice
    s = truth.shape[0] // 2
    n = truth.shape[1]
    held = np.repeat(np.repeat(np.repeat(lowres[s], TEMPORAL, axis=0), SPATIAL, axis=1), SPATIAL, axis=2)
    times = sorted({int(round(k * n / options.columns)) % n for k in range(options.columns)})
    rr = float(study.rr_interval_ms)
    labels = [f"{t * rr / n:.0f} ms" for t in times]
    rows = [("Low-res input\n(acquired frames)", held), ("Baseline\n(flow + bicubic)", baseline[s]),
            (f"CineSR\n({short_method(method)})", cinesr[s]), ("Ground truth", truth[s])]
    picture = comparison_picture(rows, times, out / "comparison.png", labels)
    animation = cine_gif([("low-res", held), ("baseline", baseline[s]), ("CineSR", cinesr[s]), ("truth", truth[s])],
                         out / "cine.gif", rr / n)
    report("metrics", 3, 3, "done")
    report("stop", 0, 1, "stopping the service")
    stopper.join()
    report("stop", 1, 1, "stopped")

    timings = _timings(job, pushed_at, stored_at)
    stages = clock.seconds()
    compute = float((job["series"][0].get("timings") or {}).get("compute", 0.0))
    metrics_file = out / "metrics.json"
    result = DemoResult(out=out, picture=picture, animation=animation, metrics_file=metrics_file,
                        pacs_folder=out / "pacs" / output_uid, study_folder=out / "study", logs=logs,
                        method=method, metrics=metrics, timings=timings, job=job, stages=stages,
                        model_compute=compute)
    metrics_file.write_text(json.dumps({
        "method": method, "metrics": metrics, "timings_seconds": timings,
        # the whole command, stage by stage (wall clock, this machine), and how much of it was model compute
        "demo_stages_seconds": stages, "model_compute_seconds": round(compute, 3),
        "outside_model_compute_seconds": round(stages["total"] - compute, 3),
        "machine": machine(), "commit": git_commit(short=True), "job": job,
        "study": {"slices": options.slices, "frames": options.frames, "size": options.size, "seed": options.seed},
        "files": {k: str(v) for k, v in asdict(result).items() if isinstance(v, Path)},
    }, indent=2, default=str))
    return result


class LogWatch:
    """Whether a growing log file has shown a line with `needle`; each look reads only what was appended."""

    def __init__(self, path: Path, needle: str) -> None:
        self.path, self.needle = path, needle.encode()
        self.offset, self.carry = 0, b""

    def seen(self) -> bool:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return False
        self.offset += len(chunk)
        text = self.carry + chunk
        self.carry = text[-len(self.needle):]  # a needle split across two looks is still found
        return self.needle in text


def short_method(description: str) -> str:
    """'model tiny-49ce093c983d' out of a DerivationDescription '... by model tiny-49ce093c983d (params)'."""
    text = description.split(" by ", 1)[-1].split(" (", 1)[0].strip()
    return text or description[:30]


def _timings(job: dict[str, Any], pushed_at: float, stored_at: float) -> dict[str, float]:
    """Stages from the last instance received to the derived series stored in the PACS (seconds)."""
    created = _parse_time(str(job["created_at"]))
    stages = job["series"][0].get("timings") or job.get("timings") or {}
    timings = {"series completion (quiet period + routing)": max(0.0, created - pushed_at)}
    names = {"queue": "queue (waiting for the worker)", "load": "load series", "compute": "compute (SR method)",
             "write": "write derived DICOM", "export": "export (C-STORE to PACS)"}
    for key, label in names.items():
        if key in stages:
            timings[label] = float(stages[key])
    total = max(0.0, stored_at - pushed_at)
    timings["other (bookkeeping, polling)"] = max(0.0, total - sum(timings.values()))
    timings["end to end: last instance received -> derived series stored in PACS"] = total
    return {k: round(v, 3) for k, v in timings.items()}
