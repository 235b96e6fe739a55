"""What the OpenAPI document says about errors: one `ErrorBody` schema for every error status (422
included, instead of FastAPI's default validation-error array), and every status a route can answer."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from .schemas import ErrorBody
from .security import SECURITY_SCHEMES

ERROR_DESCRIPTIONS = {
    400: "Bad request: a body that is not strict JSON (NaN, nesting too deep, lone surrogates), a bad value, "
         "an unknown collection, or a Host header this server does not answer to",
    401: "API key missing or wrong",
    404: "No such image, or it is no longer on disk",
    410: "The file on disk is no longer the image that was indexed (changed, replaced or not an image)",
    413: "Request body, upload or image pixels over the limit",
    415: "Wrong content type, or the upload is not an image",
    422: "A field is missing, has the wrong type, or is outside its documented limit",
    503: "The collection or its model cannot be loaded, or the server is busy (then with Retry-After)",
}
ALWAYS_DESCRIPTIONS = {
    405: "Method not allowed: the Allow header names the methods this path answers",
    408: "The request body stalled (no bytes for 30 s)",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route that can answer these error statuses."""
    return {code: {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[code]} for code in codes}


def install_openapi(app: FastAPI, always: tuple[int, ...] = (400,), limits: dict[str, int] | None = None) -> None:
    """Generate the document once, then point every 422 at `ErrorBody`, add the statuses any route can answer
    (`always`: the Host check's 400; 405 everywhere, 408 for a body that stalls), the server's own limits as
    schema bounds (`limits`: "max_k", "max_text_chars"; a client validating against the document then sends only
    what the server takes), and the API key schemes (the routes that check the key, `StrictRoute`, name them as
    their operations' `security`)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = FastAPI.openapi(app)  # FastAPI's own document (it caches it on app.openapi_schema)
        schema.setdefault("components", {}).setdefault("securitySchemes", {}).update(SECURITY_SCHEMES)
        components = schema["components"].setdefault("schemas", {})
        components.setdefault("ErrorBody", ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}"))
        error_ref = {"$ref": "#/components/schemas/ErrorBody"}
        for methods in schema.get("paths", {}).values():
            for method, operation in methods.items():
                responses = operation.setdefault("responses", {})
                for code in always:
                    responses.setdefault(str(code), {"description": ERROR_DESCRIPTIONS[code]})
                for code in (405, 408) if method in ("post", "put", "patch") else (405,):
                    responses.setdefault(str(code), {"description": ALWAYS_DESCRIPTIONS[code]})
                for parameter in operation.get("parameters", []):
                    _bound(parameter.get("name"), parameter.get("schema", {}), limits or {})
                for media in operation.get("requestBody", {}).get("content", {}).values():  # bodies written inline
                    for name, field in media.get("schema", {}).get("properties", {}).items():
                        _bound(name, field, limits or {})
                for code, response in responses.items():
                    if code.startswith(("4", "5")) and code != "416":  # a Range refusal has no body
                        if code == "422":
                            response["description"] = ERROR_DESCRIPTIONS[422]
                        response["content"] = {"application/json": {"schema": error_ref}}
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        for component in components.values():
            for name, field in component.get("properties", {}).items():
                _bound(name, field, limits or {})
        _integer_bounds(schema)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


_COUNT_FIELDS = ("k", "num_images", "num_result_ids")
_CLAMPED_COUNT_FIELDS = ("num_images", "num_result_ids")  # clip-back's: more than max_k is served as max_k
_TEXT_FIELDS = ("q", "text")


def _bound(name: str | None, field: dict, limits: dict[str, int]) -> None:
    """A result count gets 1..max_k (clip-back's counts only a minimum: the server serves more as max_k), a query
    text at most max_text_chars (also inside anyOf [..., null])."""
    targets = [field, *field.get("anyOf", [])]
    for target in targets:
        if name in _COUNT_FIELDS and target.get("type") == "integer" and "max_k" in limits:
            target.setdefault("minimum", 1)
            if name not in _CLAMPED_COUNT_FIELDS:
                target["maximum"] = limits["max_k"]
        if name in _TEXT_FIELDS and target.get("type") == "string" and "max_text_chars" in limits:
            target["maxLength"] = limits["max_text_chars"]


def _integer_bounds(node: Any) -> None:
    """Bounds of integer schemas as integers: 2**63 - 1 came out as the float 9.223372036854776e+18 (= 2**63, which
    the server refuses)."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for key in ("maximum", "minimum"):
                if isinstance(node.get(key), float) and abs(node[key]) >= 2**53:
                    node[key] = (2**63 - 1) if node[key] > 0 else -(2**63)
        for value in node.values():
            _integer_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _integer_bounds(value)
