"""Access control and request limits: the API key check, the Host header check (against DNS rebinding)
and the request body size cap."""

from __future__ import annotations

import asyncio
import hmac
import json
from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError

# How the OpenAPI document describes the key: web/openapi.py lists the schemes, and every route that checks the
# key (parsing.StrictRoute) names them as its operation's `security`.
SECURITY_SCHEMES = {
    "HTTPBearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer KEY"},
    "APIKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "X-API-Key: KEY"},
}


def keys_match(given: str | None, expected: str) -> bool:
    if not given:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def check_api_key(request: Request) -> None:
    """With an API key configured, a request must carry it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'.
    Called by the API routes before they read anything else of the request (see `parsing.StrictRoute`)."""
    expected = request.app.state.web.settings.api_key
    if expected is None:
        return
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    bearer = credentials.strip() if scheme.lower() == "bearer" else None
    if keys_match(bearer, expected) or keys_match(request.headers.get("x-api-key"), expected):
        return
    raise ApiError(401, "missing or wrong API key",
                   "Send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'.",
                   headers={"WWW-Authenticate": "Bearer"})


# -- Host header -------------------------------------------------------------------------------------------
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
WILDCARD_ADDRESSES = ("0.0.0.0", "::", "")


def host_name(value: str) -> str | None:
    """The name part of a Host header value ('Example.org:8000' -> 'example.org', '[::1]:80' -> '[::1]');
    None when it is not a well-formed host[:port]."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[:end + 1], value[end + 1:]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return None
        return name
    name, sep, port = value.partition(":")
    if (sep and not port.isdigit()) or not name:
        return None
    name = name.rstrip(".")
    if not name or any(not (c.isalnum() or c in "-._") for c in name) or not name.isascii():
        return None
    return name


def normalise_allowed_host(entry: str) -> str:
    """An --allowed-host value as `host_name` returns it: IPv6 literals bracketed, any port dropped."""
    entry = entry.strip().lower()
    if entry.count(":") > 1 and not entry.startswith("["):
        entry = f"[{entry}]"
    name = host_name(entry)
    if name is None:
        raise ValueError(f"not a host name or address: {entry!r}")
    return name


def allowed_host_names(extra: tuple[str, ...]) -> frozenset[str]:
    return frozenset(LOOPBACK_HOSTS) | {normalise_allowed_host(e) for e in extra if e not in WILDCARD_ADDRESSES}


HOST_SCOPE_KEY = "clipsearch.host"


class HostCheck:
    """ASGI middleware answering 400 to any Host header not in `allowed` (loopback names plus the configured
    ones), so that a web page on another name cannot reach this server through DNS rebinding. The accepted
    Host is put in the scope for building absolute URLs (never an unchecked, reflected one)."""

    def __init__(self, app: ASGIApp, allowed: frozenset[str]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        values = [v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"host"]
        name = host_name(values[0]) if len(values) == 1 else None
        if name is None or name not in self.allowed:
            detail = (f"this server does not answer to Host {values[0][:100]!r}" if len(values) == 1 else
                      "the request has no Host header" if not values else "the request has more than one Host header")
            await _send_json(send, 400, {
                "detail": detail,
                "hint": "Use http://127.0.0.1 or http://localhost, or start the server with --allowed-host NAME "
                        "for each name clients use to reach it."})
            return
        scope[HOST_SCOPE_KEY] = values[0].strip()
        await self.app(scope, receive, send)


# Seconds a request body may stall between two of its chunks before the request is answered 408 (a client that
# announces a body and never sends it would otherwise hold its request open for as long as it likes).
BODY_STALL_SECONDS = 30.0


class BodySizeLimit:
    """ASGI middleware refusing request bodies larger than `max_bytes` with 413, whether announced by
    Content-Length or streamed (chunked) — before the app buffers them — and bodies that stall for more than
    `stall_seconds` between chunks with 408. Once the body is complete, waits on `receive` (a streaming response
    listening for the client to go away) are not bounded."""

    def __init__(self, app: ASGIApp, max_bytes: int, stall_seconds: float = BODY_STALL_SECONDS) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.stall_seconds = stall_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    announced = int(value)
                except ValueError:
                    await _send_json(send, 400, {"detail": "invalid Content-Length header"})
                    return
                if announced > self.max_bytes:
                    await _send_json(send, 413, self._too_large())
                    return
        received = 0
        refusal: tuple[int, dict] | None = None  # (status, body) once the read was aborted
        body_done = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, refusal, body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.stall_seconds)
            except asyncio.TimeoutError:
                refusal = (408, {"detail": f"the request body stalled for more than {self.stall_seconds:g} s",
                                 "hint": "Send the whole body at once, as its Content-Length announces."})
                raise _BodyRefused() from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refusal = (413, self._too_large())
                    raise _BodyRefused()
                body_done = not message.get("more_body", False)
            else:
                body_done = True  # http.disconnect
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if refusal is not None:  # the app turned the aborted read into its own error; answer ours instead
                if message["type"] == "http.response.start" and not response_started:
                    response_started = True
                    await _send_json(send, *refusal)
                return
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyRefused:
            if not response_started and refusal is not None:
                response_started = True
                await _send_json(send, *refusal)

    def _too_large(self) -> dict:
        return {"detail": f"request body is larger than {self.max_bytes:,} bytes",
                "hint": "Send a smaller image (the server's --max-upload-mb sets the limit)."}


class _BodyRefused(Exception):
    """Raised out of `receive` when a body is too large or stalls; BodySizeLimit answers it."""


async def _send_json(send: Send, status: int, body: dict) -> None:
    payload = json.dumps(body).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})
