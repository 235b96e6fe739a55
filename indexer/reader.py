"""The reader: hash + decode + resize image files in worker processes, with bounded look-ahead.

Each worker reads a file once, hashes its bytes (BLAKE2b-128, the content hash that recognises
renamed and copied files), and — unless the hash is already known to the collection — decodes it
(draft mode for large JPEGs, EXIF orientation, bomb guard: `clipsearch.preprocess.open_image`) and
resizes it to the model input. Pixels travel back as uint8 HWC (4x less IPC than float32); the
mapper normalises whole batches at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from clipsearch.bundle import PreprocessSpec
from clipsearch.errors import ClipsearchError, ImageError

# EXIF tags: Orientation, DateTime (IFD0); DateTimeOriginal, DateTimeDigitized (Exif IFD).
_ORIENTATION, _DATETIME, _EXIF_IFD, _DATETIME_ORIGINAL, _DATETIME_DIGITIZED = 274, 306, 0x8769, 36867, 36868
MAX_FILE_BYTES = 512 * 1024 * 1024
MAX_POOL_RESTARTS = 20


@dataclass(frozen=True)
class ReadTask:
    path: str
    size: int
    mtime_ns: int
    force_decode: bool = False  # decode even if the hash is known (the known vector went away)


@dataclass(frozen=True)
class ReadResult:
    """A read file: `pixels` (uint8 [H, W, 3] at model size) is None when its hash was already known,
    and `error` is set (everything else but the task empty) when the file could not be used."""

    task: ReadTask
    content_hash: str = ""
    width: int | None = None
    height: int | None = None
    taken_at: str | None = None
    pixels: np.ndarray | None = None
    error: str | None = None
    cpu_seconds: float = 0.0  # CPU time spent on this file in the worker (reported in the run summary)

    @property
    def known(self) -> bool:
        return self.error is None and self.pixels is None


# Per-worker-process configuration, set once by the pool initializer (each worker is its own process).
_WORKER_SPEC: PreprocessSpec | None = None
_WORKER_KNOWN: frozenset[str] = frozenset()


def _init_worker(spec: PreprocessSpec, known_hashes: frozenset[str], nice: int) -> None:
    global _WORKER_SPEC, _WORKER_KNOWN  # noqa: PLW0603 - process-local worker state set once at start
    _WORKER_SPEC, _WORKER_KNOWN = spec, known_hashes
    if nice and hasattr(os, "nice"):
        try:
            os.nice(nice)
        except OSError:
            pass


def _read_chunk(tasks: Sequence[ReadTask]) -> list[ReadResult]:
    assert _WORKER_SPEC is not None
    results = []
    for task in tasks:
        started = time.process_time()
        result = read_one(task, _WORKER_SPEC, _WORKER_KNOWN)
        results.append(dataclasses.replace(result, cpu_seconds=time.process_time() - started))
    return results


def read_one(task: ReadTask, spec: PreprocessSpec, known_hashes: frozenset[str] | set[str] = frozenset()) -> ReadResult:
    """Hash and (unless known) decode one file; never raises for a bad file, returns `error` instead."""
    from clipsearch.preprocess import open_image, resize_for_model

    try:
        if task.size > MAX_FILE_BYTES:
            return ReadResult(task, error=f"file too large ({task.size:,} bytes)")
        with open(task.path, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except PermissionError:
        return ReadResult(task, error="permission denied")
    except FileNotFoundError:
        return ReadResult(task, error="file disappeared while indexing")
    except IsADirectoryError:
        return ReadResult(task, error="is a directory")
    except OSError as exc:
        return ReadResult(task, error=f"cannot read: {exc.strerror or exc}")
    if not data:
        return ReadResult(task, error="empty file")
    content_hash = hashlib.blake2b(data, digest_size=16).hexdigest()
    if content_hash in known_hashes and not task.force_decode:
        return ReadResult(task, content_hash=content_hash)
    try:
        width, height, taken_at = _header_facts(data)
        image = open_image(data, draft_size=(spec.size[1], spec.size[0]))
        resized = resize_for_model(image, spec)
        pixels = np.asarray(resized, dtype=np.uint8)
        if width is None:
            width, height = image.size
    except ImageError as exc:
        return ReadResult(task, content_hash=content_hash, error=_reason(exc.message))
    except MemoryError:
        return ReadResult(task, content_hash=content_hash, error="out of memory while decoding")
    except Exception as exc:  # a decoder plugin bug must not stop the whole run
        return ReadResult(task, content_hash=content_hash, error=f"cannot decode: {type(exc).__name__}: {exc}")
    return ReadResult(task, content_hash=content_hash, width=width, height=height, taken_at=taken_at, pixels=pixels)




def _reason(message: str) -> str:
    """open_image prefixes its messages with the source name; bytes sources are called <upload>."""
    prefix = "<upload>: "
    return message[len(prefix):] if message.startswith(prefix) else message


def _header_facts(data: bytes) -> tuple[int | None, int | None, str | None]:
    """Displayed width/height (after EXIF orientation) and the EXIF capture time, from the header only."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            exif = image.getexif()
            if exif.get(_ORIENTATION) in (5, 6, 7, 8):
                width, height = height, width
            taken = exif.get_ifd(_EXIF_IFD).get(_DATETIME_ORIGINAL) or exif.get_ifd(_EXIF_IFD).get(
                _DATETIME_DIGITIZED) or exif.get(_DATETIME)
            return width, height, _exif_time(taken)
    except Exception:  # the decoder proper reports what is wrong with the file
        return None, None, None


def _exif_time(value: object) -> str | None:
    """'2023:07:14 18:02:11' -> '2023-07-14T18:02:11' (None when absent or malformed)."""
    if not isinstance(value, str):
        return None
    text = value.strip().strip("\x00")
    if len(text) < 19 or text[4] != ":" or text[7] != ":":
        return None
    iso = f"{text[0:4]}-{text[5:7]}-{text[8:10]}T{text[11:19]}"
    return None if iso.startswith("0000") else iso


class ParallelReader:
    """Decode files in `workers` processes (0 = in this process), yielding results as they complete.

    At most `window` chunks are in flight, so memory stays bounded however large the folder is.
    """

    def __init__(self, spec: PreprocessSpec, known_hashes: Iterable[str] = (), workers: int | None = None,
                 chunk_size: int = 4, window: int = 16, nice: int = 0) -> None:
        self.spec = spec
        self.known_hashes = frozenset(known_hashes)
        self.workers = (os.cpu_count() or 1) if workers is None else max(0, workers)
        self.chunk_size = max(1, chunk_size)
        self.window = max(self.workers * 2, window)
        self.nice = nice
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> "ParallelReader":
        if self.workers > 0:
            self._pool = self._new_pool()
        return self

    def _new_pool(self) -> ProcessPoolExecutor:
        method = "forkserver" if sys.platform.startswith("linux") else "spawn"
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(method),
                                   initializer=_init_worker, initargs=(self.spec, self.known_hashes, self.nice))

    def __exit__(self, *exc_info: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def read(self, tasks: Iterable[ReadTask]) -> Iterator[ReadResult]:
        if self._pool is None:
            for task in tasks:
                yield read_one(task, self.spec, self.known_hashes)
            return
        pending: dict[Future, list[ReadTask]] = {}
        suspects: list[list[ReadTask]] = []  # chunks in flight when a worker died: retried one file at a time
        chunks = _chunked(tasks, self.chunk_size)
        exhausted = False
        restarts = 0
        while True:
            while len(pending) < self.window:
                chunk = suspects.pop() if suspects else (None if exhausted else next(chunks, None))
                if chunk is None:
                    exhausted = True
                    break
                pending[self._pool.submit(_read_chunk, chunk)] = chunk
            if not pending:
                return
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            broken = False
            for future in done:
                chunk = pending.pop(future)
                try:
                    results = future.result()
                except BrokenProcessPool:
                    broken = True
                    if len(chunk) == 1:  # this very file kills the decoder (a crash in a native plugin)
                        yield ReadResult(chunk[0], error="the image decoder crashed on this file")
                    else:
                        suspects.extend([task] for task in chunk)
                    continue
                yield from results
            if broken:
                # Every chunk still in flight died with the pool: retry them file by file in a new pool.
                for future, chunk in pending.items():
                    suspects.extend([task] for task in chunk)
                pending.clear()
                restarts += 1
                if restarts > MAX_POOL_RESTARTS:
                    raise ClipsearchError(f"image decoder processes crashed {restarts} times; giving up")
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()


def _chunked(tasks: Iterable[ReadTask], size: int) -> Iterator[list[ReadTask]]:
    chunk: list[ReadTask] = []
    for task in tasks:
        chunk.append(task)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
