"""`clipsearch duplicates`: groups of near-identical images in a collection, from its stored vectors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from . import app

_INDEX_DIR_HELP = "Folder holding the collections (default: $CLIPSEARCH_HOME/collections or the per-user data dir)"


def _note_model_not_for_photos(searcher, report) -> None:
    """A model made for emoji and icons (the bundled default) puts different photographs in one group: say so on
    stderr before a listing that invites deleting files."""
    from ..duplicates import collection_bundle
    from ..model.resolve import RECOMMENDED_HUB, suits_photos

    bundle = collection_bundle(searcher)
    if report.groups and bundle is not None and suits_photos(bundle) is False:
        typer.echo(f"note: {bundle.name} is not made for photographs: among photos its groups can join different "
                   f"pictures, so look at a group before deleting anything (for photos: clipsearch index FOLDER "
                   f"--collection {searcher.collection.name} --rebuild --model {RECOMMENDED_HUB})", err=True)


@app.command()
def duplicates(
    collection: str = typer.Option("default", "--collection", "-c", help="Collection name"),
    threshold: Optional[float] = typer.Option(None, "--threshold", "-t",
                                              help="Cosine similarity at which two images count as copies (0-1; "
                                                   "default: the model's own, from its model.json)"),
    neighbours: int = typer.Option(16, "--neighbours", min=1, max=256,
                                   help="Nearest images each image is compared with"),
    index_dir: Optional[Path] = typer.Option(None, "--index-dir", help=_INDEX_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help='Print {"collection", "threshold", "images", "groups": '
                                 '[{"count", "keep", "images": [{"id", "path", "bytes", "width", "height", '
                                 '"similarity", "keep"}]}], ...}'),
) -> None:
    """Group near-identical images (resized, re-encoded, slightly cropped or colour-shifted copies) and suggest
    which one of each group to keep: the most pixels, then the largest file. Reads no image file: the index's
    own vectors are compared."""
    from ..duplicates import check_threshold, find_duplicates
    from ..search import Searcher
    from .display import shown_path

    if threshold is not None:
        check_threshold(threshold)  # before opening anything
    with Searcher.open(collection, index_dir) as searcher:
        report = find_duplicates(searcher, threshold, neighbours)
        _note_model_not_for_photos(searcher, report)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
        return
    how = report.threshold.describe(report.model_name)
    if not report.groups:
        noun = "image" if report.images == 1 else "images"
        typer.echo(f"{report.collection}: no near-duplicates among {report.images:,} {noun} ({how})")
        return
    typer.echo(f"{report.collection}: {len(report.groups):,} group{'s' if len(report.groups) != 1 else ''} of "
               f"near-duplicates, {report.redundant:,} redundant image{'s' if report.redundant != 1 else ''} among "
               f"{report.images:,} ({how}); keep = suggested copy (most pixels, then largest file)")
    for number, group in enumerate(report.groups, 1):
        typer.echo(f"\ngroup {number} ({len(group.images)} images)")
        for image in group.images:
            dims = f"{image.width}×{image.height}" if image.width and image.height else "?×?"
            typer.echo(f"  {'keep' if image.keep else '    '}  {dims:>11}  {image.bytes:>12,} bytes  "
                       f"{image.similarity:.4f}  {shown_path(image.path)}")
