"""Embeddings in clip-retrieval's layout: `import_embeddings` loads what its `clip inference` wrote, and
`interchange_export.export_embeddings` writes a collection out the same way, so embeddings move between the two without
re-embedding any image.

The layout (clip_retrieval/clip_inference/writer.py)::

    DIR/img_emb/img_emb_{n}.npy            [rows, dim] fp16 (clip inference) or fp32, L2-normalised rows
    DIR/metadata/metadata_{n}.parquet      row-aligned with the npy of the same n: image_path (the file, or a
                                           webdataset key), caption (with text enabled), and the columns of
                                           the input's .json metadata flattened (url, width, height, ...)
    DIR/text_emb/text_emb_{n}.npy          caption embeddings: not imported (this is an image index); the
                                           caption column is kept as metadata

`{n}` is the partition number, zero-padded to the digits of the partition count. An export also writes
`id`, `width`, `height`, `taken_at` (readers of the layout ignore extra columns) and `clipsearch.json`, the
model the vectors come from, which an import of that folder checks against (or uses when --model is left out).

How a row becomes an image of the collection:

* `image_path` naming a file on this machine (relative paths are taken from `root`, default the current
  folder): stored under its absolute path with the file's size and mtime, so a later `clipsearch index` of
  that folder finds it unchanged and keeps the imported vector.
* otherwise a row with a `url`: a *URL row*. Its stored path is the URL itself (a stored path of a local file
  is always absolute, so the two never collide); searches return it as the path, and the web server never
  fetches it (it serves bytes only of local files inside the collection's folders, and a URL is neither).
* otherwise `image_path` as an absolute path whose file is not here (yet): searchable; shown once it appears.
* neither: skipped.

url and caption (and the row's original image_path) are kept in the `imported` table, whose rows go with their
image (ON DELETE CASCADE), so `export_embeddings` writes them back. Vectors are stored exactly as given (fp16
rows widened to fp32). A row whose norm is not 1 (beyond fp16 rounding) makes the import refuse the shard
unless `normalize=True`, which scales every vector to unit length; zero or non-finite rows are skipped.

Incremental and crash-safe like indexing: each shard is one transaction (its rows, vectors and the
`import_shards` record of the shard), so a killed import loses at most the shard it was writing. A shard
already recorded with the same row count, file sizes and times is not read again, so importing a folder twice
adds nothing, and importing it after clip inference added shards imports only the new ones. A shard that was
rewritten (clip inference run again into the same folder) is read again and replaces what it brought in before,
as indexing a changed folder does: its rows with another vector are updated in place (same id, also when a row
moved to another shard), rows that no shard of the folder holds any more leave the collection (also those of a
shard file that is gone), the rest are unchanged. The removals and the re-read shards' records are written last, in
one transaction: an import stopped before that reads those shards again next time. Rows whose path (or URL) the
collection holds from anywhere else (indexed, another folder, or embedded from the file since) are skipped: an
import never overwrites them. The FAISS index is brought up to date at the end (or by the
next run or search, when killed), keeping SQLite row id = FAISS id.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..errors import ClipsearchError
from ..paths import is_url_path
from ..text import is_utf8
from .collection import Collection
from .database import IMPORTED_HASH_PREFIX, NewImage, Store, signals_deferred

IMG_EMB_DIR = "img_emb"
TEXT_EMB_DIR = "text_emb"
METADATA_DIR = "metadata"
MODEL_FILE = "clipsearch.json"
DEFAULT_SHARD_SIZE = 1_000_000  # clip inference's default --write_batch_size
NORM_TOLERANCE = 1e-2  # fp16 rounding moves a unit vector's norm by ~1e-3
_SHARD_RE = re.compile(r"^img_emb_([0-9]+)\.npy$")
_PARQUET_HINT = "Install the interchange extra: pip install 'clipsearch[interchange]' (it adds pyarrow)."

_DDL = (
    'CREATE TABLE IF NOT EXISTS "imported" ("id" INTEGER PRIMARY KEY REFERENCES "images"("id") ON DELETE CASCADE, '
    '"source" TEXT NOT NULL, "shard" TEXT NOT NULL, "row" INTEGER NOT NULL, "image_path" TEXT, "url" TEXT, '
    '"caption" TEXT, "extra" TEXT)',
    'CREATE TABLE IF NOT EXISTS "import_shards" ("source" TEXT NOT NULL, "shard" TEXT NOT NULL, "rows" INTEGER, '
    '"npy_bytes" INTEGER, "parquet_bytes" INTEGER, "imported" INTEGER, "skipped" INTEGER, "imported_at" TEXT, '
    '"npy_mtime_ns" INTEGER, "parquet_mtime_ns" INTEGER, PRIMARY KEY ("source", "shard"))',
    'CREATE INDEX IF NOT EXISTS "imported_by_source" ON "imported" ("source", "shard")',
)
# Columns added to import_shards since it was first written (collections imported into before keep working).
_RECORD_SHARD = ("INSERT OR REPLACE INTO import_shards (source, shard, rows, npy_bytes, parquet_bytes, npy_mtime_ns, "
                 "parquet_mtime_ns, imported, skipped, imported_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
_ADDED_COLUMNS = (("import_shards", "npy_mtime_ns", "INTEGER"), ("import_shards", "parquet_mtime_ns", "INTEGER"),
                  ("imported", "extra", "TEXT"))

ProgressCallback = Callable[[int, int], None]


class InterchangeError(ClipsearchError):
    """An embeddings folder that cannot be imported (or a folder an export cannot write into)."""


# -- reading the layout ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    """One img_emb_{n}.npy with its metadata_{n}.parquet, as found and checked (header only) before importing."""

    label: str  # the zero-padded n of the file names
    embeddings: Path
    metadata: Path
    rows: int
    dim: int
    dtype: str

    @property
    def number(self) -> int:
        return int(self.label)

    def fingerprint(self) -> tuple[int, int, int, int, int]:
        """(rows, .npy bytes, .parquet bytes, .npy mtime_ns, .parquet mtime_ns): a shard rewritten with files of the
        same sizes (other URLs of the same length, other vectors) is not the shard that was imported."""
        npy, parquet = self.embeddings.stat(), self.metadata.stat()
        return self.rows, npy.st_size, parquet.st_size, npy.st_mtime_ns, parquet.st_mtime_ns


@dataclass(frozen=True)
class ModelRecord:
    """What `clipsearch.json` of an export says about the vectors' model."""

    model_id: str
    name: str
    spec: str
    embed_dim: int


def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise InterchangeError("reading and writing parquet metadata needs pyarrow, which is not installed",
                               _PARQUET_HINT) from exc
    return pq


def find_shards(folder: Path | str) -> list[Shard]:
    """Every shard of an embeddings folder in partition order, each checked for what can be checked cheaply:
    its metadata file is there, both files are readable, rows agree, the npy is a 2-D float matrix."""
    pq = _parquet()
    folder = Path(folder)
    if not folder.is_dir():
        raise InterchangeError(f"{folder}: not a folder",
                               "Give the folder clip inference wrote (its --output_folder), holding img_emb/ and metadata/.")
    emb_dir = folder / IMG_EMB_DIR
    if not emb_dir.is_dir():
        extra = " (it has text_emb/ only: clip inference ran without images)" if (folder / TEXT_EMB_DIR).is_dir() else ""
        raise InterchangeError(f"{folder}: no {IMG_EMB_DIR}/ folder{extra}",
                               f"Give the folder clip inference wrote: {IMG_EMB_DIR}/img_emb_N.npy and "
                               f"{METADATA_DIR}/metadata_N.parquet.")
    found = sorted(((int(m.group(1)), m.group(1), p) for p in emb_dir.iterdir() if (m := _SHARD_RE.match(p.name))),
                   key=lambda item: (item[0], item[1]))
    if not found:
        raise InterchangeError(f"{emb_dir}: no img_emb_N.npy files")
    numbers = [n for n, _, _ in found]
    if len(set(numbers)) != len(numbers):
        raise InterchangeError(f"{emb_dir}: a partition number appears twice (e.g. img_emb_1.npy and img_emb_01.npy)")
    missing = [f"{METADATA_DIR}/metadata_{label}.parquet" for _, label, _ in found
               if not (folder / METADATA_DIR / f"metadata_{label}.parquet").is_file()]
    if missing:
        raise InterchangeError(f"{folder}: {len(missing)} shard(s) have no metadata file: {', '.join(missing[:5])}"
                               + (" …" if len(missing) > 5 else ""),
                               "Each img_emb_N.npy needs the metadata_N.parquet that clip inference wrote with it "
                               "(the image_path/url of each row); copy the whole output folder.")
    shards = []
    for _, label, npy in found:
        meta = folder / METADATA_DIR / f"metadata_{label}.parquet"
        try:
            matrix = np.load(npy, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InterchangeError(f"{npy}: not a readable .npy file ({exc})") from exc
        if matrix.ndim != 2 or matrix.dtype.kind != "f":
            raise InterchangeError(f"{npy}: holds a {matrix.dtype} array of shape {tuple(matrix.shape)}, "
                                   "not a [rows, dim] float matrix of embeddings")
        try:
            parquet = pq.ParquetFile(meta)
            rows = parquet.metadata.num_rows
            columns = set(parquet.schema_arrow.names)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
            raise InterchangeError(f"{meta}: not a readable parquet file ({exc})") from exc
        if rows != matrix.shape[0]:
            raise InterchangeError(f"{npy.name} has {matrix.shape[0]} rows but {meta.name} has {rows}: the two "
                                   "files of a shard must be row-aligned",
                                   "Use the files clip inference wrote together, unchanged.")
        if not columns & {"image_path", "url"}:
            raise InterchangeError(f"{meta}: has neither an image_path nor a url column "
                                   f"(its columns: {', '.join(sorted(columns)) or 'none'})",
                                   "Each row must say which image it is: image_path (a file) or url.")
        shards.append(Shard(label, npy, meta, int(rows), int(matrix.shape[1]), str(matrix.dtype)))
        del matrix
    dims = sorted({s.dim for s in shards})
    if len(dims) > 1:
        raise InterchangeError(f"{folder}: the shards have vectors of different sizes ({', '.join(map(str, dims))}): "
                               "they come from more than one model")
    return shards


def read_model_record(folder: Path | str) -> ModelRecord | None:
    """The model an export recorded in `clipsearch.json`, None for folders clip inference wrote."""
    path = Path(folder) / MODEL_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return ModelRecord(str(raw["model_id"]), str(raw.get("name", "")), str(raw.get("spec", "")),
                           int(raw["embed_dim"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InterchangeError(f"{path}: unreadable ({exc})",
                               "Delete it to import the folder as clip inference output (then --model is needed).") from exc


# -- import ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SkippedRow:
    shard: str
    row: int
    what: str  # the image_path or url, "" when the row has neither
    reason: str


@dataclass
class ImportSummary:
    collection: str
    model_id: str
    source: str
    shards: int = 0
    shards_unchanged: int = 0  # already imported with the same files: not read again
    rows: int = 0  # rows in every shard
    imported: int = 0
    unchanged: int = 0  # rows of shards already imported, and rows of a re-read shard whose vector is the same
    updated: int = 0  # rows of a re-read (rewritten) shard this folder had imported, now with another vector
    removed: int = 0  # rows this folder had imported that no shard holds any more (a shard rewritten or gone)
    url_rows: int = 0  # imported rows stored as a URL (no local file)
    missing_files: int = 0  # imported rows naming a file that is not on this machine
    normalized: int = 0  # rows scaled to unit length (normalize=True)
    skipped: list[SkippedRow] = field(default_factory=list)
    total: int = 0  # images in the collection afterwards
    index_update: str = ""
    seconds: float = 0.0

    def skipped_by_reason(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.skipped:
            key = _reason_kind(row.reason)
            counts[key] = counts.get(key, 0) + 1
        return counts

    def to_dict(self) -> dict:
        raw = asdict(self)
        raw["skipped_by_reason"] = self.skipped_by_reason()
        return raw


def _reason_kind(reason: str) -> str:
    return reason.split(" (", 1)[0]


@dataclass(frozen=True)
class ImportOptions:
    root: Path | None = None  # relative image_path values are taken from here (default: the current folder)
    normalize: bool = False  # scale non-unit vectors instead of refusing the shard


def import_embeddings(collection: Collection, folder: Path | str, model_info=None,
                      options: ImportOptions = ImportOptions(),
                      progress: ProgressCallback | None = None) -> ImportSummary:
    """Import an embeddings folder into `collection`. `model_info` (a `BundleInfo`) is the model the vectors
    were made with: required for a collection without a model unless the folder is an export that names one
    (then resolve it first: `recorded_model_spec`), and checked against the collection's otherwise."""
    with collection.writer_lock():
        new = collection.model is None  # (an unbound collection holds nothing)
        try:
            return _Importer(collection, Path(folder), model_info, options, progress).run()
        except BaseException:
            # A refused first import (vectors not unit length, a corrupt shard) leaves no empty collection behind,
            # bound to its model and listed, though it bound the model before reading the shards.
            collection.discard_if_unbound(even_if_bound=new)
            raise


def _recorded_model(folder: Path):
    """The `BundleInfo` of the model an export names in `clipsearch.json`, if it is still on this machine; None
    for a folder without one. InterchangeError when it names a model that cannot be found."""
    record = read_model_record(folder)
    if record is None:
        return None
    from ..model.resolve import resolve_model

    spec = record.spec or record.name
    try:
        info = resolve_model(spec, export_missing=False)
    except ClipsearchError as exc:
        # A spec that was a path on the exporting machine (a bundled or cached model's folder) may be known here by
        # its name: the model id (checked below) decides whether it is the same model.
        if record.name and record.name != spec:
            try:
                info = resolve_model(record.name, export_missing=False)
            except ClipsearchError:
                info = None
            if info is not None and info.model_id == record.model_id:
                return info
        raise InterchangeError(f"{folder} holds vectors of model {record.name or record.model_id}, which is not on "
                               f"this machine ({exc.message})",
                               "Pass --model with that model (a bundle folder, hf: or ARCH/TAG spec).") from exc
    if info.model_id != record.model_id:
        raise InterchangeError(f"{spec} is now model {info.model_id}, but {folder} holds vectors of {record.model_id}",
                               "Pass --model with the model the collection was exported from.")
    return info


class _Importer:
    def __init__(self, collection: Collection, folder: Path, model_info, options: ImportOptions,
                 progress: ProgressCallback | None) -> None:
        self.collection = collection
        self.folder = folder
        # provenance text only: a folder name that is not UTF-8 is recorded with its bytes escaped
        self.source = os.fsencode(os.path.abspath(folder)).decode("utf-8", "backslashreplace")
        self.info = model_info
        self.options = options
        self.progress = progress
        self.root = os.path.abspath(options.root) if options.root is not None else os.getcwd()

    def run(self) -> ImportSummary:
        started = time.perf_counter()
        shards = find_shards(self.folder)
        collection = self.collection
        dim = shards[0].dim
        current = collection.model
        info = self.info
        if info is None and current is None:
            info = _recorded_model(self.folder)
        if info is None and current is None:
            raise InterchangeError(
                f"collection {collection.name!r} is new: name the model the embeddings were made with",
                "Add --model with the CLIP model given to clip inference, e.g. --model ViT-B-32/openai for its "
                "default ViT-B/32, or an hf: / bundle spec of the same model.")
        model_id = info.model_id if info is not None else current.model_id
        model_dim = info.embed_dim if info is not None else current.embed_dim
        model_name = (info.name if info is not None else current.name) or model_id
        if dim != model_dim:
            raise InterchangeError(
                f"the embeddings in {self.folder} have {dim} dimensions but model {model_name} makes "
                f"{model_dim}-dimensional vectors: they come from another model",
                "Give --model the CLIP model clip inference used (its --clip_model), e.g. ViT-B-32/openai "
                "(512 dimensions), ViT-L-14/openai (768), ViT-H-14/laion2b_s32b_b79k (1024)."
                + (f" This collection is bound to {current.spec}; import into another --collection." if current else ""))
        record = read_model_record(self.folder)
        if record is not None and record.model_id != model_id:
            raise InterchangeError(
                f"{self.folder} was exported from a collection of model {record.name or record.model_id} "
                f"({record.model_id}), not {model_name} ({model_id})",
                f"Import it with --model {record.spec or record.name} into a collection of that model.")
        if info is not None:
            collection.bind_model(info)  # raises when the collection holds another model's vectors
        store = collection.store
        _ensure_tables(store)
        summary = ImportSummary(collection=collection.name, model_id=model_id, source=self.source,
                                shards=len(shards), rows=sum(s.rows for s in shards))
        run_id = store.next_run_id()
        done = 0
        if self.progress:
            self.progress(0, summary.rows)
        folders: set[str] = set()
        # Rows this folder imported before that still hold the vector it gave them: a rewritten shard (clip inference
        # run again) updates them wherever they now are; those no current shard holds leave at the end.
        self._own = _imported_from(store, self.source)
        self._kept_own: set[int] = set()
        self._deferred: list[list] = []  # the records of re-read shards: written with the removals, at the end
        try:
            for shard in shards:
                tick = (lambda n, base=done: self.progress(base + n, summary.rows)) if self.progress else None
                self._import_shard(store, shard, model_id, run_id, summary, folders, tick)
                done += shard.rows
                if self.progress:
                    self.progress(done, summary.rows)
            self._remove_what_no_shard_holds(store, {shard.label for shard in shards}, summary)
            _record_roots(store, folders)
        except BaseException:
            _record_roots(store, folders)
            collection.update_vectors()  # FAISS in line with the shards committed so far
            raise
        sync = collection.update_vectors()
        summary.index_update = sync.update
        summary.total = store.count()
        summary.seconds = time.perf_counter() - started
        return summary

    def _import_shard(self, store: Store, shard: Shard, model_id: str, run_id: int, summary: ImportSummary,
                      folders: set[str], tick: Callable[[int], None] | None = None) -> None:
        fingerprint = shard.fingerprint()
        recorded = store.conn.execute(
            "SELECT rows, npy_bytes, parquet_bytes, npy_mtime_ns, parquet_mtime_ns FROM import_shards "
            "WHERE source = ? AND shard = ?", [self.source, shard.label]).fetchone()
        if recorded is not None and recorded[3] is None:  # recorded before the times were: sizes are all it has
            recorded = (*recorded[:3], *fingerprint[3:])
        if recorded is not None and tuple(recorded) == fingerprint:
            summary.shards_unchanged += 1
            summary.unchanged += shard.rows
            return
        vectors = self._vectors(shard, summary)
        columns = _read_metadata(shard)
        extras: list[tuple] = []  # row, image_path, url, caption, extra (JSON of the other metadata columns)
        extras_only: list[tuple] = []  # id, then as extras: rows of a re-read shard whose vector did not change
        skipped: list[SkippedRow] = []
        seen: dict[str, int] = {}
        candidates: list[tuple[int, str, bool]] = []  # row, stored path, is a URL row
        for row in range(shard.rows):
            image_path, url = columns["image_path"][row], columns["url"][row]
            if vectors.unusable(row):
                skipped.append(SkippedRow(shard.label, row, image_path or url or "", "vector is zero or not finite"))
                continue
            key, is_url = self._stored_path(image_path, url)
            if key is None:
                skipped.append(SkippedRow(shard.label, row, "", "no image_path or url"))
                continue
            if not is_utf8(key):  # a --root whose name is not UTF-8: SQLite stores paths as UTF-8 text
                shown = os.fsencode(key).decode("utf-8", "backslashreplace")
                skipped.append(SkippedRow(shard.label, row, shown, "path is not valid UTF-8"))
                continue
            if key in seen:
                skipped.append(SkippedRow(shard.label, row, key, f"duplicate of row {seen[key]} of this shard"))
                continue
            seen[key] = row
            candidates.append((row, key, is_url))
        existing = _existing_paths(store, [key for _, key, _ in candidates])
        own, kept_own = self._own, self._kept_own  # this folder's earlier rows (see run), and those seen so far
        now = _now()
        kept: list[tuple] = []  # (row, key, size, mtime_ns, width, height, id to update or None): vectors read as written
        for done, (row, key, is_url) in enumerate(candidates):
            if tick is not None and done and done % 8192 == 0:
                tick(row)  # a big shard moves the bar while its files are looked at
            update_id = None
            if key in existing:
                image_id = existing[key]
                stored_hash = own.get(image_id)
                # Only a row that still holds the vector this folder gave it: one `clipsearch index` has since
                # embedded from its file, or that came from elsewhere, is the collection's own and stays.
                if stored_hash is None:
                    skipped.append(SkippedRow(shard.label, row, key, f"already in the collection (id {image_id})"))
                    continue
                kept_own.add(image_id)
                if stored_hash == _vector_hash(vectors[row]):
                    summary.unchanged += 1  # (its caption and other columns are written again below)
                    extras_only.append((image_id, row, columns["image_path"][row], columns["url"][row],
                                        columns["caption"][row], columns["extra"][row]))
                    continue
                update_id = image_id
            size = mtime_ns = 0
            width, height = columns["width"][row], columns["height"][row]
            if not is_url:
                try:
                    stat = os.stat(key)
                    if not os.path.isfile(key):
                        raise FileNotFoundError(key)
                    size, mtime_ns = int(stat.st_size), int(stat.st_mtime_ns)
                    folders.add(os.path.dirname(key))
                    if width is None or height is None:
                        width, height = _image_size(key)
                except OSError:
                    summary.missing_files += 1
            else:
                summary.url_rows += 1
            kept.append((row, key, size, mtime_ns, width, height, update_id))
            extras.append((row, columns["image_path"][row], columns["url"][row], columns["caption"][row],
                           columns["extra"][row]))

        def images() -> Iterator[NewImage]:
            for row, key, size, mtime_ns, width, height, update_id in kept:
                vector = vectors[row]
                yield NewImage(path=key, size=size, mtime_ns=mtime_ns, content_hash=_vector_hash(vector),
                               width=width, height=height, taken_at=columns["taken_at"][row], vector=vector,
                               id=update_id)

        with signals_deferred(), store.db.atomic():  # the shard's rows, their provenance and its record together
            ids = store.write_images(images(), model_id, run_id, now) if kept else []
            store.conn.executemany(
                'INSERT OR REPLACE INTO imported (id, source, shard, "row", image_path, url, caption, extra) '
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(image_id, self.source, shard.label, *rest) for image_id, rest in zip(ids, extras)]
                + [(image_id, self.source, shard.label, *rest) for image_id, *rest in extras_only])
            record = [self.source, shard.label, *fingerprint, len(ids), len(skipped), now]
            if recorded is None:
                store.db.execute(_RECORD_SHARD, record)
            else:
                # A rewritten shard is recorded only once what it no longer holds has left (`_remove_what_no_shard_
                # holds`): an import stopped before that reads it again, and finishes the job.
                self._deferred.append(record)
        updated = sum(1 for *_, update_id in kept if update_id is not None)
        summary.imported += len(ids) - updated
        summary.updated += updated
        summary.skipped.extend(skipped)

    def _remove_what_no_shard_holds(self, store: Store, labels: set[str], summary: ImportSummary) -> None:
        """Remove the rows this folder imported from shards that were read again (rewritten) or are gone, which no
        shard of this import holds any more; then record the re-read shards and forget the gone ones, in one
        transaction."""
        recorded = {label for (label,) in store.conn.execute("SELECT shard FROM import_shards WHERE source = ?",
                                                            [self.source])}
        vanished = recorded - labels
        reread = {record[1] for record in self._deferred}
        if not vanished and not reread:
            return
        where = _imported_from(store, self.source, with_shard=True)  # after this run's moves between shards
        # Only rows that were there before this import (rows it added are held by the shard that added them).
        gone = sorted(image_id for image_id, shard in where.items()
                      if image_id in self._own and shard in (reread | vanished) and image_id not in self._kept_own)
        with signals_deferred(), store.db.atomic():
            summary.removed += store.delete_ids(gone) if gone else 0
            for record in self._deferred:
                store.db.execute(_RECORD_SHARD, record)
            store.conn.executemany("DELETE FROM import_shards WHERE source = ? AND shard = ?",
                                   [(self.source, label) for label in sorted(vanished)])

    def _vectors(self, shard: Shard, summary: ImportSummary) -> "_ShardRows":
        """The shard's rows as float32 vectors, each made when it is read (None for a zero or non-finite row);
        InterchangeError for non-unit rows unless normalizing. The file is memory-mapped and widened row by row
        as the rows are written (a 1M-row shard is never copied whole)."""
        matrix = np.load(shard.embeddings, mmap_mode="r", allow_pickle=False)
        norms = np.empty(shard.rows, dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            for start in range(0, shard.rows, 8192):  # 8192 rows of float64: 25 MB at 384 dimensions
                chunk = np.asarray(matrix[start:start + 8192], dtype=np.float64)
                norms[start:start + len(chunk)] = np.sqrt(np.einsum("ij,ij->i", chunk, chunk))
        unusable = ~np.isfinite(norms) | (norms < 1e-12)
        off = ~unusable & (np.abs(norms - 1.0) > NORM_TOLERANCE)
        if off.any() and not self.options.normalize:
            first = int(np.flatnonzero(off)[0])
            raise InterchangeError(
                f"{shard.embeddings.name}: {int(off.sum())} of {shard.rows} vectors are not L2-normalised "
                f"(row {first} has norm {norms[first]:.4g}); clip inference writes unit vectors, so these may "
                "not be CLIP image embeddings",
                "If they are (normalisation was left out), import with --normalize to scale each to unit length."
                + (" Shards before this one were imported." if summary.imported or summary.unchanged else ""))
        if self.options.normalize:
            summary.normalized += int((~unusable).sum())
        return _ShardRows(matrix, unusable, norms if self.options.normalize else None)

    def _stored_path(self, image_path: str | None, url: str | None) -> tuple[str | None, bool]:
        """(the path the row is stored under, whether it is a URL row); (None, False) for neither."""
        local = None
        if image_path and is_url_path(image_path):  # a URL in the path column
            url, image_path = url or image_path, None
        if image_path:
            local = os.path.abspath(os.path.join(self.root, os.path.expanduser(image_path)))
            if os.path.isfile(local):
                return local, False
        if url:
            return url, True
        return local, False


class _ShardRows:
    """A shard's vectors, row by row: float32 (scaled to unit length when `norms` is given), None for an unusable
    row, each read from the mapped file when asked for."""

    def __init__(self, matrix: np.ndarray, unusable: np.ndarray, norms: np.ndarray | None) -> None:
        self._matrix, self._unusable, self._norms = matrix, unusable, norms

    def unusable(self, row: int) -> bool:
        """A zero or non-finite row (it is skipped)."""
        return bool(self._unusable[row])

    def __getitem__(self, row: int) -> np.ndarray | None:
        if self._unusable[row]:
            return None
        if self._norms is not None:
            return (np.asarray(self._matrix[row], dtype=np.float64) / self._norms[row]).astype(np.float32)
        return np.array(self._matrix[row], dtype=np.float32)


def _read_metadata(shard: Shard) -> dict[str, list]:
    """The columns an import uses, each a list of the shard's rows (None where a value or column is missing), and
    "extra": each row's other scalar columns as JSON (e.g. NSFW, key, status: clip-back answers with them)."""
    pq = _parquet()
    wanted = ("image_path", "url", "caption", "width", "height", "taken_at")
    try:
        table = pq.read_table(shard.metadata)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several kinds for a damaged file
        raise InterchangeError(f"{shard.metadata}: cannot be read ({exc})") from exc
    if table.num_rows != shard.rows:
        raise InterchangeError(f"{shard.metadata.name} has {table.num_rows} rows but {shard.embeddings.name} has "
                               f"{shard.rows}")
    columns: dict[str, list] = {}
    for name in wanted:
        values = table.column(name).to_pylist() if name in table.column_names else [None] * shard.rows
        if name in ("width", "height"):
            values = [_positive_int(v) for v in values]
        elif name == "taken_at":
            values = [_iso_time(v) for v in values]
        else:
            values = [None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in values]
            if name in ("image_path", "url"):
                values = [v if v and v.strip() else None for v in values]
        columns[name] = values
    columns["extra"] = _extra_fields(table, shard.rows)
    return columns


OWN_COLUMNS = ("image_path", "url", "caption", "width", "height", "taken_at", "id")  # read or written as such
MAX_EXTRA_BYTES = 4096  # a row's other columns are kept up to this much JSON (a wide exif.* table is not)


def _extra_fields(table, rows: int) -> list[str | None]:
    """Per row, the scalar values (text, numbers, booleans) of the columns clipsearch does not read itself, as a
    JSON object; None when there are none, or more than MAX_EXTRA_BYTES of them."""
    names = [name for name in table.column_names if name not in OWN_COLUMNS]
    if not names:
        return [None] * rows
    values = {name: table.column(name).to_pylist() for name in names}
    out: list[str | None] = []
    for row in range(rows):
        fields = {}
        for name in names:
            value = values[name][row]
            if isinstance(value, float) and not math.isfinite(value):
                continue
            if isinstance(value, (str, bool, int, float)):
                fields[name] = value
        text = json.dumps(fields, ensure_ascii=False) if fields else None
        out.append(text if text is not None and len(text.encode("utf-8")) <= MAX_EXTRA_BYTES else None)
    return out


MAX_SIDE = 2**31 - 1  # pixels: a width or height past this is no image's (and no int32 column holds it)


def _positive_int(value) -> int | None:
    """A width or height: a whole number of pixels in 1..MAX_SIDE (also written as 640.0 or "640"), else None."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if not math.isfinite(number) or not number.is_integer() or not 1 <= number <= MAX_SIDE:
        return None
    return int(number)


def _iso_time(value) -> str | None:
    """A capture time as the store keeps them (ISO 8601, seconds, no offset: local wall-clock time, as EXIF gives
    it), from ISO text or a datetime; anything else (free text, epoch seconds, month 13) is no time: None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, datetime):
        moment = value
    else:
        text = str(value).strip()
        if text.endswith(("Z", "z")):  # UTC as written by many tools; Python 3.10's fromisoformat refuses the Z
            text = text[:-1] + "+00:00"
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            return None
    return moment.replace(tzinfo=None).isoformat(timespec="seconds")


def _image_size(path: str) -> tuple[int | None, int | None]:
    """Width and height from the file's header (no decoding); (None, None) when it is not an image."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return int(image.width), int(image.height)
    except Exception:  # noqa: BLE001 - any unreadable file just has no size
        return None, None


def _vector_hash(vector: np.ndarray) -> str:
    """The stand-in content hash of an imported row: a digest of its float32 vector (there are no file bytes)."""
    return IMPORTED_HASH_PREFIX + hashlib.blake2b(vector.tobytes(), digest_size=16).hexdigest()


def _imported_from(store: Store, source: str, with_shard: bool = False) -> dict[int, str]:
    """id -> content hash (`with_shard`: the shard label it came from) of the images folder `source` brought in
    earlier that still hold the vector it gave them (not those `clipsearch index` has embedded from their files
    since: those are the collection's own)."""
    column = "imported.shard" if with_shard else "images.content_hash"
    return {int(image_id): value for image_id, value in store.conn.execute(
        f"SELECT images.id, {column} FROM imported JOIN images ON images.id = imported.id "
        "WHERE imported.source = ? AND substr(images.content_hash, 1, ?) = ?",
        [source, len(IMPORTED_HASH_PREFIX), IMPORTED_HASH_PREFIX])}


def _existing_paths(store: Store, paths: Sequence[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for start in range(0, len(paths), 500):
        part = list(paths[start:start + 500])
        found.update((p, int(i)) for p, i in store.conn.execute(
            f"SELECT path, id FROM images WHERE path IN ({','.join('?' * len(part))})", part))
    return found


def _ensure_tables(store: Store) -> None:
    with signals_deferred(), store.db.atomic():
        for statement in _DDL:
            store.db.execute(statement)
        for table, column, kind in _ADDED_COLUMNS:
            if column not in _table_columns(store, table):
                store.db.execute(f'ALTER TABLE "{table}" ADD COLUMN "{column}" {kind}')


def _table_columns(store: Store, table: str) -> set[str]:
    """The columns of `table` (none when it does not exist: a collection nothing was imported into)."""
    return {row[1] for row in store.conn.execute(f'PRAGMA table_info("{table}")')}


def _record_roots(store: Store, folders: set[str]) -> None:
    """The topmost folders holding imported local files become the collection's served roots (the web server
    shows files only from inside those); URL rows add none."""
    topmost: list[str] = []
    for folder in sorted(folders):
        if not any(folder == top or folder.startswith(top.rstrip(os.sep) + os.sep) for top in topmost):
            topmost.append(folder)
    if topmost:
        store.record_roots(topmost, imported=True)


def imported_metadata(store: Store, ids: Sequence[int]) -> dict[int, dict]:
    """id -> {"image_path", "url", "caption", "extra"} as imported, for those of `ids` that were imported ("extra":
    the row's other metadata columns, a dict, empty for rows imported before they were kept)."""
    columns = _table_columns(store, "imported")
    if not columns:
        return {}
    kept_extra = "extra" in columns
    found: dict[int, dict] = {}
    wanted = [int(i) for i in ids]
    for start in range(0, len(wanted), 500):
        part = wanted[start:start + 500]
        for image_id, image_path, url, caption, extra in store.conn.execute(
                f"SELECT id, image_path, url, caption, {'extra' if kept_extra else 'NULL'} FROM imported "
                f"WHERE id IN ({','.join('?' * len(part))})", part):
            found[int(image_id)] = {"image_path": image_path, "url": url, "caption": caption,
                                    "extra": _parsed_extra(extra)}
    return found


def _parsed_extra(text: str | None) -> dict:
    try:
        value = json.loads(text) if text else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
