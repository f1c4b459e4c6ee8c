"""STOW-RS (DICOMweb store, PS3.18 10.5): POST /dicomweb/studies[/{study}] with multipart/related parts of
type application/dicom, each a DICOM Part 10 file.

Each part goes into the InstanceStore exactly as a C-STORE's dataset does (cinesr.service.part10), so it is
durable before the response, duplicates are recognised, the disk watermark applies, and a pushed cine
series is routed and processed like one that came over DIMSE. The body is read as a stream: parts are
stored as they complete, one part at a time in memory, within STOW_MAX_PART_BYTES per part and
STOW_MAX_REQUEST_BYTES per request.

The bearer token is checked by a dependency of the router (see gateway.create_app), before the body is read.

Response (application/dicom+json): ReferencedSOPSequence for what was stored; FailedSOPSequence with a
FailureReason (and an ErrorComment with the reason in words) for each part that was not; a WarningReason
0xB006 on a referenced instance whose SOPInstanceUID we already held with other content (the first copy is
kept). 200: all stored; 202: some parts failed, or a warning; 409: none stored. Request-level faults are
JSON {"detail": reason}: 415 not multipart/related or a type other than application/dicom, 400 a body that
cannot be split into parts, 413 a body over the limit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Annotated, Any

from cinesr.worker.network.multipart import MultipartError, MultipartReader, Part, parse_content_type
from fastapi import APIRouter, Path, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from .part10 import RefusedPart, split_part10, store_part10
from .store import InstanceWriter
from .store_errors import (
    CANNOT_UNDERSTAND,
    DUPLICATE_CONFLICT,
    OUT_OF_RESOURCES,
    InvalidDataset,
    StoreFull,
    StoreHalted,
    refusal_status,
)

LOGGER = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
UID_PATTERN = r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$"
# FailureReason for an instance of another study than the one in the request's path (PS3.18 leaves the code
# to the origin server within the "cannot understand" range; this is the one other archives use).
STUDY_MISMATCH = 0xC409


@dataclass
class StowOutcome:
    """What one request did: instances stored (class, instance) and parts refused (class, instance, code, why)."""

    referenced: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str, int, str]] = field(default_factory=list)
    new: int = 0  # instances not already here
    warnings: dict[str, int] = field(default_factory=dict)  # SOP instance -> WarningReason (a duplicate that differs)


def _refuse(outcome: StowOutcome, part: Part, code: int, reason: str, sop_class: str = "",
            sop_instance: str = "") -> None:
    outcome.failed.append((sop_class, sop_instance, code, f"part {part.index}: {reason}"))


def store_part(writer: InstanceWriter, part: Part, study_uid: str | None, outcome: StowOutcome) -> None:
    """Store one part (blocking: a durable write), recording success or the reason it failed."""
    if part.error is not None:
        code = OUT_OF_RESOURCES if "larger than" in part.error else CANNOT_UNDERSTAND
        _refuse(outcome, part, code, part.error)
        return
    if part.content_type and part.content_type != "application/dicom":
        _refuse(outcome, part, CANNOT_UNDERSTAND, f"Content-Type {part.content_type[:30]} is not DICOM")
        return
    try:
        instance = split_part10(part.data or b"")
    except RefusedPart as exc:
        _refuse(outcome, part, exc.status, str(exc), exc.sop_class_uid, exc.sop_instance_uid)
        return
    uids = (instance.sop_class_uid, instance.sop_instance_uid)
    if study_uid is not None and instance.study_uid != study_uid:
        _refuse(outcome, part, STUDY_MISMATCH, f"of another study: {instance.study_uid or '(none)'}", *uids)
        return
    try:
        stored = store_part10(writer, instance)
    except (InvalidDataset, OSError) as exc:  # InvalidDataset: 0xA900 a UID missing, 0xC212 pixel data, ...
        if isinstance(exc, OSError) and not isinstance(exc, (StoreFull, StoreHalted)):
            LOGGER.exception("could not store SOPInstanceUID %s", instance.sop_instance_uid)
        _refuse(outcome, part, *refusal_status(exc), *uids)
    else:
        outcome.referenced.append((stored.sop_class_uid, stored.sop_instance_uid))
        outcome.new += not stored.duplicate
        if stored.conflict:  # the first copy is kept; the store logged it at WARNING
            outcome.warnings[stored.sop_instance_uid] = DUPLICATE_CONFLICT


def _element(vr: str, value: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": [value]} if value not in ("", None) else {"vr": vr}


def store_response(outcome: StowOutcome) -> dict[str, Any]:
    """The Store Instances Response Module (PS3.18 10.5.3) as DICOM JSON."""
    referenced = [{"00081150": _element("UI", c), "00081155": _element("UI", i)} for c, i in outcome.referenced]
    for item, (_c, instance) in zip(referenced, outcome.referenced, strict=True):
        if instance in outcome.warnings:
            item["00081196"] = _element("US", outcome.warnings[instance])  # WarningReason
    failed = []
    for sop_class, sop_instance, code, reason in outcome.failed:
        # ErrorComment is an LO (64 characters at most): reasons are written short; the log has them whole
        item = {"00081197": _element("US", code), "00000902": _element("LO", reason[:64])}
        if sop_class:
            item["00081150"] = _element("UI", sop_class)
        if sop_instance:
            item["00081155"] = _element("UI", sop_instance)
        failed.append(item)
    body: dict[str, Any] = {}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    body["00081199"] = {"vr": "SQ", "Value": referenced} if referenced else {"vr": "SQ"}
    return body


def _problem(status: int, detail: str, outcome: StowOutcome | None = None) -> JSONResponse:
    if outcome is not None and outcome.referenced:
        detail += f" ({len(outcome.referenced)} instances before it were stored)"
    return JSONResponse({"detail": detail}, status_code=status)


async def receive(request: Request, study_uid: str | None) -> Response:
    """Read the body part by part into the store; answer with the store response."""
    service = request.app.state.service
    settings = service.settings
    max_request = int(settings.stow_max_request_bytes)
    media, params = parse_content_type(request.headers.get("content-type", ""))
    if media != "multipart/related":
        return _problem(415, f"Content-Type must be multipart/related; type=\"application/dicom\" (got "
                             f"{media or 'none'})")
    part_type = params.get("type", "application/dicom").lower()
    if part_type != "application/dicom":
        return _problem(415, f"only parts of type application/dicom are accepted (got type={part_type}); "
                             "metadata and bulk data uploads are not supported")
    boundary = params.get("boundary", "")
    if not boundary:
        return _problem(400, "multipart/related without a boundary parameter")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_request:
        return _problem(413, f"request body of {declared} bytes is larger than the limit of {max_request} bytes")
    try:
        reader = MultipartReader(boundary, int(settings.stow_max_part_bytes))
    except MultipartError as exc:
        return _problem(400, str(exc))
    outcome = StowOutcome()
    writer = service.store.open_writer()
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_request:
                return _problem(413, f"request body larger than the limit of {max_request} bytes", outcome)
            for part in reader.feed(chunk):
                await run_in_threadpool(store_part, writer, part, study_uid, outcome)
        for part in reader.close():
            await run_in_threadpool(store_part, writer, part, study_uid, outcome)
    except MultipartError as exc:
        return _problem(400, f"malformed multipart body: {exc}", outcome)
    except ClientDisconnect:
        LOGGER.warning("STOW-RS client went away after %d bytes (%d instances stored)", received,
                       len(outcome.referenced))
        return Response(status_code=400)
    finally:
        writer.close()
    if reader.parts_seen == 0:
        return _problem(400, "the multipart body holds no parts")
    status = 200 if not (outcome.failed or outcome.warnings) else 202 if outcome.referenced else 409
    LOGGER.info("STOW-RS: %d parts, %d stored (%d new), %d failed -> %d", reader.parts_seen,
                len(outcome.referenced), outcome.new, len(outcome.failed), status)
    for _sop_class, sop_instance, code, reason in outcome.failed:
        LOGGER.warning("STOW-RS: SOPInstanceUID %s not stored (0x%04X): %s", sop_instance or "?", code, reason)
    return JSONResponse(store_response(outcome), status_code=status, media_type=DICOM_JSON)


_BODY = {"required": True, "description": "One DICOM Part 10 file per part",
         "content": {'multipart/related; type="application/dicom"': {"schema": {"type": "string",
                                                                                "format": "binary"}}}}
_STORE_RESPONSE = {"content": {DICOM_JSON: {"schema": {"type": "object", "description":
                   "Store Instances Response Module (PS3.18 10.5.3): 00081199 ReferencedSOPSequence, "
                   "00081198 FailedSOPSequence (00081197 FailureReason, 00000902 ErrorComment)"}}}}
_PROBLEM = {"content": {"application/json": {"schema": {"type": "object", "properties":
                                                        {"detail": {"type": "string"}}}}}}
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Every instance stored", **_STORE_RESPONSE},
    202: {"description": "Some instances stored, the others listed in FailedSOPSequence", **_STORE_RESPONSE},
    409: {"description": "No instance stored; FailedSOPSequence says why for each part", **_STORE_RESPONSE},
    400: {"description": "The body cannot be split into parts (no boundary, malformed, no parts)", **_PROBLEM},
    401: {"description": "No or invalid bearer token", **_PROBLEM},
    413: {"description": "Request body over STOW_MAX_REQUEST_BYTES", **_PROBLEM},
    415: {"description": "Not multipart/related, or a type other than application/dicom", **_PROBLEM},
}

router = APIRouter(tags=["DICOMweb"])


@router.post("/dicomweb/studies", responses=RESPONSES, openapi_extra={"requestBody": _BODY},
             response_class=JSONResponse)
async def stow_studies(request: Request) -> Response:
    """STOW-RS: store DICOM instances of any studies. Stored instances are processed like pushed ones:
    an eligible cine series is super-resolved once it has been quiet for SERIES_STABLE_SECONDS."""
    return await receive(request, None)


@router.post("/dicomweb/studies/{study_uid}", responses=RESPONSES, openapi_extra={"requestBody": _BODY},
             response_class=JSONResponse)
async def stow_study(request: Request,
                     study_uid: Annotated[str, Path(pattern=UID_PATTERN, max_length=64)]) -> Response:
    """STOW-RS: store DICOM instances of one study; instances of another study fail (FailureReason C409)."""
    return await receive(request, study_uid)
