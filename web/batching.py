"""Dynamic batching of text queries: the texts of concurrent requests are embedded in one encoder call.

Requests put their texts on a queue and get a future; one batcher thread takes the first waiting request,
gathers whatever else arrives within `window` seconds (at most `max_batch` distinct texts), embeds them all in
one call and completes every future with its own texts' vectors. While that call runs, new requests queue up,
so under load a batch fills without waiting; a lone request waits at most `window`. This is what serving
systems call dynamic batching (a queue, one batcher, a future per request).

A request may also bring its search (`search`, for the queries `Searcher.batchable` accepts): after the encoder
call the lane runs the batch's searches together (`Searcher.search_many`: one FAISS call and one SQLite read for
the batch), so such a request needs no executor thread at all and the index is scanned once per batch rather
than once per query.

`lanes` batcher threads share the queue (one per core by default): while one lane's encoder call runs, the next
lane gathers the requests that arrive meanwhile and encodes them on the other core. An onnxruntime session runs
calls from several threads at once, and the serving graphs use one intra-op thread each, so the lanes are how
the encoder uses more than one core without intra-op threads spinning against the request threads.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from clipsearch.errors import ClipsearchError

DEFAULT_MAX_BATCH = 8  # 8 rather than 16: about the same QPS, a narrower latency spread (benchmarks/serve_load.py)
DEFAULT_WINDOW_SECONDS = 0.002

Embed = Callable[[list[str]], dict[str, np.ndarray]]
# (queries, text -> vector) -> per query: its hits, or the exception its search raised (Searcher.search_many)
SearchMany = Callable[[list[Any], Mapping[str, np.ndarray]], list[Any]]


def default_lanes() -> int:
    """One lane per core, and at least two: a lane held by one slow search leaves another to answer the rest."""
    return max(2, os.cpu_count() or 1)


@dataclass(frozen=True)
class BatchPolicy:
    max_batch: int = DEFAULT_MAX_BATCH
    window_seconds: float = DEFAULT_WINDOW_SECONDS
    lanes: int = field(default_factory=default_lanes)  # batcher threads (concurrent encoder calls)

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if self.lanes < 1:
            raise ValueError("lanes must be at least 1")
        if not 0 <= self.window_seconds <= 1:
            raise ValueError("the batch window must be between 0 and 1 s")


@dataclass
class _Pending:
    texts: tuple[str, ...]
    query: Any = None  # a SearchQuery to search once its texts are embedded (the future then gets its hits)
    future: Future = field(default_factory=Future)


@dataclass(frozen=True)
class BatcherStats:
    requests: int
    calls: int  # encoder calls (one per batch)
    largest_batch: int  # distinct texts in the largest call
    search_calls: int = 0  # search_many calls (one per batch that brought searches)
    largest_search: int = 0  # searches in the largest of them


class BatcherClosed(ClipsearchError):
    """The server is shutting down."""


_STOP = object()


class TextBatcher:
    """Embeds the texts of concurrent requests together through `embed` (texts -> text: vector), which runs
    only in this batcher's thread. `submit` works from any thread; `vectors` is the awaitable form."""

    def __init__(self, embed: Embed, policy: BatchPolicy = BatchPolicy(), name: str = "clipsearch-batcher",
                 search: SearchMany | None = None, thread_setup: Callable[[], None] | None = None) -> None:
        self._embed = embed
        self._search = search
        self._thread_setup = thread_setup  # run first in each lane thread (e.g. one OpenMP thread for FAISS)
        self.policy = policy
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._requests = self._calls = self._largest = 0
        self._search_calls = self._largest_search = 0
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{lane}", daemon=True)
                         for lane in range(policy.lanes)]
        for thread in self._threads:
            thread.start()

    def submit(self, texts: Sequence[str], query: Any = None) -> "Future[Any]":
        """A future of the texts' vectors (text -> vector); with `query` (a batcher made with `search`), of the
        query's hits, searched in the lane once `texts` (the query's texts) are embedded."""
        if query is not None and self._search is None:
            raise ValueError("this batcher was made without a search function")
        pending = _Pending(tuple(texts), query)
        with self._lock:
            if self._closed:
                raise BatcherClosed("the server is shutting down")
            self._requests += 1
            self._queue.put(pending)
        return pending.future

    async def vectors(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        return await asyncio.wrap_future(self.submit(texts))

    def waiting(self) -> int:
        """Requests queued and not yet taken into a batch."""
        return self._queue.qsize()

    def stats(self) -> BatcherStats:
        with self._lock:
            return BatcherStats(self._requests, self._calls, self._largest, self._search_calls, self._largest_search)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for _ in self._threads:
                self._queue.put(_STOP)  # one for each lane
        for thread in self._threads:
            thread.join(timeout=30)

    # -- the batcher thread ----------------------------------------------------------------------
    def _run(self) -> None:
        if self._thread_setup is not None:
            self._thread_setup()
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stopping = self._gather(first)
            self._answer(batch)
            if stopping:
                return

    def _gather(self, first: _Pending) -> tuple[list[_Pending], bool]:
        """`first` plus what arrives within the window, up to max_batch distinct texts (a request is never split)."""
        batch = [first]
        distinct = set(first.texts)
        deadline = time.monotonic() + self.policy.window_seconds
        while len(distinct) < self.policy.max_batch:
            try:
                remaining = deadline - time.monotonic()
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
            distinct.update(item.texts)
        return batch, False

    def _answer(self, batch: list[_Pending]) -> None:
        live = [p for p in batch if p.future.set_running_or_notify_cancel()]  # requests that went away: skipped
        if not live:
            return
        texts = list(dict.fromkeys(text for pending in live for text in pending.texts))
        try:
            vectors = self._call(texts)
        except Exception as exc:
            if len(live) == 1:  # the request hears it (a ClipsearchError keeps its HTTP status)
                live[0].future.set_exception(exc)
                return
            # One request's texts must not fail the others: embed each on its own.
            vectors, answered = {}, []
            for pending in live:
                try:
                    vectors.update(self._call(list(dict.fromkeys(pending.texts))))
                    answered.append(pending)
                except Exception as own:
                    pending.future.set_exception(own)
            live = answered
        searches = [p for p in live if p.query is not None]
        for pending in live:
            if pending.query is None:
                # A text `embed` left out (its model knows none of its words) is left out here too: the
                # request's own query_vector says why.
                pending.future.set_result({text: vectors[text] for text in pending.texts if text in vectors})
        if searches:
            self._answer_searches(searches, vectors)

    def _answer_searches(self, searches: list[_Pending], vectors: Mapping[str, np.ndarray]) -> None:
        with self._lock:
            self._search_calls += 1
            self._largest_search = max(self._largest_search, len(searches))
        try:
            answers = self._search([p.query for p in searches], vectors)
        except Exception as exc:  # a failure of the whole call: every search of the batch hears it
            for pending in searches:
                pending.future.set_exception(exc)
            return
        for pending, answer in zip(searches, answers):
            if isinstance(answer, Exception):
                pending.future.set_exception(answer)
            else:
                pending.future.set_result(answer)

    def _call(self, texts: list[str]) -> dict[str, np.ndarray]:
        with self._lock:
            self._calls += 1
            self._largest = max(self._largest, len(texts))
        return self._embed(texts)
