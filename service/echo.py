"""C-ECHO health check of a DICOM node by address (ours or a PACS), and the TLS client context that probes our
own TLS listener."""

from __future__ import annotations

import ssl

from cinesr.worker.network import pacs
from cinesr.worker.network.pacs import DicomNode


def echo(host: str, port: int, called_ae: str, calling_ae: str = "CINESR-PROBE", timeout: float = 5,
         tls: ssl.SSLContext | None = None) -> bool:
    """True if ``called_ae`` at host:port accepts an association and answers C-ECHO with Success (over TLS
    with the given client context): the worker's SCU (cinesr.worker.network.pacs.echo) by address."""
    return pacs.echo(DicomNode(called_ae, host, port), calling_ae, timeout, tls)


def self_check_tls(cert: str, key: str, client_cert_required: bool) -> ssl.SSLContext:
    """A client context for probing our own TLS listener on this host.

    The server is not verified (this checks that our listener answers, over loopback, not who it is). When the
    listener requires client certificates (TLS_CA), the probe presents the listener's own certificate: it must
    be one that TLS_CA accepts.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if client_cert_required:
        context.load_cert_chain(cert, key)
    return context
