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
    503: "The collection or its model cannot be loaded",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route that can answer these error statuses."""
    return {code: {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[code]} for code in codes}


def install_openapi(app: FastAPI, always: tuple[int, ...] = (400,)) -> None:
    """Generate the document once, then point every 422 at `ErrorBody`, add the statuses any route can answer
    (`always`: the Host check's 400), and the API key schemes (the routes that check the key, `StrictRoute`,
    name them as their operations' `security`)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = FastAPI.openapi(app)  # FastAPI's own document (it caches it on app.openapi_schema)
        schema.setdefault("components", {}).setdefault("securitySchemes", {}).update(SECURITY_SCHEMES)
        components = schema["components"].setdefault("schemas", {})
        components.setdefault("ErrorBody", ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}"))
        error_ref = {"$ref": "#/components/schemas/ErrorBody"}
        for methods in schema.get("paths", {}).values():
            for operation in methods.values():
                responses = operation.setdefault("responses", {})
                for code in always:
                    responses.setdefault(str(code), {"description": ERROR_DESCRIPTIONS[code]})
                for code, response in responses.items():
                    if code.startswith(("4", "5")):
                        if code == "422":
                            response["description"] = ERROR_DESCRIPTIONS[422]
                        response["content"] = {"application/json": {"schema": error_ref}}
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
