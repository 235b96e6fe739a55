"""Which FAISS index a collection gets, from its size and a memory budget: the rules, in one screen.

1. Fewer than `flat_max` (50k) vectors: exact search (`Flat`), a few ms per query at 512 dims.
2. Else an inverted file (IVF) over product-quantized codes, re-scored exactly against the full vectors,
   which stay in a memory-mapped file (`vectors.flat`): resident memory is the codes, not the vectors.
   IVF-Flat (full vectors in the lists) is never chosen: with that mapped refine stage it reaches the same
   recall as IVF-PQ while keeping 4·d bytes per vector resident instead of d/4.
   - nlist ≈ 4·√N (a power of two) up to 1M vectors, 16,384 up to 10M, 65,536 beyond (with an HNSW coarse
     quantizer from 16k lists on, so routing a query stays cheap); at most N/39 so every list gets ≥ 39
     training points. Training draws 39–256 points per list at random from SQLite.
   - codes: 4-bit fast-scan PQ of d/4 bytes while the index fits the budget; halved (d/8, d/16, ... ≥ 8
     bytes) with an OPQ rotation (which recovers most of what fewer sub-quantizers lose) when it does not.
3. When even the smallest codes do not fit the budget, the inverted lists go to a file beside the index
   (FAISS OnDiskInvertedLists, mapped by the kernel): resident memory is the id map and the centroids.
   On-disk lists need 8-bit PQ (`np`: no polysemous training, which is 8x slower and unused here).
`nprobe` and the refine factor are not decided here: they are tuned on the built index (`tuning.py`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

FLAT_MAX = 50_000
DEFAULT_MEMORY_FRACTION = 0.25
MIN_CODE_BYTES = 8
POINTS_PER_LIST = (39, 256)
ID_BYTES = 16  # an int64 label in the inverted list + one in the id map (position -> SQLite id)
PADDING = 1.1  # fast-scan lists are stored in blocks of 32 codes


def list_bytes(count: int, code_bytes: int) -> float:
    """Resident bytes of `count` vectors' entries in in-memory inverted lists: codes (padded) and ids."""
    return count * (code_bytes * PADDING + ID_BYTES)


@dataclass(frozen=True)
class IndexPlan:
    kind: str  # "flat" | "ivfpq"
    factory: str  # FAISS factory string of the searched index (an IDMap wraps it; "RFlat": the mapped refine)
    nlist: int = 0
    code_bytes: int = 0  # bytes per vector of the PQ codes
    opq: bool = False
    on_disk: bool = False  # inverted lists in vectors.ivfdata, mapped
    train_points: int = 0
    resident_bytes: int = 0  # expected resident memory of the index (not counting the mapped refine vectors)
    budget_bytes: int = 0
    reasons: tuple[str, ...] = ()


def default_budget() -> int:
    """DEFAULT_MEMORY_FRACTION of physical RAM (4 GB when it cannot be read)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 16 << 30
    return int(total * DEFAULT_MEMORY_FRACTION)


def choose_nlist(count: int) -> int:
    if count <= 1_000_000:
        nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(count))))
    else:
        nlist = 16_384 if count <= 10_000_000 else 65_536
    return int(max(1, min(nlist, 2 ** int(math.log2(max(1, count // POINTS_PER_LIST[0]))))))


def _subquantizers(dim: int, code_bytes: int, bits: int) -> int:
    """The largest even divisor of dim that gives at most code_bytes bytes per vector with `bits`-bit codes."""
    want = max(2, code_bytes * 8 // bits)
    for m in range(min(want, dim), 1, -1):
        if dim % m == 0 and m % 2 == 0:
            return m
    return dim


def plan_index(count: int, dim: int, budget_bytes: int | None = None, flat_max: int = FLAT_MAX) -> IndexPlan:
    budget = default_budget() if budget_bytes is None else int(budget_bytes)
    full = count * (4 * dim + 8)
    if count < flat_max:
        why = f"{count:,} vectors < {flat_max:,}: exact search is fast enough"
        if full > budget:
            why += f" (its {full / 1e6:,.0f} MB exceed the {budget / 1e6:,.0f} MB budget, but compressing so few is not worth it)"
        return IndexPlan("flat", "IDMap,Flat", resident_bytes=full, budget_bytes=budget, reasons=(why,))
    nlist = choose_nlist(count)
    train = int(min(count, max(nlist * POINTS_PER_LIST[0], min(nlist * POINTS_PER_LIST[1], 100_000))))
    quantizer = f"IVF{nlist}_HNSW32" if nlist >= 16_384 else f"IVF{nlist}"
    fixed = nlist * dim * 4 * (2 if nlist >= 16_384 else 1)  # centroids (+ HNSW links, roughly)
    reasons = [f"{count:,} vectors ≥ {flat_max:,}: IVF over PQ codes, re-scored against the mapped full vectors",
               f"nlist {nlist} ({'≈4√N' if count <= 1_000_000 else 'fixed for this size'}), "
               f"trained on {train:,} points"]
    code = max(MIN_CODE_BYTES, dim // 4)
    while True:
        opq = code < dim // 4
        resident = int(list_bytes(count, code) + fixed + (dim * dim * 4 if opq else 0))
        if resident <= budget or code <= MIN_CODE_BYTES:
            break
        code //= 2
    m = _subquantizers(dim, code, 4)
    if resident <= budget:
        reasons.append(f"{m * 4 // 8}-byte codes (PQ{m}x4fs{' + OPQ' if opq else ''}): "
                       f"{resident / 1e6:,.0f} MB resident within the {budget / 1e6:,.0f} MB budget")
        pre = f"OPQ{m}_{dim}," if opq else ""
        return IndexPlan("ivfpq", f"{pre}{quantizer},PQ{m}x4fs", nlist=nlist, code_bytes=m * 4 // 8, opq=opq,
                         train_points=train, resident_bytes=resident, budget_bytes=budget, reasons=tuple(reasons))
    m = _subquantizers(dim, max(MIN_CODE_BYTES, dim // 8), 8)
    resident = int(count * 8 + fixed)
    reasons.append(f"even {MIN_CODE_BYTES}-byte codes exceed the {budget / 1e6:,.0f} MB budget: inverted lists "
                   f"on disk (PQ{m}np, {m} bytes/vector mapped), {resident / 1e6:,.0f} MB resident (id map, centroids)")
    return IndexPlan("ivfpq", f"{quantizer},PQ{m}np", nlist=nlist, code_bytes=m, on_disk=True, train_points=train,
                     resident_bytes=resident, budget_bytes=budget, reasons=tuple(reasons))
