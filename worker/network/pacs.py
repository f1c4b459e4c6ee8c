"""Talking to the PACS as an SCU: C-STORE of derived series (several instances per association) and C-FIND.

Failures to reach the peer raise PacsUnavailable (transient); a per-instance refusal is an outcome, not an
exception: the caller records it and decides. Logs carry UIDs and AE titles, never patient attributes.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from cinesr.worker.errors import NotConfigured, PacsUnavailable
from cinesr.worker.network.dicomweb import (
    DicomWebNode,
    pacs_dicomweb_node,
    parse_dicomweb_destination,
    stow_files,
)
from cinesr.worker.network.outcome import StoreOutcome
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

if TYPE_CHECKING:
    from cinesr.worker.settings import WorkerSettings

LOGGER = logging.getLogger(__name__)

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
VERIFICATION = "1.2.840.10008.1.1"
# C-STORE statuses that mean "stored" (success, and the warnings coercion / elements discarded / mismatch)
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}
_NODE_RE = re.compile(r"^\s*([^@\s]{1,16})@([^:\s]+):(\d{1,5})\s*$")


@dataclass(frozen=True)
class DicomNode:
    """A remote application entity."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_node(text: str) -> DicomNode:
    """'AE@host:port' -> DicomNode."""
    match = _NODE_RE.match(text)
    if not match:
        raise NotConfigured(f"invalid DICOM node {text!r} (expected AE@host:port)")
    return DicomNode(match.group(1), match.group(2), int(match.group(3)))


def pacs_node(settings: WorkerSettings) -> DicomNode | DicomWebNode | None:
    """The configured PACS, or None: by URL (PACS_DICOMWEB_URL: STOW-RS, QIDO-RS, WADO-RS) when one is set,
    else by AE title, host and port (C-STORE, C-FIND, C-MOVE/C-GET)."""
    web = pacs_dicomweb_node(settings)
    if web is not None:
        return web
    if not settings.pacs_configured:
        return None
    return DicomNode(settings.pacs_ae_title, settings.pacs_host, settings.pacs_port)


def destinations(settings: WorkerSettings) -> dict[str, DicomNode | DicomWebNode]:
    """Every destination a job may name: the PACS and the DESTINATIONS list (AE@host:port, or
    NAME=https://host/dicom-web for a STOW-RS destination), by AE title or name."""
    nodes: dict[str, DicomNode | DicomWebNode] = {}
    for text in getattr(settings, "destinations", []) or []:
        node = parse_dicomweb_destination(text, settings) or parse_node(text)
        nodes[node.ae_title] = node
    pacs = pacs_node(settings)
    if pacs is not None:
        nodes.setdefault(pacs.ae_title, pacs)
    return nodes


def destination_node(settings: WorkerSettings, destination: str | None) -> DicomNode | DicomWebNode | None:
    """Where a job's results go: the named destination, else the PACS; None when nothing is configured."""
    if destination:
        nodes = destinations(settings)
        if destination not in nodes:
            raise NotConfigured(f"unknown destination {destination!r} (configured: {', '.join(nodes) or 'none'})")
        return nodes[destination]
    return pacs_node(settings)


def make_ae(calling_ae: str, timeout: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = min(timeout, 10)
    return ae


def associate(ae, node: DicomNode, tls: ssl.SSLContext | None = None):  # noqa: ANN001, ANN202
    """An established association with the node (over TLS with a client context), else PacsUnavailable."""
    try:
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title,
                             tls_args=(tls, None) if tls is not None else None)
    except (OSError, RuntimeError) as exc:  # e.g. unresolvable host name
        raise PacsUnavailable(f"cannot reach {node}: {exc}") from exc
    if not assoc.is_established:
        if assoc.is_rejected:
            reason = "association rejected"
        elif assoc.is_aborted:
            reason = "association aborted"
        else:
            reason = "no association (connection refused or timed out)"
        raise PacsUnavailable(f"{node}: {reason}")
    _no_delay(assoc)
    _keep_responses(assoc)
    return assoc


def _keep_responses(assoc) -> None:  # noqa: ANN001 - pynetdicom's Association
    """Put a response that pynetdicom's association thread took back where the waiting operation reads it.

    Between operations that thread serves incoming requests. pynetdicom pauses it before each send, but the
    pause can be seen before the thread has really stopped; a fast peer's response (ours on loopback, with
    Nagle off, answers within a millisecond) can then be taken as an "unexpected C-STORE service message" and
    dropped, and the operation waits out the DIMSE timeout and aborts. Seen once in 5 demo runs here. We send
    requests only, so a message that is not a request is a response to ours: it goes back on the queue."""
    serve = assoc._serve_request
    queue = assoc.dimse.msg_queue

    def requeue_responses(msg, context_id: int) -> None:  # noqa: ANN001 - a DIMSE primitive
        if getattr(msg, "is_valid_request", False):
            serve(msg, context_id)  # a real request (C-GET's C-STORE sub-operations): served as before
        else:
            queue.put((context_id, msg))

    assoc._serve_request = requeue_responses


def _no_delay(assoc) -> None:  # noqa: ANN001 - pynetdicom's Association
    """Turn Nagle's algorithm off on the association's socket. pynetdicom leaves it on, and each C-STORE
    (command and data set sent as separate P-DATA writes) then waits out the peer's delayed ACK: about 50 ms
    per instance on loopback, 64 derived instances 3.7 s instead of 1.2 s."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # not a TCP socket (or already closed): nothing to tune
            pass


def echo(node: DicomNode, calling_ae: str, timeout: float = 10, tls: ssl.SSLContext | None = None) -> bool:
    """C-ECHO over a real association (not a TCP connect): True when the node answers with success. The one
    C-ECHO of CineSR: PACS checks, `cinesr probe dicom` and the listener's self-check use it."""
    ae = make_ae(calling_ae, timeout)
    ae.add_requested_context(VERIFICATION)
    try:
        assoc = associate(ae, node, tls)
    except (PacsUnavailable, ValueError) as exc:  # ValueError: pynetdicom refuses an invalid AE title
        LOGGER.debug("C-ECHO to %s: %s", node, exc)
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0
    finally:
        assoc.release()


def _store_batch(node: DicomNode, calling_ae: str, items: list[tuple[str, Dataset]], timeout: float) -> StoreOutcome:
    ae = make_ae(calling_ae, timeout)
    contexts = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for _, ds in items})
    by_class: dict[str, list[str]] = {}
    for sop_class, ts in contexts:
        by_class.setdefault(sop_class, []).append(ts)
    for sop_class, syntaxes in by_class.items():
        ae.add_requested_context(sop_class, syntaxes)
        if any(UID(ts).is_compressed for ts in syntaxes):  # for a peer that does not take the compressed syntax
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = associate(ae, node)
    outcome = StoreOutcome()
    try:
        for uid, ds in items:
            try:
                try:
                    status = assoc.send_c_store(ds)
                except (ValueError, RuntimeError):  # the compressed syntax was not accepted: send it uncompressed
                    if not ds.file_meta.TransferSyntaxUID.is_compressed:
                        raise
                    ds.decompress(generate_instance_uid=False)
                    status = assoc.send_c_store(ds)
            except (ValueError, RuntimeError) as exc:  # no accepted context for this class/syntax
                outcome.failures[uid] = f"not sent: {exc}"
                continue
            if not status:  # empty status: the association was aborted or timed out
                raise PacsUnavailable(f"{node}: association lost while storing")
            code = int(status.Status)
            if code in _STORED:
                outcome.acknowledged.append(uid)
            else:
                outcome.failures[uid] = f"status 0x{code:04X} {status.get('ErrorComment', '')}".strip()
    except PacsUnavailable as exc:
        exc.outcome = outcome  # type: ignore[attr-defined]  # what got through before the loss
        raise
    finally:
        if assoc.is_established:
            assoc.release()
    return outcome


def store_files(node: DicomNode | DicomWebNode, files: Iterable[Path], calling_ae: str, batch_size: int = 64,
                timeout: float = 30, on_batch: Callable[[StoreOutcome], None] | None = None) -> StoreOutcome:
    """C-STORE every file, batch_size instances per association (STOW-RS, batch_size per request, for a node
    configured by URL).

    on_batch is called after each association with its outcome, so progress survives a later failure.
    Raises PacsUnavailable when an association cannot be made or is lost (after reporting what got through).
    """
    if isinstance(node, DicomWebNode):
        return stow_files(node, files, batch_size, on_batch)
    total = StoreOutcome()
    items: list[tuple[str, Dataset]] = []

    def flush() -> None:
        try:
            outcome = _store_batch(node, calling_ae, items, timeout)
        except PacsUnavailable as exc:
            partial = getattr(exc, "outcome", None)
            if partial is not None and on_batch is not None and (partial.acknowledged or partial.failures):
                on_batch(partial)
            raise
        total.add(outcome)
        if on_batch is not None:
            on_batch(outcome)
        items.clear()

    for path in files:
        ds = pydicom.dcmread(path)
        items.append((str(ds.SOPInstanceUID), ds))
        if len(items) >= batch_size:
            flush()
    if items:
        flush()
    LOGGER.info("stored %d instances at %s (%d refused)", len(total.acknowledged), node, len(total.failures))
    return total


def find(node: DicomNode, calling_ae: str, level: str, keys: dict[str, str], returned: Iterable[str],
         timeout: float = 30) -> list[Dataset]:
    """C-FIND (Study Root) at `level` with matching `keys`; the identifiers of every match."""
    ae = make_ae(calling_ae, timeout)
    ae.add_requested_context(STUDY_ROOT_FIND)
    query = Dataset()
    query.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    for keyword in returned:
        if keyword not in query:
            setattr(query, keyword, "")
    assoc = associate(ae, node)
    matches: list[Dataset] = []
    try:
        for status, identifier in assoc.send_c_find(query, STUDY_ROOT_FIND):
            if not status:
                raise PacsUnavailable(f"{node}: association lost during C-FIND (does the PACS know our AE title "
                                      f"{calling_ae}?)")
            code = int(status.Status)
            if code in (0xFF00, 0xFF01) and identifier is not None:
                matches.append(identifier)
            elif code not in (0x0000, 0xFF00, 0xFF01):
                raise PacsUnavailable(f"{node}: C-FIND failed with status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    return matches


def find_study_series(node: DicomNode, study_uid: str, calling_ae: str, timeout: float = 30) -> list[dict[str, str]]:
    """Series of a study at the PACS: [{series_uid, modality, instances}]; [] when the PACS does not have it."""
    matches = find(node, calling_ae, "SERIES", {"StudyInstanceUID": study_uid},
                   ["SeriesInstanceUID", "Modality", "NumberOfSeriesRelatedInstances"], timeout)
    series = []
    for ds in matches:
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if uid:
            series.append({"series_uid": uid, "modality": str(ds.get("Modality", "") or ""),
                           "instances": str(ds.get("NumberOfSeriesRelatedInstances", "") or "")})
    return series
