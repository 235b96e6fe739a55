"""Encoder lanes: the mapper's batches run in background threads while the reader keeps decoding.

With one lane the encoder runs one batch at a time beside the reader (the model's session may use several
intra-op threads). With N lanes, N batches run at once on one session, each call on its own thread; the
indexing CLI opens the visual session with one intra-op thread per call and one lane per core, so the
cores are shared by the encoder calls and the decoder processes without onnxruntime's thread pool
spinning at barriers while a decoder holds a core. `lanes=0` encodes in the calling thread (no threads).

With core tokens (indexer/cores.py) every call first takes a token, shared with the decoder processes, so that a
core never runs a decoder and an encoder call at once; the time spent waiting for it is not counted as encoding.

Results come back as futures; the assembler writes them in submission order, so SQLite ids follow the walk
order exactly as with a serial encoder.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

from .cores import CoreTokens

T = TypeVar("T")


class EncoderLanes:
    """Runs encoder calls on `lanes` threads (0: inline) and adds up the wall and CPU time spent inside them; with
    `core_tokens`, each call holds a core token while it runs."""

    def __init__(self, lanes: int = 1, core_tokens: CoreTokens | None = None) -> None:
        self.lanes = max(0, lanes)
        self.core_tokens = core_tokens
        self._pool = ThreadPoolExecutor(self.lanes, thread_name_prefix="clipsearch-encode") if self.lanes else None
        self._lock = threading.Lock()
        self.seconds = 0.0  # summed over lanes: time spent inside encoder calls
        # Summed over lanes: CPU time of the threads running the calls (one intra-op thread per call, as the CLI
        # runs them). Against the encoder's cost measured alone it shows what sharing the cores with the
        # decoder processes costs the encoder in a real run.
        self.cpu_seconds = 0.0

    def submit(self, call: Callable[[], T], hold_token: bool = True) -> Future[T]:
        """Run `call` on a lane; `hold_token=False`: without a core token (for work that is not encoding, such as
        opening the session while the decoders start: it would keep a decoder waiting)."""
        if self._pool is None:
            future: Future[T] = Future()
            try:
                future.set_result(self._timed(call, hold_token))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever reads the future, as a pool would
                future.set_exception(exc)
            return future
        return self._pool.submit(self._timed, call, hold_token)

    def _timed(self, call: Callable[[], T], hold_token: bool = True) -> T:
        taken = self.core_tokens.take() if self.core_tokens is not None and hold_token else False
        started, cpu_started = time.perf_counter(), time.thread_time()
        try:
            return call()
        finally:
            with self._lock:
                self.seconds += time.perf_counter() - started
                self.cpu_seconds += time.thread_time() - cpu_started
            if taken:
                self.core_tokens.give()

    def close(self) -> None:
        """Drop batches not yet started and wait for the running ones (an encoder call cannot be interrupted)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "EncoderLanes":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
