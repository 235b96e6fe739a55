"""Building an IVF index from shard jobs (store/index/parallel_build.py, run here through `serial_map`) gives the
same index as VectorIndex's serial build with the same trained quantizer: the same inverted lists (labels and
codes, list by list), refine vectors, id map, tuned knobs and search results, for every IVF layout the policy
picks (4-bit fast-scan PQ, OPQ with smaller codes, on-disk lists)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from clipsearch.store.index.parallel_build import (ParallelAdd, ShardLists, add_shard, list_content, merge_lists,
                                                   serial_map, shard_jobs)
from clipsearch.store.index.vectors import IndexLayout, VectorIndex

N, DIM, SHARD = 12_000, 64, 4_500  # three shard jobs: 4,500 + 4,500 + 3,000 vectors


def clustered(n: int, dim: int, seed: int = 0, centres: int = 100) -> np.ndarray:
    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centres, dim))
    x = middle[rng.integers(0, centres, n)] + 0.5 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    x = clustered(N, DIM)
    ids = np.arange(N, dtype=np.int64) * 3 + 5  # SQLite-like ids: increasing, not positions
    return ids, x


def _batches(ids, x, size=1_000):
    return [(ids[s:s + size], x[s:s + size]) for s in range(0, len(ids), size)]


def _build(ids, x, workdir, budget, **kwargs) -> VectorIndex:
    return VectorIndex.build(_batches(ids, x), count=len(ids), dim=x.shape[1], model_id="m", generation=3,
                             ivf_threshold=1_000, budget_bytes=budget, workdir=workdir, **kwargs)


@pytest.mark.parametrize("name, budget, opq, on_disk", [
    ("pq4", 4 << 30, False, False),
    ("opq", 400_000, True, False),  # 16-byte codes do not fit, 8-byte OPQ codes do
    ("disk", 50_000, False, True),  # not even 8-byte codes fit: lists on disk
])
def test_parallel_build_equals_the_serial_build(tmp_path, data, name, budget, opq, on_disk):
    import faiss

    ids, x = data
    # one trained quantizer for both builds (trained here on a small sample: OPQ's training is slow)
    planned = IndexLayout.for_size(N, DIM, ivf_threshold=1_000, budget_bytes=budget)
    trained = faiss.index_factory(DIM, planned.base_factory, faiss.METRIC_INNER_PRODUCT)
    trained.train(x[::5])

    jobs: list[tuple[int, int]] = []

    def counted(shipped, shard_jobs_):
        for job in shard_jobs_:
            jobs.append((job.start, job.count))
            yield add_shard(shipped, job)

    serial = _build(ids, x, tmp_path / "serial", budget, trained=trained, trained_on=N)
    parallel = _build(ids, x, tmp_path / "parallel", budget, trained=trained, trained_on=N,
                      parallel=ParallelAdd(counted, shard_size=SHARD))
    assert jobs == [(0, 4_500), (4_500, 4_500), (9_000, 3_000)]
    layout = parallel.meta.layout
    assert (layout.kind, layout.opq, layout.on_disk) == ("ivfpq", opq, on_disk), layout.factory

    # the same content: lists (labels = positions, codes), id map, refine vectors, tuned knobs
    a, b = list_content(serial.index), list_content(parallel.index)
    assert a.count == b.count == N
    for field in ("sizes", "labels", "codes"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    np.testing.assert_array_equal(serial._positions_to_ids(), parallel._positions_to_ids())
    np.testing.assert_array_equal(parallel._positions_to_ids(), ids)
    np.testing.assert_array_equal(serial._flat_vectors().reconstruct_n(0, N), parallel._flat_vectors().reconstruct_n(0, N))
    assert replace(parallel.meta.layout, lists_file="") == replace(serial.meta.layout, lists_file="")
    assert (parallel.meta.count, parallel.meta.max_id, parallel.meta.trained_on) == (N, int(ids[-1]), N)
    ivf = faiss.extract_index_ivf(parallel.index)
    assert ivf.ntotal == parallel.index.ntotal == N

    # the same answers, with the tuned knobs and probing every list
    queries = clustered(100, DIM, seed=9)
    for nprobe in (None, layout.nlist):
        assert parallel.search(queries, 10, nprobe=nprobe) == serial.search(queries, 10, nprobe=nprobe)

    # ... also once saved (the crash-safe save path: sidecar, trained quantizer, on-disk lists) and loaded again
    parallel.save(tmp_path / "saved")
    loaded = VectorIndex.load(tmp_path / "saved")
    assert loaded.meta.layout == parallel.meta.layout and loaded.count == N
    assert loaded.search(queries, 10) == serial.search(queries, 10)
    assert sorted(p.name for p in (tmp_path / "saved").iterdir() if not p.name.startswith("vectors-")) == [
        "ivfpq.trained.faiss", "vectors.faiss", "vectors.json"]
    assert [p.suffix for p in sorted((tmp_path / "saved").glob("vectors-*"))] == (
        [".ivfdata", ".lists"] if on_disk else [])
    assert not list((tmp_path / "parallel").glob(".shard.*"))  # the shard files merged on disk are gone


def test_shard_jobs_regroup_batches_by_position():
    x = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
    batches = [(np.arange(3), x[:3]), (np.arange(0), x[:0]), (np.arange(7), x[3:])]
    jobs = list(shard_jobs(batches, 4))
    assert [(j.start, j.count) for j in jobs] == [(0, 4), (4, 4), (8, 2)]
    np.testing.assert_array_equal(np.concatenate([j.vectors for j in jobs]), x)


def test_merge_refuses_shards_out_of_order(data):
    import faiss

    ids, x = data
    base = faiss.index_factory(DIM, "IVF16,PQ16x4fs", faiss.METRIC_INNER_PRODUCT)
    base.train(x[:2_000])
    trained = faiss.serialize_index(base)
    shards = list(serial_map(trained, shard_jobs(_batches(ids[:3_000], x[:3_000]), 1_000)))
    assert [s.start for s in shards] == [0, 1_000, 2_000] and all(isinstance(s, ShardLists) for s in shards)
    with pytest.raises(ValueError, match="out of order"):
        merge_lists(faiss.clone_index(base), [shards[0], shards[2], shards[1]])
    merged = faiss.clone_index(base)
    assert merge_lists(merged, shards) == 3_000
    serial = faiss.clone_index(base)
    serial.add(x[:3_000])
    a, b = list_content(serial), list_content(merged)
    assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("sizes", "labels", "codes"))
