"""A collection: one folder holding a SQLite store and a FAISS index built with one model.

Layout of ``<root>/<name>/``::

    meta.sqlite (+ -wal, -shm)   images, vectors, skipped files, the model the collection was built with
    vectors.faiss, vectors.json  the search index and which store generation / model it reflects
    tokens.bin                   the ITM image tokens SQLite holds, memory-mapped by re-ranking searchers
                                 (collections that store tokens; rewritten atomically with the vectors)
    index.lock                   held by the indexing run that writes the collection
    CURRENT, gen-N/              after a `--rebuild`: CURRENT names the generation folder gen-N that holds
                                 the files above (without CURRENT they sit in the collection folder itself)

A rebuild builds a new generation folder beside the data in use and then replaces CURRENT atomically
(write, fsync, rename): searchers keep answering from the old data until that rename, a killed rebuild
leaves the old data untouched, and the next indexing run removes what a killed rebuild left behind.
Searchers notice the switch (`Collection.refresh`) and reopen; the old data is deleted after the switch
(processes that still hold it open keep reading it through their open files).

`<root>` is `--index-dir` when given, else `clipsearch.paths.collections_dir()` (per-user data dir,
or `$CLIPSEARCH_HOME/collections`).
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np

from .. import paths
from ..model.bundle import BundleInfo, is_bundle
from ..errors import CollectionError, UnreadableStoreError
from ..paths import fsync_dir
from .database import Store
from .tokens import DEFAULT_MAX_TOKEN_BYTES, DEFAULT_STORAGE, TOKENS_FILE, TokenCodec, TokenFile, format_bytes, \
    write_token_file
from .index.parallel_build import ParallelAdd
from .index.vectors import DEFAULT_IVF_THRESHOLD, INDEX_FILE, SIDECAR_FILE, TRAINED_FILE, VectorIndex, file_crc32, \
    outgrown, remove_index_leftovers

DEFAULT_COLLECTION = "default"
STORE_FILE = "meta.sqlite"
LOCK_FILE = "index.lock"
LOCK_ATTEMPTS = 20  # over about 0.2 s, before a run is refused because another one holds the lock
POINTER_FILE = "CURRENT"
GENERATION_PREFIX = "gen-"
_GENERATION_RE = re.compile(r"^gen-([0-9]{1,9})$")
# What a generation's data is made of, when it sits in the collection folder itself (before any rebuild).
_DATA_FILES = (STORE_FILE, STORE_FILE + "-wal", STORE_FILE + "-shm", STORE_FILE + "-journal", INDEX_FILE,
               SIDECAR_FILE, TRAINED_FILE, TOKENS_FILE)
_DATA_DIRS = ("thumbnails",)
_THUMBNAIL_RE = re.compile(r"^(\d+-[0-9a-f]{16})-\d+\.jpg$")
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
        """What to pass to `clipsearch.model.resolve.resolve_model` to get this model back."""
        return self.bundle_path if is_bundle(Path(self.bundle_path)) else self.name

    @property
    def shown_spec(self) -> str:
        """`spec` as a user types it: a bundled model by its name (`emoji-mini`), not its folder in the package."""
        from ..model.resolve import BUNDLED_DIR

        spec = self.spec
        return Path(spec).name if Path(spec).parent == BUNDLED_DIR else spec

    def load(self, collection: str, threads: int | None = None):
        """This model, loaded (a `ClipModel`) for the collection named `collection`: a clear error when its bundle
        folder is gone (moved: name the new folder with --model) or now holds another model (replaced)."""
        from ..errors import ModelNotAvailable
        from ..model.resolve import load_model

        try:
            model = load_model(self.spec, threads=threads)
        except ModelNotAvailable as exc:
            if not self.bundle_path or is_bundle(Path(self.bundle_path)):  # found by its name: not a move
                raise
            raise ModelNotAvailable(
                f"collection {collection!r} was built with model {self.name}, whose bundle was at {self.bundle_path} "
                "and is not there any more", "If it moved, pass --model with its new folder (it is checked to be the "
                "same model; `clipsearch index` with it remembers the new place); to use another model, re-embed: "
                f"clipsearch index PATH --collection {collection} --rebuild --model MODEL.") from exc
        if model.model_id != self.model_id:
            where = model.info.path  # the recorded folder, or where its name led when that folder is gone
            was = ("the bundle there was replaced" if str(where) == self.bundle_path
                   else f"its own bundle at {self.bundle_path} is gone")
            raise CollectionError(
                f"collection {collection!r} was built with model {self.model_id}, but {where} holds model "
                f"{model.model_id}: {was}",
                "Put the original bundle back (or pass --model with a copy of it); to use this one instead, re-embed "
                f"the collection with it: clipsearch index PATH --collection {collection} --rebuild --model {where}.")
        return model


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
    # ITM image tokens: "on"/"off" (None: never decided, a collection from before tokens), how they are
    # stored, how many images have them and what one image's take
    tokens: str | None = None
    token_storage: str | None = None
    token_shape: tuple[int, int] | None = None
    tokens_stored: int = 0
    token_bytes_per_image: int | None = None
    # the index policy's choice and the tuned search knobs (None before an index exists)
    index_factory: str | None = None
    index_nprobe: int | None = None
    index_nlist: int | None = None
    index_refine_factor: int | None = None
    index_recall: float | None = None  # recall@10 the tuned knobs reached on held-out queries
    index_target_recall: float | None = None
    index_on_disk: bool = False
    index_budget_bytes: int | None = None
    index_resident_bytes: int | None = None  # the policy's estimate
    index_trained_on: int | None = None
    index_trained_at: str | None = None
    index_train_reason: str | None = None
    index_reasons: tuple[str, ...] = ()


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


@dataclass(frozen=True)
class TokenChoice:
    """Whether an indexing run stores ITM image tokens, and why (`reason` is printed by the CLI)."""

    codec: TokenCodec | None
    reason: str = ""
    explicit: bool = False  # --tokens / --no-tokens was given
    source: str | None = None  # sha256 of the visual graph that computes the tokens (`token_source`)


def token_source(model) -> str | None:
    """What made a model's image tokens: its visual graph's sha256. The model id stays when a bundle's ITM head
    is re-trained (the embedding is unchanged), but the tokens change with the head's image tokenizer."""
    info = getattr(model, "info", None)
    return info.files.get("visual.onnx") if info is not None else None


def model_token_codec(model) -> TokenCodec | None:
    """How a `ClipModel`'s image tokens would be stored, or None for a model without an ITM head."""
    spec = model.itm_spec if getattr(model, "has_itm", False) else None
    if spec is None:
        return None
    storage = spec.image_tokens_storage or DEFAULT_STORAGE
    shape = spec.image_tokens_shape
    if shape is None:  # model.json does not say: ask the graph once
        size = model.preprocess.size
        _, tokens = model.encode_pixels_with_tokens(np.zeros((1, 3, size[0], size[1]), dtype=np.float32))
        shape = (int(tokens.shape[1]), int(tokens.shape[2]))
    return TokenCodec(storage, (int(shape[0]), int(shape[1])))


def collections_root(index_dir: Path | str | None = None) -> Path:
    return Path(index_dir).expanduser() if index_dir else paths.collections_dir()


def list_collections(index_dir: Path | str | None = None) -> list[str]:
    root = collections_root(index_dir)
    if not root.is_dir():
        return []
    names = []
    for folder in root.iterdir():
        try:
            if (data_folder(folder) / STORE_FILE).is_file():
                names.append(folder.name)
        except (OSError, CollectionError):
            continue
    return sorted(names)


def data_folder(root: Path) -> Path:
    """The folder holding a collection's current data: the generation CURRENT names, else `root` itself."""
    try:
        name = (root / POINTER_FILE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return root
    except OSError as exc:
        raise CollectionError(f"{root / POINTER_FILE}: unreadable ({exc.strerror or exc})") from exc
    if not _GENERATION_RE.match(name):
        raise CollectionError(f"{root / POINTER_FILE}: does not name a generation folder ({name[:40]!r})",
                              "Rebuild the collection with: clipsearch index PATH --rebuild")
    return root / name


class Collection:
    """Open with `Collection.open(name, index_dir)` (must exist) or `Collection.create(...)`.

    `root` is the collection's folder; `folder` is where its current data lives (`root` itself, or the
    generation folder a rebuild switched to)."""

    def __init__(self, folder: Path, name: str, *, create: bool = False, data: Path | None = None) -> None:
        self.root = Path(folder)
        self.name = name
        self._create = create
        self._pinned = data is not None  # a rebuild's new generation: not found through CURRENT
        self.folder = Path(data) if data is not None else data_folder(self.root)
        self._store: Store | None = None
        # How an IVF-PQ rebuild adds its vectors (`parallel_build.ParallelAdd`): None here, in this process; the
        # Ray runner sets it for its run so shard jobs add them on Ray (training and saving stay here).
        self.parallel_adds: ParallelAdd | None = None

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
        if not (data_folder(folder) / STORE_FILE).is_file():
            known = list_collections(index_dir)
            hint = f"Known collections: {', '.join(known)}." if known else "Create it with: clipsearch index PATH"
            raise CollectionError(f"no collection named {name!r} in {folder.parent}", hint)
        return cls(folder, name)

    @classmethod
    def create(cls, name: str = DEFAULT_COLLECTION, index_dir: Path | str | None = None) -> "Collection":
        """Open the collection, or prepare a new one: nothing is written to disk until an indexing run takes
        its `writer_lock` or a model is bound (`bind_model`). A command that fails before that (an unknown
        --model, say) leaves no collection behind, and a first run that fails before binding its model
        removes the empty database again (`discard_if_unbound`)."""
        return cls(cls.folder_for(name, index_dir), name, create=True)

    @property
    def exists(self) -> bool:
        """True once the collection has a database (a created collection gets one from `bind_model`)."""
        return self._store is not None or (self.folder / STORE_FILE).is_file()

    @property
    def store(self) -> Store:
        if self._store is None:
            for attempt in range(3):
                if not self._pinned:
                    self.folder = data_folder(self.root)
                path = self.folder / STORE_FILE
                if not path.is_file() and not self._create:
                    if attempt < 2:  # the generation was switched between reading CURRENT and the check
                        continue
                    raise CollectionError(f"no collection named {self.name!r} in {self.root.parent}",
                                          "Create it with: clipsearch index PATH")
                if self._create:
                    self._make_folder(self.folder)
                try:
                    store = Store(path, create=self._create)
                except CollectionError:
                    if attempt < 2 and not self._pinned and data_folder(self.root) != self.folder:
                        continue  # a rebuild switched generations while we opened the old one: open the new one
                    raise
                self._store = store
                break
            if self._store.migrated_from is not None:
                self._reserve_indexed_ids(self._store)
            if self._store.created:
                self._drop_derived_files(self._store)
        return self._store

    def _drop_derived_files(self, store: Store) -> None:
        """A database made now, beside an index, tokens or thumbnails (its file was deleted or emptied): those
        were derived from rows that are gone, so they go too, or the next run would find a saved index whose
        generation the new rows reach and search the old vectors under the new ids. Ids continue above the old
        index's, so a process still holding it never shows a new image for an old vector."""
        derived = [self.folder / name for name in (INDEX_FILE, SIDECAR_FILE, TRAINED_FILE, TOKENS_FILE)]
        if not any(path.exists() for path in derived) and not (self.folder / "thumbnails").is_dir():
            return
        meta = _read_meta(self.folder)
        if meta is not None and meta.max_id:
            store.reserve_ids_through(meta.max_id)
        for path in derived:
            path.unlink(missing_ok=True)
        remove_index_leftovers(self.folder)
        shutil.rmtree(self.folder / "thumbnails", ignore_errors=True)

    @staticmethod
    def _make_folder(folder: Path) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CollectionError(f"cannot create {folder}: {exc.strerror or exc}") from exc

    def _reserve_indexed_ids(self, store: Store) -> None:
        """Ids a saved FAISS index holds are never handed out again (it may name rows deleted since)."""
        try:
            from .index.vectors import IndexMeta

            meta = IndexMeta.from_json((self.folder / SIDECAR_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError, TypeError):
            return
        if meta.max_id > store.id_high_water():
            store.reserve_ids_through(meta.max_id)

    def refresh(self) -> bool:
        """Follow a rebuild that switched generations since this collection was opened: True when it did
        (the store is reopened on next use)."""
        if self._pinned:
            return False
        current = data_folder(self.root)
        if current == self.folder:
            return False
        self.close()
        self.folder = current
        return True

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
        """Held by an indexing run: a second run on the same collection is refused instead of interleaving.
        Taking it also removes what a killed rebuild left behind."""
        self._make_folder(self.root)
        lock_path = self.root / LOCK_FILE
        try:
            handle = open(lock_path, "a+")
        except OSError as exc:  # a read-only folder or file system, another user's collection
            raise CollectionError(f"cannot write to collection {self.name!r}: {lock_path}: {exc.strerror or exc}",
                                  "Indexing and importing write beside the database: make the collection's folder "
                                  "writable (or point CLIPSEARCH_HOME / --index-dir at a writable folder).") from exc
        try:
            try:
                import fcntl

                for attempt in range(LOCK_ATTEMPTS):  # `being_indexed` probes hold a shared lock for microseconds
                    try:
                        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if attempt == LOCK_ATTEMPTS - 1:
                            raise
                        time.sleep(0.01)
            except ImportError:  # not POSIX: no cross-process lock
                pass
            except BlockingIOError as exc:
                raise CollectionError(f"collection {self.name!r} is being indexed by another process",
                                      "Wait for it to finish (or stop it) and run again.") from exc
            self.remove_stale_generations()
            if self._create:
                try:
                    self.store  # a new collection exists (still without a model) while a run holds its lock
                except UnreadableStoreError:
                    pass  # index --rebuild --model gets past it (a new generation); any other use raises it again
            yield
        finally:
            handle.close()

    def prune_thumbnails(self) -> int:
        """Delete cached thumbnails (`thumbnails/ID-HASH16-PX.jpg`, web/images.py) of images that are gone or whose
        content changed; returns how many. Only names of that form are looked at."""
        folder = self.folder / "thumbnails"
        if not folder.is_dir():
            return 0
        current = {f"{image_id}-{digest}" for image_id, digest in
                   self.store.conn.execute("SELECT id, substr(content_hash, 1, 16) FROM images")}
        removed = 0
        with os.scandir(folder) as entries:
            for entry in entries:
                match = _THUMBNAIL_RE.match(entry.name)
                if match and match.group(1) not in current:
                    try:
                        os.unlink(entry.path)
                        removed += 1
                    except OSError:
                        pass
        return removed

    def being_indexed(self) -> bool:
        """True while another process holds `writer_lock` (an indexing run is writing): a behind index is then
        work in progress, not an interrupted run. Never creates or takes the lock."""
        try:
            import fcntl

            with open(self.root / LOCK_FILE, "rb") as handle:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    return True
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
        except (ImportError, OSError):
            pass
        return False

    def discard_if_unbound(self, even_if_bound: bool = False) -> bool:
        """Delete this collection's database if no model was ever bound and it holds nothing (a first run that
        failed before indexing anything); with `even_if_bound`, also when a model is bound (a caller that made the
        collection itself, as a first import refused after binding). Call only while holding `writer_lock`. True
        when it was deleted."""
        try:
            if (self._pinned or not self.exists or (self.model is not None and not even_if_bound) or self.store.count()
                    or self.folder != self.root):
                return False
        except CollectionError:  # an unreadable database is not known to be empty: left as it is
            return False
        self.close()
        _remove_data(self.root)
        return True

    # -- generations (atomic --rebuild) ------------------------------------------------------------
    def remove_stale_generations(self) -> list[Path]:
        """Delete generation folders that CURRENT does not name (a killed rebuild's, or the one a finished
        rebuild replaced), and the pre-rebuild data in the collection folder once CURRENT exists. Call only
        while holding `writer_lock`. Returns what was removed."""
        if self._pinned or not self.root.is_dir():
            return []
        current = data_folder(self.root)
        removed: list[Path] = []
        for child in self.root.iterdir():
            if _GENERATION_RE.match(child.name) and child != current and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
        if current != self.root:
            removed.extend(_remove_data(self.root))
        meta = _read_meta(current)
        removed.extend(remove_index_leftovers(current, keep=meta.layout.lists_file if meta else ""))
        return removed

    def start_rebuild(self, info: BundleInfo) -> "Collection":
        """A new, empty generation bound to `info`, beside the data in use (which keeps serving searches);
        index into it, then `finish_rebuild` switches to it. Call only while holding `writer_lock`."""
        # Numbers only grow (counting a killed rebuild's folder too), so no folder name is ever used twice.
        numbers = [int(m.group(1)) for m in (_GENERATION_RE.match(c.name) for c in self.root.iterdir()) if m]
        self.remove_stale_generations()
        folder = self.root / f"{GENERATION_PREFIX}{max(numbers, default=0) + 1}"
        self._make_folder(folder)
        staged = Collection(self.root, self.name, create=True, data=folder)
        staged.bind_model(info)
        if self.exists:
            # Ids continue above every id the old generation handed out: a searcher still holding the old
            # index can never be shown a new image for an old vector.
            try:
                high = self.store.id_high_water()
            except UnreadableStoreError:
                high = 0  # nobody can search that database either; the index file's ids still count below
            try:
                from .index.vectors import IndexMeta

                high = max(high, IndexMeta.from_json((self.folder / SIDECAR_FILE).read_text(encoding="utf-8")).max_id)
            except (OSError, ValueError, KeyError, TypeError):
                pass
            staged.store.reserve_ids_through(high)
        return staged

    def finish_rebuild(self, staged: "Collection") -> None:
        """Switch to `staged` (from `start_rebuild`) atomically, then delete the data it replaces."""
        if not staged._pinned or staged.root != self.root:
            raise ValueError("finish_rebuild needs the collection start_rebuild returned")
        staged.close()  # checkpoints the new database
        fsync_dir(staged.folder)
        pointer = self.root / POINTER_FILE
        tmp = self.root / f".{POINTER_FILE}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(staged.folder.name + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, pointer)  # the switch: readers see the old or the new generation, never a mix
        fsync_dir(self.root)
        self.close()
        self.folder = staged.folder
        self._create = False
        self.remove_stale_generations()

    # -- model ------------------------------------------------------------------------------------
    @property
    def model(self) -> CollectionModel | None:
        if not self.exists:
            return None
        store = self.store
        model_id = store.get_meta("model_id")
        if not model_id:
            return None
        return CollectionModel(model_id=model_id, name=store.get_meta("model_name", "") or "",
                               bundle_path=store.get_meta("model_path", "") or "",
                               embed_dim=int(store.get_meta("embed_dim", "0") or 0))

    def bind_model(self, info: BundleInfo, rebuild: bool = False) -> None:
        """Record the model the vectors come from (creating a new collection on disk); another model is
        refused. `rebuild=True` forgets every row in place first — only for a caller that has the collection
        to itself (a benchmark filling it, say): `clipsearch index --rebuild` builds a new generation instead
        (`start_rebuild`), so searchers never see a half-empty collection."""
        if rebuild and self.exists:
            self.store.clear()
        current = self.model
        if current is not None and current.model_id != info.model_id and not rebuild:
            raise CollectionError(
                f"collection {self.name!r} was built with model {current.model_id}, not {info.model_id}; "
                "vectors of two models cannot be mixed",
                f"Use --model {current.shown_spec}, or another --collection; `clipsearch index PATH --rebuild --model "
                "MODEL` re-embeds a collection's images with another model.")
        self.store.set_meta({"model_id": info.model_id, "model_name": info.name, "model_path": str(info.path),
                             "embed_dim": str(info.embed_dim),
                             "created_at": self.store.get_meta("created_at") or _now()})

    @property
    def index_memory_budget(self) -> int | None:
        """The memory budget of the vector index in bytes (`index --max-index-memory`), None: the default."""
        if not self.exists:
            return None
        value = self.store.get_meta("index_max_memory")
        return int(value) if value and value.isdigit() else None

    def set_index_memory_budget(self, budget: int | None) -> None:
        """Remember the budget the index policy plans with (None: back to the default fraction of RAM)."""
        self.store.set_meta({"index_max_memory": str(int(budget)) if budget else ""})

    def require_model(self) -> CollectionModel:
        model = self.model
        if model is None:
            raise CollectionError(f"collection {self.name!r} is empty (no model recorded yet)",
                                  "Index some photos first: clipsearch index PATH")
        return model

    # -- ITM image tokens -------------------------------------------------------------------------
    @property
    def tokens_setting(self) -> str | None:
        """"on" / "off" as the last indexing run decided, None when no run ever did (older collections)."""
        if not self.exists:
            return None
        value = self.store.get_meta("tokens")
        return value if value in ("on", "off") else None

    @property
    def token_codec(self) -> TokenCodec | None:
        """How this collection's stored tokens are encoded (recorded when it started storing them)."""
        if not self.exists:
            return None
        store = self.store
        try:
            return TokenCodec.from_meta(store.get_meta("tokens_storage"), store.get_meta("tokens_shape"))
        except CollectionError:
            return None

    def choose_tokens(self, model, requested: bool | None,
                      max_default_bytes: int = DEFAULT_MAX_TOKEN_BYTES) -> TokenChoice:
        """Whether a run with `model` stores image tokens: `requested` (--tokens/--no-tokens) when given, else
        what the collection remembers, else on for a model with an ITM head whose tokens take at most
        `max_default_bytes` per image. CollectionError for --tokens with a model without an ITM head."""
        codec = model_token_codec(model)
        if requested is False:
            return TokenChoice(None, "--no-tokens", explicit=True)
        if codec is None:
            if requested:
                raise CollectionError(f"model {model.info.name} has no ITM head, so it has no image tokens to store",
                                      "Leave out --tokens, or index with a model that can re-rank (e.g. an "
                                      "`clipsearch models export-blip` bundle).")
            return TokenChoice(None, "the model has no ITM head")
        source = token_source(model)
        if requested:
            return TokenChoice(codec, "--tokens", explicit=True, source=source)
        remembered = self.tokens_setting
        if remembered == "on":
            return TokenChoice(codec, "stored since an earlier run", source=source)
        if remembered == "off":
            return TokenChoice(None, "turned off by an earlier run (--tokens turns them on)")
        if codec.bytes_per_image <= max_default_bytes:
            return TokenChoice(codec, f"the ITM head's tokens take {format_bytes(codec.bytes_per_image)}/image",
                               source=source)
        return TokenChoice(None, f"the ITM head's tokens would take {format_bytes(codec.bytes_per_image)}/image "
                                 f"(more than {format_bytes(max_default_bytes)}): store them with --tokens")

    def apply_tokens(self, choice: TokenChoice) -> None:
        """Record a run's choice; turning tokens off drops the stored ones (the choice is remembered only when
        it was explicit or the collection stores tokens, so a big head's default stays a default)."""
        store = self.store
        if choice.codec is not None:
            recorded = self.token_codec
            made_by = store.get_meta("tokens_source")
            if store.has_any_tokens() and ((recorded is not None and recorded != choice.codec)
                                           or (choice.source is not None and made_by != choice.source)):
                store.delete_all_tokens()  # another layout, or another head made them: compute them again
            store.set_meta({"tokens": "on", **choice.codec.to_meta(),
                            **({"tokens_source": choice.source} if choice.source else {})})
        elif choice.explicit:
            store.delete_all_tokens()
            store.set_meta({"tokens": "off"})

    def _token_file_fresh(self) -> bool:
        try:
            current = TokenFile(self.folder / TOKENS_FILE)
        except CollectionError:
            return False
        model = self.model
        fresh = (current.tokens_gen == self.store.tokens_generation and model is not None
                 and current.header.model_id == model.model_id and current.codec == self.token_codec)
        current.close()
        return fresh

    def update_tokens(self) -> bool:
        """Bring tokens.bin in line with the tokens SQLite holds (removed when there are none); True when it
        was written. Rows whose blob does not fit the collection's codec are left out (`check` reports them)."""
        store, path = self.store, self.folder / TOKENS_FILE
        codec = self.token_codec
        if codec is None or not store.has_any_tokens():
            if path.exists():
                path.unlink()
            return False
        if self._token_file_fresh():
            return False
        model = self.require_model()
        size = codec.bytes_per_image
        count = int(store.conn.execute("SELECT count(*) FROM image_tokens WHERE length(data) = ?", [size]).fetchone()[0])

        def rows():
            for ids, blobs in store.iter_token_blobs():
                keep = [i for i, blob in enumerate(blobs) if len(blob) == size]
                yield ids[keep], [blobs[i] for i in keep]

        write_token_file(path, codec, count, rows(), store.tokens_generation, model.model_id)
        return True

    def load_tokens(self) -> TokenFile | None:
        """The memory-mapped token file, or None when there is none (or it cannot be read)."""
        try:
            return TokenFile(self.folder / TOKENS_FILE)
        except CollectionError:
            return None

    # -- vectors ----------------------------------------------------------------------------------
    def vectors_fresh(self) -> bool:
        """True when the saved FAISS index reflects the current store generation."""
        sidecar = self.folder / SIDECAR_FILE
        if not sidecar.is_file():
            return False
        try:
            from .index.vectors import IndexMeta

            meta = IndexMeta.from_json(sidecar.read_text(encoding="utf-8"))
        except (ValueError, KeyError, TypeError):
            return False
        model = self.model
        index_file = self.folder / INDEX_FILE
        intact = index_file.is_file() and (not meta.file_bytes or index_file.stat().st_size == meta.file_bytes)
        return (intact and meta.generation == self.store.generation and model is not None
                and meta.model_id == model.model_id)

    def build_vectors(self, ivf_threshold: int = DEFAULT_IVF_THRESHOLD, workdir: Path | None = None,
                      drift: str | None = None) -> VectorIndex:
        """Build the FAISS index from the store's vectors, as `policy.plan_index` says for the collection's size and
        memory budget (reusing a trained IVF-PQ quantizer until the collection outgrows it, or the vectors added to
        it are unlike those it was trained on). `workdir`: where an IVF-PQ index's files are written (the writer
        passes the collection folder; readers the temp dir). `drift`: that judgement when the caller made it
        already (`_added_drift`; None: judged here)."""
        model = self.require_model()
        store, dim = self.store, model.embed_dim
        with store.snapshot():  # an indexing run may commit meanwhile: count, generation and rows of one moment
            count = store.count_embeddings()
            previous = _read_meta(self.folder)
            trained = VectorIndex.load_trained(self.folder) if previous and previous.trained_on else None
            reason = ""
            if previous and previous.trained_on and outgrown(count, previous.trained_on):
                reason = (f"retrained: {count:,} vectors, {count / previous.trained_on:.1f}x the "
                          f"{previous.trained_on:,} it was trained at")
            elif previous and trained is not None and self._plans_ivfpq(count, dim, ivf_threshold):
                reason = self._drift_reason(previous, trained) if drift is None else drift
                if reason:
                    trained = None  # retrained on a sample of every vector, the added ones included
            index = VectorIndex.build(store.iter_vectors(dim), count=count, dim=dim, model_id=model.model_id,
                                      generation=store.generation, ivf_threshold=ivf_threshold, trained=trained,
                                      trained_on=previous.trained_on if previous else 0,
                                      sample=lambda n: self.sample_vectors(n), budget_bytes=self.index_memory_budget,
                                      workdir=workdir, train_reason=reason, parallel=self.parallel_adds)
        if previous and not index.meta.trained_at and index.meta.trained_on == previous.trained_on:
            index.meta = replace(index.meta, trained_at=previous.trained_at, train_reason=previous.train_reason,
                                 trained_max_id=previous.trained_max_id, drift_limit=previous.drift_limit)
        return index

    def _plans_ivfpq(self, count: int, dim: int, ivf_threshold: int) -> bool:
        from .index.vectors import IndexLayout

        return IndexLayout.for_size(count, dim, ivf_threshold, budget_bytes=self.index_memory_budget).kind == "ivfpq"

    def _drift_reason(self, meta, trained) -> str:
        """Why the trained quantizer must be retrained for the vectors added since it was trained (ids above
        `meta.trained_max_id`, else above `meta.max_id`), or "" (index.vectors.quantizer_drift)."""
        from .index.vectors import DRIFT_SAMPLE, DRIFT_SHARE, quantizer_drift

        if not meta.drift_limit:  # an index saved before the limit was measured: not judged
            return ""
        boundary = meta.trained_max_id or meta.max_id
        added = self.sample_vectors(DRIFT_SAMPLE, min_id=boundary + 1)
        share = quantizer_drift(trained, meta.drift_limit, added)
        if share is None or share <= DRIFT_SHARE:
            return ""
        return (f"retrained: {share:.0%} of the vectors added since training lie farther from every centroid than "
                f"99% of those it was calibrated on")

    def sample_vectors(self, n: int, seed: int = 0, min_id: int | None = None, max_id: int | None = None) -> np.ndarray:
        """n stored vectors at random (with ids in min_id..max_id when given), read straight from SQLite by id (never
        all of them): ids are drawn between the smallest and the largest and kept when they have a vector, a few
        rounds, then from the id list."""
        store, dim = self.store, self.require_model().embed_dim
        bounds = " WHERE id BETWEEN ? AND ?"
        span = [min_id if min_id is not None else -(2**63), max_id if max_id is not None else 2**63 - 1]
        low, high, total = store.db.execute("SELECT coalesce(min(id), 0), coalesce(max(id), 0), count(*) FROM "
                                            "embeddings" + bounds, span).fetchone()
        n = min(n, total)
        rng = np.random.default_rng(seed)
        picked: set[int] = set()
        for _ in range(8):
            if len(picked) >= n:
                break
            candidates = np.unique(rng.integers(low, high + 1, size=2 * (n - len(picked)) + 16)).tolist()
            found = [int(r[0]) for r in store._select_by_ids("SELECT id FROM embeddings", candidates)]
            picked.update(found[: n - len(picked)] if len(found) > n - len(picked) else found)
        if len(picked) < n:  # sparse ids: draw from the list of ids (8 bytes per vector)
            ids = store.embedding_ids()
            ids = ids[(ids >= low) & (ids <= high)]
            rest = np.setdiff1d(ids, np.fromiter(picked, dtype=np.int64, count=len(picked)))
            picked.update(rng.choice(rest, size=n - len(picked), replace=False).tolist())
        chosen = sorted(picked)[:n]
        vectors = np.zeros((len(chosen), dim), dtype=np.float32)
        row = {image_id: i for i, image_id in enumerate(chosen)}
        for image_id, blob in store._select_by_ids("SELECT id, vector FROM embeddings", chosen):
            vectors[row[int(image_id)]] = np.frombuffer(blob, dtype=np.float32, count=dim)
        return vectors

    def save_vectors(self, index: VectorIndex) -> None:
        index.save(self.folder)

    def sync_vectors(self, ivf_threshold: int = DEFAULT_IVF_THRESHOLD) -> VectorIndex | None:
        """Bring the saved FAISS index up to date with the store; returns it when it changed."""
        return self.update_vectors(ivf_threshold).index

    def update_vectors(self, ivf_threshold: int = DEFAULT_IVF_THRESHOLD) -> "VectorSync":
        """Bring the saved index up to date: nothing when fresh; appending when the store only gained rows
        since it was saved (and the layout still fits); a full rebuild from SQLite otherwise."""
        replan = self._budget_replans(ivf_threshold)
        if self.vectors_fresh() and not replan:
            self.update_tokens()
            return VectorSync(None, "none")
        drift = "" if replan else self._added_drift(ivf_threshold)  # a new layout is trained anew whatever was added
        appended = None if replan or drift else self._append_new_vectors(ivf_threshold)
        if appended is not None:
            self.save_vectors(appended)
            self.update_tokens()
            return VectorSync(appended, "append")
        index = self.build_vectors(ivf_threshold, workdir=self.folder, drift=drift)
        self.save_vectors(index)
        self.update_tokens()
        return VectorSync(index, "rebuild")

    def _added_drift(self, ivf_threshold: int) -> str | None:
        """Whether the vectors added to the saved IVF-PQ index since its quantizer was trained are unlike the ones it
        knows (`_drift_reason`: the retrain reason, or ""), judged once for the append and the rebuild that may
        follow; None when there is nothing to judge (no IVF-PQ index, too few added, or a retrain for its growth)."""
        from .index.vectors import DRIFT_MIN_NEW

        meta = _read_meta(self.folder)
        store = self.store
        if meta is None or meta.layout.kind != "ivfpq" or outgrown(store.count_embeddings(), meta.trained_on):
            return None
        if store.count_embeddings_above(meta.trained_max_id or meta.max_id) < DRIFT_MIN_NEW:
            return None
        trained = VectorIndex.load_trained(self.folder)
        if trained is None:  # nothing to append with: the rebuild trains a quantizer
            return "no trained quantizer was saved"
        return self._drift_reason(meta, trained)

    def _budget_replans(self, ivf_threshold: int) -> bool:
        """True when `--max-index-memory` was set to another budget than the saved IVF-PQ index was planned with,
        and the policy plans another index for it (codes, OPQ, lists on disk): it was remembered but not applied
        until something else made the index rebuild."""
        from .index.vectors import IndexLayout

        budget = self.index_memory_budget
        meta = _read_meta(self.folder)
        if budget is None or meta is None or meta.layout.kind != "ivfpq" or budget == meta.layout.budget_bytes:
            return False
        planned = IndexLayout.for_size(meta.count, meta.dim, ivf_threshold, budget_bytes=budget)
        return planned.factory != meta.layout.factory or planned.on_disk != meta.layout.on_disk

    def _append_new_vectors(self, ivf_threshold: int) -> VectorIndex | None:
        from .index.vectors import IndexLayout, IndexMeta

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
        if meta.layout.kind == "ivfpq" and (meta.layout.on_disk or outgrown(count, meta.trained_on)):
            return None  # grown too much for the trained quantizer (retrain), or on-disk lists (merged anew)
        if store.vectors_unchanged_since(meta.generation, meta.max_id) != (meta.count, meta.count):
            return None  # something the index holds was deleted or re-embedded
        index_file = self.folder / INDEX_FILE
        if not index_file.is_file() or (meta.file_bytes and index_file.stat().st_size != meta.file_bytes):
            return None
        try:
            index = VectorIndex.load(self.folder)
        except CollectionError:
            return None
        index.append(store.iter_vectors(meta.dim, min_id=meta.max_id + 1), generation=store.generation,
                     workdir=self.folder)
        if index.count != count:
            return None
        if meta.layout.kind == "flat":  # its memory and its reason state the count: say the new one
            index.meta = replace(index.meta, layout=IndexLayout.for_size(
                count, meta.dim, ivf_threshold, budget_bytes=meta.layout.budget_bytes or None))
        else:  # the added codes and ids are resident too (`stats` showed the size it was built at)
            from .index.policy import list_bytes

            layout = index.meta.layout
            grown = list_bytes(count - meta.count, layout.code_bytes)
            index.meta = replace(index.meta, layout=replace(layout, resident_bytes=int(layout.resident_bytes + grown)))
        return index

    def load_vectors(self, mmap: bool = False, ivf_threshold: int = DEFAULT_IVF_THRESHOLD) -> VectorIndex:
        """The saved index when fresh. When SQLite is ahead of it (an indexing run in progress, or a killed
        one): an exact in-memory rebuild if the collection is small enough for the exact layout, else the
        saved index as it is (hits on rows that are gone are dropped by the searcher) if it is usable."""
        if self.vectors_fresh():
            return VectorIndex.load(self.folder, mmap=mmap)
        model = self.require_model()
        count = self.store.count_embeddings()
        if count >= ivf_threshold:
            try:
                saved = VectorIndex.load(self.folder, mmap=mmap)
            except CollectionError:
                saved = None
            if saved is not None and saved.meta.model_id == model.model_id and saved.meta.dim == model.embed_dim:
                return saved
            if count * model.embed_dim * 4 <= min(READER_EXACT_MAX_BYTES, self.index_memory_budget or 1 << 62):
                # No usable saved index (a run killed while it built one): exact search over SQLite's vectors, not an
                # IVF-PQ trained and tuned anew by every search (7 s each at 60k; the next run saves one).
                return self.build_vectors(ivf_threshold=count + 1)
        return self.build_vectors(ivf_threshold)

    # -- inspection -------------------------------------------------------------------------------
    def check(self, sample_size: int = 32) -> CheckReport:
        """Verify that SQLite and FAISS agree: counts, ids, model, generation, every stored vector's size, and a
        sample of vectors. A damaged database is a problem reported, not an exception."""
        try:
            return self._check(sample_size)
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise
            return CheckReport(self.name, 0, None, [f"SQLite database is damaged ({exc}): index it again into a new "
                                                    "database with: clipsearch index PATH --rebuild --model MODEL"])

    def _check(self, sample_size: int) -> CheckReport:
        problems: list[str] = []
        store = self.store
        integrity = "; ".join(row[0] for row in store.conn.execute("PRAGMA quick_check(5)"))
        if integrity != "ok":
            return CheckReport(self.name, 0, None, [
                f"SQLite integrity check failed: {integrity[:300]}; index it again into a new database with: "
                "clipsearch index PATH --rebuild --model MODEL"])
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
            else:
                problems.append(f"collection {self.name!r} has no model recorded: nothing was ever indexed into it "
                                f"(index photos with: clipsearch index PATH --collection {self.name})")
            return CheckReport(self.name, images, None, problems)
        wrong_model = store.db.execute("SELECT count(*) FROM images WHERE model_id != ?", [model.model_id]).fetchone()[0]
        if wrong_model:
            problems.append(f"{wrong_model} images were embedded with another model than {model.model_id}")
        malformed, examples = store.malformed_vectors(model.embed_dim)
        if malformed:
            problems.append(f"{malformed} stored vectors are not {model.embed_dim} float32 values (ids "
                            f"{', '.join(map(str, examples))}{' …' if malformed > len(examples) else ''}); index it "
                            "again into a new database with: clipsearch index PATH --rebuild")
        problems.extend(self._check_tokens(model, row_ids, sample_size))
        try:
            index = VectorIndex.load(self.folder)
        except CollectionError as exc:
            problems.append(exc.message)
            return CheckReport(self.name, images, None, problems)
        meta = index.meta
        actual_bytes = (self.folder / INDEX_FILE).stat().st_size
        if meta.file_bytes and actual_bytes != meta.file_bytes:
            problems.append(f"{INDEX_FILE} has {actual_bytes} bytes, {meta.file_bytes} were written")
        elif meta.file_crc32 is not None and file_crc32(self.folder / INDEX_FILE) != meta.file_crc32:
            problems.append(f"{INDEX_FILE} is damaged (its checksum differs from the one written with it): delete it "
                            f"and {SIDECAR_FILE} from {self.folder} and run `clipsearch index` again (the index is "
                            "rebuilt from SQLite's vectors; nothing is embedded again)")
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
                            + ("(an indexing run is writing to it now: check again when it has finished)"
                               if self.being_indexed() else
                               "(an interrupted run?); run `clipsearch index` again to complete it"))
        if not problems and images and meta.layout.kind == "flat":
            problems.extend(self._check_vector_sample(index, model.embed_dim, sample_size))
        return CheckReport(self.name, images, index.count, problems)

    def _check_tokens(self, model: CollectionModel, row_ids: np.ndarray, sample_size: int) -> list[str]:
        """Token rows against images (every image of a token-storing collection has one, no orphans), blob
        sizes and values, and tokens.bin against SQLite (same ids, same bytes for a sample)."""
        store = self.store
        stored = store.count_tokens()
        setting, codec = self.tokens_setting, self.token_codec
        if not stored and setting != "on":
            if (self.folder / TOKENS_FILE).exists():
                return [f"{TOKENS_FILE} exists but SQLite holds no image tokens"]
            return []
        if codec is None:
            return [f"SQLite holds {stored} image token rows but the collection records no token layout"]
        problems: list[str] = []
        token_ids = store.token_ids()
        orphans = np.setdiff1d(token_ids, row_ids)
        if len(orphans):
            problems.append(f"{len(orphans)} image token rows without an image (e.g. {orphans[:5].tolist()})")
        if setting == "on":
            missing = np.setdiff1d(row_ids, token_ids)
            if len(missing):
                # Rows imported without a file here (URLs, another machine's paths) cannot get tokens, and imported
                # rows get theirs when their folder is indexed: re-ranking leaves them unscored, as documented; only
                # files an indexing run embedded are a problem.
                from ..paths import is_url_path
                from .database import IMPORTED_HASH_PREFIX

                records = store.get_many(missing.tolist())
                readable = [i for i in missing.tolist()
                            if i in records and not is_url_path(records[i].path) and os.path.isfile(records[i].path)
                            and not records[i].content_hash.startswith(IMPORTED_HASH_PREFIX)]
                if readable:
                    problems.append(f"{len(readable)} of {len(row_ids)} images have no stored image tokens "
                                    f"(e.g. {readable[:5]}); run `clipsearch index` on the collection's "
                                    "folders again to compute them")
        wrong = {size: n for size, n in store.token_blob_sizes().items() if size != codec.bytes_per_image}
        bad_ids: set[int] = set()
        if wrong:
            bad_ids = {int(r[0]) for r in store.conn.execute(
                "SELECT id FROM image_tokens WHERE length(data) IS NOT ?", [codec.bytes_per_image])}
            problems.append(f"{sum(wrong.values())} image token rows have the wrong size (e.g. ids "
                            f"{sorted(bad_ids)[:5]}: {', '.join(f'{s} bytes' for s in sorted(wrong))}; "
                            f"{codec.describe()} takes {codec.bytes_per_image})")
        invalid = [int(i) for ids, blobs in store.iter_token_blobs() for i, blob in zip(ids.tolist(), blobs)
                   if len(blob) == codec.bytes_per_image and not codec.valid(blob)]
        if invalid:
            problems.append(f"{len(invalid)} image token rows hold non-finite or negative scales (e.g. ids {invalid[:5]})")
            bad_ids.update(invalid)
        path = self.folder / TOKENS_FILE
        if not stored:
            if path.exists():
                problems.append(f"{TOKENS_FILE} exists but SQLite holds no image tokens")
            return problems
        try:
            mapped = TokenFile(path)
        except CollectionError as exc:
            problems.append(exc.message if path.exists() else
                            f"{TOKENS_FILE} is missing (SQLite holds {stored} image token rows); run "
                            "`clipsearch index` again to write it")
            return problems
        try:
            if mapped.codec != codec or mapped.header.model_id != model.model_id:
                problems.append(f"{TOKENS_FILE} holds {mapped.codec.describe()} of model {mapped.header.model_id}, "
                                f"the collection {codec.describe()} of {model.model_id}")
                return problems
            if mapped.tokens_gen != store.tokens_generation:
                problems.append(f"{TOKENS_FILE} reflects tokens generation {mapped.tokens_gen}, SQLite is at "
                                f"{store.tokens_generation} (an interrupted run?); run `clipsearch index` again")
                return problems
            expected = np.setdiff1d(token_ids, np.asarray(sorted(bad_ids), dtype=np.int64))
            if not np.array_equal(np.asarray(mapped.ids), expected):
                only_file = np.setdiff1d(mapped.ids, expected)
                only_sql = np.setdiff1d(expected, mapped.ids)
                problems.append(f"{TOKENS_FILE} ids differ from SQLite's: {len(only_file)} only in the file, "
                                f"{len(only_sql)} only in SQLite")
                return problems
            if len(expected):
                pick = expected[np.random.default_rng(0).choice(len(expected), size=min(sample_size, len(expected)),
                                                                replace=False)]
                blobs = store.token_blobs(pick.tolist())
                rows = mapped.rows(pick.tolist())
                differ = [i for i in pick.tolist() if mapped.blob(rows[i]) != blobs.get(i)]
                if differ:
                    problems.append(f"{TOKENS_FILE} tokens of ids {differ[:5]} differ from the ones in SQLite")
        finally:
            mapped.close()
        return problems

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
        try:
            return self._stats()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                raise
            raise UnreadableStoreError(f"{self.folder / STORE_FILE}: the database is damaged ({exc})",
                                       "Check it with `clipsearch check`; index it again into a new database with: "
                                       "clipsearch index PATH --rebuild --model MODEL") from exc

    def _stats(self) -> CollectionStats:
        store = self.store
        meta = None
        try:
            from .index.vectors import IndexMeta

            if (self.folder / INDEX_FILE).is_file():  # a sidecar without its index describes nothing there
                meta = IndexMeta.from_json((self.folder / SIDECAR_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError, TypeError):
            pass
        skipped = int(store.db.execute("SELECT count(*) FROM skipped").fetchone()[0])
        size = sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())
        codec = self.token_codec
        return CollectionStats(name=self.name, folder=str(self.root), images=store.count(), skipped=skipped,
                               model=self.model, index_kind=meta.layout.kind if meta else None,
                               index_count=meta.count if meta else None, index_fresh=self.vectors_fresh(),
                               bytes_on_disk=size, tokens=self.tokens_setting,
                               token_storage=codec.storage if codec else None,
                               token_shape=tuple(codec.shape) if codec else None, tokens_stored=store.count_tokens(),
                               token_bytes_per_image=codec.bytes_per_image if codec else None,
                               **_index_stats(meta))


# A reader with no usable saved index searches exactly up to this many bytes of vectors (about 500k of 512 floats),
# and within the collection's --max-index-memory when one is set.
READER_EXACT_MAX_BYTES = 1 << 30


def _read_meta(folder: Path):
    """The saved index's sidecar, None when missing or unreadable."""
    from .index.vectors import IndexMeta

    try:
        return IndexMeta.from_json((Path(folder) / SIDECAR_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _index_stats(meta) -> dict:
    if meta is None:
        return {}
    layout = meta.layout
    ivf = layout.kind == "ivfpq"
    return dict(index_factory=layout.factory, index_nprobe=layout.nprobe if ivf else None,
                index_nlist=layout.nlist if ivf else None, index_refine_factor=layout.refine_factor if ivf else None,
                index_recall=layout.tuned_recall if ivf and layout.target_recall else None,
                index_target_recall=layout.target_recall if ivf and layout.target_recall else None,
                index_on_disk=layout.on_disk, index_budget_bytes=layout.budget_bytes or None,
                index_resident_bytes=layout.resident_bytes or None, index_trained_on=meta.trained_on or None,
                index_trained_at=meta.trained_at or None, index_train_reason=meta.train_reason or None,
                index_reasons=tuple(layout.reasons))


def _remove_data(folder: Path) -> list[Path]:
    removed = remove_index_leftovers(folder)
    for name in _DATA_FILES:
        target = folder / name
        if target.is_file():
            target.unlink(missing_ok=True)
            removed.append(target)
    for name in _DATA_DIRS:
        target = folder / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            removed.append(target)
    return removed


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
