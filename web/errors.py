"""Error bodies: every failure is JSON `{"detail": message, "hint"?: how to fix}` with a fitting status.

Library errors map to statuses here, so routes just raise them. Anything unexpected is a logged 500
without internals in the body.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from clipsearch.errors import (BundleError, ClipsearchError, CollectionError, ImageError, ModelNotAvailable,
                               QueryError)

log = logging.getLogger("clipsearch.web")


class ApiError(StarletteHTTPException):
    """An error with an HTTP status, raised by the web layer itself. An HTTPException, so that FastAPI passes
    it through unchanged when it is raised while the request body is read."""

    def __init__(self, status_code: int, message: str, hint: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code, message, headers)
        self.message = message
        self.hint = hint
        self.headers = headers


def not_found(message: str) -> ApiError:
    return ApiError(404, message)


def bad_request(message: str, hint: str | None = None) -> ApiError:
    return ApiError(400, message, hint)


# Library errors and the status a client should see for them.
LIBRARY_STATUS: tuple[tuple[type[ClipsearchError], int], ...] = (
    (QueryError, 400),
    (ImageError, 400),  # decoded but corrupt; unrecognised formats and bombs are refused earlier (415/413)
    (ModelNotAvailable, 503),
    (BundleError, 503),
    (CollectionError, 503),
)


def status_for(exc: ClipsearchError) -> int:
    for kind, status in LIBRARY_STATUS:
        if isinstance(exc, kind):
            return status
    return 500


def error_body(message: str, hint: str | None = None) -> dict:
    body: dict = {"detail": message}
    if hint:
        body["hint"] = hint
    return body


def error_response(status_code: int, message: str, hint: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, hint), status_code=status_code, headers=headers)


def describe_validation_errors(errors: list[dict]) -> str:
    """FastAPI/pydantic validation errors as one readable line: 'body.k: Input should be ...; query.q: ...'."""
    problems = []
    for error in errors:
        location = ".".join(str(part) for part in error.get("loc", ()))
        problems.append(f"{location}: {error.get('msg', 'invalid')}" if location else str(error.get("msg", "invalid")))
    return "invalid request: " + "; ".join(problems)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(request: Request) -> list[str]:
    """The methods some route answers on the request's path, each asked of the router as a request would be (routes
    of included routers are matched through them)."""
    from starlette.routing import Match

    return [method for method in _METHODS
            if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in request.app.routes)]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # The same `{"detail": str}` body as every other error (the OpenAPI document says so for 422 too).
        return error_response(422, describe_validation_errors(list(exc.errors())),
                              "See /docs for this route's parameters and their limits.")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status_code, exc.message, exc.hint, exc.headers)

    @app.exception_handler(ClipsearchError)
    async def _library_error(request: Request, exc: ClipsearchError) -> JSONResponse:
        status = status_for(exc)
        if status >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, exc.message)
        return error_response(status, exc.message, exc.hint)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(getattr(exc, "headers", None) or {})
        hint = None
        if exc.status_code == 405:
            # Starlette names the methods of the first route on the path only (GET /api/search, not its POST).
            allowed = allowed_methods(request)
            if allowed:
                headers["Allow"] = ", ".join(allowed)
            hint = f"{request.url.path} answers {', '.join(allowed) or 'no method'}; see /docs."
        elif exc.status_code == 404:
            hint = "See /docs for the routes this server answers."
        return error_response(exc.status_code, str(exc.detail), hint, headers=headers or None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error")
