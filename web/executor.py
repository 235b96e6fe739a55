"""The bounded executor that runs a request's blocking work (FAISS, SQLite reads, image decoding and encoding,
thumbnails) off the event loop.

A fixed number of worker threads (`workers`), and at most `queue_limit` jobs waiting for one of them. A job
beyond that is refused at once with 503 and `Retry-After` (`ServerBusy`) instead of queueing without bound:
under overload, clients hear "come back later" in microseconds rather than timing out after a queue of
minutes. The event loop itself never waits for a worker, so routes that need none (/healthz) always answer.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from .errors import ApiError

T = TypeVar("T")
DEFAULT_QUEUE_LIMIT = 64
RETRY_AFTER_SECONDS = 1


def one_thread_per_call() -> None:
    """Worker thread set-up: FAISS searches of this thread use one OpenMP thread (an OpenMP setting is per
    thread, so nothing else changes). Concurrency comes from the workers themselves; a single-query search
    spread over every core spends most of its time in OpenMP barriers, and more so when other work competes
    for the cores (measured on 2 busy cores, 10k x 512 flat: 0.8 CPU ms per search instead of 10)."""
    try:
        import faiss
    except ImportError:  # pragma: no cover - faiss is a dependency
        return
    faiss.omp_set_num_threads(1)


def default_workers() -> int:
    """Two threads per core (at least 4): jobs hold the GIL only part of the time (SQLite, FAISS, decoding and
    file reads release it), and a job that waits on the disk must not leave a core idle."""
    return max(4, 2 * (os.cpu_count() or 1))


class ServerBusy(ApiError):
    """503: every worker is busy and the queue is full."""

    def __init__(self, limits: "ExecutorLimits") -> None:
        super().__init__(503, f"the server is busy ({limits.workers} workers busy, {limits.queue_limit} requests "
                              "waiting)", f"Retry after {RETRY_AFTER_SECONDS} s.",
                         headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


@dataclass(frozen=True)
class ExecutorLimits:
    workers: int
    queue_limit: int

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if self.queue_limit < 0:
            raise ValueError("queue_limit must not be negative")


@dataclass(frozen=True)
class ExecutorStats:
    workers: int
    queue_limit: int
    admitted: int  # running + waiting
    refused: int


class BoundedExecutor:
    """`await executor.run(fn, *args)`: fn in a worker thread, or ServerBusy when workers + queue are full.

    A job counts until it finishes, even when the request that awaited it went away (a cancelled await cannot
    stop a running thread): so the bound holds for the work actually in the threads."""

    def __init__(self, limits: ExecutorLimits, name: str = "clipsearch-worker",
                 initializer: Callable[[], None] | None = one_thread_per_call) -> None:
        self.limits = limits
        self._pool = ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix=name, initializer=initializer)
        self._lock = threading.Lock()
        self._admitted = 0
        self._refused = 0

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> "Future[T]":
        return self.admitted(lambda: self._pool.submit(functools.partial(fn, *args, **kwargs)))

    def admitted(self, start: Callable[[], "Future[T]"]) -> "Future[T]":
        """The future `start()` returns, counted as one job of blocking work until it is done (even when nobody
        awaits it any more); ServerBusy, without calling `start`, when workers + queue are full. `submit` starts
        its jobs in the pool; work that runs elsewhere under the same bound (searches in a batcher lane) too."""
        with self._lock:
            if self._admitted >= self.limits.workers + self.limits.queue_limit:
                self._refused += 1
                raise ServerBusy(self.limits)
            self._admitted += 1
        try:
            future = start()
        except BaseException:
            self._release(None)
            raise
        future.add_done_callback(self._release)
        return future

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def _release(self, _future: Future | None) -> None:
        with self._lock:
            self._admitted -= 1

    def stats(self) -> ExecutorStats:
        with self._lock:
            return ExecutorStats(self.limits.workers, self.limits.queue_limit, self._admitted, self._refused)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
