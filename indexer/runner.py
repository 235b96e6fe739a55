"""Runners drive reader -> mapper -> writer. `LocalRunner` decodes in worker processes on this machine while
the main process runs the encoder; a distributed runner (Ray) would replace only this module.

A run is crash-safe: rows and vectors are committed to SQLite per batch, the sweep of vanished files
happens only after every file was seen, and the FAISS index is rebuilt from SQLite at the end (or by
the next run / `Collection.load_vectors` if this one was killed), so `clipsearch check` passes once an
interrupted run has been resumed.

`--rebuild` indexes into a new generation of the collection (`Collection.start_rebuild`) while the old one
keeps serving searches, and switches to it atomically only once the new one is complete and its FAISS
index saved (`Collection.finish_rebuild`); a killed or failed rebuild leaves the old collection as it was.

`LocalRunner.update` is the same run over only the paths a watcher saw change (`walk.walk_changes`): their files
are planned, read, reused by content hash and written exactly as a full run's, and the sweep covers only those
paths, so a rename copies the vector of the file it was (its old path is swept in the same run).

ITM image tokens (models with an ITM head, `Collection.choose_tokens`): written with each image's vector in
the same transaction; unchanged images that have none are read again for them (vectors kept), so turning
tokens on for an indexed collection, or resuming a killed run that was adding them, is incremental.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Iterator, Sequence

from clipsearch.store.collection import Collection
from clipsearch.errors import CollectionError, UnreadableStoreError
from clipsearch.store.database import SkippedFile
from clipsearch.store.index.vectors import preload_faiss
from clipsearch.paths import is_url_path

from .pipeline import (BatchAssembler, IndexOptions, IndexSummary, Mapper, ProgressCallback, Writer, make_plan,
                       plan_token_backfill)
from .cores import CoreTokens
from .lanes import EncoderLanes
from .reader import ParallelReader, StartedDecoders, worker_count
from .walk import WalkResult, inside, walk


@dataclass(frozen=True)
class EmbedCost:
    """What a runner's embedding step measured: wall seconds spent encoding, CPU seconds spent outside this
    process (decoder workers), and CPU seconds of the threads that made the encoder calls (0.0 where not measured:
    see IndexSummary.encode_cpu_seconds)."""

    encode_seconds: float = 0.0
    worker_cpu_seconds: float = 0.0
    encode_cpu_seconds: float = 0.0


@dataclass(frozen=True)
class RunTimings:
    walk_seconds: float
    encode_seconds: float
    index_seconds: float


class LocalRunner:
    """`decoders`: decoder processes the caller started ahead of the run (`reader.StartedDecoders`), adopted by
    the first run that reads files; the caller closes the handle, which stops any no run adopted."""

    def __init__(self, options: IndexOptions = IndexOptions(), decoders: StartedDecoders | None = None) -> None:
        self.options = options
        self.decoders = decoders
        self.last_timings: RunTimings | None = None
        self.last_token_choice = None  # the TokenChoice of the last run (the CLI prints its reason)

    def run(self, collection: Collection, model, roots: Sequence[str | Path],
            progress: ProgressCallback | None = None) -> IndexSummary:
        """Index `roots` into `collection` with `model` (a `clipsearch.model.runtime.ClipModel`)."""
        model.check_image_side()  # before anything is written: a changed tower's vectors never get its id
        with collection.writer_lock():
            try:
                first = collection.model is None
            except CollectionError:  # unreadable (--rebuild only): not a first run
                first = False
            try:
                return self._run(collection, model, roots, progress)
            except BaseException:
                # A first run that failed or was stopped before it wrote an image leaves no empty collection behind
                # (it would be listed, served and fail `check`), also once it had bound its model.
                collection.discard_if_unbound(even_if_bound=first)
                raise

    def update(self, collection: Collection, model, changes: WalkResult,
               progress: ProgressCallback | None = None) -> IndexSummary:
        """Bring the index in line with the paths in `changes.roots` (from `walk.walk_changes`) and nothing else:
        new, changed and renamed files among `changes.files` are indexed, and whatever the index holds under those
        paths that is no longer there is removed. The collection must have been indexed (its model bound); the
        paths are not recorded as indexed roots (they lie inside ones that are). Not for --rebuild."""
        if self.options.rebuild:
            raise ValueError("update() does not rebuild; run() with rebuild=True does")
        started = time.perf_counter()
        cpu_started = time.process_time()
        model.check_image_side()  # a stat per file once it was hashed
        with collection.writer_lock():
            current = collection.require_model()
            if current.model_id != model.model_id:
                collection.bind_model(model.info)  # raises: another model's vectors are never mixed in
            tokens = collection.choose_tokens(model, None)  # as the collection's last full run decided
            self.last_token_choice = tokens
            return self._index_into(collection, model, changes, progress, started, cpu_started, tokens.codec,
                                    record_roots=False)

    def _run(self, collection: Collection, model, roots: Sequence[str | Path],
             progress: ProgressCallback | None) -> IndexSummary:
        options = self.options
        started = time.perf_counter()
        cpu_started = time.process_time()
        try:
            current, unreadable = collection.model, False
        except UnreadableStoreError:
            if not options.rebuild:
                raise
            current, unreadable = None, True  # rebuilt into a new generation like any other; nothing carries over
        if current is not None and current.model_id != model.model_id and not options.rebuild:
            collection.bind_model(model.info)  # raises: another model's vectors are never mixed in
        opening = self._open_encoder_early(model) if current is None else None
        try:
            return self._walk_and_index(collection, model, roots, progress, started, cpu_started, current, unreadable)
        finally:
            if opening is not None:
                opening.join()  # an error path must not leave it running into the interpreter's shutdown

    def _walk_and_index(self, collection: Collection, model, roots: Sequence[str | Path],
                        progress: ProgressCallback | None, started: float, cpu_started: float,
                        current, unreadable: bool = False) -> IndexSummary:
        """`unreadable`: the collection's database cannot be read (--rebuild only): the run builds a new generation
        and switches to it, as a rebuild does, but with nothing carried over."""
        options = self.options
        also: list[str] = []
        if options.rebuild and current is not None and not unreadable:
            # "Re-embed everything": the folders indexed before are walked too, not only the paths given (the new
            # generation would otherwise drop every image outside them).
            also, absent = _other_roots(collection.store.indexed_roots(), roots)
            imported = collection.store.count_imported()
            if imported and not options.forget_missing:
                raise CollectionError(
                    f"collection {collection.name!r} holds {imported:,} image{'s' * (imported != 1)} brought in by "
                    "import-embeddings, whose vectors came with them: a rebuild cannot embed them again (URL rows, "
                    "files elsewhere, or another model's vectors) and would leave them out",
                    f"Index their folders first (clipsearch index FOLDER --collection {collection.name}: files there are "
                    "then embedded like any other), or add --forget-missing to rebuild without them (and import the "
                    "new model's embeddings again).")
            if absent and not options.forget_missing:
                raise CollectionError(
                    f"collection {collection.name!r} also holds images from {', '.join(absent)}, which "
                    f"{'is' if len(absent) == 1 else 'are'} not there now (an unplugged disk or share?): a rebuild "
                    "would leave them out", "Make them available and run again, or add --forget-missing to rebuild "
                    "without their images.")
        walked = self._walk([*roots, *also])
        if not unreadable:
            _note_vanished(walked, collection.store, options.forget_missing)
        given = {os.path.abspath(str(r)) for r in roots}
        if not any(r in given for r in walked.roots):  # checked before --rebuild starts anything
            raise CollectionError("nothing to index: " + "; ".join(f"{p}: {r}" for p, r in walked.problems
                                                                    if p in given))
        # Chosen before --rebuild starts: the old choice carries over (an unreadable database has none to give).
        tokens = None if unreadable else collection.choose_tokens(model, options.tokens)
        rebuilding = options.rebuild and (current is not None or unreadable)  # else there is nothing to keep serving
        if rebuilding:
            target = collection.start_rebuild(model.info)  # searchers keep using the old generation
        else:
            target = collection
            target.bind_model(model.info)
        if tokens is None:
            tokens = target.choose_tokens(model, options.tokens)
        self.last_token_choice = tokens
        target.apply_tokens(tokens)
        try:
            summary = self._index_into(target, model, walked, progress, started, cpu_started, tokens.codec)
        except BaseException:
            if rebuilding:
                target.close()  # the half-built generation is removed by the next run on the collection
            raise
        if rebuilding:
            if not unreadable:
                summary.removed += _left_behind(collection, target)
            collection.finish_rebuild(target)
        summary.rebuilt_roots = also
        summary.vanished_roots = walked.vanished
        return summary

    # -- the steps another runner replaces (see indexer/ray_runner.py) -----------------------------------------------
    def _open_encoder_early(self, model) -> threading.Thread | None:
        """A collection's first run reads every file it finds: open the visual session now, on a thread, beside the
        walk and the planning, so that the first batch does not wait for it (in traces it did, by about 0.1 s, once
        the decoders were started early). Errors are left to the run's own open, which raises them again."""

        def open_quietly() -> None:
            try:
                model.open_visual()
            except Exception:  # noqa: BLE001 - reported by the first batch, which opens the session again
                pass

        thread = threading.Thread(target=open_quietly, name="clipsearch-open-encoder", daemon=True)
        thread.start()
        return thread

    def _walk(self, roots: Sequence[str | Path]) -> WalkResult:
        """The files under `roots` (local folders here)."""
        return walk(roots, self.options.walk_options())

    def _embed(self, model, codec, plan, writer: Writer, progress: ProgressCallback | None) -> EmbedCost:
        """Read, decode and encode `plan.to_read` and hand every result to `writer`; returns what that cost.
        Here: decoder processes feeding the encoder in batches."""
        options = self.options
        worker_cpu = 0.0
        total = len(plan.to_read)
        done = 0
        if progress:
            progress(0, total)
        if not plan.to_read:
            return EmbedCost()
        mapper = Mapper(model, codec)
        started, self.decoders = self.decoders, None
        with self._core_tokens(started) as core_tokens, EncoderLanes(options.encoder_lanes, core_tokens) as lanes:
            # Loads the graph while the decoder processes start; an error is raised again by the first batch.
            lanes.submit(mapper.prepare, hold_token=False)
            assembler = BatchAssembler(mapper, writer, plan.existing, options.batch_size, plan.backfill, lanes,
                                       expected=len(plan.to_read), moves=plan.moves)
            with ParallelReader(model.preprocess, writer.hash_to_id.keys(), workers=options.workers,
                                chunk_size=options.chunk_size, nice=options.worker_nice, started=started,
                                core_tokens=core_tokens) as reader:
                for result in reader.read(plan.to_read):
                    worker_cpu += result.cpu_seconds
                    assembler.add(result)
                    done += 1
                    if progress and (done % 8 == 0 or done == total):
                        progress(done, total)
                assembler.flush(while_encoding=preload_faiss)
                if assembler.retry:
                    retry, assembler.retry = assembler.retry, []
                    for result in ParallelReader(model.preprocess, (), workers=0).read(retry):
                        assembler.add(result)
                    assembler.flush()
        return EmbedCost(assembler.encode_seconds, worker_cpu, lanes.cpu_seconds)

    def _core_tokens(self, started: StartedDecoders | None) -> ContextManager[CoreTokens | None]:
        """With `share_cores`: one core token per lane, shared with the decoder processes (indexer/cores.py), those
        the started processes were given or new ones (closed with the block); else none."""
        options = self.options
        if not options.share_cores:
            return nullcontext(None)
        if started is not None and started.core_tokens is not None:
            return nullcontext(started.core_tokens)  # closed by their owner
        if options.encoder_lanes and worker_count(options.workers):
            return CoreTokens(options.encoder_lanes)
        return nullcontext(None)

    def _index_into(self, collection: Collection, model, walked: WalkResult, progress: ProgressCallback | None,
                    started: float, cpu_started: float, codec=None, record_roots: bool = True) -> IndexSummary:
        options = self.options
        store = collection.store
        summary = IndexSummary(collection=collection.name, model_id=model.model_id)
        summary.skipped.extend(SkippedFile(p, r) for p, r in walked.problems)
        walk_seconds = time.perf_counter() - started

        run_id = store.next_run_id()
        if record_roots:
            store.record_roots([r for r in walked.roots if not is_url_path(r) and r not in walked.vanished])
            store.forget_roots(walked.vanished)  # URLs: no folder to show; vanished ones: none any more
        plan = make_plan(walked.files, store, walked.roots)
        store.touch(plan.unchanged_ids, run_id)
        store.touch_skipped(plan.still_bad_paths, run_id)
        summary.unchanged = len(plan.unchanged_ids)
        summary.skipped.extend(plan.still_bad)
        if codec is not None:
            plan_token_backfill(plan, walked.files, store)
            summary.tokens, summary.token_bytes_per_image = codec.storage, codec.bytes_per_image

        writer = Writer(store, model.model_id, run_id, model.embed_dim, summary, codec)
        try:
            cost = self._embed(model, codec, plan, writer, progress)
            summary.removed = store.sweep(walked.roots, run_id)
        except BaseException:
            # Even when interrupted, leave FAISS in agreement with what SQLite committed (not worth it for
            # a rebuild's new generation: an interrupted one is never switched to).
            if not options.rebuild:
                try:
                    with signals_held():
                        collection.update_vectors(options.ivf_threshold)
                except Exception:  # e.g. the disk that stopped the run is still full: report what stopped it
                    pass  # (the next run completes the index)
            raise
        index_started = time.perf_counter()
        with signals_held():  # an IVF-PQ update takes seconds: a stop then waits for it, never leaves it half done
            sync = collection.update_vectors(options.ivf_threshold)
        index_seconds = time.perf_counter() - index_started
        if summary.removed or summary.updated or summary.reused:
            collection.prune_thumbnails()  # the server's cached thumbnails of images gone or changed
        summary.total = store.count()
        index_meta = sync.index.meta if sync.index is not None else None
        summary.index_kind = index_meta.layout.kind if index_meta else (collection.stats().index_kind or "")
        summary.index_update = sync.update
        summary.seconds = time.perf_counter() - started
        summary.cpu_seconds = time.process_time() - cpu_started + cost.worker_cpu_seconds
        summary.encode_cpu_seconds = cost.encode_cpu_seconds
        self.last_timings = RunTimings(walk_seconds, cost.encode_seconds, index_seconds)
        return summary


_HELD_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP wait until the block is done, then act as they would have (the first one that
    came): what SQLite committed and the FAISS index are never left disagreeing by a stop in between. A second
    stop acts at once (the index is then behind, as after a kill, and the next run completes it). Outside the
    main thread (an embedding program) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum: int, _frame: object) -> None:
        if pending:  # a second stop: at once (a long IVF-PQ retrain); the next run completes the index
            for held, handler in previous.items():
                signal.signal(held, handler)
            _act_on(previous[signum], signum)
            return
        try:
            print("finishing the vector index so that it agrees with the database… (stop again to stop at once; "
                  "the next run completes it)", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass
        pending.append(signum)

    previous = {signum: signal.signal(signum, hold) for signum in _HELD_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if pending:
        _act_on(previous[pending[0]], pending[0])


def _act_on(handler, signum: int) -> None:
    """Do what `handler` (a signal's previous disposition) does for `signum`."""
    if callable(handler):
        handler(signum, None)  # Python's default SIGINT handler raises KeyboardInterrupt
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)


def index_paths(collection: Collection, model, roots: Sequence[str | Path], options: IndexOptions = IndexOptions(),
                progress: ProgressCallback | None = None) -> IndexSummary:
    """Convenience entry point: run the local runner once."""
    return LocalRunner(options).run(collection, model, roots, progress)


def _other_roots(recorded: dict[str, str], given: Sequence[str | Path]) -> tuple[list[str], list[str]]:
    """The roots of `recorded` (a collection's indexed roots) that no path of `given` covers, in order, and no root of
    another: (those that are there, those that are not)."""
    covered = [os.path.abspath(str(p)) for p in given if not is_url_path(str(p))]
    others = [root for root in recorded if not any(inside(root, folder) for folder in covered)]
    topmost = [root for root in others if not any(other != root and inside(root, other) for other in others)]
    return ([root for root in topmost if os.path.exists(root)],
            [root for root in topmost if not os.path.exists(root)])


def _left_behind(old: Collection, new: Collection) -> int:
    """How many images of `old`'s generation the rebuilt one `new` does not hold (their files or folders are gone,
    or they were imported rows with no file to embed again): the rebuild removes them."""
    from clipsearch.store.collection import STORE_FILE

    conn = new.store.conn
    conn.execute("ATTACH DATABASE ? AS previous", [str(old.folder / STORE_FILE)])
    try:
        return int(conn.execute("SELECT COUNT(*) FROM previous.images WHERE path NOT IN (SELECT path FROM main.images)"
                                ).fetchone()[0])
    finally:
        conn.execute("DETACH DATABASE previous")


def _note_vanished(walked: WalkResult, store, forget: bool) -> None:
    """Roots that are gone but hold images in the collection: with `forget` (--forget-missing) they become roots of
    the run, so the sweep removes their images; else their problem says how many images they keep and how to remove
    them (a root that is gone may be an unplugged disk: never forgotten unasked)."""
    problems = []
    for path, reason in walked.problems:
        gone = reason == "no such file or folder" or reason.startswith("dangling symlink")  # (a link to a deleted folder)
        held = store.count_under(path) if gone and not is_url_path(path) else 0
        if held and forget:
            walked.roots.append(path)
            walked.vanished.append(path)
        elif held:
            them = "them" if held != 1 else "it"
            problems.append((path, f"{reason}; the collection keeps its {held:,} image{'s' * (held != 1)} "
                                   f"(--forget-missing removes {them})"))
        else:
            problems.append((path, reason))
    walked.problems[:] = problems
