"""Durable store of received DICOM instances.

Layout: ``<root>/instances/<StudyUID>/<SeriesUID>/<SOPInstanceUID>.dcm``, each file being the
bytes as received (128-byte preamble, ``DICM``, a file meta group built from the C-STORE request,
then the encoded dataset exactly as it came off the wire). Nothing is decoded or re-encoded: a
structural walk of the dataset checks it is complete and reads the UIDs used to file it.

Durability ("success only after the bytes are on stable storage") has two strategies:

``journal`` (default)
    Each association owns a segment of a write-ahead journal (``<root>/journal``). A dataset is
    written into it as its PDUs arrive (with early writeback), and at the last fragment the
    record header goes in and one ``fdatasync`` makes it durable. Segments are zero-filled ahead
    of time and recycled, so that flush is a data write + device flush, not an ext4 metadata
    commit (measured here ~0.2 ms against ~0.55 ms for fsync of a new file + its directory).
    A background applier, once arrivals pause (or the journal fills), writes each instance's
    file (temp name, in-kernel copy from the journal, rename), fsyncs files and directories in
    batches and recycles the journal space. On open, records not yet checkpointed are replayed.
``file``
    Temp file, ``fdatasync``, rename, directory fsync (group-committed across threads), then
    success. Simpler; the file is visible when ``put`` returns.

Either way a visible ``.dcm`` file is complete (rename is atomic), and a crash loses only
instances that were never acknowledged. If the applier cannot file (a full disk), it retries the same
instance until it can, and meanwhile the store refuses new instances (StoreHalted; ``fault`` says why):
nothing is acknowledged that cannot be filed, and nothing acknowledged is skipped.
Records carry a per-segment random nonce and a CRC, so
torn writes, stale bytes of a recycled segment or crafted data never replay as instances.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from cinesr.service.pixelcheck import pixel_problem

LOGGER = logging.getLogger(__name__)

Durability = Literal["journal", "file"]

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1435.1"  # CineSR implementation class
IMPLEMENTATION_VERSION_NAME = "CINESR_010"

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class InvalidDataset(ValueError):
    """The received dataset cannot be parsed or lacks the UIDs needed to file it.

    ``status`` is the DIMSE failure status a C-STORE answers with (STOW-RS reports it as FailureReason)."""

    status = 0xC210  # Cannot understand


class MissingAttributes(InvalidDataset):
    """The dataset parses but lacks a UID needed to file it (Study/Series/SOP Instance)."""

    status = 0xA900  # Data Set does not match SOP Class


class SopClassMismatch(InvalidDataset):
    """The request's SOP Class UID is not the dataset's (or not its presentation context's)."""

    status = 0xA900


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


def is_valid_uid(uid: str) -> bool:
    """A DICOM UID usable as a path component: digits and dots, at most 64 characters."""
    return 0 < len(uid) <= 64 and _UID_RE.match(uid) is not None


@dataclass(frozen=True)
class StoredInstance:
    """What the store knows about one instance; ``duplicate`` marks one it already had (``conflict``: with
    other content; the first copy is the one kept)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    transfer_syntax: str
    path: Path
    duplicate: bool = False
    conflict: bool = False  # a duplicate whose content differs from the copy kept


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
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
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
        if vr in _LONG_VRS:
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


# --------------------------------------------------------------------------------------------
# Write-ahead journal.
#
# A segment file: a 4 KiB header block (magic, sequence number, random nonce), then records.
# A record: header, then the payload = the instance's file bytes followed by a text block (the UIDs
# used to file it). An association owns one segment at a time and streams each dataset into it as
# the PDUs arrive (with early writeback), so at the end of a C-STORE only the tail, the record
# header and one flush remain. The nonce in every record keeps stale or crafted bytes (an older
# use of a recycled segment, an aborted record's data) from ever parsing as a record.

_SEG_MAGIC = b"CSRS"
_SEG_HEAD = struct.Struct("<4sQQ")  # magic, sequence number, nonce
_SEG_DATA = 4096  # records start after the header block
_REC_MAGIC = b"CSRJ"
_REC_HEAD = struct.Struct("<4sQQII")  # magic, sequence, nonce, payload length, crc32(payload)
_STR_HEAD = struct.Struct("<IHHHHHH")  # file-bytes length, then the lengths of the six text fields
_ZEROS = bytes(1 << 20)

try:  # start writeback of streamed data at once, so the final flush has little left to write
    import ctypes

    _libc = ctypes.CDLL(None, use_errno=True)
    _sync_file_range = _libc.sync_file_range
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]

    def _start_writeback(fd: int, offset: int, length: int) -> None:
        _sync_file_range(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE: asynchronous
except (OSError, AttributeError):  # not Linux: fdatasync alone still makes it durable
    def _start_writeback(fd: int, offset: int, length: int) -> None:
        return None

try:  # one call makes a whole checkpoint batch durable (~0.1 s against ~1.6 s for 300 fdatasyncs)
    _syncfs_call = ctypes.CDLL(None, use_errno=True).syncfs
    _syncfs_call.argtypes = [ctypes.c_int]
except (OSError, AttributeError, NameError):
    _syncfs_call = None


def _sync_files(fds: list[int], directories: set[Path], anchor: Path) -> None:
    """Make these files' data and these directories' entries durable, then close the files."""
    if _syncfs_call is not None and len(fds) > 4:
        for fd in fds:
            os.close(fd)
        dir_fd = os.open(anchor, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if _syncfs_call(dir_fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"syncfs failed: {os.strerror(err)}")
        finally:
            os.close(dir_fd)
        return
    try:
        for fd in fds:
            os.fdatasync(fd)
    finally:
        for fd in fds:
            os.close(fd)
    for directory in directories:
        _fsync_dir(directory)


def _text_block(file_length: int, info: StoredInstance) -> bytes:
    texts = [s.encode() for s in (info.study_uid, info.series_uid, info.sop_instance_uid,
                                  info.sop_class_uid, info.modality, info.transfer_syntax)]
    return _STR_HEAD.pack(file_length, *(len(t) for t in texts)) + b"".join(texts)


def _decode_segment(buf: bytes, expected_seq: int) -> Iterator[tuple[list[str], bytes]]:
    """Committed records of the segment file named ``<expected_seq>.wal``."""
    if len(buf) < _SEG_DATA:
        return
    magic, seq, nonce = _SEG_HEAD.unpack_from(buf, 0)
    if magic != _SEG_MAGIC or seq != expected_seq:
        return  # e.g. a recycled spare renamed, but its new header not yet on disk at a crash
    pos = _SEG_DATA
    while pos + _REC_HEAD.size <= len(buf):
        magic, rec_seq, rec_nonce, length, crc = _REC_HEAD.unpack_from(buf, pos)
        start = pos + _REC_HEAD.size
        payload = buf[start:start + length]
        # End of the committed part: zeros, a stale record, or a torn one (never acknowledged).
        if (magic != _REC_MAGIC or rec_seq != seq or rec_nonce != nonce or len(payload) != length
                or zlib.crc32(payload) != crc):
            return
        text_start = len(payload) - struct.unpack_from("<I", payload, len(payload) - 4)[0]
        file_length, *lens = _STR_HEAD.unpack_from(payload, text_start)
        if file_length != text_start:
            return
        off = text_start + _STR_HEAD.size
        texts = []
        for n in lens:
            texts.append(payload[off:off + n].decode())
            off += n
        yield texts, payload[:file_length]
        pos = start + length


def _zero_fill(path: Path, size: int) -> None:
    """Create a segment whose blocks are written (zeros): later overwrites change no metadata, so
    fdatasync is one data write + flush instead of an ext4 journal commit (~0.2 vs ~0.4 ms)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        left = size
        while left > 0:
            left -= os.write(fd, _ZEROS[:min(left, len(_ZEROS))])
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _Segment:
    seq: int
    fd: int
    size: int
    nonce: int
    tail: int = _SEG_DATA
    outstanding: int = 0  # committed records not yet checkpointed as files
    owned: bool = False


class _Journal:
    """Segments of the write-ahead journal; each is owned by at most one writer at a time."""

    def __init__(self, directory: Path, segment_size: int, spares: int,
                 reserve: Callable[[int], None] = lambda n: None) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.segment_size = segment_size
        self.max_spares = spares
        self.reserve = reserve  # raises StoreFull if writing that many bytes would cross the watermark
        self.lock = threading.Lock()
        existing = [int(p.stem) for p in self.dir.glob("*.wal")]
        self._seq = max(existing, default=0) + 1
        self.active: dict[int, _Segment] = {}
        self._spares = [p for p in self.dir.glob("*.spare") if p.stat().st_size == segment_size]
        for p in self.dir.glob("*.spare"):
            if p not in self._spares:
                p.unlink()
        for p in self._spares[spares:]:  # the spare count was lowered since
            p.unlink()
        del self._spares[spares:]
        self._spare_n = 0

    def segment_files(self) -> list[Path]:
        return sorted(self.dir.glob("*.wal"), key=lambda p: int(p.stem))

    def prepare_spares(self) -> None:
        """Zero-fill spare segments (at start, or when idle; never while instances stream in).

        Spares only make flushes cheaper: on a volume near its free-space watermark none are made (a
        spare must not take the space instances need), and a failure to make one is logged, not raised."""
        made = False
        while len(self._spares) < self.max_spares:
            path = self.dir / f"prepared-{os.getpid()}-{self._spare_n}.spare"
            self._spare_n += 1
            if path.exists():
                continue
            try:
                self.reserve(self.segment_size)
                _zero_fill(path, self.segment_size)
            except StoreFull:
                LOGGER.debug("no spare journal segment prepared: free space is near the watermark")
                break
            except OSError as exc:
                path.unlink(missing_ok=True)
                LOGGER.warning("could not prepare a spare journal segment: %s", exc.strerror or exc)
                break
            with self.lock:
                self._spares.append(path)
            made = True
        if made:
            _fsync_dir(self.dir)

    def _activate(self, min_size: int) -> _Segment:
        """A new segment (caller holds the lock): a spare if one is ready, else fallocate."""
        seq = self._seq
        self._seq += 1
        path = self.dir / f"{seq:012d}.wal"
        if min_size <= self.segment_size and self._spares:
            os.rename(self._spares.pop(), path)
            fd = os.open(path, os.O_RDWR)
            size = self.segment_size
        else:  # no spare ready, or a huge instance: unwritten extents, slower flushes
            size = max(self.segment_size, min_size)
            try:  # the free-space check comes before the blocks are taken
                self.reserve(size)
            except StoreFull:
                if size == min_size:
                    raise
                size = min_size  # near the watermark: only what this instance needs
                self.reserve(size)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError:
                os.close(fd)
                path.unlink(missing_ok=True)
                raise
        nonce = int.from_bytes(os.urandom(8), "little")
        os.pwrite(fd, _SEG_HEAD.pack(_SEG_MAGIC, seq, nonce).ljust(_SEG_DATA, b"\0"), 0)
        os.fsync(fd)
        _fsync_dir(self.dir)
        segment = _Segment(seq, fd, size, nonce)
        self.active[seq] = segment
        return segment

    def acquire(self, min_free: int) -> _Segment:
        """An active segment with at least ``min_free`` bytes left, owned by the caller."""
        with self.lock:
            free = [s for s in self.active.values() if not s.owned and s.size - s.tail >= min_free]
            segment = max(free, key=lambda s: s.size - s.tail) if free else self._activate(min_free + _SEG_DATA)
            segment.owned = True
            return segment

    def give_back(self, segment: _Segment) -> None:
        with self.lock:
            segment.owned = False
            self._maybe_retire(segment)

    def checkpointed(self, counts: dict[int, int]) -> None:
        """Records now safe as files: segments left with none (and no owner) can be recycled."""
        retired = False
        with self.lock:
            for seq, n in counts.items():
                segment = self.active.get(seq)
                if segment is not None:
                    segment.outstanding -= n
                    retired = self._maybe_retire(segment) or retired
        if retired:
            _fsync_dir(self.dir)

    def _maybe_retire(self, segment: _Segment, force: bool = False) -> bool:
        """Retire a segment nobody writes to and whose records are all files: it becomes a spare (up to
        the spare count) or is deleted, so the journal holds only what is in use plus the spares.
        (``force`` is kept for close(); retiring no longer waits for a segment to be half used.)"""
        if segment.owned or segment.outstanding > 0 or self.active.get(segment.seq) is not segment:
            return False  # in use, or already retired
        del self.active[segment.seq]
        os.close(segment.fd)
        path = self.dir / f"{segment.seq:012d}.wal"
        try:
            if len(self._spares) < self.max_spares and segment.size == self.segment_size:
                spare = self.dir / f"recycled-{segment.seq}.spare"
                os.rename(path, spare)
                self._spares.append(spare)
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:  # left for the next start, whose replay finds only records already filed
            LOGGER.warning("could not retire journal segment %d: %s", segment.seq, exc.strerror or exc)
        return True

    def retire_file(self, path: Path) -> None:
        """A segment left over from before a restart, its records replayed."""
        with self.lock:
            if len(self._spares) < self.max_spares and path.stat().st_size == self.segment_size:
                spare = self.dir / f"recycled-{path.stem}.spare"
                os.rename(path, spare)
                self._spares.append(spare)
            else:
                path.unlink()

    def close(self) -> None:
        with self.lock:
            for segment in list(self.active.values()):
                segment.owned = False
                if not self._maybe_retire(segment, force=True):
                    os.close(segment.fd)
                    del self.active[segment.seq]
        _fsync_dir(self.dir)


class _JournalRecord:
    """One instance being streamed into a segment owned by an InstanceWriter."""

    def __init__(self, journal: _Journal, segment: _Segment | None, meta: bytes) -> None:
        self.journal = journal
        self.segment = segment
        self.meta = meta
        self.fed = 0  # dataset bytes written so far
        self.crc = zlib.crc32(meta)
        self.start = 0
        self.meta_written = False
        if segment is not None:
            self._place(segment)

    def _place(self, segment: _Segment) -> None:
        self.segment = segment
        self.start = segment.tail
        self.meta_written = False  # written together with the first dataset bytes

    def _data_offset(self) -> int:
        return self.start + _REC_HEAD.size + len(self.meta)

    def feed(self, received: memoryview, reserve: int = 0, trailer: bytes = b"") -> None:
        """Write the dataset bytes received since the last call (``received`` holds them all).

        ``trailer`` (the record's text block, at commit) is written right after them."""
        new = received[self.fed:]
        segment = self.segment
        assert segment is not None
        if self._data_offset() + len(received) + reserve > segment.size:
            # Doesn't fit: move to a segment with room, rewriting what was streamed so far. The new one is
            # taken first, so that if it cannot be (StoreFull) the writer still owns the old one.
            bigger = self.journal.acquire(2 * (len(self.meta) + len(received) + reserve) + _REC_HEAD.size)
            self.journal.give_back(segment)
            self._place(bigger)
            self.crc = zlib.crc32(self.meta)
            new = received
        offset = self._data_offset() + len(received) - len(new)
        parts = [new] if new else []
        if not self.meta_written:
            offset -= len(self.meta)
            parts.insert(0, self.meta)
            self.meta_written = True
        if trailer:
            parts.append(trailer)
        if parts:
            os.pwritev(self.segment.fd, parts, offset)
            if not trailer:  # mid-stream: get the bytes moving to the disk now
                _start_writeback(self.segment.fd, offset, self._data_offset() + len(received) - offset)
        if new:
            self.crc = zlib.crc32(new, self.crc)
        self.fed = len(received)

    def commit(self, dataset: memoryview, info: StoredInstance) -> tuple[int, int, int]:
        """Write the rest, the text block and the header, flush; return (seq, file offset, length)."""
        text = _text_block(len(self.meta) + len(dataset), info)
        text += struct.pack("<I", len(text) + 4)
        self.feed(dataset, reserve=len(text), trailer=text)
        segment = self.segment
        assert segment is not None
        payload_length = len(self.meta) + len(dataset) + len(text)
        crc = zlib.crc32(text, self.crc)
        head = _REC_HEAD.pack(_REC_MAGIC, segment.seq, segment.nonce, payload_length, crc)
        end = self.start + _REC_HEAD.size + payload_length
        os.pwrite(segment.fd, head, self.start)
        os.fdatasync(segment.fd)
        with self.journal.lock:
            segment.tail = end
            segment.outstanding += 1
        return segment.seq, self.start + _REC_HEAD.size, len(self.meta) + len(dataset)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------


_T = TypeVar("_T")


class _GiveUp(Exception):
    """The store is closing while a background stage still fails."""


@dataclass
class _Pending:
    """A journalled instance waiting to become a file: where its file bytes lie in the journal."""

    info: StoredInstance
    segment: int
    offset: int
    length: int
    done: threading.Event | None = None  # only flush markers carry one
    checkpoint: bool = False  # a marker that also waits for the files to be fsynced


class InstanceStore:
    """Received instances on disk, durable before ``put`` returns.

    Parameters
    ----------
    root
        Data directory; instances go under ``root/instances``, the journal under ``root/journal``.
    durability
        ``"journal"`` (default, fastest) or ``"file"``; see the module docstring.
    min_free_fraction, min_free_bytes
        Disk watermark: ``put`` refuses (StoreFull) when, after writing, less than this would be free.
        It is checked before any byte is written: streamed data, new journal segments, spares.
    segment_size, spare_segments
        Journal segment size and how many are kept zero-filled ahead (settings JOURNAL_SEGMENT_BYTES,
        JOURNAL_SPARE_SEGMENTS). A segment is released (kept as a spare, or deleted) as soon as nobody
        writes to it and its records are files.
    on_instance
        Called with a StoredInstance for every newly stored (not duplicate) instance, once its file
        is visible. More callbacks can be added with ``subscribe``.
    """

    def __init__(self, root: str | os.PathLike[str], *, durability: Durability = "journal",
                 min_free_fraction: float = 0.05, min_free_bytes: int = 1 << 30,
                 segment_size: int = 8 << 20, spare_segments: int = 2,
                 apply_idle_seconds: float = 0.05, apply_max_bytes: int | None = None,
                 on_instance: Callable[[StoredInstance], None] | None = None) -> None:
        if durability not in ("journal", "file"):
            raise ValueError(f"durability must be 'journal' or 'file', not {durability!r}")
        self.root = Path(root)
        self.instances_dir = self.root / "instances"
        self.instances_dir.mkdir(parents=True, exist_ok=True)
        self.durability = durability
        # The applier waits for a pause in arrivals (or a large backlog) before writing files, so
        # that while instances stream in the only work per instance is one journal append.
        self.apply_idle_seconds = apply_idle_seconds
        # journalled bytes not yet checkpointed above which the applier works even while instances
        # arrive (a backlog that the free-space check has counted; default 32 MiB, e.g. 250 MR images)
        self.apply_max_bytes = apply_max_bytes if apply_max_bytes is not None else 32 << 20
        self._pending_bytes = 0
        self._last_put = 0.0
        self.min_free_fraction = min_free_fraction
        self.min_free_bytes = min_free_bytes
        self._callbacks: list[Callable[[StoredInstance], None]] = [on_instance] if on_instance else []
        self._lock = threading.Lock()
        self._index: dict[str, Path] = {}  # SOPInstanceUID -> final path (stored or in the journal)
        self._known_dirs: set[Path] = set()
        self._dir_sync: dict[Path, list[int]] = {}  # dir -> [renames done, renames synced]
        self._dir_sync_lock = threading.Lock()
        self._dir_locks: dict[Path, threading.Lock] = {}
        self._space_checked = float("-inf")
        self._space_used = self._space_free = self._space_total = 0
        self._fault: str | None = None  # set while a background stage fails (see _retry)
        self._fault_stage = ""
        self._closing = False
        self._scan_existing()
        self._journal: _Journal | None = None
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._applier: threading.Thread | None = None
        if durability == "journal":
            self._journal = _Journal(self.root / "journal", segment_size, spare_segments,
                                     reserve=lambda n: self.check_space(n, factor=1))
            self._recover()
            self._journal.prepare_spares()
            self._applier = threading.Thread(target=self._apply_loop, name="cinesr-store-applier",
                                             daemon=True)
            self._applier.start()

    # ---- lookups ---------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[StoredInstance], None]) -> None:
        """Call ``callback(StoredInstance)`` for every newly stored instance."""
        self._callbacks.append(callback)

    def unsubscribe(self, callback: Callable[[StoredInstance], None]) -> None:
        if callback in self._callbacks:
            self._callbacks.remove(callback)

    def studies(self) -> list[str]:
        return sorted(p.name for p in self.instances_dir.iterdir() if p.is_dir() and is_valid_uid(p.name))

    def series(self, study_uid: str) -> list[str]:
        study = self._study_dir(study_uid)
        if not study.is_dir():
            return []
        return sorted(p.name for p in study.iterdir() if p.is_dir() and is_valid_uid(p.name))

    def instances(self, study_uid: str, series_uid: str) -> list[Path]:
        """Paths of the stored instances of a series (complete files only)."""
        series = self._series_dir(study_uid, series_uid)
        if not series.is_dir():
            return []
        return sorted(p for p in series.iterdir() if p.suffix == ".dcm" and not p.name.startswith("."))

    def instance_path(self, sop_instance_uid: str) -> Path | None:
        """Where an instance is (or, still in the journal, will be) stored; None if unknown."""
        with self._lock:
            return self._index.get(sop_instance_uid)

    def has_instance(self, sop_instance_uid: str) -> bool:
        return self.instance_path(sop_instance_uid) is not None

    def remove_series(self, study_uid: str, series_uid: str) -> int:
        """Delete a series' files (retention); return how many instances were removed."""
        self.flush()
        paths = self.instances(study_uid, series_uid)
        with self._lock:
            for p in paths:
                self._index.pop(p.stem, None)
        series_dir = self._series_dir(study_uid, series_uid)
        self._known_dirs.discard(series_dir)  # recreated (and fsynced) if instances come again
        shutil.rmtree(series_dir, ignore_errors=True)
        return len(paths)

    def remove_study(self, study_uid: str) -> int:
        """Delete a study's files (retention); return how many instances were removed."""
        removed = sum(self.remove_series(study_uid, s) for s in self.series(study_uid))
        self._known_dirs.discard(self._study_dir(study_uid))
        shutil.rmtree(self._study_dir(study_uid), ignore_errors=True)
        return removed

    def _study_dir(self, study_uid: str) -> Path:
        if not is_valid_uid(study_uid):
            raise ValueError(f"invalid StudyInstanceUID {study_uid!r}")
        return self.instances_dir / study_uid

    def _series_dir(self, study_uid: str, series_uid: str) -> Path:
        if not is_valid_uid(series_uid):
            raise ValueError(f"invalid SeriesInstanceUID {series_uid!r}")
        return self._study_dir(study_uid) / series_uid

    def _scan_existing(self) -> None:
        for study in os.scandir(self.instances_dir):
            if not study.is_dir():
                continue
            for series in os.scandir(study.path):
                if not series.is_dir():
                    continue
                for entry in os.scandir(series.path):
                    if entry.name.endswith(".dcm") and not entry.name.startswith("."):
                        self._index[entry.name[:-4]] = Path(entry.path)
                    elif entry.name.startswith(".") and ".tmp" in entry.name:
                        os.unlink(entry.path)  # leftover of an interrupted write; never acknowledged

    # ---- storing ---------------------------------------------------------------------------

    def check_space(self, needed: int = 0, factor: int | None = None) -> None:
        """Raise StoreFull if writing ``needed`` more bytes would cross the watermark; else count them.

        Dataset bytes count twice in journal mode (journal record + file until checkpoint); pass
        ``factor=1`` for bytes written once (a journal segment). Journalled instances not yet filed
        count with their files' size. statvfs is re-read every 0.25 s or
        64 MiB written; in between, bytes written since count against the free space, so the check
        never errs on the generous side by more than others' writes in that quarter second."""
        if factor is None:
            factor = 2 if self.durability == "journal" else 1
        now = time.monotonic()
        with self._lock:
            if now - self._space_checked > 0.25 or self._space_used > 64 << 20:
                st = os.statvfs(self.root)
                self._space_free = st.f_bavail * st.f_frsize
                self._space_total = st.f_blocks * st.f_frsize
                self._space_checked, self._space_used = now, 0
            free, total = self._space_free, self._space_total
            # journalled instances not yet filed will take their file's space: statvfs cannot know that
            after = free - self._space_used - factor * needed - self._pending_bytes
            if after < self.min_free_bytes or (total and after / total < self.min_free_fraction):
                raise StoreFull(f"free disk space below watermark ({free} bytes free)")
            self._space_used += factor * needed

    def remeasure_space(self) -> None:
        """Forget the bytes counted since the last statvfs (some were refused, not written): re-read it."""
        with self._lock:
            self._space_checked = float("-inf")

    @property
    def fault(self) -> str | None:
        """Why the background filing is stopped (it retries until it works again), or None."""
        return self._fault

    def raise_if_halted(self) -> None:
        """Refuse new instances while the background filing is failing: what is acknowledged must get filed."""
        fault = self._fault
        if fault is not None:
            raise StoreHalted(f"store not filing: {fault}")

    def open_writer(self, source_ae: str = "") -> InstanceWriter:
        """A writer for one association's instances (streams datasets as their PDUs arrive)."""
        return InstanceWriter(self, source_ae)

    def put(self, dataset: bytes | memoryview, transfer_syntax: str, sop_class_uid: str = "",
            sop_instance_uid: str = "", source_ae: str = "") -> StoredInstance:
        """Store one encoded dataset durably; return its record.

        ``sop_class_uid``/``sop_instance_uid`` default to the values inside the dataset (a C-STORE
        passes the request's Affected SOP Class/Instance UIDs). Raises InvalidDataset (nothing
        stored) or StoreFull (nothing written).
        """
        writer = InstanceWriter(self, source_ae)
        try:
            writer.begin(transfer_syntax, sop_class_uid, sop_instance_uid)
            return writer.commit(memoryview(dataset))
        finally:
            writer.close()

    def _commit(self, writer: InstanceWriter, dataset: memoryview) -> StoredInstance:
        self.raise_if_halted()
        transfer_syntax = writer.transfer_syntax
        found = scan_dataset(dataset, transfer_syntax)
        # The dataset's SOP Common UIDs are Type 1 and are what the file is named and filed by; a request
        # naming other UIDs would file one instance under another's name (and drop the real one later).
        sop_instance_uid = found.get("sop_instance_uid", "")
        sop_class_uid = found.get("sop_class_uid", "")
        study_uid = found.get("study_uid", "")
        series_uid = found.get("series_uid", "")
        for name, uid in (("SOPInstanceUID", sop_instance_uid), ("SOPClassUID", sop_class_uid),
                          ("StudyInstanceUID", study_uid), ("SeriesInstanceUID", series_uid)):
            if not is_valid_uid(uid):
                raise MissingAttributes(f"missing or invalid {name}")
        if writer.requested_class and writer.requested_class != sop_class_uid:
            raise SopClassMismatch("request SOP Class UID is not the dataset's")
        if writer.requested_instance and writer.requested_instance != sop_instance_uid:
            raise SopInstanceMismatch("request SOP Instance UID is not the dataset's")
        path = self.instances_dir / study_uid / series_uid / f"{sop_instance_uid}.dcm"
        info = StoredInstance(study_uid, series_uid, sop_instance_uid, sop_class_uid,
                              found.get("modality", ""), transfer_syntax, path)
        with self._lock:
            known = self._index.get(sop_instance_uid)
            if known is None:
                self._index[sop_instance_uid] = path  # reserve: a concurrent duplicate is skipped
        if known is not None:
            return self._duplicate(info, known, dataset)
        try:
            self.check_space(max(len(dataset) - writer._space_counted, 0) + 512)
            meta = file_meta_bytes(sop_class_uid, sop_instance_uid, transfer_syntax, writer.source_ae)
            if self._journal is not None:
                record = writer._record
                if record is None or record.meta != meta:
                    record = _JournalRecord(self._journal, writer._segment_for(len(dataset)), meta)
                seq, offset, length = record.commit(dataset, info)
                writer._segment = record.segment
                self._last_put = time.monotonic()
                with self._lock:
                    self._pending_bytes += length
                # The applier copies the file bytes out of the journal (page cache), so the caller's
                # buffer is free for reuse as soon as this returns.
                self._queue.put(_Pending(info, seq, offset, length))
            else:
                self._write_file_durably(path, [meta, dataset])
                self._notify(info)
        except BaseException:
            with self._lock:
                self._index.pop(sop_instance_uid, None)
            raise
        return info

    def _duplicate(self, info: StoredInstance, known: Path, dataset: memoryview) -> StoredInstance:
        """An instance we already have. Policy: the first copy is kept, whatever comes later; a copy that
        differs is reported (``conflict``, and a WARNING line), never silently dropped."""
        same = self._same_content(known, info.transfer_syntax, dataset)
        if not same:
            if known == info.path:
                where = "same series"
            elif known.parent.parent == info.path.parent.parent:
                where = f"first in series {known.parent.name}, now in series {info.series_uid}"
            else:
                where = f"first in study {known.parent.parent.name}, now in study {info.study_uid}"
            LOGGER.warning("SOPInstanceUID %s received again with different content (%s): the first copy is kept",
                           info.sop_instance_uid, where)
        return StoredInstance(**{**info.__dict__, "path": known, "duplicate": True, "conflict": not same})

    def _same_content(self, known: Path, transfer_syntax: str, dataset: memoryview) -> bool:
        """Whether the stored copy holds these dataset bytes in this transfer syntax. Compared only when a
        duplicate arrives (rare), so storing costs no hashing."""
        if not known.exists():
            self.flush(timeout=10)  # still in the journal: wait for its file
        try:
            data = known.read_bytes()
        except OSError:
            return False  # cannot tell: reported as different rather than silently dropped
        if data[128:132] != b"DICM":
            return False
        meta_end = 144 + struct.unpack_from("<I", data, 140)[0]
        return (_meta_value(data[144:meta_end], 0x0010) == transfer_syntax
                and memoryview(data)[meta_end:] == dataset)

    def put_file(self, path: str | os.PathLike[str], source_ae: str = "") -> StoredInstance:
        """Store a DICOM Part 10 file (its dataset bytes as they are)."""
        data = Path(path).read_bytes()
        if data[128:132] != b"DICM":
            raise InvalidDataset(f"{path} is not a DICOM Part 10 file")
        group_len = struct.unpack_from("<I", data, 140)[0]
        meta_end = 144 + group_len
        meta = data[144:meta_end]
        dataset = memoryview(data)[meta_end:]
        ts = _meta_value(meta, 0x0010)
        # the dataset's own UIDs win over the file meta's (they can disagree in the wild)
        found = scan_dataset(dataset, ts)
        return self.put(dataset, ts, found.get("sop_class_uid") or _meta_value(meta, 0x0002),
                        found.get("sop_instance_uid") or _meta_value(meta, 0x0003), source_ae)

    def flush(self, timeout: float | None = None, checkpoint: bool = False) -> bool:
        """Wait until every acknowledged instance is visible as a file (with ``checkpoint``, also
        fsynced and out of the journal); False on timeout."""
        if self._journal is None:
            return True
        marker = _Pending(None, -1, 0, 0, threading.Event(), checkpoint)  # type: ignore[arg-type]
        self._queue.put(marker)
        return marker.done.wait(timeout)  # type: ignore[union-attr]

    def close(self) -> None:
        """Materialise and checkpoint everything, then stop the applier."""
        self._closing = True
        if self._applier is not None and self._applier.is_alive():
            self._queue.put(None)
            self._applier.join()
        if self._journal is not None:
            self._journal.close()

    def __enter__(self) -> InstanceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- writing files ---------------------------------------------------------------------

    def _ensure_dir(self, directory: Path) -> None:
        if directory in self._known_dirs:
            return
        created = not directory.is_dir()
        directory.mkdir(parents=True, exist_ok=True)
        if created:  # make the new directory entries themselves durable
            _fsync_dir(directory.parent)
            _fsync_dir(directory.parent.parent)
        self._known_dirs.add(directory)

    def _write_tmp_and_rename(self, path: Path, parts: list[bytes | memoryview], sync: bool) -> int:
        """Write to a hidden temp name, optionally fdatasync, rename into place; return the fd."""
        self._ensure_dir(path.parent)
        tmp = path.parent / f".{path.name}.tmp{threading.get_ident()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.writev(fd, parts)
            if sync:
                os.fdatasync(fd)
            os.rename(tmp, path)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return fd

    def _write_file_durably(self, path: Path, parts: list[bytes | memoryview]) -> None:
        os.close(self._write_tmp_and_rename(path, parts, sync=True))
        directory = path.parent
        # Group commit of the directory fsync: one fsync covers every rename done before it.
        with self._dir_sync_lock:
            counts = self._dir_sync.setdefault(directory, [0, 0])
            counts[0] += 1
            mine = counts[0]
            lock = self._dir_locks.setdefault(directory, threading.Lock())
        with lock:
            if counts[1] < mine:
                with self._dir_sync_lock:
                    target = counts[0]
                _fsync_dir(directory)
                counts[1] = max(counts[1], target)

    def _notify(self, info: StoredInstance) -> None:
        for callback in self._callbacks:
            try:
                callback(info)
            except Exception:  # a consumer's bug must not fail the C-STORE
                LOGGER.exception("instance callback failed for SOPInstanceUID %s", info.sop_instance_uid)

    # ---- journal applier -------------------------------------------------------------------

    def _recover(self) -> None:
        """Replay journal records that were acknowledged but not yet checkpointed."""
        assert self._journal is not None
        segments = self._journal.segment_files()
        replayed = 0
        fds: list[int] = []
        for seg in segments:
            for texts, file_bytes in _decode_segment(seg.read_bytes(), int(seg.stem)):
                study, series, sop = texts[:3]
                if not (is_valid_uid(study) and is_valid_uid(series) and is_valid_uid(sop)):
                    continue
                path = self.instances_dir / study / series / f"{sop}.dcm"
                fds.append(self._write_tmp_and_rename(path, [file_bytes], sync=False))
                self._index[sop] = path
                replayed += 1
        self._checkpoint(fds)
        for seg in segments:
            self._journal.retire_file(seg)
        if segments:
            _fsync_dir(self._journal.dir)
            LOGGER.info("replayed %d journalled instances from %d segments", replayed, len(segments))

    def _checkpoint(self, fds: list[int]) -> None:
        """Make materialised files and their directory entries durable."""
        _sync_files(fds, set(self._known_dirs), self.instances_dir)

    def _retry(self, stage: str, action: Callable[..., _T], *args: object) -> _T:
        """Run one stage of the background filing until it works.

        While it fails (a full disk, an unwritable directory) the store refuses new instances (``fault``,
        StoreHalted: C-STORE answers 0xA7xx, /readyz 503) and retries with a growing pause of at most a
        second, so it recovers by itself once the cause is gone. Nothing is skipped: the item that failed
        is the one retried. On close, a stage that still fails gives up: the journal keeps what was not
        filed and the next start files it."""
        delay = 0.05
        while True:
            try:
                result = action(*args)
            except Exception as exc:  # noqa: BLE001 - any failure stops the filing, none may pass silently
                reason = f"{stage} failed: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}"
                if self._fault != reason:
                    LOGGER.error("store: %s; refusing new instances until it works again", reason)
                self._fault, self._fault_stage = reason, stage
                if self._closing:
                    raise _GiveUp() from exc
                time.sleep(delay)
                delay = min(2 * delay, 1.0)
                continue
            if self._fault is not None and self._fault_stage == stage:
                LOGGER.warning("store: %s works again; accepting instances", stage)
                self._fault = None
            return result

    def _apply_loop(self) -> None:
        """Turn journal records into files: after a pause in arrivals (or when the journal fills),
        in arrival order; fsync them in batches, then release their journal space."""
        assert self._journal is not None
        batch: list[tuple[int, _Pending]] = []  # (open fd, item) written but not yet fsynced
        waiters: list[_Pending] = []  # flush(checkpoint=True) callers
        segment_fds: dict[int, int] = {}
        stopping = False
        try:
            while True:
                quiet = False
                try:
                    item = self._queue.get(timeout=0.2 if batch else None)
                except queue.Empty:
                    item, quiet = None, True
                if item is None and not quiet:
                    stopping = True
                elif item is not None and item.info is None:  # a flush marker: all before it is visible
                    if item.checkpoint:
                        waiters.append(item)
                    else:
                        item.done.set()  # type: ignore[union-attr]
                elif item is not None:
                    while (time.monotonic() - self._last_put < self.apply_idle_seconds
                           and self._pending_bytes < self.apply_max_bytes and not stopping):
                        time.sleep(self.apply_idle_seconds / 2)
                    fd = self._retry("writing an instance file", self._copy_out, item, segment_fds)
                    batch.append((fd, item))
                    self._notify(item.info)
                if batch and (quiet or waiters or stopping or len(batch) >= 512):
                    self._retry("syncing instance files", self._checkpoint_batch, batch)
                    self._released(batch)
                    batch = []
                    for seg in [s for s in segment_fds if s not in self._journal.active]:
                        os.close(segment_fds.pop(seg))  # retired: its blocks may be recycled
                if waiters and not batch:
                    for waiter in waiters:
                        waiter.done.set()  # type: ignore[union-attr]
                    waiters = []
                if stopping and self._queue.empty():
                    if batch:
                        self._retry("syncing instance files", self._checkpoint_batch, batch)
                        self._released(batch)
                    for fd in segment_fds.values():
                        os.close(fd)
                    return
        except _GiveUp:
            LOGGER.error("store closed while its filing failed: the journal keeps what is not yet filed; "
                         "the next start files it")
            for fd in segment_fds.values():
                os.close(fd)
            for waiter in waiters:
                waiter.done.set()  # type: ignore[union-attr]

    def _copy_out(self, item: _Pending, segment_fds: dict[int, int]) -> int:
        """Write an instance's file from its journal record; return the open file descriptor."""
        assert self._journal is not None
        src = segment_fds.get(item.segment)
        if src is None:
            src = segment_fds[item.segment] = os.open(self._journal.dir / f"{item.segment:012d}.wal", os.O_RDONLY)
        path = item.info.path
        self._ensure_dir(path.parent)
        tmp = path.parent / f".{path.name}.tmp{threading.get_ident()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            offset, left = item.offset, item.length
            while left > 0:  # in-kernel copy from the page cache; no bytes through Python
                n = os.copy_file_range(src, fd, left, offset)
                if n <= 0:
                    raise OSError(f"journal record of {item.info.sop_instance_uid} is short")
                offset += n
                left -= n
            os.rename(tmp, path)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        return fd

    def _checkpoint_batch(self, batch: list[tuple[int, _Pending]]) -> None:
        """Make a batch of written files durable (their descriptors are closed, whatever happens)."""
        t0 = time.perf_counter()
        fds = [fd for fd, _item in batch if fd >= 0]
        if len(fds) < len(batch):  # a retry: the failed attempt closed them
            for fd in fds:
                os.close(fd)
            fds = []
            for _fd, item in batch:
                fds.append(os.open(item.info.path, os.O_RDONLY))
        batch[:] = [(-1, item) for _fd, item in batch]
        _sync_files(fds, {item.info.path.parent for _fd, item in batch}, self.instances_dir)
        LOGGER.debug("checkpointed %d instances in %.1f ms", len(batch), 1000 * (time.perf_counter() - t0))

    def _released(self, batch: list[tuple[int, _Pending]]) -> None:
        """A durable batch: its journal records are no longer needed."""
        assert self._journal is not None
        segments: dict[int, int] = {}
        released = 0
        for _fd, item in batch:
            segments[item.segment] = segments.get(item.segment, 0) + 1
            released += item.length
        try:
            self._journal.checkpointed(segments)
        except OSError as exc:  # only the journal directory's fsync: the next retirement syncs it again
            LOGGER.warning("journal directory sync failed: %s", exc.strerror or exc)
        with self._lock:
            self._pending_bytes -= released
        if self._queue.empty():
            self._journal.prepare_spares()  # top up while nothing streams in


class InstanceWriter:
    """Receives the instances of one association, one at a time (not thread-safe).

    ``begin`` when a C-STORE request arrives, ``feed`` with everything received so far after each
    PDU (the new bytes are written to the journal at once, overlapping the sender), ``commit``
    with the whole dataset at its last fragment; ``close`` when the association ends.
    """

    def __init__(self, store: InstanceStore, source_ae: str = "") -> None:
        self.store = store
        self.source_ae = source_ae
        self.transfer_syntax = ""
        self.sop_class_uid = ""
        self.sop_instance_uid = ""
        self.requested_class = ""  # the request's UIDs as sent: they must be the dataset's
        self.requested_instance = ""
        self._space_counted = 0  # dataset bytes already counted against the free-space watermark
        self._segment: _Segment | None = None
        self._record: _JournalRecord | None = None

    def _segment_for(self, size: int) -> _Segment:
        journal = self.store._journal
        assert journal is not None
        if self._segment is not None and self._segment.size - self._segment.tail < size + (1 << 16):
            journal.give_back(self._segment)
            self._segment = None
        if self._segment is None:
            self._segment = journal.acquire(max(size + (1 << 16), min(1 << 20, journal.segment_size // 2)))
        return self._segment

    def begin(self, transfer_syntax: str, sop_class_uid: str = "", sop_instance_uid: str = "") -> None:
        self.transfer_syntax = transfer_syntax
        self.requested_class, self.requested_instance = sop_class_uid.strip(), sop_instance_uid.strip()
        self.sop_class_uid = sop_class_uid if is_valid_uid(sop_class_uid) else ""
        self.sop_instance_uid = sop_instance_uid if is_valid_uid(sop_instance_uid) else ""
        self._record = None
        self._space_counted = 0
        journal = self.store._journal
        if journal is not None and self.sop_class_uid and self.sop_instance_uid:
            self.store.raise_if_halted()
            meta = file_meta_bytes(self.sop_class_uid, self.sop_instance_uid, transfer_syntax, self.source_ae)
            # room for a typical instance (its size is not known yet); small segments are not abandoned
            # for a guess larger than they are (a longer instance moves on as it streams in)
            guess = min(1 << 20, journal.segment_size // 4)
            self._record = _JournalRecord(journal, self._segment_for(guess), meta)

    def feed(self, received: memoryview) -> None:
        """Stream the dataset bytes received so far (all of them, from the start).

        Raises StoreFull before writing bytes that would cross the free-space watermark."""
        if self._record is not None:
            self.store.raise_if_halted()
            self.store.check_space(len(received) - self._space_counted)
            self._space_counted = len(received)
            self._record.feed(received)
            self._segment = self._record.segment

    def commit(self, dataset: memoryview) -> StoredInstance:
        """Validate, file and make durable; raises InvalidDataset or StoreFull (nothing stored)."""
        try:
            return self.store._commit(self, dataset)
        except BaseException:
            self.abandon()
            raise
        finally:
            self._record = None
            self.transfer_syntax = self.sop_class_uid = self.sop_instance_uid = ""
            self.requested_class = self.requested_instance = ""
            self._space_counted = 0

    def abandon(self) -> None:
        """Drop a refused instance's streamed bytes: the segment goes back (released if nothing committed
        is in it), and the free space is measured afresh for the next check."""
        self._record = None
        self._space_counted = 0
        self.transfer_syntax = ""
        if self._segment is not None and self.store._journal is not None:
            self.store._journal.give_back(self._segment)
        self._segment = None
        self.store.remeasure_space()

    def close(self) -> None:
        if self._segment is not None and self.store._journal is not None:
            self.store._journal.give_back(self._segment)
        self._segment = None


def _meta_value(meta: bytes, elem: int) -> str:
    """A text value from an explicit-VR-LE file meta group (after the group length)."""
    pos = 0
    while pos + 8 <= len(meta):
        _group, e, vr = struct.unpack_from("<HH2s", meta, pos)
        if vr in _LONG_VRS:
            length = struct.unpack_from("<I", meta, pos + 8)[0]
            value = pos + 12
        else:
            length = struct.unpack_from("<H", meta, pos + 6)[0]
            value = pos + 8
        if e == elem:
            return meta[value:value + length].decode("ascii", "replace").strip("\0 ")
        pos = value + length
    return ""
