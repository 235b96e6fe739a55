"""Shared pieces of the web tests: a small indexed collection of generated photos and a live server."""

from __future__ import annotations

import os

import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests
import uvicorn

from clipsearch.store.collection import Collection
from clipsearch.indexer.pipeline import IndexOptions
from clipsearch.indexer.runner import index_paths
from clipsearch.model.runtime import ClipModel
from clipsearch.web import ServerSettings
from photo_fixtures import block_image, make_photos

COLLECTION = "photos"
PHOTO_COUNT = 12
# Starlette's TestClient sends `Host: testserver`; test apps allow that name instead of weakening the Host check.
TEST_HOSTS = ("testserver",)

CHROMIUM = os.environ.get("CLIPSEARCH_CHROMIUM", "/usr/bin/chromium")  # Debian's, never a downloaded browser
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@dataclass(frozen=True)
class IndexedPhotos:
    """A collection built from `PHOTO_COUNT` generated photos, plus what the tests need to check answers."""

    index_dir: Path
    name: str
    photos: list[Path]
    ids_by_path: dict[str, int]
    bundle: Path

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        with Collection.open(self.name, self.index_dir) as collection:
            return collection.store.all_vectors(collection.require_model().embed_dim)

    def ranking(self, query_vector: np.ndarray, exclude: set[int] = frozenset()) -> list[int]:
        """Brute-force order of every image by cosine similarity to `query_vector` (best first)."""
        ids, vectors = self.vectors()
        scores = vectors @ (query_vector / np.linalg.norm(query_vector))
        order = np.argsort(-scores, kind="stable")
        return [int(ids[i]) for i in order if int(ids[i]) not in exclude]

    def text_ranking(self, text: str) -> list[int]:
        return self.ranking(ClipModel(self.bundle, threads=1).encode_text([text])[0])

    def stored_vector(self, image_id: int) -> np.ndarray:
        ids, vectors = self.vectors()
        return vectors[list(ids).index(image_id)]


def build_indexed_photos(root: Path, bundle: Path, count: int = PHOTO_COUNT) -> IndexedPhotos:
    """`count` small photos plus `big.jpg` (800x600, for thumbnail sizes)."""
    photos = make_photos(root / "photos", count)
    big = root / "photos" / "big.jpg"
    block_image(1000, size=(800, 600)).save(big, quality=90)
    photos.append(big)
    index_dir = root / "collections"
    with Collection.create(COLLECTION, index_dir) as collection:
        index_paths(collection, ClipModel(bundle, threads=1), [str(root / "photos")],
                    IndexOptions(batch_size=8, workers=0))
        ids = {path: state.id for path, state in collection.store.file_states().items()}
    return IndexedPhotos(index_dir=index_dir, name=COLLECTION, photos=photos, ids_by_path=ids, bundle=bundle)


def app_settings(indexed: IndexedPhotos, **overrides) -> ServerSettings:
    """Settings serving `indexed` to Starlette's TestClient (Host 'testserver' allowed)."""
    return ServerSettings(**{"allowed_hosts": TEST_HOSTS, "collection": indexed.name, "index_dir": indexed.index_dir,
                             **overrides})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """The app under uvicorn in a background thread on 127.0.0.1 and a free port."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def wait_until_healthy(url: str, process: subprocess.Popen, timeout: float = 90) -> None:
    """Poll `url`/healthz until a `clipsearch serve` subprocess answers; fail with its stderr if it exits."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        if process.poll() is not None:
            raise AssertionError(f"clipsearch serve exited: {process.communicate()[1]}")
        if time.monotonic() > deadline:
            raise AssertionError("clipsearch serve did not start")
        time.sleep(0.2)
