"""clip-back compatibility: /knn-service, /indices-list and /metadata as clip-retrieval's clients use them,
including the real `ClipClient` class against a running server."""

from __future__ import annotations

import base64
import http.server
import importlib.util
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import requests
from fastapi.testclient import TestClient

from clipsearch.model.bundle import read_bundle
from clipsearch.store.collection import Collection
from clipsearch.store.database import NewImage
from clipsearch.web import ServerSettings, create_app
from web_fixtures import TEST_HOSTS, IndexedPhotos, LiveServer, app_settings, build_indexed_photos

# Every field ClipClient.__search_knn_api__ sends (clip-retrieval 2.45), with its defaults.
CLIP_CLIENT_BODY = {"text": None, "image": None, "image_url": None, "embedding_input": None, "deduplicate": True,
                    "use_safety_model": True, "use_violence_detector": True, "indice_name": "photos",
                    "use_mclip": False, "aesthetic_score": 9, "aesthetic_weight": 0.5, "modality": "image",
                    "num_images": 40, "num_result_ids": 40}


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_bundle) -> IndexedPhotos:
    root = tmp_path_factory.mktemp("clipback")
    built = build_indexed_photos(root, tiny_bundle)
    return built


@pytest.fixture(scope="module")
def client(indexed) -> TestClient:
    with TestClient(create_app(app_settings(indexed))) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def rerank_client(tmp_path_factory, blip_bundle) -> TestClient:
    """A collection indexed (the normal indexing path) with the tiny random BLIP (blip_fixtures.py), whose ITM head re-ranks."""
    root = tmp_path_factory.mktemp("clipback-rerank")
    built = build_indexed_photos(root / "data", blip_bundle)
    with TestClient(create_app(app_settings(built))) as test_client:
        yield test_client


def knn(client: TestClient, **fields) -> requests.Response:
    # Sent exactly like ClipClient does: json.dumps(...) as the body, no JSON content type.
    return client.post("/knn-service", content=json.dumps({**CLIP_CLIENT_BODY, **fields}))


def load_clip_client_class():
    """The real ClipClient. Importing `clip_retrieval` runs its package __init__, which pulls in torch, flask
    and more; clip_client.py itself needs only requests, so load that file from the installed package."""
    spec = importlib.util.find_spec("clip_retrieval")
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps clip-retrieval"
    path = Path(list(spec.submodule_search_locations)[0]) / "clip_client.py"
    module_spec = importlib.util.spec_from_file_location("clip_retrieval_clip_client", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.ClipClient, module.Modality


def test_indices_list_names_the_collections(client, indexed):
    response = client.get("/indices-list")
    assert response.status_code == 200 and response.json() == [indexed.name]


def test_knn_text_query_without_json_content_type(client, indexed):
    response = knn(client, text="a blue square", num_images=5, num_result_ids=5, deduplicate=False)
    assert response.status_code == 200
    results = response.json()
    assert [r["id"] for r in results] == indexed.text_ranking("a blue square")[:5]
    similarities = [r["similarity"] for r in results]
    assert similarities == sorted(similarities, reverse=True)
    first = results[0]
    assert set(first) >= {"id", "similarity", "image_path", "caption", "url"}
    assert indexed.ids_by_path[first["image_path"]] == first["id"]
    assert first["caption"] == Path(first["image_path"]).name
    assert first["url"] == f"http://testserver/api/images/{first['id']}/file"
    assert client.get(first["url"]).content == Path(first["image_path"]).read_bytes()


def test_knn_matches_the_rest_api_order(client):
    rest = client.get("/api/search", params={"q": "sunset", "k": 8}).json()["results"]
    clip = knn(client, text="sunset", num_images=8, deduplicate=False).json()
    assert [r["id"] for r in clip] == [r["id"] for r in rest]


def test_front_end_body_with_text_plain_nulls_and_unknown_fields(client):
    # clip-front's fetch sends a string body (text/plain) and leaves out several fields.
    body = {"text": "cat", "image": None, "image_url": None, "modality": "image", "num_images": 3,
            "indice_name": "photos", "num_result_ids": 3, "use_mclip": False, "deduplicate": False,
            "use_safety_model": False, "some_future_field": {"x": 1}}
    response = client.post("/knn-service", content=json.dumps(body), headers={"content-type": "text/plain;charset=UTF-8"})
    assert response.status_code == 200 and len(response.json()) == 3
    nulls = {key: None for key in CLIP_CLIENT_BODY} | {"text": "cat"}
    response = client.post("/knn-service", content=json.dumps(nulls))
    # null deduplicate means clip-back's default (off); num_images defaults to 40, and there are 13 photos
    assert response.status_code == 200 and len(response.json()) == 13


def test_knn_image_as_base64_returns_the_image_itself_first(client, indexed):
    path = next(p for p in indexed.photos if p.name == "photo_007.jpg")
    response = knn(client, image=base64.b64encode(path.read_bytes()).decode(), num_images=3, deduplicate=False)
    results = response.json()
    assert response.status_code == 200 and results[0]["id"] == indexed.ids_by_path[str(path)]
    assert results[0]["similarity"] == pytest.approx(1.0, abs=1e-3)


def test_knn_embedding_input(client, indexed):
    image_id = indexed.ids_by_path[str(indexed.photos[3])]
    vector = indexed.stored_vector(image_id)
    results = knn(client, embedding_input=(vector * 3).tolist(), num_images=4, deduplicate=False).json()
    assert [r["id"] for r in results] == indexed.ranking(vector)[:4]
    assert results[0]["id"] == image_id and results[0]["similarity"] == pytest.approx(1.0, abs=1e-4)


def test_num_images_limits_what_num_result_ids_found(client):
    results = knn(client, text="dog", num_images=2, num_result_ids=10, deduplicate=False).json()
    assert len(results) == 2


def test_counts_past_the_servers_limit_are_served_as_the_limit_as_clip_front_expects(client, indexed):
    # clip-front sends num_result_ids 3000 with every query; a ClipClient may ask for 1,500 images.
    front = knn(client, text="dog", num_images=40, num_result_ids=3000, deduplicate=True)
    assert front.status_code == 200, front.text
    many = knn(client, text="dog", num_images=1500, deduplicate=False)
    assert many.status_code == 200 and len(many.json()) == len(indexed.photos)


@pytest.mark.parametrize("fields, status, message", [
    ({"indice_name": "laion5B"}, 400, "unknown collection 'laion5B'"),
    ({"text": None}, 400, "must fill one of text, image"),
    ({"image_url": "http://169.254.169.254/latest/meta-data/", "text": None}, 400, "image_url is disabled"),
    ({"modality": "text"}, 400, "indexes images only"),
    ({"num_images": "many"}, 422, "num_images"),
    ({"num_images": 0}, 422, "at least 1"),
    ({"num_images": 5, "num_result_ids": 0}, 422, "at least 1"),
    ({"embedding_input": [0.1, 0.2], "text": None}, 400, "dimensions"),
    ({"embedding_input": [0.0] * 64, "text": None}, 400, "non-zero"),
    ({"embedding_input": [True] + [0.5] * 63, "text": None}, 422, "embedding_input"),  # not a vector value
    ({"image": "@@not base64@@", "text": None}, 400, "not valid base64"),
    ({"image": base64.b64encode(b"GIF89a broken").decode(), "text": None}, 415, "not an image"),
    ({"image": "/etc/passwd", "text": None}, 400, "base64"),
])
def test_bad_knn_requests_are_json_errors_not_crashes(client, fields, status, message):
    response = knn(client, **({"text": "cat"} | fields))
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_unparseable_bodies_are_400(client, body):
    response = client.post("/knn-service", content=body)
    assert response.status_code == 400 and "detail" in response.json()


def test_metadata_in_the_order_asked(client, indexed):
    wanted = [indexed.ids_by_path[str(p)] for p in indexed.photos[:3]][::-1]
    response = client.post("/metadata", content=json.dumps({"ids": wanted + [99999], "indice_name": "photos"}))
    assert response.status_code == 200
    answer = response.json()
    assert [entry["id"] for entry in answer] == wanted + [99999]  # one entry per id asked, as clip-back gives
    assert answer[-1]["metadata"] == {}  # no image with that id
    first = answer[0]["metadata"]
    assert first["image_path"] == str(indexed.photos[2]) and first["caption"] == indexed.photos[2].name
    assert first["url"].endswith(f"/api/images/{wanted[0]}/file")
    assert client.post("/metadata", content=json.dumps({"ids": [], "indice_name": "photos"})).json() == []
    unknown = client.post("/metadata", content=json.dumps({"ids": [1], "indice_name": "nope"}))
    assert unknown.status_code == 400 and "unknown collection" in unknown.json()["detail"]
    for bad_ids in ("1,2", [10**30], ["x"]):
        bad = client.post("/metadata", content=json.dumps({"ids": bad_ids}))
        assert bad.status_code == 422, bad_ids


def _deduplicated(tmp_path, tiny_bundle, vectors: list, query: np.ndarray) -> tuple[list[int], list[int], list[int]]:
    """A collection of chosen vectors (normalised) served, and /knn-service for `query` as an embedding: (the ids
    in the order of `vectors`, the result ids without deduplication, with it)."""
    index_dir = tmp_path / "collections"
    info = read_bundle(tiny_bundle)
    with Collection.create("synthetic", index_dir) as collection:
        collection.bind_model(info)
        rows = [NewImage(path=str(tmp_path / f"img{i}.png"), size=1, mtime_ns=1, content_hash=f"{i:032x}", width=8,
                         height=8, taken_at=None, vector=(v / np.linalg.norm(v)).astype(np.float32))
                for i, v in enumerate(vectors)]
        ids = collection.store.write_images(rows, info.model_id, collection.store.next_run_id(), "2026-01-01T00:00:00")
        collection.sync_vectors()
    settings = ServerSettings(allowed_hosts=TEST_HOSTS, collection="synthetic", index_dir=index_dir)
    with TestClient(create_app(settings)) as client:
        body = {"embedding_input": query.tolist(), "indice_name": "synthetic", "num_images": 10}
        every = [r["id"] for r in knn(client, **body, deduplicate=False).json()]
        kept = [r["id"] for r in knn(client, **body, deduplicate=True).json()]
    return list(ids), every, kept


def test_deduplicate_drops_near_copies_of_a_better_result(tmp_path, tiny_bundle):
    # The tiny random-init model maps every photo to nearly the same direction (cosines > 0.95), so this
    # test writes chosen vectors instead: 0 and 1 identical, 2 at cosine 0.98 to them, 3 at 0.71, 4 orthogonal.
    basis = np.eye(64, dtype=np.float32)
    vectors = [basis[0], basis[0], basis[0] + 0.2 * basis[1], basis[0] + basis[1], basis[2]]
    ids, every, kept = _deduplicated(tmp_path, tiny_bundle, vectors, basis[0])
    assert set(every[:2]) == {ids[0], ids[1]} and every[2:] == [ids[2], ids[3], ids[4]]
    assert kept == [every[0], ids[3], ids[4]]


def test_deduplicate_keeps_one_result_of_a_chain_of_near_copies_as_clip_back_does(tmp_path, tiny_bundle):
    # Images 1 ~ 2 and 2 ~ 3 at cosine 0.95 (> 0.94), 1 and 3 at 0.805: clip-back groups the chain and keeps only its
    # best (connected components of the cosine graph); a pairwise check against kept results would keep 1 and 3.
    theta = np.arccos(0.95)
    basis = np.eye(64, dtype=np.float32)
    vectors = [basis[0]] + [np.cos(0.4 + i * theta) * basis[0] + np.sin(0.4 + i * theta) * basis[1] for i in range(3)]
    ids, every, kept = _deduplicated(tmp_path, tiny_bundle, vectors, basis[0])
    assert every == ids  # by cosine to the query: 1, cos 0.4, cos(0.4 + theta), cos(0.4 + 2 theta)
    assert kept == [ids[0], ids[1]]  # 0 is alike to none (0.92 to 1); the chain 1 ~ 2 ~ 3 keeps 1


class _OneImageHandler(http.server.BaseHTTPRequestHandler):
    payload = b""

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload)

    def log_message(self, *args) -> None:
        pass


def test_image_url_is_fetched_only_when_enabled(indexed):
    path = next(p for p in indexed.photos if p.name == "photo_008.jpg")
    handler = type("Handler", (_OneImageHandler,), {"payload": path.read_bytes()})
    image_host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=image_host.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{image_host.server_address[1]}/photo.jpg"
    try:
        settings = app_settings(indexed, allow_remote_images=True)
        with TestClient(create_app(settings)) as client:
            results = knn(client, image_url=url, num_images=2, deduplicate=False).json()
            assert results[0]["id"] == indexed.ids_by_path[str(path)]
            refused = knn(client, image_url="file:///etc/passwd", num_images=2)
            assert refused.status_code == 400 and "http or https" in refused.json()["detail"]
    finally:
        image_host.shutdown()


def test_real_clip_client_against_a_running_server(indexed):
    ClipClient, Modality = load_clip_client_class()
    app = create_app(app_settings(indexed))
    with LiveServer(app) as server:
        client = ClipClient(url=f"{server.url}/knn-service", indice_name=indexed.name, num_images=5,
                            modality=Modality.IMAGE, deduplicate=False)
        by_text = client.query(text="a green field")
        assert [r["id"] for r in by_text] == indexed.text_ranking("a green field")[:5]
        assert all({"id", "similarity", "image_path", "caption", "url"} <= set(r) for r in by_text)
        photo = next(p for p in indexed.photos if p.name == "photo_009.png")
        by_image = client.query(image=str(photo))
        assert by_image[0]["id"] == indexed.ids_by_path[str(photo)]
        vector = indexed.stored_vector(by_image[1]["id"])
        by_embedding = client.query(embedding_input=vector.tolist())
        assert by_embedding[0]["id"] == by_image[1]["id"]
        # ClipClient's defaults (deduplicate and the safety filters on, aesthetic fields set) are accepted
        defaults = ClipClient(url=f"{server.url}/knn-service", indice_name=indexed.name).query(text="anything")
        assert isinstance(defaults, list) and 1 <= len(defaults) <= 13
        url_client = ClipClient(url=f"{server.url}/knn-service", indice_name=indexed.name)
        refused = url_client.query(image="https://example.com/cat.jpg")
        assert "image_url is disabled" in refused["detail"]
        wrong_index = ClipClient(url=f"{server.url}/knn-service", indice_name="laion5B").query(text="cat")
        assert "unknown collection 'laion5B'" in wrong_index["detail"]
        assert requests.get(f"{server.url}/indices-list", timeout=5).json() == [indexed.name]


RERANK_TEXT = "a red square"


def test_knn_rerank_reorders_the_top_rerank_k_like_the_rest_api(rerank_client):
    assert rerank_client.get("/api/stats").json()["can_rerank"] is True
    plain = knn(rerank_client, text=RERANK_TEXT, num_images=6, deduplicate=False).json()
    assert all("match" not in r and "itc_score" not in r for r in plain)
    answer = knn(rerank_client, text=RERANK_TEXT, num_images=6, deduplicate=False, rerank=True, rerank_k=3)
    assert answer.status_code == 200, answer.text
    results = answer.json()
    rest = rerank_client.get("/api/search", params={"q": RERANK_TEXT, "k": 6, "rerank": "true", "rerank_k": 3})
    expected = rest.json()["results"]
    assert [r["id"] for r in results] == [r["id"] for r in expected]
    # clip-back's shape, similarity = the final score; the re-scored top 3 add match and itc_score
    assert all({"id", "similarity", "image_path", "caption", "url"} <= set(r) for r in results)
    assert [r["similarity"] for r in results] == pytest.approx([r["score"] for r in expected], abs=1e-5)
    top, rest_of = results[:3], results[3:]
    assert [r["match"] for r in top] == pytest.approx([r["match"] for r in expected[:3]], abs=1e-5)
    assert all(0 <= r["match"] <= 1 for r in top)
    assert {r["id"] for r in top} == {r["id"] for r in plain[:3]}  # only the top rerank_k change order
    by_id = {r["id"]: r["similarity"] for r in plain}
    assert [r["itc_score"] for r in top] == pytest.approx([by_id[r["id"]] for r in top], abs=1e-5)
    assert [r["similarity"] for r in top] == sorted((r["similarity"] for r in top), reverse=True)
    assert rest_of == plain[3:]  # beyond rerank_k: ITC order and scores, no match


def test_knn_rerank_false_or_null_is_the_plain_answer(rerank_client):
    plain = knn(rerank_client, text=RERANK_TEXT, num_images=5, deduplicate=False).json()
    for off in (False, None):
        same = knn(rerank_client, text=RERANK_TEXT, num_images=5, deduplicate=False, rerank=off, rerank_k=2)
        assert same.status_code == 200 and same.json() == plain
    assert [r["id"] for r in plain] == [r["id"] for r in rerank_client.get(
        "/api/search", params={"q": RERANK_TEXT, "k": 5}).json()["results"]]


def test_knn_min_match_keeps_only_likely_matches(rerank_client):
    everything = knn(rerank_client, text=RERANK_TEXT, num_images=13, deduplicate=False, rerank=True).json()
    matches = sorted(r["match"] for r in everything)
    assert len(matches) == 13 and matches[0] < matches[-1]
    threshold = (matches[5] + matches[6]) / 2  # between two distinct values: 7 results reach it
    kept = knn(rerank_client, text=RERANK_TEXT, num_images=13, deduplicate=False, rerank=True,
               min_match=threshold).json()
    assert [r["id"] for r in kept] == [r["id"] for r in everything if r["match"] >= threshold]
    assert len(kept) == 7 and all(r["match"] >= threshold for r in kept)


@pytest.mark.parametrize("fields, status, message", [
    ({"rerank": "sometimes"}, 422, "rerank"),
    ({"rerank": [True]}, 422, "rerank"),
    ({"rerank": True, "rerank_k": 0}, 422, "rerank_k"),
    ({"rerank": True, "rerank_k": 257}, 422, "rerank_k"),
    ({"rerank": True, "rerank_k": "ten"}, 422, "rerank_k"),
    ({"rerank": True, "min_match": 1.5}, 422, "min_match"),
    ({"rerank": True, "min_match": -0.1}, 422, "min_match"),
    ({"rerank": True, "min_match": "high"}, 422, "min_match"),
    ({"min_match": 0.5}, 400, "min_match needs rerank"),
    ({"rerank": False, "min_match": 0.5}, 400, "min_match needs rerank"),
    ({"rerank": True, "text": None, "embedding_input": [0.1] * 24}, 400, "rerank needs a text query"),
])
def test_bad_rerank_fields_are_clear_errors(rerank_client, fields, status, message):
    response = knn(rerank_client, **({"text": RERANK_TEXT} | fields))
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


def test_knn_rerank_with_an_image_query_is_refused(rerank_client, indexed):
    image = base64.b64encode(indexed.photos[0].read_bytes()).decode()
    response = knn(rerank_client, image=image, rerank=True)
    assert response.status_code == 400 and "rerank needs a text query" in response.json()["detail"]
    assert "hint" in response.json()


def test_knn_rerank_without_an_itm_head_says_how_to_get_one(client):
    response = knn(client, text="cat", rerank=True)
    assert response.status_code == 400, response.text
    body = response.json()
    assert "cannot re-rank (no ITM head)" in body["detail"] and "export-blip" in body["hint"]
    assert client.get("/api/stats").json()["can_rerank"] is False
