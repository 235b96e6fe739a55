"""`create_app(settings)`: the FastAPI app with the REST API, the clip-back endpoints and the page."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from fastapi.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import clipsearch

from . import api, clipback, duplicates, page
from .errors import install_error_handlers
from .openapi import install_openapi
from .schemas import Health
from .security import BodySizeLimit, HostCheck
from .settings import ServerSettings
from .state import WebState

DESCRIPTION = """Search your photos by describing them, by an example image, or by another photo.

With an API key configured, send it as `Authorization: Bearer KEY` or `X-API-Key: KEY`.
Errors are JSON: `{"detail": message, "hint": how to fix}` — for every status, 422 included.
Request bodies are strict JSON (no NaN/Infinity, nesting at most 32 deep, no lone surrogates: 400 otherwise).
The server answers only to loopback Host names and those it was started with (`--allowed-host`): 400 otherwise.
Limits per request (422 beyond them unless noted): see SECURITY.md and each field's description.
"""


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    _register_heif()
    state = WebState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            state.close()

    # FastAPIOffline serves Swagger UI / ReDoc assets from the package itself: /docs works offline, no CDN.
    app = FastAPIOffline(title="clipsearch", version=clipsearch.__version__, description=DESCRIPTION, lifespan=lifespan,
                         static_url="/static-docs")
    app.state.web = state
    install_error_handlers(app)

    @app.head("/healthz", include_in_schema=False)  # what uptime monitors send
    @app.get("/healthz", response_model=Health, tags=["health"], summary="Liveness (no key needed; HEAD too)")
    async def healthz() -> Health:  # on the event loop: never waits for a worker thread
        return Health(status="ok")

    app.include_router(api.router)
    app.include_router(clipback.router)
    app.include_router(page.router)
    app.include_router(duplicates.router)
    app.include_router(duplicates.page_router)
    page.mount_static(app)

    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:  # outside the body limit: a page on an allowed origin can read its 413 and 408
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "X-API-Key", "Content-Type"],
                           expose_headers=["Retry-After", "ETag", "Content-Disposition"])  # readable by the page
    app.add_middleware(HostCheck, allowed=state.allowed_hosts)  # outside the rest: nothing runs for a bad Host
    app.add_middleware(SecurityHeaders)
    install_openapi(app, limits={"max_k": settings.max_k, "max_text_chars": settings.max_text_chars})
    return app


class SecurityHeaders:
    """nosniff and no-referrer on every response (image bytes must never be sniffed into HTML)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-content-type-options", b"nosniff"))
                headers.append((b"referrer-policy", b"no-referrer"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _register_heif() -> None:
    """Let uploads be HEIC/AVIF (Pillow plugin registration is idempotent)."""
    try:
        from pillow_heif import register_heif_opener

        register_heif_opener()
    except ImportError:
        pass
