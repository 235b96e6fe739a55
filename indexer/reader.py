"""The reader: hash + decode + resize image files in worker processes, with bounded look-ahead.

Each worker reads a file once, hashes its bytes (BLAKE2b-128, the content hash that recognises
renamed and copied files), and — unless the hash is already known to the collection — decodes it
(draft mode for large JPEGs, EXIF orientation, pixel limit: `clipsearch.model.preprocess.open_image`) and
resizes it to the model input. Only regular files are ever opened. Pixels travel back as uint8 HWC
(4x less IPC than float32) in raw bytes, so a worker imports Pillow but not numpy and starts in about half
the time; the mapper normalises whole batches at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Iterable, Iterator

from clipsearch.model.bundle import PreprocessSpec
from clipsearch.errors import ClipsearchError, ImageError
from clipsearch.model.preprocess import MAX_IMAGE_FILE_BYTES

from .cores import CoreTokens

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

# EXIF tags: Orientation, DateTime (IFD0); DateTimeOriginal, DateTimeDigitized (Exif IFD).
_ORIENTATION, _DATETIME, _EXIF_IFD, _DATETIME_ORIGINAL, _DATETIME_DIGITIZED = 274, 306, 0x8769, 36867, 36868


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


def read_one(task: ReadTask, spec: PreprocessSpec, known_hashes: frozenset[str] | set[str] = frozenset()) -> ReadResult:
    """Hash and (unless known) decode one file; never raises for a bad file, returns `error` instead."""
    import numpy as np

    result, resized = _read_image(task, spec, known_hashes)
    if resized is None:
        return result
    return dataclasses.replace(result, pixels=np.asarray(resized, dtype=np.uint8))


def _read_image(task: ReadTask, spec: PreprocessSpec,
                known_hashes: frozenset[str] | set[str]) -> tuple[ReadResult, "Image.Image | None"]:
    """`read_one` without numpy: the result (its `pixels` None) and the RGB image at model size, when decoded."""
    from clipsearch.model.preprocess import open_image, open_regular_file, read_at_most, resize_for_model

    if task.size > MAX_IMAGE_FILE_BYTES:
        return ReadResult(task, error=f"file too large ({task.size:,} bytes)"), None
    try:
        # Never opens a FIFO, socket or device (one swapped in since the walk is caught by fstat).
        with open_regular_file(task.path) as handle:
            data = read_at_most(handle, MAX_IMAGE_FILE_BYTES)
    except ImageError as exc:
        reason = exc.message[len(task.path) + 2:] if exc.message.startswith(task.path + ": ") else exc.message
        return ReadResult(task, error="file disappeared while indexing" if reason == "no such file" else reason), None
    except OSError as exc:
        return ReadResult(task, error=f"cannot read: {exc.strerror or exc}"), None
    if len(data) > MAX_IMAGE_FILE_BYTES:
        return ReadResult(task, error=f"file too large (more than {MAX_IMAGE_FILE_BYTES:,} bytes)"), None
    if not data:
        return ReadResult(task, error="empty file"), None
    content_hash = hashlib.blake2b(data, digest_size=16).hexdigest()
    if content_hash in known_hashes and not task.force_decode:
        return ReadResult(task, content_hash=content_hash), None
    try:
        width, height, taken_at = _header_facts(data)
        image = open_image(data, draft_size=(spec.size[1], spec.size[0]))
        resized = resize_for_model(image, spec)
        if resized.mode != "RGB":  # open_image gives RGB; the batches (and a worker's raw bytes) need 3 bytes/pixel
            resized = resized.convert("RGB")
        resized.load()
        if width is None:
            width, height = image.size
    except ImageError as exc:
        return ReadResult(task, content_hash=content_hash, error=_reason(exc.message)), None
    except MemoryError:
        return ReadResult(task, content_hash=content_hash, error="out of memory while decoding"), None
    except Exception as exc:  # a decoder plugin bug must not stop the whole run
        return ReadResult(task, content_hash=content_hash, error=f"cannot decode: {type(exc).__name__}: {exc}"), None
    return ReadResult(task, content_hash=content_hash, width=width, height=height, taken_at=taken_at), resized


def _reason(message: str) -> str:
    """open_image prefixes its messages with the source name; bytes sources are called <upload>."""
    prefix = "<upload>: "
    return message[len(prefix):] if message.startswith(prefix) else message


def _header_facts(data: bytes) -> tuple[int | None, int | None, str | None]:
    """Displayed width/height (after EXIF orientation) and the EXIF capture time, from the header only."""
    from PIL import Image

    from clipsearch.model.preprocess import pixel_limit

    try:
        with pixel_limit(), Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            exif = image.getexif()
            if exif.get(_ORIENTATION) in (5, 6, 7, 8):
                width, height = height, width
            ifd = exif.get_ifd(_EXIF_IFD)
            taken = (_exif_time(ifd.get(_DATETIME_ORIGINAL)) or _exif_time(ifd.get(_DATETIME_DIGITIZED))
                     or _exif_time(exif.get(_DATETIME)))
            return width, height, taken
    except Exception:  # the decoder proper reports what is wrong with the file
        return None, None, None


def _exif_time(value: object) -> str | None:
    """'2023:07:14 18:02:11' -> '2023-07-14T18:02:11'; None when absent or not a real time ('2024:13:45 99:00:00',
    a camera's unset '0000:00:00 00:00:00' or '2024:00:00 00:00:00'): the date filters then use the file's mtime."""
    from datetime import datetime

    if not isinstance(value, str):
        return None
    text = value.strip().strip("\x00")
    if len(text) < 19 or text[4] != ":" or text[7] != ":" or text[10] not in " T":
        return None
    iso = f"{text[0:4]}-{text[5:7]}-{text[8:10]}T{text[11:19]}"
    try:
        datetime.fromisoformat(iso)
    except ValueError:
        return None
    return None if iso.startswith("0000") else iso


# ---------------------------------------------------------------------------------------------------
# Decoder worker processes.
#
# Each worker is a plain `python -c` child started with subprocess (no multiprocessing: no forkserver,
# no resource tracker, no executor manager thread). It talks over two private pipes: tasks in (chunks of
# ReadTask), one message per file out, in order. So the parent always knows which file a worker was
# decoding when it died, and notices the death at once (EOF on the result pipe), never waiting on a
# broken pool. Workers die with the parent: PR_SET_PDEATHSIG on Linux, plus EOF on the task pipe
# everywhere. Their stdin/stdout are /dev/null and stderr a private temporary file, so no worker ever
# holds the parent's stdout/stderr open.
# ---------------------------------------------------------------------------------------------------

_WORKER_BOOT = "from clipsearch.indexer.reader import _worker_main; _worker_main()"
FILE_TIMEOUT = 300.0  # seconds one file may take in a worker before the worker is killed and replaced
WORKER_START_TIMEOUT = 120.0
CRASHES_PER_FILE = 2  # a file is reported as crashing the decoder after killing a worker this many times
MAX_START_FAILURES = 3
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent exits (Linux), then make sure the parent
    did not already exit before the request was made."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl: EOF on the task pipe still ends the worker
            pass
    if os.getppid() != parent_pid:
        os._exit(0)


def _worker_main() -> None:
    """Entry point of a decoder worker: `python -c _WORKER_BOOT TASK_FD RESULT_FD PARENT_PID TOKEN_R TOKEN_W` (the
    core tokens' pipe, -1 -1 without: indexer/cores.py)."""
    from multiprocessing.connection import Connection

    task_fd, result_fd, parent_pid, token_r, token_w = (int(v) for v in sys.argv[1:6])
    _die_with_parent(parent_pid)
    core_tokens = CoreTokens.attach(token_r, token_w) if token_r >= 0 else None
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    tasks = Connection(task_fd, writable=False)
    results = Connection(result_fd, readable=False)
    try:
        spec, known, nice = tasks.recv()
        if nice and hasattr(os, "nice"):
            try:
                os.nice(nice)
            except OSError:
                pass
        results.send(("ready", os.getpid()))
        while True:
            chunk = tasks.recv()
            if chunk is None:
                return
            for task in chunk:
                # A core token is held while the file is read and decoded, and given back before the result is
                # sent: a send blocks until the parent reads, and the parent may be waiting for an encoder call
                # that needs this very token.
                taken = core_tokens.take() if core_tokens is not None else False
                try:
                    started = time.process_time()
                    result, resized = _read_image(task, spec, known)
                    result = dataclasses.replace(result, cpu_seconds=time.process_time() - started)
                    decoded = _Decoded.wrap(result, resized)
                finally:
                    if taken:
                        core_tokens.give()
                results.send(decoded)
    except (EOFError, OSError):  # the parent went away (or closed our pipes): nothing left to do
        return


@dataclass(frozen=True)
class _Decoded:
    """A worker's answer for one file: its result, and the decoded RGB pixels as raw bytes (no numpy in workers)."""

    result: ReadResult
    raw: bytes | None = None
    width: int = 0
    height: int = 0

    @staticmethod
    def wrap(result: ReadResult, resized: "Image.Image | None") -> "_Decoded":
        if resized is None:
            return _Decoded(result)
        return _Decoded(result, resized.tobytes(), *resized.size)

    def unwrap(self) -> ReadResult:
        if self.raw is None:
            return self.result
        import numpy as np

        pixels = np.frombuffer(self.raw, dtype=np.uint8).reshape(self.height, self.width, 3)
        return dataclasses.replace(self.result, pixels=pixels)


class _Worker:
    def __init__(self, process: subprocess.Popen, tasks, results) -> None:
        self.process = process
        self.tasks = tasks  # Connection, parent -> worker
        self.results = results  # Connection, worker -> parent
        self.inflight: deque[deque[ReadTask]] = deque()  # chunks sent, files not yet answered, in order
        self.ready = False
        self.deadline = time.monotonic() + WORKER_START_TIMEOUT

    @property
    def pending(self) -> list[ReadTask]:
        return [task for chunk in self.inflight for task in chunk]

    def kill(self) -> None:
        for connection in (self.tasks, self.results):
            try:
                connection.close()
            except OSError:
                pass
        if self.process.poll() is None:
            try:
                self.process.kill()
            except OSError:
                pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process SIGKILL could not end
            pass


class ParallelReader:
    """Decode files in `workers` processes (0 = in this process), yielding results as they complete.

    At most `window` chunks of `chunk_size` files are in flight (at most two per worker), so memory stays
    bounded however large the folder is. A worker that dies (a native decoder crash, the OOM killer) or
    spends more than `file_timeout` seconds on one file is replaced; the file it was decoding is tried
    again in a fresh worker and, if it kills that one too, reported as skipped; every other file is read.
    Workers die with this process (on Linux, with the thread that started them: use a reader from the
    thread that entered it).
    """

    def __init__(self, spec: PreprocessSpec, known_hashes: Iterable[str] = (), workers: int | None = None,
                 chunk_size: int = 4, window: int = 16, nice: int = 0, file_timeout: float = FILE_TIMEOUT,
                 started: "StartedDecoders | None" = None, core_tokens: CoreTokens | None = None) -> None:
        self.spec = spec
        self.known_hashes = frozenset(known_hashes)
        self.workers = worker_count(workers)
        self._started = started  # processes started ahead of this reader: adopted by the first _ensure_workers
        # Core tokens the workers it starts take per file (indexer/cores.py); adopted processes keep those they were
        # started with, which the runner passes here (LocalRunner._core_tokens).
        self.core_tokens = core_tokens
        self.chunk_size = max(1, chunk_size)
        self.window = max(self.workers, window)
        self.depth = max(1, min(2, self.window // max(1, self.workers)))  # chunks in flight per worker
        self.nice = nice
        self.file_timeout = file_timeout
        self.restarts = 0  # workers replaced after a crash or a timeout
        self._workers: list[_Worker] = []
        self._stderr = None  # the workers' shared stderr: a temporary file, read when a worker fails to start
        self._start_failures = 0

    def __enter__(self) -> "ParallelReader":
        self._ensure_workers()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def close(self) -> None:
        """Stop every worker: idle ones are asked to exit (EOF), busy or stuck ones are killed."""
        workers, self._workers = self._workers, []
        for worker in workers:
            if not worker.inflight:
                try:
                    worker.tasks.send(None)
                except OSError:
                    pass
        deadline = time.monotonic() + 1.0
        for worker in workers:
            if not worker.inflight:
                try:
                    worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            worker.kill()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def _ensure_workers(self) -> None:
        if self.workers == 0:
            return
        fresh: list[_Worker] = []
        if self._started is not None:
            started, self._started = self._started, None
            # The first call: no stderr file of our own yet, so the started processes' one becomes ours.
            adopted, self._stderr = started.hand_over(self.workers)
            for worker in adopted:  # its start-up time counts from now (a long walk may have come between)
                worker.deadline = time.monotonic() + WORKER_START_TIMEOUT
            fresh.extend(adopted)
        if self._stderr is None:
            self._stderr = tempfile.TemporaryFile(prefix="clipsearch-decoder-")
        fresh.extend(_spawn_worker(self._stderr, self.core_tokens)
                     for _ in range(self.workers - len(self._workers) - len(fresh)))
        self._workers.extend(fresh)
        for worker in fresh:  # sent after all were started, so they import their modules in parallel
            try:
                worker.tasks.send((self.spec, self.known_hashes, self.nice))
            except OSError:  # it died already: noticed (and counted) by the read loop
                pass

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        try:
            self._stderr.seek(0, os.SEEK_END)
            size = self._stderr.tell()
            self._stderr.seek(max(0, size - 2000))
            return self._stderr.read().decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def read(self, tasks: Iterable[ReadTask]) -> Iterator[ReadResult]:
        if self.workers == 0:
            for task in tasks:
                yield read_one(task, self.spec, self.known_hashes)
            return
        self._ensure_workers()
        source = iter(tasks)
        retry: deque[ReadTask] = deque()  # files a dead worker had not answered: sent again first
        crashes: dict[str, int] = {}
        exhausted = False
        try:
            while True:
                # 1. Keep every ready worker supplied with up to `depth` chunks.
                for worker in list(self._workers):
                    while worker.ready and len(worker.inflight) < self.depth:
                        chunk = [retry.popleft() for _ in range(min(self.chunk_size, len(retry)))]
                        while not exhausted and len(chunk) < self.chunk_size:
                            task = next(source, None)
                            if task is None:
                                exhausted = True
                            else:
                                chunk.append(task)
                        if not chunk:
                            break
                        try:
                            worker.tasks.send(chunk)
                        except OSError:  # died while idle: put the chunk back, the loop below replaces it
                            retry.extendleft(reversed(chunk))
                            break
                        if not worker.inflight:
                            worker.deadline = time.monotonic() + self.file_timeout
                        worker.inflight.append(deque(chunk))
                if exhausted and not retry and not any(w.inflight for w in self._workers):
                    return
                # 2. Wait for a result, a death (EOF) or the next deadline.
                now = time.monotonic()
                timed = [w.deadline for w in self._workers if w.inflight or not w.ready]
                timeout = max(0.0, min(timed) - now) if timed else None
                by_connection = {w.results: w for w in self._workers}
                for connection in _wait(list(by_connection), timeout):
                    worker = by_connection[connection]
                    if worker not in self._workers:
                        continue
                    while True:  # drain what is already there, so a death is noticed after its last result
                        try:
                            message = connection.recv()
                        except (EOFError, OSError):
                            yield from self._replace(worker, retry, crashes, "the image decoder crashed on this file")
                            break
                        if isinstance(message, tuple):  # ("ready", pid)
                            worker.ready = True
                            self._start_failures = 0
                        else:
                            head = worker.inflight[0]
                            head.popleft()
                            if not head:
                                worker.inflight.popleft()
                            worker.deadline = time.monotonic() + self.file_timeout
                            yield message.unwrap()
                        if not connection.poll():
                            break
                # 3. A worker stuck on one file (or never started) is killed and replaced.
                now = time.monotonic()
                for worker in list(self._workers):
                    if (worker.inflight or not worker.ready) and now > worker.deadline:
                        reason = f"the image decoder did not finish this file in {self.file_timeout:g} s"
                        yield from self._replace(worker, retry, crashes, reason)
        finally:
            # An abandoned or interrupted read: workers still busy with its files are stopped, so a later
            # read never receives stale results; idle ones stay.
            for worker in [w for w in self._workers if w.inflight]:
                self._workers.remove(worker)
                worker.kill()

    def _replace(self, worker: _Worker, retry: deque[ReadTask], crashes: dict[str, int],
                 reason: str) -> Iterator[ReadResult]:
        """`worker` died or timed out: replace it; its current file gets the blame, the rest go back."""
        pending = worker.pending
        started = worker.ready
        self._workers.remove(worker)
        worker.kill()
        if not started:
            self._start_failures += 1
            if self._start_failures >= MAX_START_FAILURES:
                detail = self._stderr_tail()
                raise ClipsearchError("image decoder processes fail to start" + (f":\n{detail}" if detail else ""))
            retry.extendleft(reversed(pending))
        else:
            self.restarts += 1
            if pending:
                if self.core_tokens is not None:
                    # It may have died holding a core token (in the middle of a file): put one back. Had it died
                    # between files, the run has one token more than cores, which only lets a core be shared again.
                    self.core_tokens.give()
                culprit, rest = pending[0], pending[1:]
                retry.extendleft(reversed(rest))
                crashes[culprit.path] = crashes.get(culprit.path, 0) + 1
                if crashes[culprit.path] >= CRASHES_PER_FILE:
                    yield ReadResult(culprit, error=reason)
                else:
                    retry.appendleft(culprit)
        self._ensure_workers()


class StartedDecoders:
    """Decoder processes started ahead of a run, so that their interpreters boot while the caller is still
    importing, walking and planning; the run's `ParallelReader(started=...)` adopts them (they learn the
    preprocessing and the known hashes only then). Processes no reader adopted are stopped by `close()` (or the
    `with` block), and in any case die with this process or when their task pipe closes. Start them on the thread
    that will run the reader: on Linux they die with the thread that started them.

    `core_tokens`: that many core tokens (indexer/cores.py), shared by these processes and, through the attribute
    `core_tokens`, by the run's encoder calls (0: none). They stay open until `close()`."""

    def __init__(self, workers: int | None = None, core_tokens: int = 0) -> None:
        self._workers: list[_Worker] = []
        self._stderr: IO[bytes] | None = None  # the processes' shared stderr, handed over with them
        count = worker_count(workers)
        self.core_tokens = CoreTokens(core_tokens) if count and core_tokens > 0 else None
        if count:
            self._stderr = tempfile.TemporaryFile(prefix="clipsearch-decoder-")
            try:
                for _ in range(count):
                    self._workers.append(_spawn_worker(self._stderr, self.core_tokens))
            except BaseException:
                self.close()
                raise

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def hand_over(self, wanted: int) -> tuple[list["_Worker"], IO[bytes] | None]:
        """Up to `wanted` of the started processes and their shared stderr file (None when there was none); the
        rest are stopped. After this, this object holds nothing."""
        workers, self._workers = self._workers, []
        stderr, self._stderr = self._stderr, None
        for extra in workers[wanted:]:
            extra.kill()
        return workers[:wanted], stderr

    def close(self) -> None:
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.kill()  # never given work: closing its task pipe ends it; the kill makes sure
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self.core_tokens is not None:
            self.core_tokens.close()
            self.core_tokens = None

    def __enter__(self) -> "StartedDecoders":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def worker_count(workers: int | None) -> int:
    """Decoder processes for `workers` (None: one per core, 0: none, decode in the calling process)."""
    return (os.cpu_count() or 1) if workers is None else max(0, workers)


def _spawn_worker(stderr: IO[bytes], core_tokens: CoreTokens | None = None) -> _Worker:
    """Start one decoder process; it imports its modules, then waits for its settings on the task pipe."""
    from multiprocessing.connection import Connection

    task_r, task_w = os.pipe()
    result_r, result_w = os.pipe()
    token_fds = core_tokens.fds if core_tokens is not None else (-1, -1)
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOT, str(task_r), str(result_w), str(os.getpid()), *map(str, token_fds)],
            pass_fds=(task_r, result_w, *(fd for fd in token_fds if fd >= 0)), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=stderr, close_fds=True)
    except BaseException:
        for fd in (task_w, result_r):
            os.close(fd)
        raise
    finally:
        os.close(task_r)  # the child's ends: only the child may hold them, or EOF never comes
        os.close(result_w)
    return _Worker(process, Connection(task_w, readable=False), Connection(result_r, writable=False))


def _wait(connections: list, timeout: float | None) -> list:
    from multiprocessing.connection import wait

    return wait(connections, timeout)
