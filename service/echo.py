"""C-ECHO health check of a DICOM node (ours or a PACS): a real association, not a TCP connect."""

from __future__ import annotations

import logging
import ssl

from pynetdicom import AE
from pynetdicom.sop_class import Verification

LOGGER = logging.getLogger(__name__)


def echo(host: str, port: int, called_ae: str, calling_ae: str = "CINESR-PROBE", timeout: float = 5,
         tls: ssl.SSLContext | None = None) -> bool:
    """True if ``called_ae`` at host:port accepts an association and answers C-ECHO with Success (over TLS
    with the given client context)."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    try:
        assoc = ae.associate(host, port, ae_title=called_ae, tls_args=(tls, None) if tls is not None else None)
    except (OSError, ValueError) as exc:
        LOGGER.debug("C-ECHO to %s@%s:%s: %s", called_ae, host, port, exc)
        return False
    if not assoc.is_established:
        LOGGER.debug("C-ECHO to %s@%s:%s: association not established", called_ae, host, port)
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and getattr(status, "Status", None) == 0x0000
    finally:
        assoc.release()
        ae.shutdown()


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
