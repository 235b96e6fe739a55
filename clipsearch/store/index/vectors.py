"""The FAISS side of a collection: exact inner product while small, IVF-PQ re-scored against mapped vectors past that.

The index is derived data: it is (re)built from the vectors SQLite holds (`Store.iter_vectors`) and
saved atomically next to a small JSON sidecar that says which store generation it reflects, so a
stale or foreign index is recognised instead of silently returning wrong rows. FAISS ids are the
SQLite row ids (`IDMap` around the index). Which index a collection gets is `policy.plan_index`.

An IVF-PQ index is one FAISS file, `IDMap(Refine(IVF-PQ, Flat))`: the inverted lists hold the PQ codes
(labels: positions), the refine stage holds every full vector by position and re-scores the candidates
exactly. The file is written in a streaming way (the full vectors never sit in memory: `_compose`) and
loaded with `IO_FLAG_MMAP_IFC`, which maps the refine vectors instead of reading them, so resident memory
is near the size of the codes. With on-disk lists (`IndexLayout.on_disk`) the lists live in
`vectors-<token>.ivfdata` beside it, described by `vectors-<token>.lists` (a FAISS file read with
`IO_FLAG_ONDISK_SAME_DIR`), and only the id map and the centroids stay resident. `nprobe` and the refine
factor are tuned when the index is built (`tuning.tune`) and saved in the sidecar.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import struct
import sys
import tempfile
import threading
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ...errors import CollectionError
from ...paths import fsync_dir
from .parallel_build import ParallelAdd, add_in_parallel, shard_indexes
from .policy import FLAT_MAX, IndexPlan, plan_index

DEFAULT_IVF_THRESHOLD = FLAT_MAX
DEFAULT_TARGET_RECALL = 0.95
# The trained quantizer is reused until the collection is this many times larger (or smaller) than its sample.
OUTGROWN_FACTOR = 8
# A filtered search of an IVF-PQ index ranks allow-lists up to this size exactly (see VectorIndex._search_allowed).
EXACT_SUBSET_MAX = 20_000
TIE_MARGIN = 16  # hits fetched past k, so that equal scores at the cut are ordered by id like the rest
INDEX_FILE = "vectors.faiss"
SIDECAR_FILE = "vectors.json"
TRAINED_FILE = "ivfpq.trained.faiss"
LISTS_SUFFIX, IVFDATA_SUFFIX = ".lists", ".ivfdata"
_CHUNK = 16_384


@dataclass(frozen=True)
class IndexLayout:
    """Which FAISS structure holds the vectors (an index factory string), why, and its tuned search knobs."""

    kind: str  # "flat" | "ivfpq"
    factory: str
    nlist: int = 0
    nprobe: int = 0
    refine_factor: int = 0
    code_bytes: int = 0
    opq: bool = False
    on_disk: bool = False
    lists_file: str = ""  # on-disk lists: the FAISS file describing them (names the .ivfdata)
    budget_bytes: int = 0
    resident_bytes: int = 0
    reasons: tuple[str, ...] = ()
    train_points: int = 0
    target_recall: float = 0.0  # what nprobe / refine_factor were tuned for, and the recall@10 they reached
    tuned_recall: float = 0.0

    @classmethod
    def from_plan(cls, plan: IndexPlan) -> "IndexLayout":
        if plan.kind == "flat":
            return cls(kind="flat", factory=plan.factory, budget_bytes=plan.budget_bytes,
                       resident_bytes=plan.resident_bytes, reasons=plan.reasons)
        return cls(kind="ivfpq", factory=f"IDMap,{plan.factory},RFlat", nlist=plan.nlist,
                   nprobe=min(plan.nlist, max(16, plan.nlist // 8)), refine_factor=16, code_bytes=plan.code_bytes,
                   opq=plan.opq, on_disk=plan.on_disk, budget_bytes=plan.budget_bytes, train_points=plan.train_points,
                   resident_bytes=plan.resident_bytes, reasons=plan.reasons)

    @classmethod
    def for_size(cls, count: int, dim: int, ivf_threshold: int = DEFAULT_IVF_THRESHOLD,
                 budget_bytes: int | None = None) -> "IndexLayout":
        return cls.from_plan(plan_index(count, dim, budget_bytes, flat_max=ivf_threshold))

    @property
    def base_factory(self) -> str:
        """The factory string of the searched base index (without the IDMap and the refine stage)."""
        return self.factory.removeprefix("IDMap,").removesuffix(",RFlat")

    @classmethod
    def from_dict(cls, raw: dict) -> "IndexLayout":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        values["reasons"] = tuple(values.get("reasons", ()))
        return cls(**values)


@dataclass(frozen=True)
class IndexMeta:
    """The JSON sidecar saved with the index."""

    layout: IndexLayout
    dim: int
    count: int
    model_id: str
    generation: int
    trained_on: int = 0
    file_bytes: int = 0  # size of vectors.faiss when saved: a cheap truncation check
    max_id: int = 0  # largest id in the index (vectors with larger ids can be appended)
    trained_at: str = ""  # when the IVF quantizer was last trained, and why
    train_reason: str = ""
    file_crc32: int | None = None  # CRC-32 of vectors.faiss when saved: `clipsearch check` finds a damaged file
    trained_max_id: int = 0  # largest id when the quantizer was trained (0: not recorded): later ones were added to it
    drift_limit: float = 0.0  # 99th percentile distance to the nearest centroid of held-out vectors (0: not measured)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "IndexMeta":
        raw = json.loads(text)
        return cls(layout=IndexLayout.from_dict(raw["layout"]), dim=int(raw["dim"]), count=int(raw["count"]),
                   model_id=str(raw["model_id"]), generation=int(raw["generation"]),
                   trained_on=int(raw.get("trained_on", 0)), file_bytes=int(raw.get("file_bytes", 0)),
                   max_id=int(raw.get("max_id", 0)), trained_at=str(raw.get("trained_at", "")),
                   train_reason=str(raw.get("train_reason", "")),
                   file_crc32=int(raw["file_crc32"]) if raw.get("file_crc32") is not None else None,
                   trained_max_id=int(raw.get("trained_max_id", 0)), drift_limit=float(raw.get("drift_limit", 0.0)))


def file_crc32(path: Path) -> int:
    """CRC-32 of a file, read in 4 MiB chunks (about 1 GB/s: a check, not a lookup on every search)."""
    import zlib

    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(4 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def preload_faiss() -> None:
    """Import FAISS now (about 50 ms here): an indexing run does it while its last encoder batches run, instead of
    after them with every core idle, since the index is written right after."""
    import importlib

    importlib.import_module("faiss")


def outgrown(count: int, trained_on: int) -> bool:
    """True when a quantizer trained at `trained_on` vectors should be retrained for `count`."""
    return not trained_on or not trained_on / OUTGROWN_FACTOR <= count <= trained_on * OUTGROWN_FACTOR


# Vectors added to an IVF-PQ index after its quantizer was trained are coded with centroids and codebooks made for
# the vectors it was trained on. Photos of a new kind lie far from every centroid, their codes are poor, and the
# refine stage never sees them (recall@10 0.17 for 15k vectors of new clusters added to 100k, 0.95 retrained). The
# quantizer is retrained when more than DRIFT_SHARE of those added since its training lie farther from their
# nearest centroid than 99% of a calibration sample held out of its training (`IndexMeta.drift_limit`): vectors like
# the ones it was trained on pass that limit 1% of the time. The limit comes from vectors it never saw: training
# points lie closer to their centroids, and in 512 dimensions at ~60 points per list, new vectors of the same kind
# passed the training points' 99th percentile 10-13% of the time.
DRIFT_SHARE = 0.08
DRIFT_SAMPLE = 2_000  # held out for the limit; drawn from the added vectors to judge them
DRIFT_MIN_NEW = 200  # fewer added vectors are not judged (their share is too uncertain)


def coarse_residuals(trained, vectors: np.ndarray) -> np.ndarray:
    """Squared distance of each vector to its nearest coarse centroid of a trained IVF index (after the index's
    own pre-transform, e.g. OPQ's rotation)."""
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.downcast_index(trained)
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            x = np.ascontiguousarray(faiss.downcast_VectorTransform(index.chain.at(i)).apply(x), dtype=np.float32)
        index = faiss.downcast_index(index.index)
    ivf = faiss.extract_index_ivf(index)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    _, nearest = ivf.quantizer.search(x, 1)
    return ((x - centroids[nearest[:, 0]]) ** 2).sum(axis=1)


def quantizer_drift(trained, limit: float, added: np.ndarray) -> float | None:
    """The share of `added` vectors farther from their nearest centroid than `limit` (`IndexMeta.drift_limit`);
    None when there are too few of them to tell, or no limit was measured."""
    if len(added) < DRIFT_MIN_NEW or not limit:
        return None
    return float(np.mean(coarse_residuals(trained, added) > limit))


class VectorIndex:
    """A loaded FAISS index plus its sidecar; search returns SQLite row ids."""

    def __init__(self, index, meta: IndexMeta, *, path: Path | None = None, owned: bool = False,
                 keep: tuple = (), trained=None) -> None:
        self.index = index
        self.meta = meta
        self._path = path  # the composite file an IVF-PQ index maps (a temp file until saved when owned)
        self._keep = keep  # objects the index points into (on-disk lists)
        self._trained = trained  # an empty trained base, when this index was trained here
        self._cleanup = weakref.finalize(self, _unlink_quietly, path) if owned and path is not None else None
        self._id_map: np.ndarray | None = None  # position -> id (filtered searches)
        self._sorted_ids: np.ndarray | None = None  # id_map sorted, and the order that sorts it (None: it is)
        self._id_order: np.ndarray | None = None
        _apply_search_params(index, meta.layout)

    # -- building ----------------------------------------------------------------------------
    @classmethod
    def build(cls, batches: Iterable[tuple[np.ndarray, np.ndarray]], *, count: int, dim: int, model_id: str,
              generation: int, ivf_threshold: int = DEFAULT_IVF_THRESHOLD, trained=None, trained_on: int = 0,
              sample: Callable[[int], np.ndarray] | None = None, budget_bytes: int | None = None,
              workdir: Path | None = None, target_recall: float = DEFAULT_TARGET_RECALL,
              train_reason: str = "", parallel: "ParallelAdd | None" = None) -> "VectorIndex":
        """Build from (ids, vectors) batches in increasing id order. `count` and the memory budget pick the layout
        (`policy.plan_index`); IVF-PQ needs `sample(n)` (n random stored vectors) for training unless a `trained`
        empty base of the same layout is given (reused until the collection is OUTGROWN_FACTOR times larger or
        smaller than it was trained at). IVF-PQ files are written into `workdir` (default: the temp dir) and
        moved into place by `save`. `parallel` (`parallel_build.ParallelAdd`): an IVF-PQ index's vectors are
        added in shard jobs run by its map (e.g. Ray tasks) and merged here, giving the same lists as adding them
        here; the training, the refine stage, the id map and the tuning stay in this process."""
        import faiss

        layout = IndexLayout.for_size(count, dim, ivf_threshold, budget_bytes)
        if layout.kind == "flat":
            # Exact search below the IVF threshold: built here even with `parallel` (copying the vectors into
            # an IndexFlat is all there is to it; shard jobs would only ship them back and forth).
            index = faiss.index_factory(dim, layout.factory, faiss.METRIC_INNER_PRODUCT)
            max_id = 0
            for ids, vectors in batches:
                if len(ids):
                    index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64))
                    max_id = max(max_id, int(np.max(ids)))
            if index.ntotal != count:
                raise CollectionError(f"built an index of {index.ntotal} vectors, expected {count}")
            return cls(index, IndexMeta(layout=layout, dim=dim, count=count, model_id=model_id,
                                        generation=generation, max_id=max_id))
        workdir = Path(workdir) if workdir is not None else Path(tempfile.gettempdir())
        trained_at, drift_limit = "", 0.0
        if trained is not None and _fits(trained, layout, dim) and not outgrown(count, trained_on):
            base = faiss.clone_index(trained)
        else:
            if sample is None:
                raise ValueError("an IVF-PQ index needs a training sample")
            # A calibration sample is held out of training: how far vectors the quantizer never saw lie from their
            # nearest centroid (its 99th percentile is the drift limit; see DRIFT_SHARE). Training points lie closer.
            calibration = min(DRIFT_SAMPLE, count // 10) if count // 10 >= DRIFT_MIN_NEW else 0
            drawn = np.ascontiguousarray(sample(min(count, layout.train_points + calibration)), dtype=np.float32)
            order = np.random.default_rng(0).permutation(len(drawn))
            held_out, training = drawn[order[:calibration]], drawn[order[calibration:]]
            del drawn
            base = faiss.index_factory(dim, layout.base_factory, faiss.METRIC_INNER_PRODUCT)
            base.train(training)
            del training
            drift_limit = float(np.quantile(coarse_residuals(base, held_out), 0.99)) if calibration else 0.0
            trained = faiss.clone_index(base)
            train_reason = train_reason or (f"retrained: {count:,} vectors, trained at {trained_on:,}" if trained_on
                                            else "first IVF-PQ build")
            trained_on, trained_at = count, _now()
        token = f"{generation}-{secrets.token_hex(4)}"
        rows = _RowSpool(workdir, dim)
        id_parts: list[np.ndarray] = []
        lists = None
        try:
            spooled = _spooled(batches, rows, id_parts)
            if layout.on_disk:
                shards = (shard_indexes(base, spooled, parallel) if parallel is not None else _serial_shards(
                    base, spooled, shard=max(10_000, layout.budget_bytes // max(1, layout.code_bytes + 16) // 2)))
                lists = _add_on_disk(base, shards, workdir, token)
            elif parallel is not None:
                add_in_parallel(base, spooled, parallel)
            else:
                for ids, vectors in spooled:
                    base.add(vectors)
            ids = np.concatenate(id_parts) if id_parts else np.zeros(0, dtype=np.int64)
            if len(ids) != count:
                raise CollectionError(f"built an index of {len(ids)} vectors, expected {count}")
            path = _temp_path(workdir, INDEX_FILE)
            _compose(path, base, rows.chunks(), ids, dim, float(layout.refine_factor))
        finally:
            rows.close()
        if lists is not None:
            layout = replace(layout, lists_file=lists.name)
        max_id = int(ids[-1]) if len(ids) else 0
        meta = IndexMeta(layout=layout, dim=dim, count=count, model_id=model_id, generation=generation,
                         trained_on=trained_on, max_id=max_id, trained_at=trained_at, train_reason=train_reason,
                         trained_max_id=max_id if trained_at else 0, drift_limit=drift_limit)
        built = cls._open_composite(path, meta, workdir, owned=True, trained=trained)
        return built.tune(target_recall)

    def tune(self, target_recall: float = DEFAULT_TARGET_RECALL, queries: int = 200) -> "VectorIndex":
        """Choose nprobe and the refine factor (`tuning.tune`) and record them; a no-op for the flat layout."""
        if self.meta.layout.kind != "ivfpq" or self.count == 0:
            return self
        from .tuning import tune

        result = tune(self, target_recall, queries=queries)
        layout = replace(self.meta.layout, nprobe=result.nprobe, refine_factor=result.refine_factor,
                         target_recall=float(target_recall), tuned_recall=round(result.recall, 4))
        self.meta = replace(self.meta, layout=layout)
        _apply_search_params(self.index, layout)
        return self

    def append(self, batches: Iterable[tuple[np.ndarray, np.ndarray]], generation: int,
               workdir: Path | None = None) -> int:
        """Add vectors whose ids are all larger than any already held, without retraining; returns how many were
        added. An IVF-PQ index is rewritten to a new file (its mapped refine vectors are read-only)."""
        import faiss

        max_id = self.meta.max_id
        checked = _checked_increasing(batches, max_id)
        if self.meta.layout.kind == "flat":
            added = 0
            for ids, vectors in checked:
                self.index.add_with_ids(vectors, ids)
                added += len(ids)
                max_id = int(ids[-1])
        else:
            if self.meta.layout.on_disk:
                raise ValueError("an index with on-disk lists is rebuilt, not appended to")
            workdir = Path(workdir) if workdir is not None else Path(tempfile.gettempdir())
            refine = faiss.downcast_index(self.index.index)
            base = faiss.clone_index(refine.base_index)
            flat = faiss.downcast_index(refine.refine_index)
            rows = _RowSpool(workdir, self.meta.dim)
            id_parts = [self._positions_to_ids()]
            try:
                for ids, vectors in _spooled(checked, rows, id_parts):
                    base.add(vectors)
                ids = np.concatenate(id_parts)
                added = len(ids) - self.count
                if not added:
                    rows.close()
                    self.meta = replace(self.meta, generation=generation)
                    return 0
                old = (flat.reconstruct_n(start, min(_CHUNK, flat.ntotal - start))
                       for start in range(0, flat.ntotal, _CHUNK))
                path = _temp_path(workdir, INDEX_FILE)
                _compose(path, base, _chain(old, rows.chunks()), ids, self.meta.dim, float(refine.k_factor))
            finally:
                rows.close()
            max_id = int(ids[-1])
            meta = replace(self.meta, count=len(ids), generation=generation, max_id=max_id)
            fresh = self._open_composite(path, meta, workdir, owned=True, trained=self._trained)
            self.index, self._path, self._keep = fresh.index, fresh._path, fresh._keep
            fresh._cleanup.detach()
            if self._cleanup is not None:
                self._cleanup()  # the previous temp file, if this index was never saved
            self._cleanup = weakref.finalize(self, _unlink_quietly, path)
        self.meta = replace(self.meta, count=int(self.index.ntotal), generation=generation, max_id=max_id)
        self._id_map = self._sorted_ids = self._id_order = None
        return added

    def empty_trained_copy(self):
        """An empty clone of a trained IVF-PQ base (to save and reuse on the next rebuild), else None."""
        import faiss

        if self.meta.layout.kind != "ivfpq":
            return None
        if self._trained is not None:
            return self._trained
        if self.meta.layout.on_disk:
            return None
        inner = faiss.downcast_index(self.index.index)
        clone = faiss.clone_index(inner.base_index if hasattr(inner, "base_index") else inner)
        clone.reset()
        return clone

    # -- persistence --------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """Write index then sidecar, each atomically (temp file, fsync, rename); then remove on-disk lists files
        the new sidecar no longer names."""
        import faiss

        folder = Path(folder)
        target = folder / INDEX_FILE
        if self.meta.layout.kind == "flat":
            _atomic_write(target, lambda tmp: faiss.write_index(self.index, str(tmp)))
        elif self._path is not None and self._path != target:
            if self.meta.layout.on_disk and self._path.parent != folder:
                for name in (self.meta.layout.lists_file, _ivfdata_name(self.meta.layout.lists_file)):
                    _atomic_write(folder / name, lambda tmp, n=name: shutil.copyfile(self._path.parent / n, tmp))
            if self._path.parent == folder:
                _fsync_file(self._path)
                os.replace(self._path, target)
                fsync_dir(folder)
            else:
                _atomic_write(target, lambda tmp: shutil.copyfile(self._path, tmp))
                _unlink_quietly(self._path)
            if self._cleanup is not None:
                self._cleanup.detach()
                self._cleanup = None
            self._path = target
        trained = self.empty_trained_copy()
        if trained is not None:
            _atomic_write(folder / TRAINED_FILE, lambda tmp: faiss.write_index(trained, str(tmp)))
        self.meta = replace(self.meta, file_bytes=target.stat().st_size, file_crc32=file_crc32(target))
        _atomic_write(folder / SIDECAR_FILE, lambda tmp: tmp.write_text(self.meta.to_json(), encoding="utf-8"))
        remove_index_leftovers(folder, keep=self.meta.layout.lists_file)

    @classmethod
    def load(cls, folder: Path, mmap: bool = False) -> "VectorIndex":
        """The saved index. An IVF-PQ index always maps its refine vectors; `mmap` maps a flat index too."""
        import faiss

        folder = Path(folder)
        index_path, sidecar_path = folder / INDEX_FILE, folder / SIDECAR_FILE
        if not index_path.is_file() or not sidecar_path.is_file():  # noqa: SIM102
            raise CollectionError(f"{folder}: no vector index (was indexing interrupted before it finished?)",
                                  "Run `clipsearch index` on the collection's folders again to complete it.")
        try:
            meta = IndexMeta.from_json(sidecar_path.read_text(encoding="utf-8"))
        except (ValueError, KeyError, TypeError) as exc:
            raise CollectionError(f"{sidecar_path}: malformed ({exc})") from exc
        if meta.layout.kind == "ivfpq":
            return cls._open_composite(index_path, meta, folder, owned=False)
        try:
            flags = faiss.IO_FLAG_MMAP_IFC if mmap and hasattr(faiss, "IO_FLAG_MMAP_IFC") else 0
            index = faiss.read_index(str(index_path), flags) if flags else faiss.read_index(str(index_path))
        except RuntimeError as exc:
            raise _unreadable(index_path, exc) from exc
        return cls(index, meta)

    @classmethod
    def _open_composite(cls, path: Path, meta: IndexMeta, folder: Path, *, owned: bool, trained=None) -> "VectorIndex":
        """Map an `IDMap(Refine(IVF-PQ, Flat))` file: refine vectors mapped, on-disk lists attached."""
        import faiss

        keep: tuple = ()
        try:
            if meta.layout.on_disk:
                index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_SKIP_IVF_DATA)
                with _faiss_notes_to_stderr():  # "IO_FLAG_ONDISK_SAME_DIR: updating ondisk filename ..."
                    lists_index = faiss.read_index(str(Path(folder) / meta.layout.lists_file),
                                                   faiss.IO_FLAG_ONDISK_SAME_DIR)
                faiss.extract_index_ivf(index).replace_invlists(faiss.extract_index_ivf(lists_index).invlists, False)
                keep = (lists_index,)
            else:
                index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
        except RuntimeError as exc:
            if owned:
                _unlink_quietly(path)
            raise _unreadable(path, exc) from exc
        return cls(index, meta, path=path, owned=owned, keep=keep, trained=trained)

    @staticmethod
    def load_trained(folder: Path):
        import faiss

        path = Path(folder) / TRAINED_FILE
        if not path.is_file():
            return None
        try:
            return faiss.read_index(str(path))
        except RuntimeError:
            return None

    # -- queries ------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    def ids(self) -> np.ndarray:
        import faiss

        return np.sort(faiss.vector_to_array(self.index.id_map).astype(np.int64))

    def search(self, queries: np.ndarray, k: int, exclude_ids: Iterable[int] = (),
               allowed: np.ndarray | None = None, nprobe: int | None = None) -> list[list[tuple[int, float]]]:
        """Top-k (id, inner product) per query row, best first, never returning an excluded id. With `allowed`
        (ids, e.g. those that pass a search filter) only those ids are ranked, inside the search: k hits come
        back whenever at least k allowed ids are indexed (see `_search_allowed`). `nprobe` overrides the tuned
        number of inverted lists an IVF index probes (ignored by the flat layout)."""
        excluded = {int(i) for i in exclude_ids}
        if self.count == 0 or k <= 0:
            return [[] for _ in range(len(queries))]
        queries = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self.meta.dim)
        if allowed is not None:
            return self._search_allowed(queries, k, np.asarray(allowed, dtype=np.int64), excluded, nprobe)
        fetch = min(self.count, k + len(excluded) + TIE_MARGIN)
        # With the tuned nprobe, the probed lists must hold the candidates the refine stage re-scores, or a large k
        # comes back short (60k vectors probing 8 of 1,024 lists gave 208 of 1,000): nprobe rises with k, as for
        # a filter, and what still comes back short is answered exactly. A given nprobe is used as given.
        ivf = self.meta.layout.kind == "ivfpq"
        tuned = ivf and nprobe is None
        if tuned:
            layout = self.meta.layout
            wanted = 2 * min(self.count, k + len(excluded)) * max(1, layout.refine_factor)
            needed = math.ceil(layout.nlist * wanted / self.count)
            if needed > layout.nlist // 2:
                return self._search_exact(queries, fetch, excluded, k)
            nprobe = needed if needed > layout.nprobe else None
        while True:
            refine = None
            if ivf and self.meta.layout.refine_factor:
                # The refine stage re-scores k_factor x (asked) candidates: the TIE_MARGIN hits asked past k come
                # from as many candidates as k alone would, so latency and recall stay those the index was tuned for.
                refine = self.meta.layout.refine_factor * min(self.count, k + len(excluded)) / fetch
            params = self.search_params(nprobe, refine_factor=refine)
            with _one_thread_for_few(len(queries)):
                scores, ids = (self.index.search(queries, fetch, params=params) if params
                               else self.index.search(queries, fetch))
            hits = _hits(scores, ids, excluded, k)
            # An IVF-PQ index returns an arbitrary part of a tie group larger than what was fetched (the exact index
            # keeps the first ids): while the k-th score still ties with the last one fetched, fetch more.
            if not ivf or fetch >= self.count or not _tie_reaches_the_cut(scores, ids, hits, k):
                break
            fetch = min(self.count, fetch * 4)
        if tuned and any(len(row) < min(k, self.count - len(excluded)) for row in hits):
            return self._search_exact(queries, fetch, excluded, k)
        return hits

    def _search_exact(self, queries: np.ndarray, fetch: int, excluded: set[int], k: int) -> list[list[tuple[int, float]]]:
        """Every stored vector scored (an IVF-PQ index's refine copy), for a k its probed lists cannot fill."""
        scores, internal = self._flat_vectors().search(queries, fetch)
        labels = np.where(internal >= 0, self._positions_to_ids()[np.maximum(internal, 0)], -1)
        return _hits(scores, labels, excluded, k)

    # -- filtered queries ----------------------------------------------------------------------
    def positions(self, ids: np.ndarray) -> np.ndarray:
        """The internal positions (0..count-1, the order vectors were added) of those `ids` that are indexed.
        FAISS ids are SQLite row ids; `IDMap` keeps them in `id_map`, in position order."""
        id_map = self._positions_to_ids()
        if self._sorted_ids is None:
            # Built and appended in increasing id order, so normally already sorted.
            order = None if bool(np.all(id_map[1:] > id_map[:-1])) else np.argsort(id_map, kind="stable")
            self._sorted_ids, self._id_order = (id_map if order is None else id_map[order]), order
        sorted_ids = self._sorted_ids
        if not len(sorted_ids) or not len(ids):
            return np.zeros(0, dtype=np.int64)
        at = np.searchsorted(sorted_ids, ids)
        found = at < len(sorted_ids)
        found[found] = sorted_ids[at[found]] == ids[found]
        at = at[found]
        return (at if self._id_order is None else self._id_order[at]).astype(np.int64)

    def search_params(self, nprobe: int | None = None, refine_factor: float | None = None, sel=None):
        """FAISS search parameters overriding the tuned nprobe / refine factor (None: nothing to override)."""
        import faiss

        layout = self.meta.layout
        if layout.kind != "ivfpq" or (nprobe is None and refine_factor is None and sel is None):
            return None
        ivf = faiss.extract_index_ivf(self.index)
        probe = int(min(ivf.nlist, max(1, nprobe if nprobe is not None else ivf.nprobe)))
        inner = faiss.downcast_index(self.index.index)
        factor = refine_factor if refine_factor is not None else getattr(inner, "k_factor", 1)
        base = faiss.SearchParametersIVF(sel=sel, nprobe=probe) if sel is not None else faiss.SearchParametersIVF(nprobe=probe)
        return faiss.IndexRefineSearchParameters(k_factor=float(max(1, factor)), base_index_params=base)

    def _search_allowed(self, queries: np.ndarray, k: int, allowed: np.ndarray,
                        excluded: set[int], nprobe: int | None = None) -> list[list[tuple[int, float]]]:
        """Rank only `allowed` ids. Two ways, both with FAISS id selectors over internal positions:

        - exact: the flat vectors (the IDMap,Flat index itself; for IVF-PQ, the refine stage's flat copy of
          every vector) searched with an IDSelectorBatch. FAISS then computes inner products for the selected
          vectors only, so this costs a membership test per stored vector plus one dot product per allowed
          vector (measured at 100k x 512: 0.4 ms for 1,000 allowed, 16 ms for 60,000, 8.5 ms unfiltered).
          It always finds every allowed vector, so it is the only path for the flat layout and for small
          allow-lists of an IVF-PQ index.
        - IVF-PQ with the selector in its inverted lists: probing nprobe of nlist lists sees only about
          nprobe/nlist of the allowed vectors, so a small allow-list would come back short (a 1% filter
          probing 1/8 of the lists sees ~0.1% of the collection). Used only when the allow-list is larger
          than EXACT_SUBSET_MAX and nprobe can be raised so that the probed lists hold about twice the
          candidates the refine stage wants; when even that returns fewer than k hits, the exact way answers.
        """
        import faiss

        positions = self.positions(np.setdiff1d(allowed, np.fromiter(excluded, dtype=np.int64, count=len(excluded))))
        if not len(positions):
            return [[] for _ in range(len(queries))]
        k = min(k, len(positions))
        fetch = min(k + TIE_MARGIN, len(positions))
        selector = faiss.IDSelectorBatch(positions)
        layout = self.meta.layout
        if layout.kind == "ivfpq" and len(positions) > EXACT_SUBSET_MAX:
            ivf = faiss.extract_index_ivf(self.index)
            wanted = 2 * k * max(1, layout.refine_factor)
            nprobe = max(nprobe or layout.nprobe, math.ceil(ivf.nlist * wanted / len(positions)))
            if nprobe <= ivf.nlist // 2:
                params = self.search_params(int(nprobe), layout.refine_factor * k / fetch, sel=selector)  # as search()
                # Through IDMap with no top-level selector: it only translates the labels back to ids.
                scores, ids = self.index.search(queries, fetch, params=params)
                hits = _hits(scores, ids, excluded, k)
                if all(len(row) >= k for row in hits):
                    return hits
        scores, internal = self._flat_vectors().search(queries, fetch, params=faiss.SearchParameters(sel=selector))
        labels = np.where(internal >= 0, self._positions_to_ids()[np.maximum(internal, 0)], -1)
        return _hits(scores, labels, excluded, k)

    def _positions_to_ids(self) -> np.ndarray:
        """IDMap's id_map as an array (position -> id), read once per loaded index."""
        if self._id_map is None:
            import faiss

            self._id_map = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        return self._id_map

    def _flat_vectors(self):
        """The index that holds every vector uncompressed, by internal position."""
        import faiss

        inner = faiss.downcast_index(self.index.index)
        if self.meta.layout.kind == "ivfpq":
            return faiss.downcast_index(inner.refine_index)
        return inner

    def bytes_on_disk(self, folder: Path) -> int:
        lists = self.meta.layout.lists_file
        names = (INDEX_FILE, SIDECAR_FILE, TRAINED_FILE) + ((lists, _ivfdata_name(lists)) if lists else ())
        return sum((Path(folder) / name).stat().st_size for name in names if (Path(folder) / name).is_file())

    def resident_bytes(self) -> int:
        """Bytes this index keeps in memory by its own account: the codes and ids of in-memory inverted lists,
        the id map and the centroids (mapped refine vectors and on-disk lists not counted); the flat layout: all."""
        import faiss

        if self.meta.layout.kind != "ivfpq":
            return self.count * (4 * self.meta.dim + 8)
        ivf = faiss.extract_index_ivf(self.index)
        lists = 0
        if not self.meta.layout.on_disk:
            invlists = ivf.invlists
            lists = sum(invlists.list_size(i) for i in range(ivf.nlist)) * 8  # ids
            block = getattr(ivf, "bbs", 0)
            for i in range(ivf.nlist):
                size = invlists.list_size(i)
                lists += ((size + block - 1) // block * block * ivf.M2 // 2) if block else size * ivf.code_size
        return int(lists + self.count * 8 + ivf.nlist * self.meta.dim * 4)


def _hits(scores: np.ndarray, ids: np.ndarray, excluded: set[int], k: int) -> list[list[tuple[int, float]]]:
    """The first k of each row, best first and equal scores by id: identical copies score exactly alike, and FAISS
    orders ties by how its heap went, which differs with k (a first page and a longer list would disagree). The
    rows hold TIE_MARGIN more than k, so ties at the cut are decided the same way too."""
    results = []
    for row_scores, row_ids in zip(scores, ids):
        hits = [(int(i), float(s)) for s, i in zip(row_scores, row_ids) if i >= 0 and int(i) not in excluded]
        hits.sort(key=lambda hit: (-hit[1], hit[0]))
        results.append(hits[:k])
    return results


def _tie_reaches_the_cut(scores: np.ndarray, ids: np.ndarray, hits: list[list[tuple[int, float]]], k: int) -> bool:
    """True when some row's k-th hit scores the same as the last result fetched for it (more may tie unseen)."""
    for row_scores, row_ids, row_hits in zip(scores, ids, hits):
        if len(row_hits) >= k and row_ids[-1] >= 0 and float(row_scores[-1]) == row_hits[k - 1][1]:
            return True
    return False


def _apply_search_params(index, layout: IndexLayout) -> None:
    if layout.kind != "ivfpq":
        return
    import faiss

    faiss.extract_index_ivf(index).nprobe = layout.nprobe
    refine = faiss.downcast_index(index.index) if hasattr(index, "index") else index
    if hasattr(refine, "k_factor"):
        refine.k_factor = layout.refine_factor


def _atomic_write(target: Path, write: Callable[[Path], object]) -> None:
    """Write through `write(tmp_path)` into a temp file beside `target`, fsync it, rename over target, fsync the dir."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def _fits(trained, layout: IndexLayout, dim: int) -> bool:
    """Whether an empty trained base has the structure `layout` asks for (so it can be reused)."""
    import faiss

    if trained is None or trained.d != dim:
        return False
    want = faiss.index_factory(dim, layout.base_factory, faiss.METRIC_INNER_PRODUCT)
    have_ivf, want_ivf = faiss.extract_index_ivf(trained), faiss.extract_index_ivf(want)
    return (type(have_ivf) is type(want_ivf) and have_ivf.nlist == want_ivf.nlist
            and have_ivf.code_size == want_ivf.code_size and type(trained) is type(want))


class _RowSpool:
    """Full vectors in arrival order, spooled to a raw float32 file while the codes are built (never in memory)."""

    def __init__(self, folder: Path, dim: int) -> None:
        self.dim = dim
        self.path = _temp_path(folder, "rows")
        self._handle = open(self.path, "wb")
        self.count = 0

    def write(self, vectors: np.ndarray) -> None:
        self._handle.write(np.ascontiguousarray(vectors, dtype="<f4").tobytes())
        self.count += len(vectors)

    def chunks(self) -> Iterator[np.ndarray]:
        self._handle.flush()
        if not self.count:
            return
        mapped = np.memmap(self.path, dtype="<f4", mode="r", shape=(self.count, self.dim))
        for start in range(0, self.count, _CHUNK):
            yield np.asarray(mapped[start:start + _CHUNK])
        del mapped

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()
        _unlink_quietly(self.path)


def _spooled(batches, rows: _RowSpool, id_parts: list) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for ids, vectors in batches:
        if not len(ids):
            continue
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        rows.write(vectors)
        id_parts.append(np.asarray(ids, dtype=np.int64))
        yield id_parts[-1], vectors


def _checked_increasing(batches, max_id: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for ids, vectors in batches:
        if not len(ids):
            continue
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if int(ids[0]) <= max_id or (len(ids) > 1 and not bool(np.all(ids[1:] > ids[:-1]))):
            raise ValueError("append needs ids larger than the index's largest id")
        max_id = int(ids[-1])
        yield ids, np.ascontiguousarray(vectors, dtype=np.float32)


def _chain(*parts):
    for part in parts:
        yield from part


def _serial_shards(base, batches, shard: int) -> Iterator:
    """Copies of the trained empty `base` holding `shard` vectors each (labels: positions), built here in turn."""
    import faiss

    position = 0
    current = None
    for ids, vectors in batches:
        if current is None:
            current = faiss.clone_index(base)
        current.add_with_ids(vectors, np.arange(position, position + len(ids), dtype=np.int64))
        position += len(ids)
        if current.ntotal >= shard:
            yield current
            current = None
    if current is not None and current.ntotal:
        yield current


def _add_on_disk(base, shards: Iterable, workdir: Path, token: str) -> Path:
    """Add into inverted lists on disk: each shard index (in position order: `_serial_shards`, or
    `parallel_build.shard_indexes`) is written out, then all are merged into `vectors-<token>.ivfdata` (FAISS
    `merge_ondisk`); returns the `.lists` file that describes them."""
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    shard_files: list[str] = []
    try:
        for current in shards:
            name = str(_temp_path(workdir, "shard"))
            faiss.write_index(current, name)
            shard_files.append(name)
            del current
        lists = workdir / f"vectors-{token}{LISTS_SUFFIX}"
        with _faiss_notes_to_stderr():  # "resizing ...ivfdata to N bytes" and the like
            merge_ondisk(base, shard_files, str(workdir / _ivfdata_name(lists.name)))
            faiss.write_index(base, str(lists))
        return lists
    finally:
        for name in shard_files:
            _unlink_quietly(Path(name))


_NOTES_LOCK = threading.Lock()  # one swap of fd 1 at a time: two overlapping ones could leave it on stderr for good


@contextmanager
def _faiss_notes_to_stderr() -> Iterator[None]:
    """FAISS's C++ code prints notes about on-disk inverted lists with printf, i.e. into the process's stdout, which
    carries `--json` and `-0` output: for the block, C's stdout goes to stderr. The swap is process-wide and brief
    (opening or merging on-disk lists); blocks of several threads take turns. Python's own sys.stdout is flushed
    first. Without a C library, with stdout or stderr closed, or with sys.stdout not on fd 1, nothing is swapped."""
    import ctypes

    with _NOTES_LOCK:
        libc = saved = None
        try:
            if sys.stdout is None or sys.stdout.fileno() != 1:  # started without stdout: fd 1 may be any file now
                raise ValueError("no stdout to keep clean")
            libc = ctypes.CDLL(None)
            sys.stdout.flush()
            libc.fflush(None)
            saved = os.dup(1)
            os.dup2(2, 1)
        except (OSError, ValueError, AttributeError):  # no C library, no fd 2, stdout closed or replaced: fd 1 stays
            if saved is not None:
                os.close(saved)
            saved = None
        try:
            yield
        finally:
            if saved is not None:
                libc.fflush(None)  # what FAISS left in C's stdout buffer goes to stderr too
                os.dup2(saved, 1)
                os.close(saved)


def _ivfdata_name(lists_file: str) -> str:
    return lists_file.removesuffix(LISTS_SUFFIX) + IVFDATA_SUFFIX


def _header(dim: int, count: int) -> bytes:
    """FAISS's index header: d, ntotal, two unused words, is_trained, metric (0: inner product)."""
    return struct.pack("<iqqqBi", dim, count, 1 << 20, 1 << 20, 1, 0)


def _compose(path: Path, base, rows: Iterable[np.ndarray], ids: np.ndarray, dim: int, k_factor: float) -> None:
    """Write `IDMap(Refine(base, IndexFlatIP))` in FAISS's own format with the flat vectors streamed from `rows`
    (byte-identical to `faiss.write_index` of the same structure; tests/test_index_policy.py checks it)."""
    import faiss

    count = len(ids)
    with open(path, "wb") as handle:
        handle.write(b"IxMp" + _header(dim, count) + b"IxRF" + _header(dim, count))
        faiss.write_index(base, faiss.PyCallbackIOWriter(handle.write))
        handle.write(b"IxFI" + _header(dim, count) + struct.pack("<q", count * dim))
        written = 0
        for chunk in rows:
            handle.write(np.ascontiguousarray(chunk, dtype="<f4").tobytes())
            written += len(chunk)
        if written != count:
            raise CollectionError(f"wrote {written} vectors into the refine stage, expected {count}")
        handle.write(struct.pack("<f", k_factor) + struct.pack("<q", count))
        handle.write(np.ascontiguousarray(ids, dtype="<i8").tobytes())
        handle.flush()
        os.fsync(handle.fileno())


def _temp_path(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    return Path(tmp)


# Temp files a killed write leaves: `_atomic_write`'s (".NAME.XXXXXXXX.tmp" of the index, its sidecar, the trained
# quantizer, on-disk lists and store/tokens.py's "tokens.bin") and the IVF builds' row and shard files.
_TEMP_PREFIXES = (f".{INDEX_FILE}.", f".{SIDECAR_FILE}.", f".{TRAINED_FILE}.", ".vectors-", ".tokens.bin.", ".rows.",
                  ".shard.")


def remove_index_leftovers(folder: Path, keep: str = "") -> list[Path]:
    """Delete what killed index writes left in `folder` (temp files) and on-disk lists the sidecar does not name.
    Only the process holding the collection's writer lock may call this."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    kept = {keep, _ivfdata_name(keep)} if keep else set()
    for child in folder.iterdir():
        name = child.name
        stale_temp = name.startswith(_TEMP_PREFIXES) and name.endswith(".tmp")
        stale_lists = name.startswith("vectors-") and name.endswith((LISTS_SUFFIX, IVFDATA_SUFFIX)) and name not in kept
        if (stale_temp or stale_lists) and child.is_file():
            _unlink_quietly(child)
            removed.append(child)
    return removed


def _unreadable(path: Path, exc: Exception) -> CollectionError:
    return CollectionError(f"{path}: unreadable FAISS index ({str(exc).splitlines()[0][:200]})",
                           "Repair it with: clipsearch index PATH (rebuilds the index from SQLite)")


def _unlink_quietly(path: Path | None) -> None:
    if path is not None:
        try:
            os.unlink(path)
        except OSError:
            pass


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextmanager
def _one_thread_for_few(queries: int, few: int = 4) -> Iterator[None]:
    """One OpenMP thread for this thread's FAISS calls while searching a few queries: a single query's work is too
    small to share, and waking a second thread at each step costs more than it saves (on the 2-core machines,
    single-query p99 fell from 16 ms to under 1 ms). The setting is the calling thread's own and is put back, so
    index building and batch searches keep every core."""
    if queries > few:
        yield
        return
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)
