"""The SQLite store: a collection opened by several processes at once (an indexer and a reader) while it
is being created must not fail, and its counts stay consistent."""

from __future__ import annotations

import multiprocessing

from clipsearch.store.database import Store


def _open_and_count(path: str) -> int:
    from pathlib import Path

    with Store(Path(path)) as store:
        return store.count()


def test_concurrent_first_opens_of_a_new_store_all_succeed(tmp_path):
    context = multiprocessing.get_context("spawn")
    for trial in range(3):
        path = str(tmp_path / f"t{trial}" / "meta.sqlite")
        (tmp_path / f"t{trial}").mkdir()
        with context.Pool(4) as pool:
            assert pool.map(_open_and_count, [path] * 8) == [0] * 8
        with Store(tmp_path / f"t{trial}" / "meta.sqlite") as store:
            tables = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            assert {"images", "embeddings", "skipped", "meta", "text_cache"} <= tables


# -- ids, schema versions and migrations ------------------------------------------------------------

import sqlite3  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from clipsearch.errors import CollectionError  # noqa: E402
from clipsearch.store.database import SCHEMA_VERSION, NewImage  # noqa: E402

# The schema clipsearch wrote before schema versions existed (v1: user_version 0, ids reusable).
V1_DDL = """
CREATE TABLE "images" ("id" INTEGER PRIMARY KEY, "path" TEXT NOT NULL, "size" INTEGER NOT NULL,
   "mtime_ns" INTEGER NOT NULL, "content_hash" TEXT NOT NULL, "width" INTEGER, "height" INTEGER, "taken_at" TEXT,
   "indexed_at" TEXT NOT NULL, "model_id" TEXT NOT NULL, "run_id" INTEGER);
CREATE UNIQUE INDEX "idx_images_path" ON "images" ("path");
CREATE INDEX "idx_images_content_hash" ON "images" ("content_hash");
CREATE TABLE "embeddings" ("id" INTEGER PRIMARY KEY REFERENCES "images"("id"), "vector" BLOB, "written_gen" INTEGER);
CREATE TABLE "skipped" ("path" TEXT PRIMARY KEY, "size" INTEGER, "mtime_ns" INTEGER, "reason" TEXT, "run_id" INTEGER);
CREATE TABLE "meta" ("key" TEXT PRIMARY KEY, "value" TEXT);
CREATE TABLE "text_cache" ("model_id" TEXT, "text" TEXT, "vector" BLOB, "used_at" REAL, PRIMARY KEY ("model_id", "text"));
"""


def _image(path: str, seed: int = 0) -> NewImage:
    vector = np.random.default_rng(seed).standard_normal(4).astype(np.float32)
    return NewImage(path=path, size=1, mtime_ns=1, content_hash=f"{seed:032x}", width=1, height=1, taken_at=None,
                    vector=vector)


def _v1_database(path, ids=(1, 2, 3)) -> None:
    conn = sqlite3.connect(path)
    conn.executescript(V1_DDL)
    for i in ids:
        conn.execute("INSERT INTO images VALUES (?, ?, 1, 1, ?, 1, 1, NULL, 'then', 'm@1', 1)", [i, f"/p/{i}.png", f"{i:032x}"])
        conn.execute("INSERT INTO embeddings VALUES (?, ?, 1)", [i, np.full(4, i, np.float32).tobytes()])
    conn.execute("INSERT INTO meta VALUES ('model_id', 'm@1'), ('generation', '1')")
    conn.commit()
    conn.close()


def test_ids_of_deleted_rows_are_never_handed_out_again(tmp_path):
    with Store(tmp_path / "meta.sqlite") as store:
        ids = store.write_images([_image("/a", 1), _image("/b", 2), _image("/c", 3)], "m@1", 1, "now")
        store.delete_ids([ids[-1]])  # the largest id: SQLite without AUTOINCREMENT would reuse it
        (again,) = store.write_images([_image("/d", 4)], "m@1", 1, "now")
        assert again > ids[-1]
        # A file re-written under the same path gets a new id too.
        (replaced,) = store.write_images([_image("/d", 5)], "m@1", 2, "now")
        assert replaced > again and store.count() == 3
        assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_v1_database_is_migrated_in_place_keeping_its_ids(tmp_path):
    path = tmp_path / "meta.sqlite"
    _v1_database(path, ids=(1, 2, 7))
    with Store(path) as store:
        assert store.migrated_from == 0
        assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        ddl = store.conn.execute("SELECT sql FROM sqlite_master WHERE name = 'images'").fetchone()[0]
        assert "AUTOINCREMENT" in ddl
        assert store.ids().tolist() == [1, 2, 7] and store.embedding_ids().tolist() == [1, 2, 7]
        assert store.get(7).path == "/p/7.png" and store.vector(7, 4).tolist() == [7.0] * 4
        assert store.get_meta("model_id") == "m@1" and store.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        indexes = {r[0] for r in store.conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"idx_images_path", "idx_images_content_hash"} <= indexes
        store.delete_ids([7])
        (new_id,) = store.write_images([_image("/new", 9)], "m@1", 2, "now")
        assert new_id == 8
    with Store(path) as store:  # opened again: nothing left to migrate
        assert store.migrated_from is None and store.count() == 3


def test_migration_keeps_ids_a_saved_index_holds_out_of_reach(tmp_path):
    from clipsearch.store.collection import Collection

    folder = tmp_path / "idx" / "c"
    folder.mkdir(parents=True)
    _v1_database(folder / "meta.sqlite", ids=(1, 2))
    # A FAISS index saved when id 5 still existed (deleted since, SQLite v1 would hand it out again).
    (folder / "vectors.json").write_text('{"layout": {"kind": "flat", "factory": "IDMap,Flat"}, "dim": 4, '
                                         '"count": 3, "model_id": "m@1", "generation": 1, "max_id": 5}')
    with Collection.open("c", tmp_path / "idx") as collection:
        (new_id,) = collection.store.write_images([_image("/n", 1)], "m@1", 2, "now")
    assert new_id == 6


def test_a_newer_schema_is_refused_clearly(tmp_path):
    path = tmp_path / "meta.sqlite"
    Store(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(CollectionError, match=f"schema version {SCHEMA_VERSION + 1} is newer"):
        Store(path)


def test_concurrent_first_opens_of_a_v1_database_migrate_once(tmp_path):
    path = tmp_path / "meta.sqlite"
    _v1_database(path)
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        assert pool.map(_open_and_count, [str(path)] * 8) == [3] * 8
    with Store(path) as store:
        assert store.ids().tolist() == [1, 2, 3]


# -- the query text cache ---------------------------------------------------------------------------

def test_text_cache_evicts_the_least_recently_used_and_touches_rows_rarely(tmp_path):
    from clipsearch.store.database import TEXT_CACHE_TOUCH_SECONDS

    vec = {t: np.full(4, i, np.float32) for i, t in enumerate("abcd")}
    with Store(tmp_path / "meta.sqlite") as store:
        for i, text in enumerate("abc"):
            store.cache_text_vectors("m", {text: vec[text]}, now=1000.0 + i, keep=3)

        def used_at(text):
            return store.conn.execute("SELECT used_at FROM text_cache WHERE text = ?", [text]).fetchone()[0]

        # A hit soon after the last use writes nothing...
        changes = store.conn.total_changes
        assert set(store.cached_text_vectors("m", ["a"], 4, now=1000.0 + TEXT_CACHE_TOUCH_SECONDS / 2)) == {"a"}
        assert store.conn.total_changes == changes and used_at("a") == 1000.0
        # ...a later one marks the row used, so "a" outlives "b", which was cached after it but not used since.
        later = 1000.0 + 2 * TEXT_CACHE_TOUCH_SECONDS
        assert store.cached_text_vectors("m", ["a", "zzz"], 4, now=later)["a"].tolist() == [0.0] * 4
        assert used_at("a") == later
        store.cache_text_vectors("m", {"d": vec["d"]}, now=later + 1, keep=3)
        cached = {r[0] for r in store.conn.execute("SELECT text FROM text_cache")}
        assert cached == {"a", "c", "d"}


def test_text_cache_eviction_waits_for_a_tenth_more_than_it_keeps(tmp_path):
    """Eviction sorts the whole table, so it runs once the cache holds keep + keep/10 rows, then back to keep."""
    def rows(store):
        return store.conn.execute("SELECT count(*) FROM text_cache").fetchone()[0]

    with Store(tmp_path / "meta.sqlite") as store:
        for i in range(11):
            store.cache_text_vectors("m", {f"t{i}": np.full(4, i, np.float32)}, now=1000.0 + i, keep=10)
        assert rows(store) == 11  # a tenth over: nothing evicted yet
        store.cache_text_vectors("m", {"t11": np.full(4, 11, np.float32)}, now=2000.0, keep=10)
        kept = {r[0] for r in store.conn.execute("SELECT text FROM text_cache")}
        assert kept == {f"t{i}" for i in range(2, 12)}  # the two least recently used went


def test_a_read_only_v1_database_can_still_be_read(tmp_path, monkeypatch):
    path = tmp_path / "meta.sqlite"
    _v1_database(path)

    def read_only(self):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(Store, "_upgrade_schema", read_only)  # what a read-only mount answers (tests run as root)
    with Store(path) as store:
        assert store.count() == 3 and store.get(2).path == "/p/2.png"
        assert store.conn.execute("PRAGMA user_version").fetchone()[0] == 0
    monkeypatch.undo()
    with Store(path) as store:  # writable again: migrated as usual
        assert store.migrated_from == 0


def test_ctrl_c_during_a_write_transaction_lands_after_it_commits(tmp_path):
    """A signal that arrives while a transaction runs is held back until it has committed (no half-finished
    `atomic()` left for the garbage collector), then unwinds as usual."""
    import os
    import signal
    import time

    from clipsearch.store.database import signals_deferred

    store = Store(tmp_path / "s.sqlite")
    reached_the_end = False
    with pytest.raises(KeyboardInterrupt):
        with signals_deferred(), store.db.atomic():
            store.db.execute("INSERT INTO meta (key, value) VALUES ('probe', '1')")
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # a handler would have run by now if the signal were not held back
            reached_the_end = True
    assert reached_the_end
    assert store.get_meta("probe") == "1"
    store.close()


def test_the_other_model_hint_names_a_bundled_model_as_typed(tmp_path, tiny_bundle):
    from clipsearch.errors import CollectionError
    from clipsearch.model.bundle import read_bundle
    from clipsearch.model.resolve import BUNDLED_DIR
    from clipsearch.store.collection import Collection

    with Collection.create("c", tmp_path) as collection:
        collection.bind_model(read_bundle(BUNDLED_DIR / "emoji-mini"))
        with pytest.raises(CollectionError) as refused:
            collection.bind_model(read_bundle(tiny_bundle))
    assert "Use --model emoji-mini, or another --collection" in refused.value.hint  # not the package's folder


def test_write_images_takes_rows_made_as_they_are_written(tmp_path):
    # An import hands its rows over as a generator: a whole shard's vectors were held at once (300k rows: 1.14 GB).
    made = []

    def rows():
        for i in range(5):
            made.append(i)
            yield _image(f"/g{i}", i)

    with Store(tmp_path / "meta.sqlite") as store:
        before = store.generation
        assert store.write_images(iter(()), "m@1", 1, "now") == [] and store.generation == before  # nothing: no bump
        ids = store.write_images(rows(), "m@1", 1, "now")
        assert made == [0, 1, 2, 3, 4] and len(ids) == 5 and store.count() == 5 and store.generation > before
        assert np.array_equal(store.vector(ids[3], 4), _image("/g3", 3).vector)
