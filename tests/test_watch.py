"""Watch mode (`clipsearch watch`, `index --watch`, indexer/watch.py): a watched folder ends up indexed exactly as a
fresh `index` of it would be, with no image embedded twice and renames reusing their vector; a Searcher opened
before the changes sees them; periodic rescans catch what events miss; a batch the collection lock refuses is
retried; SIGTERM ends `clipsearch watch` with status 0 and a consistent index. Waits poll with generous deadlines:
nothing depends on timing for correctness."""

from __future__ import annotations

import json
import os
import shutil
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from clipsearch.indexer.pipeline import IndexOptions
from clipsearch.indexer.runner import index_paths
from clipsearch.indexer.walk import WalkOptions, might_hold_images, walk, walk_changes
from clipsearch.indexer.watch import ChangedPath, ChangeQueue, Watcher, WatchOptions
from clipsearch.model.runtime import ClipModel
from clipsearch.search import Searcher, SearchQuery
from clipsearch.store.collection import Collection
from photo_fixtures import block_image, make_photos

CLI = [sys.executable, "-c", "from clipsearch.cli import main; main()"]
DEADLINE = 60.0
OPTIONS = IndexOptions(batch_size=4, workers=0)


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return ClipModel(tiny_bundle, threads=1)


def wait_for(condition, what: str, deadline: float = DEADLINE):
    """Poll `condition` until it returns something truthy (returned), failing after `deadline` seconds."""
    end = time.monotonic() + deadline
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline:.0f} s waiting for {what}")
        time.sleep(0.05)


def stored(root: Path, name: str) -> dict[str, np.ndarray]:
    """path -> stored vector of a collection, read through a connection of its own (as another process would)."""
    with Collection.open(name, root) as collection:
        dim = collection.require_model().embed_dim
        states = collection.store.file_states()
        return {path: collection.store.vector(state.id, dim) for path, state in states.items()}


def stored_paths(root: Path, name: str) -> set[str]:
    try:
        with Collection.open(name, root) as collection:
            return set(collection.store.file_states())
    except Exception:  # not created yet
        return set()


class Running:
    """A Watcher on a thread of its own (the test's thread stays free to change files and poll)."""

    def __init__(self, watcher: Watcher) -> None:
        self.watcher = watcher
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.watcher.run()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def __enter__(self) -> Watcher:
        self.thread.start()
        end = time.monotonic() + DEADLINE
        while not self.watcher.ready.wait(0.1):
            assert self.error is None, self.error
            assert time.monotonic() < end, "the watcher did not finish its first run"
        return self.watcher

    def __exit__(self, *exc_info: object) -> None:
        self.watcher.stop()
        self.thread.join(DEADLINE)
        assert not self.thread.is_alive(), "the watcher did not stop"
        assert self.error is None, self.error


def watched_photos(tmp_path: Path, model, name: str, count: int, watch: WatchOptions):
    """`count` photos in tmp_path/photos and a Watcher of them into collection `name` of tmp_path/idx that reports to
    a list: (folder, index root, reports, watcher)."""
    folder = tmp_path / "photos"
    make_photos(folder, count)
    root = tmp_path / "idx"
    reports: list = []
    watcher = Watcher(Collection.create(name, root), model, [folder], OPTIONS, watch, report=reports.append)
    return folder, root, reports, watcher


def test_a_watched_folder_equals_a_fresh_index_and_nothing_is_embedded_twice(tmp_path, model):
    folder, root, reports, watcher = watched_photos(tmp_path, model, "watched", 4,
                                                    WatchOptions(debounce=0.5, max_delay=3.0, rescan_interval=0))
    with Running(watcher):
        assert [r.kind for r in reports] == ["initial"] and reports[0].summary.added == 4

        added = make_photos(folder / "new", 20, start_seed=100)  # written in place, as a camera import would
        (folder / "notes.txt").write_text("not an image")  # ignored: no batch, no skipped entry
        expected = {str(p) for p in folder.rglob("*") if p.suffix in (".png", ".jpg")}
        assert len(expected) == 24
        wait_for(lambda: stored_paths(root, "watched") == expected, "the 20 new files")

        for path in added[:5]:
            path.unlink()
        renamed = [(added[5], folder / ("renamed_a" + added[5].suffix)),  # across folders
                   (added[6], added[6].with_name("renamed_b" + added[6].suffix)),
                   (added[7], folder / "new" / ("renamed_c" + added[7].suffix))]
        for source, target in renamed:
            source.rename(target)
        expected = {str(p) for p in folder.rglob("*") if p.suffix in (".png", ".jpg")}
        assert len(expected) == 19
        wait_for(lambda: stored_paths(root, "watched") == expected, "the deletions and renames")

    totals = watcher.totals
    # Every image was embedded once (4 at the start, 20 added); the 3 renames kept their images (ids, vectors).
    assert totals.embedded == 24, [(r.kind, r.summary.to_dict()) for r in reports]
    assert (totals.moved, totals.reused, totals.removed, totals.failures) == (3, 0, 5, 0)
    assert all(r.kind == "changes" for r in reports[1:]) and totals.batches >= 2

    fresh = Collection.create("fresh", root)
    index_paths(fresh, model, [str(folder)], OPTIONS)
    fresh.close()
    watched, clean = stored(root, "watched"), stored(root, "fresh")
    assert set(watched) == set(clean) == expected
    for path in expected:
        np.testing.assert_allclose(watched[path], clean[path], atol=1e-5, err_msg=path)
    with Collection.open("watched", root) as collection:
        report = collection.check()
        assert report.ok, report.problems
        assert collection.vectors_fresh()


def test_a_searcher_opened_before_the_changes_sees_them(tmp_path, model):
    folder = tmp_path / "photos"
    make_photos(folder, 4)
    root = tmp_path / "idx"
    index_paths(Collection.create("live", root), model, [str(folder)], OPTIONS)
    searcher = Searcher(Collection.open("live", root), model=model)  # what `clipsearch serve` holds

    def found(path: Path) -> bool:
        query = SearchQuery.build(image=str(path), k=3, include_query_images=True)
        return str(path) in {hit.path for hit in searcher.search(query)}

    newcomer = folder / "newcomer.png"
    block_image(777).save(newcomer)
    assert not found(newcomer)
    watcher = Watcher(Collection.open("live", root), model, [folder], OPTIONS,
                      WatchOptions(debounce=0.2, rescan_interval=0))
    with Running(watcher):
        wait_for(lambda: found(newcomer), "the searcher to find the new file")
        later = folder / "sub" / "later.jpg"
        block_image(778).save(later, quality=92)
        wait_for(lambda: found(later), "the searcher to find a second new file")
        gone = folder / "photo_000.png"
        gone.unlink()
        wait_for(lambda: str(gone) not in {h.path for h in searcher.search(
            SearchQuery.build(image=str(later), k=10, include_query_images=True))}, "the deleted file to go")
    assert searcher.stats().images == 5
    searcher.close()


class _Deaf:
    """An observer that hears nothing (a network share, an overflowing kernel queue)."""

    def schedule(self, *args, **kwargs) -> None:
        pass

    def stop(self) -> None:
        pass

    def join(self, timeout: float | None = None) -> None:
        pass


def test_periodic_rescans_catch_changes_the_events_missed(tmp_path, model, monkeypatch):
    folder = tmp_path / "photos"
    make_photos(folder, 3)
    root = tmp_path / "idx"
    reports = []
    watcher = Watcher(Collection.create("deaf", root), model, [folder], OPTIONS,
                      WatchOptions(debounce=0.1, rescan_interval=0.5), report=reports.append)
    monkeypatch.setattr(watcher, "_start_observer", lambda: _Deaf())
    with Running(watcher):
        block_image(500).save(folder / "missed.png")
        (folder / "photo_000.png").unlink()
        expected = {str(p) for p in folder.rglob("*.*g")}
        wait_for(lambda: stored_paths(root, "deaf") == expected, "a rescan to pick up the changes")
    assert "rescan" in [r.kind for r in reports] and watcher.totals.batches == 0
    assert watcher.totals.embedded == 4


def test_a_watched_folder_deleted_and_made_again_is_watched_again(tmp_path, model):
    # The old watch died with the folder: files put in the new one waited for the next rescan (5 minutes).
    folder, root, reports, watcher = watched_photos(tmp_path, model, "again", 2,
                                                    WatchOptions(debounce=0.1, rescan_interval=3600))
    with Running(watcher):
        shutil.rmtree(folder)
        time.sleep(0.5)
        folder.mkdir()
        block_image(601).save(folder / "back.png")
        wait_for(lambda: stored_paths(root, "again") == {str(folder / "back.png")},
                 "the new folder's file indexed and the old ones swept, without a rescan")
        block_image(602).save(folder / "later.png")  # and its events are followed from then on
        wait_for(lambda: str(folder / "later.png") in stored_paths(root, "again"), "an event in the new folder")
    assert "rescan" not in [r.kind for r in reports]  # an hour apart: none ran
    assert watcher.totals.failures == 0


def test_a_batch_refused_by_another_indexers_lock_is_retried(tmp_path, model):
    folder = tmp_path / "photos"
    make_photos(folder, 2)
    root = tmp_path / "idx"
    errors = []
    watcher = Watcher(Collection.create("locked", root), model, [folder], OPTIONS,
                      WatchOptions(debounce=0.1, rescan_interval=0, retry_delay=0.2), failed=errors.append)
    with Running(watcher):
        other = Collection.open("locked", root)  # `clipsearch index` in another process, as far as flock goes
        with other.writer_lock():
            block_image(600).save(folder / "while_locked.png")
            wait_for(lambda: errors, "the batch to be refused")
            assert str(folder / "while_locked.png") not in stored_paths(root, "locked")
        other.close()
        wait_for(lambda: str(folder / "while_locked.png") in stored_paths(root, "locked"), "the retried batch")
    assert "being indexed by another process" in errors[0].message
    assert watcher.totals.failures >= 1 and watcher.totals.embedded == 3


def test_walk_changes_follows_the_walk_rules_and_sweeps_what_is_gone(tmp_path):
    folder = tmp_path / "photos"
    make_photos(folder, 4)
    (folder / ".hidden").mkdir()
    block_image(1).save(folder / ".hidden" / "secret.png")
    (folder / "node_modules").mkdir()
    block_image(2).save(folder / "node_modules" / "icon.png")
    (folder / "skip").mkdir()
    block_image(3).save(folder / "skip" / "x.png")
    (folder / "readme.txt").write_text("text")
    options = WalkOptions(exclude=("skip",))
    root = str(folder)
    candidates = [str(folder / name) for name in ("photo_000.png", "sub", ".hidden", ".hidden/secret.png",
                                                  "node_modules/icon.png", "skip/x.png", "readme.txt", "gone.png")]
    changes = walk_changes([(root, path) for path in candidates] + [(root, "/elsewhere/y.png")], options)
    full = {f.path for f in walk([folder], options).files}
    assert {f.path for f in changes.files} == full - {str(folder / "photo_002.jpg")}  # the unchanged one
    assert changes.roots == candidates and not changes.problems  # gone.png: swept, not a problem
    assert might_hold_images(root, str(folder / "a" / "b.jpg"), False, options)
    assert not might_hold_images(root, str(folder / "a" / "b.txt"), False, options)
    assert not might_hold_images(root, str(folder / ".cache" / "b.jpg"), False, options)
    assert not might_hold_images(root, str(folder / "skip"), True, options)
    assert might_hold_images(root, root, True, options)
    assert walk_changes([(root, root)], options).files == walk([folder], options).files
    gone = str(tmp_path / "unmounted")  # a root that vanished is reported and kept, as `index` does
    missing = walk_changes([(gone, gone)], options)
    assert missing.roots == [] and missing.problems == [(gone, "no such file or folder")]


def test_a_single_watched_file_follows_an_atomic_replace_and_nothing_beside_it(tmp_path, model):
    folder = tmp_path / "photos"
    folder.mkdir()
    photo = folder / "one.png"
    block_image(1).save(photo)
    root = tmp_path / "idx"
    watcher = Watcher(Collection.create("file", root), model, [photo], OPTIONS,
                      WatchOptions(debounce=0.2, rescan_interval=0))
    with Running(watcher):
        before = stored(root, "file")[str(photo)]
        block_image(2).save(folder / "sibling.png")  # not watched: beside the file, not the file
        block_image(3).save(folder / ".one.png.tmp", format="PNG")
        os.replace(folder / ".one.png.tmp", photo)  # how editors and sync tools save
        wait_for(lambda: not np.allclose(stored(root, "file")[str(photo)], before), "the replaced file")
    assert set(stored(root, "file")) == {str(photo)}
    assert watcher.totals.embedded == 2 and watcher.totals.batches == 1


def test_change_queue_debounces_and_drops_paths_under_a_changed_folder():
    changes = ChangeQueue(debounce=0.05, max_delay=1.0)
    stop = threading.Event()
    assert changes.take(time.monotonic() + 0.1, stop) is None  # nothing came: the deadline (a rescan) wins
    changes.add([ChangedPath("/r", "/r/a/x.png"), ChangedPath("/r", "/r/b.png"), ChangedPath("/r", "/r/a")])
    changes.add([ChangedPath("/r", "/r/b.png"), ChangedPath("/r", "/r/ab.png")])
    batch = changes.take(None, stop)
    assert [c.path for c in batch] == ["/r/a", "/r/ab.png", "/r/b.png"] and len(changes) == 0
    changes.put_back(batch, delay=0.3)
    started = time.monotonic()
    assert [c.path for c in changes.take(None, stop)] == ["/r/a", "/r/ab.png", "/r/b.png"]
    assert time.monotonic() - started >= 0.25
    stop.set()
    changes.add([ChangedPath("/r", "/r/c.png")])
    assert changes.take(None, stop) is None


def _watch_process(args: list[str], env: dict) -> tuple[subprocess.Popen, "queue.Queue[dict]"]:
    """Start a CLI watcher with --json; its summary lines arrive parsed on the returned queue."""
    process = subprocess.Popen([*CLI, *args, "--json"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    lines: "queue.Queue[dict]" = queue.Queue()

    def pump() -> None:
        for line in process.stdout:
            lines.put(json.loads(line))

    threading.Thread(target=pump, daemon=True).start()
    return process, lines


def _next_report(process: subprocess.Popen, lines: "queue.Queue[dict]") -> dict:
    try:
        return lines.get(timeout=DEADLINE)
    except queue.Empty:
        process.kill()
        raise AssertionError(f"no report from the watcher; stderr: {process.stderr.read()}") from None


def _cli_env(tmp_path: Path) -> dict:
    return {**os.environ, "CLIPSEARCH_HOME": str(tmp_path / "home")}


@pytest.mark.slow
def test_sigterm_ends_clipsearch_watch_with_status_0_and_a_consistent_index(tmp_path, tiny_bundle):
    folder = tmp_path / "photos"
    make_photos(folder, 3)
    env = _cli_env(tmp_path)
    process, lines = _watch_process(["watch", str(folder), "--collection", "w", "--model", str(tiny_bundle),
                                     "--workers", "0", "--threads", "1", "--debounce", "0.2"], env)
    try:
        first = _next_report(process, lines)
        assert (first["run"], first["added"], first["total"]) == ("initial", 3, 3)
        make_photos(folder / "more", 5, start_seed=50)
        reports = [first]
        while reports[-1]["total"] != 8:
            reports.append(_next_report(process, lines))
        assert all(r["run"] == "changes" for r in reports[1:])
        assert sum(r["embedded"] for r in reports) == 8
        # A stop while a batch may be on its way (or running): it finishes, or is abandoned safely.
        block_image(999).save(folder / "last.png")
        time.sleep(0.1)  # not for correctness: lets the event reach the watcher, so the batch is likely started
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=DEADLINE)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert "stopped watching" in stderr
    check = subprocess.run([*CLI, "check", "--collection", "w"], env=env, capture_output=True, text=True,
                           timeout=DEADLINE)
    assert check.returncode == 0, check.stdout + check.stderr
    # The next start catches up with whatever the stopped one did not index.
    again = subprocess.run([*CLI, "index", str(folder), "--collection", "w", "--json"], env=env,
                           capture_output=True, text=True, timeout=DEADLINE)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["total"] == 9


@pytest.mark.slow
def test_index_watch_keeps_indexing_until_sigterm(tmp_path, tiny_bundle):
    folder = tmp_path / "photos"
    make_photos(folder, 2)
    env = _cli_env(tmp_path)
    process, lines = _watch_process(["index", str(folder), "--watch", "--collection", "iw", "--model",
                                     str(tiny_bundle), "--threads", "1"], env)  # decoder processes, as by default
    try:
        assert _next_report(process, lines)["run"] == "initial"
        (folder / "sub" / "photo_001.jpg").rename(folder / "moved.jpg")
        report = _next_report(process, lines)
        assert (report["run"], report["moved"], report["reused"], report["removed"], report["embedded"],
                report["total"]) == ("changes", 1, 0, 0, 0, 2)
        block_image(321).save(folder / "sub" / "new.png")
        reports = [_next_report(process, lines)]
        while reports[-1]["total"] != 3:  # a batch may catch the file half-written: it is skipped until complete
            reports.append(_next_report(process, lines))
        assert sum(r["embedded"] for r in reports) == 1
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=DEADLINE)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
