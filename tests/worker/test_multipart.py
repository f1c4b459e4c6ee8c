"""multipart/related reading: parts come out whole however the body is chunked; limits and faults are named."""

from __future__ import annotations

import os

import pytest
from cinesr.worker.network.multipart import MultipartError, MultipartReader, encode_related, parse_content_type

BOUNDARY = "b0undary-xyz"


def read_all(body: bytes, chunk: int, max_part_bytes: int = 1 << 20) -> tuple[list, MultipartReader]:
    reader = MultipartReader(BOUNDARY, max_part_bytes)
    parts = []
    for i in range(0, len(body), chunk):
        parts += reader.feed(body[i:i + chunk])
    parts += reader.close()
    return parts, reader


def test_content_type_parameters() -> None:
    media, params = parse_content_type('Multipart/Related; type="application/dicom"; boundary="a b;c"; X=1')
    assert media == "multipart/related"
    assert params == {"type": "application/dicom", "boundary": "a b;c", "x": "1"}
    assert parse_content_type("application/json") == ("application/json", {})
    assert parse_content_type("") == ("", {})


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 17, 64, 4096, 1 << 20])
def test_parts_survive_every_chunking(chunk: int) -> None:
    # payloads that contain CRLFs, dashes and a near-boundary, so only the full delimiter splits them
    payloads = [b"", b"\r\n--b0undary-xy\r\n", os.urandom(3000), b"--" + BOUNDARY.encode() + b"X", b"end\r\n"]
    body = b"preamble to ignore\r\n" + encode_related(payloads, BOUNDARY) + b"epilogue"
    parts, reader = read_all(body, chunk)
    assert [p.data for p in parts] == payloads
    assert [p.index for p in parts] == [1, 2, 3, 4, 5]
    assert all(p.error is None and p.content_type == "application/dicom" for p in parts)
    assert reader.complete and reader.parts_seen == 5


def test_first_boundary_at_the_very_start_and_headers() -> None:
    body = (f"--{BOUNDARY}\r\nContent-Type: application/dicom; transfer-syntax=1.2.840.10008.1.2.1\r\n"
            f"Content-Location: x\r\n\r\nDATA\r\n--{BOUNDARY}  \r\n\r\nNOHEADERS\r\n--{BOUNDARY}--").encode()
    parts, reader = read_all(body, 5)
    assert [p.data for p in parts] == [b"DATA", b"NOHEADERS"]
    assert parts[0].headers["content-location"] == "x"
    assert parts[0].content_type == "application/dicom"
    assert parts[1].headers == {} and parts[1].content_type == ""
    assert reader.complete


@pytest.mark.parametrize("chunk", [1, 100, 1 << 16])
def test_truncated_body_reports_the_open_part(chunk: int) -> None:
    body = encode_related([b"A" * 500, b"B" * 500], BOUNDARY)
    cut = body[: body.index(b"B" * 500) + 200]  # inside the second part
    parts, reader = read_all(cut, chunk)
    assert parts[0].data == b"A" * 500
    assert parts[1].data is None and "truncated" in parts[1].error
    assert not reader.complete


@pytest.mark.parametrize("chunk", [1000, 1 << 16])
def test_oversize_part_is_skipped_and_the_next_one_read(chunk: int) -> None:
    body = encode_related([b"x" * 10, os.urandom(50_000), b"y" * 10], BOUNDARY)
    parts, reader = read_all(body, chunk, max_part_bytes=20_000)
    assert [p.data for p in parts] == [b"x" * 10, None, b"y" * 10]
    assert "larger than the limit of 20000 bytes" in parts[1].error
    assert reader.complete


def test_bodies_without_parts_are_errors() -> None:
    with pytest.raises(MultipartError, match="no multipart boundary"):
        read_all(b"just some bytes, not multipart", 8)
    with pytest.raises(MultipartError, match="boundary"):
        MultipartReader("")
    with pytest.raises(MultipartError, match="headers longer"):
        read_all(f"--{BOUNDARY}\r\n".encode() + b"X-Long: " + b"a" * (20 << 10), 1 << 12)
    with pytest.raises(MultipartError, match="malformed part header"):
        read_all(f"--{BOUNDARY}\r\nno colon here\r\n\r\nx\r\n--{BOUNDARY}--".encode(), 64)
