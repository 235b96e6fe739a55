"""Tune an IVF-PQ index's nprobe and refine factor on held-out queries drawn from the collection itself.

`queries` held-out queries (seeded): half are stored vectors searched for their 10 nearest *other* vectors,
half are stored vectors pushed off the data by a random direction (cosine about 0.32 to where they started,
about what a matching CLIP text has to its images: text queries sit apart from the image vectors): harder for an
IVF index than its own vectors. The exact answer comes from the mapped refine vectors (a brute-force scan). A
setting reaches `target` when each half does on its own: averaged, the easy half hid the other (recall@10 0.974
tuned, 0.89 for emoji-mini's text queries at 60k images). For each refine factor the smallest power-of-two nprobe
reaching it is found; among those the cheapest by a cost model is kept (bytes touched per query: centroids,
scanned codes, re-scored vectors — deterministic, unlike timings on a shared machine). When no setting reaches the
target, the one with the best recall is kept. The recall recorded is the lower half's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REFINE_FACTORS = (1, 2, 4, 8, 16, 32)
RECALL_AT = 10
OFF_DATA = 3.0  # length of the random step, relative to the unit vector it is added to


@dataclass(frozen=True)
class Tuning:
    nprobe: int
    refine_factor: int
    recall: float
    cost: float
    queries: int


def search_cost(count: int, dim: int, nlist: int, code_bytes: int, nprobe: int, refine_factor: int) -> float:
    """Bytes one query touches: centroids (sequential, cheap), scanned codes, re-scored vectors (random reads)."""
    return 0.1 * nlist * dim * 4 + count * nprobe / max(1, nlist) * code_bytes + 2.0 * RECALL_AT * refine_factor * dim * 4


def tune(index, target: float, queries: int = 200, seed: int = 0) -> Tuning:
    """`index`: a VectorIndex of the IVF-PQ layout (`IDMap(Refine(IVF-PQ, Flat))`)."""
    import faiss

    refine = faiss.downcast_index(index.index.index)
    flat = faiss.downcast_index(refine.refine_index)
    ivf = faiss.extract_index_ivf(index.index)
    count, dim = int(flat.ntotal), int(flat.d)
    rng = np.random.default_rng(seed)
    positions = np.sort(rng.choice(count, size=min(queries, count), replace=False)).astype(np.int64)
    q = np.ascontiguousarray(flat.reconstruct_batch(positions), dtype=np.float32)
    half = len(positions) // 2
    noise = rng.standard_normal((half, dim)).astype(np.float32)
    q[:half] += OFF_DATA * noise / np.linalg.norm(noise, axis=1, keepdims=True)
    q[:half] /= np.maximum(np.linalg.norm(q[:half], axis=1, keepdims=True), 1e-12)
    positions[:half] = -1  # a midpoint is no stored vector: nothing to leave out of its answer
    k = min(RECALL_AT, count - 1)
    if k <= 0:
        return Tuning(ivf.nlist, 1, 1.0, 0.0, len(positions))
    _, exact = flat.search(q, k + 1)
    truth = [set(_others(row, own, k)) for row, own in zip(exact, positions)]
    code_bytes = max(1, int(index.meta.layout.code_bytes or ivf.code_size))
    probes = sorted({min(ivf.nlist, 2 ** i) for i in range(0, 20) if 2 ** (i - 1) < ivf.nlist})
    chosen: Tuning | None = None
    fallback: Tuning | None = None
    for factor in REFINE_FACTORS:
        for nprobe in probes:
            params = faiss.IndexRefineSearchParameters(k_factor=float(factor),
                                                       base_index_params=faiss.SearchParametersIVF(nprobe=nprobe))
            _, found = refine.search(q, k + 1, params=params)
            per_query = np.array([len(t & set(_others(row, own, k))) / k
                                  for t, row, own in zip(truth, found, positions)])
            # off the data (text-like) and on it, each held to the target
            recall = float(min(per_query[:half].mean(), per_query[half:].mean()) if half else per_query.mean())
            cost = search_cost(count, dim, ivf.nlist, code_bytes, nprobe, factor)
            result = Tuning(nprobe, factor, recall, cost, len(positions))
            if fallback is None or (recall, -cost) > (fallback.recall, -fallback.cost):
                fallback = result
            if recall >= target:
                if chosen is None or cost < chosen.cost:
                    chosen = result
                break
    return chosen or fallback  # type: ignore[return-value]


def _others(row: np.ndarray, own: int, k: int) -> list[int]:
    return [int(p) for p in row if p >= 0 and int(p) != int(own)][:k]
