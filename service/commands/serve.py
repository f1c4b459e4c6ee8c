"""`cinesr serve`: DICOM listener + series assembly + REST gateway, and the embedded worker when BROKER_URL is
empty, so one command on one machine is a working service."""

from __future__ import annotations

import logging
import signal
from typing import Annotated

import typer
from cinesr.service.cli import app

LOGGER = logging.getLogger("cinesr.service.serve")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address the REST gateway binds.")] = "0.0.0.0",
    worker: Annotated[bool | None, typer.Option("--worker/--no-worker",
                                                help="Run the embedded worker (default: when BROKER_URL is "
                                                     "empty).")] = None,
    inline: Annotated[bool, typer.Option("--inline", help="Run jobs in this process instead of a worker "
                                                          "(small machines, debugging).")] = False,
) -> None:
    """Run the service: DICOM listener on DICOM_PORT, REST on HTTP_PORT (settings: CINESR_* or --config)."""
    import uvicorn
    from cinesr.service.app import Service
    from cinesr.service.gateway import create_app
    from cinesr.service.settings import load_settings

    def _terminate(signum: int, frame: object) -> None:
        # uvicorn shuts down on SIGTERM and then re-raises it to the previous handler: this one, so the
        # finally below stops the listener and the embedded worker before the process exits
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _terminate)
    settings = load_settings()
    _check_ports(settings, host)
    service = Service(settings, dispatch="inline" if inline else "auto", embedded_worker=worker)
    service.start()
    try:
        LOGGER.warning("CineSR serving: DICOM %s on port %d, REST on http://%s:%d (docs at /docs)",
                       settings.ae_title, service.listener.port if service.listener else settings.dicom_port,
                       host, settings.http_port)
        if service.token_file is not None:
            LOGGER.warning("API token file: %s", service.token_file)
        uvicorn.run(create_app(service), host=host, port=settings.http_port, log_level="warning",
                    access_log=False)
    finally:
        service.stop()


def _check_ports(settings: object, host: str) -> None:
    """Both ports free, before the listener, the worker or uvicorn start (else one line, exit code 2)."""
    from cinesr.service.ports import ensure_free

    ensure_free(str(getattr(settings, "dicom_host", "0.0.0.0")), int(getattr(settings, "dicom_port", 0)), "DICOM")
    ensure_free(host, int(getattr(settings, "http_port", 0)), "HTTP")
