"""`clipsearch import-embeddings` and `clipsearch export-embeddings`: clip-retrieval's embeddings layout
(img_emb/img_emb_N.npy + metadata/metadata_N.parquet) in and out, see clipsearch.store.interchange."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from . import app
from .index_cmds import _INDEX_DIR_HELP, _interrupted, _progress_bar, _stop_on_signals


@app.command("import-embeddings")
def import_embeddings(
    folder: Path = typer.Argument(..., help="The folder clip-retrieval's `clip inference` wrote (img_emb/, metadata/), "
                                            "or one `clipsearch export-embeddings` wrote"),
    collection: str = typer.Option("default", "--collection", "-c", help="Collection name"),
    model: Optional[str] = typer.Option(
        None, "--model", "-m",
        help="The model the embeddings were made with, e.g. ViT-B-32/openai for clip inference's default ViT-B/32 "
             "(default: the collection's model; for a folder from export-embeddings, the model it names)"),
    root: Optional[Path] = typer.Option(None, "--root", help="Folder that relative image_path values are relative "
                                                              "to (default: the current folder)"),
    normalize: bool = typer.Option(False, "--normalize", help="Scale vectors to unit length instead of refusing "
                                                              "a shard whose vectors are not L2-normalised"),
    index_dir: Optional[Path] = typer.Option(None, "--index-dir", help=_INDEX_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON"),
) -> None:
    """Import image embeddings in clip-retrieval's layout without re-embedding: incremental (rows already
    imported are skipped; a rewritten shard replaces what it imported before), one transaction per shard."""
    from ..model.resolve import resolve_model
    from ..store.collection import Collection
    from ..store.interchange import ImportOptions, import_embeddings as run_import

    with _stop_on_signals():
        try:
            target = Collection.create(collection, index_dir)
            with target:
                try:
                    info = resolve_model(model) if model is not None else None  # else the collection's, or the
                    # one an export names in its clipsearch.json
                    show_bar = not as_json and sys.stderr.isatty()
                    with _progress_bar(show_bar, "importing", "rows/s", ",.0f") as progress:
                        summary = run_import(target, folder, info, ImportOptions(root=root, normalize=normalize),
                                             progress)
                except KeyboardInterrupt as exc:
                    try:
                        count = target.store.count() if target.exists else None
                    except Exception:  # noqa: BLE001 - the message must be printed whatever the store says
                        count = None
                    raise _interrupted(collection, count, getattr(exc, "signum", signal.SIGINT)) from None
        except KeyboardInterrupt as exc:
            raise _interrupted(collection, None, getattr(exc, "signum", signal.SIGINT)) from None
    if as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=2, ensure_ascii=False))
        return
    skipped = summary.skipped_by_reason()
    why = "; ".join(f"{n} {reason}" for reason, n in sorted(skipped.items(), key=lambda kv: -kv[1]))
    changed = (f"{summary.updated} updated, {summary.removed} removed, " if summary.updated or summary.removed
               else "")
    typer.echo(f"{summary.collection}: {summary.imported} imported, {changed}{summary.unchanged} already imported "
               f"({summary.shards_unchanged} of {summary.shards} shards unchanged), {len(summary.skipped)} skipped"
               f"{' (' + why + ')' if why else ''}; {summary.total} images in total ({summary.seconds:.1f} s)")
    if summary.url_rows:
        typer.echo(f"  {summary.url_rows} rows have a URL and no local file: results show the URL; the server "
                   "does not fetch them")
    if summary.missing_files:
        typer.echo(f"  {summary.missing_files} rows name files that are not on this machine: searchable, shown "
                   "once the files are there (relative paths are taken from --root, default the current folder)")
    if summary.normalized:
        typer.echo(f"  {summary.normalized} vectors scaled to unit length (--normalize)")
    for row in summary.skipped[:20]:
        what = f" ({row.what})" if row.what else ""
        typer.echo(f"  skipped shard {row.shard} row {row.row}{what}: {row.reason}", err=True)
    if len(summary.skipped) > 20:
        typer.echo(f"  … and {len(summary.skipped) - 20} more skipped rows (--json lists them all)", err=True)


@app.command("export-embeddings")
def export_embeddings(
    folder: Path = typer.Argument(..., help="A folder without embeddings yet (new, empty, or holding other files, which are left alone) to write img_emb/, metadata/ and clipsearch.json into"),
    collection: str = typer.Option("default", "--collection", "-c", help="Collection name"),
    shard_size: int = typer.Option(1_000_000, "--shard-size", min=1, help="Rows per img_emb_N.npy / metadata_N.parquet"),
    fp16: bool = typer.Option(False, "--fp16", help="Write float16 vectors, as clip inference does (default float32: "
                                                    "exact)"),
    index_dir: Optional[Path] = typer.Option(None, "--index-dir", help=_INDEX_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON"),
) -> None:
    """Write a collection's embeddings in clip-retrieval's layout (readable by its tools and by import-embeddings)."""
    from ..store.collection import Collection
    from ..store.interchange_export import export_embeddings as run_export

    with Collection.open(collection, index_dir) as target:
        show_bar = not as_json and sys.stderr.isatty()
        with _progress_bar(show_bar, "exporting", "rows/s", ",.0f") as progress:
            summary = run_export(target, folder, shard_size=shard_size, fp16=fp16, progress=progress)
    if as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=2, ensure_ascii=False))
        return
    typer.echo(f"{summary.collection}: {summary.rows} rows in {summary.shards} shard(s) of {summary.dim}-dim "
               f"{summary.dtype} vectors written to {summary.folder} ({summary.seconds:.1f} s)")
