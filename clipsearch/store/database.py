"""Image metadata and the authoritative copy of each vector, in SQLite through sqlite-utils (WAL).

Tables::

    images     id (= FAISS id), path, size, mtime_ns, content_hash, width, height, taken_at,
               indexed_at, model_id, run_id (the last indexing run that saw the file: mark-and-sweep)
    embeddings id -> float32 vector bytes (the FAISS index is rebuilt from these, so a killed run
               never leaves vectors that SQLite does not know about)
    image_tokens id -> the image's ITM tokens (clipsearch.store.tokens: int8 + per-token scales, or fp16),
               for collections whose model has an ITM head and that store them; written in the same
               transaction as the vector, deleted with the image
    skipped    path, size, mtime_ns, reason (bad files: not decoded again until they change)
    meta       key -> value (model, generation, run counter, tokens setting and tokens generation)

Every write that changes what a search can return bumps `generation`; the FAISS file records the
generation it was built from, which is how a stale index is recognised. Every write of image tokens bumps
`tokens_gen` (a token row records the value it was written at), which the memory-mapped token file records
the same way.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence
from urllib.parse import quote

import numpy as np

from ..errors import CollectionError, UnreadableStoreError
from ..text import is_utf8

_DEFERRED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class signals_deferred:
    """Hold Ctrl-C, SIGTERM and SIGHUP back while a write transaction runs: their Python handlers (the ones that
    unwind a run, e.g. KeyboardInterrupt) are called right after it instead of in the middle. Without this, an
    interrupt landing between sqlite-utils' `atomic()` starting and the `with` block taking over leaves its
    generator to be finalised after the connection closed, which prints a traceback on the way out.

    Handlers run in the main thread only, so only there is anything swapped; signals whose handler is not a
    Python function (SIG_DFL, SIG_IGN) keep their ordinary effect."""

    def __enter__(self) -> "signals_deferred":
        self.saved: dict[int, object] = {}
        self.pending: int | None = None
        if threading.current_thread() is not threading.main_thread():
            return self
        try:
            for signum in _DEFERRED_SIGNALS:
                handler = signal.getsignal(signum)
                if callable(handler):
                    self.saved[signum] = handler
                    signal.signal(signum, self._hold)
        except BaseException:  # an interrupt arrived while swapping: put every handler back, then unwind
            self._restore()
            raise
        return self

    def _hold(self, signum: int, frame: object) -> None:
        if self.pending is None:
            self.pending = signum

    def _restore(self) -> None:
        for signum, handler in self.saved.items():
            signal.signal(signum, handler)
        self.saved = {}

    def __exit__(self, *exc_info: object) -> None:
        saved = dict(self.saved)
        self._restore()
        if self.pending is not None:
            saved[self.pending](self.pending, None)


@dataclass(frozen=True)
class ImageRecord:
    """One indexed image as stored in the `images` table."""

    id: int
    path: str
    size: int
    mtime_ns: int
    content_hash: str
    width: int | None
    height: int | None
    taken_at: str | None
    indexed_at: str
    model_id: str


@dataclass(frozen=True)
class FileState:
    """What the indexer needs to decide whether a known path changed."""

    id: int
    size: int
    mtime_ns: int
    content_hash: str


@dataclass(frozen=True)
class NewImage:
    """A row to write: metadata plus its vector (`id` set to update an existing row in place)."""

    path: str
    size: int
    mtime_ns: int
    content_hash: str
    width: int | None
    height: int | None
    taken_at: str | None
    vector: np.ndarray
    id: int | None = None
    tokens: bytes | None = None  # the encoded ITM image tokens (None: the image has none; old ones are dropped)


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str


TEXT_CACHE_SIZE = 10_000
# A cache hit refreshes the row's `used_at` (what eviction orders by) at most this often, so a repeated
# query costs no write at all most of the time.
TEXT_CACHE_TOUCH_SECONDS = 600.0
BUSY_TIMEOUT_SECONDS = 30.0
_TABLES = {"images", "embeddings", "skipped", "meta", "text_cache"}

# PRAGMA user_version of the schema this code writes. 0 = a database from before versioning (v1 below).
#   v1  images.id INTEGER PRIMARY KEY: SQLite reuses the largest id after it is deleted
#   v2  images.id AUTOINCREMENT: an id is never handed out twice, so a stale FAISS index can only
#       name rows that are gone, never another image
#   v3  image_tokens table (ITM image tokens per image id; empty until a collection stores them)
SCHEMA_VERSION = 3

_IMAGES_DDL = """CREATE TABLE {name} (
   "id" INTEGER PRIMARY KEY AUTOINCREMENT,
   "path" TEXT NOT NULL,
   "size" INTEGER NOT NULL,
   "mtime_ns" INTEGER NOT NULL,
   "content_hash" TEXT NOT NULL,
   "width" INTEGER,
   "height" INTEGER,
   "taken_at" TEXT,
   "indexed_at" TEXT NOT NULL,
   "model_id" TEXT NOT NULL,
   "run_id" INTEGER
)"""
_IMAGES_INDEXES = ('CREATE UNIQUE INDEX IF NOT EXISTS "idx_images_path" ON "images" ("path")',
                   'CREATE INDEX IF NOT EXISTS "idx_images_content_hash" ON "images" ("content_hash")')
_OTHER_TABLES_DDL = (
    'CREATE TABLE IF NOT EXISTS "embeddings" ("id" INTEGER PRIMARY KEY REFERENCES "images"("id"), "vector" BLOB, '
    '"written_gen" INTEGER)',
    'CREATE TABLE IF NOT EXISTS "skipped" ("path" TEXT PRIMARY KEY, "size" INTEGER, "mtime_ns" INTEGER, '
    '"reason" TEXT, "run_id" INTEGER)',
    'CREATE TABLE IF NOT EXISTS "meta" ("key" TEXT PRIMARY KEY, "value" TEXT)',
    'CREATE TABLE IF NOT EXISTS "text_cache" ("model_id" TEXT, "text" TEXT, "vector" BLOB, "used_at" REAL, '
    'PRIMARY KEY ("model_id", "text"))',
    'CREATE TABLE IF NOT EXISTS "image_tokens" ("id" INTEGER PRIMARY KEY REFERENCES "images"("id"), "data" BLOB, '
    '"written_gen" INTEGER)',
)

_IMAGE_COLUMNS = ("id", "path", "size", "mtime_ns", "content_hash", "width", "height", "taken_at",
                  "indexed_at", "model_id")
_IMAGE_ALL_COLUMNS = (*_IMAGE_COLUMNS, "run_id")


class Store:
    """The SQLite side of a collection. One connection; callers sharing it between threads serialise access.

    `create=False` opens an existing database only (a missing file is an error instead of a new, empty
    database)."""

    def __init__(self, path: Path, create: bool = True, read_only: bool = False) -> None:
        self.path = Path(path)
        self._db = None
        self.migrated_from: int | None = None  # the schema version this open upgraded, if it did
        self.created = False  # this open made the database's tables (a new or emptied database file)
        self.read_only = read_only
        try:
            # check_same_thread=False: a Searcher serves API threads, serialising access with its own lock.
            if create and not read_only:
                self.conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=BUSY_TIMEOUT_SECONDS)
            else:
                mode = "ro" if read_only else "rw"
                uri = "file:" + quote(os.fsencode(self.path.absolute())) + f"?mode={mode}"
                self.conn = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=BUSY_TIMEOUT_SECONDS)
        except sqlite3.OperationalError as exc:
            raise CollectionError(f"{self.path}: cannot open ({exc})") from exc
        if read_only:  # a reader beside a writing connection (WAL): no journal switch, no schema upgrade
            try:
                self._checked_schema_version()
            except BaseException:
                self.conn.close()
                raise
            return
        try:
            self._use_wal()
            self.conn.execute("PRAGMA synchronous=NORMAL")
            version = self._checked_schema_version()
            if version < SCHEMA_VERSION:
                try:
                    self._upgrade_schema()
                except sqlite3.OperationalError as exc:
                    # A read-only older collection can still be searched: its tables read the same way.
                    read_only = "readonly" in str(exc).replace("-", "").replace(" ", "")
                    if not read_only or (version == 0 and not self._has_tables()):
                        raise
            self.conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            if not os.access(self.path.parent, os.W_OK) or not os.access(self.path, os.W_OK):
                # A healthy database on read-only storage: SQLite's WAL needs to write its -shm file beside it.
                raise CollectionError(f"{self.path}: cannot open: its folder or file is read-only ({exc})",
                                      "SQLite needs to write beside the database (WAL mode): make the collection's "
                                      "folder writable, or copy the collection to writable storage.") from exc
            raise UnreadableStoreError(f"{self.path}: not a usable SQLite database ({exc})",
                                       "Index it again into a new database with: clipsearch index PATH --rebuild "
                                       "--model MODEL (or delete the collection's folder)") from exc
        except BaseException:
            self.conn.close()
            raise

    def _use_wal(self) -> None:
        """Switch to WAL once per database. Changing the journal mode needs an exclusive lock, and SQLite may
        answer "database is locked" at once instead of waiting its busy timeout when several processes open a
        new database together: retry until the timeout."""
        deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
        while True:
            try:
                if self.conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    self.conn.execute("PRAGMA journal_mode=wal")
                return
            except sqlite3.OperationalError as exc:
                if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    @property
    def db(self):
        """The sqlite-utils view of the connection, for writes and schema work (imported on first use, so a
        read-only search never pays for importing sqlite-utils)."""
        if self._db is None:
            self._db = _sqlite_utils().Database(self.conn)
        return self._db

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads inside see one state of the database (one read transaction, WAL), whatever other connections
        commit meanwhile: a count and the rows it counts agree. Within a transaction already: that one."""
        if self.conn.in_transaction:
            yield
            return
        self.conn.execute("BEGIN")
        try:
            yield
        finally:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")  # nothing was written: only the snapshot ends

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- schema --------------------------------------------------------------------------------
    def _has_tables(self) -> bool:
        tables = {row[0] for row in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return tables >= _TABLES

    def _checked_schema_version(self) -> int:
        """PRAGMA user_version; a database written by a newer clipsearch is refused."""
        version = int(self.conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise CollectionError(
                f"{self.path}: schema version {version} is newer than this clipsearch understands "
                f"(up to {SCHEMA_VERSION})",
                "Upgrade clipsearch (pip install -U clipsearch), or rebuild the collection with this version: "
                "clipsearch index PATH --rebuild")
        return version

    def _upgrade_schema(self) -> None:
        """Create a new database's tables, or migrate an older schema in place, in one exclusive transaction.
        Safe when several processes open the same database at once: the version is read again under the
        write lock, so only the first one does the work. Ids are kept."""
        self.conn.execute("PRAGMA foreign_keys=OFF")  # a table rebuild drops the table others refer to
        self.conn.execute("BEGIN IMMEDIATE")  # take the write lock up front (waits for another process)
        try:
            version = self._checked_schema_version()
            if version < SCHEMA_VERSION:
                tables = {row[0] for row in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if "images" not in tables:
                    self.conn.execute(_IMAGES_DDL.format(name='"images"'))
                elif version < 2:
                    self._migrate_v1_to_v2()
                for statement in (*_IMAGES_INDEXES, *_OTHER_TABLES_DDL):
                    self.conn.execute(statement)
                columns = {row[1] for row in self.conn.execute("PRAGMA table_info(embeddings)")}
                if "written_gen" not in columns:  # v1 databases from before the append-only index update
                    self.conn.execute("ALTER TABLE embeddings ADD COLUMN written_gen INTEGER")
                self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                self.migrated_from = version if "images" in tables else None
                self.created = "images" not in tables
        except BaseException:
            self.conn.rollback()
            self.conn.execute("PRAGMA foreign_keys=ON")
            raise
        self.conn.commit()
        self.conn.execute("PRAGMA foreign_keys=ON")

    def _migrate_v1_to_v2(self) -> None:
        """images.id INTEGER PRIMARY KEY -> AUTOINCREMENT (SQLite cannot alter that: copy into a new table),
        the id sequence starting above every id the collection has ever shown."""
        columns = ", ".join(f'"{c}"' for c in _IMAGE_ALL_COLUMNS)
        self.conn.execute(_IMAGES_DDL.format(name='"images_v2"'))
        self.conn.execute(f"INSERT INTO images_v2 ({columns}) SELECT {columns} FROM images")
        self.conn.execute("DROP TABLE images")  # and its indexes; embeddings' reference is re-pointed by name
        self.conn.execute("ALTER TABLE images_v2 RENAME TO images")
        high = self.conn.execute("SELECT max(coalesce((SELECT max(id) FROM images), 0), "
                                 "coalesce((SELECT max(id) FROM embeddings), 0))").fetchone()[0]
        self._set_id_floor(int(high or 0))

    def _set_id_floor(self, highest_used: int) -> None:
        """Make every id handed out from now on larger than `highest_used` (never lowers the sequence)."""
        self.conn.execute("DELETE FROM sqlite_sequence WHERE name = 'images_v2'")
        row = self.conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'images'").fetchone()
        if row is None:
            self.conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('images', ?)", [int(highest_used)])
        elif int(row[0]) < highest_used:
            self.conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'images'", [int(highest_used)])

    def reserve_ids_through(self, highest_used: int) -> None:
        """Never hand out ids up to `highest_used` (e.g. ids an older index or generation has shown)."""
        with self.conn:
            self._set_id_floor(int(highest_used))

    def id_high_water(self) -> int:
        """The largest id ever handed out (deleted rows included)."""
        row = self.conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'images'").fetchone()
        current = int(self.conn.execute("SELECT coalesce(max(id), 0) FROM images").fetchone()[0])
        return max(current, int(row[0]) if row else 0)

    # -- meta ------------------------------------------------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
        return row[0] if row else default

    def set_meta(self, values: dict[str, str]) -> None:
        with signals_deferred(), self.db.atomic():
            self.db["meta"].upsert_all([{"key": k, "value": str(v)} for k, v in values.items()], pk="key")

    def indexed_roots(self) -> dict[str, str]:
        """Every folder (or file) an indexing run was given, as {absolute path: its real path when indexed}.
        Empty for collections indexed before roots were recorded."""
        return self._roots("roots")

    def imported_roots(self) -> dict[str, str]:
        """The topmost folders of the local files import-embeddings brought in, as `indexed_roots` (never walked)."""
        return self._roots("import_roots")

    def _roots(self, key: str) -> dict[str, str]:
        return json.loads(self.get_meta(key, "{}") or "{}")

    def served_roots(self) -> dict[str, str]:
        """The folders whose files the web server may serve: indexed and imported ones."""
        return {**self.imported_roots(), **self.indexed_roots()}

    def record_roots(self, roots: Sequence[str], imported: bool = False) -> None:
        """Remember the roots of a run with the real location each had then (the web server serves files only
        from inside these, so a root later swapped for a symlink elsewhere does not widen what it serves).
        `imported`: folders of imported files, kept apart: `index --rebuild` walks the indexed roots only."""
        key = "import_roots" if imported else "roots"
        known = self._roots(key)
        fresh = {os.path.abspath(root): os.path.realpath(root) for root in roots
                 if os.path.abspath(root) not in known}
        if fresh:
            self.set_meta({key: json.dumps({**known, **fresh}, sort_keys=True)})

    def forget_roots(self, roots: Sequence[str]) -> None:
        """Stop remembering `roots` (folders that are gone, whose images a run removed)."""
        known = self.indexed_roots()
        gone = {os.path.abspath(root) for root in roots}
        kept = {root: real for root, real in known.items() if root not in gone}
        if len(kept) != len(known):
            self.set_meta({"roots": json.dumps(kept, sort_keys=True)})

    def count_imported(self) -> int:
        """How many images still hold the vector import-embeddings gave them (no indexing run embedded their file)."""
        return int(self.conn.execute("SELECT COUNT(*) FROM images WHERE substr(content_hash, 1, ?) = ?",
                                     [len(IMPORTED_HASH_PREFIX), IMPORTED_HASH_PREFIX]).fetchone()[0])

    def count_under(self, root: str) -> int:
        """How many images are stored under `root` (the file itself, or anything inside the folder)."""
        if not is_utf8(root):
            return 0
        where, params = _under(root)
        return int(self.conn.execute(f"SELECT COUNT(*) FROM images WHERE {where}", params).fetchone()[0])

    @property
    def generation(self) -> int:
        return int(self.get_meta("generation", "0") or 0)

    def next_run_id(self) -> int:
        run_id = int(self.get_meta("run", "0") or 0) + 1
        self.set_meta({"run": str(run_id)})
        return run_id

    # -- reads -----------------------------------------------------------------------------------
    def count(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM images").fetchone()[0])

    def vectors_unchanged_since(self, generation: int, max_id: int) -> tuple[int, int]:
        """(vectors with id <= max_id, those of them written at or before `generation`): both equal to the
        size of an index built at `generation` means nothing it holds was deleted or re-embedded since."""
        row = self.conn.execute("SELECT count(*), coalesce(sum(coalesce(written_gen, 0) <= ?), 0) FROM embeddings "
                                "WHERE id <= ?", [int(generation), int(max_id)]).fetchone()
        return int(row[0]), int(row[1])

    def max_embedding_id(self) -> int:
        return int(self.conn.execute("SELECT coalesce(max(id), 0) FROM embeddings").fetchone()[0])

    def count_embeddings(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM embeddings").fetchone()[0])

    def count_embeddings_above(self, image_id: int) -> int:
        """Stored vectors with an id larger than `image_id`."""
        return int(self.conn.execute("SELECT count(*) FROM embeddings WHERE id > ?", [int(image_id)]).fetchone()[0])

    # -- image tokens ------------------------------------------------------------------------------
    @property
    def has_token_table(self) -> bool:
        """False only for an older collection opened read-only (its schema could not be upgraded)."""
        return self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'image_tokens'"
                                 ).fetchone() is not None

    @property
    def tokens_generation(self) -> int:
        return int(self.get_meta("tokens_gen", "0") or 0)

    def count_tokens(self) -> int:
        if not self.has_token_table:
            return 0
        return int(self.conn.execute("SELECT count(*) FROM image_tokens").fetchone()[0])

    def has_any_tokens(self) -> bool:
        return self.has_token_table and self.conn.execute("SELECT 1 FROM image_tokens LIMIT 1").fetchone() is not None

    def token_ids(self) -> np.ndarray:
        if not self.has_token_table:
            return np.zeros(0, dtype=np.int64)
        return np.fromiter((r[0] for r in self.conn.execute("SELECT id FROM image_tokens ORDER BY id")), dtype=np.int64)

    def ids_without_tokens(self, ids: Iterable[int]) -> list[int]:
        """Those of `ids` that have no token row."""
        wanted = [int(i) for i in ids]
        if not self.has_token_table:
            return wanted
        have = {r[0] for r in self._select_by_ids("SELECT id FROM image_tokens", wanted)}
        return [i for i in wanted if i not in have]

    def token_generations(self, ids: Iterable[int]) -> dict[int, int]:
        """id -> tokens generation its row was written at, for those of `ids` that have tokens."""
        if not self.has_token_table:
            return {}
        return {int(i): int(g or 0) for i, g in self._select_by_ids("SELECT id, written_gen FROM image_tokens", ids)}

    def token_blobs(self, ids: Iterable[int]) -> dict[int, bytes]:
        """id -> stored token blob of those of `ids` that have one."""
        if not self.has_token_table:
            return {}
        return {int(i): bytes(b) for i, b in self._select_by_ids("SELECT id, CAST(data AS BLOB) FROM image_tokens", ids)}

    def iter_token_blobs(self, chunk: int = 1024) -> Iterator[tuple[np.ndarray, list[bytes]]]:
        """Yield (ids int64 [n], blobs) over every stored token row, in id order."""
        if not self.has_token_table:
            return
        cursor = self.conn.execute("SELECT id, CAST(data AS BLOB) FROM image_tokens ORDER BY id")
        while True:
            rows = cursor.fetchmany(chunk)
            if not rows:
                return
            yield np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)), [bytes(r[1]) for r in rows]

    def token_blob_sizes(self) -> dict[int, int]:
        """blob size -> how many rows have it."""
        if not self.has_token_table:
            return {}
        return {int(size or 0): int(n) for size, n in self.conn.execute(
            "SELECT length(data), count(*) FROM image_tokens GROUP BY length(data)")}

    def file_states(self) -> dict[str, FileState]:
        """path -> (id, size, mtime_ns, hash) of every indexed file."""
        return {path: FileState(id_, size, mtime, digest) for id_, path, size, mtime, digest in
                self.conn.execute("SELECT id, path, size, mtime_ns, content_hash FROM images")}

    def known_hashes(self) -> dict[str, int]:
        """content hash -> id of a row whose vector can be reused."""
        return {digest: id_ for digest, id_ in self.conn.execute(
            "SELECT content_hash, min(id) FROM images GROUP BY content_hash")}

    def skipped_states(self) -> dict[str, tuple[int, int, str]]:
        return {path: (size, mtime, reason) for path, size, mtime, reason in
                self.conn.execute("SELECT path, size, mtime_ns, reason FROM skipped")}

    def ids(self) -> np.ndarray:
        return np.fromiter((r[0] for r in self.conn.execute("SELECT id FROM images ORDER BY id")), dtype=np.int64)

    def ids_where(self, where: str, params: Sequence = ()) -> np.ndarray:
        """Sorted ids of the images matching an SQL condition over the `images` table (the condition comes from
        code, e.g. `SearchFilter.sql`; values go in `params`)."""
        return np.fromiter((r[0] for r in self.conn.execute(f"SELECT id FROM images WHERE {where} ORDER BY id",
                                                            list(params))), dtype=np.int64)

    def count_where(self, where: str, params: Sequence = ()) -> int:
        return int(self.conn.execute(f"SELECT count(*) FROM images WHERE {where}", list(params)).fetchone()[0])

    def embedding_ids(self) -> np.ndarray:
        return np.fromiter((r[0] for r in self.conn.execute("SELECT id FROM embeddings ORDER BY id")), dtype=np.int64)

    def get(self, image_id: int) -> ImageRecord | None:
        rows = self.get_many([image_id])
        return rows.get(int(image_id))

    def get_many(self, ids: Iterable[int]) -> dict[int, ImageRecord]:
        return {row[0]: ImageRecord(*row)
                for row in self._select_by_ids(f"SELECT {', '.join(_IMAGE_COLUMNS)} FROM images", ids)}

    def _select_by_ids(self, select: str, ids: Iterable[int], chunk: int = 500) -> Iterator[tuple]:
        """Rows of `select` + " WHERE id IN (...)" for `ids`, asked `chunk` ids at a time (SQLite's bound
        parameter limit)."""
        wanted = [int(i) for i in ids if _fits_sqlite(int(i))]  # a larger one names no row (SQLite would raise)
        for start in range(0, len(wanted), chunk):
            part = wanted[start:start + chunk]
            yield from self.conn.execute(f"{select} WHERE id IN ({','.join('?' * len(part))})", part)

    def find_by_path(self, path: str) -> ImageRecord | None:
        row = self.conn.execute(f"SELECT {', '.join(_IMAGE_COLUMNS)} FROM images WHERE path = ?", [path]).fetchone()
        return ImageRecord(*row) if row else None

    def vector(self, image_id: int, dim: int) -> np.ndarray | None:
        if not _fits_sqlite(int(image_id)):
            return None  # no row has that id (SQLite would raise OverflowError on it)
        row = self.conn.execute("SELECT vector FROM embeddings WHERE id = ?", [int(image_id)]).fetchone()
        return _decode_vector(row[0], dim) if row else None

    def iter_vectors(self, dim: int, chunk: int = 4096, min_id: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (ids int64 [n], vectors float32 [n, dim]) over the stored embeddings with id >= min_id, in id order."""
        cursor = self.conn.execute("SELECT id, vector FROM embeddings WHERE id >= ? ORDER BY id", [int(min_id)])
        while True:
            rows = cursor.fetchmany(chunk)
            if not rows:
                return
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            data = b"".join(r[1] or b"" for r in rows)
            if len(data) != len(rows) * dim * 4:
                bad = [r[0] for r in rows if len(r[1] or b"") != dim * 4]
                raise CollectionError(f"{self.path}: {len(bad)}+ stored vectors are not {dim} float32 values "
                                      f"(ids {', '.join(map(str, bad[:5]))}{' …' if len(bad) > 5 else ''})",
                                      "Index it again into a new database with: clipsearch index PATH --rebuild")
            yield ids, np.frombuffer(data, dtype=np.float32).reshape(len(rows), dim)

    def malformed_vectors(self, dim: int) -> tuple[int, list[int]]:
        """(how many stored vectors are not `dim` float32 values, the first few of their ids)."""
        count = int(self.conn.execute("SELECT count(*) FROM embeddings WHERE length(vector) IS NOT ?",
                                      [dim * 4]).fetchone()[0])
        if not count:
            return 0, []
        ids = [int(r[0]) for r in self.conn.execute(
            "SELECT id FROM embeddings WHERE length(vector) IS NOT ? ORDER BY id LIMIT 5", [dim * 4])]
        return count, ids

    def all_vectors(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        parts = list(self.iter_vectors(dim))
        if not parts:
            return np.zeros(0, dtype=np.int64), np.zeros((0, dim), dtype=np.float32)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    # -- query text cache (a repeated query skips loading the text model) --------------------------
    def cached_text_vectors(self, model_id: str, texts: Sequence[str], dim: int,
                            now: float | None = None) -> dict[str, np.ndarray]:
        """Cached vectors of those `texts` that are cached. A hit marks its row as used (what eviction
        orders by), writing at most once per TEXT_CACHE_TOUCH_SECONDS per row and never waiting long."""
        now = time.time() if now is None else now
        found: dict[str, np.ndarray] = {}
        stale: list[str] = []
        for text in dict.fromkeys(texts):
            row = self.conn.execute("SELECT vector, used_at FROM text_cache WHERE model_id = ? AND text = ?",
                                    [model_id, text]).fetchone()
            if row is not None and len(row[0]) == dim * 4:
                found[text] = np.frombuffer(row[0], dtype=np.float32).copy()
                if row[1] is None or now - float(row[1]) >= TEXT_CACHE_TOUCH_SECONDS:
                    stale.append(text)
        if stale:
            self._best_effort_write(lambda: self.conn.executemany(
                "UPDATE text_cache SET used_at = ? WHERE model_id = ? AND text = ?",
                [(now, model_id, text) for text in stale]))
        return found

    def cache_text_vectors(self, model_id: str, vectors: dict[str, np.ndarray], now: float,
                           keep: int = TEXT_CACHE_SIZE) -> None:
        """Remember text embeddings, evicting the least recently used down to `keep` rows once the cache holds
        a tenth more than that (the eviction sorts the whole table, so it runs once per keep/10 new texts, not
        on every write, where it cost a served new query about 2 CPU ms, measured in-process). Best effort: a
        read-only or busy database just skips caching, waiting at most a quarter of a second for an indexing
        run's write lock."""
        def write() -> None:
            self.conn.executemany(
                "INSERT OR REPLACE INTO text_cache (model_id, text, vector, used_at) VALUES (?, ?, ?, ?)",
                [(model_id, text, np.ascontiguousarray(vector, dtype=np.float32).tobytes(), now)
                 for text, vector in vectors.items()])
            if self.conn.execute("SELECT count(*) FROM text_cache").fetchone()[0] > keep + keep // 10:
                self.conn.execute("DELETE FROM text_cache WHERE rowid NOT IN (SELECT rowid FROM text_cache "
                                  "ORDER BY used_at DESC LIMIT ?)", [int(keep)])

        self._best_effort_write(write)

    def _best_effort_write(self, write) -> None:
        """Run `write()` in its own transaction with a short busy timeout; give up quietly when the database
        is busy or read-only. Plain sqlite3 (no sqlite-utils import on the search path)."""
        if self.conn.in_transaction or self.read_only:
            return  # never commit someone else's transaction
        self.conn.execute("PRAGMA busy_timeout = 250")
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                write()
            except BaseException:
                self.conn.rollback()
                raise
            self.conn.commit()
        except sqlite3.OperationalError:
            pass
        finally:
            self.conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")

    # -- writes ----------------------------------------------------------------------------------
    def write_images(self, images: Iterable[NewImage], model_id: str, run_id: int, indexed_at: str) -> list[int]:
        """Insert or update rows and their vectors in one transaction; returns the ids in order. `images` may be
        an iterator (rows made as they are written: an import never holds a whole shard's vectors)."""
        ids: list[int] = []
        pending = iter(images)
        first = next(pending, None)
        if first is None:
            return ids
        with signals_deferred(), self.db.atomic():
            self._bump_generation()
            self._bump_generation("tokens_gen")
            generation = self.generation
            tokens_gen = self.tokens_generation
            for image in itertools.chain((first,), pending):
                values = (image.path, image.size, image.mtime_ns, image.content_hash, image.width, image.height,
                          image.taken_at, indexed_at, model_id, run_id)
                if image.id is not None:
                    self.db.execute(
                        "UPDATE images SET path=?, size=?, mtime_ns=?, content_hash=?, width=?, height=?, taken_at=?, "
                        "indexed_at=?, model_id=?, run_id=? WHERE id=?", [*values, image.id])
                    image_id = image.id
                else:
                    # A path can only be new here, unless a previous killed run wrote it; replace that row.
                    self.db.execute("DELETE FROM embeddings WHERE id IN (SELECT id FROM images WHERE path = ?)", [image.path])
                    self.db.execute("DELETE FROM image_tokens WHERE id IN (SELECT id FROM images WHERE path = ?)",
                                    [image.path])
                    self.db.execute("DELETE FROM images WHERE path = ?", [image.path])
                    cursor = self.db.execute(
                        "INSERT INTO images (path, size, mtime_ns, content_hash, width, height, taken_at, indexed_at, "
                        "model_id, run_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", list(values))
                    image_id = int(cursor.lastrowid)
                self.db.execute("INSERT OR REPLACE INTO embeddings (id, vector, written_gen) VALUES (?, ?, ?)",
                                [image_id, np.ascontiguousarray(image.vector, dtype=np.float32).tobytes(), generation])
                if image.tokens is not None:
                    self.db.execute("INSERT OR REPLACE INTO image_tokens (id, data, written_gen) VALUES (?, ?, ?)",
                                    [image_id, image.tokens, tokens_gen])
                else:  # new content without tokens: tokens of the old content must not stay
                    self.db.execute("DELETE FROM image_tokens WHERE id = ?", [image_id])
                self.db.execute("DELETE FROM skipped WHERE path = ?", [image.path])
                ids.append(image_id)
        return ids

    def write_tokens(self, rows: Sequence[tuple[int, bytes]], content_hashes: dict[int, str] | None = None) -> int:
        """Add tokens to images that are indexed already (their vectors stay as they are), in one transaction.
        Ids that are no longer indexed are left out; returns how many rows were written. `content_hashes`: in the
        same transaction, the hash of a row's file bytes where it held a stand-in (an imported row's vector digest)."""
        if not rows and not content_hashes:
            return 0
        written = 0
        with signals_deferred(), self.db.atomic():
            for image_id, content_hash in (content_hashes or {}).items():
                self.db.execute("UPDATE images SET content_hash = ? WHERE id = ?", [content_hash, int(image_id)])
            if not rows:
                return 0
            self._bump_generation("tokens_gen")
            tokens_gen = self.tokens_generation
            for image_id, blob in rows:
                written += self.db.execute(
                    "INSERT OR REPLACE INTO image_tokens (id, data, written_gen) SELECT id, ?, ? FROM images "
                    "WHERE id = ?", [blob, tokens_gen, int(image_id)]).rowcount
        return written

    def delete_all_tokens(self) -> int:
        """Drop every stored token (a collection that stops storing them)."""
        if not self.has_any_tokens():
            return 0
        with signals_deferred(), self.db.atomic():
            removed = self.db.execute("DELETE FROM image_tokens").rowcount
            self._bump_generation("tokens_gen")
        return removed

    def touch(self, ids: Sequence[int], run_id: int, new_stats: dict[int, tuple[int, int]] | None = None) -> None:
        """Mark rows as seen by `run_id` (and record a new size/mtime for content-identical files)."""
        with signals_deferred(), self.db.atomic():
            for start in range(0, len(ids), 500):
                chunk = [int(i) for i in ids[start:start + 500]]
                self.db.execute(f"UPDATE images SET run_id = ? WHERE id IN ({','.join('?' * len(chunk))})",
                                [run_id, *chunk])
            for image_id, (size, mtime_ns) in (new_stats or {}).items():
                self.db.execute("UPDATE images SET size = ?, mtime_ns = ? WHERE id = ?", [size, mtime_ns, image_id])

    def move_image(self, image_id: int, path: str, size: int, mtime_ns: int, run_id: int, indexed_at: str) -> None:
        """An indexed image's file was renamed or moved (same bytes): the row takes the new path and stat, keeping its
        id, vector and tokens. A row already at `path` (a killed run's) gives way."""
        with signals_deferred(), self.db.atomic():
            self._delete_where("path = ? AND id != ?", [path, int(image_id)])
            self.db.execute("UPDATE images SET path = ?, size = ?, mtime_ns = ?, run_id = ?, indexed_at = ? WHERE id = ?",
                            [path, int(size), int(mtime_ns), run_id, indexed_at, int(image_id)])
            self.db.execute("DELETE FROM skipped WHERE path = ?", [path])

    def record_skipped(self, entries: Sequence[tuple[str, int, int, str]], run_id: int) -> None:
        with signals_deferred(), self.db.atomic():
            self.db["skipped"].upsert_all(
                [{"path": p, "size": s, "mtime_ns": m, "reason": r, "run_id": run_id} for p, s, m, r in entries], pk="path")
            for path, *_ in entries:  # a file that turned bad no longer belongs in the index
                self._delete_where("path = ?", [path])

    def touch_skipped(self, paths: Sequence[str], run_id: int) -> None:
        with signals_deferred(), self.db.atomic():
            for path in paths:
                self.db.execute("UPDATE skipped SET run_id = ? WHERE path = ?", [run_id, path])

    def sweep(self, roots: Sequence[str], run_id: int) -> int:
        """Delete rows under `roots` not seen by `run_id` (deleted or excluded files); returns how many."""
        removed = 0
        with signals_deferred(), self.db.atomic():
            for root in roots:
                if not is_utf8(root):
                    continue  # a folder whose name is not UTF-8 holds no stored path (they are all UTF-8 text)
                under, params = _under(root)
                where, params = f"run_id IS NOT ? AND ({under})", [run_id, *params]
                removed += self._delete_where(where, params)
                self.db.execute(f"DELETE FROM skipped WHERE {where}", params)
        return removed

    def delete_ids(self, ids: Sequence[int]) -> int:
        removed = 0
        with signals_deferred(), self.db.atomic():
            for start in range(0, len(ids), 500):
                chunk = [int(i) for i in ids[start:start + 500]]
                removed += self._delete_where(f"id IN ({','.join('?' * len(chunk))})", chunk)
        return removed

    def clear(self) -> None:
        """Forget every image in place (ids keep counting up: none is handed out again)."""
        with signals_deferred(), self.db.atomic():
            self.db.execute("DELETE FROM embeddings")
            self.db.execute("DELETE FROM image_tokens")
            self.db.execute("DELETE FROM images")
            self.db.execute("DELETE FROM skipped")
            self._bump_generation()
            self._bump_generation("tokens_gen")

    def _delete_where(self, where: str, params: list) -> int:
        self.db.execute(f"DELETE FROM embeddings WHERE id IN (SELECT id FROM images WHERE {where})", params)
        tokens = self.db.execute(f"DELETE FROM image_tokens WHERE id IN (SELECT id FROM images WHERE {where})",
                                 params).rowcount
        removed = self.db.execute(f"DELETE FROM images WHERE {where}", params).rowcount
        if removed:
            self._bump_generation()
        if tokens > 0:
            self._bump_generation("tokens_gen")
        return max(0, removed)

    def _bump_generation(self, key: str = "generation") -> None:
        self.db.execute("INSERT INTO meta (key, value) VALUES (?, '1') ON CONFLICT(key) DO UPDATE SET "
                        "value = CAST(CAST(value AS INTEGER) + 1 AS TEXT)", [key])

    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + "*") if p.is_file())


def _under(root: str) -> tuple[str, list]:
    """The WHERE clause (and its parameters) of the stored paths at or inside `root`."""
    prefix = root.rstrip("/\\") + "/"
    return "path = ? OR substr(path, 1, ?) = ?", [root, len(prefix), prefix]


class ThreadReaders:
    """Read-only `Store`s of a database, one per thread that asks (`for_thread`): threads read at the same
    time (WAL lets readers run beside each other and beside a writer) instead of sharing one connection behind
    a lock. A thread's reader is reopened when it asks for another file (a rebuild switched generations);
    readers of threads that ended are closed when a new one is opened, the rest by `close`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._readers: dict[int, tuple[threading.Thread, Store]] = {}
        self._closed = False

    def for_thread(self, path: Path) -> Store:
        me = threading.current_thread()
        entry = self._readers.get(threading.get_ident())
        if entry is not None and entry[0] is me and entry[1].path == path:
            return entry[1]
        reader = Store(path, create=False, read_only=True)
        with self._lock:
            if self._closed:
                reader.close()
                raise CollectionError(f"{path}: the searcher was closed")
            done = [key for key, (thread, _) in self._readers.items() if not thread.is_alive()]
            if entry is not None:
                done.append(threading.get_ident())
            finished = [self._readers.pop(key)[1] for key in set(done) if key in self._readers]
            self._readers[threading.get_ident()] = (me, reader)
        for store in finished:
            store.close()
        return reader

    def __len__(self) -> int:
        return len(self._readers)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            readers, self._readers = list(self._readers.values()), {}
        for _, store in readers:
            store.close()


# The content_hash of a row import-embeddings wrote (no file bytes were read): this prefix + its vector's digest.
IMPORTED_HASH_PREFIX = "imported:"


def _fits_sqlite(value: int) -> bool:
    """True for an integer SQLite can store (64-bit signed); no row id lies outside that."""
    return -(2**63) <= value < 2**63


def _decode_vector(blob: bytes, dim: int) -> np.ndarray:
    if len(blob or b"") != dim * 4:
        raise CollectionError(f"a stored vector has {len(blob or b'')} bytes, not {dim} float32 values",
                              "Index it again into a new database with: clipsearch index PATH --rebuild")
    return np.frombuffer(blob, dtype=np.float32).copy()


def _sqlite_utils():
    """sqlite-utils, imported without pandas: sqlite-utils imports pandas when it is installed only to map
    `pandas.Timestamp` to a column type (we never store pandas values), and that made importing it take 314 ms
    instead of 43 at every indexing run's start here (benchmarks/decode.py; pandas comes with Ray and pyarrow). A
    pandas imported earlier is used as is."""
    import sys

    if "sqlite_utils.db" in sys.modules or "pandas" in sys.modules:
        import sqlite_utils

        return sqlite_utils
    sys.modules["pandas"] = None  # type: ignore[assignment]  # makes `import pandas` raise ImportError
    try:
        import sqlite_utils
    finally:
        if sys.modules.get("pandas", 0) is None:
            del sys.modules["pandas"]
    return sqlite_utils
