"""DICOM Part 10 files arriving over HTTP (STOW-RS parts, WADO-RS responses) into the InstanceStore.

A part is split into its file meta group and the dataset bytes; the dataset goes into the store exactly as
a C-STORE's does (InstanceWriter.begin with the transfer syntax and UIDs, then commit of the bytes as
received), so durability, duplicates, the disk watermark and the routing that follows are the listener's.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .dimse import ACCEPTED_SYNTAXES, is_storage_sop_class
from .store import InstanceWriter, StoredInstance
from .store_errors import InvalidDataset
from .wire import LONG_VRS, scan_dataset


class RefusedPart(InvalidDataset):
    """A file that is not stored: malformed or truncated, not a storage SOP class, or a transfer syntax we do
    not read. ``status`` is the DIMSE/FailureReason code; the UIDs are those the file meta names, if any."""

    def __init__(self, message: str, status: int = 0xC210, sop_class_uid: str = "",
                 sop_instance_uid: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid


@dataclass(frozen=True)
class Part10:
    """A Part 10 file split for the store: what its meta and dataset say, and the dataset bytes."""

    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    dataset: memoryview


def _meta(data: bytes | memoryview) -> tuple[dict[int, str], int]:
    """The text values of the file meta group (element -> value) and where the dataset starts."""
    if len(data) < 132 or bytes(data[128:132]) != b"DICM":
        raise InvalidDataset("not a DICOM Part 10 file (no DICM prefix)")
    values: dict[int, str] = {}
    pos = 132
    while pos + 8 <= len(data):
        group, elem, vr = struct.unpack_from("<HH2s", data, pos)
        if group != 0x0002:
            break
        if vr in LONG_VRS:
            if pos + 12 > len(data):
                break
            length = struct.unpack_from("<I", data, pos + 8)[0]
            value = pos + 12
        else:
            length = struct.unpack_from("<H", data, pos + 6)[0]
            value = pos + 8
        if value + length > len(data):
            raise InvalidDataset("truncated file meta information")
        if vr in (b"UI", b"AE", b"SH"):
            values[elem] = bytes(data[value:value + length]).decode("ascii", "replace").strip("\0 ")
        pos = value + length
    return values, pos


def split_part10(data: bytes | memoryview) -> Part10:
    """Check a Part 10 file and split it; raises RefusedPart with the reason.

    The dataset's own SOP Class/Instance UIDs win over the file meta's (they can disagree in the wild)."""
    view = memoryview(data)
    try:
        meta, start = _meta(view)
    except InvalidDataset as exc:
        raise RefusedPart(str(exc)) from None
    uids = (meta.get(0x0002, ""), meta.get(0x0003, ""))
    transfer_syntax = meta.get(0x0010, "")
    if not transfer_syntax:
        raise RefusedPart("no TransferSyntaxUID in the file meta", 0xC210, *uids)
    if transfer_syntax not in ACCEPTED_SYNTAXES:
        raise RefusedPart(f"transfer syntax {transfer_syntax} not supported", 0xC122, *uids)
    dataset = view[start:]
    try:
        found = scan_dataset(dataset, transfer_syntax)
    except InvalidDataset as exc:  # e.g. 0xC212 for pixel data that cannot decode
        reason = f"truncated or malformed dataset: {exc}" if type(exc) is InvalidDataset else str(exc)
        raise RefusedPart(reason, exc.status, *uids) from None
    sop_class = found.get("sop_class_uid") or uids[0]
    if sop_class and not is_storage_sop_class(sop_class):
        raise RefusedPart("not a storage SOP class", 0x0122, sop_class,
                          found.get("sop_instance_uid") or uids[1])
    return Part10(transfer_syntax, sop_class, found.get("sop_instance_uid") or meta.get(0x0003, ""),
                  found.get("study_uid", ""), found.get("series_uid", ""), dataset)


def store_part10(writer: InstanceWriter, part: Part10) -> StoredInstance:
    """Store the dataset as the listener stores a C-STORE's; raises as InstanceWriter.commit does."""
    writer.begin(part.transfer_syntax, part.sop_class_uid, part.sop_instance_uid)
    return writer.commit(part.dataset)
