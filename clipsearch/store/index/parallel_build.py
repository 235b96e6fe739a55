"""Build an IVF index from several sources of vectors in parallel, given a function that maps over them.

The quantizer is trained once (by the caller); the trained, empty index is shipped serialized to every shard job
(`add_shard`), which adds its vectors to a copy of it, labelled by their positions (the order the caller adds
vectors in: 0, 1, 2, ...), and returns that copy's inverted lists in a flat form (`ShardLists`). Where the jobs run
is up to the map (`ParallelAdd.map`): `serial_map` runs them here one after another; the Ray runner runs them as
Ray tasks. The caller merges the lists in position order, so every inverted list holds the same labels and codes
in the same order as a serial `add` of the same vectors to the same trained index would give:

* in memory (`add_in_parallel`): into the trained index itself. Fast-scan (4-bit PQ) indexes keep their lists in
  blocks of 32 interleaved codes (`BlockInvertedLists`), which FAISS's own `merge_from` cannot append to; their
  lists are gathered unpacked and packed once per list at the end, with the index's own code packer.
* on disk (`shard_indexes`): one index per shard, for FAISS's `merge_ondisk` (what `vectors._add_on_disk` does
  with the shards it builds itself).

Pure FAISS and numpy: nothing here knows about Ray, SQLite or the refine stage (the caller keeps the full vectors
and the position -> id map).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

DEFAULT_SHARD_SIZE = 100_000  # vectors per job: far more than the lists (≤ 65,536) the driver appends one by one


@dataclass(frozen=True)
class ShardJob:
    """One job's vectors: float32 [n, d], which take the positions start .. start+n-1 (their labels in the lists)."""

    start: int
    vectors: np.ndarray

    @property
    def count(self) -> int:
        return len(self.vectors)


@dataclass(frozen=True)
class Lists:
    """The content of an IVF index's inverted lists, flat: `sizes` int64 [nlist] (entries per list), then every
    entry list by list (list 0's first, each list in its own order): `labels` int64 [n] and `codes` uint8
    [n, code_size], unpacked (one code per row, also for fast-scan indexes, whose lists store them in blocks)."""

    sizes: np.ndarray
    labels: np.ndarray
    codes: np.ndarray

    @property
    def count(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class ShardLists:
    """What `add_shard` returns: the inverted lists of the trained index after adding one job's vectors, and where
    that ran (`worker`: "host:pid" of the process)."""

    start: int
    lists: Lists
    worker: str

    @property
    def count(self) -> int:
        return self.lists.count


# (serialized trained empty index, jobs in position order) -> their ShardLists, in the same order
ShardMap = Callable[[np.ndarray, Iterable[ShardJob]], Iterator[ShardLists]]


@dataclass(frozen=True)
class ParallelAdd:
    """How an IVF build adds its vectors: `map` runs `add_shard` for each job of `shard_size` vectors (somewhere)
    and hands the results back in job order."""

    map: ShardMap
    shard_size: int = DEFAULT_SHARD_SIZE


def add_shard(trained: np.ndarray, job: ShardJob, threads: int = 0) -> ShardLists:
    """Add `job`'s vectors to a copy of the serialized trained empty index `trained` (labels: their positions) and
    return its lists. `threads` > 0 caps FAISS's OpenMP threads for the call (a Ray task's CPU share)."""
    import faiss

    if threads > 0:
        faiss.omp_set_num_threads(int(threads))
    index = faiss.deserialize_index(np.asarray(trained, dtype=np.uint8))
    if index.ntotal:
        raise ValueError("add_shard needs an empty trained index")
    vectors = np.ascontiguousarray(job.vectors, dtype=np.float32)
    if len(vectors):
        index.add_with_ids(vectors, np.arange(job.start, job.start + len(vectors), dtype=np.int64))
    return ShardLists(job.start, list_content(index), f"{socket.gethostname()}:{os.getpid()}")


def serial_map(trained: np.ndarray, jobs: Iterable[ShardJob]) -> Iterator[ShardLists]:
    """A `ShardMap` that runs every job in this process, one after another."""
    for job in jobs:
        yield add_shard(trained, job)


def shard_jobs(batches: Iterable[tuple[np.ndarray, np.ndarray]], shard_size: int) -> Iterator[ShardJob]:
    """(ids, vectors) batches -> jobs of `shard_size` vectors (the last may be smaller), positions counted from 0."""
    shard_size = max(1, int(shard_size))
    pending: list[np.ndarray] = []
    held = start = 0
    for _, vectors in batches:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        while len(vectors):
            take = vectors[: shard_size - held]
            pending.append(take)
            held += len(take)
            vectors = vectors[len(take):]
            if held == shard_size:
                yield ShardJob(start, np.concatenate(pending))
                start, pending, held = start + held, [], 0
    if held:
        yield ShardJob(start, np.concatenate(pending))


def add_in_parallel(base, batches: Iterable[tuple[np.ndarray, np.ndarray]], parallel: ParallelAdd) -> int:
    """Add every vector of `batches` to the trained empty IVF index `base` (in memory) through `parallel`; the
    labels are positions, as `base.add` would give. Returns how many were added."""
    import faiss

    trained = faiss.serialize_index(base)
    return merge_lists(base, parallel.map(trained, shard_jobs(batches, parallel.shard_size)))


def shard_indexes(base, batches: Iterable[tuple[np.ndarray, np.ndarray]], parallel: ParallelAdd) -> Iterator:
    """One IVF index per job (a copy of the trained empty `base` holding that job's vectors, labelled by position),
    in order: what FAISS's `merge_ondisk` merges into on-disk lists."""
    import faiss

    trained = faiss.serialize_index(base)
    expected = 0
    for shard in parallel.map(trained, shard_jobs(batches, parallel.shard_size)):
        _check_order(shard, expected)
        expected += shard.count
        index = faiss.clone_index(base)
        merge_lists(index, [shard], start=shard.start)
        yield index


def merge_lists(base, shards: Iterable[ShardLists], start: int = 0) -> int:
    """Append each shard's lists to the lists of the trained empty IVF index `base`, in the order given, which must
    be position order from `start` on; returns how many entries were added. Memory: block (fast-scan) lists are
    gathered unpacked, then packed, so their codes are held about twice at the end."""
    import faiss

    ivf = faiss.extract_index_ivf(base)
    if ivf.ntotal:
        raise ValueError("merge_lists needs an empty trained index")
    invlists = faiss.downcast_InvertedLists(ivf.invlists)
    blocked = isinstance(invlists, faiss.BlockInvertedLists)
    target = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size) if blocked else invlists
    added = 0
    for shard in shards:
        _check_order(shard, start + added)
        _append(target, shard.lists, ivf.nlist, ivf.code_size)
        added += shard.count
    if blocked:
        _pack_into(invlists, target, ivf.get_CodePacker(), ivf.nlist, ivf.code_size)
    ivf.ntotal = added
    if base.ntotal != added:  # a wrapper (OPQ's IndexPreTransform) counts its own
        base.ntotal = added
    return added


def list_content(index) -> Lists:
    """The inverted lists of an IVF index (in memory, on disk or in fast-scan blocks) as `Lists`."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    invlists = faiss.downcast_InvertedLists(ivf.invlists)
    nlist, code_size = ivf.nlist, ivf.code_size
    sizes = np.array([invlists.list_size(i) for i in range(nlist)], dtype=np.int64)
    total = int(sizes.sum())
    labels = np.empty(total, dtype=np.int64)
    codes = np.empty((total, code_size), dtype=np.uint8)
    packer = ivf.get_CodePacker() if isinstance(invlists, faiss.BlockInvertedLists) else None
    at = 0
    for i in np.flatnonzero(sizes).tolist():
        n = int(sizes[i])
        labels[at:at + n] = faiss.rev_swig_ptr(invlists.get_ids(i), n)
        if packer is None:
            codes[at:at + n] = faiss.rev_swig_ptr(invlists.get_codes(i), n * code_size).reshape(n, code_size)
        else:
            codes[at:at + n] = _unpack(packer, invlists.get_codes(i), n, code_size)
        at += n
    return Lists(sizes, labels, codes)


def _check_order(shard: ShardLists, expected: int) -> None:
    if shard.start != expected:
        raise ValueError(f"shard lists out of order: one starts at position {shard.start}, expected {expected}")
    if len(shard.lists.codes) != shard.count:
        raise ValueError("shard lists: labels and codes differ in length")


def _append(target, lists: Lists, nlist: int, code_size: int) -> None:
    """Append `lists` to the flat inverted lists `target` (ArrayInvertedLists or on-disk), list by list."""
    import faiss

    if len(lists.sizes) != nlist or (lists.count and lists.codes.shape[1] != code_size):
        raise ValueError(f"shard lists do not fit the index ({len(lists.sizes)} lists of {lists.codes.shape[1:]} "
                         f"codes, expected {nlist} of {code_size} bytes)")
    labels = np.ascontiguousarray(lists.labels, dtype=np.int64)
    codes = np.ascontiguousarray(lists.codes, dtype=np.uint8)
    ends = np.cumsum(lists.sizes)
    for i in np.flatnonzero(lists.sizes).tolist():
        end = int(ends[i])
        start = end - int(lists.sizes[i])
        target.add_entries(i, end - start, faiss.swig_ptr(labels[start:end]), faiss.swig_ptr(codes[start:end]))


def _unpack(packer, blocks_ptr, n: int, code_size: int) -> np.ndarray:
    """The n codes of one block-packed list, unpacked: uint8 [n, code_size]."""
    import faiss

    per_block, block_bytes = packer.nvec, packer.block_size
    nblocks = (n + per_block - 1) // per_block
    blocks = faiss.rev_swig_ptr(blocks_ptr, nblocks * block_bytes)
    flat = np.empty((nblocks * per_block, code_size), dtype=np.uint8)
    for b in range(nblocks):
        packer.unpack_all(faiss.swig_ptr(blocks[b * block_bytes:(b + 1) * block_bytes]),
                          faiss.swig_ptr(flat[b * per_block:(b + 1) * per_block]))
    return flat[:n]


def _pack_into(blocked, flat_lists, packer, nlist: int, code_size: int) -> None:
    """Pack every list of `flat_lists` (unpacked codes) into the empty block lists `blocked`, one list at a time
    (each list in one `add_entries` of whole blocks; unused slots of the last block are code 0)."""
    import faiss

    per_block, block_bytes = packer.nvec, packer.block_size
    for i in range(nlist):
        n = int(flat_lists.list_size(i))
        if not n:
            continue
        nblocks = (n + per_block - 1) // per_block
        flat = np.zeros((nblocks * per_block, code_size), dtype=np.uint8)
        flat[:n] = faiss.rev_swig_ptr(flat_lists.get_codes(i), n * code_size).reshape(n, code_size)
        ids = np.array(faiss.rev_swig_ptr(flat_lists.get_ids(i), n), dtype=np.int64)
        packed = np.zeros(nblocks * block_bytes, dtype=np.uint8)
        for b in range(nblocks):
            packer.pack_all(faiss.swig_ptr(flat[b * per_block:(b + 1) * per_block]),
                            faiss.swig_ptr(packed[b * block_bytes:(b + 1) * block_bytes]))
        if blocked.list_size(i):
            raise ValueError("merge_lists needs empty block lists")
        blocked.add_entries(i, n, faiss.swig_ptr(ids), faiss.swig_ptr(packed))
        flat_lists.resize(i, 0)  # its unpacked copy is no longer needed
