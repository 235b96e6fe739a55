"""End-to-end indexing on generated photos with the tiny random-init bundle: counts, incremental runs,
renames, model changes, crash recovery, and `check` catching a corrupted index."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipsearch.store.collection import Collection
from clipsearch.errors import BundleError, CollectionError
from clipsearch.indexer.pipeline import IndexOptions
from clipsearch.indexer.runner import index_paths
from clipsearch.model.runtime import ClipModel
from clipsearch.model.bundle import write_model_json
from photo_fixtures import block_image, bump_mtime, make_photos


CLI = [sys.executable, "-c", "from clipsearch.cli import main; main()"]


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return ClipModel(tiny_bundle, threads=1)


@pytest.fixture()
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    make_photos(folder, 12)
    return folder


def run(collection, model, roots, **options):
    defaults = {"batch_size": 4, "workers": 1}
    return index_paths(collection, model, [str(r) for r in roots], IndexOptions(**{**defaults, **options}))


def stored_paths(collection) -> set[str]:
    return set(collection.store.file_states())


def test_first_run_indexes_every_image_and_skips_hidden_and_tool_folders(tmp_path, photos, model):
    for skipped_dir in (".hidden", "node_modules", ".git"):
        (photos / skipped_dir).mkdir()
        block_image(99).save(photos / skipped_dir / "x.png")
    (photos / "notes.txt").write_text("not an image")
    collection = Collection.create("photos", tmp_path / "idx")
    summary = run(collection, model, [photos])
    assert (summary.added, summary.updated, summary.reused, summary.removed, summary.total) == (12, 0, 0, 0, 12)
    assert summary.skipped == []
    assert all(".hidden" not in p and "node_modules" not in p and ".git" not in p for p in stored_paths(collection))
    assert collection.check().ok
    record = collection.store.find_by_path(str(photos / "photo_000.png"))
    assert (record.width, record.height) == (160, 120)
    assert record.model_id == model.model_id and len(record.content_hash) == 32

    with_hidden = Collection.create("hidden", tmp_path / "idx")
    assert run(with_hidden, model, [photos], include_hidden=True).total == 15


def test_a_first_run_opens_the_encoder_early_and_reports_a_graph_that_cannot_be_opened(tmp_path, photos,
                                                                                       tiny_bundle):
    # A collection's first run opens the visual session on a thread beside the walk (it reads every file); a
    # graph that onnxruntime refuses still fails the run with the model's error, from the run itself.
    broken = tmp_path / "broken-bundle"
    shutil.copytree(tiny_bundle, broken)
    (broken / "visual.onnx").write_bytes(b"not an onnx graph")
    meta = json.loads((broken / "model.json").read_text())
    write_model_json(broken, meta)  # its checksum says so too: past the integrity check, onnxruntime refuses it
    clip = ClipModel(broken, threads=1)
    with pytest.raises(BundleError, match="cannot load .*visual.onnx"):
        run(Collection.create("broken", tmp_path / "idx"), clip, [photos])
    assert not [t for t in threading.enumerate() if t.name == "clipsearch-open-encoder"]
    good = ClipModel(tiny_bundle, threads=1)
    summary = run(Collection.create("first", tmp_path / "idx"), good, [photos])
    assert summary.added == 12 and good.visual.loaded


def test_a_bundle_whose_image_side_changed_after_export_writes_nothing(tmp_path, photos, tiny_bundle, tiny_bundles,
                                                                        monkeypatch):
    # model.json's checksum of visual.onnx is the model id a collection is bound to: a swapped tower would have
    # written its vectors under the genuine id, mixed with the real ones.
    from clipsearch.model import integrity

    swapped = tmp_path / "swapped"
    shutil.copytree(tiny_bundle, swapped)
    shutil.copy(tiny_bundles["int8"] / "visual.onnx", swapped / "visual.onnx")
    for extra in ("visual.onnx.data",):
        if (tiny_bundles["int8"] / extra).exists():
            shutil.copy(tiny_bundles["int8"] / extra, swapped / extra)
    clip = ClipModel(swapped, threads=1)
    assert clip.model_id == ClipModel(tiny_bundle).model_id  # what the collection would have been bound to
    with pytest.raises(BundleError, match="visual.onnx.* not match the sha256 its model.json records") as raised:
        run(Collection.create("mixed", tmp_path / "idx"), clip, [photos])
    assert "--verify" in raised.value.hint
    assert not (tmp_path / "idx" / "mixed").exists()  # checked before the collection was made
    # An intact bundle is hashed once per file version, then known by its stat.
    hashed: list[str] = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda path: hashed.append(path.name) or real(path))
    cache = tmp_path / "verified.json"
    good = ClipModel(tiny_bundle, threads=1)
    integrity.check_image_side(good.info, cache)
    assert sorted(hashed) == sorted(n for n in integrity.IMAGE_SIDE_FILES if n in good.info.files)
    integrity.check_image_side(good.info, cache)
    assert len(hashed) == len([n for n in integrity.IMAGE_SIDE_FILES if n in good.info.files])  # no second hash
    # A model checks its files once per version in a process: the run's check, then its session opening, read the
    # remembered digests once.
    loads = []
    real_load = integrity._load
    monkeypatch.setattr(integrity, "_load", lambda path: loads.append(path) or real_load(path))
    good.check_image_side()
    good.open_visual()
    good.check_image_side()
    assert len(loads) == 1


@pytest.mark.parametrize("damage", ["deleted", "emptied"])
def test_a_lost_database_is_indexed_again_without_its_old_index(tmp_path, photos, model, damage):
    # The new database hands out ids in another order and its generation reaches the old index's: the saved index
    # (and tokens, thumbnails) of the lost rows must go, or searches would name other files for the old vectors.
    from clipsearch.search import SearchQuery, Searcher
    from clipsearch.store.collection import STORE_FILE

    index_dir = tmp_path / "idx"
    with Collection.create("c", index_dir) as collection:
        first = run(collection, model, [photos])
    with Searcher(Collection.open("c", index_dir), model) as searcher:
        expected = [(h.path, h.score) for h in searcher.search(SearchQuery.build(image=photos / "photo_006.png", k=4,
                                                                                  include_query_images=True))]
        old_max = max(h.id for h in searcher.search(SearchQuery.build(text="x", k=first.total)))
    database = index_dir / "c" / STORE_FILE
    for leftover in (database.with_name(STORE_FILE + "-wal"), database.with_name(STORE_FILE + "-shm")):
        leftover.unlink(missing_ok=True)
    if damage == "deleted":
        database.unlink()
    else:
        database.write_bytes(b"")
    (index_dir / "c" / "thumbnails").mkdir(exist_ok=True)
    with Collection.create("c", index_dir) as collection:
        again = run(collection, model, [photos])
    assert (again.added, again.total) == (first.total, first.total)
    with Searcher(Collection.open("c", index_dir), model) as searcher:
        hits = searcher.search(SearchQuery.build(image=photos / "photo_006.png", k=4, include_query_images=True))
        assert [h.path for h in hits] == [path for path, _ in expected]
        assert [h.score for h in hits] == pytest.approx([score for _, score in expected], abs=1e-5)
        assert hits[0].path == str(photos / "photo_006.png") and min(h.id for h in hits) > old_max
        assert searcher.collection.check().ok
    assert not (index_dir / "c" / "thumbnails").exists()


def test_check_and_stats_report_a_damaged_database_and_malformed_vectors(tmp_path, photos, model):
    import sqlite3

    from clipsearch.errors import UnreadableStoreError
    from clipsearch.store.collection import STORE_FILE

    index_dir = tmp_path / "idx"
    with Collection.create("c", index_dir) as collection:
        run(collection, model, [photos])
    database = index_dir / "c" / STORE_FILE
    # A stored vector of the wrong size: check looks at every one (it sampled 32), a rebuild of the index names it.
    with sqlite3.connect(database) as raw:
        raw.execute("UPDATE embeddings SET vector = x'0000' WHERE id = 3")
    (index_dir / "c" / "vectors.faiss").unlink()
    with Collection.open("c", index_dir) as collection:
        report = collection.check()
        assert not report.ok and any(p.startswith("1 stored vectors are not") and "(ids 3)" in p for p in report.problems)
        with pytest.raises(CollectionError, match=r"stored vectors are not \d+ float32 values \(ids 3\)"):
            collection.load_vectors()
    # Pages of the database overwritten: check reports it, stats and the CLI say so in one line.
    with open(database, "r+b") as damaged:
        damaged.seek(4096 * 2)
        damaged.write(b"\0" * 4096 * 3)
    with Collection.open("c", index_dir) as collection:
        report = collection.check()
        assert not report.ok and "--rebuild --model MODEL" in report.problems[0]
        with pytest.raises(UnreadableStoreError, match="the database is damaged"):
            collection.stats()
    cli = [sys.executable, "-c", "from clipsearch.cli import main; main()"]
    for command in ("check", "stats"):
        done = subprocess.run([*cli, command, "-c", "c", "--index-dir", str(index_dir)], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 1 and "Traceback" not in done.stderr and "--rebuild" in done.stderr, done.stderr


def test_a_stop_during_the_index_update_waits_until_sqlite_and_faiss_agree(tmp_path, photos, model, monkeypatch):
    # An IVF-PQ update takes seconds: Ctrl-C in it used to leave the index behind what SQLite committed.
    real_update = Collection.update_vectors

    def ctrl_c_during_the_update(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real_update(self, *args, **kwargs)

    with Collection.create("c", tmp_path / "idx") as collection:
        monkeypatch.setattr(Collection, "update_vectors", ctrl_c_during_the_update)
        with pytest.raises(KeyboardInterrupt):  # the stop still happens, once the update is done
            run(collection, model, [photos])
        monkeypatch.setattr(Collection, "update_vectors", real_update)
        assert collection.vectors_fresh() and collection.check().ok and collection.store.count() == 12


def test_a_first_run_stopped_before_it_wrote_an_image_leaves_no_collection(tmp_path, photos, model):
    # Its model was bound already: an empty collection was left, listed and served, and `check` failed on it.
    from clipsearch.store.collection import list_collections

    def stopped(done: int, total: int) -> None:
        raise KeyboardInterrupt

    index_dir = tmp_path / "idx"
    with Collection.create("c", index_dir) as collection, pytest.raises(KeyboardInterrupt):
        index_paths(collection, model, [str(photos)], IndexOptions(workers=0), progress=stopped)
    assert list_collections(index_dir) == []
    with Collection.create("c", index_dir) as collection:  # an indexed collection stopped alike is kept, of course
        run(collection, model, [photos])
        bump_mtime(photos / "photo_000.png")  # something to read, so that the run reaches its first progress call
        with pytest.raises(KeyboardInterrupt):
            index_paths(collection, model, [str(photos)], IndexOptions(workers=0), progress=stopped)
    assert list_collections(index_dir) == ["c"]
    with Collection.open("c", index_dir) as collection:
        assert collection.store.count() == 12 and collection.check().ok


def test_a_second_stop_during_the_index_update_stops_at_once(tmp_path, photos, model, monkeypatch):
    # A full IVF-PQ retrain can take minutes: the first stop waits for it, a second one does not (the index is then
    # behind SQLite, as after a kill, and the next run completes it).
    real_update = Collection.update_vectors
    reached = []

    def two_ctrl_c_during_the_update(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        reached.append("past the second stop")
        return real_update(self, *args, **kwargs)

    with Collection.create("c", tmp_path / "idx") as collection:
        monkeypatch.setattr(Collection, "update_vectors", two_ctrl_c_during_the_update)
        with pytest.raises(KeyboardInterrupt):
            run(collection, model, [photos])
        monkeypatch.setattr(Collection, "update_vectors", real_update)
        assert reached == [] and not collection.vectors_fresh()
        assert run(collection, model, [photos]).embedded == 0 and collection.check().ok


def test_check_of_a_collection_being_indexed_says_a_run_is_writing(tmp_path, photos, model):
    from clipsearch.store.database import NewImage

    with Collection.create("c", tmp_path / "idx") as collection:
        run(collection, model, [photos])
        vector = np.zeros(model.embed_dim, dtype=np.float32)
        vector[0] = 1
        with Collection.open("c", tmp_path / "idx") as running, running.writer_lock():  # what a run holds
            running.store.write_images([NewImage(path=str(photos / "new.png"), size=1, mtime_ns=1, content_hash="n" * 32,
                                                 width=8, height=8, taken_at=None, vector=vector)],
                                       model.model_id, running.store.next_run_id(), "2026")
            assert collection.being_indexed()
            during = collection.check()
            assert any("an indexing run is writing to it now" in p for p in during.problems), during.problems
        assert not collection.being_indexed()
        after = collection.check()
        assert any("an interrupted run?" in p for p in after.problems)


def test_a_collection_on_read_only_storage_is_not_called_damaged(tmp_path, photos, model, monkeypatch):
    # What SQLite says when WAL cannot write its -shm file beside a healthy database (a read-only mount); root is
    # not held back by file modes, so the read-only storage is what os.access reports.
    import sqlite3

    import clipsearch.store.database as database
    from clipsearch.errors import UnreadableStoreError

    with Collection.create("c", tmp_path / "idx") as collection:
        run(collection, model, [photos])

    def unable_to_open(self):
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(database.Store, "_use_wal", unable_to_open)
    monkeypatch.setattr(database.os, "access", lambda path, mode: False)
    with pytest.raises(CollectionError, match="read-only") as raised:
        Collection.open("c", tmp_path / "idx").store
    assert not isinstance(raised.value, UnreadableStoreError) and "delete" not in raised.value.hint
    monkeypatch.setattr(database.os, "access", lambda path, mode: True)
    with pytest.raises(UnreadableStoreError, match="not a usable SQLite database"):
        Collection.open("c", tmp_path / "idx").store


def test_a_lock_file_that_cannot_be_written_is_a_clear_error(tmp_path, photos, model, monkeypatch):
    # A read-only file system refuses the writer lock before anything else (root ignores file modes: simulated).
    import errno

    import clipsearch.store.collection as collection_module

    with Collection.create("c", tmp_path / "idx") as collection:
        run(collection, model, [photos])

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(collection_module, "open", read_only, raising=False)
    with Collection.open("c", tmp_path / "idx") as collection:
        with pytest.raises(CollectionError, match="cannot write to collection 'c'.*Read-only file system") as raised:
            run(collection, model, [photos])
    assert "writable" in raised.value.hint


def test_a_full_disk_is_one_line_and_the_cleanup_does_not_hide_it(tmp_path, photos, model, monkeypatch, capsys):
    import sqlite3

    import clipsearch.cli as cli

    # The run's own error is what surfaces, not the index update that tries to follow it on the same full disk.
    real_update = Collection.update_vectors

    def full(*args, **kwargs):
        raise RuntimeError("Error in void faiss::write_index: No space left on device")

    def write_fails(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    with Collection.create("c", tmp_path / "idx") as collection:
        monkeypatch.setattr(Collection, "update_vectors", full)
        monkeypatch.setattr(collection.store, "write_images", write_fails)
        with pytest.raises(sqlite3.OperationalError, match="disk is full"):
            run(collection, model, [photos])
    monkeypatch.setattr(Collection, "update_vectors", real_update)

    def command():
        try:
            write_fails()
        except sqlite3.OperationalError as exc:
            raise RuntimeError("Error in void faiss::write_index: No space left on device") from exc

    monkeypatch.setattr(cli, "app", command)
    monkeypatch.setattr(cli.sys, "argv", ["clipsearch", "index", str(photos)])
    with pytest.raises(SystemExit) as exited:
        cli._run()
    err = capsys.readouterr().err
    assert exited.value.code == 1 and err.startswith("error: no space left on the device") and "Free some space" in err


def test_check_finds_a_damaged_index_file_of_unchanged_size_and_the_way_back_embeds_nothing(tmp_path, photos, model):
    # A flipped bit keeps the size: searches then rank by garbage. The checksum written with the file finds it.
    from clipsearch.store.index.vectors import INDEX_FILE, SIDECAR_FILE

    with Collection.create("c", tmp_path / "idx") as collection:
        run(collection, model, [photos])
        assert collection.check().ok
        target = collection.folder / INDEX_FILE
        data = bytearray(target.read_bytes())
        data[-40] ^= 0x40  # inside the last stored vector
        target.write_bytes(bytes(data))
        report = collection.check()
        assert not report.ok and any("is damaged (its checksum differs" in p for p in report.problems)
        target.unlink()
        stats = collection.stats()  # the sidecar alone no longer describes an index
        assert (stats.index_kind, stats.index_count, stats.index_fresh) == (None, None, False)
        (collection.folder / SIDECAR_FILE).unlink()
        again = run(collection, model, [photos])
        assert again.embedded == 0 and collection.check().ok


def test_a_check_probing_the_lock_never_makes_a_run_refuse_to_start(tmp_path, photos, model):
    # `check` and `stats` look whether a run holds the writer lock by taking a shared lock for a moment: a run
    # starting in that moment waits for it instead of saying another process is indexing.
    with Collection.create("c", tmp_path / "idx") as collection:
        run(collection, model, [photos])
    stop = threading.Event()

    def probe() -> None:
        with Collection.open("c", tmp_path / "idx") as checker:
            while not stop.is_set():
                checker.being_indexed()

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        with Collection.open("c", tmp_path / "idx") as writer:
            for _ in range(300):
                with writer.writer_lock():
                    pass
    finally:
        stop.set()
        prober.join()


def test_rerun_embeds_nothing(tmp_path, photos, model):
    collection = Collection.create("c", tmp_path / "idx")
    run(collection, model, [photos])
    generation = collection.store.generation
    again = run(collection, model, [photos])
    assert (again.added, again.updated, again.reused, again.removed, again.embedded) == (0, 0, 0, 0, 0)
    assert again.unchanged == 12 and again.total == 12
    assert collection.store.generation == generation  # nothing written, FAISS not rebuilt
    assert collection.check().ok


def test_modified_file_is_reembedded_in_place(tmp_path, photos, model):
    collection = Collection.create("c", tmp_path / "idx")
    run(collection, model, [photos])
    target = photos / "photo_000.png"
    before = collection.store.find_by_path(str(target))
    old_vector = collection.store.vector(before.id, model.embed_dim)
    block_image(500, size=(200, 100)).save(target)
    bump_mtime(target)
    summary = run(collection, model, [photos])
    assert (summary.updated, summary.embedded, summary.added, summary.total) == (1, 1, 0, 12)
    after = collection.store.find_by_path(str(target))
    assert after.id == before.id and (after.width, after.height) == (200, 100)
    assert after.content_hash != before.content_hash
    new_vector = collection.store.vector(after.id, model.embed_dim)
    assert not np.allclose(new_vector, old_vector)
    expected = model.encode_images([Image.open(target).convert("RGB")])[0]
    assert float(new_vector @ expected) > 0.999
    assert collection.check().ok


def test_touched_file_with_same_bytes_is_not_reembedded(tmp_path, photos, model):
    collection = Collection.create("c", tmp_path / "idx")
    run(collection, model, [photos])
    bump_mtime(photos / "photo_000.png")
    summary = run(collection, model, [photos])
    assert (summary.embedded, summary.updated, summary.reused) == (0, 0, 0)
    # read and hashed again, then kept: it is counted, so the buckets cover every indexed path the run saw
    assert (summary.unchanged, summary.added, summary.total) == (12, 0, 12)
    third = run(collection, model, [photos])
    assert third.unchanged == 12  # the new mtime was recorded


def test_deleted_file_leaves_the_index(tmp_path, photos, model):
    collection = Collection.create("c", tmp_path / "idx")
    run(collection, model, [photos])
    gone = photos / "sub" / "photo_001.jpg"
    gone_id = collection.store.find_by_path(str(gone)).id
    gone.unlink()
    summary = run(collection, model, [photos])
    assert (summary.removed, summary.total) == (1, 11)
    assert str(gone) not in stored_paths(collection)
    index = collection.load_vectors()
    assert gone_id not in set(index.ids().tolist()) and index.count == 11
    assert collection.check().ok


def test_renamed_files_keep_their_image_and_copies_reuse_its_vector(tmp_path, photos, model):
    # A rename was a new image (new id: a `--like ID` or a REST client's id stopped working) plus a removal.
    collection = Collection.create("c", tmp_path / "idx")
    run(collection, model, [photos])
    original = photos / "photo_000.png"
    before = collection.store.find_by_path(str(original))
    vector = collection.store.vector(before.id, model.embed_dim)
    renamed = photos / "moved-here" / "renamed.png"
    renamed.parent.mkdir()
    original.rename(renamed)
    shutil.copy(photos / "sub" / "photo_001.jpg", photos / "copy_of_1.jpg")
    summary = run(collection, model, [photos])
    assert (summary.moved, summary.reused, summary.embedded, summary.added, summary.removed, summary.total) == \
        (1, 1, 0, 0, 0, 13)
    moved = collection.store.find_by_path(str(renamed))
    assert moved.id == before.id and collection.store.find_by_path(str(original)) is None
    np.testing.assert_array_equal(collection.store.vector(moved.id, model.embed_dim), vector)
    assert (moved.width, moved.height) == (160, 120)
    assert collection.check().ok
    # Two copies of the same bytes, both renamed: each keeps its own id.
    twins = [photos / "twin-a.png", photos / "twin-b.png"]
    for twin in twins:
        shutil.copy(photos / "sub" / "photo_002.png" if (photos / "sub" / "photo_002.png").exists() else renamed, twin)
    run(collection, model, [photos])
    ids = {collection.store.find_by_path(str(t)).id for t in twins}
    for twin in twins:
        twin.rename(twin.with_name("moved-" + twin.name))
    both = run(collection, model, [photos])
    assert (both.moved, both.removed, both.reused) == (2, 0, 0)
    assert {collection.store.find_by_path(str(t.with_name("moved-" + t.name))).id for t in twins} == ids
    for twin in twins:
        twin.with_name("moved-" + twin.name).unlink()
    run(collection, model, [photos])
    # Moved back and copied alongside in one run: one of the two paths takes the image, the other copies its vector.
    shutil.copy(renamed, photos / "also.png")
    renamed.rename(original)
    again = run(collection, model, [photos])
    assert (again.moved, again.reused, again.removed, again.embedded, again.total) == (1, 1, 0, 0, 14)
    assert before.id in {collection.store.find_by_path(str(p)).id for p in (original, photos / "also.png")}
    assert collection.check().ok


def test_duplicates_within_one_run_are_encoded_once(tmp_path, model):
    folder = tmp_path / "dups"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        block_image(7).save(folder / name)
    block_image(8).save(folder / "d.png")
    collection = Collection.create("c", tmp_path / "idx")
    summary = run(collection, model, [folder])
    assert (summary.embedded, summary.reused, summary.total) == (2, 2, 4)


def test_exclude_globs_leave_files_out_and_remove_them_later(tmp_path, photos, model):
    collection = Collection.create("c", tmp_path / "idx")
    run(collection, model, [photos])
    summary = run(collection, model, [photos], exclude=("sub",))
    assert summary.removed == 6 and summary.total == 6
    assert not any("/sub/" in p for p in stored_paths(collection))
    only_png = Collection.create("png", tmp_path / "idx")
    assert run(only_png, model, [photos], exclude=("*.jpg",)).total == 4


def test_indexing_a_second_folder_keeps_the_first(tmp_path, photos, model):
    other = tmp_path / "other"
    make_photos(other, 3, start_seed=100)
    collection = Collection.create("c", tmp_path / "idx")
    run(collection, model, [photos])
    summary = run(collection, model, [other])
    assert (summary.added, summary.removed, summary.total) == (3, 0, 15)


def test_another_model_is_refused_unless_rebuild(tmp_path, photos, model, tiny_bundle):
    collection = Collection.create("c", tmp_path / "idx")
    run(collection, model, [photos])
    other_bundle = tmp_path / "other-bundle"
    shutil.copytree(tiny_bundle, other_bundle)
    meta = json.loads((other_bundle / "model.json").read_text())
    meta["name"] = "another-model"
    (other_bundle / "model.json").write_text(json.dumps(meta))
    other = ClipModel(other_bundle, threads=1)
    assert other.model_id != model.model_id
    with pytest.raises(CollectionError, match="cannot be mixed"):
        run(collection, other, [photos])
    assert collection.model.model_id == model.model_id and collection.check().ok
    rebuilt = run(collection, other, [photos], rebuild=True)
    assert (rebuilt.added, rebuilt.total) == (12, 12)
    assert collection.model.model_id == other.model_id
    assert {r.model_id for r in collection.store.get_many(collection.store.ids()).values()} == {other.model_id}
    assert collection.check().ok


def test_ivfpq_past_the_threshold_still_finds_each_image(tmp_path, model):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(300):
        block_image(1000 + i, size=(64, 64)).save(folder / f"{i:03d}.png")
    collection = Collection.create("big", tmp_path / "idx")
    summary = run(collection, model, [folder], ivf_threshold=100, batch_size=64)
    assert summary.index_kind == "ivfpq" and summary.total == 300
    assert collection.check().ok
    index = collection.load_vectors()
    ids, vectors = collection.store.all_vectors(model.embed_dim)
    top10 = [[hit[0] for hit in hits] for hits in index.search(vectors[:100], 10)]
    assert sum(int(i) in found for found, i in zip(top10, ids[:100])) >= 90


def test_check_catches_a_corrupted_index(tmp_path, photos, model):
    root = tmp_path / "idx"
    collection = Collection.create("c", root)
    run(collection, model, [photos])
    assert collection.check().ok

    # 1. A row deleted behind FAISS's back.
    victim = int(collection.store.ids()[3])
    collection.store.db.execute("DELETE FROM embeddings WHERE id = ?", [victim])
    collection.store.db.execute("DELETE FROM images WHERE id = ?", [victim])
    collection.store.db.conn.commit()
    problems = " ".join(collection.check().problems)
    assert "11 images" in problems and "only in FAISS" in problems
    cli = subprocess.run([*CLI, "check", "--collection", "c", "--index-dir", str(root)],
                         capture_output=True, text=True)
    assert cli.returncode == 1 and "only in FAISS" in cli.stderr

    # 2. The next indexing run repairs it (the missing file is embedded again, FAISS rebuilt).
    repaired = run(collection, model, [photos])
    assert repaired.added == 1 and collection.check().ok

    # 3. A truncated FAISS file.
    index_file = collection.folder / "vectors.faiss"
    index_file.write_bytes(index_file.read_bytes()[:100])
    assert any("unreadable FAISS index" in p for p in collection.check().problems)

    # 4. A FAISS index of another model.
    run(collection, model, [photos])  # a no-op run notices the truncated file and rebuilds it
    assert collection.check().ok
    sidecar = collection.folder / "vectors.json"
    meta = json.loads(sidecar.read_text())
    meta["model_id"] = "someone-else@000"
    sidecar.write_text(json.dumps(meta))
    assert any("built with model someone-else@000" in p for p in collection.check().problems)


def test_killed_run_leaves_a_consistent_index_that_the_next_run_completes(tmp_path, model, tiny_bundle):
    total = 1200  # large enough that the run is still going when it is killed, even on a busy machine
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(total):
        block_image(2000 + i, size=(48, 48)).save(folder / f"{i:04d}.png")
    root = tmp_path / "idx"
    env = {**os.environ, "CLIPSEARCH_HOME": str(tmp_path / "home")}
    command = [*CLI, "index", str(folder), "--collection", "k", "--index-dir", str(root),
               "--model", str(tiny_bundle), "--batch-size", "1", "--workers", "0", "--threads", "1", "--json"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store_file = root / "k" / "meta.sqlite"
    deadline = time.time() + 120
    written = 0
    while time.time() < deadline and process.poll() is None:
        if store_file.exists():
            try:
                with Collection.open("k", root) as peek:
                    written = peek.store.count()
            except Exception:  # the database may be mid-creation
                written = 0
            if written >= 10:
                break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()

    with Collection.open("k", root) as collection:
        interrupted = collection.store.count()
        assert 10 <= interrupted < total, "the run was not caught mid-way"
        # Vectors are saved to FAISS only after every file was seen, so the index is behind SQLite...
        report = collection.check()
        assert not report.ok and any("interrupted" in p or "no vector index" in p for p in report.problems)
        # ...yet a search right after the crash sees exactly what SQLite committed.
        assert collection.load_vectors().count == interrupted

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["total"] == total and summary["added"] == total - interrupted
    assert summary["unchanged"] == interrupted
    with Collection.open("k", root) as collection:
        assert collection.check().ok


def test_index_cli_json_and_collection_remembers_its_model(tmp_path, photos, tiny_bundle):
    env = {**os.environ, "CLIPSEARCH_HOME": str(tmp_path / "home")}
    first = subprocess.run([*CLI, "index", str(photos), "--model", str(tiny_bundle),
                            "--json", "--workers", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert set(summary) >= {"added", "updated", "removed", "reused", "skipped", "total", "seconds"}
    assert summary["added"] == 12 and summary["total"] == 12
    # No --model: the collection's own model is used, so nothing is refused or re-embedded.
    second = subprocess.run([*CLI, "index", str(photos), "--json"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["unchanged"] == 12
    assert (tmp_path / "home" / "collections" / "default" / "meta.sqlite").is_file()
    stats = subprocess.run([*CLI, "stats", "--json"], env=env, capture_output=True,
                           text=True, timeout=120)
    info = json.loads(stats.stdout)
    assert info["images"] == 12 and info["index_kind"] == "flat" and info["bytes_on_disk"] > 0


def test_a_second_concurrent_run_is_refused(tmp_path, photos, model):
    collection = Collection.create("c", tmp_path / "idx")
    with collection.writer_lock():
        with pytest.raises(CollectionError, match="being indexed by another process"):
            run(Collection.open("c", tmp_path / "idx"), model, [photos])
    assert run(collection, model, [photos]).total == 12


def test_new_files_are_appended_to_the_index_and_changes_rebuild_it(tmp_path, photos, model):
    collection = Collection.create("c", tmp_path / "idx")
    assert run(collection, model, [photos]).index_update == "rebuild"  # the first build
    assert run(collection, model, [photos]).index_update == "none"
    block_image(600).save(photos / "new_a.png")
    block_image(601).save(photos / "new_b.png")
    added = run(collection, model, [photos])
    assert (added.added, added.index_update, added.total) == (2, "append", 14)
    assert collection.check().ok
    new_id = collection.store.find_by_path(str(photos / "new_b.png")).id
    index = collection.load_vectors()
    assert index.search(collection.store.vector(new_id, model.embed_dim)[None, :], 1)[0][0][0] == new_id

    (photos / "new_a.png").unlink()
    assert run(collection, model, [photos]).index_update == "rebuild"
    block_image(602).save(photos / "photo_000.png")
    bump_mtime(photos / "photo_000.png")
    assert run(collection, model, [photos]).index_update == "rebuild"
    assert collection.check().ok


def test_ivfpq_index_takes_appends_without_retraining(tmp_path, model):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(200):
        block_image(3000 + i, size=(64, 64)).save(folder / f"{i:03d}.png")
    collection = Collection.create("big", tmp_path / "idx")
    first = run(collection, model, [folder], ivf_threshold=100, batch_size=64)
    assert first.index_kind == "ivfpq"
    trained_on = collection.load_vectors().meta.trained_on
    for i in range(200, 230):
        block_image(3000 + i, size=(64, 64)).save(folder / f"{i:03d}.png")
    second = run(collection, model, [folder], ivf_threshold=100, batch_size=64)
    assert (second.index_update, second.total) == ("append", 230)
    index = collection.load_vectors()
    assert index.meta.trained_on == trained_on and index.count == 230
    assert collection.check().ok


def test_a_stale_index_is_rebuilt_in_memory_when_small_and_used_as_saved_when_large(tmp_path, photos, model):
    collection = Collection.create("c", tmp_path / "idx")
    run(collection, model, [photos])
    # An indexing run in progress has committed one more image to SQLite but not yet saved FAISS.
    from clipsearch.store.database import NewImage

    vector = model.encode_images([block_image(777)])[0]
    collection.store.write_images([NewImage(path=str(photos / "pending.png"), size=1, mtime_ns=1, content_hash="p" * 32,
                                            width=1, height=1, taken_at=None, vector=vector)],
                                  model.model_id, 99, "2024-01-01T00:00:00")
    assert not collection.vectors_fresh()
    assert collection.load_vectors().count == 13  # small: exact rebuild, sees the new row
    assert collection.load_vectors(ivf_threshold=5).count == 12  # large: the saved index, as it is


def test_rebuild_with_a_mistyped_folder_loses_nothing(tmp_path, photos, model):
    collection = Collection.create("c", tmp_path / "idx")
    run(collection, model, [photos])
    with pytest.raises(CollectionError, match="nothing to index"):
        run(collection, model, [tmp_path / "no-such-folder"], rebuild=True)
    assert collection.store.count() == 12 and collection.check().ok


def test_indexing_a_deleted_folder_or_file_with_forget_missing_removes_its_images(tmp_path, model):
    """The README's cure for results whose files are gone ("index their folder again") failed for a folder that was
    itself deleted: "nothing to index: no such file or folder". With --forget-missing, naming a gone path removes
    its images; without it they are kept (an unplugged disk) and the error says how many and how to remove them; a
    path the collection holds nothing under is refused either way (a typo deletes nothing)."""
    from clipsearch.indexer.pipeline import IndexOptions
    from clipsearch.indexer.runner import LocalRunner
    from photo_fixtures import make_photos

    kept, gone = tmp_path / "kept", tmp_path / "gone"
    make_photos(kept, 3)
    make_photos(gone, 2, start_seed=70)
    lone = make_photos(tmp_path / "lone", 1, start_seed=80)[0]
    with Collection.create("c", tmp_path / "idx") as collection:
        for path in (kept, gone, lone):
            run(collection, model, [path])
        assert collection.store.count() == 6
        shutil.rmtree(gone)
        lone.unlink()
        with pytest.raises(CollectionError, match="nothing to index: .*typo: no such file or folder"):
            run(collection, model, [tmp_path / "typo"], forget_missing=True)
        with pytest.raises(CollectionError, match="gone: no such file or folder; the collection keeps its 2 images "
                                                  r"\(--forget-missing removes them\)"):
            run(collection, model, [gone])
        assert collection.store.count() == 6
        linked = tmp_path / "linked"
        linked.symlink_to(gone, target_is_directory=True)  # indexed through a link whose folder is then deleted
        make_photos(gone, 1, start_seed=95)
        run(collection, model, [linked])
        shutil.rmtree(gone)
        with pytest.raises(CollectionError, match="linked: dangling symlink.*keeps its 1 image "
                                                  r"\(--forget-missing removes it\)"):
            run(collection, model, [linked])
        assert LocalRunner(IndexOptions(workers=0, forget_missing=True)).run(collection, model,
                                                                              [str(linked)]).removed == 1
        summary = LocalRunner(IndexOptions(workers=0, forget_missing=True)).run(collection, model,
                                                                                 [str(gone), str(lone)])
        assert (summary.removed, summary.total, summary.added) == (3, 3, 0)
        assert summary.vanished_roots == [str(gone), str(lone)]
        assert collection.check().ok
        assert set(collection.store.indexed_roots()) == {str(kept)}
        assert all(p.startswith(str(kept)) for p in collection.store.file_states())
