"""Why the store refuses an instance, and the one DIMSE status each reason answers with.

C-STORE (listener), STOW-RS (FailureReason) and C-GET retrieval (the C-STORE sub-operations we answer)
all report a refused instance by ``refusal_status``, so the three cannot drift apart.
"""

from __future__ import annotations

import errno

# DIMSE status codes
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # disk below the watermark, or an instance beyond the receive budget
STORE_HALTED = 0xA701  # out of resources: the store's background filing is failing (it retries)
CANNOT_UNDERSTAND = 0xC210
DATASET_DOES_NOT_MATCH = 0xA900
DUPLICATE_CONFLICT = 0xB006  # warning, elements discarded: a duplicate SOPInstanceUID with other content
PROCESSING_FAILURE = 0x0110
UNRECOGNIZED_OPERATION = 0x0211


class InvalidDataset(ValueError):
    """The received dataset cannot be parsed or lacks the UIDs needed to file it.

    ``status`` is the DIMSE failure status a C-STORE answers with (STOW-RS reports it as FailureReason)."""

    status = CANNOT_UNDERSTAND


class MissingAttributes(InvalidDataset):
    """The dataset parses but lacks a UID needed to file it (Study/Series/SOP Instance)."""

    status = DATASET_DOES_NOT_MATCH


class SopClassMismatch(InvalidDataset):
    """The request's SOP Class UID is not the dataset's (or not its presentation context's)."""

    status = DATASET_DOES_NOT_MATCH


class SopInstanceMismatch(InvalidDataset):
    """The request's SOP Instance UID is not the dataset's: filing it would take another instance's name."""

    status = 0xC211


class UndecodablePixelData(InvalidDataset):
    """Pixel data that cannot be decoded: too short for its description, or not in its transfer syntax."""

    status = 0xC212


class StoreFull(OSError):
    """Free disk space is below the configured watermark; nothing was written."""


class StoreHalted(OSError):
    """The store's background filing failed (e.g. disk full); nothing new is accepted until it recovers."""


def refusal_status(exc: Exception) -> tuple[int, str]:
    """The DIMSE status and comment for an instance the store refused with ``exc``.

    InvalidDataset carries its own status (0xA900, 0xC210-0xC212); StoreFull and any OSError for a full
    disk or quota answer out of resources (0xA700), StoreHalted 0xA701; any other OSError is a processing
    failure (0x0110)."""
    if isinstance(exc, InvalidDataset):
        return exc.status, str(exc)
    if isinstance(exc, StoreFull):
        return OUT_OF_RESOURCES, "disk space below watermark"
    if isinstance(exc, StoreHalted):
        return STORE_HALTED, str(exc)
    if isinstance(exc, OSError):
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        return OUT_OF_RESOURCES if full else PROCESSING_FAILURE, exc.strerror or "storage error"
    raise TypeError(f"not a store refusal: {exc!r}") from exc
