"""`--rebuild` builds a new generation beside the old one and switches atomically: the old collection keeps
answering searches until the switch, an interrupted or killed rebuild leaves it intact, and the next
rebuild starts cleanly. A collection only appears on disk once a model is bound to it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from clipsearch.store.collection import POINTER_FILE, Collection, list_collections
from clipsearch.errors import CollectionError
from clipsearch.indexer.pipeline import IndexOptions
from clipsearch.indexer.runner import index_paths
from clipsearch.model.runtime import ClipModel
from clipsearch.search import SearchQuery, Searcher
from photo_fixtures import block_image, make_photos

CLI = [sys.executable, "-c", "from clipsearch.cli import main; main()"]


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def model(tiny_bundle):
    return ClipModel(tiny_bundle, threads=1)


@pytest.fixture(scope="module")
def other_bundle(tiny_bundle, tmp_path_factory):
    """The same graphs under another name: another model id (a model switch needs --rebuild)."""
    other = tmp_path_factory.mktemp("other-model") / "other"
    shutil.copytree(tiny_bundle, other)
    meta = json.loads((other / "model.json").read_text())
    meta["name"] = "tiny-other"
    (other / "model.json").write_text(json.dumps(meta))
    return other


def _hits(searcher: Searcher) -> list[tuple[int, str]]:
    return [(h.id, h.path) for h in searcher.search(SearchQuery.build(text="a red square", k=100))]


def test_interrupted_rebuild_keeps_the_old_collection_serving_and_a_rerun_switches(tmp_path, model, other_bundle):
    photos = tmp_path / "photos"
    make_photos(photos, 16)
    root = tmp_path / "idx"
    collection = Collection.create("g", root)
    index_paths(collection, model, [str(photos)], IndexOptions(batch_size=4, workers=0))
    searcher = Searcher(Collection.open("g", root))  # a long-lived reader (the web app holds one)
    before = _hits(searcher)
    old_ids = {i for i, _ in before}
    assert len(before) == 16

    other = ClipModel(other_bundle, threads=1)
    seen_during: list = []

    def stop_half_way(done: int, total: int) -> None:
        if done >= 8:
            seen_during.append(_hits(searcher))  # the old generation still answers, unchanged
            raise Interrupted

    with pytest.raises(Interrupted):
        index_paths(Collection.open("g", root), other, [str(photos)], IndexOptions(batch_size=2, workers=0, rebuild=True),
                    progress=stop_half_way)
    assert seen_during == [before]
    assert _hits(searcher) == before
    with Collection.open("g", root) as reopened:
        assert reopened.model.model_id == model.model_id and reopened.store.count() == 16
        assert reopened.check().ok
    assert not (root / "g" / POINTER_FILE).exists()
    assert list_collections(root) == ["g"]

    # A new rebuild removes the half-built generation and completes; searchers follow the switch.
    summary = index_paths(Collection.open("g", root), other, [str(photos)],
                          IndexOptions(batch_size=4, workers=0, rebuild=True))
    assert summary.total == 16 and summary.added == 16
    generations = [p.name for p in (root / "g").iterdir() if p.name.startswith("gen-")]
    assert generations == [(root / "g" / POINTER_FILE).read_text().strip()]  # the half-built one is gone
    assert not (root / "g" / "meta.sqlite").exists()  # the old generation's data is gone
    after = _hits(searcher)
    assert {p for _, p in after} == {p for _, p in before}
    assert not old_ids & {i for i, _ in after}, "ids of the old generation are never handed out again"
    assert min(i for i, _ in after) > max(old_ids)
    assert searcher.collection_model.model_id == other.model_id
    with Collection.open("g", root) as switched:
        assert switched.model.model_id == other.model_id and switched.check().ok
        assert switched.stats().folder == str(root / "g")
    # Ordinary runs keep working on the new generation, and so does a second rebuild.
    block_image(999).save(photos / "new.png")
    assert index_paths(Collection.open("g", root), other, [str(photos)], IndexOptions(workers=0)).added == 1
    again = index_paths(Collection.open("g", root), model, [str(photos)], IndexOptions(workers=0, rebuild=True))
    assert again.total == 17
    assert [p.name for p in (root / "g").iterdir() if p.name.startswith("gen-")] == [
        (root / "g" / POINTER_FILE).read_text().strip()]
    assert len(_hits(searcher)) == 17 and searcher.collection_model.model_id == model.model_id


def test_killed_rebuild_leaves_the_old_collection_intact(tmp_path, model, tiny_bundle, other_bundle):
    total = 400  # enough that the rebuild is still running when it is killed
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(total):
        block_image(5000 + i, size=(40, 40)).save(folder / f"{i:04d}.png")
    root = tmp_path / "idx"
    index_paths(Collection.create("k", root), model, [str(folder)], IndexOptions(batch_size=64, workers=0))
    with Collection.open("k", root) as collection:
        searcher = Searcher(collection, model)
        before = _hits(searcher)
    env = {**os.environ, "CLIPSEARCH_HOME": str(tmp_path / "home")}
    command = [*CLI, "index", str(folder), "--collection", "k", "--index-dir", str(root), "--model", str(other_bundle),
               "--rebuild", "--batch-size", "1", "--workers", "0", "--threads", "1", "--json"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staged = root / "k" / "gen-1" / "meta.sqlite"
    deadline = time.time() + 120
    written = 0
    while time.time() < deadline and process.poll() is None:
        if staged.exists():
            try:
                import sqlite3

                with sqlite3.connect(f"file:{staged}?mode=ro", uri=True, timeout=1) as peek:
                    written = peek.execute("SELECT count(*) FROM images").fetchone()[0]
            except sqlite3.Error:
                written = 0
            if written >= 10:
                break
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 10 <= written < total, "the rebuild was not caught mid-way"

    with Collection.open("k", root) as collection:
        assert collection.model.model_id == model.model_id
        assert collection.store.count() == total and collection.check().ok
        assert _hits(Searcher(collection, model)) == before
    assert list_collections(root) == ["k"]

    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert json.loads(finished.stdout)["total"] == total
    with Collection.open("k", root) as collection:
        assert collection.model.model_id == ClipModel(other_bundle).model_id and collection.check().ok
        assert collection.store.count() == total
        assert min(collection.store.ids()) > max(i for i, _ in before)
    assert [p.name for p in (root / "k").iterdir() if p.name.startswith("gen-")] == [
        (root / "k" / POINTER_FILE).read_text().strip()]


def test_a_failed_index_with_an_unknown_model_leaves_no_collection(tmp_path, tiny_bundle):
    photos = tmp_path / "photos"
    make_photos(photos, 2)
    root = tmp_path / "idx"
    env = {**os.environ, "CLIPSEARCH_HOME": str(tmp_path / "home")}
    failed = subprocess.run([*CLI, "index", str(photos), "--collection", "x", "--index-dir", str(root),
                             "--model", "no-such-model"], env=env, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and "no model 'no-such-model'" in failed.stderr
    assert list_collections(root) == [] and not (root / "x" / "meta.sqlite").exists()
    # Nor does a first run that finds nothing to index.
    nothing = subprocess.run([*CLI, "index", str(tmp_path / "no-such-folder"), "--collection", "x", "--index-dir",
                              str(root), "--model", str(tiny_bundle)], env=env, capture_output=True, text=True, timeout=120)
    assert nothing.returncode == 1 and "nothing to index" in nothing.stderr
    assert list_collections(root) == [] and not (root / "x" / "meta.sqlite").exists()
    check = subprocess.run([*CLI, "check", "--collection", "x", "--index-dir", str(root)], env=env,
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 1 and "no collection named 'x'" in check.stderr and "None" not in check.stderr
    with pytest.raises(CollectionError, match="no collection named"):
        Collection.open("x", root)


def test_check_of_a_collection_without_a_model_says_so(tmp_path, tiny_bundle):
    from clipsearch.store.database import Store

    root = tmp_path / "idx"
    (root / "e").mkdir(parents=True)
    Store(root / "e" / "meta.sqlite").close()  # what older versions left after a failed first run
    with Collection.open("e", root) as collection:
        report = collection.check()
    assert not report.ok and "no model recorded" in report.problems[0] and "nothing was ever indexed" in report.problems[0]
    env = {**os.environ, "CLIPSEARCH_HOME": str(tmp_path / "home")}
    cli = subprocess.run([*CLI, "check", "--collection", "e", "--index-dir", str(root)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 1 and "no model recorded" in cli.stderr and "holds None" not in cli.stdout + cli.stderr


def test_an_unreadable_database_is_indexed_again_by_rebuild_with_model_as_its_hint_says(tmp_path, tiny_bundle):
    photos = tmp_path / "photos"
    make_photos(photos, 3)
    root = tmp_path / "idx"
    env = {**os.environ, "CLIPSEARCH_HOME": str(tmp_path / "home")}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, *args, "--collection", "u", "--index-dir", str(root)], env=env,
                              capture_output=True, text=True, timeout=120)

    assert cli("index", str(photos), "--model", str(tiny_bundle)).returncode == 0
    database = root / "u" / "meta.sqlite"
    for leftover in (database.with_name("meta.sqlite-wal"), database.with_name("meta.sqlite-shm")):
        leftover.unlink(missing_ok=True)
    database.write_bytes(b"this is not a database" * 100)
    plain = cli("index", str(photos))
    assert plain.returncode == 1 and "not a usable SQLite database" in plain.stderr
    assert "--rebuild --model MODEL" in plain.stderr  # the hint names what works
    # --rebuild alone cannot know the model an unreadable database recorded: the same error, no traceback.
    alone = cli("index", str(photos), "--rebuild")
    assert alone.returncode == 1 and "--rebuild --model MODEL" in alone.stderr and "Traceback" not in alone.stderr
    rebuilt = cli("index", str(photos), "--rebuild", "--model", str(tiny_bundle), "--json")
    assert rebuilt.returncode == 0, rebuilt.stderr
    summary = json.loads(rebuilt.stdout)
    assert (summary["added"], summary["total"]) == (3, 3)
    assert cli("check").returncode == 0
    assert not database.exists()  # the unreadable file went with the generation it belonged to
    with Collection.open("u", root) as collection:
        assert collection.store.count() == 3


def test_rebuild_of_one_folder_re_embeds_every_folder_indexed_before(tmp_path, model, other_bundle):
    """`index A --rebuild` on a collection of A and B kept only A's images (and said "0 removed"): re-embedding
    "everything" walks B too. A folder indexed before that is gone (an unplugged disk?) stops the rebuild, unless
    --forget-missing: then it is left out, and its images counted as removed."""
    a, b, gone = tmp_path / "a", tmp_path / "b", tmp_path / "gone"
    make_photos(a, 3)
    make_photos(b, 2, start_seed=50)
    make_photos(gone, 2, start_seed=90)
    root = tmp_path / "idx"
    for folder in (a, b, gone):
        index_paths(Collection.create("g", root), model, [str(folder)], IndexOptions(workers=0))
    shutil.rmtree(gone)
    command = [*CLI, "index", str(a), "--collection", "g", "--index-dir", str(root), "--rebuild", "--model",
               str(other_bundle), "--workers", "0", "--json"]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and f"also holds images from {gone}, which is not there now" in refused.stderr
    assert "--forget-missing" in refused.stderr and not list(root.glob("g/gen-*"))
    result = subprocess.run([*command, "--forget-missing"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["total"], summary["removed"]) == (5, 2)
    assert summary["rebuilt_roots"] == [str(b)]
    with Searcher.open("g", root) as searcher:
        assert searcher.collection.require_model().name == "tiny-other"
        paths = [p for _, p in _hits(searcher)]
        assert len(paths) == 5 and sum(p.startswith(str(a) + os.sep) for p in paths) == 3
        assert sum(p.startswith(str(b) + os.sep) for p in paths) == 2
    text = subprocess.run([*CLI, "index", str(a), "--collection", "g", "--index-dir", str(root), "--rebuild",
                           "--workers", "0"], capture_output=True, text=True, timeout=300)
    assert text.returncode == 0 and f"also re-embedded the folders indexed before: {b}" in text.stdout, text.stdout
