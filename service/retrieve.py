"""Pulling a study from the configured PACS: C-FIND to see what it has, then C-MOVE to our own AE title
(the PACS opens associations to our listener) or C-GET (instances come back on our own association); for a
PACS configured by URL, QIDO-RS and WADO-RS.

Every way the instances land in the InstanceStore exactly like pushed ones (bytes as received, durable).
For C-MOVE the PACS must know our AE title, host and DICOM port (a modality entry on the PACS).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from cinesr.service.settings import Settings
from cinesr.worker.errors import PacsUnavailable, RetrieveFailed
from cinesr.worker.network import dicomweb
from cinesr.worker.network.dicomweb import DicomWebNode
from cinesr.worker.network.multipart import MultipartError
from cinesr.worker.network.pacs import DicomNode, associate, find_study_series, make_ae
from pydicom.dataset import Dataset

from .part10 import split_part10, store_part10
from .store import InstanceStore
from .store_errors import SUCCESS, InvalidDataset, StoreFull, refusal_status

LOGGER = logging.getLogger(__name__)

STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
# Storage classes offered for C-GET (one presentation context each; the limit is 128 per association)
GET_STORAGE_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
)
# Images may be stored compressed at the PACS (CineSR's own derived series are JPEG 2000 lossless by default):
# one context per syntax for the image classes, so that the PACS can send each file as it is.
GET_COMPRESSED_SYNTAXES = (
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.5",  # RLE Lossless
)


@dataclass
class RetrieveResult:
    completed: int
    failed: int
    warning: int
    series: list[str]


def study_series_at_pacs(settings: Settings, node: DicomNode | DicomWebNode,
                         study_uid: str) -> list[dict[str, str]]:
    """The study's series at the PACS ([] = the PACS does not have it); raises PacsUnavailable."""
    if isinstance(node, DicomWebNode):
        return dicomweb.find_study_series(node, study_uid)
    return find_study_series(node, study_uid, settings.ae_title)


def _study_query(study_uid: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    return query


def _counts(status: Dataset) -> tuple[int, int, int]:
    return (int(status.get("NumberOfCompletedSuboperations", 0) or 0),
            int(status.get("NumberOfFailedSuboperations", 0) or 0),
            int(status.get("NumberOfWarningSuboperations", 0) or 0))


def move_study(settings: Settings, node: DicomNode, study_uid: str, timeout: float) -> tuple[int, int, int]:
    """C-MOVE the study to our own AE title; returns (completed, failed, warning) sub-operations."""
    ae = make_ae(settings.ae_title, timeout)
    ae.add_requested_context(STUDY_ROOT_MOVE)
    assoc = associate(ae, node)
    final: tuple[int, int, int] | None = None
    try:
        for status, _identifier in assoc.send_c_move(_study_query(study_uid), settings.ae_title, STUDY_ROOT_MOVE):
            if not status:
                raise PacsUnavailable(f"{node}: association lost during C-MOVE")
            code = int(status.Status)
            if code in (0xFF00, 0xFF01):
                continue
            final = _counts(status)
            if code == 0xA801:
                raise RetrieveFailed(f"{node} does not know our AE title {settings.ae_title} as a move destination")
            if code not in (0x0000, 0xB000):
                raise RetrieveFailed(f"C-MOVE from {node} failed with status 0x{code:04X} "
                                     f"({final[0]} instances arrived, {final[1]} failed)")
    finally:
        if assoc.is_established:
            assoc.release()
    return final or (0, 0, 0)


def get_study(settings: Settings, node: DicomNode, study_uid: str, store: InstanceStore,
              timeout: float) -> tuple[int, int, int]:
    """C-GET the study: the PACS sends the instances back on our association; each goes into the store."""
    from pynetdicom import build_role, evt

    ae = make_ae(settings.ae_title, timeout)
    ae.add_requested_context(STUDY_ROOT_GET)
    roles = []
    for sop_class in GET_STORAGE_CLASSES:
        ae.add_requested_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        if sop_class in GET_STORAGE_CLASSES[:4]:  # the image classes
            for syntax in GET_COMPRESSED_SYNTAXES:
                ae.add_requested_context(sop_class, [syntax])
        roles.append(build_role(sop_class, scp_role=True))

    def on_store(event: evt.Event) -> int:
        try:
            request = event.request
            data = request.DataSet.getvalue() if hasattr(request.DataSet, "getvalue") else bytes(request.DataSet)
            store.put(data, str(event.context.transfer_syntax), str(request.AffectedSOPClassUID),
                      str(request.AffectedSOPInstanceUID), node.ae_title)
        except (InvalidDataset, OSError) as exc:  # answered as a C-STORE to our listener would be
            return refusal_status(exc)[0]
        return SUCCESS

    try:
        assoc = ae.associate(node.host, node.port, ae_title=node.ae_title, ext_neg=roles,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    except (OSError, RuntimeError) as exc:
        raise PacsUnavailable(f"cannot reach {node}: {exc}") from exc
    if not assoc.is_established:
        raise PacsUnavailable(f"{node}: association for C-GET not established")
    final: tuple[int, int, int] | None = None
    try:
        for status, _identifier in assoc.send_c_get(_study_query(study_uid), STUDY_ROOT_GET):
            if not status:
                raise PacsUnavailable(f"{node}: association lost during C-GET")
            code = int(status.Status)
            if code in (0xFF00, 0xFF01):
                continue
            final = _counts(status)
            if code not in (0x0000, 0xB000):
                raise RetrieveFailed(f"C-GET from {node} failed with status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    return final or (0, 0, 0)


def wado_study(settings: Settings, node: DicomWebNode, study_uid: str, store: InstanceStore,
               timeout: float) -> tuple[int, int, int]:
    """WADO-RS the study: each Part 10 file of the response goes into the store as the response streams in
    (as a STOW-RS part would); returns (completed, failed, 0). A part the store refuses is counted and logged."""
    completed = failed = 0
    deadline = time.monotonic() + timeout
    writer = store.open_writer(node.name[:16])
    try:
        for part in dicomweb.retrieve_study(node, study_uid, int(settings.stow_max_part_bytes)):
            if time.monotonic() > deadline:
                raise RetrieveFailed(f"WADO-RS of study {study_uid} from {node} took longer than {timeout:.0f} s "
                                     f"({completed} instances arrived)")
            if isinstance(part, str):
                failed += 1
                LOGGER.warning("WADO-RS of study %s from %s: %s", study_uid, node, part)
                continue
            try:
                stored = store_part10(writer, split_part10(part))
            except (InvalidDataset, StoreFull, OSError) as exc:
                failed += 1
                LOGGER.warning("WADO-RS of study %s from %s: an instance was not stored: %s", study_uid, node, exc)
                continue
            if stored.study_uid != study_uid:
                LOGGER.warning("WADO-RS of study %s from %s delivered SOPInstanceUID %s of study %s", study_uid,
                               node, stored.sop_instance_uid, stored.study_uid)
            completed += 1
    except MultipartError as exc:
        raise RetrieveFailed(f"WADO-RS of study {study_uid} from {node}: malformed response: {exc}") from exc
    finally:
        writer.close()
    return completed, failed, 0


def retrieve_study(settings: Settings, node: DicomNode | DicomWebNode, study_uid: str,
                   store: InstanceStore) -> RetrieveResult:
    """Fetch a study into the store by the configured RETRIEVE_METHOD (WADO-RS for a PACS configured by URL);
    files are visible when this returns."""
    timeout = float(getattr(settings, "retrieve_timeout_seconds", 600))
    method = getattr(settings, "retrieve_method", "move")
    if isinstance(node, DicomWebNode):
        method = "wado-rs"
        completed, failed, warning = wado_study(settings, node, study_uid, store, timeout)
    elif method == "get":
        completed, failed, warning = get_study(settings, node, study_uid, store, timeout)
    else:
        completed, failed, warning = move_study(settings, node, study_uid, timeout)
    store.flush(timeout=timeout)  # the instances acknowledged to the PACS are files now
    series = store.series(study_uid)
    LOGGER.info("retrieved study %s from %s by %s: %d instances, %d failed, %d series here", study_uid, node,
                method.upper() if method == "wado-rs" else f"C-{method.upper()}", completed, failed, len(series))
    if not series:
        raise RetrieveFailed(f"retrieval of study {study_uid} from {node} delivered no instances "
                             f"({completed} completed, {failed} failed)")
    return RetrieveResult(completed, failed, warning, series)
