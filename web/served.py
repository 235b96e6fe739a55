"""`ServedSearcher`: a `Searcher` for a server's many threads.

- Reads go to a read-only SQLite connection of the calling thread (`ThreadReaders`), not to one shared
  connection behind the searcher's lock, so a slow read or a long write holds up nobody else.
- New query-cache entries go to a `TextCacheWriter` (its own thread and connection, batched), not into the
  request.
- The FAISS index is swapped, never rebuilt in a request: when the collection changed (an indexing run wrote
  to it, or a rebuild switched generations) a background thread loads or builds the new index aside while
  searches keep using the one they have, then replaces it with one assignment (`ServedIndex` is immutable; a
  search reads the reference once). Only the very first load of a collection's index happens in a request,
  when there is nothing to answer from yet (`clipsearch serve` loads the default collection's at start-up),
  and the first after a rebuild switched generations: the old index's ids are not the new rows' (a rebuild
  numbers its images above every old id), so it cannot answer beside them; the rebuild saved the new one.
  While an indexing run is still writing (the saved index behind SQLite) the index is rebuilt at most every
  `stale_refresh_seconds`; when the run saves its index, that one is loaded at the next search.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from clipsearch.search import STALE_REFRESH_SECONDS, Searcher
from clipsearch.store.collection import STORE_FILE, Collection
from clipsearch.store.database import Store, ThreadReaders
from clipsearch.store.index.vectors import VectorIndex

from .cache_writer import TextCacheWriter

log = logging.getLogger("clipsearch.web")
RECHECK_SECONDS = 0.5  # while waiting to rebuild a stale index: how often to look whether a run saved its own


@dataclass(frozen=True)
class ServedIndex:
    """The index searches use now: where it came from and which store generation it holds (None: an older
    saved index, SQLite is ahead of it)."""

    index: VectorIndex
    folder: Path
    generation: int | None
    loaded_at: float  # time.monotonic()


class ServedSearcher(Searcher):
    def __init__(self, collection: Collection, model=None, model_spec: str | None = None, *,
                 writer: TextCacheWriter | None = None, model_threads: int | None = None,
                 stale_refresh_seconds: float = STALE_REFRESH_SECONDS) -> None:
        super().__init__(collection, model=model, model_spec=model_spec)
        self.model_threads = model_threads
        self.stale_refresh_seconds = stale_refresh_seconds
        self._readers = ThreadReaders()
        self._writer = writer
        self._served: ServedIndex | None = None
        self._first_load = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._refreshing = False
        self._closed = threading.Event()
        self._swapped = threading.Condition()
        self.swaps = 0  # how many times a refreshed index replaced the one in use

    # -- reads and cache writes ---------------------------------------------------------------------
    @contextmanager
    def reading(self) -> Iterator[Store]:
        # After a rebuild's switch the old generation's folder is deleted: a thread's first read goes to the new one.
        self._follow_rebuild()
        yield self._readers.for_thread(self.collection.folder / STORE_FILE)

    def _remember_texts(self, model_id: str, vectors: dict[str, np.ndarray]) -> None:
        if self._writer is None:
            super()._remember_texts(model_id, vectors)
        else:
            self._writer.put(self.collection.folder / STORE_FILE, model_id, vectors)

    # -- the index --------------------------------------------------------------------------------
    @property
    def index(self) -> VectorIndex:
        served = self._served
        if served is None or served.folder != self.collection.folder:
            served = self._load_for_folder()
        elif self._behind(served):
            self.start_refresh()
        return served.index

    def _load_for_folder(self) -> ServedIndex:
        """The index of the generation reads now go to, loaded in this request: the first one, or the first after a
        rebuild switched generations (whose own saved index is loaded). An older generation's index never answers
        beside the new one's rows: its ids are not theirs, so its hits would all be dropped."""
        with self._first_load:
            served = self._served
            folder = self.collection.folder
            if served is None or served.folder != folder:
                collection = Collection(self.collection.root, self.collection.name, data=folder)
                try:
                    fresh = self._load(collection)
                finally:
                    collection.close()
                with self._swapped:
                    if served is not None:
                        self.swaps += 1
                        self._swapped.notify_all()
                    self._served = served = fresh
            return served

    @property
    def served(self) -> ServedIndex | None:
        return self._served

    def _behind(self, served: ServedIndex) -> bool:
        if served.folder != self.collection.folder:
            return True
        with self.reading() as store:
            return served.generation != store.generation

    def start_refresh(self) -> bool:
        """Start the background refresh unless one is running; True when this call started it."""
        with self._refresh_lock:
            if self._refreshing or self._closed.is_set():
                return False
            self._refreshing = True
        threading.Thread(target=self._refresh, name=f"clipsearch-refresh-{self.collection.name}", daemon=True).start()
        return True

    def wait_for_swap(self, after: int, timeout: float) -> bool:
        """Block until more than `after` swaps happened (tests, benchmarks); False on timeout."""
        with self._swapped:
            return self._swapped.wait_for(lambda: self.swaps > after, timeout=timeout)

    def _refresh(self) -> None:
        try:
            while not self._closed.is_set():
                folder = self.collection.folder
                collection = Collection(self.collection.root, self.collection.name, data=folder)
                try:
                    served = self._served
                    generation = collection.store.generation
                    if served is not None and served.folder == folder and served.generation == generation:
                        return  # up to date
                    due = (served is None or served.folder != folder or collection.vectors_fresh()
                           or time.monotonic() - served.loaded_at >= self.stale_refresh_seconds)
                    if not due:
                        wait = self.stale_refresh_seconds - (time.monotonic() - served.loaded_at)
                        self._closed.wait(min(max(wait, 0.01), RECHECK_SECONDS))
                        continue
                    fresh = self._load(collection)
                finally:
                    collection.close()
                with self._first_load, self._swapped:
                    if fresh.folder != self.collection.folder:
                        continue  # a rebuild switched generations while it loaded (a request loaded the new one)
                    self._served = fresh  # the swap: one reference assignment
                    self.swaps += 1
                    self._swapped.notify_all()
        except Exception:  # the old index keeps serving; the next search that sees the change tries again
            log.exception("refreshing the index of collection %r failed", self.collection.name)
        finally:
            with self._refresh_lock:
                self._refreshing = False

    def _load(self, collection: Collection) -> ServedIndex:
        generation = collection.store.generation
        index = self._build_index(collection)
        holds = generation if index.meta.generation >= generation else None
        return ServedIndex(index, collection.folder, holds, time.monotonic())

    def _build_index(self, collection: Collection) -> VectorIndex:
        """The saved index when it is fresh, else one built from SQLite (see Collection.load_vectors)."""
        return collection.load_vectors(mmap=True)

    def close(self) -> None:
        self._closed.set()
        self._readers.close()
        super().close()

