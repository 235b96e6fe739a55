"""Per-app state (lives on `app.state.web`): the settings and one loaded `Searcher` per collection."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from clipsearch.classify import LabelCache
from clipsearch.errors import ClipsearchError
from clipsearch.store.collection import Collection, list_collections
from clipsearch.search import Searcher
from clipsearch.store.database import ImageRecord

from .errors import ApiError
from .images import THUMBNAIL_DIR, ThumbnailCache
from .security import allowed_host_names
from .settings import ServerSettings


@dataclass(frozen=True)
class FoundImage:
    collection: str
    record: ImageRecord


class WebState:
    """Opens collections lazily (the default one at startup) and keeps them open for the app's life."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.allowed_hosts = allowed_host_names(settings.allowed_hosts)
        self.label_cache = LabelCache(settings.label_cache_size)
        self._searchers: dict[str, Searcher] = {}
        self._roots: dict[str, tuple[int, int, tuple[str, ...]]] = {}
        self._lock = threading.Lock()

    def collection_names(self) -> list[str]:
        """The default collection first, then every other collection under the same folder."""
        names = list_collections(self.settings.index_dir)
        return [self.settings.collection] + [n for n in names if n != self.settings.collection]

    def resolve_name(self, name: str | None) -> str:
        """The collection a request means: its `name`, or the default when empty; 400 when unknown."""
        if not name:
            return self.settings.collection
        if name == self.settings.collection or name in list_collections(self.settings.index_dir):
            return name
        known = ", ".join(self.collection_names())
        raise ApiError(400, f"unknown collection {name!r}", f"This server has: {known}.")

    def searcher(self, name: str | None = None) -> Searcher:
        resolved = self.resolve_name(name)
        with self._lock:
            searcher = self._searchers.get(resolved)
            if searcher is None:
                searcher = self._open(resolved)
                self._searchers[resolved] = searcher
            return searcher

    def _open(self, name: str) -> Searcher:
        collection = Collection.open(name, self.settings.index_dir)
        model = None
        if self.settings.model_threads:
            from clipsearch.model.resolve import load_model

            model = load_model(self.settings.model or collection.require_model().spec, threads=self.settings.model_threads)
        return Searcher(collection, model=model, model_spec=self.settings.model)

    def can_rerank(self, name: str | None = None) -> bool:
        """Whether the model that searches this collection has an ITM head (re-ranking is possible). Loads the
        model when it is not loaded yet; a model that cannot be loaded cannot re-rank."""
        searcher = self.searcher(name)
        try:
            return bool(getattr(searcher.model, "has_itm", False))
        except ClipsearchError:
            return False

    def image(self, image_id: int, collection: str | None = None) -> FoundImage:
        searcher = self.searcher(collection)
        record = searcher.records([image_id]).get(image_id)
        if record is None:
            raise ApiError(404, f"no image with id {image_id} in collection {searcher.collection.name!r}")
        return FoundImage(searcher.collection.name, record)

    def served_roots(self, name: str) -> tuple[str, ...]:
        """The folders a collection's files may resolve into when they are served: the indexed folders, derived
        from the stored paths (the store keeps no list of roots) as the topmost folders that directly hold an
        indexed file, each resolved (realpath) when first derived. Recomputed when the collection changes.
        Collections indexed since roots are recorded use the recorded real paths instead (see Store.record_roots)."""
        searcher = self.searcher(name)
        with searcher.lock:
            store = searcher.collection.store
            key = (store.generation, store.count())
            cached = self._roots.get(name)
            if cached is not None and cached[:2] == key:
                return cached[2]
            recorded = store.indexed_roots()
            if recorded:  # the real location each root had when it was indexed
                roots = tuple(sorted(set(recorded.values())))
                with self._lock:
                    self._roots[name] = (*key, roots)
                return roots
            folders = sorted({os.path.dirname(path) for path in store.file_states()})
        topmost: set[str] = set()
        for folder in folders:  # sorted, so ancestors come first
            parent, ancestor = folder, os.path.dirname(folder)
            while ancestor != parent and ancestor not in topmost:
                parent, ancestor = ancestor, os.path.dirname(ancestor)
            if ancestor not in topmost:
                topmost.add(folder)
        roots = tuple(sorted({os.path.realpath(folder) for folder in topmost}))
        with self._lock:
            self._roots[name] = (*key, roots)
        return roots

    def thumbnails(self, name: str) -> ThumbnailCache:
        folder = self.searcher(name).collection.folder / THUMBNAIL_DIR
        return ThumbnailCache(folder, self.settings.thumbnail_px, self.settings.max_image_pixels)

    def open_default(self) -> None:
        """Fail fast at startup when the default collection is missing or empty."""
        searcher = self.searcher(None)
        searcher.collection.require_model()

    def warm_up(self) -> None:
        """Load the model and index now instead of on the first query."""
        searcher = self.searcher(None)
        searcher.model.encode_text(["warm up"])
        _ = searcher.index

    def close(self) -> None:
        with self._lock:
            for searcher in self._searchers.values():
                searcher.close()
            self._searchers.clear()
