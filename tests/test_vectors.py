"""The FAISS wrapper: layout choice, IVF-PQ+refine recall against exact search, ids, atomic saves."""

from __future__ import annotations

import numpy as np
import pytest

from clipsearch.errors import CollectionError
from clipsearch.store.index.vectors import IndexLayout, VectorIndex


def clustered_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, dim))
    x = centres[rng.integers(0, 40, n)] + 0.6 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_layout_switches_to_ivfpq_past_the_threshold():
    assert IndexLayout.for_size(49_999, 512).kind == "flat"
    big = IndexLayout.for_size(100_000, 512)
    assert big.kind == "ivfpq" and big.factory == "IDMap,IVF1024,PQ256x4fs,RFlat" and big.refine_factor > 1


def test_ivfpq_with_refine_keeps_recall_and_ids(tmp_path):
    n, dim = 4000, 64
    x = clustered_vectors(n, dim)
    ids = np.arange(n, dtype=np.int64) * 7 + 3
    rng = np.random.default_rng(1)
    index = VectorIndex.build([(ids[:5000], x[:5000]), (ids[5000:], x[5000:])], count=n, dim=dim, model_id="m",
                              generation=4, ivf_threshold=1000, sample=lambda k: x[rng.choice(n, k, replace=False)])
    assert index.meta.layout.kind == "ivfpq"
    queries = clustered_vectors(200, dim, seed=5)
    exact = ids[np.argsort(-(queries @ x.T), axis=1)[:, :10]]
    approx = index.search(queries, 10)
    recall = np.mean([len(set(e.tolist()) & {i for i, _ in a}) / 10 for e, a in zip(exact, approx)])
    assert recall >= 0.9
    # Scores after the refine stage are exact inner products.
    first_id, first_score = approx[0][0]
    assert first_score == pytest.approx(float(queries[0] @ x[(first_id - 3) // 7]), abs=1e-5)

    index.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ivfpq.trained.faiss", "vectors.faiss", "vectors.json"]
    loaded = VectorIndex.load(tmp_path)
    np.testing.assert_array_equal(loaded.ids(), ids)
    assert loaded.meta.generation == 4 and loaded.meta.file_bytes == (tmp_path / "vectors.faiss").stat().st_size
    assert [i for i, _ in loaded.search(queries[:3], 5)[0]] == [i for i, _ in approx[0][:5]]

    # A rebuild of a similar size reuses the trained quantizer instead of training again.
    trained = VectorIndex.load_trained(tmp_path)
    rebuilt = VectorIndex.build([(ids, x)], count=n, dim=dim, model_id="m", generation=5, ivf_threshold=1000,
                                trained=trained, trained_on=n, sample=None)
    assert rebuilt.count == n and rebuilt.meta.trained_on == n


def test_exact_search_excludes_ids_and_handles_empty(tmp_path):
    x = clustered_vectors(50, 16)
    index = VectorIndex.build([(np.arange(50), x)], count=50, dim=16, model_id="m", generation=1)
    hits = index.search(x[:1], 3, exclude_ids=[0])[0]
    assert 0 not in [i for i, _ in hits] and len(hits) == 3
    assert index.search(x[:1], 1)[0][0][0] == 0
    empty = VectorIndex.build([], count=0, dim=16, model_id="m", generation=1)
    assert empty.search(x[:1], 5) == [[]]
    with pytest.raises(CollectionError, match="no vector index"):
        VectorIndex.load(tmp_path / "nothing-here")


@pytest.mark.parametrize("ivf_threshold", [10_000, 1_000])  # exact, and IVF-PQ with its refine stage
def test_equal_scores_are_ordered_by_id_whatever_k_and_a_filter(ivf_threshold):
    """Identical copies score exactly alike; their order must not depend on how many results are asked for (a
    first page and a longer list would disagree, and pages could repeat or skip a copy)."""
    n, dim = 3_000, 32
    x = clustered_vectors(n, dim, seed=4)
    # Ids holding the very same vector: more of them than k plus the margin fetched past it.
    copies = [7, 1_500, 40, 2_999, 333, 12, 2_000, 901] + list(range(2_100, 2_140))
    x[copies] = x[copies[0]]
    ids = np.arange(n, dtype=np.int64)
    index = VectorIndex.build([(ids, x)], count=n, dim=dim, model_id="m", generation=1, ivf_threshold=ivf_threshold,
                              sample=lambda m: x[:m])
    query = x[copies[0]][None, :]
    longest = [i for i, _ in index.search(query, 80)[0]]
    assert longest[:len(copies)] == sorted(copies)
    for k in (*range(1, 12), 30, len(copies), len(copies) + 2):
        assert [i for i, _ in index.search(query, k)[0]] == longest[:k], k
    allowed = np.array(sorted(copies[:5] + list(range(100, 3_000, 3))), dtype=np.int64)
    filtered = [i for i, _ in index.search(query, 3, allowed=allowed)[0]]
    assert filtered == sorted(copies[:5])[:3]


def test_temp_files_of_every_killed_write_are_removed_and_nothing_else(tmp_path):
    from clipsearch.store.index.vectors import remove_index_leftovers
    from clipsearch.store.tokens import TOKENS_FILE

    # A kill while tokens.bin (0.45 GB at 60k images) was written left its temp file for good.
    ours = [f".{TOKENS_FILE}.7pdovtuk.tmp", ".vectors.json.x1.tmp", ".ivfpq.trained.faiss.x2.tmp",
            ".vectors.faiss.x3.tmp", ".vectors-4.ivfdata.x4.tmp", ".rows.x5.tmp", ".shard.x6.tmp"]
    theirs = [".other.tmp", "notes.tmp", "tokens.bin", "vectors.json", ".tokens.bin.keep"]
    for name in ours + theirs:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_index_leftovers(tmp_path)
    assert sorted(p.name for p in removed) == sorted(ours)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(theirs)
