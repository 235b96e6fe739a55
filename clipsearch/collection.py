"""A collection: one folder holding a SQLite store and a FAISS index built with one model.

Layout of ``<root>/<name>/``::

    meta.sqlite (+ -wal, -shm)   images, vectors, skipped files, the model the collection was built with
    vectors.faiss, vectors.json  the search index and which store generation / model it reflects

`<root>` is `--index-dir` when given, else `clipsearch.paths.collections_dir()` (per-user data dir,
or `$CLIPSEARCH_HOME/collections`).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np

from . import paths
from .bundle import BundleInfo, is_bundle
from .errors import CollectionError
from .store import Store
from .vectors import DEFAULT_IVF_THRESHOLD, INDEX_FILE, SIDECAR_FILE, VectorIndex

DEFAULT_COLLECTION = "default"
STORE_FILE = "meta.sqlite"
LOCK_FILE = "index.lock"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class CollectionModel:
    """The model a collection's vectors come from."""

    model_id: str
    name: str
    bundle_path: str
    embed_dim: int

    @property
    def spec(self) -> str:
        """What to pass to `clipsearch.models.resolve_model` to get this model back."""
        return self.bundle_path if is_bundle(Path(self.bundle_path)) else self.name


@dataclass(frozen=True)
class CollectionStats:
    name: str
    folder: str
    images: int
    skipped: int
    model: CollectionModel | None
    index_kind: str | None
    index_count: int | None
    index_fresh: bool
    bytes_on_disk: int


@dataclass(frozen=True)
class VectorSync:
    """What `Collection.update_vectors` did: "none" (already fresh), "append" or "rebuild"."""

    index: VectorIndex | None
    update: str


@dataclass(frozen=True)
class CheckReport:
    """Result of `Collection.check`: `problems` is empty when SQLite and FAISS agree."""

    name: str
    images: int
    index_count: int | None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def collections_root(index_dir: Path | str | None = None) -> Path:
    return Path(index_dir).expanduser() if index_dir else paths.collections_dir()


def list_collections(index_dir: Path | str | None = None) -> list[str]:
    root = collections_root(index_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / STORE_FILE).is_file())


class Collection:
    """Open with `Collection.open(name, index_dir)` (must exist) or `Collection.create(...)`."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = Path(folder)
        self.name = name
        self._store: Store | None = None

    # -- opening ---------------------------------------------------------------------------------
    @staticmethod
    def folder_for(name: str, index_dir: Path | str | None = None) -> Path:
        if not _NAME_RE.match(name or ""):
            raise CollectionError(f"invalid collection name {name!r}",
                                  "Use letters, digits, '.', '_' or '-', starting with a letter or digit.")
        return collections_root(index_dir) / name

    @classmethod
    def open(cls, name: str = DEFAULT_COLLECTION, index_dir: Path | str | None = None) -> "Collection":
        folder = cls.folder_for(name, index_dir)
        if not (folder / STORE_FILE).is_file():
            known = list_collections(index_dir)
            hint = f"Known collections: {', '.join(known)}." if known else "Create it with: clipsearch index PATH"
            raise CollectionError(f"no collection named {name!r} in {folder.parent}", hint)
        return cls(folder, name)

    @classmethod
    def create(cls, name: str = DEFAULT_COLLECTION, index_dir: Path | str | None = None) -> "Collection":
        """Open the collection, creating its folder and database when missing."""
        folder = cls.folder_for(name, index_dir)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CollectionError(f"cannot create {folder}: {exc.strerror or exc}") from exc
        collection = cls(folder, name)
        collection.store  # creates the schema
        return collection

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.folder / STORE_FILE)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self) -> "Collection":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Held by an indexing run: a second run on the same collection is refused instead of interleaving."""
        lock_path = self.folder / LOCK_FILE
        handle = open(lock_path, "a+")
        try:
            try:
                import fcntl

                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except ImportError:  # not POSIX: no cross-process lock
                pass
            except BlockingIOError as exc:
                raise CollectionError(f"collection {self.name!r} is being indexed by another process",
                                      "Wait for it to finish (or stop it) and run again.") from exc
            yield
        finally:
            handle.close()

    # -- model ------------------------------------------------------------------------------------
    @property
    def model(self) -> CollectionModel | None:
        store = self.store
        model_id = store.get_meta("model_id")
        if not model_id:
            return None
        return CollectionModel(model_id=model_id, name=store.get_meta("model_name", "") or "",
                               bundle_path=store.get_meta("model_path", "") or "",
                               embed_dim=int(store.get_meta("embed_dim", "0") or 0))

    def bind_model(self, info: BundleInfo, rebuild: bool = False) -> None:
        """Record the model the vectors come from; refuse another model unless `rebuild` (which forgets all rows)."""
        current = self.model
        if current is not None and current.model_id != info.model_id:
            if not rebuild:
                raise CollectionError(
                    f"collection {self.name!r} was built with model {current.model_id}, not {info.model_id}; "
                    "vectors of two models cannot be mixed",
                    f"Index with --model {current.spec} or re-embed everything with --rebuild.")
        if rebuild:
            self.store.clear()
        self.store.set_meta({"model_id": info.model_id, "model_name": info.name, "model_path": str(info.path),
                             "embed_dim": str(info.embed_dim),
                             "created_at": self.store.get_meta("created_at") or _now()})

    def require_model(self) -> CollectionModel:
        model = self.model
        if model is None:
            raise CollectionError(f"collection {self.name!r} is empty (no model recorded yet)",
                                  "Index some photos first: clipsearch index PATH")
        return model

    # -- vectors ----------------------------------------------------------------------------------
    def vectors_fresh(self) -> bool:
        """True when the saved FAISS index reflects the current store generation."""
        sidecar = self.folder / SIDECAR_FILE
        if not sidecar.is_file():
            return False
        try:
            from .vectors import IndexMeta

            meta = IndexMeta.from_json(sidecar.read_text(encoding="utf-8"))
        except (ValueError, KeyError, TypeError):
            return False
        model = self.model
        index_file = self.folder / INDEX_FILE
        intact = index_file.is_file() and (not meta.file_bytes or index_file.stat().st_size == meta.file_bytes)
        return (intact and meta.generation == self.store.generation and model is not None
                and meta.model_id == model.model_id)

    def build_vectors(self, ivf_threshold: int = DEFAULT_IVF_THRESHOLD) -> VectorIndex:
        """Build the FAISS index from the store's vectors (reusing a trained IVF-PQ quantizer when it fits)."""
        model = self.require_model()
        store, dim = self.store, model.embed_dim
        count = store.count_embeddings()
        previous_trained_on = 0
        try:
            from .vectors import IndexMeta

            previous_trained_on = IndexMeta.from_json((self.folder / SIDECAR_FILE).read_text(encoding="utf-8")).trained_on
        except (OSError, ValueError, KeyError, TypeError):
            pass
        trained = VectorIndex.load_trained(self.folder) if previous_trained_on else None

        def sample(n: int) -> np.ndarray:
            ids, vectors = store.all_vectors(dim)
            pick = np.random.default_rng(0).choice(len(ids), size=min(n, len(ids)), replace=False)
            return vectors[np.sort(pick)]

        return VectorIndex.build(store.iter_vectors(dim), count=count, dim=dim, model_id=model.model_id,
                                 generation=store.generation, ivf_threshold=ivf_threshold, trained=trained,
                                 trained_on=previous_trained_on, sample=sample)

    def save_vectors(self, index: VectorIndex) -> None:
        index.save(self.folder)

    def sync_vectors(self, ivf_threshold: int = DEFAULT_IVF_THRESHOLD) -> VectorIndex | None:
        """Bring the saved FAISS index up to date with the store; returns it when it changed."""
        return self.update_vectors(ivf_threshold).index

    def update_vectors(self, ivf_threshold: int = DEFAULT_IVF_THRESHOLD) -> "VectorSync":
        """Bring the saved index up to date: nothing when fresh; appending when the store only gained rows
        since it was saved (and the layout still fits); a full rebuild from SQLite otherwise."""
        if self.vectors_fresh():
            return VectorSync(None, "none")
        appended = self._append_new_vectors(ivf_threshold)
        if appended is not None:
            self.save_vectors(appended)
            return VectorSync(appended, "append")
        index = self.build_vectors(ivf_threshold)
        self.save_vectors(index)
        return VectorSync(index, "rebuild")

    def _append_new_vectors(self, ivf_threshold: int) -> VectorIndex | None:
        from .vectors import IndexLayout, IndexMeta

        model = self.model
        try:
            meta = IndexMeta.from_json((self.folder / SIDECAR_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        store = self.store
        count = store.count_embeddings()
        if model is None or meta.model_id != model.model_id or meta.dim != model.embed_dim or not meta.max_id:
            return None
        if IndexLayout.for_size(count, meta.dim, ivf_threshold).kind != meta.layout.kind:
            return None  # crossed the exact/IVF-PQ threshold
        if meta.layout.kind == "ivfpq" and count > 4 * meta.trained_on:
            return None  # grown too much for the trained quantizer: retrain
        if store.vectors_unchanged_since(meta.generation, meta.max_id) != (meta.count, meta.count):
            return None  # something the index holds was deleted or re-embedded
        index_file = self.folder / INDEX_FILE
        if not index_file.is_file() or (meta.file_bytes and index_file.stat().st_size != meta.file_bytes):
            return None
        try:
            index = VectorIndex.load(self.folder)
        except CollectionError:
            return None
        index.append(store.iter_vectors(meta.dim, min_id=meta.max_id + 1), generation=store.generation)
        return index if index.count == count else None

    def load_vectors(self, mmap: bool = False, ivf_threshold: int = DEFAULT_IVF_THRESHOLD) -> VectorIndex:
        """The saved index when fresh. When SQLite is ahead of it (an indexing run in progress, or a killed
        one): an exact in-memory rebuild if the collection is small enough for the exact layout, else the
        saved index as it is (hits on rows that are gone are dropped by the searcher) if it is usable."""
        if self.vectors_fresh():
            return VectorIndex.load(self.folder, mmap=mmap)
        model = self.require_model()
        if self.store.count_embeddings() >= ivf_threshold:
            try:
                saved = VectorIndex.load(self.folder, mmap=mmap)
            except CollectionError:
                saved = None
            if saved is not None and saved.meta.model_id == model.model_id and saved.meta.dim == model.embed_dim:
                return saved
        return self.build_vectors(ivf_threshold)

    # -- inspection -------------------------------------------------------------------------------
    def check(self, sample_size: int = 32) -> CheckReport:
        """Verify that SQLite and FAISS agree: counts, ids, model, generation, and a sample of vectors."""
        problems: list[str] = []
        store = self.store
        integrity = store.db.execute("PRAGMA quick_check").fetchone()[0]
        if integrity != "ok":
            problems.append(f"SQLite integrity check failed: {integrity}")
        images, embeddings = store.count(), store.count_embeddings()
        row_ids, vector_ids = store.ids(), store.embedding_ids()
        if images != embeddings or not np.array_equal(row_ids, vector_ids):
            missing = np.setdiff1d(row_ids, vector_ids)
            orphans = np.setdiff1d(vector_ids, row_ids)
            problems.append(f"SQLite has {images} images but {embeddings} stored vectors "
                            f"({len(missing)} images without a vector, {len(orphans)} vectors without an image)")
        model = self.model
        if model is None:
            if images:
                problems.append("SQLite has images but no model recorded")
            return CheckReport(self.name, images, None, problems)
        wrong_model = store.db.execute("SELECT count(*) FROM images WHERE model_id != ?", [model.model_id]).fetchone()[0]
        if wrong_model:
            problems.append(f"{wrong_model} images were embedded with another model than {model.model_id}")
        try:
            index = VectorIndex.load(self.folder)
        except CollectionError as exc:
            problems.append(exc.message)
            return CheckReport(self.name, images, None, problems)
        meta = index.meta
        actual_bytes = (self.folder / INDEX_FILE).stat().st_size
        if meta.file_bytes and actual_bytes != meta.file_bytes:
            problems.append(f"{INDEX_FILE} has {actual_bytes} bytes, {meta.file_bytes} were written")
        if meta.model_id != model.model_id:
            problems.append(f"FAISS index was built with model {meta.model_id}, SQLite says {model.model_id}")
        if meta.dim != model.embed_dim or index.index.d != model.embed_dim:
            problems.append(f"FAISS index has {index.index.d} dimensions, the model has {model.embed_dim}")
        if index.count != meta.count:
            problems.append(f"FAISS index holds {index.count} vectors, its sidecar says {meta.count}")
        if index.count != images:
            problems.append(f"FAISS index holds {index.count} vectors, SQLite has {images} images")
        faiss_ids = index.ids()
        if not np.array_equal(faiss_ids, row_ids):
            only_faiss = np.setdiff1d(faiss_ids, row_ids)
            only_sql = np.setdiff1d(row_ids, faiss_ids)
            problems.append(f"ids differ: {len(only_faiss)} only in FAISS (e.g. {only_faiss[:5].tolist()}), "
                            f"{len(only_sql)} only in SQLite (e.g. {only_sql[:5].tolist()})")
        if meta.generation != store.generation:
            problems.append(f"FAISS index reflects store generation {meta.generation}, SQLite is at {store.generation} "
                            "(an interrupted run?); run `clipsearch index` again to complete it")
        if not problems and images and meta.layout.kind == "flat":
            problems.extend(self._check_vector_sample(index, model.embed_dim, sample_size))
        return CheckReport(self.name, images, index.count, problems)

    def _check_vector_sample(self, index: VectorIndex, dim: int, sample_size: int) -> list[str]:
        ids = self.store.ids()
        pick = ids[np.random.default_rng(0).choice(len(ids), size=min(sample_size, len(ids)), replace=False)]
        problems = []
        for image_id in pick.tolist():
            vector = self.store.vector(image_id, dim)
            if vector is None:
                continue
            expected = float(vector @ vector)
            hits = index.search(vector[None, :], 1)[0]
            if not hits or hits[0][1] < expected - 1e-3:
                problems.append(f"FAISS vector of id {image_id} differs from the one in SQLite")
            elif hits[0][0] != image_id and abs(hits[0][1] - expected) > 1e-3:
                problems.append(f"FAISS returns id {hits[0][0]} for the vector of id {image_id}")
        return problems

    def stats(self) -> CollectionStats:
        store = self.store
        meta = None
        try:
            from .vectors import IndexMeta

            meta = IndexMeta.from_json((self.folder / SIDECAR_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError, TypeError):
            pass
        skipped = int(store.db.execute("SELECT count(*) FROM skipped").fetchone()[0])
        size = sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())
        return CollectionStats(name=self.name, folder=str(self.folder), images=store.count(), skipped=skipped,
                               model=self.model, index_kind=meta.layout.kind if meta else None,
                               index_count=meta.count if meta else None, index_fresh=self.vectors_fresh(),
                               bytes_on_disk=size)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
