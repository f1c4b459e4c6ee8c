"""Can this Pixel Data be decoded? A check on the encoded bytes, without decoding them.

The store never decodes what it receives (that would cost more than the rest of a C-STORE), so this
checks what can be checked cheaply and refuses what certainly cannot decode:

- native (uncompressed) syntaxes: Pixel Data at least as long as Rows x Columns x Samples x Frames x
  Bits Allocated says (an empty Pixel Data is the extreme case);
- encapsulated (compressed) syntaxes: Pixel Data encapsulated (undefined length, items), with at least
  one non-empty fragment after the offset table, and that fragment starting as its codec's streams
  start (JPEG and JPEG-LS: SOI marker; JPEG 2000 and HTJ2K: SOC+SIZ markers or a JP2 signature box;
  RLE: its 64-byte header with 1-15 segments, the first right after the header).

A codestream whose header is right but whose body is corrupt passes here; the series check before
processing decodes every frame and refuses the series with the reason.
"""

from __future__ import annotations

import struct

_JPEG = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                   "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})
_J2K = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
                  "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"})
_RLE = "1.2.840.10008.1.2.5"
NATIVE = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
                    "1.2.840.10008.1.2.1.99"})

_SOI = b"\xff\xd8"
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  "

_SAMPLES, _PHOTOMETRIC, _FRAMES, _ROWS, _COLUMNS, _BITS = (0x00280002, 0x00280004, 0x00280008, 0x00280010,
                                                           0x00280011, 0x00280100)


def _us(raw: bytes | None, little: bool) -> int | None:
    if raw is None or len(raw) < 2:
        return None
    return struct.unpack_from("<H" if little else ">H", raw)[0]


def _text(raw: bytes | None) -> str:
    return raw.decode("ascii", "replace").strip("\0 ") if raw else ""


def expected_native_length(image: dict[int, bytes], little: bool) -> int:
    """Bytes of native Pixel Data the Image Pixel attributes describe; raises ValueError if they can't."""
    rows, columns, bits = _us(image.get(_ROWS), little), _us(image.get(_COLUMNS), little), _us(image.get(_BITS), little)
    if not rows or not columns or not bits:
        raise ValueError("Pixel Data without Rows, Columns or Bits Allocated")
    samples = _us(image.get(_SAMPLES), little) or 1
    try:
        frames = int(_text(image.get(_FRAMES)) or 1)
    except ValueError:
        raise ValueError("invalid Number of Frames") from None
    if frames < 1:
        raise ValueError("invalid Number of Frames")
    if _text(image.get(_PHOTOMETRIC)).endswith("_422"):
        samples = 2  # 4:2:2 chroma subsampling: two luminance and two chroma samples per pixel pair
    bits_total = rows * columns * samples * frames * bits
    return (bits_total + 7) // 8


def pixel_problem(transfer_syntax: str, little: bool, image: dict[int, bytes], pixel_length: int,
                  fragments: list[tuple[int, int]], buf: bytes | memoryview) -> str | None:
    """Why this Pixel Data cannot be decoded, or None if nothing says it cannot.

    ``pixel_length``: native Pixel Data length, -1 when there is none, -2 when encapsulated;
    ``fragments``: (offset, length) of each encapsulated item, the basic offset table first."""
    if pixel_length == -1:
        return None  # no Pixel Data (e.g. a structured report)
    if transfer_syntax in NATIVE:
        if pixel_length == -2:
            return "encapsulated Pixel Data in an uncompressed transfer syntax"
        if pixel_length == 0:
            return "empty Pixel Data"
        try:
            expected = expected_native_length(image, little)
        except ValueError as exc:
            return str(exc)
        if pixel_length < expected:
            return f"Pixel Data has {pixel_length} bytes, its description needs {expected}"
        return None
    if transfer_syntax not in _JPEG and transfer_syntax not in _J2K and transfer_syntax != _RLE:
        return None  # a syntax not checked here
    if pixel_length != -2:
        return "Pixel Data not encapsulated, as its compressed transfer syntax requires"
    frames = [(offset, length) for offset, length in fragments[1:] if length > 0]
    if not frames:
        return "encapsulated Pixel Data without a fragment"
    offset, length = frames[0]
    head = bytes(buf[offset:offset + min(length, 64)])
    if transfer_syntax in _JPEG and not head.startswith(_SOI):
        return "Pixel Data is not a JPEG stream (no SOI marker)"
    if transfer_syntax in _J2K and not (head.startswith(_J2K_SOC_SIZ) or head.startswith(_JP2_SIGNATURE)):
        return "Pixel Data is not a JPEG 2000 stream (no SOC/SIZ markers)"
    if transfer_syntax == _RLE:
        if len(head) < 64:
            return "Pixel Data is not RLE (fragment shorter than its header)"
        segments, first = struct.unpack_from("<II", head)
        if not 1 <= segments <= 15 or first != 64:
            return "Pixel Data is not RLE (invalid segment header)"
    return None
