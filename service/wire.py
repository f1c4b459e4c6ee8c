"""Encoded DICOM as it comes off the wire, read and built as bytes (nothing is decoded or re-encoded).

A structural walk of a dataset checks it is complete and picks out the UIDs used to file it; the PS3.10
file meta group that precedes the dataset in a stored file is built, and read back, directly as bytes.
"""

from __future__ import annotations

import re
import struct
import zlib

from cinesr.service.pixelcheck import pixel_problem
from cinesr.service.store_errors import InvalidDataset, UndecodablePixelData

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1435.1"  # CineSR implementation class
IMPLEMENTATION_VERSION_NAME = "CINESR_010"

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_valid_uid(uid: str) -> bool:
    """A DICOM UID usable as a path component: digits and dots, at most 64 characters."""
    return 0 < len(uid) <= 64 and _UID_RE.match(uid) is not None


# --------------------------------------------------------------------------------------------
# Minimal parse of an encoded dataset: walk the element structure (without decoding values) to
# check it is complete, and pick out the handful of attributes needed to file it.

_WANTED = {
    0x00080016: "sop_class_uid",
    0x00080018: "sop_instance_uid",
    0x00080060: "modality",
    0x0020000D: "study_uid",
    0x0020000E: "series_uid",
}
# Image Pixel description, kept raw (binary US values need the dataset's byte order): Samples per Pixel,
# Photometric Interpretation, Number of Frames, Rows, Columns, Bits Allocated.
_IMAGE_TAGS = frozenset({0x00280002, 0x00280004, 0x00280008, 0x00280010, 0x00280011, 0x00280100})
_PIXEL_DATA = 0x7FE00010
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
                       b"UT", b"UV"})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


class _Walker:
    """Structural walk of an encoded dataset in one transfer syntax; values are not decoded."""

    def __init__(self, buf: bytes | memoryview, implicit: bool, little: bool) -> None:
        self.buf = buf
        self.end = len(buf)
        self.implicit = implicit
        self.hdr = struct.Struct("<HH" if little else ">HH")
        self.u16 = struct.Struct("<H" if little else ">H")
        self.u32 = struct.Struct("<I" if little else ">I")
        self.found: dict[str, str] = {}
        self.image: dict[int, bytes] = {}  # _IMAGE_TAGS, raw
        self.pixel_length = -1  # native Pixel Data: its length; -1 none, -2 encapsulated
        self.fragments: list[tuple[int, int]] = []  # encapsulated: (offset, length) of each item, offset table first

    def _tag_len(self, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
        """(tag, vr, value length, value offset) of the element at ``pos``."""
        if pos + 8 > self.end:
            raise InvalidDataset(f"truncated element header at byte {pos}")
        group, elem = self.hdr.unpack_from(self.buf, pos)
        tag = group << 16 | elem
        if group == 0xFFFE or implicit:  # item tags never carry a VR
            return tag, None, self.u32.unpack_from(self.buf, pos + 4)[0], pos + 8
        vr = bytes(self.buf[pos + 4:pos + 6])
        if vr in LONG_VRS:
            if pos + 12 > self.end:
                raise InvalidDataset(f"truncated element header at byte {pos}")
            return tag, vr, self.u32.unpack_from(self.buf, pos + 8)[0], pos + 12
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise InvalidDataset(f"invalid VR at byte {pos}")
        return tag, vr, self.u16.unpack_from(self.buf, pos + 6)[0], pos + 8

    def dataset(self, pos: int, implicit: bool, top: bool, stop_at_item_end: bool) -> int:
        """Walk elements from ``pos``; return the offset after the dataset (or item delimiter)."""
        last_tag = -1
        while pos < self.end:
            tag, vr, length, value = self._tag_len(pos, implicit)
            if tag == _ITEM_END:
                if not stop_at_item_end:
                    raise InvalidDataset(f"unexpected item delimiter at byte {pos}")
                return value
            if tag <= last_tag and top:
                raise InvalidDataset(f"elements out of order at byte {pos}")
            last_tag = tag
            if length == _UNDEFINED:
                # a sequence, an encapsulated pixel data element, or UN holding implicit VR LE
                nested_implicit = implicit or vr == b"UN"
                pixels = top and tag == _PIXEL_DATA
                if pixels:
                    self.pixel_length = -2
                pos = self.items(value, nested_implicit, encapsulated=vr in (b"OB", b"OW"),
                                 fragments=self.fragments if pixels else None)
                continue
            pos = value + length
            if pos > self.end:
                raise InvalidDataset(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) runs past the end")
            if top and tag in _WANTED:
                raw = bytes(self.buf[value:pos])
                self.found[_WANTED[tag]] = raw.decode("ascii", "replace").strip("\0 ")
            elif top and tag in _IMAGE_TAGS:
                self.image[tag] = bytes(self.buf[value:pos])
            elif top and tag == _PIXEL_DATA:
                self.pixel_length = length
        if stop_at_item_end:
            raise InvalidDataset("item without delimiter at end of data")
        return pos

    def items(self, pos: int, implicit: bool, encapsulated: bool,
              fragments: list[tuple[int, int]] | None = None) -> int:
        """Walk the items of an undefined-length element up to its sequence delimiter."""
        while True:
            tag, _vr, length, value = self._tag_len(pos, True)
            if tag == _SEQ_END:
                return value
            if tag != _ITEM:
                raise InvalidDataset(f"expected an item at byte {pos}")
            if length == _UNDEFINED and not encapsulated:
                pos = self.dataset(value, implicit, top=False, stop_at_item_end=True)
            elif length == _UNDEFINED:
                raise InvalidDataset("undefined-length fragment in encapsulated pixel data")
            else:
                pos = value + length
                if pos > self.end:
                    raise InvalidDataset("item runs past the end of the data")
                if fragments is not None:
                    fragments.append((value, length))


def scan_dataset(data: bytes | memoryview, transfer_syntax: str) -> dict[str, str]:
    """Check an encoded dataset is structurally complete; return the attributes used for filing.

    Raises InvalidDataset for truncated or malformed data, UndecodablePixelData for pixel data that
    certainly cannot be decoded (cinesr.service.pixelcheck).
    """
    syntax = transfer_syntax
    if transfer_syntax == DEFLATED_EXPLICIT_VR_LE:
        try:
            data = zlib.decompress(bytes(data), -15)
        except zlib.error as exc:
            raise InvalidDataset(f"cannot inflate deflated dataset: {exc}") from None
        transfer_syntax = EXPLICIT_VR_LE
    if len(data) < 8:
        raise InvalidDataset("empty dataset")
    walker = _Walker(data, transfer_syntax == IMPLICIT_VR_LE, transfer_syntax != EXPLICIT_VR_BE)
    try:
        walker.dataset(0, walker.implicit, top=True, stop_at_item_end=False)
    except struct.error as exc:
        raise InvalidDataset(f"truncated dataset: {exc}") from None
    problem = pixel_problem(syntax, transfer_syntax != EXPLICIT_VR_BE, walker.image, walker.pixel_length,
                            walker.fragments, data)
    if problem:
        raise UndecodablePixelData(problem)
    return walker.found


# --------------------------------------------------------------------------------------------
# File meta information, built directly as bytes (explicit VR little endian, group 0002).


def _meta_element(elem: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr in (b"UI", b"OB") else b" "
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 2, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", 2, elem, vr, len(value)) + value


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
                    source_ae: str = "") -> bytes:
    """Preamble + ``DICM`` + file meta group (PS3.10) for an instance."""
    body = b"".join([
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", sop_class_uid.encode()),
        _meta_element(0x0003, b"UI", sop_instance_uid.encode()),
        _meta_element(0x0010, b"UI", transfer_syntax.encode()),
        _meta_element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode()),
        _meta_element(0x0013, b"SH", IMPLEMENTATION_VERSION_NAME.encode()),
    ] + ([_meta_element(0x0016, b"AE", source_ae.strip().encode("ascii", "replace")[:16])]
         if source_ae.strip() else []))
    return b"\0" * 128 + b"DICM" + struct.pack("<HH2sHI", 2, 0, b"UL", 4, len(body)) + body


def meta_value(meta: bytes, elem: int) -> str:
    """A text value from an explicit-VR-LE file meta group (after the group length)."""
    pos = 0
    while pos + 8 <= len(meta):
        _group, e, vr = struct.unpack_from("<HH2s", meta, pos)
        if vr in LONG_VRS:
            length = struct.unpack_from("<I", meta, pos + 8)[0]
            value = pos + 12
        else:
            length = struct.unpack_from("<H", meta, pos + 6)[0]
            value = pos + 8
        if e == elem:
            return meta[value:value + length].decode("ascii", "replace").strip("\0 ")
        pos = value + length
    return ""
