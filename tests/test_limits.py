"""Bounded work per request: documented limits on texts, text length, labels and decoded pixels (422/413 beyond
them, before any model work), label embeddings cached per app, and a real server's memory that stays bounded
across many maximum-size requests."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from fastapi.testclient import TestClient
from PIL import Image

from clipsearch.web import ServerSettings, create_app
from clipsearch.web.settings import (DEFAULT_MAX_LABEL_CHARS, DEFAULT_MAX_LABELS, DEFAULT_MAX_QUERY_TERMS,
                                     DEFAULT_MAX_TEXT_CHARS)
from web_fixtures import IndexedPhotos, app_settings, build_indexed_photos, free_port, wait_until_healthy


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, tiny_bundle) -> IndexedPhotos:
    return build_indexed_photos(tmp_path_factory.mktemp("limits"), tiny_bundle, count=3)


@pytest.fixture(scope="module")
def client(indexed):
    app = create_app(app_settings(indexed))
    with TestClient(app) as test_client:
        yield test_client


def png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), "green").save(out, format="PNG")
    return out.getvalue()


def test_documented_default_limits():
    settings = ServerSettings()
    assert (settings.max_query_terms, settings.max_text_chars, settings.max_labels, settings.max_label_chars) == \
        (DEFAULT_MAX_QUERY_TERMS, DEFAULT_MAX_TEXT_CHARS, DEFAULT_MAX_LABELS, DEFAULT_MAX_LABEL_CHARS) == \
        (16, 1000, 64, 100)
    assert settings.max_k == 1000 and settings.max_upload_bytes == 20 * 1024 * 1024
    assert settings.max_image_pixels == 100_000_000


def test_query_terms_are_capped(client):
    texts = [f"text {i}" for i in range(DEFAULT_MAX_QUERY_TERMS)]
    body = {"text": texts[0], "and": texts[1:10], "not": texts[10:], "k": 2}
    assert client.post("/api/search", json=body).status_code == 200
    started = time.perf_counter()
    too_many = client.post("/api/search", json={"text": "x", "and": [f"t{i}" for i in range(2000)]})
    assert time.perf_counter() - started < 2
    assert too_many.status_code == 422
    assert "2001 texts in one query is more than the limit of 16" in too_many.json()["detail"]
    assert client.post("/api/search", json={"text": "x", "and": ["a"] * 8, "not": ["b"] * 8}).status_code == 422


@pytest.mark.parametrize("request_kwargs", [
    {"method": "GET", "url": "/api/search", "params": {"q": "x" * 1001}},
    {"method": "POST", "url": "/api/search", "json": {"text": "x" * 1001}},
    {"method": "POST", "url": "/api/search", "json": {"text": "cat", "and": ["x" * 1001]}},
    {"method": "POST", "url": "/api/search", "json": {"text": "cat", "not": ["x" * 1001]}},
    {"method": "POST", "url": "/knn-service", "content": '{"text": "%s"}' % ("x" * 1001)},
    {"method": "POST", "url": "/api/search/image", "data": {"text": "x" * 1001},
     "files": {"file": ("a.png", png(8, 8))}},
])
def test_text_length_is_capped(client, request_kwargs):
    response = client.request(**request_kwargs)
    assert response.status_code == 422, response.text
    assert "longer than the limit of 1,000" in response.json()["detail"]
    ok = {**request_kwargs}
    if "params" in ok:
        ok["params"] = {"q": "x" * 1000}
    assert client.request(**ok).status_code != 422 or "json" in ok or "content" in ok or "data" in ok


def test_labels_are_capped(client, indexed):
    image_id = str(next(iter(indexed.ids_by_path.values())))
    labels = [f"label number {i}" for i in range(DEFAULT_MAX_LABELS)]
    assert client.post("/api/classify", data={"labels": ",".join(labels), "image_id": image_id}).status_code == 200
    started = time.perf_counter()
    too_many = client.post("/api/classify", data={"labels": ",".join(labels + ["one more"]), "image_id": image_id})
    assert too_many.status_code == 422 and "65 labels is more than the limit of 64" in too_many.json()["detail"]
    many = ",".join(f"l{i}" for i in range(100_000))
    huge = client.post("/api/classify", data={"labels": many, "image_id": image_id})
    assert huge.status_code == 422 and time.perf_counter() - started < 5
    long = client.post("/api/classify", data={"labels": "cat," + "y" * 101, "image_id": image_id})
    assert long.status_code == 422 and "longer than the limit of 100" in long.json()["detail"]
    duplicates = client.post("/api/classify", data={"labels": ",".join(["cat"] * 500), "image_id": image_id})
    assert duplicates.status_code == 200  # repeated labels count once


def test_label_embeddings_are_cached_per_app(client, indexed):
    state = client.app.state.web
    model = state.searcher().model
    calls: list[int] = []
    original = model.encode_text

    def counting(texts):
        calls.append(len(texts))
        return original(texts)

    image_id = str(next(iter(indexed.ids_by_path.values())))
    model.encode_text = counting
    try:
        labels = ",".join(f"cached label {i}" for i in range(40))
        first = client.post("/api/classify", data={"labels": labels, "image_id": image_id}).json()
        assert sum(calls) == 40 * 7 and max(calls) <= 16 * 7  # embedded in bounded batches
        calls.clear()
        second = client.post("/api/classify", data={"labels": labels, "image_id": image_id}).json()
        assert calls == [] and second["probabilities"] == first["probabilities"]
        client.post("/api/classify", data={"labels": labels + ",one new label", "image_id": image_id})
        assert calls == [7]
    finally:
        del model.encode_text
    assert 0 < len(state.label_cache) <= state.settings.label_cache_size


def test_decoded_pixels_are_capped_with_413(indexed):
    settings = app_settings(indexed, max_image_pixels=200 * 200)
    with TestClient(create_app(settings)) as client:
        data = png(201, 200)
        for response in (client.post("/api/search/image", files={"file": ("a.png", data)}),
                         client.post("/api/search", json={"image_b64": base64.b64encode(data).decode()}),
                         client.post("/api/classify", data={"labels": "a"}, files={"file": ("a.png", data)}),
                         client.post("/knn-service", content='{"image": "%s"}' % base64.b64encode(data).decode())):
            assert response.status_code == 413 and "pixel limit" in response.json()["detail"]
        assert client.post("/api/search/image", files={"file": ("a.png", png(200, 200))}).status_code == 200


def test_openapi_documents_the_limit_statuses(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"413", "422"} <= set(paths["/api/search"]["post"]["responses"])
    assert {"413", "422"} <= set(paths["/api/classify"]["post"]["responses"])
    assert "16 texts" in str(paths) or "16 texts" in str(client.get("/openapi.json").json()["components"])


# -- memory of a real server ------------------------------------------------------------------------------
def _memory_kb(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def _big_16_bit_png(path: Path, side: int) -> bytes:
    if not path.exists():
        row = (np.arange(side, dtype=np.uint32) * 7 % 65536).astype(np.uint16)
        pixels = np.broadcast_to(row, (side, side))
        assert Image.fromarray(pixels[:2, :2].copy()).mode == "I;16"
        Image.fromarray(np.ascontiguousarray(pixels)).save(path, format="PNG", compress_level=9)
    return path.read_bytes()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's RSS from /proc")
def test_server_memory_stays_bounded_across_maximum_size_requests(indexed, tmp_path_factory):
    big = _big_16_bit_png(tmp_path_factory.getbasetemp() / "big-16bit.png", 9400)
    assert len(big) < 20 * 1024 * 1024  # within the upload limit: the decoded pixels are what is large
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "CLIPSEARCH_API_KEY"}
    server = subprocess.Popen([sys.executable, "-m", "clipsearch", "serve", "--port", str(port), "--collection",
                               indexed.name, "--index-dir", str(indexed.index_dir), "--log-level", "warning",
                               "--model-threads", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    image_id = str(next(iter(indexed.ids_by_path.values())))
    try:
        wait_until_healthy(url, server)

        def max_search(n: int) -> None:
            texts = [f"query {n} term {i} " + "word " * 198 for i in range(DEFAULT_MAX_QUERY_TERMS)]  # 1,000 chars
            texts = [t[:DEFAULT_MAX_TEXT_CHARS] for t in texts]
            body = {"text": texts[0], "and": texts[1:8], "not": texts[8:]}
            assert requests.post(f"{url}/api/search", json=body, timeout=60).status_code == 200

        def max_classify(n: int) -> None:
            labels = ",".join((f"label {n} {i} " + "z" * 200)[:DEFAULT_MAX_LABEL_CHARS]
                              for i in range(DEFAULT_MAX_LABELS))
            assert requests.post(f"{url}/api/classify", data={"labels": labels, "image_id": image_id},
                                 timeout=120).status_code == 200

        def refused(n: int) -> None:
            body = {"text": "x", "and": [f"{n} {i}" for i in range(2000)]}
            assert requests.post(f"{url}/api/search", json=body, timeout=60).status_code == 422

        def big_image() -> float:
            started = time.perf_counter()
            response = requests.post(f"{url}/api/search/image", files={"file": ("big.png", big, "image/png")},
                                     data={"k": "3"}, timeout=300)
            assert response.status_code == 200, response.text[:300]
            return time.perf_counter() - started

        idle = _memory_kb(server.pid)
        max_search(-1), max_classify(-1)  # warm-up: the model's buffers reach their working size
        warm = _memory_kb(server.pid)
        started = time.perf_counter()
        for n in range(20):
            max_search(n), max_classify(n), refused(n)
        text_seconds = time.perf_counter() - started
        after_text = _memory_kb(server.pid)
        image_seconds = [big_image() for _ in range(3)]
        after_images = _memory_kb(server.pid)
        report = (f"idle {idle}, warm {warm}, after 20x(search 16x1000 chars + classify 64 labels + refused 2000 "
                  f"texts) {after_text} in {text_seconds:.1f} s, after 3 16-bit 9400x9400 PNG queries {after_images} "
                  f"({', '.join(f'{s:.1f}' for s in image_seconds)} s)")
        print(report)
        # No growth from repeated maximum-size text/label requests (a bounded label cache, bounded batches) ...
        assert after_text["VmRSS"] - warm["VmRSS"] < 80_000, report
        assert after_text["VmHWM"] - warm["VmHWM"] < 80_000, report
        # ... and the largest image a request may carry has a bounded peak that is given back.
        assert after_images["VmHWM"] - idle["VmRSS"] < 1_000_000, report
        assert after_images["VmRSS"] - after_text["VmRSS"] < 150_000, report
    finally:
        server.terminate()
        server.communicate(timeout=30)
