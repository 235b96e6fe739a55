"""REST API: every route answers correctly ordered results or the right JSON error."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from clipsearch.classify import Classifier
from clipsearch.model.runtime import ClipModel
from clipsearch.web import ServerSettings, create_app
from photo_fixtures import block_image
from web_fixtures import PHOTO_COUNT, TEST_HOSTS, IndexedPhotos, app_settings, build_indexed_photos


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_bundle) -> IndexedPhotos:
    return build_indexed_photos(tmp_path_factory.mktemp("api"), tiny_bundle)


@pytest.fixture(scope="module")
def client(indexed) -> TestClient:
    app = create_app(app_settings(indexed))
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def model(tiny_bundle) -> ClipModel:
    return ClipModel(tiny_bundle, threads=1)


def ids(answer: dict) -> list[int]:
    return [r["id"] for r in answer["results"]]


def scores(answer: dict) -> list[float]:
    return [r["score"] for r in answer["results"]]


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def photo(indexed: IndexedPhotos, name: str) -> Path:
    return next(p for p in indexed.photos if p.name == name)


# -- GET /api/search -------------------------------------------------------------------------------
def test_text_search_returns_results_best_first_in_brute_force_order(client, indexed):
    response = client.get("/api/search", params={"q": "a red square", "k": 5})
    assert response.status_code == 200
    answer = response.json()
    assert answer["query"] == "a red square" and answer["took_ms"] >= 0 and answer["collection"] == indexed.name
    assert ids(answer) == indexed.text_ranking("a red square")[:5]
    assert scores(answer) == sorted(scores(answer), reverse=True)
    first = answer["results"][0]
    assert set(first) >= {"id", "path", "score", "width", "height", "thumbnail_url", "image_url"}
    assert first["path"] in indexed.ids_by_path and indexed.ids_by_path[first["path"]] == first["id"]
    assert first["thumbnail_url"] == f"/api/images/{first['id']}/thumbnail"
    assert first["image_url"] == f"/api/images/{first['id']}/file"


def test_text_search_k_defaults_to_20_and_caps_at_the_collection_size(client):
    answer = client.get("/api/search", params={"q": "photo"}).json()
    assert len(answer["results"]) == PHOTO_COUNT + 1  # fewer photos than the default k
    assert len(client.get("/api/search", params={"q": "photo", "k": 3}).json()["results"]) == 3


@pytest.mark.parametrize("params, status, message", [
    ({}, 422, None),
    ({"q": "   "}, 400, "empty text query"),
    ({"q": "x" * 1_001}, 422, "longer than the limit of 1,000"),
    ({"q": "cat", "k": 0}, 422, None),
    ({"q": "cat", "k": "many"}, 422, None),
    ({"q": "cat", "k": 1001}, 422, "k must be between 1 and 1000"),
    ({"q": "cat", "collection": "nope"}, 400, "unknown collection 'nope'"),
    ({"q": "cat", "collection": "../photos"}, 400, "unknown collection"),
])
def test_bad_text_searches_get_json_errors(client, params, status, message):
    response = client.get("/api/search", params=params)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    detail = response.json()["detail"]
    if message:
        assert message in detail


# -- POST /api/search ------------------------------------------------------------------------------
def test_combined_text_and_not_query_matches_the_weighted_vector(client, indexed, model):
    response = client.post("/api/search", json={"text": "beach", "and": ["^0.5:sunset"], "not": ["people"], "k": 6})
    assert response.status_code == 200
    beach, sunset, people = model.encode_text(["beach", "sunset", "people"])
    expected = indexed.ranking(beach + 0.5 * sunset - people)[:6]
    answer = response.json()
    assert ids(answer) == expected
    assert answer["query"] == "beach +^0.5:sunset -people"


def test_more_like_this_excludes_the_image_and_ranks_by_its_vector(client, indexed):
    image_id = indexed.ids_by_path[str(photo(indexed, "photo_004.jpg"))]
    answer = client.post("/api/search", json={"image_id": image_id, "k": 5}).json()
    assert image_id not in ids(answer)
    assert ids(answer) == indexed.ranking(indexed.stored_vector(image_id), exclude={image_id})[:5]
    with_self = client.post("/api/search", json={"image_id": image_id, "k": 1, "include_self": True}).json()
    assert ids(with_self) == [image_id] and with_self["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("as_data_url", [False, True])
def test_example_image_as_base64_finds_its_neighbours(client, indexed, as_data_url):
    path = photo(indexed, "photo_006.png")
    image_id = indexed.ids_by_path[str(path)]
    encoded = base64.b64encode(path.read_bytes()).decode()
    if as_data_url:
        encoded = "data:image/png;base64," + encoded
    answer = client.post("/api/search", json={"image_b64": encoded, "k": 4}).json()
    assert image_id not in ids(answer)  # the identical indexed file is the query itself
    expected = indexed.ranking(indexed.stored_vector(image_id), exclude={image_id})
    ranked_scores = dict(zip(*_scores_for(indexed, image_id)))
    assert set(ids(answer)) <= set(expected[:6])
    for result in answer["results"]:
        assert result["score"] == pytest.approx(ranked_scores[result["id"]], abs=1e-3)


def _scores_for(indexed: IndexedPhotos, image_id: int) -> tuple[list[int], list[float]]:
    all_ids, vectors = indexed.vectors()
    query = indexed.stored_vector(image_id)
    return [int(i) for i in all_ids], [float(s) for s in vectors @ query]


@pytest.mark.parametrize("body, status, message", [
    ({}, 400, "empty query"),
    ({"k": 5}, 400, "empty query"),
    ({"image_id": 99999}, 404, "no image with id 99999"),
    ({"image_b64": "not base64 at all!!"}, 400, "not valid base64"),
    ({"image_b64": base64.b64encode(b"just some text, no image").decode()}, 415, "not an image"),
    ({"image_b64": ""}, 400, "empty"),
    ({"text": "cat", "k": 0}, 422, None),
    ({"text": "cat", "k": 5000}, 422, "k must be between"),
    ({"not": ["people"]}, 400, "empty query"),
    ({"text": "cat", "not": ["cat"]}, 400, "cancel each other out"),
    ({"text": 12}, 422, None),
    ({"image_id": 10**30}, 422, None),
    ({"image_id": -1}, 422, None),
    ({"text": "cat", "collection": "other"}, 400, "unknown collection"),
])
def test_bad_combined_queries_get_json_errors(client, body, status, message):
    response = client.post("/api/search", json=body)
    assert response.status_code == status, response.text
    if message:
        assert message in response.json()["detail"]


def test_combined_search_wants_json(client):
    for headers in ({}, {"content-type": "text/plain"}, {"content-type": "application/x-www-form-urlencoded"}):
        response = client.post("/api/search", content=b'{"text": "cat"}', headers=headers)
        assert response.status_code == 415 and "JSON" in response.json()["detail"]
    broken = client.post("/api/search", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "not JSON" in broken.json()["detail"]


# -- POST /api/search/image ------------------------------------------------------------------------
def test_uploaded_example_image_searches_by_content(client, indexed):
    path = photo(indexed, "photo_002.jpg")
    image_id = indexed.ids_by_path[str(path)]
    response = client.post("/api/search/image", files={"file": (path.name, path.read_bytes(), "image/jpeg")},
                           data={"k": "3"})
    assert response.status_code == 200
    answer = response.json()
    assert len(answer["results"]) == 3 and image_id not in ids(answer)
    assert scores(answer) == sorted(scores(answer), reverse=True)
    with_self = client.post("/api/search/image", files={"image": (path.name, path.read_bytes(), "image/jpeg")},
                            data={"k": "1", "include_self": "true"}).json()
    assert ids(with_self) == [image_id]


def test_upload_of_an_unindexed_image_matches_its_embedding(client, indexed, model):
    image = block_image(4242)
    response = client.post("/api/search/image", files={"file": ("new.png", png_bytes(image), "image/png")},
                           data={"k": "5"})
    expected = indexed.ranking(model.encode_images([image])[0])[:5]
    assert ids(response.json()) == expected


@pytest.mark.parametrize("files, status, message", [
    ({"file": ("notes.txt", b"hello, not an image", "text/plain")}, 415, "not an image"),
    ({"file": ("empty.jpg", b"", "image/jpeg")}, 400, "empty"),
    ({"file": ("cut.png", png_bytes(block_image(1))[:200], "image/png")}, 400, "corrupt or truncated"),
    ({}, 422, "multipart file field named 'file'"),
    ({"file": ("strip.png", png_bytes(Image.new("RGB", (5000, 20))), "image/png")}, 400, "more extreme shape"),
])
def test_bad_uploads_get_json_errors(client, files, status, message):
    response = client.post("/api/search/image", files=files or None, data={"k": "3"})
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


# -- POST /api/classify ----------------------------------------------------------------------------
def test_classify_gives_a_probability_per_label(client, indexed, model):
    path = photo(indexed, "photo_003.png")
    labels = ["a cat", "a dog", "a red car"]
    response = client.post("/api/classify", files={"file": (path.name, path.read_bytes(), "image/png")},
                           data={"labels": "a cat, a dog,a red car"})
    assert response.status_code == 200
    answer = response.json()
    assert list(answer["probabilities"]) == labels
    assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    probabilities = [entry["probability"] for entry in answer["labels"]]
    assert probabilities == sorted(probabilities, reverse=True)
    expected = Classifier(model, labels).classify_image(path.read_bytes())
    assert [e["label"] for e in answer["labels"]] == [s.label for s in expected]
    for entry, score in zip(answer["labels"], expected):
        assert entry["probability"] == pytest.approx(score.probability, abs=1e-4)


def test_classify_an_indexed_image_by_id(client, indexed, model):
    image_id = indexed.ids_by_path[str(photo(indexed, "photo_005.jpg"))]
    answer = client.post("/api/classify", data={"labels": "sky,grass", "image_id": str(image_id)}).json()
    expected = Classifier(model, ["sky", "grass"]).classify_vector(indexed.stored_vector(image_id))
    assert [e["label"] for e in answer["labels"]] == [s.label for s in expected]
    assert answer["labels"][0]["probability"] == pytest.approx(expected[0].probability, abs=1e-4)


@pytest.mark.parametrize("data, files, status, message", [
    ({"labels": " , ,"}, True, 400, "no labels given"),
    # Left out or sent empty (the page's empty field): the same 400 with its hint, not a 422 "Field required".
    ({}, True, 400, "no labels given"),
    ({"labels": ""}, True, 400, "no labels given"),
    ({"labels": "cat,dog"}, False, 422, "multipart file field"),
    ({"labels": "cat", "image_id": "99999"}, False, 404, "no image with id 99999"),
])
def test_bad_classify_requests_get_json_errors(client, indexed, data, files, status, message):
    path = photo(indexed, "photo_000.png")
    upload = {"file": (path.name, path.read_bytes(), "image/png")} if files else None
    response = client.post("/api/classify", data=data, files=upload)
    assert response.status_code == status, response.text
    if message:
        assert message in response.json()["detail"]
        assert response.json()["hint"]


def test_classify_refuses_a_non_image(client):
    response = client.post("/api/classify", data={"labels": "cat"}, files={"file": ("a.pdf", b"%PDF-1.4", "application/pdf")})
    assert response.status_code == 415


# -- images ------------------------------------------------------------------------------------------
def test_image_metadata(client, indexed):
    path = photo(indexed, "big.jpg")
    image_id = indexed.ids_by_path[str(path)]
    response = client.get(f"/api/images/{image_id}")
    assert response.status_code == 200
    info = response.json()
    assert (info["id"], info["path"], info["file_name"], info["width"], info["height"]) == (image_id, str(path), "big.jpg", 800, 600)
    assert info["size"] == path.stat().st_size and info["collection"] == indexed.name
    assert info["thumbnail_url"] == f"/api/images/{image_id}/thumbnail"


def test_original_file_is_served_byte_for_byte(client, indexed):
    for name, media_type in (("photo_000.png", "image/png"), ("photo_002.jpg", "image/jpeg")):
        path = photo(indexed, name)
        response = client.get(f"/api/images/{indexed.ids_by_path[str(path)]}/file")
        assert response.status_code == 200
        assert response.headers["content-type"] == media_type
        assert response.content == path.read_bytes()


def test_image_routes_answer_head_and_a_matching_if_none_match_with_304(client, indexed):
    image_id = indexed.ids_by_path[str(photo(indexed, "photo_002.jpg"))]
    for route in ("file", "thumbnail"):
        full = client.get(f"/api/images/{image_id}/{route}")
        head = client.head(f"/api/images/{image_id}/{route}")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(full.content)) and head.headers["etag"] == full.headers["etag"]
        cached = client.get(f"/api/images/{image_id}/{route}", headers={"If-None-Match": full.headers["etag"]})
        assert cached.status_code == 304 and cached.content == b"" and cached.headers["etag"] == full.headers["etag"]
        listed = client.get(f"/api/images/{image_id}/{route}", headers={"If-None-Match": f'"other", {full.headers["etag"]}'})
        assert listed.status_code == 304
        other = client.get(f"/api/images/{image_id}/{route}", headers={"If-None-Match": '"not-this-one"'})
        assert other.status_code == 200 and other.content == full.content


@pytest.mark.parametrize("method, url, kwargs, status", [
    ("get", "/api/search?q=%20", {}, 400),  # an empty text query
    ("get", "/api/search?q=red&k=1001", {}, 422),  # past max_k
    ("post", "/api/search", {"json": {}}, 400),  # no text, image or id
    ("post", "/api/search", {"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400),
    ("post", "/api/search", {"json": {"image_id": 99999}}, 404),  # an unknown id
    ("get", "/api/images/abc/thumbnail", {}, 404),  # not an id at all
    ("post", "/api/search/image", {"files": {"file": ("empty.jpg", b"", "image/jpeg")}}, 400),
    ("post", "/api/classify", {"data": {"labels": ",".join(f"l{i}" for i in range(65))},
                               "files": {"file": ("a.png", b"x", "image/png")}}, 422),
])
def test_request_errors_carry_a_message_and_a_hint(client, method, url, kwargs, status):
    """Every refusal says what was wrong and what to send instead (the page shows both)."""
    response = getattr(client, method)(url, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["detail"] and body["hint"], body


def test_405_names_every_method_of_the_path_and_framework_errors_carry_hints(client):
    wrong = client.put("/api/search")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "GET, POST"
    assert wrong.json()["hint"] == "/api/search answers GET, POST; see /docs."
    assert client.post("/healthz").headers["allow"] == "GET, HEAD"
    missing = client.get("/api/no-such-route")
    assert missing.status_code == 404 and "/docs" in missing.json()["hint"]
    invalid = client.get("/api/search", params={"q": "x", "k": "many"})
    assert invalid.status_code == 422 and "/docs" in invalid.json()["hint"]


def test_an_indexing_run_removes_cached_thumbnails_of_images_gone_or_changed(tmp_path, tiny_bundle):
    from clipsearch.indexer.pipeline import IndexOptions
    from clipsearch.indexer.runner import index_paths
    from clipsearch.store.collection import Collection

    own = build_indexed_photos(tmp_path, tiny_bundle, count=4)
    gone, changed, kept = (photo(own, name) for name in ("photo_000.png", "photo_002.jpg", "big.jpg"))
    cache = own.index_dir / own.name / "thumbnails"
    with TestClient(create_app(app_settings(own))) as own_client:
        for path in (gone, changed, kept):
            assert own_client.get(f"/api/images/{own.ids_by_path[str(path)]}/thumbnail").status_code == 200
    assert len(list(cache.glob("*.jpg"))) == 3
    gone.unlink()
    Image.new("RGB", (40, 30), "purple").save(changed, quality=90)
    os.utime(changed, ns=(1, 1))
    with Collection.open(own.name, own.index_dir) as collection:
        summary = index_paths(collection, ClipModel(tiny_bundle, threads=1), [str(tmp_path / "photos")],
                              IndexOptions(workers=0))
    assert (summary.removed, summary.updated) == (1, 1)
    assert [p.name.split("-")[0] for p in cache.glob("*.jpg")] == [str(own.ids_by_path[str(kept)])]


def test_thumbnail_is_at_most_256_px_and_cached_on_disk(client, indexed):
    image_id = indexed.ids_by_path[str(photo(indexed, "big.jpg"))]
    cache = indexed.index_dir / indexed.name / "thumbnails"
    assert not list(cache.glob(f"{image_id}-*.jpg"))
    first = client.get(f"/api/images/{image_id}/thumbnail")
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(first.content)).size == (256, 192)
    cached = list(cache.glob(f"{image_id}-*.jpg"))
    assert len(cached) == 1 and cached[0].read_bytes() == first.content
    mtime = cached[0].stat().st_mtime_ns
    second = client.get(f"/api/images/{image_id}/thumbnail")
    assert second.content == first.content and cached[0].stat().st_mtime_ns == mtime
    small = client.get(f"/api/images/{indexed.ids_by_path[str(photo(indexed, 'photo_001.jpg'))]}/thumbnail")
    assert Image.open(io.BytesIO(small.content)).size == (160, 120)  # never enlarged


@pytest.mark.parametrize("suffix", ["", "/thumbnail", "/file"])
@pytest.mark.parametrize("image_id", ["99999", "abc", "-1", "1.5", "0x1", "１"])
def test_unknown_image_ids_are_404(client, image_id, suffix):
    response = client.get(f"/api/images/{image_id}{suffix}")
    assert response.status_code == 404
    assert "image" in response.json()["detail"]


def test_image_deleted_from_disk_is_404_not_500(tmp_path, tiny_bundle):
    indexed = build_indexed_photos(tmp_path, tiny_bundle, count=2)
    path = indexed.photos[0]
    image_id = indexed.ids_by_path[str(path)]
    path.unlink()
    with TestClient(create_app(app_settings(indexed))) as client:
        for suffix in ("/file", "/thumbnail"):
            response = client.get(f"/api/images/{image_id}{suffix}")
            assert response.status_code == 404 and "no longer on disk" in response.json()["detail"]


# -- stats, health, docs -------------------------------------------------------------------------------
def test_stats_describe_the_collection(client, indexed):
    stats = client.get("/api/stats").json()
    assert stats["collection"] == indexed.name and stats["images"] == PHOTO_COUNT + 1
    assert stats["model"]["embed_dim"] == 64 and stats["index_count"] == PHOTO_COUNT + 1 and stats["index_fresh"]
    assert stats["collections"] == [indexed.name]
    assert stats["can_rerank"] is False  # the tiny open_clip model has no ITM head (the page hides its toggle)
    assert stats["index_factory"] and "Flat" in stats["index_factory"]  # small: exact, nothing tuned
    assert stats["index_nprobe"] is None and stats["index_recall"] is None


def test_nprobe_is_a_search_parameter_that_exact_indexes_ignore(client):
    plain = client.get("/api/search", params={"q": "a red square", "k": 5}).json()["results"]
    probed = client.get("/api/search", params={"q": "a red square", "k": 5, "nprobe": 3}).json()["results"]
    posted = client.post("/api/search", json={"text": "a red square", "k": 5, "nprobe": 3}).json()["results"]
    assert [r["id"] for r in probed] == [r["id"] for r in plain] == [r["id"] for r in posted]
    for bad in (0, 70_000, "many"):
        assert client.get("/api/search", params={"q": "x", "nprobe": bad}).status_code == 422
        assert client.post("/api/search", json={"text": "x", "nprobe": bad}).status_code == 422


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_openapi_documents_every_route(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/search", "/api/search/image", "/api/classify", "/api/images/{image_id}",
            "/api/images/{image_id}/thumbnail", "/api/images/{image_id}/file", "/api/stats", "/healthz",
            "/knn-service", "/indices-list", "/metadata"} <= set(paths)
    assert set(paths["/api/search"]) == {"get", "post"}
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


def test_openapi_states_the_limits_and_statuses_the_server_enforces(client):
    """A client validating against the document sends only what the server takes, and knows every answer."""
    spec = client.get("/openapi.json").json()
    components = spec["components"]["schemas"]
    search = spec["paths"]["/api/search"]
    k_param = next(p for p in search["get"]["parameters"] if p["name"] == "k")["schema"]
    q_param = next(p for p in search["get"]["parameters"] if p["name"] == "q")["schema"]
    assert any(option.get("maximum") == 1000 for option in [k_param, *k_param.get("anyOf", [])])
    assert q_param["maxLength"] == 1000
    body = components["SearchRequest"]["properties"]
    assert any(option.get("maximum") == 1000 for option in [body["k"], *body["k"].get("anyOf", [])])
    knn = spec["paths"]["/knn-service"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    for name in ("num_images", "num_result_ids"):  # more than max_k is served as max_k (clip-front asks for 3,000)
        options = [knn[name], *knn[name].get("anyOf", [])]
        assert any(o.get("minimum") == 1 for o in options) and not any("maximum" in o for o in options), knn[name]
    assert "9.223372036854776e+18" not in json.dumps(spec) and str(2**63 - 1) in json.dumps(spec)
    assert "405" in search["get"]["responses"] and "408" in search["post"]["responses"]
    assert "busy" in search["get"]["responses"]["503"]["description"]
    thumbnail = spec["paths"]["/api/images/{image_id}/thumbnail"]["get"]["responses"]
    assert {"206", "304", "416"} <= set(thumbnail) and "content" not in thumbnail["416"]
    # The server refuses exactly past those bounds.
    assert client.get("/api/search", params={"q": "x", "k": 1001}).status_code == 422
    assert client.get("/api/search", params={"q": "x" * 1001}).status_code == 422


def test_openapi_documents_the_rerank_fields(client):
    spec = client.get("/openapi.json").json()
    can_rerank = spec["components"]["schemas"]["StatsResponse"]["properties"]["can_rerank"]
    assert can_rerank["type"] == "boolean" and "ITM head" in can_rerank["description"]
    knn = spec["paths"]["/knn-service"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert "ITM head" in knn["rerank"]["description"] and "similarity is then the final score" in knn["rerank"]["description"]
    rerank_k = next(option for option in knn["rerank_k"]["anyOf"] if option["type"] == "integer")
    min_match = next(option for option in knn["min_match"]["anyOf"] if option["type"] == "number")
    assert (rerank_k["minimum"], rerank_k["maximum"]) == (1, 256) and (min_match["minimum"], min_match["maximum"]) == (0, 1)


def test_unknown_routes_and_methods_are_json_errors(client):
    missing = client.get("/api/nothing-here")
    assert missing.status_code == 404 and missing.json()["detail"] == "Not Found" and "/docs" in missing.json()["hint"]
    wrong_method = client.delete("/api/search")
    assert wrong_method.status_code == 405 and "detail" in wrong_method.json()


def test_a_second_collection_is_served_by_name(tmp_path, tiny_bundle, indexed):
    other_root = tmp_path / "other"
    other = build_indexed_photos(other_root, tiny_bundle, count=3)
    # put the second collection next to the first under one index folder
    shutil.copytree(other.index_dir / other.name, tmp_path / "idx" / "second")
    shutil.copytree(indexed.index_dir / indexed.name, tmp_path / "idx" / indexed.name)
    settings = ServerSettings(allowed_hosts=TEST_HOSTS, collection=indexed.name, index_dir=tmp_path / "idx")
    with TestClient(create_app(settings)) as client:
        assert client.get("/api/stats").json()["collections"] == [indexed.name, "second"]
        answer = client.get("/api/search", params={"q": "photo", "collection": "second"}).json()
        assert answer["collection"] == "second" and len(answer["results"]) == 4
        assert all(r["thumbnail_url"].endswith("?collection=second") for r in answer["results"])
        thumb = client.get(answer["results"][0]["thumbnail_url"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert np.isclose(client.get("/api/stats", params={"collection": "second"}).json()["images"], 4)


# -- garbage in, never a 500 ---------------------------------------------------------------------------
ODD_VALUES = [None, "", " ", "x" * 5000, "\x00", "💥", 0, -1, 1.5, 10**30, -(10**30), [], {}, [1], ["a"], {"a": 1}, True,
              "NaN", 1e308, "../../etc/passwd", "%2e%2e", "1:", "-1:cat", "1e9:cat", "0:cat"]
BODY_FIELDS = {"/api/search": ["text", "image_b64", "image_id", "and", "not", "k", "collection", "include_self"],
               "/knn-service": ["text", "image", "image_url", "embedding_input", "modality", "num_images",
                                "num_result_ids", "indice_name", "deduplicate", "aesthetic_score", "use_mclip"],
               "/metadata": ["ids", "indice_name"]}


def test_random_malformed_requests_never_get_a_500(indexed):
    rng = random.Random(1234)
    failures = []
    app = create_app(app_settings(indexed))
    with TestClient(app, raise_server_exceptions=False) as client:
        for path, fields in BODY_FIELDS.items():
            for _ in range(120):
                body = {f: rng.choice(ODD_VALUES) for f in rng.sample(fields, rng.randint(1, len(fields)))}
                response = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
                if response.status_code >= 500 or (response.status_code != 200 and "detail" not in response.json()):
                    failures.append((path, body, response.status_code, response.text[:200]))
        for _ in range(60):
            params = {key: str(rng.choice(ODD_VALUES)) for key in rng.sample(["q", "k", "collection"], rng.randint(1, 3))}
            response = client.get("/api/search", params=params)
            if response.status_code >= 500:
                failures.append(("GET /api/search", params, response.status_code, response.text[:200]))
        for path in ("/api/search/image", "/api/classify"):
            for body, content_type in ((b"garbage", "multipart/form-data"), (b"--x\r\n\r\n", "multipart/form-data; boundary=x"),
                                       (b"", "multipart/form-data; boundary=x"), (b"{}", "application/json")):
                response = client.post(path, content=body, headers={"content-type": content_type})
                if response.status_code >= 500:
                    failures.append((path, body, response.status_code, response.text[:200]))
    assert failures == []


@pytest.mark.parametrize("mode, fmt", [("1", "PNG"), ("L", "PNG"), ("I;16", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"),
                                       ("P", "GIF"), ("F", "TIFF"), ("1", "BMP"), ("RGB", "WEBP"), ("RGB", "ICO")])
def test_every_image_mode_and_format_can_be_a_query(client, mode, fmt):
    out = io.BytesIO()
    Image.new(mode, (30, 20)).save(out, format=fmt)
    response = client.post("/api/search/image", files={"file": (f"x.{fmt.lower()}", out.getvalue(), "application/octet-stream")},
                           data={"k": "2"})
    assert response.status_code == 200 and len(response.json()["results"]) == 2


def test_openapi_docs_page_loads_its_assets_from_the_app_itself(client):
    page = client.get("/docs")
    assert page.status_code == 200
    assert "cdn" not in page.text.lower() and "/static-docs/swagger-ui-bundle.js" in page.text
    assert client.get("/static-docs/swagger-ui-bundle.js").status_code == 200


def test_post_routes_refuse_parameters_they_would_ignore(client, indexed):
    # A query string on a POST route (GET /api/search's ?collection=) used to be ignored: another collection was
    # searched without a word. So was a form field an upload route does not take (rerank on an image upload).
    stray = client.post("/api/search?collection=nope&k=1", json={"text": "a red square"})
    assert stray.status_code == 400 and "does not read the query string (collection, k)" in stray.json()["detail"]
    knn = client.post("/knn-service?indice_name=nope", json={"text": "a red square", "num_images": 2})
    assert knn.status_code == 400 and "indice_name" in knn.json()["detail"]
    upload = photo(indexed, "photo_000.png").read_bytes()
    for route, fields in (("/api/search/image", {"rerank": "true"}), ("/api/classify", {"labels": "a,b", "k": "2"})):
        answer = client.post(route, files={"file": ("x.png", upload, "image/png")}, data=fields)
        assert answer.status_code == 400, (route, answer.text)
        assert "takes no form field" in answer.json()["detail"] and "file" in answer.json()["hint"]
    # What the routes do take still works.
    fine = client.post("/api/search/image", files={"file": ("x.png", upload, "image/png")}, data={"k": "3", "text": "red"})
    assert fine.status_code == 200 and len(fine.json()["results"]) == 3
    assert client.post("/api/search", json={"text": "a red square", "k": 2}).status_code == 200


def test_two_images_in_one_request_are_refused_not_one_picked(client, indexed):
    upload = ("x.png", photo(indexed, "photo_000.png").read_bytes(), "image/png")
    both = client.post("/api/search/image", files={"file": upload, "image": upload})
    assert both.status_code == 400 and "'file' and its alias 'image'" in both.json()["detail"]
    by_id = client.post("/api/classify", files={"file": upload}, data={"labels": "a,b", "image_id": "1"})
    assert by_id.status_code == 400 and "an upload and image_id" in by_id.json()["detail"]
    assert client.post("/api/classify", data={"labels": "a,b", "image_id": str(min(indexed.ids_by_path.values()))}).status_code == 200


def test_the_json_search_body_is_strict_about_types_and_names(client):
    # "k": "5" was read as 5 and true as 1; a misspelt field (or clip-back's indice_name) was ignored without a word.
    for body, where in (({"text": "a red square", "k": "5"}, "k"), ({"text": "a red square", "k": True}, "k"),
                        ({"text": "a red square", "include_self": "yes"}, "include_self"),
                        ({"text": "a red square", "colection": "other"}, "colection"),
                        ({"text": "a red square", "indice_name": "photos"}, "indice_name")):
        answer = client.post("/api/search", json=body)
        assert answer.status_code == 422 and where in answer.json()["detail"], (body, answer.text)
    fine = client.post("/api/search", json={"text": "a red square", "and": ["blue"], "not": ["green"], "k": 3,
                                            "include_self": True, "min_match": None, "in": None})
    assert fine.status_code == 200 and len(fine.json()["results"]) == 3


def test_results_say_which_files_are_no_longer_on_disk(tmp_path, tiny_bundle, monkeypatch):
    """A photo moved away since it was indexed is still found (until its folder is indexed again); every search
    route says so per result, the batched text path included, instead of leaving the page a broken thumbnail. The
    files are looked at in a worker thread, never in the encoder lanes (a hung network mount must not hold up every
    text search)."""
    indexed = build_indexed_photos(tmp_path, tiny_bundle, count=6)
    moved = indexed.photos[2]
    moved_id = indexed.ids_by_path[str(moved)]
    shutil.move(moved, tmp_path / moved.name)
    with TestClient(create_app(app_settings(indexed))) as local:
        answers = [
            local.get("/api/search", params={"q": "a photo", "k": 10}).json(),  # a plain text query: the batched path
            local.get("/api/search", params={"q": "a photo", "k": 10, "min_size": "1x1"}).json(),  # the executor
            local.post("/api/search", json={"image_id": indexed.ids_by_path[str(indexed.photos[0])], "k": 10}).json(),
        ]
        for answer in answers:
            flags = {r["id"]: r["missing"] for r in answer["results"]}
            assert flags.get(moved_id) is True, answer
            assert sum(flags.values()) == 1, answer
        assert local.get(f"/api/images/{moved_id}/thumbnail").status_code == 404

    import threading

    import clipsearch.web.api as api_module

    where: list[str] = []
    real = api_module.missing_local_files

    def recording(found):
        where.append(threading.current_thread().name)
        return real(found)

    monkeypatch.setattr(api_module, "missing_local_files", recording)
    with TestClient(create_app(app_settings(indexed))) as local:
        assert local.get("/api/search", params={"q": "a photo", "k": 3}).status_code == 200
    assert where and not any("batcher" in name for name in where), where
