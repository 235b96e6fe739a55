"""The index policy (store/index/policy.py), tuned search knobs, growth, deletions and on-disk inverted lists."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clipsearch.store.index import vectors as vectors_module
from clipsearch.store.collection import Collection
from clipsearch.store.index.policy import ID_BYTES, MIN_CODE_BYTES, PADDING, choose_nlist, plan_index
from clipsearch.store.index.vectors import IndexLayout

GB = 1 << 30


def clustered(n: int, dim: int, seed: int = 0, centres: int = 200) -> np.ndarray:
    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centres, dim))
    x = middle[rng.integers(0, centres, n)] + 0.5 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# -- the policy: a pure function of size, dimensions and budget -------------------------------------------------

@pytest.mark.parametrize("count, dim, budget, kind, factory, on_disk", [
    (49_999, 512, 4 * GB, "flat", "IDMap,Flat", False),
    (49_999, 512, 1 << 20, "flat", "IDMap,Flat", False),  # over budget, but too small to compress
    (100_000, 512, 4 * GB, "ivfpq", "IVF1024,PQ256x4fs", False),
    (1_000_000, 384, 4 * GB, "ivfpq", "IVF4096,PQ192x4fs", False),
    (5_000_000, 512, 4 * GB, "ivfpq", "IVF16384_HNSW32,PQ256x4fs", False),
    (50_000_000, 512, 4 * GB, "ivfpq", "OPQ64_512,IVF65536_HNSW32,PQ64x4fs", False),  # 32-byte codes + OPQ
    (1_000_000_000, 512, 4 * GB, "ivfpq", "IVF65536_HNSW32,PQ64np", True),  # even 8-byte codes do not fit
])
def test_policy_choices(count, dim, budget, kind, factory, on_disk):
    plan = plan_index(count, dim, budget)
    assert (plan.kind, plan.factory, plan.on_disk) == (kind, factory, on_disk)
    assert plan.reasons and plan.budget_bytes == budget
    if kind == "ivfpq" and not on_disk:
        assert plan.resident_bytes <= budget
        assert 39 * plan.nlist <= plan.train_points <= 256 * plan.nlist


def test_policy_nlist_and_codes_follow_the_rules():
    assert choose_nlist(250_000) == 2048 and choose_nlist(1_000_000) == 4096  # ≈ 4√N
    assert choose_nlist(3_000_000) == 16_384 and choose_nlist(30_000_000) == 65_536
    assert choose_nlist(2_000) == 32  # at least 39 training points per list
    tight = plan_index(10_000_000, 512, 400 << 20)
    assert tight.opq and tight.code_bytes == 16 and not tight.on_disk
    assert plan_index(10_000_000, 512, 330 << 20).code_bytes == MIN_CODE_BYTES
    roomy = plan_index(10_000_000, 512, 64 * GB)
    assert not roomy.opq and roomy.code_bytes == 128
    # The old layout string is what the policy picks at 100k x 512 with room to spare.
    assert IndexLayout.for_size(100_000, 512, budget_bytes=4 * GB).factory == "IDMap,IVF1024,PQ256x4fs,RFlat"


# -- built through the real path: recall, tuned knobs, nprobe -------------------------------------------------

@pytest.fixture(scope="module")
def sixty_k(tmp_path_factory):
    """60,000 clustered vectors (dim 64) in a collection, indexed by `update_vectors` as `clipsearch index` does."""
    n, dim = 60_000, 64
    x = clustered(n, dim)
    index_dir = tmp_path_factory.mktemp("policy") / "collections"
    info = _fake_info(dim)
    collection = Collection.create("sixty", index_dir)
    collection.bind_model(info)
    rows = [synthetic_row(i, x[i]) for i in range(n)]
    ids = np.asarray(collection.store.write_images(rows, info.model_id, collection.store.next_run_id(), "2026-01-01"))
    sync = collection.update_vectors()
    assert sync.update == "rebuild"
    collection.close()
    return index_dir, ids, x


def _fake_info(dim: int):
    """What `Collection.bind_model` reads of a bundle: synthetic vectors need no model."""
    from types import SimpleNamespace

    return SimpleNamespace(model_id=f"synthetic-{dim}", name="synthetic", path=Path("/nonexistent"), embed_dim=dim)


def synthetic_row(i: int, vector: np.ndarray):
    from clipsearch.store.database import NewImage

    return NewImage(path=f"/lib/img{i:06d}.jpg", size=1000 + i, mtime_ns=i, content_hash=f"{i:032x}", width=640,
                    height=480, taken_at=None, vector=vector)


def _recall(found: list[list[tuple[int, float]]], exact: np.ndarray) -> float:
    return float(np.mean([len({i for i, _ in f} & set(e.tolist())) / len(e) for f, e in zip(found, exact)]))


def test_sixty_thousand_vectors_reach_the_target_recall(sixty_k):
    index_dir, ids, x = sixty_k
    with Collection.open("sixty", index_dir) as collection:
        index = collection.load_vectors(mmap=True)
        stats = collection.stats()
    layout = index.meta.layout
    assert layout.kind == "ivfpq" and layout.target_recall == 0.95 and layout.tuned_recall >= 0.95
    rng = np.random.default_rng(7)
    queries = x[rng.choice(len(x), 200, replace=False)] + 0.1 * rng.standard_normal((200, x.shape[1])).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = ids[np.argsort(-(queries @ x.T), axis=1)[:, :10]]
    assert _recall(index.search(queries, 10), exact) >= 0.95
    # Scores are exact inner products (the refine stage reads the mapped full vectors).
    first_id, first_score = index.search(queries[:1], 1)[0][0]
    assert first_score == pytest.approx(float(queries[0] @ x[np.searchsorted(ids, first_id)]), abs=1e-5)
    # Tuned values are in the sidecar and in stats.
    assert stats.index_nprobe == layout.nprobe and stats.index_refine_factor == layout.refine_factor
    assert stats.index_recall == layout.tuned_recall and stats.index_factory == layout.factory
    assert stats.index_trained_on == len(ids) and stats.index_train_reason == "first IVF-PQ build"
    # --nprobe per query changes what is found: one list finds less than all of them.
    one = _recall(index.search(queries, 10, nprobe=1), exact)
    every = _recall(index.search(queries, 10, nprobe=layout.nlist), exact)
    assert one < every and every >= 0.95


def test_queries_off_the_data_like_texts_reach_the_target_on_their_own(sixty_k):
    # Tuned on the average of on-data and off-data queries, the easy half hid the hard one: text queries, which sit
    # apart from the images, got recall@10 0.89 where the index said 0.974.
    from clipsearch.store.index.tuning import OFF_DATA

    index_dir, ids, x = sixty_k
    with Collection.open("sixty", index_dir) as collection:
        index = collection.load_vectors(mmap=True)
    rng = np.random.default_rng(11)  # other queries than the tuner's own
    noise = rng.standard_normal((300, x.shape[1])).astype(np.float32)
    queries = x[rng.choice(len(x), 300, replace=False)] + OFF_DATA * noise / np.linalg.norm(noise, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact = ids[np.argsort(-(queries @ x.T), axis=1)[:, :10]]
    assert _recall(index.search(queries, 10), exact) >= 0.94  # the target is 0.95 on the tuner's own 100


def test_the_hits_asked_past_k_come_from_the_candidates_the_index_was_tuned_for(sixty_k):
    """Hits past k are fetched so ties at the cut are ordered like the rest: the refine stage still re-scores the
    k_factor x k candidates it was tuned with, so a page's hits (and latency) are those of a plain FAISS search."""
    index_dir, ids, x = sixty_k
    with Collection.open("sixty", index_dir) as collection:
        index = collection.load_vectors(mmap=True)
    rng = np.random.default_rng(3)
    queries = x[rng.choice(len(x), 100, replace=False)] + 0.2 * rng.standard_normal((100, x.shape[1])).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    _, plain = index.index.search(queries, 10)  # the tuned nprobe and refine factor, k = 10
    ours = index.search(queries, 10)
    assert [sorted(i for i, _ in row) for row in ours] == [sorted(row.tolist()) for row in plain]


def test_a_large_k_is_never_short(sixty_k):
    """The tuned nprobe probes a few lists, enough for a page of results but not for k = 1,000: nprobe rises with k,
    and a k the lists cannot fill is answered from the full vectors. Every answer has k hits, best first, and its
    top ten are the exact top ten."""
    index_dir, ids, x = sixty_k
    with Collection.open("sixty", index_dir) as collection:
        index = collection.load_vectors(mmap=True)
    layout = index.meta.layout
    rng = np.random.default_rng(11)
    queries = x[rng.choice(len(x), 5, replace=False)]
    exact = ids[np.argsort(-(queries @ x.T), axis=1)]
    for k in (300, 1_000, 5_000):
        found = index.search(queries, k)
        assert [len(row) for row in found] == [k] * len(queries)
        for row, best in zip(found, exact):
            scores = [score for _, score in row]
            assert scores == sorted(scores, reverse=True) and len({i for i, _ in row}) == k
            assert _recall([row[:10]], best[None, :10]) >= 0.9
    # What the tuned nprobe alone gives back (the lists it probes hold fewer candidates than k asks for).
    assert min(len(row) for row in index.search(queries, 5_000, nprobe=layout.nprobe)) < 5_000


def test_stats_cli_shows_the_tuned_values(sixty_k):
    index_dir, _, _ = sixty_k
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = lambda *extra: subprocess.run([sys.executable, "-m", "clipsearch", "stats", "-c", "sixty", "--index-dir",
                                         str(index_dir), *extra], capture_output=True, text=True, env=env, check=True)
    info = json.loads(run("--json").stdout)
    assert info["index_nprobe"] >= 1 and info["index_refine_factor"] >= 1 and info["index_recall"] >= 0.95
    text = run().stdout
    assert f"nprobe {info['index_nprobe']} of {info['index_nlist']} lists" in text and "why" in text


def test_resident_memory_is_near_the_code_size(sixty_k):
    index_dir, ids, _ = sixty_k
    with Collection.open("sixty", index_dir) as collection:
        index = collection.load_vectors(mmap=True)
    per_vector = index.resident_bytes() / len(ids)
    assert per_vector < 4 * 64 / 2  # codes of d/4 bytes + ids, far below the 256 bytes of the full vectors


# -- growth, deletions ---------------------------------------------------------------------------------------

def _write(collection, info, x, start):
    rows = [synthetic_row(start + i, v) for i, v in enumerate(x)]
    return collection.store.write_images(rows, info.model_id, collection.store.next_run_id(), "2026-01-01")


@contextmanager
def synthetic_collection(root, name: str, dim: int, count: int, seed: int):
    """A new collection bound to a synthetic model of `dim` dimensions, with `count` clustered vectors to write."""
    info = _fake_info(dim)
    x = clustered(count, dim, seed=seed)
    with Collection.create(name, root) as collection:
        collection.bind_model(info)
        yield collection, info, x


def test_growth_appends_without_retraining_then_retrains_after_outgrowing(tmp_path):
    with synthetic_collection(tmp_path, "grow", 32, 30_000, seed=3) as (collection, info, x):
        _write(collection, info, x[:2_000], 0)
        assert collection.update_vectors(ivf_threshold=1_000).update == "rebuild"
        first = collection.load_vectors().meta
        assert first.trained_on == 2_000
        _write(collection, info, x[2_000:10_000], 2_000)  # 5x: appended, same quantizer
        assert collection.update_vectors(ivf_threshold=1_000).update == "append"
        meta = collection.load_vectors().meta
        assert meta.trained_on == 2_000 and meta.count == 10_000 and meta.trained_at == first.trained_at
        grown = 8_000 * (first.layout.code_bytes * PADDING + ID_BYTES)  # `stats` counts the appended codes and ids
        assert collection.stats().index_resident_bytes == int(first.layout.resident_bytes + grown)
        _write(collection, info, x[10_000:], 10_000)  # 15x: outgrown, retrained
        assert collection.update_vectors(ivf_threshold=1_000).update == "rebuild"
        meta = collection.load_vectors().meta
        assert meta.trained_on == 30_000 and "15.0x the 2,000" in meta.train_reason
        assert collection.check().ok


def test_added_vectors_unlike_the_trained_ones_retrain_the_quantizer_and_are_found(tmp_path):
    # Appended without retraining, 15k vectors of new clusters added to 100k were found at recall@10 0.17.
    with synthetic_collection(tmp_path, "drift", 32, 6_000, seed=3) as (collection, info, x):
        _write(collection, info, x[:5_000], 0)
        assert collection.update_vectors(ivf_threshold=1_000).update == "rebuild"
        first = collection.load_vectors().meta
        assert first.trained_max_id == first.max_id
        _write(collection, info, x[5_000:], 5_000)  # more of the same clusters: appended, same quantizer
        assert collection.update_vectors(ivf_threshold=1_000).update == "append"
        meta = collection.load_vectors().meta
        assert meta.trained_at == first.trained_at and meta.trained_max_id == first.trained_max_id
        new_kind = clustered(1_000, 32, seed=99)  # other clusters: photos of a kind the quantizer never saw
        _write(collection, info, new_kind, 6_000)
        assert collection.update_vectors(ivf_threshold=1_000).update == "rebuild"
        index = collection.load_vectors()
        assert index.meta.trained_on == 7_000 and "added since training" in index.meta.train_reason
        assert index.meta.trained_max_id == index.meta.max_id
        # Queries near the new photos (not the photos themselves) find what exact search finds: 0.84 appended.
        every = np.concatenate([x, new_kind])
        every_ids, _ = collection.store.all_vectors(32)
        queries = new_kind[:100] + 0.5 * np.random.default_rng(1).standard_normal((100, 32)).astype(np.float32) / 32**0.5
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        exact = np.argsort(-(queries @ every.T), axis=1)[:, :10]
        recall = [len({i for i, _ in row} & set(every_ids[exact[n]].tolist())) / 10
                  for n, row in enumerate(index.search(queries, 10))]
        assert np.mean(recall) >= 0.93, np.mean(recall)
        assert collection.check().ok


def low_rank(n: int, dim: int, rank: int, rng) -> np.ndarray:
    """Unit vectors around one direction that vary in `rank` dimensions (a model's embeddings are of low rank)."""
    basis = np.random.default_rng(42).standard_normal((rank, dim)).astype(np.float32)
    centre = np.random.default_rng(43).standard_normal(dim).astype(np.float32)
    x = (3 * centre / np.linalg.norm(centre) + 3 * rng.standard_normal((n, rank)).astype(np.float32) @ basis / dim**0.5
         + 0.3 * rng.standard_normal((n, dim)).astype(np.float32) / dim**0.5)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_added_vectors_of_the_same_kind_are_appended_in_many_dimensions(tmp_path):
    # Judged against the training points' own distances (biased low), vectors of the same kind looked new: in 512
    # dimensions 10-13% of them, so nearly every run adding 200 photos retrained. The limit comes from held-out ones.
    rng = np.random.default_rng(0)
    with synthetic_collection(tmp_path, "same", 512, 1, seed=0) as (collection, info, _):
        _write(collection, info, low_rank(12_000, 512, 64, rng), 0)
        assert collection.update_vectors(ivf_threshold=1_000).update == "rebuild"
        assert collection.load_vectors().meta.drift_limit > 0
        for start in (12_000, 13_000):
            _write(collection, info, low_rank(1_000, 512, 64, rng), start)
            assert collection.update_vectors(ivf_threshold=1_000).update == "append"


def test_an_appended_exact_index_states_its_new_size(tmp_path):
    """`stats` reads the layout's memory and reason from the sidecar: after an append they describe the index as
    it now is, not as it was first built."""
    dim = 16
    with synthetic_collection(tmp_path, "small", dim, 60, seed=5) as (collection, info, x):
        _write(collection, info, x[:50], 0)
        assert collection.update_vectors(ivf_threshold=1_000).update == "rebuild"
        _write(collection, info, x[50:], 50)
        assert collection.update_vectors(ivf_threshold=1_000).update == "append"
        stats = collection.stats()
    assert stats.index_count == 60 and stats.index_resident_bytes == 60 * (4 * dim + 8)
    assert stats.index_reasons == ("60 vectors < 1,000: exact search is fast enough",)


def test_an_index_built_while_another_process_commits_rows_is_of_one_moment(tmp_path):
    """A searcher builds the index from SQLite while an indexing run commits: the count, the generation and the
    rows it reads are of one read transaction (it failed with "built an index of 748 vectors, expected 740")."""
    with synthetic_collection(tmp_path, "busy", 16, 80, seed=9) as (writer, info, x):
        _write(writer, info, x[:40], 0)
        with Collection.open("busy", tmp_path) as reader:
            real_iter = reader.store.iter_vectors

            def rows_committed_meanwhile(*args, **kwargs):
                _write(writer, info, x[40:], 40)  # another connection commits between the count and the rows
                return real_iter(*args, **kwargs)

            reader.store.iter_vectors = rows_committed_meanwhile
            index = reader.build_vectors(ivf_threshold=1_000)
            assert index.count == 40 and index.meta.generation < writer.store.generation
            reader.store.iter_vectors = real_iter
            assert reader.build_vectors(ivf_threshold=1_000).count == 80


def test_deletions_remove_ids(tmp_path):
    with synthetic_collection(tmp_path, "del", 32, 5_000, seed=4) as (collection, info, x):
        ids = _write(collection, info, x, 0)
        collection.update_vectors(ivf_threshold=1_000)
        gone = list(ids[100:200])
        collection.store.db.execute(f"DELETE FROM embeddings WHERE id IN ({','.join(map(str, gone))})")
        collection.store.db.execute(f"DELETE FROM images WHERE id IN ({','.join(map(str, gone))})")
        collection.store._bump_generation()
        assert collection.update_vectors(ivf_threshold=1_000).update == "rebuild"
        index = collection.load_vectors()
        assert not set(gone) & set(index.ids().tolist()) and index.count == 4_900
        hits = index.search(x[100:110], 5)
        assert all(i not in gone for row in hits for i, _ in row)
        assert collection.check().ok


# -- on-disk inverted lists ----------------------------------------------------------------------------------

def test_on_disk_lists_search_like_in_memory_lists(tmp_path):
    dim = 32
    info = _fake_info(dim)
    x = clustered(6_000, dim, seed=5)
    results = {}
    for name, budget in (("memory", 4 * GB), ("disk", 50_000)):  # 50 kB: not even 8-byte codes fit
        with Collection.create(name, tmp_path) as collection:
            collection.bind_model(info)
            collection.set_index_memory_budget(budget)
            _write(collection, info, x, 0)
            collection.update_vectors(ivf_threshold=1_000)
            index = collection.load_vectors()
            assert index.meta.layout.on_disk == (name == "disk")
            results[name] = index.search(x[:50], 10, nprobe=index.meta.layout.nlist)  # every list: exact
            assert collection.check().ok
            if name == "disk":
                files = sorted(p.name for p in collection.folder.iterdir() if p.name.startswith("vectors-"))
                assert [Path(f).suffix for f in files] == [".ivfdata", ".lists"]
                assert collection.stats().index_on_disk
    assert [[i for i, _ in row] for row in results["disk"]] == [[i for i, _ in row] for row in results["memory"]]


_ON_DISK_RUN = """
import sys
from pathlib import Path
from test_index_policy import _fake_info, _write, clustered
from clipsearch.store.collection import Collection

root, info, x = Path(sys.argv[1]), _fake_info(32), clustered(3_000, 32, seed=5)
with Collection.create("disk", root) as collection:
    collection.bind_model(info)
    collection.set_index_memory_budget(50_000)  # inverted lists on disk
    _write(collection, info, x[:2_000], 0)
    collection.update_vectors(ivf_threshold=1_000)
    _write(collection, info, x[2_000:], 2_000)
    collection.update_vectors(ivf_threshold=1_000)  # appended: merged into new on-disk lists
with Collection.open("disk", root) as collection:
    print(collection.load_vectors().count)
"""


def test_on_disk_lists_print_nothing_into_stdout(tmp_path):
    # FAISS printed "resizing ...ivfdata" and "IO_FLAG_ONDISK_SAME_DIR: updating ondisk filename ..." into stdout,
    # ahead of `search --json` and `import-embeddings --json` output.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                     os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", _ON_DISK_RUN, str(tmp_path)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == "3000\n"
    assert "ondisk filename" in result.stderr  # FAISS's notes are not lost, they go to stderr


def test_a_new_memory_budget_is_applied_by_the_next_run_even_with_nothing_new(tmp_path):
    # It was remembered, but the index kept its old layout until a delete or an update made it rebuild.
    with synthetic_collection(tmp_path, "budget", 32, 6_000, seed=5) as (collection, info, x):
        _write(collection, info, x, 0)
        assert collection.update_vectors(ivf_threshold=1_000).update == "rebuild"
        assert not collection.load_vectors().meta.layout.on_disk
        collection.set_index_memory_budget(50_000)  # `index --max-index-memory 50KB`: lists go on disk
        assert collection.update_vectors(ivf_threshold=1_000).update == "rebuild"
        assert collection.load_vectors().meta.layout.on_disk
        assert collection.update_vectors(ivf_threshold=1_000).update == "none"  # applied once, not at every run
        assert collection.check().ok


def test_a_reader_without_a_saved_index_searches_exactly_instead_of_training_one(tmp_path):
    # After a run was killed while it built the IVF-PQ index, every search trained and tuned one anew (7 s at 60k).
    from clipsearch.store.index.vectors import INDEX_FILE, SIDECAR_FILE

    with synthetic_collection(tmp_path, "killed", 32, 3_000, seed=6) as (collection, info, x):
        ids = _write(collection, info, x, 0)
        collection.update_vectors(ivf_threshold=1_000)
        for name in (INDEX_FILE, SIDECAR_FILE):
            (collection.folder / name).unlink()
        index = collection.load_vectors(ivf_threshold=1_000)
        assert index.meta.layout.kind == "flat" and index.count == 3_000
        assert [row[0][0] for row in index.search(x[:20], 1)] == list(ids[:20])
        collection.set_index_memory_budget(100_000)  # less than the 384 kB of vectors: not held whole
        assert collection.load_vectors(ivf_threshold=1_000).meta.layout.kind == "ivfpq"


_OVERLAPPING_SWAPS = """
import os, sys, threading, time
from clipsearch.store.index.vectors import _faiss_notes_to_stderr

before = os.fstat(1)
inside = threading.Barrier(2, timeout=10)

def swap(second):
    if second:
        inside.wait()
    with _faiss_notes_to_stderr():
        if second:
            time.sleep(0.4)  # leaves after the first one did
        else:
            inside.wait()  # the second thread now enters while this one is inside
            time.sleep(0.1)

threads = [threading.Thread(target=swap, args=(second,)) for second in (False, True)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join(30)
after = os.fstat(1)
print("same" if (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino) else "moved")
"""


def test_overlapping_swaps_of_stdout_leave_it_where_it_was():
    # Two threads in the swap at once (a server loading two collections with on-disk lists) left fd 1 on stderr.
    result = subprocess.run([sys.executable, "-c", _OVERLAPPING_SWAPS], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout == "same\n", (result.stdout, result.stderr[-2000:])


def test_on_disk_lists_load_with_stdout_closed(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                     os.environ.get("PYTHONPATH")]))}
    script = _ON_DISK_RUN.replace("print(collection.load_vectors().count)",
                                  "sys.stderr.write(str(collection.load_vectors().count))")
    # `serve >&-`: Python starts with sys.stdout None (and fd 1 free for the next file opened)
    result = subprocess.run(["sh", "-c", 'exec "$0" -c "$1" "$2" 1>&-', sys.executable, script, str(tmp_path)],
                            stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stderr.endswith("3000"), result.stderr[-2000:]


# -- the composite file and crash safety ---------------------------------------------------------------------

def test_streamed_file_equals_faiss_own_serialisation(tmp_path):
    import faiss

    dim, n = 16, 500
    x = clustered(n, dim)
    base = faiss.index_factory(dim, "IVF4,PQ8x4fs", faiss.METRIC_INNER_PRODUCT)
    base.train(x)
    ids = np.arange(n, dtype=np.int64) * 3 + 1
    reference = faiss.IndexIDMap(faiss.IndexRefine(faiss.clone_index(base), faiss.IndexFlatIP(dim)))
    reference.add_with_ids(x, ids)
    faiss.downcast_index(reference.index).k_factor = 4.0
    streamed = faiss.clone_index(base)
    streamed.add(x)
    vectors_module._compose(tmp_path / "f", streamed, iter([x[:200], x[200:]]), ids, dim, 4.0)
    assert (tmp_path / "f").read_bytes() == bytes(faiss.serialize_index(reference))


def test_a_killed_save_leaves_the_old_index_and_is_cleaned_up(tmp_path):
    """Killed after the new index file was written but before it was moved into place: the saved index still
    loads and answers, and the next writer removes the leftovers."""
    dim = 32
    with synthetic_collection(tmp_path, "kill", dim, 3_000, seed=6) as (collection, info, x):
        _write(collection, info, x[:2_000], 0)
        collection.update_vectors(ivf_threshold=1_000)
        folder = collection.folder
    script = f"""
import os, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from clipsearch.store.index import vectors
from clipsearch.store.collection import Collection
from test_index_policy import _fake_info, _write, clustered
def die(*args, **kwargs):
    os._exit(9)
vectors.os.replace = die
with Collection.open("kill", {str(tmp_path)!r}) as c:
    _write(c, _fake_info({dim}), clustered(3_000, {dim}, seed=6)[2_000:], 2_000)
    c.update_vectors(ivf_threshold=1_000)
"""
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert any(p.name.endswith(".tmp") for p in folder.iterdir())
    with Collection.open("kill", tmp_path) as collection:
        index = collection.load_vectors(ivf_threshold=1_000)  # the old index, as saved
        assert index.count == 2_000 and index.search(x[:1], 1)[0][0][1] == pytest.approx(1.0, abs=1e-5)
        with collection.writer_lock():
            assert not any(p.name.endswith(".tmp") for p in folder.iterdir())
            assert collection.update_vectors(ivf_threshold=1_000).update == "append"
        assert collection.load_vectors().count == 3_000 and collection.check().ok
