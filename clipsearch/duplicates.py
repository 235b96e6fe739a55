"""Near-duplicates: groups of images in a collection that are copies of one another (resized, re-encoded,
slightly cropped or colour-shifted), found from the vectors the index already holds — no image file is read.

Every stored vector asks the collection's FAISS index for its `neighbours` nearest images; a pair whose cosine
similarity reaches the threshold is an edge, and the connected components (union-find) with two or more images
are the groups. That is one k-NN search per image (batched), so a 100k-image collection costs what 100k
searches with a small k cost, never an N×N comparison in Python. A group larger than `neighbours` still comes
out whole as long as its images are chained by edges (copies of one picture are each other's nearest).

The threshold is a cosine similarity, and cosines do not transfer between models: it comes from `--threshold`
or from the bundle's model.json ("duplicates": {"threshold", "how"}, see `clipsearch.model.bundle.DuplicateSpec`),
calibrated per model (`clipsearch train duplicate-threshold`). A model without one is refused with a hint rather
than guessed at: a threshold derived from the collection's own similarities would presume that it holds copies,
and would group its closest distinct pictures (burst shots, say) when it does not.

Each group suggests the image to keep: the most pixels, then the largest file, then the first indexed.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from .errors import ClipsearchError, QueryError

DEFAULT_NEIGHBOURS = 16
MAX_NEIGHBOURS = 256
QUERY_BATCH = 2048  # stored vectors searched per FAISS call
SCORE_TOLERANCE = 1e-6  # float32 rounding of a cosine near 1
CALIBRATE_HINT = ("Give a threshold with --threshold T (REST: ?threshold=T): a cosine similarity; start high (0.95) "
                  "and lower it while the groups still show copies. Or calibrate the model once: "
                  "clipsearch train duplicate-threshold MODEL --images FOLDER --write")


@dataclass(frozen=True)
class ThresholdChoice:
    """The cosine threshold in use and where it came from: "given" (--threshold) or "model" (model.json)."""

    value: float
    source: str
    how: str = ""

    def describe(self, model_name: str) -> str:
        return (f"threshold {self.value:.10g}, given" if self.source == "given"
                else f"threshold {self.value:.10g}, {model_name}'s own")


@dataclass(frozen=True)
class DuplicateImage:
    """One image of a group. `similarity`: cosine to the group's suggested keeper (1 for the keeper itself)."""

    id: int
    path: str
    bytes: int
    width: int | None
    height: int | None
    similarity: float
    keep: bool

    @property
    def pixels(self) -> int:
        return (self.width or 0) * (self.height or 0)

    def to_dict(self) -> dict:
        return {"id": self.id, "path": self.path, "bytes": self.bytes, "width": self.width, "height": self.height,
                "similarity": self.similarity, "keep": self.keep}


@dataclass(frozen=True)
class DuplicateGroup:
    """Images that are copies of one another; the suggested keeper first, then by similarity to it."""

    images: tuple[DuplicateImage, ...]

    @property
    def keep(self) -> DuplicateImage:
        return self.images[0]

    def to_dict(self) -> dict:
        return {"count": len(self.images), "keep": self.keep.id, "images": [i.to_dict() for i in self.images]}


@dataclass(frozen=True)
class DuplicateReport:
    collection: str
    model_id: str
    model_name: str
    threshold: ThresholdChoice
    images: int  # how many images were compared
    groups: tuple[DuplicateGroup, ...]
    took_ms: float = 0.0

    @property
    def redundant(self) -> int:
        """Images that are not their group's keeper."""
        return sum(len(g.images) - 1 for g in self.groups)

    def to_dict(self) -> dict:
        return {"collection": self.collection, "model_id": self.model_id, "threshold": self.threshold.value,
                "threshold_source": self.threshold.source, "images": self.images, "redundant": self.redundant,
                "took_ms": self.took_ms, "groups": [g.to_dict() for g in self.groups]}


# -- the threshold -------------------------------------------------------------------------------
def check_threshold(value: object) -> float:
    """A usable threshold: a finite cosine similarity above 0 and at most 1 (QueryError otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= 1:
        raise QueryError(f"threshold must be a cosine similarity above 0 and at most 1, not {value!r}",
                         "Near-duplicates are very similar: useful thresholds are close to 1, e.g. 0.95.")
    return float(value)


def choose_threshold(given: float | None, bundle) -> ThresholdChoice:
    """--threshold when given; else the bundle's model.json "duplicates" threshold (`bundle`: a BundleInfo or
    None when the model cannot be found); else QueryError with a hint."""
    if given is not None:
        return ThresholdChoice(check_threshold(given), "given")
    spec = bundle.duplicates if bundle is not None else None
    if spec is None:
        what = f"model {bundle.name}" if bundle is not None else "the collection's model (not found here)"
        raise QueryError(f"{what} has no near-duplicate threshold of its own (cosine similarities do not carry "
                         "over between models)", CALIBRATE_HINT)
    return ThresholdChoice(spec.threshold, "model", spec.how)


def collection_bundle(searcher):
    """The BundleInfo of the model a Searcher's collection was built with (read from model.json, no graph
    loaded), or None when it cannot be found on this machine (nothing is downloaded or exported)."""
    from .model.resolve import resolve_model

    try:
        return resolve_model(searcher.collection_model.spec, export_missing=False)
    except ClipsearchError:
        return None


# -- grouping ------------------------------------------------------------------------------------
def neighbour_pairs(search, batches: Iterable[tuple[np.ndarray, np.ndarray]], known_ids: np.ndarray,
                    threshold: float, neighbours: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (a < b, cosine) of images whose cosine reaches `threshold`, from k-NN searches.

    `search(vectors, k)` -> (scores [n, k], ids [n, k]) is a FAISS index's search (inner product of L2-normalised
    vectors = cosine); `batches` yields (ids, vectors) of the images to query with; ids the index returns that
    are not in `known_ids` (rows deleted since the index was saved) are left out. Each pair appears once."""
    firsts, seconds, scores = [], [], []
    for ids, vectors in batches:
        if not len(ids):
            continue
        found_scores, found_ids = search(np.ascontiguousarray(vectors, dtype=np.float32), neighbours + 1)
        rows = np.repeat(np.asarray(ids, dtype=np.int64), found_ids.shape[1])
        cols = found_ids.reshape(-1).astype(np.int64)
        sims = found_scores.reshape(-1).astype(np.float32)
        # Within float32 rounding of it: identical vectors score 0.99999994, and threshold 1 means "identical".
        keep = (cols >= 0) & (cols != rows) & (sims >= np.float32(threshold) - SCORE_TOLERANCE)
        rows, cols, sims = rows[keep], cols[keep], sims[keep]
        keep = np.isin(cols, known_ids)
        firsts.append(np.minimum(rows[keep], cols[keep]))
        seconds.append(np.maximum(rows[keep], cols[keep]))
        scores.append(sims[keep])
    if not firsts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float32)
    a, b, s = np.concatenate(firsts), np.concatenate(seconds), np.concatenate(scores)
    _, unique = np.unique(np.stack([a, b], axis=1), axis=0, return_index=True)
    return a[unique], b[unique], s[unique]


def connected_groups(firsts: Iterable[int], seconds: Iterable[int]) -> list[list[int]]:
    """Union-find over edges: the components (two or more ids each, ids ascending), ordered by their first id."""
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    for a, b in zip(firsts, seconds):
        ra, rb = root(int(a)), root(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[int, list[int]] = {}
    for x in parent:
        members.setdefault(root(x), []).append(x)
    return sorted((sorted(m) for m in members.values() if len(m) > 1), key=lambda m: m[0])


def keeper_order(records: dict) -> list[int]:
    """Ids of a group's `records` (id -> ImageRecord), the suggested keeper first: a file before a symbolic link
    (deleting the file a kept link points to would lose both), then most pixels, then largest file, then the
    first indexed."""
    return sorted(records, key=lambda i: (os.path.islink(records[i].path),
                                          -((records[i].width or 0) * (records[i].height or 0)),
                                          -int(records[i].size or 0), i))


def find_duplicates(searcher, threshold: float | None = None, neighbours: int = DEFAULT_NEIGHBOURS,
                    bundle=None) -> DuplicateReport:
    """Group a collection's near-duplicates (see the module docstring). `searcher`: an open `Searcher`;
    `threshold`: overrides the model's own; `bundle`: the model's BundleInfo when the caller has it (else it is
    looked up without loading anything). QueryError for a bad or missing threshold."""
    started = time.perf_counter()
    if isinstance(neighbours, bool) or not isinstance(neighbours, int) or not 1 <= neighbours <= MAX_NEIGHBOURS:
        raise QueryError(f"neighbours must be between 1 and {MAX_NEIGHBOURS}, not {neighbours!r}")
    if threshold is not None:
        choice = choose_threshold(threshold, None)
    else:
        choice = choose_threshold(None, bundle if bundle is not None else collection_bundle(searcher))
    searcher.follow()  # a rebuild that switched the collection since it was opened
    model = searcher.collection_model
    index = searcher.index
    with searcher.lock:
        known = searcher.collection.store.embedding_ids()
    if len(known) < 2 or index.count == 0:
        groups: list[list[int]] = []
    else:
        k = min(neighbours, max(1, index.count - 1))
        a, b, _ = neighbour_pairs(index.index.search, _stored_batches(searcher, model.embed_dim), known,
                                  choice.value, k)
        groups = connected_groups(a, b)
    return DuplicateReport(collection=searcher.collection.name, model_id=model.model_id, model_name=model.name,
                           threshold=choice, images=int(len(known)), groups=tuple(_describe(searcher, groups)),
                           took_ms=round((time.perf_counter() - started) * 1000, 2))


def _stored_batches(searcher, dim: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The collection's stored vectors, QUERY_BATCH at a time, each batch read under the searcher's lock (the
    SQLite connection is shared with other threads, so no cursor stays open between batches)."""
    min_id = 0
    while True:
        with searcher.lock:
            rows = searcher.collection.store.iter_vectors(dim, chunk=QUERY_BATCH, min_id=min_id)
            batch = next(rows, None)
            rows.close()
        if batch is None:
            return
        yield batch
        min_id = int(batch[0][-1]) + 1


def _describe(searcher, groups: list[list[int]]) -> Iterator[DuplicateGroup]:
    described = []
    for members in groups:
        records = searcher.records(members)
        if len(records) < 2:  # rows deleted meanwhile
            continue
        order = keeper_order(records)
        vectors = searcher.stored_vectors(order)
        keeper = vectors.get(order[0])
        images = []
        for image_id in order:
            record, vector = records[image_id], vectors.get(image_id)
            similarity = (1.0 if image_id == order[0] else
                          round(float(np.dot(keeper, vector)), 4) if keeper is not None and vector is not None else 0.0)
            images.append(DuplicateImage(id=image_id, path=record.path, bytes=int(record.size), width=record.width,
                                         height=record.height, similarity=similarity, keep=image_id == order[0]))
        images[1:] = sorted(images[1:], key=lambda i: (-i.similarity, i.id))
        described.append(DuplicateGroup(tuple(images)))
    described.sort(key=lambda g: (-len(g.images), g.keep.path))
    return iter(described)
