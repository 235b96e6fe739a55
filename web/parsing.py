"""The one way request input is parsed: strict JSON bodies and checked text, for every route.

`parse_json_body` is used by the FastAPI-validated routes (through `StrictRoute`'s request class) and by
the clip-back routes (which parse bodies whatever their content type says). It refuses, with a 400 JSON
error instead of a 500 later on:

- bytes that are not UTF-8 JSON, and the non-standard constants NaN, Infinity and -Infinity;
- numbers that overflow to infinity (`1e999`) and integers of more than `MAX_INT_DIGITS` digits;
- nesting deeper than `MAX_JSON_DEPTH` (Python's parser would hit its recursion limit: a 500);
- strings with lone surrogates ("\\ud800" is valid JSON but no valid text: tokenizers and SQLite choke on it).

Query strings, path parameters and form fields get the same text check.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Coroutine

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.datastructures import FormData, UploadFile

from clipsearch.text import is_utf8

from .errors import ApiError
from .security import SECURITY_SCHEMES, check_api_key

MAX_JSON_DEPTH = 32
MAX_INT_DIGITS = 40


class _Refused(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"number {text[:40]} is out of range")
    return value


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"integer of {len(text)} digits is out of range")
    return int(text)


def check_text(text: str, where: str) -> None:
    if not is_utf8(text):
        raise ApiError(400, f"{where} contains a lone surrogate (not valid Unicode text)")


def _check_value(value: Any) -> None:
    """Depth and text checks over a parsed JSON value, iteratively (no recursion to exhaust)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            check_text(item, "a string in the body")
        elif isinstance(item, (list, dict)):
            if depth > MAX_JSON_DEPTH:
                raise ApiError(400, f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels")
            if isinstance(item, dict):
                for key, child in item.items():
                    check_text(key, "a key in the body")
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)


_JSON_HINT = "Send one JSON object (UTF-8) with Content-Type: application/json; /docs lists each route's fields."


def parse_json_body(raw: bytes) -> Any:
    """Strictly parse a request body as JSON (see the module docstring); 400 with the reason otherwise."""
    try:
        text = raw.decode("utf-8-sig") if isinstance(raw, (bytes, bytearray)) else raw
    except UnicodeDecodeError as exc:
        raise ApiError(400, "the body is not JSON: it is not UTF-8 text", _JSON_HINT) from exc
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_parse_float, parse_int=_parse_int)
    except _Refused as exc:
        raise ApiError(400, f"the body is not JSON: {exc}", _JSON_HINT) from exc
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"the body is not JSON: {exc}", _JSON_HINT) from exc
    except RecursionError as exc:
        raise ApiError(400, f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels") from exc
    except ValueError as exc:  # e.g. integers beyond Python's digit limit
        raise ApiError(400, f"the body is not JSON: {exc}", _JSON_HINT) from exc
    _check_value(value)
    return value


def check_query_and_path(request: Request) -> None:
    check_raw_query(request.scope.get("query_string", b""))
    for key, value in request.query_params.multi_items():
        check_text(key, "a query parameter name")
        check_text(value, f"query parameter {key!r}")
    for key, value in request.path_params.items():
        if isinstance(value, str):
            check_text(value, f"path parameter {key!r}")


def check_raw_query(raw: bytes) -> None:
    """400 for a query string whose percent-escapes are not UTF-8 (`q=%ff`, or a surrogate's `%ED%A0%80`):
    Starlette decodes them into U+FFFD, so the search would run for a text the client never sent."""
    from urllib.parse import unquote_to_bytes

    for part in raw.split(b"&"):
        for piece in part.split(b"=", 1):
            try:
                unquote_to_bytes(piece.replace(b"+", b" ")).decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError(400, "the query string is not UTF-8 text",
                               "Percent-encode the UTF-8 bytes of the text (e.g. encodeURIComponent).") from None


def check_form(form: FormData) -> None:
    for key, value in form.multi_items():
        check_text(key, "a form field name")
        if isinstance(value, str):
            check_text(value, f"form field {key!r}")
        elif isinstance(value, UploadFile) and value.filename:
            check_text(value.filename, f"the file name of form field {key!r}")


class StrictRequest(Request):
    """A request whose JSON body and form fields go through the strict checks above."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json_body(await self.body())
        return self._json

    async def _get_form(self, **kwargs: Any) -> FormData:  # Starlette's form() goes through here
        form = await super()._get_form(**kwargs)
        check_form(form)
        return form


class StrictRoute(APIRoute):
    """Route class of every data route: the API key check first (nothing about the request is looked at before
    it), then strict request parsing before FastAPI's own validation. The OpenAPI operation says that the key
    is asked for (`security`, schemes in web/openapi.py) without a per-request dependency doing it again."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        extra = dict(kwargs.pop("openapi_extra", None) or {})
        extra.setdefault("security", [{name: []} for name in SECURITY_SCHEMES])
        super().__init__(path, endpoint, openapi_extra=extra, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        query_names = frozenset(_param_names(self.dependant, "query_params"))
        form_names = frozenset(_param_names(self.dependant, "body_params"))
        body_only = "POST" in self.methods and "GET" not in self.methods

        async def strict_handler(request: Request) -> Response:
            strict = StrictRequest(request.scope, request.receive)
            check_api_key(strict)
            check_query_and_path(strict)
            if body_only:
                await check_no_stray_fields(strict, query_names, form_names)
            return await handler(strict)

        return strict_handler


def _param_names(dependant: Any, kind: str) -> set[str]:
    """The names (aliases) of a route's `kind` parameters ("query_params", "body_params"), its dependencies' too."""
    names = {param.alias for param in getattr(dependant, kind)}
    for sub in dependant.dependencies:
        names |= _param_names(sub, kind)
    return names


async def check_no_stray_fields(request: Request, query_names: frozenset[str], form_names: frozenset[str]) -> None:
    """A POST route reads its parameters from the body: a query-string parameter it does not take (GET /api/search's
    `?collection=`, say) or a multipart field it does not know (`rerank` on an upload) is a 400, never silently
    ignored (which searched another collection, or did not re-rank, without a word)."""
    stray = sorted({key for key in request.query_params.keys() if key not in query_names})
    if stray:
        raise ApiError(400, f"{request.method} {request.url.path} does not read the query string ({', '.join(stray)})",
                       "Send the parameters in the request body (JSON fields, or form fields for an upload).")
    if form_names and request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        form = await request.form()
        unknown = sorted({key for key in form.keys() if key not in form_names})
        if unknown:
            raise ApiError(400, f"{request.url.path} takes no form field {', '.join(map(repr, unknown))}",
                           f"Its fields are: {', '.join(sorted(form_names))} (see /docs).")
