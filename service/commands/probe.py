"""`cinesr probe dicom|worker`: health checks for Docker and Kubernetes (exit 0 healthy, 1 not)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from cinesr.service.cli import UsageError, app, err, out


@app.command()
def probe(
    what: Annotated[str, typer.Argument(help="dicom: C-ECHO to the local listener; worker: the worker's heartbeat "
                                             "file is fresh (written only once the engine is loaded).")],
    timeout: Annotated[float, typer.Option(help="dicom: seconds to wait for the C-ECHO.")] = 10.0,
    calling_ae: Annotated[str | None, typer.Option(help="dicom: our calling AE title (default PROBE_CALLING_AE; "
                                                        "must be allowed when ALLOWED_CALLING_AETS is set).")]
    = None,
    max_age: Annotated[float | None, typer.Option(help="worker: oldest acceptable heartbeat in seconds.")] = None,
) -> None:
    """Exit 0 when the component is healthy, 1 (with the reason) when not."""
    from cinesr.service.settings import load_settings

    settings = load_settings()
    if what == "worker":
        from cinesr.worker.queue.runtime import HEARTBEAT_MAX_AGE, heartbeat_age

        path = Path(settings.heartbeat_file)
        age = heartbeat_age(path)
        limit = HEARTBEAT_MAX_AGE if max_age is None else max_age
        if age is None:
            err.print(f"worker not ready: no heartbeat at {path}", highlight=False, soft_wrap=True)
            raise SystemExit(1)
        if age > limit:
            err.print(f"worker stale: heartbeat {age:.0f} s old (limit {limit:.0f} s)", highlight=False)
            raise SystemExit(1)
        out.print(f"worker ok (heartbeat {age:.0f} s old)", highlight=False)
    elif what == "dicom":
        import logging

        from cinesr.service.echo import echo, self_check_tls

        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # the one-line reason below is enough
        # the listener's own address, loopback when it listens on every interface
        host = settings.dicom_host if settings.dicom_host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        try:
            tls = self_check_tls(settings.tls_cert, settings.tls_key, bool(settings.tls_ca)) \
                if settings.tls_cert and settings.tls_key else None
            ok = echo(host, settings.dicom_port, called_ae=settings.ae_title,
                      calling_ae=calling_ae or settings.probe_calling_ae, timeout=timeout, tls=tls)
        except Exception as exc:  # noqa: BLE001 - any failure means unhealthy; say why in one line
            ok, reason = False, str(exc)
        else:
            reason = "no association or C-ECHO failed"
        if not ok:
            err.print(f"dicom not ready on port {settings.dicom_port}: {reason}", highlight=False, soft_wrap=True)
            raise SystemExit(1)
        out.print(f"dicom ok ({settings.ae_title} on port {settings.dicom_port})", highlight=False)
    else:
        raise UsageError(f"unknown probe {what!r} (available: dicom, worker)")
