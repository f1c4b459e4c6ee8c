"""C-ECHO health check of a DICOM node (ours or a PACS): a real association, not a TCP connect."""

from __future__ import annotations

import logging

from pynetdicom import AE
from pynetdicom.sop_class import Verification

LOGGER = logging.getLogger(__name__)


def echo(host: str, port: int, called_ae: str, calling_ae: str = "CINESR-PROBE", timeout: float = 5) -> bool:
    """True if ``called_ae`` at host:port accepts an association and answers C-ECHO with Success."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    try:
        assoc = ae.associate(host, port, ae_title=called_ae)
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
