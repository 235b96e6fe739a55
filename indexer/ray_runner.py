"""The Ray runner (`clipsearch index PATH --ray [ADDRESS]`): the local runner's run, with the reading, decoding and
embedding done by Ray Data on a Ray instance (a local one, or an existing cluster), and a merge into the collection.

What runs where:

* driver (this process): the walk, the plan against the store (`pipeline.make_plan`: only new and changed files,
  exactly as the local runner decides), the shard files, the merge, the sweep, and of the FAISS index everything
  but the adding of an IVF index's vectors (below).
* Ray tasks (`_decode_batch`): each file is read and decoded by `reader.read_one`, the local pipeline's own
  function (same hash, EXIF facts, draft decoding, resize), so pixels, sizes and dates are identical. Paths are
  local paths (the same path must be readable on every node: shared storage) or fsspec URLs (`s3://…`).
* a fixed pool of Ray actors (`_Encoder`, `map_batches(compute=ActorPoolStrategy(size=concurrency), num_cpus=,
  num_gpus=)`): one ONNX visual encoder each, normalising as `pipeline.Mapper` does.
* the driver collects the embedded rows (`iter_batches`, in input order) and writes them as shards in
  clip-retrieval's layout (`img_emb/img_emb_{n}.npy`, `metadata/metadata_{n}.parquet`, the names of
  `clipsearch.store.interchange`), then merges the shards: each row goes through `pipeline.BatchAssembler` and
  `pipeline.Writer` with its precomputed vector, so added/updated/reused/skipped and every stored column
  (size, mtime, width, height, taken_at, content hash) are what the local runner writes, and the FAISS index is
  brought up to date by `Collection.update_vectors` (the collection's index policy, trained on a sample).
* Ray tasks (`parallel_build.add_shard`, `RayOptions.index_shard_size` vectors each, `num_cpus` of the encoder
  actors): when that update rebuilds an IVF index, the driver trains the quantizer (on the policy's random sample,
  as locally), ships the trained empty index once through the object store, and streams the vectors from SQLite
  in position order to tasks that each add theirs to a copy of it and return its inverted lists; the driver merges
  them in order (in memory, or through `merge_ondisk` for on-disk lists), writes the refine stage and id map,
  tunes and saves as a local build does, so the index holds the same lists (`clipsearch.store.index.
  parallel_build`). An exact (flat) index below the IVF threshold, and appending to an existing index, stay on
  the driver. `RayRunner.last_index_tasks` reports what ran.

The metadata parquet has clip-retrieval's `image_path` column plus `size`, `mtime_ns`, `content_hash`, `width`,
`height`, `taken_at`, `error`, `force_decode`, `embedded` (and `tokens` with ITM tokens). Rows that carry no
vector (a file that could not be used, or whose bytes are already indexed under another path) have a zero vector,
which `clipsearch import-embeddings` of such a folder skips.

The model bundle reaches the workers by path when the path holds the same model there (one machine, or shared
storage); when connecting to a cluster its files are also put into Ray's object store once and written to a
temporary folder on a node that lacks them.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
from collections import deque
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from clipsearch.errors import ClipsearchError
from clipsearch.paths import is_url_path
from clipsearch.store.index.parallel_build import DEFAULT_SHARD_SIZE as DEFAULT_INDEX_SHARD_SIZE
from clipsearch.store.index.parallel_build import ParallelAdd, ShardJob, ShardLists, add_shard
from clipsearch.store.interchange import DEFAULT_SHARD_SIZE, IMG_EMB_DIR, METADATA_DIR, find_shards

from .pipeline import BatchAssembler, IndexOptions, IndexSummary, Mapper, ProgressCallback, Writer
from .reader import ParallelReader, ReadResult, ReadTask, read_one
from .runner import EmbedCost, LocalRunner
from .walk import FoundFile, WalkResult, walk

_RAY_HINT = "Install the ray extra: pip install 'clipsearch[ray]' (ray[data] >= 2.9)."
LOCAL = "local"  # --ray without an address


class RayError(ClipsearchError):
    """Ray is missing, cannot be started or reached, or a distributed run failed."""


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start a local Ray instance; else ray.init(address=...) ("auto", "ray://h:10001")
    concurrency: int | None = None  # encoder actors (default: `RayRunner._default_concurrency`)
    num_cpus: float = 1.0  # per encoder actor (also its onnxruntime threads, at least 1)
    num_gpus: float = 0.0  # per encoder actor; > 0 runs the encoder with CUDAExecutionProvider
    decode_batch: int = 8  # files per decoding task batch
    shard_size: int = DEFAULT_SHARD_SIZE  # rows per img_emb_{n}.npy
    shards_dir: Path | None = None  # keep the shards here (a new or empty folder); default a temporary one
    ship_bundle: bool | None = None  # put the bundle's files into the object store (None: when connecting)
    object_store_memory: int | None = None  # a local instance's object store (bytes)
    index_shard_size: int = DEFAULT_INDEX_SHARD_SIZE  # vectors per FAISS add task when an IVF index is (re)built


@dataclass
class IndexTasks:
    """What the FAISS add tasks of a run's IVF build did on Ray: tasks run, vectors they added, and the worker
    processes ("host:pid") that ran them. All zero when the run built no IVF index (flat layout, append, fresh)."""

    tasks: int = 0
    vectors: int = 0
    workers: set[str] = field(default_factory=set)


def parse_address(value: str | None) -> str | None:
    """`--ray` value -> address for ray.init (None: a local instance). RayError for what is not an address."""
    if value is None or value == LOCAL:
        return None
    text = value.strip()
    if text == "auto" or re.fullmatch(r"(ray|https?)://[^\s/]+(:[0-9]+)?/?", text) or re.fullmatch(
            r"[A-Za-z0-9_.-]+:[0-9]+", text):
        return text
    raise RayError(f"--ray {value!r} is not a Ray address",
                   "Give ray://HOST:10001 (Ray client), HOST:6379 or auto (a node of the cluster), or --ray alone for "
                   "a local instance (the word after --ray is read as the address unless it is an option or an existing "
                   "file or folder).")


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise RayError(f"--ray needs Ray Data, which is not installed ({exc})", _RAY_HINT) from exc
    return ray


@contextmanager
def ray_session(options: RayOptions) -> Iterator[Any]:
    """Ray, initialised for the length of the block: an instance already initialised in this process is used as it
    is (and left running); else a local instance starts (or `options.address` is connected to) and is shut down."""
    ray = _import_ray()
    import logging

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # no execution INFO lines on the command's stderr
    if ray.is_initialized():
        yield ray
        return
    quiet = dict(log_to_driver=False, logging_level="error", include_dashboard=False)
    address = options.address or os.environ.get("RAY_ADDRESS") or None  # ray.init itself would follow RAY_ADDRESS
    try:
        with _signal_handlers_kept():
            _init(ray, address, options, quiet)
    except Exception as exc:  # noqa: BLE001 - ray raises ConnectionError, RuntimeError, ValueError, ...
        where = f"reach the Ray cluster at {address}" if address else "start a local Ray instance"
        raise RayError(f"cannot {where}: {type(exc).__name__}: {exc}",
                       "Start the head with `ray start --head` and pass --ray ray://HEAD:10001 (or HEAD:6379 on a "
                       "node of the cluster)." if address else "Check `ray start --head` works here.") from exc
    try:
        yield ray
    finally:
        ray.shutdown()


_KEPT_SIGNALS = ("SIGTERM", "SIGHUP", "SIGINT")


@contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """The process's own handlers of SIGTERM, SIGHUP and SIGINT back after the block: ray.init puts its core
    worker's in their place (a SIGTERM then ended `clipsearch index --ray` with status 15 and a stack dump, not the
    orderly stop and 143 of a local run). Outside the main thread nothing is touched."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kept = {signum: signal.getsignal(signum) for signum in
            (getattr(signal, name) for name in _KEPT_SIGNALS if hasattr(signal, name))}
    try:
        yield
    finally:
        for signum, handler in kept.items():
            if handler is not None:  # None: a handler not installed from Python, which cannot be put back
                signal.signal(signum, handler)


def _init(ray, address: str | None, options: RayOptions, quiet: dict) -> None:
    if address is None:
        # "local": always a new instance of our own, never one that `ray start` left running here
        ray.init(address="local", num_cpus=os.cpu_count() or 1, object_store_memory=options.object_store_memory,
                 **quiet)
    elif address.startswith("ray://"):  # Ray Client: the rest are the server's ray.init arguments
        ray.init(address=address, logging_level="error")
    else:
        ray.init(address=address, **quiet)


# -- shipping the bundle ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BundleSource:
    """How an encoder actor finds the model: by path, else from the files put into the object store."""

    path: str
    model_id: str
    files: Any = None  # ObjectRef of {name: bytes}

    @classmethod
    def of(cls, info, ship: bool, ray) -> "BundleSource":
        if not ship:
            return cls(str(info.path), info.model_id)
        from clipsearch.model.bundle import BUNDLE_FILES, ITM_FILES, WEIGHT_FILES

        files = {}
        for name in (*BUNDLE_FILES, *WEIGHT_FILES, *ITM_FILES):
            path = info.file(name)
            if path.is_file():
                files[name] = path.read_bytes()
        meta = json.loads(files["model.json"])
        meta.pop("links", None)  # linked files are shipped under their own names
        files["model.json"] = json.dumps(meta, indent=2).encode("utf-8")
        return cls(str(info.path), info.model_id, ray.put(files))

    def local_path(self) -> Path:
        from clipsearch.model.bundle import read_bundle

        try:
            if read_bundle(self.path).model_id == self.model_id:
                return Path(self.path)
        except (ClipsearchError, OSError):
            pass
        if self.files is None:
            raise RayError(f"the model bundle {self.path} is not on Ray node {socket.gethostname()}",
                           "Put the bundle on storage every node mounts at the same path, or let clipsearch ship it "
                           "(the default when connecting to a cluster).")
        import ray

        target = Path(tempfile.gettempdir()) / ("clipsearch-bundle-" + re.sub(r"[^A-Za-z0-9_.-]", "_", self.model_id))
        if not (target / "model.json").is_file():
            staging = Path(tempfile.mkdtemp(prefix=".clipsearch-bundle-", dir=target.parent))
            for name, data in ray.get(self.files).items():
                (staging / name).write_bytes(data)
            try:
                os.replace(staging, target)
            except OSError:  # another actor on this node got there first
                shutil.rmtree(staging, ignore_errors=True)
        return target


# -- the Ray stages -----------------------------------------------------------------------------------------------
def read_task(task: ReadTask, spec, known: frozenset[str]) -> ReadResult:
    """`reader.read_one` for a local path; an fsspec URL is copied to a temporary file first and read the same way."""
    if not is_url_path(task.path):
        return read_one(task, spec, known)
    import fsspec

    from clipsearch.model.preprocess import MAX_IMAGE_FILE_BYTES

    with tempfile.NamedTemporaryFile(prefix="clipsearch-", suffix=os.path.splitext(task.path)[1]) as local:
        try:
            with fsspec.open(task.path, "rb") as remote:
                local.write(remote.read(MAX_IMAGE_FILE_BYTES + 1))
            local.flush()
        except (OSError, ValueError) as exc:
            return ReadResult(task, error=f"cannot read: {exc}")
        result = read_one(replace(task, path=local.name), spec, known)
    return replace(result, task=task)


def _decode_batch(batch: dict[str, np.ndarray], spec, known: frozenset[str]) -> dict[str, np.ndarray]:
    """Ray task: read and decode files (`read_task`), pixels as uint8 [N, H, W, 3] (zeros where not decoded)."""
    n = len(batch["path"])
    height, width = spec.size
    pixels = np.zeros((n, height, width, 3), dtype=np.uint8)
    out: dict[str, list] = {k: [] for k in ("content_hash", "width", "height", "taken_at", "error", "decoded")}
    for i in range(n):
        task = ReadTask(str(batch["path"][i]), int(batch["size"][i]), int(batch["mtime_ns"][i]), bool(batch["force"][i]))
        result = read_task(task, spec, known)
        out["content_hash"].append(result.content_hash)
        out["width"].append(-1 if result.width is None else result.width)
        out["height"].append(-1 if result.height is None else result.height)
        out["taken_at"].append(result.taken_at or "")
        out["error"].append(result.error or "")
        out["decoded"].append(result.pixels is not None)
        if result.pixels is not None:
            pixels[i] = result.pixels
    return {"path": batch["path"], "size": batch["size"], "mtime_ns": batch["mtime_ns"], "force": batch["force"],
            "content_hash": np.array(out["content_hash"], dtype=object),
            "width": np.array(out["width"], dtype=np.int64), "height": np.array(out["height"], dtype=np.int64),
            "taken_at": np.array(out["taken_at"], dtype=object), "error": np.array(out["error"], dtype=object),
            "decoded": np.array(out["decoded"], dtype=bool), "pixels": pixels}


class _Encoder:
    """Ray actor: one ONNX visual encoder; decoded rows get their vector (and ITM tokens with a codec)."""

    def __init__(self, bundle: BundleSource, threads: int, gpu: bool, codec) -> None:
        from clipsearch.model.runtime import ClipModel

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if gpu else None
        self.model = ClipModel(bundle.local_path(), threads=threads, providers=providers)
        if self.model.model_id != bundle.model_id:
            raise RayError(f"the bundle on Ray node {socket.gethostname()} is model {self.model.model_id}, "
                           f"not {bundle.model_id}")
        self.mapper = Mapper(self.model, codec)
        self.codec = codec

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        decoded = np.asarray(batch["decoded"], dtype=bool)
        n = len(decoded)
        vectors = np.zeros((n, self.model.embed_dim), dtype=np.float32)
        rows = np.flatnonzero(decoded)
        out = {k: v for k, v in batch.items() if k != "pixels"}
        tokens = None
        if self.codec is not None:
            tokens = np.zeros((n, self.codec.bytes_per_image), dtype=np.uint8)
        if rows.size:
            found, blobs = self.mapper.encode_with_tokens([batch["pixels"][i] for i in rows])
            vectors[rows] = found
            if tokens is not None:
                for i, blob in zip(rows, blobs):
                    tokens[i] = np.frombuffer(blob, dtype=np.uint8)
        out["vector"] = vectors
        if tokens is not None:
            out["tokens"] = tokens
        return out


# -- shards (clip-retrieval's layout) -------------------------------------------------------------------------------
_COLUMNS = ("size", "mtime_ns", "content_hash", "width", "height", "taken_at", "error", "force_decode", "embedded")


class ShardWriter:
    """Rows from the encoders -> img_emb/img_emb_{n}.npy + metadata/metadata_{n}.parquet, `shard_size` rows each."""

    def __init__(self, folder: Path, expected_rows: int, shard_size: int, dim: int, tokens: bool) -> None:
        from clipsearch.store.interchange import _parquet

        self.pq = _parquet()
        self.folder = folder
        self.shard_size = max(1, shard_size)
        self.digits = int(math.log10(max(1, math.ceil(expected_rows / self.shard_size)))) + 1
        self.dim = dim
        self.tokens = tokens
        self.number = 0
        self.rows: list[dict] = []
        self.vectors: list[np.ndarray] = []
        (folder / IMG_EMB_DIR).mkdir(parents=True, exist_ok=True)
        (folder / METADATA_DIR).mkdir(parents=True, exist_ok=True)

    def add(self, batch: dict[str, np.ndarray]) -> int:
        n = len(batch["path"])
        for i in range(n):
            error = str(batch["error"][i])
            row = {"image_path": str(batch["path"][i]), "size": int(batch["size"][i]),
                   "mtime_ns": int(batch["mtime_ns"][i]), "content_hash": str(batch["content_hash"][i]),
                   "width": int(batch["width"][i]) if int(batch["width"][i]) >= 0 else None,
                   "height": int(batch["height"][i]) if int(batch["height"][i]) >= 0 else None,
                   "taken_at": str(batch["taken_at"][i]) or None, "error": error or None,
                   "force_decode": bool(batch["force"][i]), "embedded": bool(batch["decoded"][i])}
            if self.tokens:
                row["tokens"] = bytes(batch["tokens"][i]) if row["embedded"] else None
            self.rows.append(row)
            self.vectors.append(np.asarray(batch["vector"][i], dtype=np.float32))
            if len(self.rows) >= self.shard_size:
                self.flush()
        return n

    def flush(self) -> None:
        if not self.rows:
            return
        import pyarrow as pa

        from clipsearch.store.interchange_export import _write_atomically

        label = str(self.number).zfill(self.digits)
        vectors = np.stack(self.vectors).astype(np.float32).reshape(len(self.vectors), self.dim)
        names = ("image_path", *_COLUMNS) + (("tokens",) if self.tokens else ())
        types = {"size": pa.int64(), "mtime_ns": pa.int64(), "width": pa.int32(), "height": pa.int32(),
                 "force_decode": pa.bool_(), "embedded": pa.bool_(), "tokens": pa.binary()}
        table = pa.table({name: pa.array([r[name] for r in self.rows], type=types.get(name, pa.string()))
                          for name in names})
        _write_atomically(self.folder / IMG_EMB_DIR / f"img_emb_{label}.npy",
                          lambda handle: np.save(handle, vectors))
        _write_atomically(self.folder / METADATA_DIR / f"metadata_{label}.parquet",
                          lambda handle: self.pq.write_table(table, handle))
        self.number += 1
        self.rows, self.vectors = [], []


@dataclass(frozen=True)
class _Embedded:
    """A vector (and token blob) computed on Ray, travelling where `ReadResult.pixels` is in the local pipeline."""

    vector: np.ndarray
    tokens: bytes | None


class _PrecomputedMapper:
    """`pipeline.Mapper`'s interface over results whose 'pixels' are `_Embedded`: nothing is encoded again."""

    def encode_with_tokens(self, images: Sequence[_Embedded]) -> tuple[np.ndarray, list[bytes | None]]:
        if not images:
            return np.zeros((0, 0), dtype=np.float32), []
        return np.stack([e.vector for e in images]), [e.tokens for e in images]


def iter_shard_results(folder: Path) -> Iterator[ReadResult]:
    """The rows of a Ray run's shards as the reader's results (in shard and row order)."""
    from clipsearch.store.interchange import _parquet

    pq = _parquet()
    for shard in find_shards(folder):
        vectors = np.load(shard.embeddings, allow_pickle=False).astype(np.float32, copy=False)
        table = pq.read_table(shard.metadata)
        missing = [c for c in _COLUMNS if c not in table.column_names]
        if missing:
            raise RayError(f"{shard.metadata}: not written by a clipsearch Ray run (no {', '.join(missing)} column)",
                           "Import clip-retrieval output with `clipsearch import-embeddings` instead.")
        columns = table.to_pydict()
        tokens = columns.get("tokens")
        for i in range(shard.rows):
            task = ReadTask(columns["image_path"][i], columns["size"][i], columns["mtime_ns"][i],
                            bool(columns["force_decode"][i]))
            if columns["error"][i] is not None:
                yield ReadResult(task, content_hash=columns["content_hash"][i], error=columns["error"][i])
            elif not columns["embedded"][i]:
                yield ReadResult(task, content_hash=columns["content_hash"][i])  # known bytes: its vector is reused
            else:
                embedded = _Embedded(vectors[i].copy(), tokens[i] if tokens is not None else None)
                yield ReadResult(task, columns["content_hash"][i], columns["width"][i], columns["height"][i],
                                 columns["taken_at"][i], pixels=embedded)  # type: ignore[arg-type]


# -- fsspec URLs ----------------------------------------------------------------------------------------------------
def walk_url(url: str, options: IndexOptions) -> WalkResult:
    """Image files under an fsspec URL (`s3://bucket/photos`), by the walk's name rules (suffix, hidden)."""
    from clipsearch.model.preprocess import IMAGE_SUFFIXES

    try:
        import fsspec

        fs, root = fsspec.core.url_to_fs(url)
        entries = fs.find(root, detail=True)
    except Exception as exc:  # noqa: BLE001 - every filesystem raises its own
        return WalkResult(problems=[(url, f"cannot list: {type(exc).__name__}: {exc}")])
    result = WalkResult(roots=[fs.unstrip_protocol(root.rstrip("/"))])  # spelled as the files' paths are
    for path, info in sorted(entries.items()):
        relative = path[len(root.rstrip("/")):].lstrip("/")
        parts = relative.split("/")
        if not options.include_hidden and any(p.startswith(".") for p in parts):
            continue
        if os.path.splitext(path)[1].lower() not in IMAGE_SUFFIXES or info.get("type") == "directory":
            continue
        result.files.append(FoundFile(fs.unstrip_protocol(path), int(info.get("size") or 0), _mtime_ns(info)))
    return result


def _mtime_ns(info: dict) -> int:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return int(value.timestamp() * 1e9)
        try:
            return int(float(value) * 1e9)
        except (TypeError, ValueError):
            from datetime import datetime

            try:
                return int(datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp() * 1e9)
            except ValueError:
                continue
    return 0


def walk_roots(roots: Sequence[str | Path], options: IndexOptions) -> WalkResult:
    """`walk.walk` for local paths (and file:// URLs), `walk_url` for other fsspec URLs."""
    local = [str(r)[len("file://"):] if str(r).startswith("file://") else r for r in roots]
    result = walk([r for r in local if not is_url_path(str(r))], options.walk_options())
    for url in (str(r) for r in local if is_url_path(str(r))):
        found = walk_url(url, options)
        result.roots.extend(found.roots)
        result.problems.extend(found.problems)
        result.files.extend(found.files)
    return result


# -- the runner -----------------------------------------------------------------------------------------------------
class RayRunner(LocalRunner):
    """`LocalRunner` with reading and encoding on Ray Data: same `run(...)`, same `IndexSummary`. `cpu_seconds`
    counts this process only (Ray workers are not included)."""

    def __init__(self, options: IndexOptions = IndexOptions(), ray_options: RayOptions = RayOptions()) -> None:
        super().__init__(options)
        self.ray_options = ray_options
        self.last_shards: Path | None = None  # the folder the last run's shards were written to
        self.last_index_tasks = IndexTasks()  # the last run's FAISS add tasks
        self._held: ExitStack | None = None  # during a run: holds the Ray session once a stage has started it
        self._ray: Any = None

    def _index_into(self, collection, *args, **kwargs) -> IndexSummary:
        """The local runner's run, with one Ray session (started when a stage first needs it) for both the
        embedding and the index build, and IVF vectors added by Ray tasks (`_add_on_ray`)."""
        self.last_index_tasks = IndexTasks()
        with ExitStack() as held:
            self._held, self._ray = held, None
            collection.parallel_adds = ParallelAdd(self._add_on_ray, max(1, self.ray_options.index_shard_size))
            try:
                return super()._index_into(collection, *args, **kwargs)
            finally:
                collection.parallel_adds = None
                self._held = self._ray = None

    @contextmanager
    def _session(self) -> Iterator[Any]:
        """Ray for one stage: during a run the run's session (started here the first time), else a session of its
        own for the block."""
        if self._held is None:
            with ray_session(self.ray_options) as ray:
                yield ray
            return
        if self._ray is None:
            self._ray = self._held.enter_context(ray_session(self.ray_options))
        yield self._ray

    def _add_on_ray(self, trained: np.ndarray, jobs: Iterable[ShardJob]) -> Iterator[ShardLists]:
        """`parallel_build.ShardMap` on Ray: one task per job (`add_shard`, `num_cpus` as the encoder actors), at
        most two per CPU share of the cluster in flight (the driver reads the next vectors meanwhile), results
        handed back in job order."""
        report = self.last_index_tasks
        with self._session() as ray:
            cpus = max(self.ray_options.num_cpus, 0.25)
            task = ray.remote(num_cpus=cpus)(add_shard)
            window = max(2, 2 * int(float(ray.cluster_resources().get("CPU", 1)) // cpus))
            shared = ray.put(trained)
            threads = max(1, int(cpus))
            pending: deque = deque()

            def collect() -> ShardLists:
                try:
                    shard = ray.get(pending.popleft())
                except Exception as exc:  # noqa: BLE001 - a task failure comes back wrapped by Ray
                    raise RayError(f"a FAISS add task failed on Ray: {type(exc).__name__}: {str(exc)[:2000]}") from exc
                report.tasks += 1
                report.vectors += shard.count
                report.workers.add(shard.worker)
                return shard

            for job in jobs:
                pending.append(task.remote(shared, job, threads))
                if len(pending) >= window:
                    yield collect()
            while pending:
                yield collect()

    def update(self, collection, model, changes, progress=None) -> IndexSummary:
        raise RayError("watch mode runs locally", "Leave out --ray with --watch.")

    def _open_encoder_early(self, model) -> None:
        return None  # the encoder runs in Ray's actors, not in this process

    def _walk(self, roots: Sequence[str | Path]) -> WalkResult:
        return walk_roots(roots, self.options)  # local folders and fsspec URLs

    def _embed(self, model, codec, plan, writer: Writer, progress: ProgressCallback | None) -> EmbedCost:
        """Read, decode and encode on Ray into shards, then merge the shards through `writer`. Ray workers' CPU
        time is not counted."""
        if not plan.to_read:
            if progress:
                progress(0, 0)
            return EmbedCost()
        with self._shards_folder() as folder:
            encode_started = time.perf_counter()
            self.embed_to_shards(model, codec, plan.to_read, frozenset(writer.hash_to_id), folder, progress)
            encode_seconds = time.perf_counter() - encode_started
            self._merge(folder, model, codec, writer, plan)
        return EmbedCost(encode_seconds)

    @contextmanager
    def _shards_folder(self) -> Iterator[Path]:
        kept = self.ray_options.shards_dir
        if kept is not None:
            kept = Path(kept)
            if kept.exists() and (not kept.is_dir() or any(kept.iterdir())):
                raise RayError(f"{kept}: not a new or empty folder", "Give --ray-shards a new folder.")
            kept.mkdir(parents=True, exist_ok=True)
            self.last_shards = kept
            yield kept
            return
        folder = Path(tempfile.mkdtemp(prefix="clipsearch-ray-shards-"))
        self.last_shards = folder
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def embed_to_shards(self, model, codec, tasks: Sequence[ReadTask], known: frozenset[str], folder: Path,
                        progress: ProgressCallback | None = None) -> int:
        """Read, decode and embed `tasks` on Ray; write the rows as shards into `folder`. Returns the rows written."""
        ray_options, options = self.ray_options, self.options
        total = len(tasks)
        if progress:
            progress(0, total)
        with self._session() as ray:
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False
            context.print_on_execution_start = False
            context.execution_options.preserve_order = True  # rows (and so SQLite ids) in walk order
            remote = bool(ray_options.address or os.environ.get("RAY_ADDRESS"))
            ship = ray_options.ship_bundle if ray_options.ship_bundle is not None else remote
            bundle = BundleSource.of(model.info, ship, ray)
            concurrency = ray_options.concurrency or self._default_concurrency(ray)
            decode_batch = max(1, ray_options.decode_batch)
            items = [{"path": t.path, "size": t.size, "mtime_ns": t.mtime_ns, "force": t.force_decode} for t in tasks]
            dataset = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(total / decode_batch)))
            dataset = dataset.map_batches(_decode_batch, batch_size=decode_batch, batch_format="numpy", num_cpus=1,
                                          fn_kwargs={"spec": model.preprocess, "known": known})
            dataset = dataset.map_batches(
                # a fixed pool of `concurrency` actors (map_batches' own concurrency= is deprecated since Ray 2.51)
                _Encoder, batch_size=options.batch_size, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=concurrency),
                num_cpus=ray_options.num_cpus, num_gpus=ray_options.num_gpus or None,
                fn_constructor_kwargs={"bundle": bundle, "gpu": ray_options.num_gpus > 0, "codec": codec,
                                       "threads": options.encoder_threads or max(1, int(ray_options.num_cpus))})
            shards = ShardWriter(folder, total, ray_options.shard_size, model.embed_dim, codec is not None)
            done = 0
            try:
                for batch in dataset.iter_batches(batch_format="numpy", batch_size=None):
                    done += shards.add(batch)
                    if progress:
                        progress(done, total)
            except ClipsearchError:
                raise
            except Exception as exc:  # noqa: BLE001 - a task or actor failure comes back wrapped by Ray
                raise RayError(f"the Ray job failed: {type(exc).__name__}: {str(exc)[:2000]}") from exc
            shards.flush()
        if done != total:
            raise RayError(f"the Ray job returned {done} rows for {total} files")
        return done

    def _default_concurrency(self, ray) -> int:
        """One encoder actor per GPU share with --ray-gpus; else one per CPU share when Ray Data fuses the decoding
        into the actors (both stages ask for one CPU: the default), or half the CPUs left to decoding tasks."""
        resources, options = ray.cluster_resources(), self.ray_options
        if options.num_gpus > 0:
            return max(1, int(resources.get("GPU", 0) // options.num_gpus))
        cpus, per_actor = float(resources.get("CPU", 1)), max(options.num_cpus, 0.25)
        return max(1, int(cpus // per_actor) if options.num_cpus == 1 else int(cpus // (2 * per_actor)))

    def _merge(self, folder: Path, model, codec, writer: Writer, plan) -> None:
        """The shards into the collection through the local pipeline's assembler and writer (vectors as computed on
        Ray); files whose known bytes lost their vector meanwhile are decoded and encoded here, as locally."""
        precomputed: Any = _PrecomputedMapper()  # in place of a Mapper
        assembler = BatchAssembler(precomputed, writer, plan.existing, self.options.batch_size, plan.backfill,
                                   moves=plan.moves)
        for result in iter_shard_results(folder):
            assembler.add(result)
        assembler.flush()
        if assembler.retry:
            retry = assembler.retry
            local = BatchAssembler(Mapper(model, codec), writer, plan.existing, self.options.batch_size, plan.backfill)
            for result in ParallelReader(model.preprocess, (), workers=0).read(retry):
                local.add(result)
            local.flush()
