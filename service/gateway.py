"""REST gateway (FastAPI): submit studies, follow jobs, health, metrics.

    POST /studies/{study_uid}/superresolve   202 {job} + Location: /jobs/{job_id}   (idempotent)
    GET  /jobs/{job_id}                      the job
    GET  /jobs?study_uid=&status=&limit=     jobs, newest first
    POST /jobs/{job_id}/retry                202 {job}; resend without recomputing (failed jobs only, else 409)
    DELETE /jobs/{job_id}                    202 {job}; cancel (also POST /jobs/{job_id}/cancel); 409 if finished
    GET  /jobs/{job_id}/series/{uid}         the derived series as a streamed zip (uid: output or input UID)
    GET  /jobs/{job_id}/series/{uid}/preview.png   a PNG strip of the derived series (middle slice, 8 times)
    GET  /healthz                            liveness, no auth
    GET  /readyz                             broker, storage, model (503 when one is not ready), no auth;
                                             which check failed; why only with a token (and in the log)
    GET  /metrics                            Prometheus text, no auth (scrapers on the cluster network)
    POST /dicomweb/studies[/{study_uid}]     STOW-RS (cinesr.service.stow): 200/202/409 + store response
    /openapi.json; /docs and /redoc with DOCS_ENABLED (their assets come from a public CDN)

Every path but health, readiness, metrics and the docs needs the bearer token, checked (with the body size,
HTTP_MAX_BODY_BYTES) by cinesr.service.guard before any body is read.

Errors are JSON {"detail": reason}: 401 no/invalid bearer token, 413 body too large, 404 unknown study/series/job,
409 job not retryable, 422 malformed UID or body, 503 PACS unreachable for a study that is not here.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path as FsPath
from typing import Annotated, Any, Literal

from cinesr.service.settings import Settings
from cinesr.worker.queue.jobs import MAX_DRAWS, Job, JobParams, UnknownJob
from cinesr.worker.queue.lifecycle import JobConflict, JobStatus, SeriesStatus
from fastapi import Depends, FastAPI, Path, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StringConstraints

from .app import InvalidRequest, PacsUnreachable, Service, StudyNotFound
from .guard import RequestGuard, bearer_problem, token_matches
from .metrics import CONTENT_TYPE, render
from .results import make_preview, zip_stream
from .stow import router as stow_router

LOGGER = logging.getLogger(__name__)

# A DICOM UID: numeric components without leading zeros, dot separated, at most 64 characters.
UID_PATTERN = r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$"
Uid = Annotated[str, StringConstraints(pattern=UID_PATTERN, max_length=64)]
DEFAULT_DRAWS = 4  # draws of {"uncertainty": true} when the UNCERTAINTY_DRAWS setting is 0 (off)


def outputs_dir_of(data_dir: FsPath | str, job_id: str) -> FsPath:
    """DATA_DIR/outputs/<job_id>, where the worker writes the job's derived series (cinesr.worker.queue.process)."""
    return FsPath(data_dir) / "outputs" / job_id


class AuthError(Exception):
    """No or invalid bearer token."""


class SuperresolveRequest(BaseModel):
    """Optional body of POST /studies/{study_uid}/superresolve."""

    model_config = ConfigDict(extra="forbid")

    series: list[Uid] | None = Field(None, description="SeriesInstanceUIDs to process (default: every eligible "
                                                       "cine series of the study)", max_length=1000)
    steps: int | None = Field(None, ge=1, le=1000, description="Sampler steps of the model: 15 (the teacher, as "
                              "trained) or a count the bundle's distilled student serves (1, 2, 4); others are "
                              "refused with 422 and the counts this bundle supports. Default: the STEPS setting, "
                              "else the bundle's choice")
    destination: str | None = Field(None, max_length=16, description="AE title of a configured destination "
                                                                     "(default: the configured PACS)")
    method: Literal["auto", "model", "baseline"] | None = Field(
        None, description="auto (the model when a trained bundle is installed, else the baseline), model or "
                          "baseline; default: the DEFAULT_METHOD setting (auto)")
    # strict: a JSON true is a draw count of its own (the setting's), never the number 1
    uncertainty: StrictBool | Annotated[StrictInt, Field(ge=0, le=MAX_DRAWS)] | None = Field(
        None, description="Also write an uncertainty series (per-pixel standard deviation over several draws of "
                          "the model), exported with the result: true (UNCERTAINTY_DRAWS draws, 4 if that is 0), a "
                          "draw count >= 2, or false/0 for none. Default: the UNCERTAINTY_DRAWS setting")

    def draws(self, settings: Settings) -> int | None:
        """The job's draw count (None: the setting decides when the job runs)."""
        if self.uncertainty is None:
            return None
        if self.uncertainty is True:
            return settings.uncertainty_draws or DEFAULT_DRAWS
        if self.uncertainty == 1:
            raise InvalidRequest("uncertainty: at least 2 draws (or true / false)")
        return int(self.uncertainty)


class SeriesView(BaseModel):
    input_series_uid: str
    output_series_uid: str | None
    uncertainty_series_uid: str | None = None
    status: str
    progress: float
    instances_total: int
    instances_sent: int
    instances_failed: int
    error: str | None
    timings: dict[str, float]
    # where the derived series is, once computed: the folder on the service's disk and the REST downloads
    output_path: str | None = None
    download: str | None = None
    preview: str | None = None


class JobView(BaseModel):
    job_id: str
    study_uid: str
    # a Literal of the values, not the enum: the OpenAPI schema lists them inline (an enum would be a $ref)
    status: Literal[tuple(JobStatus)]  # type: ignore[valid-type]
    progress: float
    series: list[SeriesView]
    params: JobParams
    timings: dict[str, float]
    error: str | None
    created_at: datetime
    updated_at: datetime
    attempts: int
    source: str
    location: str

    @classmethod
    def of(cls, job: Job, data_dir: FsPath | None = None) -> JobView:
        """The job as the API shows it; with data_dir, computed series also say where they are."""
        def where(e: Any) -> dict[str, str]:
            if data_dir is None or not e.output_series_uid or e.status == SeriesStatus.CANCELLED:
                return {}
            folder = outputs_dir_of(data_dir, job.job_id) / e.output_series_uid
            if not folder.is_dir():
                return {}
            url = f"/jobs/{job.job_id}/series/{e.output_series_uid}"
            return {"output_path": str(folder), "download": url, "preview": f"{url}/preview.png"}

        return cls(
            job_id=job.job_id, study_uid=job.study_uid, status=job.status, progress=job.progress,
            series=[SeriesView(input_series_uid=e.input_series_uid, output_series_uid=e.output_series_uid,
                               uncertainty_series_uid=e.uncertainty_series_uid, status=e.status,
                               progress=e.progress, instances_total=e.instances_total,
                               instances_sent=e.instances_sent, instances_failed=len(e.export_failures),
                               error=e.error, timings=e.timings, **where(e)) for e in job.series],
            params=job.params, timings=job.timings, error=job.error, created_at=job.created_at,
            updated_at=job.updated_at, attempts=job.attempts, source=job.source, location=f"/jobs/{job.job_id}")


class JobList(BaseModel):
    jobs: list[JobView]


class Problem(BaseModel):
    detail: Any


def get_service(request: Request) -> Service:
    return request.app.state.service


def get_settings(service: Annotated[Service, Depends(get_service)]) -> Settings:
    return service.settings


_bearer = HTTPBearer(auto_error=False, description="An API token (CINESR_API_TOKENS, or DATA_DIR/api-token)")


def require_token(service: Annotated[Service, Depends(get_service)],
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> None:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise AuthError("missing bearer token")
    # RequestGuard has already refused a request without a valid token; this documents the scheme in OpenAPI
    # and keeps a route safe should it be mounted without the guard
    if not token_matches(credentials.credentials, service.tokens):
        raise AuthError("invalid bearer token")


Authorized = Depends(require_token)
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "No or invalid bearer token"},
    404: {"model": Problem, "description": "Unknown study, series or job"},
    422: {"model": Problem, "description": "Malformed UID or body"},
}


# what /readyz shows of each check (no error text: it can carry paths and internal exception messages)
_PUBLIC_CHECK_FIELDS = frozenset({"ok", "kind", "method", "model_code", "port"})


def create_app(service: Service) -> FastAPI:
    """The REST app for a (started) Service."""
    docs = bool(service.settings.docs_enabled)  # the docs pages load their assets from a public CDN
    app = FastAPI(title="CineSR", version=_version(),
                  description="Super-resolution of cardiac cine MRI (4x spatial, 8x temporal), DICOM in and out.",
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None)
    app.state.service = service
    app.add_middleware(RequestGuard, tokens=lambda: service.tokens,
                       max_body_bytes=int(service.settings.http_max_body_bytes))

    @app.exception_handler(AuthError)
    async def _auth(_: Request, exc: AuthError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=401, headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(StudyNotFound)
    async def _not_found(_: Request, exc: StudyNotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(UnknownJob)
    async def _unknown_job(_: Request, exc: UnknownJob) -> JSONResponse:
        return JSONResponse({"detail": f"unknown job {exc.args[0]}"}, status_code=404)

    @app.exception_handler(InvalidRequest)
    async def _invalid(_: Request, exc: InvalidRequest) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(JobConflict)
    async def _conflict(_: Request, exc: JobConflict) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(PacsUnreachable)
    async def _pacs(_: Request, exc: PacsUnreachable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "30"})

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        LOGGER.exception("request failed")
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    @app.post("/studies/{study_uid}/superresolve", status_code=202, response_model=JobView,
              dependencies=[Authorized], responses={**_ERRORS, 503: {"model": Problem, "description":
                                                                    "Study not here and the PACS unreachable"}})
    def superresolve(study_uid: Annotated[str, Path(pattern=UID_PATTERN, max_length=64)], response: Response,
                     service: Annotated[Service, Depends(get_service)],
                     body: SuperresolveRequest | None = None) -> JobView:
        """Queue super-resolution of a study (fetched from the PACS if it is not here). The same request
        (study, series, parameters) returns the same job while it has not failed."""
        body = body or SuperresolveRequest()
        params = JobParams(method=body.method, steps=body.steps, destination=body.destination,
                           uncertainty=body.draws(service.settings))
        job, created = service.submit(study_uid, list(body.series) if body.series else None, params)
        response.headers["Location"] = f"/jobs/{job.job_id}"
        if not created:
            response.headers["X-CineSR-Existing-Job"] = "true"
        return JobView.of(job, service.settings.data_dir)

    @app.get("/jobs/{job_id}", response_model=JobView, dependencies=[Authorized], responses=_ERRORS)
    def get_job(job_id: Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")],
                service: Annotated[Service, Depends(get_service)]) -> JobView:
        """Status, progress, per-series input and output SeriesInstanceUIDs, timings and error text."""
        return JobView.of(service.jobs.get(job_id), service.settings.data_dir)

    @app.get("/jobs", response_model=JobList, dependencies=[Authorized], responses=_ERRORS)
    def list_jobs(service: Annotated[Service, Depends(get_service)],
                  study_uid: Annotated[str | None, Query(pattern=UID_PATTERN, max_length=64)] = None,
                  status: Annotated[str | None, Query(pattern="^(" + "|".join(JobStatus) + ")$")] = None,
                  limit: Annotated[int, Query(ge=1, le=10000)] = 100) -> JobList:
        """Jobs, newest first, filtered by study and/or status."""
        jobs = service.jobs.list(study_uid=study_uid, status=status, limit=limit)
        return JobList(jobs=[JobView.of(j, service.settings.data_dir) for j in jobs])

    @app.post("/jobs/{job_id}/retry", status_code=202, response_model=JobView, dependencies=[Authorized],
              responses={**_ERRORS, 409: {"model": Problem, "description": "The job has not failed"}})
    def retry_job(job_id: Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")], response: Response,
                  service: Annotated[Service, Depends(get_service)]) -> JobView:
        """Retry a failed job: derived series already computed are resent without recomputing."""
        job = service.retry(job_id)
        response.headers["Location"] = f"/jobs/{job.job_id}"
        return JobView.of(job, service.settings.data_dir)

    @app.delete("/jobs/{job_id}", status_code=202, response_model=JobView, dependencies=[Authorized],
                responses={**_ERRORS, 409: {"model": Problem, "description": "The job has already finished"}})
    def cancel_job(job_id: Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")],
                   service: Annotated[Service, Depends(get_service)]) -> JobView:
        """Cancel a job: queued series are dropped, a running series stops at its next sampler step, computed
        series are not sent. A series already being exported finishes (so no PACS holds part of one). The job
        ends `cancelled`; cancelling a cancelled job again is harmless."""
        return JobView.of(service.cancel(job_id), service.settings.data_dir)

    @app.post("/jobs/{job_id}/cancel", status_code=202, response_model=JobView, dependencies=[Authorized],
              responses={**_ERRORS, 409: {"model": Problem, "description": "The job has already finished"}})
    def cancel_job_post(job_id: Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")],
                        service: Annotated[Service, Depends(get_service)]) -> JobView:
        """The same as DELETE /jobs/{job_id}, for clients that cannot send DELETE."""
        return JobView.of(service.cancel(job_id), service.settings.data_dir)

    def _derived_folder(service: Service, job_id: str, series_uid: str) -> tuple[FsPath, str]:
        job = service.jobs.get(job_id)
        entry = next((e for e in job.series if series_uid in (e.output_series_uid, e.input_series_uid)), None)
        if entry is None:
            raise StudyNotFound(f"job {job_id} has no series {series_uid}")
        folder = outputs_dir_of(service.settings.data_dir, job_id) / (entry.output_series_uid or "-")
        if not entry.output_series_uid or entry.status == SeriesStatus.CANCELLED or not folder.is_dir():
            raise JobConflict(f"series {series_uid} of job {job_id} has no derived series ({entry.status})")
        return folder, entry.output_series_uid

    @app.get("/jobs/{job_id}/series/{series_uid}", response_class=StreamingResponse, dependencies=[Authorized],
             responses={**_ERRORS, 200: {"content": {"application/zip": {}}, "description": "The instances"},
                        409: {"model": Problem, "description": "Not computed (yet), or cancelled"}})
    def download_series(job_id: Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")],
                        series_uid: Annotated[str, Path(pattern=UID_PATTERN, max_length=64)],
                        service: Annotated[Service, Depends(get_service)]) -> StreamingResponse:
        """The derived series (by its own or its input's SeriesInstanceUID) as a zip of DICOM files,
        streamed: <derived uid>/IMsss_ffff.dcm (slice, frame in trigger-time order)."""
        folder, uid = _derived_folder(service, job_id, series_uid)
        return StreamingResponse(zip_stream(folder, uid), media_type="application/zip",
                                 headers={"Content-Disposition": f'attachment; filename="{uid}.zip"'})

    @app.get("/jobs/{job_id}/series/{series_uid}/preview.png", response_class=FileResponse,
             dependencies=[Authorized],
             responses={**_ERRORS, 200: {"content": {"image/png": {}}, "description": "The preview strip"},
                        409: {"model": Problem, "description": "Not computed (yet), or cancelled"}})
    def preview_series(job_id: Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")],
                       series_uid: Annotated[str, Path(pattern=UID_PATTERN, max_length=64)],
                       service: Annotated[Service, Depends(get_service)]) -> FileResponse:
        """A PNG strip of the derived series: its middle slice at 8 times across the cardiac cycle, through
        the series' window centre/width."""
        folder, _ = _derived_folder(service, job_id, series_uid)
        return FileResponse(make_preview(folder), media_type="image/png")

    app.include_router(stow_router, dependencies=[Authorized])  # the token is checked before the body is read

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "A dependency is not ready"}})
    def readyz(request: Request, service: Annotated[Service, Depends(get_service)]) -> JSONResponse:
        """Readiness: job store/broker reachable, storage writable above the watermark, model loadable. The
        reasons of failed checks are shown to a caller with a valid bearer token only."""
        checks = service.readiness()
        ready = all(c.get("ok") for c in checks.values())
        failing = {name: c for name, c in checks.items() if not c.get("ok")}
        if failing:
            # the reasons (paths, exception text) go to the log, not to whoever can reach this without a token
            LOGGER.warning("not ready: %s", "; ".join(f"{n}: {c.get('error', 'not ok')}" for n, c in failing.items()))
        if bearer_problem(request.headers.get("authorization"), service.tokens) is not None:
            checks = {name: {k: v for k, v in c.items() if k in _PUBLIC_CHECK_FIELDS} for name, c in checks.items()}
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @app.get("/metrics", response_class=Response)
    def metrics(service: Annotated[Service, Depends(get_service)]) -> Response:
        """Prometheus metrics."""
        return Response(render(service.registry), media_type=CONTENT_TYPE)

    return app


def _version() -> str:
    try:
        from cinesr.worker import __version__

        return str(__version__)
    except ImportError:
        return "0"
