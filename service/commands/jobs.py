"""`cinesr cancel JOB_ID`: cancel a job of a running service over its REST API (DELETE /jobs/{id})."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from cinesr.service.cli import UsageError, app, out


def _token(given: str | None) -> str:
    """--token, else the first of API_TOKENS, else the generated token in DATA_DIR/api-token."""
    from cinesr.service.settings import load_settings

    if given:
        return given
    settings = load_settings()
    if settings.api_tokens:
        return settings.api_tokens[0]
    path = Path(settings.data_dir) / "api-token"
    if path.is_file() and path.read_text().strip():
        return path.read_text().split()[0]
    raise UsageError(f"no API token: pass --token, set CINESR_API_TOKENS, or run where {path} exists")


@app.command()
def cancel(
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID", help="The job to cancel (32 hex digits, as in "
                                                                 "POST /studies/.../superresolve's answer).")],
    url: Annotated[str | None, typer.Option(help="The service's REST address (default: "
                                                 "http://127.0.0.1:HTTP_PORT).")] = None,
    token: Annotated[str | None, typer.Option(help="API token (default: CINESR_API_TOKENS, else "
                                                   "DATA_DIR/api-token).", envvar="CINESR_TOKEN")] = None,
) -> None:
    """Cancel a job: queued series are dropped, a running series stops at its next sampler step, nothing
    computed is sent; prints the job as JSON. A series already being exported finishes."""
    import httpx
    from cinesr.service.settings import load_settings

    base = (url or f"http://127.0.0.1:{load_settings().http_port}").rstrip("/")
    try:
        response = httpx.delete(f"{base}/jobs/{job_id}", headers={"Authorization": f"Bearer {_token(token)}"},
                                timeout=30)
    except httpx.HTTPError as exc:
        raise UsageError(f"cannot reach the service at {base}: {exc}") from None
    if response.status_code != 202:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = response.text[:200]
        if isinstance(detail, list):  # FastAPI's validation errors
            detail = "; ".join(str(d.get("msg", d)) for d in detail)
        raise UsageError(f"job {job_id}: {detail} (HTTP {response.status_code})")
    out.print_json(json.dumps(response.json()))
