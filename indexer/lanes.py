"""Encoder lanes: the mapper's batches run in background threads while the reader keeps decoding.

With one lane the encoder runs one batch at a time beside the reader (the model's session may use several
intra-op threads). With N lanes, N batches run at once on one session, each call on its own thread; the
indexing CLI opens the visual session with one intra-op thread per call and one lane per core, so the
cores are shared by the encoder calls and the decoder processes without onnxruntime's thread pool
spinning at barriers while a decoder holds a core. `lanes=0` encodes in the calling thread (no threads).

Results come back as futures; the assembler writes them in submission order, so SQLite ids follow the walk
order exactly as with a serial encoder.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")


class EncoderLanes:
    """Runs encoder calls on `lanes` threads (0: inline) and adds up the wall and CPU time spent inside them."""

    def __init__(self, lanes: int = 1) -> None:
        self.lanes = max(0, lanes)
        self._pool = ThreadPoolExecutor(self.lanes, thread_name_prefix="clipsearch-encode") if self.lanes else None
        self._lock = threading.Lock()
        self.seconds = 0.0  # summed over lanes: time spent inside encoder calls
        # Summed over lanes: CPU time of the threads running the calls (one intra-op thread per call, as the CLI
        # runs them). Against the encoder's cost measured alone it shows what sharing the cores with the
        # decoder processes costs the encoder in a real run.
        self.cpu_seconds = 0.0

    def submit(self, call: Callable[[], T]) -> Future[T]:
        if self._pool is None:
            future: Future[T] = Future()
            try:
                future.set_result(self._timed(call))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever reads the future, as a pool would
                future.set_exception(exc)
            return future
        return self._pool.submit(self._timed, call)

    def _timed(self, call: Callable[[], T]) -> T:
        started, cpu_started = time.perf_counter(), time.thread_time()
        try:
            return call()
        finally:
            with self._lock:
                self.seconds += time.perf_counter() - started
                self.cpu_seconds += time.thread_time() - cpu_started

    def close(self) -> None:
        """Drop batches not yet started and wait for the running ones (an encoder call cannot be interrupted)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "EncoderLanes":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
