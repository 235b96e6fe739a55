"""Watch mode: keep a collection current with filesystem events (`clipsearch watch`, `clipsearch index --watch`).

watchdog's observer (inotify, FSEvents, ReadDirectoryChangesW; a thread of its own) hands every event under a
root to a `ChangeQueue`, which keeps the changed paths. A batch is taken once no event came for `debounce`
seconds, or `max_delay` seconds after its first event if they keep coming, and indexed by `LocalRunner.update`:
the crash-safe pipeline of `clipsearch index` run over only the changed paths (new and changed files embedded,
renamed ones reusing their vector by content hash, vanished ones swept), on the thread that called `run`.
Every `rescan_interval` seconds a full incremental run over the roots catches whatever events missed (an
overflowing kernel queue, a network share that sends none).

The observer starts before the first full run, so nothing that changes while that run walks is lost: it is
the first batch after it. Stopping (`Watcher.stop`, from a signal handler or another thread) lets a batch in
progress finish; an exception raised into the run (Ctrl-C) abandons it the way it stops `clipsearch index`,
leaving SQLite and FAISS in agreement, and the next start of the watcher catches up with a full run.
"""

from __future__ import annotations

import os
import threading
from stat import S_ISDIR, S_ISREG
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from clipsearch.errors import ClipsearchError, CollectionError
from clipsearch.store.collection import Collection

from .pipeline import IndexOptions, IndexSummary
from .runner import LocalRunner
from .walk import WalkOptions, might_hold_images, walk_changes

# Event kinds that say nothing about content (watchdog's event_type values).
_IGNORED_EVENTS = frozenset({"opened", "closed_no_write"})
# On a folder these only say that an entry inside changed, which has an event of its own.
_IGNORED_FOLDER_EVENTS = frozenset({"modified", "attrib", "closed"})
_POLL_SECONDS = 0.2  # how often a waiting watcher looks at its stop flag
# How often the roots are looked at: a root deleted and made again is a new folder the old watch does not see.
ROOT_CHECK_SECONDS = 2.0


@dataclass(frozen=True)
class WatchOptions:
    debounce: float = 1.0  # seconds without events that close a batch
    max_delay: float = 5.0  # seconds a batch waits at most after its first event, however busy the folder
    rescan_interval: float = 300.0  # seconds between full incremental runs over the roots; 0 = never
    retry_delay: float = 5.0  # seconds before a batch that failed (e.g. another indexer holds the lock) is retried


@dataclass(frozen=True)
class ChangedPath:
    """A path that changed (created, modified, deleted, renamed from or to), with the root it lies in."""

    root: str
    path: str


@dataclass(frozen=True)
class WatchReport:
    """One indexing run of a watcher. kind: "initial" (the full run at start), "changes" (a batch of changed
    paths), "rescan" (a periodic full run)."""

    kind: str
    summary: IndexSummary
    paths: int = 0  # changed paths of a "changes" batch


@dataclass
class WatchTotals:
    """What a watcher did since it started, its first full run included."""

    runs: int = 0
    batches: int = 0
    embedded: int = 0  # images run through the visual encoder
    reused: int = 0  # images whose vector was copied from indexed bytes (copies)
    moved: int = 0  # renamed or moved files: the same image under a new path
    removed: int = 0
    failures: int = 0  # batches that failed and were queued again

    def add(self, report: WatchReport) -> None:
        self.runs += 1
        self.batches += report.kind == "changes"
        self.embedded += report.summary.embedded
        self.reused += report.summary.reused
        self.moved += report.summary.moved
        self.removed += report.summary.removed


class ChangeQueue:
    """Changed paths collected from the observer thread, handed out in debounced batches. Thread-safe."""

    def __init__(self, debounce: float, max_delay: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.debounce = max(0.0, debounce)
        self.max_delay = max(self.debounce, max_delay)
        self._clock = clock
        self._pending: dict[str, ChangedPath] = {}
        self._first = 0.0  # when the oldest pending change arrived
        self._last = 0.0  # when the newest did
        self._not_before = 0.0  # a batch put back after a failure waits until then
        self._cond = threading.Condition()

    def add(self, changes: Sequence[ChangedPath]) -> None:
        if not changes:
            return
        with self._cond:
            now = self._clock()
            if not self._pending:
                self._first = now
            self._last = now
            for change in changes:
                self._pending.setdefault(change.path, change)
            self._cond.notify_all()

    def put_back(self, changes: Sequence[ChangedPath], delay: float) -> None:
        """Queue a batch that could not be indexed again, to be handed out no sooner than `delay` from now."""
        with self._cond:
            now = self._clock()
            if not self._pending:
                self._first = self._last = now
            for change in changes:
                self._pending.setdefault(change.path, change)
            self._not_before = now + delay
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._pending)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def take(self, until: float | None, stop: threading.Event) -> list[ChangedPath] | None:
        """Wait for a batch: the pending changes once `debounce` passed without a new one (or `max_delay` since the
        first), sorted, each path without the paths under it. None when `stop` is set or the clock reached
        `until` first (None: wait without end)."""
        with self._cond:
            while not stop.is_set():
                now = self._clock()
                if self._pending and now >= self._not_before:
                    due = min(self._last + self.debounce, self._first + self.max_delay)
                    if now >= due:
                        batch, self._pending = self._pending, {}
                        self._not_before = 0.0
                        return _outermost(batch)
                else:
                    due = self._not_before if self._pending else float("inf")
                if until is not None and now >= until:
                    return None
                wait = min(due, until if until is not None else float("inf")) - now
                self._cond.wait(min(max(wait, 0.0), _POLL_SECONDS))
            return None


def _outermost(pending: dict[str, ChangedPath]) -> list[ChangedPath]:
    """The changes sorted by path, leaving out paths inside another changed path (its walk covers them)."""
    kept: list[ChangedPath] = []
    for path in sorted(pending):
        if kept and path.startswith(kept[-1].path.rstrip(os.sep) + os.sep):
            continue
        kept.append(pending[path])
    return kept


class _EventHandler:
    """Turns watchdog events under one root into `ChangedPath`s (watchdog calls `dispatch` on its thread). Events
    that cannot touch the index are dropped here: files a walk of the root would not consider (other suffixes,
    hidden, excluded), and folder events that only say an entry inside changed."""

    def __init__(self, root: str, is_file: bool, options: WalkOptions, queue: ChangeQueue,
                 root_gone: Callable[[str], None] | None = None) -> None:
        self.root = root
        self.is_file = is_file  # the root is one file: its parent folder is watched, other entries ignored
        self.options = options
        self.queue = queue
        self.root_gone = root_gone  # told when the watched folder itself is deleted or moved away (its watch ends)

    def dispatch(self, event) -> None:
        kind = event.event_type
        if (not self.is_file and self.root_gone is not None and kind in ("deleted", "moved")
                and os.path.abspath(os.fsdecode(event.src_path)) == self.root):
            self.root_gone(self.root)
        if kind in _IGNORED_EVENTS or (event.is_directory and kind in _IGNORED_FOLDER_EVENTS):
            return
        paths = [event.src_path]
        if kind == "moved" and getattr(event, "dest_path", None):
            paths.append(event.dest_path)
        changes = []
        for raw in paths:
            path = os.path.abspath(os.fsdecode(raw))
            if self.is_file:
                if path == self.root:
                    changes.append(ChangedPath(self.root, path))
            elif might_hold_images(self.root, path, event.is_directory, self.options):
                changes.append(ChangedPath(self.root, path))
        self.queue.add(changes)


def _workers_for(files: int, options: IndexOptions) -> int:
    """Decoder processes for a batch of `files`: as configured, but no more than it has chunks (each start costs
    an interpreter), and none when nothing is read; at least one when something is, unless configured to none."""
    if options.workers == 0 or files == 0:
        return 0
    configured = options.workers if options.workers is not None else (os.cpu_count() or 1)
    return max(1, min(configured, -(-files // max(1, options.chunk_size))))


class Watcher:
    """Indexes `roots` into `collection`, then keeps them indexed until stopped. `run` blocks (call it on the thread
    that should run the indexing: decoder processes are tied to it); `stop` may be called from anywhere."""

    def __init__(self, collection: Collection, model, roots: Sequence[str | Path],
                 options: IndexOptions = IndexOptions(), watch: WatchOptions = WatchOptions(),
                 report: Callable[[WatchReport], None] | None = None,
                 failed: Callable[[ClipsearchError], None] | None = None) -> None:
        self.collection = collection
        self.model = model
        self.roots = [os.path.abspath(os.fspath(root)) for root in roots]
        self.options = options
        self.watch = watch
        self.report = report
        self.failed = failed  # told about a batch that failed and was queued again
        self.queue = ChangeQueue(watch.debounce, watch.max_delay)
        self.totals = WatchTotals()
        self.ready = threading.Event()  # set once the first full run is done (events are followed from then on)
        # "starting" | "initial" | "idle" | "changes" | "rescan" | "stopped": what the run is doing now
        self.phase = "starting"
        self._stop = threading.Event()
        self._failures = 0  # runs that failed in a row
        self._armed: dict[str, tuple[object, tuple[int, int]]] = {}  # root -> (its watch, the watched folder's id)
        # Roots whose folder was deleted or moved away (told by the observer's thread; set.add is atomic): their
        # watch is over even when a new folder of the same name gets the old one's inode number.
        self._gone: set[str] = set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        """End `run` after the batch in progress (if any); safe from a signal handler or another thread."""
        self._stop.set()

    def run(self) -> WatchTotals:
        observer = self._start_observer()
        try:
            self.phase = "initial"
            self._full_run("initial", LocalRunner(self.options))
            updates = LocalRunner(replace(self.options, rebuild=False))  # --rebuild is for the first run only
            interval = self.watch.rescan_interval
            next_rescan = time.monotonic() + interval if interval > 0 else None
            next_root_check = time.monotonic() + ROOT_CHECK_SECONDS
            while not self._stop.is_set():
                self.phase = "idle"
                until = next_root_check if next_rescan is None else min(next_rescan, next_root_check)
                batch = self.queue.take(until, self._stop)
                if self._stop.is_set():
                    break
                if batch is None and (next_rescan is None or time.monotonic() < next_rescan):
                    self._arm_roots(observer, announce=True)
                    next_root_check = time.monotonic() + ROOT_CHECK_SECONDS
                    continue
                if batch is None:
                    self.phase = "rescan"
                    retry = self._full_run("rescan", updates)
                    next_rescan = time.monotonic() + (retry or interval)
                    continue
                self.phase = "changes"
                self._update(updates, batch)
        finally:
            self.phase = "stopped"
            observer.stop()
            observer.join(timeout=5)
        return self.totals

    def _start_observer(self):
        from watchdog.observers import Observer

        observer = Observer()
        self._arm_roots(observer, announce=False)  # a missing root is reported by the first run (refused if all are)
        try:
            observer.start()
        except OSError as exc:  # e.g. the inotify watch limit
            raise CollectionError(f"cannot watch {', '.join(self.roots)}: {exc.strerror or exc}",
                                  "On Linux, raise fs.inotify.max_user_watches (sysctl), or watch fewer folders.") \
                from exc
        return observer

    def _arm_roots(self, observer, announce: bool) -> None:
        """Watch each root that exists and is not watched as it is now: a root that was missing, or that was deleted
        and made again (a new folder the old watch does not see). With `announce`, a root watched anew is queued as
        a change, so that what it holds now is indexed (and what it no longer holds swept) without a rescan."""
        walk_options = self.options.walk_options()
        for root in self.roots:
            try:
                is_file = S_ISREG(os.stat(root).st_mode)
                folder = os.path.dirname(root) if is_file else root
                found = os.stat(folder)
                identity = (found.st_dev, found.st_ino) if S_ISDIR(found.st_mode) else None
            except OSError:  # missing
                is_file, folder, identity = False, root, None
            armed = self._armed.get(root)
            if armed is not None and armed[1] == identity and root not in self._gone:
                continue
            self._gone.discard(root)
            if armed is not None:
                del self._armed[root]
                try:
                    observer.unschedule(armed[0])
                except (KeyError, OSError, AttributeError):  # its folder is gone, and its watch with it
                    pass
            if identity is None:
                continue
            watch = observer.schedule(_EventHandler(root, is_file, walk_options, self.queue, self._gone.add), folder,
                                      recursive=not is_file)
            self._armed[root] = (watch, identity)
            if announce:
                self.queue.add([ChangedPath(root, root)])

    def _full_run(self, kind: str, runner: LocalRunner) -> float | None:
        """Index every root. The first run's errors end the watcher; a rescan that fails is reported, and the
        seconds to wait before trying again are returned (None after a run that went through)."""
        self.collection.refresh()  # follow a `clipsearch index --rebuild` that switched generations meanwhile
        if kind == "initial":
            summary = runner.run(self.collection, self.model, self.roots)
        else:
            try:
                summary = runner.run(self.collection, self.model, self.roots)
            except ClipsearchError as exc:
                return self._failed(exc)
        self._failures = 0
        self.ready.set()  # before the first report: whoever reads it may count on the watcher following events
        self._done(WatchReport(kind, summary))
        return None

    def _update(self, runner: LocalRunner, batch: list[ChangedPath]) -> None:
        changes = walk_changes([(c.root, c.path) for c in batch], self.options.walk_options())
        if not changes.roots:
            return
        self.collection.refresh()
        workers = _workers_for(len(changes.files), runner.options)
        if workers != runner.options.workers:  # no more decoder processes than a batch of a few files can use
            runner = LocalRunner(replace(runner.options, workers=workers))
        try:
            summary = runner.update(self.collection, self.model, changes)
        except ClipsearchError as exc:  # another `clipsearch index` holds the collection, say: try again later
            self.queue.put_back(batch, self._failed(exc))
            return
        self._failures = 0
        self._done(WatchReport("changes", summary, len(batch)))

    def _failed(self, exc: ClipsearchError) -> float:
        """Count and report a failed run; the seconds to wait before the next try (doubling while they keep
        failing, up to the rescan interval or a minute)."""
        self.totals.failures += 1
        self._failures += 1
        if self.failed is not None:
            self.failed(exc)
        ceiling = max(self.watch.retry_delay, self.watch.rescan_interval or 60.0)
        return min(ceiling, self.watch.retry_delay * 2 ** (self._failures - 1))

    def _done(self, report: WatchReport) -> None:
        self.totals.add(report)
        if self.report is not None:
            self.report(report)

