"""The REST gateway's front door (pure ASGI): the bearer token, then the body size, before any body is read.

FastAPI reads and parses a route's body before it runs the route's dependencies, so a token check written as a
dependency comes too late: an unauthenticated client could make the process buffer any amount, and a malformed
body got a 422 with parser detail instead of a 401. Here, before the app sees the request:

- every path except the public ones (health, readiness, metrics, API docs) needs a valid bearer token: 401;
- a body declared larger than HTTP_MAX_BODY_BYTES is refused by its Content-Length: 413, nothing read;
- a body without a Content-Length (chunked) is read here up to the limit, then handed on: 413 beyond it.

STOW-RS (/dicomweb/) streams its bodies part by part with its own limits (STOW_MAX_REQUEST_BYTES): it gets the
token check only.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                          "/redoc"})
STREAMED_PREFIX = "/dicomweb/"


def token_matches(given: str, tokens: Iterable[str]) -> bool:
    """Compare against every token in constant time each, so timing says nothing about which matched."""
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(given.encode(), token.encode())
    return matched


def bearer_problem(authorization: str | None, tokens: Iterable[str]) -> str | None:
    """None when the Authorization header carries a valid bearer token, else the reason."""
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return "missing bearer token"
    if not token_matches(credentials.strip(), tokens):
        return "invalid bearer token"
    return None


class RequestGuard:
    """ASGI middleware: auth, then body size, before the wrapped app reads anything."""

    def __init__(self, app: ASGIApp, tokens: Callable[[], Iterable[str]], max_body_bytes: int) -> None:
        self.app = app
        self.tokens = tokens
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if path not in PUBLIC_PATHS:
            reason = bearer_problem(headers.get("authorization"), self.tokens())
            if reason is not None:
                await _answer(send, 401, reason, [(b"www-authenticate", b"Bearer")])
                return
        if path.startswith(STREAMED_PREFIX):
            await self.app(scope, receive, send)
            return
        limit = self.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await _answer(send, 400, "malformed Content-Length")
                return
            if int(declared) > limit:
                await _answer(send, 413, f"request body of {declared} bytes is larger than the limit of {limit} "
                                         f"bytes (HTTP_MAX_BODY_BYTES)")
                return
            await self.app(scope, receive, send)  # the server stops at the declared length
            return
        if "chunked" not in headers.get("transfer-encoding", "").lower():
            await self.app(scope, receive, send)
            return
        # a chunked body: read it here, up to the limit, and replay it to the app
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _answer(send, 413, f"request body larger than the limit of {limit} bytes (HTTP_MAX_BODY_BYTES)")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _answer(send: Send, status: int, detail: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               # the body the client may still be sending is not read: the connection must not be reused
               (b"connection", b"close"), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
