"""Odd but parseable input is a clear 4xx from the one strict parsing path, never a 500: lone surrogates in any
text field, numbers that overflow (1e999), NaN/Infinity, huge integers and JSON nested 50,000 deep, on every
JSON route (FastAPI-validated /api/search and the clip-back routes, whatever their content type)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from clipsearch.web import create_app
from web_fixtures import IndexedPhotos, app_settings, build_indexed_photos

JSON_ROUTES = ["/api/search", "/knn-service", "/metadata"]

ODD_BODIES = {
    "lone surrogate in text": '{"text": "\\ud800", "ids": ["\\udfff"]}',
    "low surrogate in text": '{"text": "cat \\udc00 dog"}',
    "surrogate in a list item": '{"text": "cat", "and": ["\\ud83d"], "not": ["x"], "ids": [1]}',
    "surrogate in a key": '{"\\ud800": 1, "text": "cat"}',
    "surrogate in collection": '{"text": "cat", "collection": "\\ud800", "indice_name": "\\ud800"}',
    "overflowing number": "1e999",
    "overflowing k": '{"text": "cat", "k": 1e999, "num_images": 1e999, "ids": [1e999]}',
    "NaN k": '{"text": "cat", "k": NaN, "num_images": NaN, "ids": [NaN]}',
    "Infinity": '{"text": "cat", "k": Infinity, "num_images": -Infinity, "ids": [Infinity]}',
    "huge integer": '{"text": "cat", "k": 1%s, "num_images": 1%s, "ids": [1%s]}' % ("0" * 5000, "0" * 5000, "0" * 5000),
    "nested arrays": "[" * 50_000 + "]" * 50_000,
    "nested objects": '{"a":' * 50_000 + "1" + "}" * 50_000,
    "nested in a field": '{"text": "cat", "use_mclip": ' + "[" * 50_000 + "]" * 50_000 + "}",
    "just deep enough to refuse": '{"text": "cat", "use_mclip": ' + "[" * 40 + "]" * 40 + "}",
    "not UTF-8": b'{"text": "caf\xe9"}',
}


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_bundle) -> IndexedPhotos:
    return build_indexed_photos(tmp_path_factory.mktemp("strict"), tiny_bundle, count=3)


@pytest.fixture(scope="module")
def client(indexed):
    app = create_app(app_settings(indexed))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.mark.parametrize("route", JSON_ROUTES)
@pytest.mark.parametrize("name", list(ODD_BODIES))
def test_odd_json_bodies_are_400_on_every_json_route(client, route, name):
    body = ODD_BODIES[name]
    for content_type in ("application/json", None):  # clip-back clients send no JSON content type
        headers = {"content-type": content_type} if content_type else {}
        response = client.post(route, content=body, headers=headers)
        if route == "/api/search" and content_type is None:
            assert response.status_code == 415, (name, response.text)  # that route wants JSON
            continue
        assert response.status_code == 400, (route, name, response.status_code, response.text[:300])
        assert response.headers["content-type"] == "application/json"
        assert isinstance(response.json()["detail"], str)


def test_reasons_are_specific(client):
    def detail(body: str) -> str:
        return client.post("/knn-service", content=body).json()["detail"]

    assert "surrogate" in detail(ODD_BODIES["lone surrogate in text"])
    assert "out of range" in detail(ODD_BODIES["overflowing number"])
    assert "NaN is not a JSON number" in detail(ODD_BODIES["NaN k"])
    assert "nested deeper than 32" in detail(ODD_BODIES["nested arrays"])
    assert "nested deeper than 32" in detail(ODD_BODIES["just deep enough to refuse"])


def test_ordinary_bodies_still_work(client, indexed):
    assert client.post("/knn-service", content='{"text": "photo 😀 café", "num_images": 2}').status_code == 200
    assert client.post("/api/search", json={"text": "photo", "and": ["sky"], "k": 2}).status_code == 200
    assert client.post("/metadata", content='{"ids": [1, 2]}').status_code == 200
    nested_ok = '{"text": "cat", "use_mclip": ' + "[" * 20 + "]" * 20 + "}"
    assert client.post("/knn-service", content=nested_ok).status_code == 200


@pytest.mark.parametrize("query", ["q=%ED%A0%80", "q=%ED%B0%80&k=2", "q=cat%ff", "q=%C0%AF",
                                   "q=cat&collection=%ED%A0%80"])
def test_odd_query_strings_are_not_500(client, query):
    response = client.get(f"/api/search?{query}")
    assert response.status_code < 500 and isinstance(response.json()["detail" if response.status_code >= 400
                                                                       else "results"], (str, list))


@pytest.mark.parametrize("query", ["q=%ED%A0%80", "q=%ED%B0%80&k=2", "q=cat%ff", "q=%C0%AF",
                                   "q=cat&collection=%ED%A0%80", "q%ff=cat"])
def test_query_strings_that_are_not_utf8_are_400_not_a_search_for_replacement_characters(client, query):
    response = client.get(f"/api/search?{query}")
    assert response.status_code == 400 and response.json()["detail"] == "the query string is not UTF-8 text"
    assert "Percent-encode" in response.json()["hint"]


def test_utf8_query_strings_still_search(client):
    response = client.get("/api/search?q=caf%C3%A9+%E2%98%85&k=2")
    assert response.status_code == 200 and response.json()["query"] == "café ★"


def test_surrogates_in_form_fields_are_400(client, indexed):
    # UTF-7 is the one charset a client can name for a form part that decodes to lone surrogates.
    body = (b"--b\r\nContent-Disposition: form-data; name=\"labels\"\r\nContent-Type: text/plain; charset=utf-7\r\n\r\n"
            b"+2AA-\r\n--b\r\nContent-Disposition: form-data; name=\"image_id\"\r\n\r\n1\r\n--b--\r\n")
    response = client.post("/api/classify", content=body, headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code < 500, response.text


def test_validation_errors_use_the_documented_error_body(client):
    response = client.post("/api/search", json={"text": 12})
    assert response.status_code == 422
    body = response.json()
    assert isinstance(body["detail"], str) and body["detail"].startswith("invalid request: body.text")
    missing = client.get("/api/search")
    assert missing.status_code == 422 and "query.q" in missing.json()["detail"]
