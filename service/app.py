"""The running service: listener + instance store + series assembler + routing + job dispatch + REST gateway.

    instance arrives -> store (durable) -> assembler (series quiet for SERIES_STABLE_SECONDS)
        -> routing (eligible? recorded with the reason) -> AUTO_PROCESS: job (idempotent) -> dispatcher
    POST /studies/{uid}/superresolve -> submit(): here? else C-FIND at the PACS -> job -> prepare thread
        (C-MOVE/C-GET if needed, eligibility, series entries) -> dispatcher

The dispatcher (cinesr.service.dispatchers) is Celery (with BROKER_URL empty the embedded worker of
`cinesr serve` consumes the embedded queue) or an in-process thread that calls the same task bodies. Which
status a job may move to, and what is queued for it, is decided in cinesr.worker.queue.lifecycle; this module wires
the parts together and keeps the REST side's checks (destination, method, where the study is).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cinesr.service.settings import Settings
from cinesr.worker.errors import NotConfigured, PacsUnavailable, PermanentError, RetrieveFailed
from cinesr.worker.network.pacs import destination_node, pacs_node
from cinesr.worker.queue import lifecycle
from cinesr.worker.queue.jobs import Job, JobParams, JobStore, open_job_store
from cinesr.worker.queue.lifecycle import JobStatus
from cinesr.worker.queue.process import check_steps, model_available, resolve_method_name

from .assembly import SeriesAssembler
from .dispatchers import Dispatcher, InlineDispatcher, make_dispatcher
from .listener import ListenerHandle, start_listener
from .metrics import ServiceCollector, make_registry
from .retrieve import retrieve_study, study_series_at_pacs
from .routing import RoutingLimits, RoutingLog, check_series, sweep_ineligible
from .store import InstanceStore, StoredInstance
from .store_errors import StoreFull, StoreHalted

if TYPE_CHECKING:
    from cinesr.worker.queue.dispatch import EmbeddedWorker

LOGGER = logging.getLogger(__name__)

TOKEN_FILE = "api-token"


class StudyNotFound(LookupError):
    """Neither here nor at the PACS (or a requested series is not in the study)."""


class PacsUnreachable(RuntimeError):
    """The study is not here and the PACS could not be asked."""


class InvalidRequest(ValueError):
    """A request the service cannot honour as given (unknown destination or method)."""


def ensure_api_tokens(settings: Settings) -> tuple[list[str], Path | None]:
    """API_TOKENS, or the token in DATA_DIR/api-token (generated on first start, mode 0600)."""
    if settings.api_tokens:
        return list(settings.api_tokens), None
    path = Path(settings.data_dir) / TOKEN_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        LOGGER.warning("CINESR_API_TOKENS is empty: generated an API token into %s", path)
    else:
        LOGGER.info("CINESR_API_TOKENS is empty: using the API token in %s", path)
    tokens = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return tokens, path


class Service:
    """Everything `cinesr serve` runs, started and stopped together (the REST app reads it)."""

    def __init__(self, settings: Settings, dispatch: Literal["auto", "celery", "inline"] = "auto",
                 embedded_worker: bool | EmbeddedWorker | None = None,
                 durability: Literal["journal", "file"] = "journal",
                 min_free_bytes: int | None = None) -> None:
        self.settings = settings
        self.dispatch_mode = dispatch
        self.embedded_worker_wanted = embedded_worker
        self.durability = durability
        self.min_free_bytes = min_free_bytes
        self.store: InstanceStore | None = None
        self.jobs: JobStore | None = None
        self.routing: RoutingLog | None = None
        self.listener: ListenerHandle | None = None
        self.assembler: SeriesAssembler | None = None
        self.dispatcher: Dispatcher | None = None
        # a worker started before the service (`cinesr serve` does, to overlap their start-ups) is adopted:
        # stopped with the service, also when the service fails to start
        self.worker: Any = None if embedded_worker is None or isinstance(embedded_worker, bool) else embedded_worker
        self.tokens: list[str] = []
        self.token_file: Path | None = None
        self.registry: Any = None
        self._retrieving: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.started = False

    # ---- life cycle ---------------------------------------------------------------------------

    def start(self, listen: bool = True) -> Service:
        settings = self.settings
        data = Path(settings.data_dir)
        data.mkdir(parents=True, exist_ok=True)
        self.tokens, self.token_file = ensure_api_tokens(settings)
        self.store = InstanceStore(
            data, durability=self.durability,
            min_free_bytes=settings.disk_min_free_bytes if self.min_free_bytes is None else self.min_free_bytes,
            min_free_fraction=settings.disk_min_free_fraction,
            segment_size=settings.journal_segment_bytes, spare_segments=settings.journal_spare_segments)
        self.jobs = open_job_store(settings)
        self.routing = RoutingLog(data / "routing.sqlite3")
        self.dispatcher, self.worker = make_dispatcher(settings, self.jobs, self.dispatch_mode,
                                                       self.embedded_worker_wanted)
        self.assembler = SeriesAssembler(settings.series_stable_seconds, self.on_series_complete)
        self.assembler.start()
        if listen:
            self.listener = start_listener(settings, self.store, self.assembler.on_instance)
        self.registry = make_registry(ServiceCollector(
            self.jobs, lambda: self.listener.stats if self.listener else None,
            lambda: len(self.routing.ineligible()) if self.routing else 0))
        self._spawn(self._janitor, "cinesr-retention")
        self._resume()
        self.started = True
        return self

    def stop(self) -> None:
        self._stop.set()
        if self.listener is not None:
            self.listener.stop()
        if self.assembler is not None:
            self.assembler.stop()
        if self.worker is not None:
            self.worker.stop()
        if self.dispatcher is not None:
            self.dispatcher.stop()
        for thread in self._threads:
            thread.join(timeout=5)
        if self.store is not None:
            self.store.close()
        if self.routing is not None:
            self.routing.close()
        if self.jobs is not None:
            self.jobs.close()
        self.started = False

    def __enter__(self) -> Service:
        return self.start() if not self.started else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, target: Any, name: str, *args: Any) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()
        return thread

    def _janitor(self) -> None:
        interval = max(60.0, min(3600.0, self.settings.retention_hours * 3600 / 4))
        while not self._stop.wait(interval):
            try:
                sweep_ineligible(self.store, self.routing, self.settings.retention_hours)
            except Exception:  # noqa: BLE001 - retention must not take the service down
                LOGGER.exception("retention sweep failed")

    def _resume(self) -> None:
        """After a restart: jobs that were being prepared are prepared again; with the in-process dispatcher,
        unfinished series are queued again (the Celery queue keeps its own messages)."""
        for job in self.jobs.list(limit=100000):
            if job.status in lifecycle.TERMINAL:
                continue
            if lifecycle.needs_preparation(job):
                self._spawn(self._prepare, f"cinesr-prepare-{job.job_id[:8]}", job.job_id)
            elif isinstance(self.dispatcher, InlineDispatcher):
                self.dispatcher.enqueue_job(job.job_id)

    # ---- DICOM side ---------------------------------------------------------------------------

    def on_instance(self, instance: StoredInstance) -> None:
        if self.assembler is not None:
            self.assembler.on_instance(instance)

    def on_series_complete(self, study_uid: str, series_uid: str) -> None:
        """A pushed series is complete: record whether it is eligible; with AUTO_PROCESS queue a job."""
        with self._lock:
            if study_uid in self._retrieving:
                return  # pulled for a REST job, which takes care of it
        result = check_series(self.store, study_uid, series_uid, RoutingLimits.from_settings(self.settings))
        self.routing.record(result)
        if not result.eligible:
            LOGGER.info("series %s not processed: %s", series_uid, result.reason)
            return
        if not self.settings.auto_process:
            return
        job = lifecycle.push_job(self.jobs, study_uid, series_uid)
        if job is not None:
            LOGGER.info("series %s queued automatically as job %s", series_uid, job.job_id)
            self.dispatcher.enqueue_job(job.job_id)

    # ---- REST side ----------------------------------------------------------------------------

    def submit(self, study_uid: str, series: list[str] | None, params: JobParams) -> tuple[Job, bool]:
        """A super-resolution request: the existing job for the same request, or a new one being prepared."""
        try:
            destination_node(self.settings, params.destination)
        except NotConfigured as exc:
            raise InvalidRequest(str(exc)) from exc
        try:
            method = resolve_method_name(params.method, self.settings)
            if method == "model":  # the baseline has no sampler: steps mean nothing to it
                check_steps(params.steps, self.settings)
                check_steps(None if params.steps else self.settings.steps, self.settings,
                            "the STEPS setting: steps")
        except PermanentError as exc:
            raise InvalidRequest(str(exc)) from exc
        if method != "model" and params.uncertainty:
            raise InvalidRequest("an uncertainty series needs the model method (the baseline is deterministic)")
        known = set(self.store.series(study_uid))
        if not known or set(series or []) - known:  # the study, or a requested series, is not here
            node = pacs_node(self.settings)
            if node is None:
                if not known:
                    raise StudyNotFound(f"study {study_uid} is not here and no PACS is configured")
            else:
                try:
                    at_pacs = study_series_at_pacs(self.settings, node, study_uid)
                except PacsUnavailable as exc:
                    raise PacsUnreachable(f"study {study_uid} (or a requested series) is not here and the PACS "
                                          f"cannot be asked: {exc}") from exc
                if not at_pacs and not known:
                    raise StudyNotFound(f"study {study_uid} is neither here nor at {node}")
                known |= {s["series_uid"] for s in at_pacs}
        missing = sorted(set(series or []) - known)
        if missing:
            raise StudyNotFound(f"series not in study {study_uid}: {', '.join(missing)}")
        job, created = self.jobs.create_or_get(study_uid, series or None, params)
        if created:
            self._spawn(self._prepare, f"cinesr-prepare-{job.job_id[:8]}", job.job_id)
        return job, created

    def _prepare(self, job_id: str) -> None:
        """Fetch the study if needed, decide which series are processed, queue the job."""
        job = self.jobs.get(job_id)
        study_uid = job.study_uid
        try:
            here = set(self.store.series(study_uid))
            if not here or set(job.requested_series) - here:
                node = pacs_node(self.settings)
                if node is None:
                    raise RetrieveFailed("the study is not here and no PACS is configured")
                with self._lock:
                    self._retrieving.add(study_uid)
                self.jobs.update(job_id, status=JobStatus.RETRIEVING)
                t0 = time.perf_counter()
                retrieve_study(self.settings, node, study_uid, self.store)
                self.jobs.add_timing(job_id, "retrieve", time.perf_counter() - t0)
            if self.jobs.get(job_id).status == JobStatus.CANCELLED:
                return  # cancelled while the study was being retrieved
            candidates = job.requested_series or self.store.series(study_uid)
            eligible, reasons = [], {}
            for series_uid in candidates:
                result = check_series(self.store, study_uid, series_uid, RoutingLimits.from_settings(self.settings))
                self.routing.record(result)
                if result.eligible:
                    eligible.append(series_uid)
                else:
                    reasons[series_uid] = result.reason
            if lifecycle.choose_series(self.jobs, job, eligible, reasons):
                self.dispatcher.enqueue_job(job_id)
        except (PacsUnavailable, RetrieveFailed) as exc:
            LOGGER.warning("job %s: retrieval failed: %s", job_id, exc)
            self.jobs.update(job_id, status=JobStatus.FAILED, error=f"retrieve: {exc}")
        except Exception as exc:  # noqa: BLE001 - the job records it; the service keeps serving
            LOGGER.exception("job %s: preparation failed", job_id)
            self.jobs.update(job_id, status=JobStatus.FAILED, error=f"{type(exc).__name__}: {exc}")
        finally:
            with self._lock:
                self._retrieving.discard(study_uid)

    def cancel(self, job_id: str) -> Job:
        """Cancel a job: queued series are dropped when their message comes up, a running series stops at
        its next sampler step, computed series are not sent; a series already being exported finishes."""
        job = lifecycle.request_cancel(self.jobs, job_id)
        LOGGER.info("job %s cancelled (now %s)", job_id, job.status)
        return job

    def retry(self, job_id: str) -> Job:
        """A failed job again: series with a derived series are resent without recomputing; the rest (and a
        job that failed before its series were known) are processed again."""
        job, prepare = lifecycle.request_retry(self.jobs, job_id)
        if prepare:  # failed while retrieving or choosing series
            self._spawn(self._prepare, f"cinesr-prepare-{job_id[:8]}", job_id)
            return job
        self.dispatcher.enqueue_export(job_id)
        return job

    # ---- health ---------------------------------------------------------------------------------

    def readiness(self) -> dict[str, dict[str, Any]]:
        """Checks for /readyz: broker (job records and queue), storage, model, listener."""
        checks: dict[str, dict[str, Any]] = {}
        try:
            self.jobs.ping()
            checks["broker"] = {"ok": True, "kind": "redis" if self.settings.broker_url else "embedded"}
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            checks["broker"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        try:
            probe = Path(self.settings.data_dir) / ".readyz"
            probe.write_bytes(b"ok")
            probe.unlink()
            self.store.check_space(0)
            self.store.raise_if_halted()
            checks["storage"] = {"ok": True}
        except (StoreFull, StoreHalted) as exc:  # below the watermark, or filing stopped (it retries)
            checks["storage"] = {"ok": False, "error": str(exc)}
        except OSError as exc:
            checks["storage"] = {"ok": False, "error": f"data dir not writable: {exc}"}
        try:
            method = resolve_method_name(None, self.settings)
            model_dir = self.settings.model_dir
            if method == "model" and model_dir is not None and not (Path(model_dir) / "model.json").is_file():
                checks["model"] = {"ok": False, "method": method, "error": f"no model bundle at {model_dir}"}
            else:
                checks["model"] = {"ok": True, "method": method, "model_code": model_available()}
        except PermanentError as exc:
            checks["model"] = {"ok": False, "error": str(exc)}
        if self.listener is not None:
            checks["listener"] = {"ok": self.listener.listener.accepting, "port": self.listener.port}
        if self.worker is not None:
            alive = getattr(self.worker, "alive", lambda: True)()
            checks["worker"] = {"ok": bool(alive)}
        return checks
