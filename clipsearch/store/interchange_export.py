"""`export_embeddings`: a collection written out in clip-retrieval's layout (see clipsearch.store.interchange for
the layout and how `import_embeddings` reads it back): img_emb/img_emb_{n}.npy (fp32, or fp16 as clip inference
writes), metadata/metadata_{n}.parquet with image_path, url and caption (when any row has them) plus id, width,
height and taken_at, and clipsearch.json naming the model."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .collection import Collection
from .database import Store
from .interchange import (DEFAULT_SHARD_SIZE, IMG_EMB_DIR, METADATA_DIR, MODEL_FILE, OWN_COLUMNS, TEXT_EMB_DIR,
                          InterchangeError, ProgressCallback, _now, _parquet, _parsed_extra, _table_columns)


@dataclass
class ExportSummary:
    collection: str
    folder: str
    model_id: str
    rows: int = 0
    shards: int = 0
    dim: int = 0
    dtype: str = "float32"
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def export_embeddings(collection: Collection, folder: Path | str, shard_size: int = DEFAULT_SHARD_SIZE,
                      fp16: bool = False, progress: ProgressCallback | None = None) -> ExportSummary:
    """Write every image of `collection` (id order) in clip-retrieval's layout into `folder`, which must not
    hold embeddings yet. Each file is written under a temporary name and renamed into place; the rows come
    from one SQLite read, so an indexing run writing meanwhile cannot split a row from its vector."""
    if shard_size < 1:
        raise InterchangeError("the shard size must be at least 1")
    _parquet()  # before anything is created
    started = time.perf_counter()
    folder = Path(folder)
    model = collection.require_model()
    store = collection.store
    if store.count() == 0:
        raise InterchangeError(f"collection {collection.name!r} has no images to export")
    emb_dir, meta_dir = folder / IMG_EMB_DIR, folder / METADATA_DIR
    created = {d for d in (folder, emb_dir, meta_dir) if not d.exists()}
    if folder.exists() and not folder.is_dir():
        raise InterchangeError(f"{folder}: is a file, not a folder")
    taken = [p.name for d in (emb_dir, meta_dir, folder / TEXT_EMB_DIR) if d.is_dir() for p in d.iterdir()]
    if taken or (folder / MODEL_FILE).exists():
        raise InterchangeError(f"{folder}: already holds embeddings ({', '.join(sorted(taken)[:3]) or MODEL_FILE})",
                               "Export into a folder without img_emb/, metadata/, text_emb/ or clipsearch.json "
                               "(a new one, say); nothing is overwritten.")
    try:
        emb_dir.mkdir(parents=True, exist_ok=True)
        meta_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InterchangeError(f"cannot create {folder}: {exc.strerror or exc}") from exc
    dim = model.embed_dim
    summary = ExportSummary(collection=collection.name, folder=str(folder), model_id=model.model_id, dim=dim,
                            dtype="float16" if fp16 else "float32")
    store.conn.execute("BEGIN")  # one read snapshot for the count and every row
    try:
        return _export_snapshot(collection, store, folder, model, shard_size, fp16, progress, summary, started)
    except BaseException:
        _remove_partial_export(folder, created)  # else the folder "already holds embeddings" that cannot be imported
        raise
    finally:
        store.conn.rollback()


def _remove_partial_export(folder: Path, created: set[Path]) -> None:
    """What a failed or interrupted export wrote into `folder`: its shard folders held no file before it started
    (checked), so whatever they hold now is this export's; the folders it created go too."""
    for directory in (folder / IMG_EMB_DIR, folder / METADATA_DIR):
        for path in directory.iterdir() if directory.is_dir() else ():
            if path.is_file() or path.is_symlink():  # never a folder: the export writes files only
                path.unlink(missing_ok=True)
    (folder / MODEL_FILE).unlink(missing_ok=True)
    for directory in sorted(created, key=lambda d: len(d.parts), reverse=True):  # the shard folders first
        try:
            directory.rmdir()
        except OSError:  # not empty (something else was put there) or already gone: left as it is
            pass


def _export_snapshot(collection: Collection, store: Store, folder: Path, model, shard_size: int, fp16: bool,
                     progress: ProgressCallback | None, summary: ExportSummary, started: float) -> ExportSummary:
    pq = _parquet()
    emb_dir, meta_dir, dim = folder / IMG_EMB_DIR, folder / METADATA_DIR, model.embed_dim
    count = store.count()
    if count == 0:
        raise InterchangeError(f"collection {collection.name!r} has no images to export")
    shard_count = max(1, math.ceil(count / shard_size))
    digits = int(math.log10(shard_count)) + 1  # as clip inference names its partitions
    if progress:
        progress(0, count)
    done = 0
    for number, rows in enumerate(_export_rows(store, dim, shard_size)):
        label = str(number).zfill(digits)
        vectors = np.stack([r[-1] for r in rows]).astype(np.float16 if fp16 else np.float32)
        npy = emb_dir / f"img_emb_{label}.npy"
        parquet = meta_dir / f"metadata_{label}.parquet"
        _write_atomically(npy, lambda handle, v=vectors: np.save(handle, v))
        table = _metadata_table(rows)
        _write_atomically(parquet, lambda handle, t=table: pq.write_table(t, handle))
        summary.files += [str(npy.relative_to(folder)), str(parquet.relative_to(folder))]
        summary.shards += 1
        summary.rows += len(rows)
        done += len(rows)
        if progress:
            progress(done, count)
    record = {"model_id": model.model_id, "name": model.name, "spec": model.spec, "embed_dim": dim,
              "collection": collection.name, "rows": summary.rows, "dtype": summary.dtype, "exported_at": _now()}
    _write_atomically(folder / MODEL_FILE, lambda handle: handle.write(
        (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode("utf-8")))
    summary.files.append(MODEL_FILE)
    summary.seconds = time.perf_counter() - started
    return summary


def _export_rows(store: Store, dim: int, shard_size: int) -> Iterator[list[tuple]]:
    """Shards of rows (id, path, width, height, taken_at, image_path, url, caption, extra JSON, vector) in id
    order."""
    columns = _table_columns(store, "imported")
    joined, kept_extra = bool(columns), "extra" in columns
    extra = (f"m.image_path, m.url, m.caption, {'m.extra' if kept_extra else 'NULL'}" if joined
             else "NULL, NULL, NULL, NULL")
    join = "LEFT JOIN imported m ON m.id = i.id" if joined else ""
    cursor = store.conn.execute(
        f"SELECT i.id, i.path, i.width, i.height, i.taken_at, {extra}, e.vector FROM images i "
        f"JOIN embeddings e ON e.id = i.id {join} ORDER BY i.id")
    while True:
        rows = cursor.fetchmany(shard_size)
        if not rows:
            return
        out = []
        for *fields, blob in rows:
            vector = np.frombuffer(blob, dtype=np.float32)
            if vector.size != dim:
                raise InterchangeError(f"image {fields[0]}: its stored vector has {vector.size} dimensions, not {dim}",
                                       "Check the collection: clipsearch check")
            out.append((*fields, vector))
        yield out


def _metadata_table(rows: list[tuple]):
    """The parquet columns of a shard: image_path (the local file; for a URL row the image_path it was imported
    with, if any), url and caption when any row has one, and id, width, height, taken_at."""
    import pyarrow as pa

    image_paths, urls, captions, others = [], [], [], []
    for _id, path, _w, _h, _t, imported_path, url, caption, extra in (r[:-1] for r in rows):
        url_row = url is not None and path == url
        image_paths.append(imported_path if url_row else path)
        urls.append(url)
        captions.append(caption)
        others.append(_parsed_extra(extra))
    columns = {"image_path": pa.array(image_paths, type=pa.string())}
    if any(u is not None for u in urls):
        columns["url"] = pa.array(urls, type=pa.string())
    if any(c is not None for c in captions):
        columns["caption"] = pa.array(captions, type=pa.string())
    columns["id"] = pa.array([r[0] for r in rows], type=pa.int64())
    columns["width"] = pa.array([r[2] for r in rows], type=pa.int64())  # as pandas writes them for clip-retrieval
    columns["height"] = pa.array([r[3] for r in rows], type=pa.int64())
    columns["taken_at"] = pa.array([r[4] for r in rows], type=pa.string())
    for name in dict.fromkeys(key for fields in others for key in fields):  # imported columns, as they came
        if name in columns or name in OWN_COLUMNS:
            continue
        values = [fields.get(name) for fields in others]
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # one column of mixed kinds: as text
            columns[name] = pa.array([None if v is None else str(v) for v in values], type=pa.string())
    return pa.table(columns)


def _write_atomically(path: Path, write: Callable) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InterchangeError(f"cannot write {path}: {exc.strerror or exc}") from exc
