"""The indexing stages between the reader and the store: planning (mark-and-sweep), mapping (visual
encoder) and writing (SQLite per batch; FAISS rebuilt at the end of a run).

Counting conventions of `IndexSummary` (the `--json` contract):
  added    new paths whose image was embedded
  updated  known paths whose content changed and was re-embedded
  reused   new or changed paths whose content hash matched an indexed image: its vector was copied
  removed  paths that left the index (deleted, excluded, or now unreadable)
  skipped  files that could not be used, each with its reason
  total    images in the collection after the run
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable, Sequence

import numpy as np

from clipsearch.model.bundle import PreprocessSpec
from clipsearch.store.database import FileState, NewImage, SkippedFile, Store
from clipsearch.store.vectors import DEFAULT_IVF_THRESHOLD

from .reader import ReadResult, ReadTask
from .walk import FoundFile, WalkOptions

ProgressCallback = Callable[[int, int], None]  # (files read so far, files to read)


@dataclass(frozen=True)
class IndexOptions:
    batch_size: int = 32
    workers: int | None = None  # decode processes; None = one per core, 0 = decode in this process
    exclude: tuple[str, ...] = ()
    include_hidden: bool = False
    rebuild: bool = False
    ivf_threshold: int = DEFAULT_IVF_THRESHOLD
    chunk_size: int = 4
    worker_nice: int = 0
    encoder_threads: int | None = None

    def walk_options(self) -> WalkOptions:
        return WalkOptions(exclude=tuple(self.exclude), include_hidden=self.include_hidden)


@dataclass
class IndexSummary:
    added: int = 0
    updated: int = 0
    removed: int = 0
    reused: int = 0
    skipped: list[SkippedFile] = field(default_factory=list)
    total: int = 0
    seconds: float = 0.0
    unchanged: int = 0
    embedded: int = 0
    cpu_seconds: float = 0.0  # this process plus the decode workers
    collection: str = ""
    model_id: str = ""
    index_kind: str = ""
    index_update: str = ""  # "none" | "append" | "rebuild": what happened to the FAISS index

    def to_dict(self) -> dict:
        data = asdict(self)
        data["skipped"] = [{"path": s.path, "reason": s.reason} for s in self.skipped]
        data["seconds"] = round(self.seconds, 3)
        data["cpu_seconds"] = round(self.cpu_seconds, 3)
        return data


@dataclass
class Plan:
    """What a run has to do, decided from size + mtime before any file is opened."""

    unchanged_ids: list[int] = field(default_factory=list)
    to_read: list[ReadTask] = field(default_factory=list)
    existing: dict[str, FileState] = field(default_factory=dict)  # path -> state, for changed known files
    still_bad: list[SkippedFile] = field(default_factory=list)  # unchanged files that failed before
    still_bad_paths: list[str] = field(default_factory=list)


def make_plan(files: Sequence[FoundFile], store: Store) -> Plan:
    states = store.file_states()
    bad = store.skipped_states()
    plan = Plan()
    for found in files:
        state = states.get(found.path)
        if state is not None and state.size == found.size and state.mtime_ns == found.mtime_ns:
            plan.unchanged_ids.append(state.id)
            continue
        previous_bad = bad.get(found.path)
        if state is None and previous_bad and previous_bad[0] == found.size and previous_bad[1] == found.mtime_ns:
            plan.still_bad.append(SkippedFile(found.path, previous_bad[2]))
            plan.still_bad_paths.append(found.path)
            continue
        if state is not None:
            plan.existing[found.path] = state
        plan.to_read.append(ReadTask(found.path, found.size, found.mtime_ns))
    return plan


class Mapper:
    """The visual encoder stage: uint8 [H, W, 3] images -> L2-normalised float32 vectors."""

    def __init__(self, model) -> None:
        self.model = model
        spec: PreprocessSpec = model.preprocess
        self._scale = (1.0 / (255.0 * np.asarray(spec.std, dtype=np.float32))).reshape(1, 1, 1, 3)
        self._shift = (np.asarray(spec.mean, dtype=np.float32) / np.asarray(spec.std, dtype=np.float32)).reshape(1, 1, 1, 3)

    def normalise(self, images: Sequence[np.ndarray]) -> np.ndarray:
        batch = np.stack(images).astype(np.float32)
        batch *= self._scale
        batch -= self._shift
        return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))

    def encode(self, images: Sequence[np.ndarray]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.model.embed_dim), dtype=np.float32)
        return self.model.encode_pixels(self.normalise(images))


class Writer:
    """Writes rows + vectors to the store, one transaction per batch (a killed run loses at most a batch)."""

    def __init__(self, store: Store, model_id: str, run_id: int, dim: int, summary: IndexSummary) -> None:
        self.store = store
        self.model_id = model_id
        self.run_id = run_id
        self.dim = dim
        self.summary = summary
        self.hash_to_id: dict[str, int] = store.known_hashes()

    def vector_for_hash(self, content_hash: str) -> np.ndarray | None:
        image_id = self.hash_to_id.get(content_hash)
        return None if image_id is None else self.store.vector(image_id, self.dim)

    def write(self, results: Sequence[ReadResult], vectors: Sequence[np.ndarray], existing: dict[str, FileState],
              reused_flags: Sequence[bool]) -> None:
        rows = []
        for result, vector in zip(results, vectors):
            task = result.task
            state = existing.get(task.path)
            rows.append(NewImage(path=task.path, size=task.size, mtime_ns=task.mtime_ns, content_hash=result.content_hash,
                                 width=result.width, height=result.height, taken_at=result.taken_at, vector=vector,
                                 id=state.id if state else None))
            if state is not None and self.hash_to_id.get(state.content_hash) == state.id:
                del self.hash_to_id[state.content_hash]  # its old content is about to be overwritten
        ids = self.store.write_images(rows, self.model_id, self.run_id, _now())
        for result, image_id, reused in zip(results, ids, reused_flags):
            self.hash_to_id.setdefault(result.content_hash, image_id)
            if reused:
                self.summary.reused += 1
            elif result.task.path in existing:
                self.summary.updated += 1
                self.summary.embedded += 1
            else:
                self.summary.added += 1
                self.summary.embedded += 1

    def refresh_stat(self, result: ReadResult, state: FileState) -> None:
        """A known file whose size/mtime changed but whose bytes did not: just record the new stat."""
        self.store.touch([state.id], self.run_id, {state.id: (result.task.size, result.task.mtime_ns)})

    def skip(self, entries: Sequence[tuple[ReadTask, str]]) -> None:
        if not entries:
            return
        self.store.record_skipped([(t.path, t.size, t.mtime_ns, reason) for t, reason in entries], self.run_id)
        self.summary.skipped.extend(SkippedFile(t.path, reason) for t, reason in entries)


class BatchAssembler:
    """Turns reader results into writer calls: vectors by hash where possible, encoder batches otherwise."""

    def __init__(self, mapper: Mapper, writer: Writer, existing: dict[str, FileState], batch_size: int) -> None:
        self.mapper = mapper
        self.writer = writer
        self.existing = existing
        self.batch_size = max(1, batch_size)
        self.to_encode: list[ReadResult] = []
        self.retry: list[ReadTask] = []  # known-hash files whose vector went away: decode them after all
        self.encode_seconds = 0.0

    def add(self, result: ReadResult) -> None:
        if result.error is not None:
            self.writer.skip([(result.task, result.error)])
            return
        state = self.existing.get(result.task.path)
        if state is not None and state.content_hash == result.content_hash:
            self.writer.refresh_stat(result, state)
            return
        if result.known:
            vector = self.writer.vector_for_hash(result.content_hash)
            if vector is None:
                self.retry.append(ReadTask(result.task.path, result.task.size, result.task.mtime_ns, force_decode=True))
                return
            source = self.writer.store.get(self.writer.hash_to_id[result.content_hash])
            filled = ReadResult(result.task, result.content_hash, source.width if source else None,
                                source.height if source else None, source.taken_at if source else None)
            self.writer.write([filled], [vector], self.existing, [True])
            return
        self.to_encode.append(result)
        if len(self.to_encode) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.to_encode:
            return
        batch, self.to_encode = self.to_encode, []
        # Identical bytes within a batch are encoded once; a hash embedded by an earlier batch is copied.
        unique: dict[str, int] = {}
        encode_rows: list[ReadResult] = []
        sources: list[tuple[str, object]] = []
        for result in batch:
            slot = unique.get(result.content_hash)
            if slot is not None:
                sources.append(("duplicate", slot))
                continue
            known = self.writer.vector_for_hash(result.content_hash) if result.content_hash in self.writer.hash_to_id else None
            if known is not None:
                sources.append(("known", known))
                continue
            unique[result.content_hash] = len(encode_rows)
            sources.append(("encoded", len(encode_rows)))
            encode_rows.append(result)
        started = time.perf_counter()
        encoded = self.mapper.encode([r.pixels for r in encode_rows])
        self.encode_seconds += time.perf_counter() - started
        vectors = [encoded[src] if kind != "known" else src for kind, src in sources]
        reused = [kind != "encoded" for kind, _ in sources]
        self.writer.write(batch, vectors, self.existing, reused)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
