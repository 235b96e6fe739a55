"""Access control and request limits: the API key check, the Host header check (against DNS rebinding)
and the request body size cap."""

from __future__ import annotations

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
            shown = values[0][:100] if len(values) == 1 else ("missing" if not values else "repeated")
            await _send_json(send, 400, {
                "detail": f"this server does not answer to Host {shown!r}",
                "hint": "Use http://127.0.0.1 or http://localhost, or start the server with --allowed-host NAME "
                        "for each name clients use to reach it."})
            return
        scope[HOST_SCOPE_KEY] = values[0].strip()
        await self.app(scope, receive, send)


class BodySizeLimit:
    """ASGI middleware refusing request bodies larger than `max_bytes` with 413, whether announced by
    Content-Length or streamed (chunked) — before the app buffers them."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

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
        exceeded = False
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if exceeded:  # the app turned the aborted read into its own error; answer 413 instead
                if message["type"] == "http.response.start" and not response_started:
                    response_started = True
                    await _send_json(send, 413, self._too_large())
                return
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            if not response_started:
                await _send_json(send, 413, self._too_large())

    def _too_large(self) -> dict:
        return {"detail": f"request body is larger than {self.max_bytes:,} bytes"}


class _BodyTooLarge(Exception):
    pass


async def _send_json(send: Send, status: int, body: dict) -> None:
    payload = json.dumps(body).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})
