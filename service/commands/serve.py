"""`cinesr serve`: DICOM listener + series assembly + REST gateway, and the embedded worker when BROKER_URL is
empty, so one command on one machine is a working service."""

from __future__ import annotations

import errno
import logging
import signal
import socket
from typing import Annotated

import typer
from cinesr.service.cli import UsageError, app

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
    from cinesr.service.settings import load_settings

    def _terminate(signum: int, frame: object) -> None:
        # uvicorn shuts down on SIGTERM and then re-raises it to the previous handler: this one, so the
        # finally below stops the listener and the embedded worker before the process exits
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _terminate)
    settings = load_settings()
    _check_ports(settings, host)
    # then hold the REST port: one taken between the check and now is still found before anything (the
    # embedded worker above all) is started
    http_socket = bind_port(host, settings.http_port, "REST (HTTP_PORT)")
    embedded = _start_worker_first(settings, worker, inline, http_socket)
    # imported after the worker started: the service's imports (FastAPI, uvicorn, the stores: about a second)
    # then overlap the worker's own start-up (Celery, torch, the model: several seconds)
    import uvicorn
    from cinesr.service.app import Service
    from cinesr.service.gateway import create_app

    service = Service(settings, dispatch="inline" if inline else "auto",
                      embedded_worker=embedded if embedded is not None else worker)
    try:
        try:
            service.start()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UsageError(f"DICOM port {settings.dicom_port} on {settings.dicom_host} is in use "
                                 f"(DICOM_PORT)") from exc
            raise
        LOGGER.warning("CineSR serving: DICOM %s on port %d, REST on http://%s:%d%s",
                       settings.ae_title, service.listener.port if service.listener else settings.dicom_port,
                       host, settings.http_port, " (docs at /docs)" if settings.docs_enabled else "")
        if service.token_file is not None:
            LOGGER.warning("API token file: %s", service.token_file)
        # log_config=None: uvicorn's loggers propagate to ours (JSON lines), it installs no handlers of its own
        config = uvicorn.Config(create_app(service), host=host, port=settings.http_port, log_level="warning",
                                access_log=False, log_config=None)
        uvicorn.Server(config).run(sockets=[http_socket])
    finally:
        # on any way out, start-up failures included: the listener and the embedded worker stop with us
        service.stop()
        http_socket.close()


def _start_worker_first(settings: object, worker: bool | None, inline: bool,
                        http_socket: socket.socket) -> object | None:
    """The embedded worker, started before the rest of the service when one is wanted (--worker, or BROKER_URL
    empty); the Service adopts it and stops it with everything else."""
    if inline:
        return None
    try:
        from cinesr.worker.queue.dispatch import start_embedded_worker, wants_embedded_worker
    except ImportError:  # no worker package: the Service falls back to running jobs in-process
        return None
    if not wants_embedded_worker(settings, worker):  # type: ignore[arg-type]
        return None
    try:
        return start_embedded_worker(settings)  # type: ignore[arg-type]
    except BaseException:
        http_socket.close()
        raise


def bind_port(host: str, port: int, what: str) -> socket.socket:
    """A listening TCP socket on host:port; a port in use is a user error naming the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(f"{what} port {port} on {host} is in use") from exc
        raise UsageError(f"cannot listen on {what} port {port} on {host}: {exc.strerror}") from exc
    return sock


def _check_ports(settings: object, host: str) -> None:
    """Both ports free, before the listener, the worker or uvicorn start (else one line, exit code 2)."""
    from cinesr.service.ports import ensure_free

    ensure_free(str(getattr(settings, "dicom_host", "0.0.0.0")), int(getattr(settings, "dicom_port", 0)), "DICOM")
    ensure_free(host, int(getattr(settings, "http_port", 0)), "HTTP")
