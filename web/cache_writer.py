"""Query-cache writes off the request path: one thread, its own connection per database, batched commits.

Requests hand freshly embedded texts to `put` and return at once; the writer thread gathers what arrives within
`linger` seconds into one transaction per database (best effort, like every query-cache write: a database that
an indexing run holds for longer than a quarter of a second just skips that batch). Readers are never behind
it: WAL lets them read while it writes, on their own connections.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipsearch.store.database import Store

log = logging.getLogger("clipsearch.web")
DEFAULT_LINGER_SECONDS = 0.05
MAX_PENDING = 10_000  # entries waiting; beyond that new ones are dropped (a cache, not a record)


@dataclass(frozen=True)
class CacheEntries:
    database: Path
    model_id: str
    vectors: dict[str, np.ndarray]


_STOP = object()
_FLUSH = "flush"


class TextCacheWriter:
    def __init__(self, linger_seconds: float = DEFAULT_LINGER_SECONDS) -> None:
        self.linger_seconds = linger_seconds
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stores: dict[Path, Store] = {}
        self._pending = 0
        self._lock = threading.Lock()
        self._closed = False
        self._written = 0
        self._thread: threading.Thread | None = None  # started by the first put

    def put(self, database: Path, model_id: str, vectors: dict[str, np.ndarray]) -> None:
        with self._lock:
            if self._closed or self._pending + len(vectors) > MAX_PENDING:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="clipsearch-cache-writer", daemon=True)
                self._thread.start()
            self._pending += len(vectors)
            self._queue.put(CacheEntries(Path(database), model_id, dict(vectors)))

    def flush(self) -> None:
        """Wait until everything put so far is written (tests; shutdown)."""
        done = threading.Event()
        with self._lock:
            if self._closed or self._thread is None:
                return
            self._queue.put((_FLUSH, done))
        done.wait(timeout=60)

    @property
    def written(self) -> int:
        return self._written

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            self._queue.put(_STOP)
        if thread is not None:
            thread.join(timeout=60)

    # -- the writer thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                item = self._queue.get()
                batch: list[CacheEntries] = []
                flushes: list[threading.Event] = []
                stopping = False
                deadline = time.monotonic() + self.linger_seconds
                while True:
                    if item is _STOP:
                        stopping = True
                    elif isinstance(item, tuple):
                        flushes.append(item[1])
                    else:
                        batch.append(item)
                    if stopping or flushes:
                        try:  # take what is queued already, without lingering
                            item = self._queue.get_nowait()
                            continue
                        except queue.Empty:
                            break
                    remaining = deadline - time.monotonic()
                    try:
                        item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                    except queue.Empty:
                        break
                self._write(batch)
                for event in flushes:
                    event.set()
                if stopping:
                    return
        finally:
            for store in self._stores.values():
                store.close()
            self._stores.clear()

    def _write(self, batch: list[CacheEntries]) -> None:
        grouped: dict[tuple[Path, str], dict[str, np.ndarray]] = {}
        for entries in batch:
            grouped.setdefault((entries.database, entries.model_id), {}).update(entries.vectors)
        for (database, model_id), vectors in grouped.items():
            try:
                store = self._stores.get(database)
                if store is None:
                    store = self._stores[database] = Store(database, create=False)
                store.cache_text_vectors(model_id, vectors, time.time())
                self._written += len(vectors)
            except Exception as exc:  # a cache: never take the server down
                log.warning("query cache write to %s skipped: %s", database, exc)
                stale = self._stores.pop(database, None)
                if stale is not None:
                    stale.close()
        with self._lock:
            self._pending -= sum(len(e.vectors) for e in batch)
