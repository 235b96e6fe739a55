"""Per-app state (lives on `app.state.web`): the settings, one loaded `ServedSearcher` per collection, and the
serving machinery they share: the bounded executor for blocking work, a text batcher per collection and the
query-cache writer. Async routes hand their blocking work to `run` and their query texts to `text_vectors`."""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

from clipsearch.classify import LabelCache
from clipsearch.errors import ClipsearchError
from clipsearch.store.collection import Collection, list_collections
from clipsearch.search import SearchHit, SearchQuery
from clipsearch.store.database import ImageRecord

from .batching import BatchPolicy, TextBatcher, default_lanes
from .cache_writer import TextCacheWriter
from .errors import ApiError
from .executor import BoundedExecutor, ExecutorLimits, default_workers, one_thread_per_call
from .images import THUMBNAIL_DIR, ThumbnailCache
from .security import allowed_host_names
from .served import ServedSearcher
from .settings import ServerSettings

T = TypeVar("T")
SERVING_MODEL_THREADS = 1  # onnxruntime intra-op threads per graph when serving (see settings.model_threads)


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
        self._searchers: dict[str, ServedSearcher] = {}
        self._batchers: dict[str, TextBatcher] = {}
        self._roots: dict[str, tuple[int, int, tuple[str, ...]]] = {}
        self._lock = threading.Lock()
        self.executor = BoundedExecutor(ExecutorLimits(settings.workers or default_workers(), settings.queue_limit))
        self.batch_policy = BatchPolicy(settings.max_batch, settings.batch_window_ms / 1000,
                                        settings.batch_lanes or default_lanes())
        self.cache_writer = TextCacheWriter()

    # -- serving -------------------------------------------------------------------------------------
    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` in the bounded executor (503 with Retry-After when it is full)."""
        return await self.executor.run(fn, *args, **kwargs)

    def batcher(self, searcher: ServedSearcher) -> TextBatcher:
        """The collection's text batcher: its thread embeds the texts of concurrent queries in one call."""
        name = searcher.collection.name
        batcher = self._batchers.get(name)
        if batcher is None:
            with self._lock:
                batcher = self._batchers.get(name)
                if batcher is None:
                    batcher = TextBatcher(searcher.text_vectors, self.batch_policy, name=f"clipsearch-batcher-{name}",
                                          search=searcher.search_many, thread_setup=one_thread_per_call)
                    self._batchers[name] = batcher
        return batcher

    async def text_vectors(self, searcher: ServedSearcher, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Embeddings of `texts` (from the query cache or batched with other requests' texts)."""
        return await self.batcher(searcher).vectors(texts) if texts else {}

    async def search(self, searcher: ServedSearcher, query: SearchQuery) -> list[SearchHit]:
        """`searcher.search(query)` with the query texts embedded by the batcher. A plain text query
        (`Searcher.batchable`) is searched in the batcher's lane with the rest of its batch, counted against the
        executor's bound like the executor's own jobs; any other query is searched in the executor."""
        query.validate()  # a bad text is this request's 400, never a batch's failure
        texts = [str(term.value) for term in query.terms if term.kind == "text"]
        if texts and searcher.batchable(query):
            batcher = self.batcher(searcher)
            return await asyncio.wrap_future(self.executor.admitted(lambda: batcher.submit(texts, query)))
        vectors = await self.text_vectors(searcher, texts)
        return await self.run(searcher.search, query, vectors)

    async def searcher_for(self, name: str | None = None) -> ServedSearcher:
        """`searcher(name)` without blocking the event loop (resolving another collection lists the folder)."""
        if not name or name == self.settings.collection:
            found = self._searchers.get(self.settings.collection)
            if found is not None:
                return found
        return await self.run(self.searcher, name)

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

    def searcher(self, name: str | None = None) -> ServedSearcher:
        resolved = self.resolve_name(name)
        with self._lock:
            searcher = self._searchers.get(resolved)
            if searcher is None:
                searcher = self._open(resolved)
                self._searchers[resolved] = searcher
            return searcher

    def _open(self, name: str) -> ServedSearcher:
        collection = Collection.open(name, self.settings.index_dir)
        searcher = ServedSearcher(collection, model_spec=self.settings.model, writer=self.cache_writer)
        searcher.model_threads = self.settings.model_threads or SERVING_MODEL_THREADS
        return searcher

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
            raise ApiError(404, f"no image with id {image_id} in collection {searcher.collection.name!r}",
                           "Ids are those of search results (their 'id'), in the collection searched; an image "
                           "whose file left the folder leaves the collection at its next indexing run.")
        return FoundImage(searcher.collection.name, record)

    def served_roots(self, name: str) -> tuple[str, ...]:
        """The folders a collection's files may resolve into when they are served: the indexed folders, derived
        from the stored paths (the store keeps no list of roots) as the topmost folders that directly hold an
        indexed file, each resolved (realpath) when first derived. Recomputed when the collection changes.
        Collections indexed since roots are recorded use the recorded real paths instead (see Store.record_roots)."""
        searcher = self.searcher(name)
        with searcher.reading() as store:
            key = (store.generation, store.count())
            cached = self._roots.get(name)
            if cached is not None and cached[:2] == key:
                return cached[2]
            recorded = store.served_roots()
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
            batchers, self._batchers = list(self._batchers.values()), {}
        for batcher in batchers:
            batcher.close()
        self.executor.close()
        self.cache_writer.close()
        with self._lock:
            for searcher in self._searchers.values():
                searcher.close()
            self._searchers.clear()
