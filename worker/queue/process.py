"""The task bodies: process one series of a job, export one derived series. Plain functions, no Celery.

Both are idempotent. process_series writes the derived series with UIDs derived from the input UIDs, the
method and its parameters, so a re-run after a crash replaces the same folder with the same UIDs.
export_series skips instances the destination already acknowledged, so a retry resends only the rest.

Where things are: inputs DATA_DIR/instances/<study>/<series>/, outputs
DATA_DIR/outputs/<job_id>/<derived SeriesInstanceUID>/.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
from cinesr.model.bundle_meta import DEFAULT_BUNDLE, MODEL_JSON, read_meta
from cinesr.model.errors import CineSRError
from cinesr.worker.eligibility import read_cine
from cinesr.worker.errors import ExportFailed, JobCancelled, NotConfigured, PacsUnavailable, PermanentError
from cinesr.worker.inference.derived import Derivation, write_derived_series
from cinesr.worker.network.pacs import StoreOutcome, destination_node, store_files
from cinesr.worker.queue.jobs import Job, JobStore, open_job_store
from cinesr.worker.queue.lifecycle import SeriesStatus, Step, is_done
from cinesr.worker.settings import WorkerSettings

LOGGER = logging.getLogger(__name__)

COMPUTE_SHARE = 0.8  # share of a series' progress for computing; the rest is the export
METHODS = ("model", "baseline")


def instances_dir(settings: WorkerSettings, study_uid: str, series_uid: str) -> Path:
    return Path(settings.data_dir) / "instances" / study_uid / series_uid


def outputs_dir(settings: WorkerSettings, job_id: str) -> Path:
    return Path(settings.data_dir) / "outputs" / job_id


# ---- methods ------------------------------------------------------------------------------------

_METHOD_CACHE: dict[tuple[Any, ...], Any] = {}
_METHOD_LOCK = threading.Lock()


def model_available() -> bool:
    """Whether the learned method's code is installed (the model itself may still fail to load)."""
    # Found, not imported: importing them loads torch (seconds, hundreds of MB) into whichever process asks,
    # the REST gateway included; the worker that runs the model reports a broken install when it loads it.
    try:
        return all(importlib.util.find_spec(name) is not None
                   for name in ("torch", "cinesr.worker.inference.modelsr", "cinesr.worker.inference.engines"))
    except (ImportError, ValueError):  # a parent package that fails to import, or one blocked in sys.modules
        return False


def trained_model_available(model_dir: object = None) -> bool:
    """Whether a trained model bundle is there: MODEL_DIR when set, else the bundle shipped in the package.

    Without one the model method would run untrained weights, so 'auto' falls back to the baseline.
    """

    folder = Path(str(model_dir)) if model_dir else DEFAULT_BUNDLE
    return model_available() and (folder / MODEL_JSON).is_file()


def resolve_method_name(requested: str | None, settings: WorkerSettings) -> str:
    """'model' or 'baseline' for a job's params.method (None: the DEFAULT_METHOD setting; auto: the model when
    its code and a trained bundle are installed, else the baseline)."""
    name = requested or getattr(settings, "default_method", "auto") or "auto"
    if name == "auto":
        return "model" if trained_model_available(settings.model_dir) else "baseline"
    if name not in METHODS:
        raise PermanentError(f"unknown method {name!r} (available: {', '.join(METHODS)})")
    return name


def supported_steps(model_dir: object = None) -> tuple[int, ...]:
    """The sampler step counts a bundle serves as trained, from its model.json (no weights loaded): the
    teacher's full chain T and the counts its distilled student learned (model.json `distilled`)."""

    doc = read_meta(Path(str(model_dir)) if model_dir else DEFAULT_BUNDLE)
    full = int(((doc.get("config") or {}).get("diffusion") or {}).get("steps") or 15)
    has_student = "student" in (doc.get("weights") or {})
    student = (doc.get("distilled") or {}).get("steps", ()) if has_student else ()
    return tuple(sorted({full, *(int(s) for s in student)}))


def check_steps(steps: int | None, settings: WorkerSettings, what: str = "steps") -> None:
    """Raise PermanentError (with the reason) unless the model bundle serves `steps` (None: its default)."""
    if steps is None:
        return
    try:
        supported = supported_steps(settings.model_dir)
    except CineSRError as exc:
        raise PermanentError(f"the model bundle cannot be read: {exc}") from exc
    if steps not in supported:
        student = "" if len(supported) > 1 else " (it has no distilled few-step student)"
        raise PermanentError(f"{what}={steps} is not supported by this model bundle{student}: "
                             f"use one of {', '.join(map(str, supported))}")


def uncertainty_draws(job: Job, settings: WorkerSettings) -> int:
    """Draws of the job's uncertainty series (0: none): the request's, else the UNCERTAINTY_DRAWS setting."""
    return job.params.uncertainty if job.params.uncertainty is not None else int(settings.uncertainty_draws)


def engine_options(settings: WorkerSettings) -> dict[str, dict[str, object]]:
    """Per-backend engine options from the settings: TensorRT keeps its plans in ENGINE_CACHE (a volume on a
    GPU node, so that a restarted worker does not rebuild them for minutes)."""
    return {"tensorrt": {"cache_dir": settings.engine_cache}} if settings.engine_cache else {}


def make_method(name: str | None, steps: int | None, settings: WorkerSettings) -> Any:
    """The SR method object (cinesr.worker.inference.pipeline.Method) for a job; the model engine is loaded once per
    process and reused (keyed by bundle, backend and steps). steps None: the STEPS setting, else the bundle's."""
    # the inference stack (torch) is imported when a series is processed: the gateway imports this module for
    # the in-process dispatcher and must start without torch
    from cinesr.worker.inference.pipeline import BaselineMethod

    resolved = resolve_method_name(name, settings)
    if resolved == "baseline":
        return BaselineMethod()
    if steps is None and settings.steps is not None:
        check_steps(settings.steps, settings, "the STEPS setting: steps")
        steps = settings.steps
    key = ("model", str(settings.model_dir or ""), settings.backend, steps, settings.consistency)
    with _METHOD_LOCK:
        if key not in _METHOD_CACHE:
            try:
                from cinesr.worker.inference.engines.select import create_engine
                from cinesr.worker.inference.modelsr import ModelMethod

                engine = create_engine(settings.backend, "auto", settings.model_dir, engine_options(settings))
                _METHOD_CACHE[key] = ModelMethod.configured(engine, steps=steps,
                                                                consistency=settings.consistency)
            except ImportError as exc:
                raise PermanentError(f"the model method is not installed: {exc}") from exc
            except (ValueError, RuntimeError, OSError) as exc:  # EngineUnavailable is a RuntimeError
                raise PermanentError(f"the model could not be loaded: {exc}") from exc
        return _METHOD_CACHE[key]


# ---- processing ---------------------------------------------------------------------------------

def _progress_writer(jobs: JobStore, job_id: str, series_uid: str, interval: float = 0.5,
                     cancel_check: float = 0.1) -> Any:
    """A pipeline progress callback writing at most every `interval` seconds to the job record; it raises
    JobCancelled once the series is cancelled (looked up at most every `cancel_check` seconds: the model calls
    it after each sampler step of a batch, so a cancel stops the series within one window's time)."""
    last = [0.0, 0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= interval or done >= total:
            last[0] = last[1] = now
            job = jobs.update_series(job_id, series_uid, progress=round(COMPUTE_SHARE * 0.9 * done / max(total, 1),
                                                                        4))
        elif now - last[1] >= cancel_check:
            last[1] = now
            job = jobs.get(job_id)
        else:
            return
        if job.entry(series_uid).status == SeriesStatus.CANCELLED:
            raise JobCancelled(f"series {series_uid} of job {job_id} cancelled at {done}/{total} units")
    return report


def _cancelled(jobs: JobStore, job_id: str, series_uid: str) -> bool:
    return jobs.get(job_id).entry(series_uid).status == SeriesStatus.CANCELLED


def process_series(job_id: str, series_uid: str, settings: WorkerSettings) -> None:
    """Super-resolve one series of a job into DATA_DIR/outputs/<job_id>/ and record the result.

    Raises SeriesNotEligible / PermanentError for inputs that cannot work (recorded in the job first);
    anything else propagates for the task runner (the job keeps the series `running` until retried).
    """
    from cinesr.worker.inference.pipeline import (  # torch: see make_method
        fidelity_warning,
        superresolve_series,
        supports_draws,
    )

    jobs = open_job_store(settings)
    try:
        job = jobs.get(job_id)
        entry = job.entry(series_uid)
        if entry.status == SeriesStatus.CANCELLED:
            LOGGER.info("series %s of job %s was cancelled; not processed", series_uid, job_id)
            return
        done = [u for u in (entry.output_series_uid, entry.uncertainty_series_uid) if u]
        if entry.output_series_uid and is_done(Step.SUPERRESOLVE, entry) and \
                all((outputs_dir(settings, job_id) / u).is_dir() for u in done):
            LOGGER.info("series %s of job %s already processed", series_uid, job_id)
            return
        jobs.update_series(job_id, series_uid, status=SeriesStatus.RUNNING, progress=0.0, error=None)
        try:
            folder = instances_dir(settings, job.study_uid, series_uid)
            t0 = time.perf_counter()
            series = read_cine(sorted(folder.glob("*.dcm")) if folder.is_dir() else [], series_uid)
            jobs.add_timing(job_id, "load", time.perf_counter() - t0, series_uid)
            method = make_method(job.params.method, job.params.steps, settings)
            draws = uncertainty_draws(job, settings)
            notes = []
            if draws and not supports_draws(method):
                notes.append(f"no uncertainty series: the {method.name} method is deterministic")
                draws = 0
            result = superresolve_series(series, method, _progress_writer(jobs, job_id, series_uid), draws)
            jobs.add_timing(job_id, "compute", result.timings["compute"], series_uid)
            warning = fidelity_warning(result, settings.fidelity_floor_db)
            for note in [warning, *notes]:
                if note:
                    LOGGER.warning("job %s: series %s: %s", job_id, series_uid, note)
            jobs.update_series(job_id, series_uid, fidelity_db=result.fidelity_db, consistency=result.consistency,
                               warnings=[n for n in [warning, *notes] if n])
            t0 = time.perf_counter()
            derivation = Derivation(method.name, method.version, method.parameters())
            derived = write_derived_series(series, result.frames, outputs_dir(settings, job_id), derivation,
                                           transfer_syntax=settings.output_transfer_syntax, image_comments=warning)
            spread = None
            if result.uncertainty is not None:
                spread = write_derived_series(series, result.uncertainty, outputs_dir(settings, job_id),
                                              derivation.uncertainty_of(result.draws),
                                              transfer_syntax=settings.output_transfer_syntax,
                                              image_comments=warning)
            jobs.add_timing(job_id, "write", time.perf_counter() - t0, series_uid)
            if _cancelled(jobs, job_id, series_uid):  # cancelled while writing: keep nothing of it

                shutil.rmtree(derived.folder, ignore_errors=True)
                raise JobCancelled(f"series {series_uid} of job {job_id} cancelled while being written")
        except JobCancelled as exc:
            LOGGER.info("job %s: %s", job_id, exc)
            return
        except PermanentError as exc:
            jobs.update_series(job_id, series_uid, status=SeriesStatus.FAILED, error=str(exc))
            raise
        jobs.update_series(job_id, series_uid, status=SeriesStatus.PROCESSED, output_series_uid=derived.series_uid,
                           uncertainty_series_uid=spread.series_uid if spread else None,
                           instances_total=len(derived.files) + (len(spread.files) if spread else 0),
                           instances_sent=0, acknowledged=[], export_failures={}, progress=COMPUTE_SHARE)
        LOGGER.info("job %s: series %s -> %s (%d instances)%s", job_id, series_uid, derived.series_uid,
                    len(derived.files), f", uncertainty {spread.series_uid}" if spread else "")
    finally:
        jobs.close()


# ---- export -------------------------------------------------------------------------------------

def _sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)


def export_series(job_id: str, series_uid: str, settings: WorkerSettings, sleep: Any = time.sleep) -> None:
    """Send the derived series of one job series (and its uncertainty series, when there is one) to its
    destination (the PACS unless the job names one), by C-STORE or STOW-RS.

    Instances already acknowledged are skipped. Unreachable destination or refused instances are retried
    EXPORT_RETRIES times with exponential backoff from EXPORT_BACKOFF_SECONDS; if some are still not stored
    the series is marked failed with the reason and ExportFailed is raised. With no destination configured
    the derived series stays in DATA_DIR/outputs and the series succeeds.
    """
    jobs = open_job_store(settings)
    try:
        job = jobs.get(job_id)
        entry = job.entry(series_uid)
        if entry.status == SeriesStatus.FAILED and not entry.output_series_uid:
            return  # processing failed; nothing to send
        if entry.status == SeriesStatus.CANCELLED:
            return  # cancelled before it was sent: nothing reaches the destination
        if not entry.output_series_uid:
            raise PermanentError(f"series {series_uid} of job {job_id} has no derived series to export")
        # the uncertainty series travels with the output: one export, one acknowledgement record
        files: list[Path] = []
        for uid in (entry.output_series_uid, entry.uncertainty_series_uid):
            folder = outputs_dir(settings, job_id) / uid if uid else None
            found = sorted(folder.glob("*.dcm")) if folder else []
            if folder and not found:
                error = f"derived series {uid} is missing from {folder}"
                jobs.update_series(job_id, series_uid, status=SeriesStatus.FAILED, error=error)
                raise PermanentError(error)
            files += found
        try:
            node = destination_node(settings, job.params.destination)
        except NotConfigured as exc:
            jobs.update_series(job_id, series_uid, status=SeriesStatus.FAILED, error=str(exc))
            raise
        if node is None:
            LOGGER.info("job %s: no destination configured; derived series kept in %s", job_id,
                        outputs_dir(settings, job_id))
            jobs.update_series(job_id, series_uid, status=SeriesStatus.SUCCEEDED, progress=1.0, error=None)
            return
        _send(jobs, job, series_uid, files, node, settings, sleep)
    finally:
        jobs.close()


def _send(jobs: JobStore, job: Job, series_uid: str, files: list[Path], node: Any, settings: WorkerSettings,
          sleep: Any) -> None:
    job_id = job.job_id
    done = set(job.entry(series_uid).acknowledged)
    pending = [(p, uid) for p in files if (uid := _sop_uid(p)) not in done]
    total = len(files)
    if jobs.update_series(job_id, series_uid, status=SeriesStatus.EXPORTING, error=None,
                          instances_total=total).entry(series_uid).status == SeriesStatus.CANCELLED:
        return  # cancelled just before: (atomically) either cancelled and nothing sent, or exporting and all sent

    def record(outcome: StoreOutcome) -> None:
        updated = jobs.acknowledge(job_id, series_uid, outcome.acknowledged, outcome.failures)
        sent = updated.entry(series_uid).instances_sent
        jobs.update_series(job_id, series_uid,
                           progress=round(COMPUTE_SHARE + (1 - COMPUTE_SHARE) * 0.99 * sent / max(total, 1), 4))

    retries = int(getattr(settings, "export_retries", 5))
    backoff = float(getattr(settings, "export_backoff_seconds", 2.0))
    batch = int(getattr(settings, "export_batch_size", 64))
    reason = ""
    t0 = time.perf_counter()
    for attempt in range(retries + 1):
        if not pending:
            break
        if attempt:
            wait = backoff * 2 ** (attempt - 1)
            LOGGER.warning("job %s: export of %d instances to %s failed (%s); retry %d/%d in %.1f s", job_id,
                           len(pending), node, reason, attempt, retries, wait)
            sleep(wait)
        try:
            outcome = store_files(node, [p for p, _ in pending], settings.ae_title, batch, on_batch=record)
            if outcome.failures:
                reason = "; ".join(f"{uid}: {why}" for uid, why in list(outcome.failures.items())[:3])
                reason = f"{len(outcome.failures)} instances refused by {node} ({reason})"
        except PacsUnavailable as exc:
            reason = str(exc)
        acknowledged = set(jobs.get(job_id).entry(series_uid).acknowledged)
        pending = [(p, uid) for p, uid in pending if uid not in acknowledged]
    jobs.add_timing(job_id, "export", time.perf_counter() - t0, series_uid)
    if pending:
        error = f"export to {node} failed after {retries + 1} attempts: {reason}"
        jobs.update_series(job_id, series_uid, status=SeriesStatus.FAILED, error=error)
        raise ExportFailed(error)
    jobs.update_series(job_id, series_uid, status=SeriesStatus.SUCCEEDED, progress=1.0, error=None)
    LOGGER.info("job %s: derived series of %s stored at %s (%d instances)", job_id, series_uid, node, total)


# the task body of each step of a series (the Celery tasks and the in-process dispatcher run these)
BODIES: dict[Step, Any] = {Step.SUPERRESOLVE: process_series, Step.EXPORT: export_series}
