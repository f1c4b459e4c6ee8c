"""One mapping from store refusals to DIMSE statuses, shared by C-STORE, STOW-RS and C-GET retrieval."""

from __future__ import annotations

import errno

import pytest
from cinesr.service.store_errors import (
    MissingAttributes,
    StoreFull,
    StoreHalted,
    UndecodablePixelData,
    refusal_status,
)


@pytest.mark.parametrize(("exc", "status"), [
    (MissingAttributes("no SOPInstanceUID"), 0xA900),
    (UndecodablePixelData("short"), 0xC212),
    (StoreFull("below watermark"), 0xA700),
    (StoreHalted("filing failed"), 0xA701),
    (OSError(errno.ENOSPC, "No space left on device"), 0xA700),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), 0xA700),
    (OSError(errno.EIO, "Input/output error"), 0x0110),  # a processing failure, not out of resources
])
def test_each_refusal_has_one_status(exc: Exception, status: int) -> None:
    assert refusal_status(exc)[0] == status
