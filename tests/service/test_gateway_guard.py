"""Issue 14 #5 and #13 on a real HTTP server: the token and the body size are checked before any body is read,
STOW-RS keeps its own larger limits, /docs is off unless enabled, /readyz shows no internal error text without
a token."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cinesr.service.app import Service
from cinesr.service.gateway import create_app
from fastapi.testclient import TestClient

from tests.service.test_gateway import AUTH, settings_for
from tests.service.test_stow import BOUNDARY, STOW_TYPE, encode_related, live_server, small_instance

MAX_BODY = 1024
CLAIMED = 250 << 20  # what each unauthenticated request says it will send


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    settings = settings_for(tmp_path_factory.mktemp("data"), auto_process=False, http_max_body_bytes=MAX_BODY)
    with Service(settings, dispatch="inline", min_free_bytes=1 << 20) as svc:
        yield svc


@pytest.fixture(scope="module")
def url(service: Service) -> Iterator[str]:
    with live_server(service) as base:
        yield base


def _rss_bytes() -> int:
    for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _huge_post(url: str, headers: str, results: list[bytes]) -> None:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST /studies/1.2.3/superresolve HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json"
                     f"\r\nContent-Length: {CLAIMED}\r\n{headers}\r\n".encode())
        sock.settimeout(5)
        sent = 0
        try:
            chunk = b"[" * 65536
            while sent < 8 << 20:  # keep sending (as an attacker would) until the server answers or stops reading
                sock.sendall(chunk)
                sent += len(chunk)
                sock.setblocking(False)
                try:
                    if sock.recv(1, socket.MSG_PEEK):
                        break
                except BlockingIOError:
                    pass
                finally:
                    sock.setblocking(True)
                    sock.settimeout(5)
        except OSError:
            pass  # the server closed the connection on us: fine, the answer is already there
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                more = sock.recv(4096)
                if not more:
                    break
                data += more
        except OSError:
            pass
        results.append(data)


def test_unauthenticated_huge_bodies_are_refused_before_they_are_read(url: str) -> None:
    before = _rss_bytes()
    results: list[bytes] = []
    threads = [threading.Thread(target=_huge_post, args=(url, "", results)) for _ in range(4)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    elapsed = time.monotonic() - t0
    assert len(results) == 4
    for answer in results:
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    grown = _rss_bytes() - before
    print(f"4 x {CLAIMED >> 20} MB claimed: answered in {elapsed:.2f} s, RSS grew {grown / 2**20:.1f} MB")
    assert elapsed < 20
    assert grown < 64 << 20


def test_a_malformed_body_without_a_token_is_401_not_422(url: str) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}):
        response = httpx.post(f"{url}/studies/1.2.3/superresolve", content=b"{not json",
                              headers={"Content-Type": "application/json", **headers})
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["detail"] in ("missing bearer token", "invalid bearer token")
    # with the token, the same body is the caller's mistake: 422
    response = httpx.post(f"{url}/studies/1.2.3/superresolve", content=b"{not json",
                          headers={"Content-Type": "application/json", **AUTH})
    assert response.status_code == 422


def test_bodies_over_the_limit_are_413_declared_or_chunked(url: str) -> None:
    big = b'{"series": [' + b'"1.2",' * 2000 + b'"1.2"]}'
    assert len(big) > MAX_BODY
    response = httpx.post(f"{url}/studies/1.2.3/superresolve", content=big,
                          headers={"Content-Type": "application/json", **AUTH})
    assert response.status_code == 413 and f"limit of {MAX_BODY} bytes" in response.json()["detail"]

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000]

    response = httpx.post(f"{url}/studies/1.2.3/superresolve", content=chunks(),
                          headers={"Content-Type": "application/json", **AUTH})
    assert response.status_code == 413, response.text
    # a small chunked body still reaches the route (unknown study, no PACS: 404)
    small = b'{"method": "baseline"}'
    response = httpx.post(f"{url}/studies/1.2.3/superresolve", content=iter([small[:5], small[5:]]),
                          headers={"Content-Type": "application/json", **AUTH})
    assert response.status_code == 404, response.text


def test_stow_keeps_its_own_larger_limit(url: str, service: Service) -> None:
    instances = [small_instance() for _ in range(3)]
    body = encode_related([data for data, _, _ in instances], BOUNDARY)
    assert len(body) > MAX_BODY
    response = httpx.post(f"{url}/dicomweb/studies", content=body, headers={**AUTH, "Content-Type": STOW_TYPE})
    assert response.status_code == 200, response.text
    assert all(service.store.has_instance(sop) for _, _, sop in instances)
    response = httpx.post(f"{url}/dicomweb/studies", content=body, headers={"Content-Type": STOW_TYPE})
    assert response.status_code == 401


def test_docs_are_off_by_default_and_on_when_enabled(service: Service, tmp_path: Path) -> None:
    with TestClient(create_app(service)) as client:
        assert client.get("/docs").status_code == 404
        assert client.get("/redoc").status_code == 404
        assert client.get("/openapi.json").status_code == 200  # no assets from anywhere: stays
    settings = settings_for(tmp_path / "data", docs_enabled=True)
    with Service(settings, dispatch="inline", min_free_bytes=1 << 20) as svc, TestClient(create_app(svc)) as client:
        page = client.get("/docs")
        assert page.status_code == 200 and "swagger" in page.text.lower()


def test_readyz_shows_no_error_text_without_a_token(tmp_path: Path) -> None:
    # free space below an impossible watermark: the storage check fails with a reason naming the data folder
    settings = settings_for(tmp_path / "data")
    with Service(settings, dispatch="inline", min_free_bytes=1 << 62) as svc, TestClient(create_app(svc)) as client:
        anonymous = client.get("/readyz")
        assert anonymous.status_code == 503
        assert anonymous.json()["checks"]["storage"] == {"ok": False}
        assert str(tmp_path) not in anonymous.text and "error" not in anonymous.text
        operator = client.get("/readyz", headers=AUTH)
        assert operator.status_code == 503 and operator.json()["checks"]["storage"]["error"]
