"""Access control and request limits: the API key check and the request body size cap."""

from __future__ import annotations

import hmac
import json
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY")
_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: KEY")


def keys_match(given: str | None, expected: str) -> bool:
    if not given:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


async def require_api_key(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header_key: Annotated[str | None, Depends(_key_header)],
) -> None:
    """Router dependency: with an API key configured, a request must carry it in either header."""
    expected = request.app.state.web.settings.api_key
    if expected is None:
        return
    if keys_match(bearer.credentials if bearer else None, expected) or keys_match(header_key, expected):
        return
    raise ApiError(401, "missing or wrong API key",
                   "Send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'.",
                   headers={"WWW-Authenticate": "Bearer"})


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
