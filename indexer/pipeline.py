"""The indexing stages between the reader and the store: planning (mark-and-sweep), mapping (visual
encoder) and writing (SQLite per batch; FAISS rebuilt at the end of a run).

Counting conventions of `IndexSummary` (the `--json` contract):
  added    new paths whose image was embedded
  updated  known paths whose content changed and was re-embedded
  reused   new or changed paths whose content hash matched an indexed image: its vector was copied
  removed  paths that left the index (deleted, excluded, or now unreadable)
  unchanged known paths whose bytes are as indexed (also those whose size or mtime changed: read, hashed, kept)
  skipped  files that could not be used, each with its reason
  total    images in the collection after the run
  tokens   "int8"/"fp16" when the collection stores ITM image tokens ("" otherwise); tokens_added counts the
           already indexed images whose tokens this run computed (`index --tokens` on an older collection)
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable, Sequence

import numpy as np

from clipsearch.model.bundle import PreprocessSpec
from clipsearch.model.runtime import unit_rows
from clipsearch.paths import is_url_path
from clipsearch.store.database import IMPORTED_HASH_PREFIX, FileState, NewImage, SkippedFile, Store
from clipsearch.store.tokens import TokenCodec
from clipsearch.store.index.vectors import DEFAULT_IVF_THRESHOLD

from .lanes import EncoderLanes
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
    # Encoder batches in flight at once (see indexer/lanes.py): 1 runs one batch beside the reader; the CLI runs
    # one per core on a session of one intra-op thread per call.
    encoder_lanes: int = 1
    # One core token per lane, shared by the decoder processes and the encoder calls (indexer/cores.py), so that a
    # core never runs both at once; only for calls of one intra-op thread each, as the CLI runs them.
    share_cores: bool = False
    tokens: bool | None = None  # store ITM image tokens: True --tokens, False --no-tokens, None as remembered/default
    # --forget-missing: a path given (or, with rebuild, a folder indexed before) that is gone has its images removed.
    # Off by default: an unplugged disk or share must not cost its whole index.
    forget_missing: bool = False

    def walk_options(self) -> WalkOptions:
        return WalkOptions(exclude=tuple(self.exclude), include_hidden=self.include_hidden)


@dataclass
class IndexSummary:
    added: int = 0
    updated: int = 0
    removed: int = 0
    reused: int = 0
    skipped: list[SkippedFile] = field(default_factory=list)
    moved: int = 0  # renamed or moved files: their image kept its id under the new path (not counted as added)
    total: int = 0
    seconds: float = 0.0
    unchanged: int = 0
    embedded: int = 0
    cpu_seconds: float = 0.0  # this process plus the decode workers
    # CPU time of the threads that made the visual encoder calls (local runs; 0.0 where not measured, e.g. on Ray).
    # All of the encoder's CPU when each call runs on one onnxruntime thread, as `clipsearch index` runs them; a
    # session with an intra-op thread pool spends part of it on the pool's threads, which this leaves out.
    encode_cpu_seconds: float = 0.0
    collection: str = ""
    model_id: str = ""
    index_kind: str = ""
    index_update: str = ""  # "none" | "append" | "rebuild": what happened to the FAISS index
    tokens: str = ""  # how ITM image tokens are stored ("" when the collection stores none)
    token_bytes_per_image: int = 0
    tokens_added: int = 0  # indexed images that got their tokens in this run without being re-embedded
    rebuilt_roots: list[str] = field(default_factory=list)  # --rebuild: folders indexed before, walked beside PATHS
    vanished_roots: list[str] = field(default_factory=list)  # paths given that are gone: their images were removed

    def to_dict(self) -> dict:
        data = asdict(self)
        data["skipped"] = [{"path": s.path, "reason": s.reason} for s in self.skipped]
        data["seconds"] = round(self.seconds, 3)
        data["cpu_seconds"] = round(self.cpu_seconds, 3)
        data["encode_cpu_seconds"] = round(self.encode_cpu_seconds, 3)
        return data


@dataclass
class Plan:
    """What a run has to do, decided from size + mtime before any file is opened."""

    unchanged_ids: list[int] = field(default_factory=list)
    to_read: list[ReadTask] = field(default_factory=list)
    existing: dict[str, FileState] = field(default_factory=dict)  # path -> state, for changed known files
    still_bad: list[SkippedFile] = field(default_factory=list)  # unchanged files that failed before
    still_bad_paths: list[str] = field(default_factory=list)
    backfill: dict[str, FileState] = field(default_factory=dict)  # unchanged files read again for their tokens
    # content hash -> the indexed images whose files are gone from under the run's roots: a new path with those very
    # bytes is one of them moved or renamed, and keeps its id (and vector, tokens, thumbnail) under the new path.
    moves: dict[str, list[FileState]] = field(default_factory=dict)


def plan_token_backfill(plan: Plan, files: Sequence[FoundFile], store: Store) -> None:
    """Read again the unchanged files that have no stored tokens (a collection that starts storing them, or a
    run that was killed while adding them): their tokens are computed, their vectors kept."""
    if not plan.unchanged_ids:
        return
    missing = set(store.ids_without_tokens(plan.unchanged_ids))
    if not missing:
        return
    states = store.file_states()
    for found in files:
        state = states.get(found.path)
        if state is not None and state.id in missing and found.path not in plan.existing:
            plan.backfill[found.path] = state
            plan.to_read.append(ReadTask(found.path, found.size, found.mtime_ns, force_decode=True))


def make_plan(files: Sequence[FoundFile], store: Store, roots: Sequence[str] = ()) -> Plan:
    """`roots`: the paths the run covers (its sweep's); indexed files under them that are gone are `moves` sources."""
    states = store.file_states()
    bad = store.skipped_states()
    plan = Plan()
    if roots:
        seen = {found.path for found in files}
        exact = {root for root in roots if not is_url_path(root)}
        prefixes = tuple(root.rstrip("/") + "/" for root in exact)
        for path, state in states.items():
            if path not in seen and (path in exact or path.startswith(prefixes)) and not os.path.lexists(path):
                plan.moves.setdefault(state.content_hash, []).append(state)
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
    """The visual encoder stage: uint8 [H, W, 3] images -> L2-normalised float32 vectors, and with a token
    codec also each image's encoded ITM tokens, from the same call of the visual graph."""

    def __init__(self, model, codec: TokenCodec | None = None) -> None:
        self.model = model
        self.codec = codec
        spec: PreprocessSpec = model.preprocess
        self._scale = (1.0 / (255.0 * np.asarray(spec.std, dtype=np.float32))).reshape(1, 1, 1, 3)
        self._shift = (np.asarray(spec.mean, dtype=np.float32) / np.asarray(spec.std, dtype=np.float32)).reshape(1, 1, 1, 3)
        # [3, 256]: every uint8 value of each channel through the very float32 steps below (x * scale - shift), so
        # that a lookup gives the same bits in one pass (8 images at 256 px: 0.3 instead of 1.6 CPU ms per image).
        table = np.arange(256, dtype=np.float32).reshape(256, 1) * self._scale.reshape(1, 3)
        table -= self._shift.reshape(1, 3)
        self._table = np.ascontiguousarray(table.T)

    def prepare(self) -> None:
        """Open the visual session now (the runner does it while the decoders start)."""
        self.model.open_visual()

    def normalise(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 [H, W, 3] images -> float32 [N, 3, H, W], scaled and shifted by the model's mean and std."""
        shape = images[0].shape if len(images) else None
        if shape is None or len(shape) != 3 or shape[2] != 3 or any(
                image.dtype != np.uint8 or image.shape != shape for image in images):
            batch = np.stack(images).astype(np.float32)  # anything else: the same arithmetic, pixel by pixel
            batch *= self._scale
            batch -= self._shift
            return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
        out = np.empty((len(images), 3, shape[0], shape[1]), dtype=np.float32)
        for i, image in enumerate(images):
            for channel in range(3):
                np.take(self._table[channel], image[:, :, channel], out=out[i, channel])
        return out

    def encode(self, images: Sequence[np.ndarray]) -> np.ndarray:
        if not images:
            return np.zeros((0, self.model.embed_dim), dtype=np.float32)
        return self.model.encode_pixels(self.normalise(images), bad_rows_ok=True)  # such images: Writer leaves out

    def encode_with_tokens(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[bytes | None]]:
        """(vectors [N, D], one token blob per image: None without a codec)."""
        if self.codec is None or not images:
            return self.encode(images), [None] * len(images)
        vectors, tokens = self.model.encode_pixels_with_tokens(self.normalise(images), bad_rows_ok=True)
        return vectors, self.codec.encode(tokens)


UNUSABLE_VECTOR = "the model's output for this image is not a unit vector (NaN or zero): left out"


class Writer:
    """Writes rows + vectors to the store, one transaction per batch (a killed run loses only the batches still being
    encoded: at most one per encoder lane plus the one filling)."""

    def __init__(self, store: Store, model_id: str, run_id: int, dim: int, summary: IndexSummary,
                 codec: TokenCodec | None = None) -> None:
        self.store = store
        self.model_id = model_id
        self.run_id = run_id
        self.dim = dim
        self.summary = summary
        self.codec = codec  # set: every row written gets tokens
        self.hash_to_id: dict[str, int] = store.known_hashes()

    def vector_for_hash(self, content_hash: str) -> np.ndarray | None:
        image_id = self.hash_to_id.get(content_hash)
        return None if image_id is None else self.store.vector(image_id, self.dim)

    def reusable(self, content_hash: str) -> tuple[np.ndarray, bytes | None] | None:
        """The vector (and, when the collection stores tokens, the tokens) of an indexed image with these
        bytes, or None when there is none to copy (then the file is decoded and encoded)."""
        image_id = self.hash_to_id.get(content_hash)
        if image_id is None:
            return None
        vector = self.store.vector(image_id, self.dim)
        if vector is None:
            return None
        if self.codec is None:
            return vector, None
        blob = self.store.token_blobs([image_id]).get(image_id)
        if blob is None or len(blob) != self.codec.bytes_per_image:
            return None
        return vector, blob

    def write(self, results: Sequence[ReadResult], vectors: Sequence[np.ndarray], existing: dict[str, FileState],
              reused_flags: Sequence[bool], tokens: Sequence[bytes | None] | None = None) -> None:
        usable = unit_rows(np.stack(vectors)) if len(vectors) else []
        if not all(usable):  # the model's output for these images is unusable: they are left out, the rest written
            self.skip([(r.task, UNUSABLE_VECTOR) for r, ok in zip(results, usable) if not ok])
            keep = [i for i, ok in enumerate(usable) if ok]
            results, vectors = [results[i] for i in keep], [vectors[i] for i in keep]
            reused_flags = [reused_flags[i] for i in keep]
            tokens = [tokens[i] for i in keep] if tokens is not None else None
            if not results:
                return
        rows = []
        for result, vector, blob in zip(results, vectors, tokens or [None] * len(results)):
            task = result.task
            state = existing.get(task.path)
            rows.append(NewImage(path=task.path, size=task.size, mtime_ns=task.mtime_ns, content_hash=result.content_hash,
                                 width=result.width, height=result.height, taken_at=result.taken_at, vector=vector,
                                 id=state.id if state else None, tokens=blob))
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

    def write_tokens(self, rows: Sequence[tuple[int, bytes]], content_hashes: dict[int, str] | None = None) -> None:
        self.summary.tokens_added += self.store.write_tokens(rows, content_hashes)

    def move(self, result: ReadResult, source: FileState) -> None:
        """`result`'s new path is the indexed image `source` (the same bytes; its old path is gone): the row moves
        there, keeping its id, vector, tokens and cached thumbnail."""
        task = result.task
        self.store.move_image(source.id, task.path, task.size, task.mtime_ns, self.run_id, _now())
        self.summary.moved += 1

    def refresh_stat(self, result: ReadResult, state: FileState) -> None:
        """A known file whose size/mtime changed but whose bytes did not: just record the new stat (it counts as
        unchanged, so that added + updated + reused + unchanged covers every indexed path the run saw)."""
        self.store.touch([state.id], self.run_id, {state.id: (result.task.size, result.task.mtime_ns)})
        self.summary.unchanged += 1

    def skip(self, entries: Sequence[tuple[ReadTask, str]]) -> None:
        if not entries:
            return
        self.store.record_skipped([(t.path, t.size, t.mtime_ns, reason) for t, reason in entries], self.run_id)
        self.summary.skipped.extend(SkippedFile(t.path, reason) for t, reason in entries)


@dataclass
class _PendingBatch:
    """A batch handed to the encoder lanes and not yet written: `sources` says where each row's vector comes
    from ("encoded" slot, "duplicate" of an earlier row's slot, "known" (vector, tokens), or "pending": a hash an
    earlier pending batch is encoding, copied once that batch is written)."""

    results: list[ReadResult]
    sources: list[tuple[str, object]]
    encoded: Future  # -> (vectors [N, D], token blobs) of the "encoded" rows
    hashes: list[str]  # the content hashes this batch encodes


class BatchAssembler:
    """Turns reader results into writer calls: vectors by hash where possible, encoder batches otherwise.

    Encoder batches run on `lanes` (one inline call at a time without); up to one batch per lane is in flight
    while the next one fills, and batches are written in the order they were made, so ids follow the reader's
    order. `flush()` writes everything: call it before relying on the store.

    With several lanes and `expected` (how many results the reader will deliver), batches taper off over the
    last `lanes x batch_size` files (to a quarter of the batch, at least 2 images): lanes that pick up small
    batches as they come free finish within a small batch of each other, instead of one lane encoding a whole
    last batch while the other core waits."""

    def __init__(self, mapper: Mapper, writer: Writer, existing: dict[str, FileState], batch_size: int,
                 backfill: dict[str, FileState] | None = None, lanes: EncoderLanes | None = None,
                 expected: int | None = None, moves: dict[str, list[FileState]] | None = None) -> None:
        self.mapper = mapper
        # Plan.moves: each image taken by one new path with its bytes (two renamed copies keep both their ids)
        self.moves = {content_hash: list(states) for content_hash, states in (moves or {}).items()}
        self.writer = writer
        self.existing = existing
        self.backfill = backfill or {}  # unchanged indexed files read again for their tokens only
        self.batch_size = max(1, batch_size)
        self.lanes = lanes if lanes is not None else EncoderLanes(0)
        self.expected = expected
        self.received = 0  # results passed to add()
        self.to_encode: list[ReadResult] = []
        # (id, pixels, the file's content hash to record with the tokens: an imported row's real one, else None)
        self.to_tokenise: list[tuple[int, np.ndarray, str | None]] = []
        self.retry: list[ReadTask] = []  # known-hash files whose vector went away: decode them after all
        self.pending: deque[_PendingBatch] = deque()
        self._pending_hashes: set[str] = set()

    @property
    def encode_seconds(self) -> float:
        return self.lanes.seconds

    def batch_limit(self) -> int:
        """How many images the filling batch may hold now: the batch size, or less near the end of the run."""
        if self.expected is None or self.lanes.lanes < 2:
            return self.batch_size
        remaining = self.expected - self.received  # results the reader has still to deliver
        if remaining >= self.lanes.lanes * self.batch_size:
            return self.batch_size
        return max(min(2, self.batch_size), self.batch_size // 4)

    def add(self, result: ReadResult) -> None:
        self.received += 1
        if result.error is not None:
            self.writer.skip([(result.task, result.error)])
            return
        filling = self.backfill.get(result.task.path)
        if filling is not None:
            # An imported row (import-embeddings) has no hash of its file's bytes, only a stand-in: its file, under
            # the size and mtime recorded at import, is the one its vector came from. It keeps that vector, as the
            # README promises, and gets the real hash.
            imported = filling.content_hash.startswith(IMPORTED_HASH_PREFIX)
            if (filling.content_hash == result.content_hash or imported) and result.pixels is not None:
                self.to_tokenise.append((filling.id, result.pixels, result.content_hash if imported else None))
                if len(self.to_tokenise) >= self.batch_size:
                    self.flush_tokens()
                return
            self.existing[result.task.path] = filling  # other bytes under the same size and mtime: re-embed
            self.writer.summary.unchanged -= 1  # counted as unchanged by the plan, it is updated instead
        state = self.existing.get(result.task.path)
        if state is not None and state.content_hash == result.content_hash:
            self.writer.refresh_stat(result, state)
            return
        sources = self.moves.get(result.content_hash) if state is None else None
        if sources:
            self.writer.move(result, sources.pop(0))  # a renamed or moved file: the same image under its new path
            return
        if result.known:
            reusable = self.writer.reusable(result.content_hash)
            if reusable is None:
                self.retry.append(ReadTask(result.task.path, result.task.size, result.task.mtime_ns, force_decode=True))
                return
            source = self.writer.store.get(self.writer.hash_to_id[result.content_hash])
            filled = ReadResult(result.task, result.content_hash, source.width if source else None,
                                source.height if source else None, source.taken_at if source else None)
            self.writer.write([filled], [reusable[0]], self.existing, [True], [reusable[1]])
            return
        self.to_encode.append(result)
        if len(self.to_encode) >= self.batch_limit():
            self._submit()
            self._write_ready(keep=self.lanes.lanes)

    def flush_tokens(self) -> None:
        """Tokens of already indexed, unchanged images (their vectors are not touched)."""
        if not self.to_tokenise:
            return
        batch, self.to_tokenise = self.to_tokenise, []
        pixels = [pixels for _, pixels, _ in batch]
        _, blobs = self.lanes.submit(lambda: self.mapper.encode_with_tokens(pixels)).result()
        self.writer.write_tokens([(image_id, blob) for (image_id, _, _), blob in zip(batch, blobs) if blob is not None],
                                 {image_id: digest for image_id, _, digest in batch if digest is not None})

    def flush(self, while_encoding: Callable[[], None] | None = None) -> None:
        """Encode what is buffered and write every pending batch; `while_encoding` runs once the last batches are
        handed to the lanes, before waiting for them (work for this thread meanwhile)."""
        self.flush_tokens()
        if self.to_encode:
            # The last, partial batch is shared out among the lanes (at least 2 images per call).
            rows, self.to_encode = self.to_encode, []
            parts = max(1, min(self.lanes.lanes, len(rows) // 2))
            size = -(-len(rows) // parts)
            for start in range(0, len(rows), size):
                self.to_encode = rows[start:start + size]
                self._submit()
        if while_encoding is not None:
            while_encoding()
        self._write_ready(keep=0)

    def _submit(self) -> None:
        batch, self.to_encode = self.to_encode, []
        # Identical bytes within a batch are encoded once; a hash embedded by an earlier batch is copied.
        unique: dict[str, int] = {}
        encode_rows: list[ReadResult] = []
        sources: list[tuple[str, object]] = []
        for result in batch:
            content_hash = result.content_hash
            slot = unique.get(content_hash)
            if slot is not None:
                sources.append(("duplicate", slot))
                continue
            if content_hash in self._pending_hashes:
                sources.append(("pending", None))
                continue
            known = self.writer.reusable(content_hash) if content_hash in self.writer.hash_to_id else None
            if known is not None:
                sources.append(("known", known))
                continue
            unique[content_hash] = len(encode_rows)
            sources.append(("encoded", len(encode_rows)))
            encode_rows.append(result)
        pixels = [r.pixels for r in encode_rows]
        encoded = self.lanes.submit(lambda: self.mapper.encode_with_tokens(pixels))
        self._pending_hashes.update(unique)
        self.pending.append(_PendingBatch(batch, sources, encoded, list(unique)))

    def _write_ready(self, keep: int) -> None:
        """Write pending batches in order: every finished one at the front, and older ones (waiting for them)
        until at most `keep` are left."""
        while self.pending and (len(self.pending) > keep or self.pending[0].encoded.done()):
            self._write(self.pending.popleft())

    def _write(self, item: _PendingBatch) -> None:
        encoded, encoded_tokens = item.encoded.result()
        vectors: list[np.ndarray] = []
        tokens: list[bytes | None] = []
        for result, (kind, source) in zip(item.results, item.sources):
            if kind == "pending":
                # An earlier batch encoded these bytes and has been written (batches are written in order).
                source = self.writer.reusable(result.content_hash)
                if source is None:  # it could not be copied after all (e.g. its tokens were not stored)
                    vector, blob = self.mapper.encode_with_tokens([result.pixels])
                    source = (vector[0], blob[0])
                kind = "known"
            if kind == "known":
                vectors.append(source[0])
                tokens.append(source[1])
            else:
                vectors.append(encoded[source])
                tokens.append(encoded_tokens[source])
        reused = [kind != "encoded" for kind, _ in item.sources]
        self.writer.write(item.results, vectors, self.existing, reused, tokens)
        self._pending_hashes.difference_update(item.hashes)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
