"""multipart/related bodies (RFC 2387), as DICOMweb uses them: parsed incrementally, written whole.

STOW-RS requests and WADO-RS responses carry one DICOM Part 10 file per part. The reader takes the body
chunk by chunk as it arrives (so a request is never held whole in memory), and hands back each part once
its closing boundary has been seen. A part larger than ``max_part_bytes`` is skipped (its bytes dropped as
they arrive) and reported as too large; a body that ends inside a part reports that part as truncated.
Structural faults that leave no way to find the parts (no boundary at all, endless headers) raise
MultipartError.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

_PARAM_RE = re.compile(r';\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)')
MAX_HEADER_BYTES = 16 << 10  # headers of one part
MAX_PREAMBLE_BYTES = 64 << 10  # bytes before the first boundary


class MultipartError(ValueError):
    """The body cannot be split into parts; the message says why."""


def parse_content_type(value: str) -> tuple[str, dict[str, str]]:
    """'multipart/related; type="application/dicom"; boundary=x' -> ('multipart/related', {type:.., boundary:..}).

    The media type and parameter names are lower-cased; quoted values are unquoted."""
    media, _, rest = value.partition(";")
    params: dict[str, str] = {}
    for match in _PARAM_RE.finditer(";" + rest):
        raw = match.group(2)
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        params[match.group(1).lower()] = raw
    return media.strip().lower(), params


@dataclass
class Part:
    """One part: its headers (lower-case names) and its bytes, or the reason it has none."""

    headers: dict[str, str]
    data: bytes | None
    error: str | None = None
    index: int = 0  # position in the body, from 1

    @property
    def content_type(self) -> str:
        return parse_content_type(self.headers.get("content-type", ""))[0]


@dataclass
class MultipartReader:
    """Feed the body with ``feed(chunk)``; each call returns the parts completed by it. ``close()`` at the end
    returns what the end of the body completes (a truncated part) and sets ``complete``."""

    boundary: str
    max_part_bytes: int = 1 << 30
    complete: bool = False  # the closing boundary was seen
    parts_seen: int = 0
    _buf: bytearray = field(default_factory=lambda: bytearray(b"\r\n"))  # so the first delimiter has its CRLF
    _state: str = "preamble"
    _scan: int = 0  # where the next delimiter search starts (bytes before it were searched already)
    _headers: dict[str, str] = field(default_factory=dict)
    _oversize: bool = False

    def __post_init__(self) -> None:
        if not self.boundary or len(self.boundary) > 200:
            raise MultipartError("missing or invalid multipart boundary")
        self._delim = b"\r\n--" + self.boundary.encode("latin-1")

    def feed(self, chunk: bytes) -> list[Part]:
        if self._state == "done":
            return []  # the epilogue is ignored
        self._buf += chunk
        out: list[Part] = []
        while True:
            part, progressed = self._step()
            if part is not None:
                out.append(part)
            if not progressed:
                return out

    def close(self) -> list[Part]:
        """The body ended: a part still open is truncated; no boundary at all is a MultipartError."""
        if self._state == "preamble":
            raise MultipartError("no multipart boundary found in the body (expected '--" + self.boundary + "')")
        if self._state in ("body", "headers"):
            self.parts_seen += 1
            reason = "truncated part (the body ended before its boundary)"
            part = Part(self._headers, None, reason, self.parts_seen)
            self._state = "done"
            return [part]
        self._state = "done"
        return []

    # ---- the state machine ------------------------------------------------------------------------

    def _step(self) -> tuple[Part | None, bool]:
        buf, delim = self._buf, self._delim
        if self._state == "preamble":
            at = buf.find(delim)
            if at < 0:
                if len(buf) > MAX_PREAMBLE_BYTES:
                    raise MultipartError("no multipart boundary in the first 64 KiB of the body")
                return None, False
            del buf[:at + len(delim)]
            self._state = "delimiter"
            return None, True
        if self._state == "delimiter":  # after '--boundary': '--' closes, else padding and CRLF
            if len(buf) < 2:
                return None, False
            if buf[:2] == b"--":
                self._state = "done"
                self.complete = True
                buf.clear()
                return None, False
            eol = buf.find(b"\r\n")
            if eol < 0:
                if len(buf) > 1024:
                    raise MultipartError("malformed boundary line")
                return None, False
            if buf[:eol].strip(b" \t"):
                raise MultipartError("malformed boundary line (text after the boundary)")
            del buf[:eol + 2]
            self._state, self._headers = "headers", {}
            return None, True
        if self._state == "headers":
            if buf[:2] == b"\r\n":  # no headers
                end, skip = 0, 2
            else:
                end = buf.find(b"\r\n\r\n")
                skip = 4
                if end < 0:
                    if len(buf) > MAX_HEADER_BYTES:
                        raise MultipartError("part headers longer than 16 KiB")
                    return None, False
            self._headers = _parse_headers(bytes(buf[:end]))
            del buf[:end + skip]
            self._state, self._scan, self._oversize = "body", 0, False
            return None, True
        if self._state == "body":
            at = buf.find(delim, self._scan)
            if at < 0:
                keep = len(delim) - 1  # a delimiter may straddle this chunk and the next
                if len(buf) > self.max_part_bytes + keep:
                    self._oversize = True
                    del buf[:len(buf) - keep]  # drop what cannot be kept; keep looking for the boundary
                self._scan = max(0, len(buf) - keep)
                return None, False
            self.parts_seen += 1
            if self._oversize or at > self.max_part_bytes:
                part = Part(self._headers, None, f"part larger than the limit of {self.max_part_bytes} bytes",
                            self.parts_seen)
            else:
                part = Part(self._headers, bytes(buf[:at]), None, self.parts_seen)
            del buf[:at + len(delim)]
            self._state = "delimiter"
            return part, True
        return None, False


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.decode("latin-1").split("\r\n"):
        if not line.strip():
            continue
        if line[0] in " \t" and headers:  # folded continuation (obsolete, still legal in MIME)
            last = next(reversed(headers))
            headers[last] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise MultipartError(f"malformed part header line {line[:60]!r}")
        headers[name.strip().lower()] = value.strip()
    return headers


def new_boundary() -> str:
    return "cinesr-" + secrets.token_hex(16)


def encode_related(parts: Iterable[bytes], boundary: str, content_type: str = "application/dicom") -> bytes:
    """A multipart/related body of ``parts`` (each one with ``Content-Type: content_type``)."""
    head = f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode()
    chunks: list[bytes] = []
    for data in parts:
        chunks += [head, data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks)
