"""The SQLite store: a collection opened by several processes at once (an indexer and a reader) while it
is being created must not fail, and its counts stay consistent."""

from __future__ import annotations

import multiprocessing

from clipsearch.store import Store


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
