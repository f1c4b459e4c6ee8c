"""Start-up check of `cinesr serve`: are the ports it will listen on free? Checked before anything starts,
so a port in use ends with one line naming the port (exit code 2) instead of a traceback from deep inside
the DICOM listener or uvicorn's own text."""

from __future__ import annotations

import errno
import socket

from cinesr.model.errors import CineSRError


class PortInUse(CineSRError):
    """A port `cinesr serve` needs is taken (or cannot be bound)."""


def ensure_free(host: str, port: int, what: str) -> None:
    """Raise PortInUse when `port` cannot be bound on `host` (port 0: any free port, nothing to check)."""
    if not port:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # as the servers themselves bind: a socket in TIME_WAIT does not count, a listening one does
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            why = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
            raise PortInUse(f"{what} port {port} on {host} {why}; set {_setting(what)} or stop the other "
                            f"program") from None


def _setting(what: str) -> str:
    return "CINESR_HTTP_PORT" if what == "HTTP" else "CINESR_DICOM_PORT"
