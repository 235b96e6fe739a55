"""`clipsearch search` and `clipsearch classify`."""

from __future__ import annotations

import csv
import json
import os
import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import app
from .display import shown_path

_INDEX_DIR_HELP = "Folder holding the collections (default: $CLIPSEARCH_HOME/collections or the per-user data dir)"


@app.command()
def search(
    text: Optional[str] = typer.Argument(None, help='What to look for, e.g. "a dog on a beach" (weight prefix: "^2:dog"; a leading ^ as text: "\\^")'),
    image: Optional[Path] = typer.Option(None, "--image", "-i", help="An image file as the query"),
    like: Optional[int] = typer.Option(None, "--like", help="The id of an indexed image as the query"),
    and_: List[str] = typer.Option([], "--and", "-a", help="Add a text to the query (repeatable; weight prefix: '^0.5:sunset')"),
    not_: List[str] = typer.Option([], "--not", "-n", help="Subtract a text from the query (repeatable; weight prefix: '^2:people' subtracts twice as much)"),
    k: int = typer.Option(10, "-k", "--top", min=1, max=10_000, help="How many results"),
    collection: str = typer.Option("default", "--collection", "-c", help="Collection name"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model spec (default: the collection's model)"),
    include_self: bool = typer.Option(False, "--include-self", help="Also return the query image itself"),
    index_dir: Optional[Path] = typer.Option(None, "--index-dir", help=_INDEX_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help='Print [{"id", "path", "score", "width", "height", "missing"}] '
                                 'best first ("missing": the file is no longer on disk; with --rerank also "itc_score" '
                                 'and "match", null for hits that were not re-scored)'),
    rerank: bool = typer.Option(False, "--rerank", help="Re-score the top hits with the model's ITM head (text queries; "
                                "models with one: the bundled emoji-mini, or `clipsearch models export-blip`)"),
    rerank_k: int = typer.Option(32, "--rerank-k", min=1, max=256, help="How many top hits --rerank re-scores"),
    min_match: Optional[float] = typer.Option(None, "--min-match", min=0.0, max=1.0,
                                              help="With --rerank: keep only hits whose ITM match probability is at "
                                                   "least this (0-1); an error without --rerank"),
    in_: List[str] = typer.Option([], "--in", help="Only photos in this folder, at any depth (repeatable: any of them)"),
    after: Optional[str] = typer.Option(None, "--after", help="Only photos taken on or after this date (2024-05-01 or "
                                        "2024-05-01T14:30; EXIF capture time, else the file's modification time)"),
    before: Optional[str] = typer.Option(None, "--before", help="Only photos taken before this date (exclusive; same "
                                         "dates as --after)"),
    orientation: Optional[str] = typer.Option(None, "--orientation", help="landscape, portrait or square (sides "
                                              "within 1%)"),
    min_size: Optional[str] = typer.Option(None, "--min-size", help="Only photos at least this big, WxH in pixels "
                                           "(e.g. 1920x1080)"),
    preview: bool = typer.Option(False, "--preview", help="Show a thumbnail under each result in terminals that "
                                 "display images (kitty, iTerm2, sixel); the plain listing elsewhere or into a pipe"),
    preview_protocol: Optional[str] = typer.Option(None, "--preview-protocol", metavar="PROTOCOL",
                                                   help="auto, kitty, iterm2, sixel or none: draw with this (implies "
                                                        "--preview), even into a pipe; default: $CLIPSEARCH_PREVIEW "
                                                        "in a terminal, else detected"),
    preview_size: int = typer.Option(160, "--preview-size", min=16, max=2048,
                                     help="Thumbnail height in pixels for --preview"),
    paths_only: bool = typer.Option(False, "--paths-only", help="Print only the paths, one per line, best first"),
    null: bool = typer.Option(False, "-0", "--null", help="Print only the paths, each ended by a NUL byte "
                              "(for xargs -0)"),
    copy_to: Optional[Path] = typer.Option(None, "--copy-to", metavar="DIR", help="Also copy the results into "
                                           "DIR (created) as 01-name.jpg, 02-..., never overwriting"),
    link_to: Optional[Path] = typer.Option(None, "--link-to", metavar="DIR", help="Like --copy-to, with "
                                           "symbolic links to the files (absolute targets)"),
    nprobe: Optional[int] = typer.Option(None, "--nprobe", min=1, max=65_536, help="Inverted lists an IVF index "
                                         "probes (default: the value tuned when it was built; see `stats`)"),
) -> None:
    """Find indexed photos by text, by an example image, or by an indexed image.

    Filters (--in, --after, --before, --orientation, --min-size) apply inside the search: k results whenever k
    photos pass them. With --after/--before each result says which date it was compared by (EXIF "taken" time,
    or the file's "mtime" for photos without one).

    With --rerank the score of a re-scored hit is the ITM match logit plus λ times the ITC cosine (its plain
    score; λ is the bundle's itc_weight, 100 for emoji-mini).

    --copy-to/--link-to DIR gather the results as <rank>-<name> (01-beach.jpg ...; "01-beach (2).jpg" when the
    name is taken): missing files are reported on stderr and skipped, and the exit code is 1 only when none of the
    results could be gathered. They combine with --json (each row then has "gathered": the new path or null),
    --paths-only, -0 and --preview; messages go to stderr."""
    from ..filters import SearchFilter
    from ..query import SearchQuery
    from ..resident import client as resident

    outputs = [name for name, on in (("--json", as_json), ("--paths-only", paths_only), ("-0/--null", null),
                                     ("--preview", preview or preview_protocol is not None)) if on]
    if paths_only and null:
        outputs.remove("--paths-only")  # -0 is --paths-only with NUL endings
    if len(outputs) > 1:
        raise typer.BadParameter("cannot be used together (each chooses what stdout shows)",
                                 param_hint=" / ".join(outputs))
    if copy_to is not None and link_to is not None:
        raise typer.BadParameter("cannot be used together (choose one way to gather the results)",
                                 param_hint="--copy-to / --link-to")
    drawing = "none"  # the image protocol of --preview, chosen before anything is loaded
    if preview or preview_protocol is not None:
        from .preview import PreviewError, check_protocol, choose

        if preview_protocol is not None:
            try:
                check_protocol(preview_protocol)
            except PreviewError as exc:
                raise typer.BadParameter(f"{exc.message} ({exc.hint})", param_hint="--preview-protocol") from exc
        choice = choose(preview_protocol, os.environ, sys.stdout.isatty())  # a bad $CLIPSEARCH_PREVIEW: exit 1
        drawing = choice.protocol
        if drawing == "none" and choice.reason != "stdout is not a terminal" and preview_protocol is None:
            typer.echo(f"note: no thumbnails ({choice.reason}); set CLIPSEARCH_PREVIEW=kitty, iterm2 or sixel, or "
                       f"pass --preview-protocol, if this terminal shows images", err=True)
    gather_to, gather_mode = (copy_to, "copy") if copy_to is not None else (link_to, "link")
    if gather_to is not None:
        from .handoff import check_folder

        check_folder(gather_to, f"--{gather_mode}-to")

    search_filter = SearchFilter.parse(folders=_as_given_here(in_), after=after, before=before,
                                       orientation=orientation, min_size=min_size, base=os.getcwd())
    query = SearchQuery.build(text=text, image=image, like=like, and_texts=and_, not_texts=not_, k=k,
                              include_query_images=include_self, rerank=rerank, rerank_k=rerank_k, min_match=min_match,
                              filter=search_filter, nprobe=nprobe)
    query.validate()  # before loading anything
    _note_text_that_names_an_image(text)
    helped = resident.eligible(query, model)
    answer = resident.ask(collection, index_dir, query) if helped else None
    if answer is not None:
        hits, reason = answer.hits, answer.empty
    else:
        from ..search import Searcher

        with Searcher.open(collection, index_dir, model) as searcher:
            hits = searcher.search(query)
            reason = searcher.why_empty(query.filter) if not hits else None
    if reason is not None:
        typer.echo(f"no results: {reason.message}", err=True)
        if reason.hint:
            typer.echo(reason.hint, err=True)
    from ..paths import missing_local_files

    missing = missing_local_files([h.path for h in hits])  # one stat per result, for the --json rows and the note
    gone = [h.path for h in hits if h.path in missing]
    report = None
    if gather_to is not None and hits:
        from .handoff import gather

        report = gather([h.path for h in hits], gather_to, gather_mode)
    dated = search_filter.uses_date
    if as_json:
        targets = report.targets() if report is not None else {}
        rows = []
        for rank, h in enumerate(hits, 1):
            row = {"id": h.id, "path": h.path, "score": h.score, "width": h.width, "height": h.height,
                   "missing": h.path in missing}
            if rerank:
                row.update(itc_score=h.itc_score, match=h.match)
            if dated:
                row.update(date=h.date, date_source=h.date_source)
            if report is not None:
                row.update(gathered=targets.get(rank))
            rows.append(row)
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
    elif paths_only or null:
        end = b"\0" if null else b"\n"
        out = sys.stdout.buffer
        if not null and sys.stdout.isatty():
            # On a terminal a name's control characters would act (retitle, clear, split a line): escaped, as `ls`
            # does; piped, the paths are exact (and -0 always is).
            out.write(b"".join(os.fsencode(shown_path(h.path)) + end for h in hits))
        else:
            out.write(b"".join(os.fsencode(h.path) + end for h in hits))
        out.flush()
    else:
        _print_hits(hits, rerank, dated, drawing, preview_size)
    if helped and answer is None:
        resident.start(collection, index_dir)  # answers the next search from memory
    if report is not None:
        _report_gathered(report, len(hits))  # names each file it could not gather
    else:
        _warn_missing(gone, len(hits), collection)


def _as_given_here(folders: List[str]) -> List[str]:
    """--in folders, a relative one also as seen from the shell's own working folder ($PWD) when that is the same
    folder reached through a symbolic link: stored paths keep the link the folder was indexed through, while
    os.getcwd() names the physical folder, so either may be the one they start with."""
    logical = os.environ.get("PWD", "")
    here = os.getcwd()
    try:
        linked = bool(logical) and os.path.isabs(logical) and logical != here and os.path.samefile(logical, here)
    except OSError:
        linked = False
    expanded: List[str] = []
    for folder in folders:
        expanded.append(folder)
        if linked and folder.strip() and not os.path.isabs(folder.strip()):
            expanded.append(os.path.join(logical, folder.strip()))
    return expanded


def _print_hits(hits: list, rerank: bool, dated: bool, protocol: str, size: int) -> None:
    """The text listing (rank, score, [match,] [date,] path), with a thumbnail under each line in `protocol` (an
    image protocol of preview.py, or "none"). Control characters in paths are shown escaped (display.py)."""
    for rank, hit in enumerate(hits, 1):
        date = f"{_DATE_WORDS.get(hit.date_source or '', '?')} {hit.date}  " if dated else ""
        if rerank:
            match = "       -" if hit.match is None else f"p={hit.match:.4f}"
            typer.echo(f"{rank:>3}  {hit.score:.4f}  {match}  {date}{shown_path(hit.path)}")
        else:
            typer.echo(f"{rank:>3}  {hit.score:.4f}  {date}{shown_path(hit.path)}")
        if protocol != "none":
            from .preview import PreviewError, render

            try:
                picture = render(hit.path, protocol, size)
            except PreviewError as exc:
                typer.echo(f"     (no preview: {exc.message})")
                continue
            sys.stdout.write(picture + "\n")
            sys.stdout.flush()


def _note_text_that_names_an_image(text: Optional[str]) -> None:
    """rclip takes a query that is a file or URL as an image; here it is searched as words. Say so on stderr when the
    text names a file that is there, or is a URL, so that `clipsearch search photo.jpg` does not look broken."""
    if not text:
        return
    if os.path.isfile(os.path.expanduser(text)):
        typer.echo(f"note: searching the words of {text!r}; to search by that image use --image {shlex.quote(text)}",
                   err=True)
    elif text.lower().startswith(("http://", "https://")):
        typer.echo("note: searching the words of the URL; to search by an image, download it and use --image FILE",
                   err=True)


def _warn_missing(gone: List[str], found: int, collection: str) -> None:
    """A note on stderr when results name files that are gone (`gone`, of `found` results): the listing itself stays
    as it was (scripts read it), and --json rows say it per row ("missing": true)."""
    if not gone:
        return
    first = shown_path(gone[0])
    more = f" and {len(gone) - 1} more" if len(gone) > 1 else ""
    typer.echo(f"note: {len(gone)} of the {found} results {'is' if len(gone) == 1 else 'are'} no longer on disk "
               f"(moved or deleted since indexing): {first}{more}", err=True)
    typer.echo(f"Run `clipsearch index` on their folders (collection {collection}) to bring it up to date.", err=True)


def _report_gathered(report, found: int) -> None:
    """Say on stderr what --copy-to/--link-to did; HandoffError (exit 1) if not one result could be gathered."""
    from .handoff import HandoffError

    verb = "copied" if report.mode == "copy" else "linked"
    for skipped in report.skipped:
        typer.echo(f"skipped {skipped.source}: {skipped.reason}", err=True)
    if not report.gathered:
        raise HandoffError(f"none of the {found} results could be {verb} into {report.folder}",
                           hint="their files are gone or unreadable; `clipsearch index` the folders again to "
                                "update the collection")
    typer.echo(f"{verb} {len(report.gathered)} of {found} results into {report.folder}", err=True)


# How text output names the date a date filter compared: the EXIF capture time or the file's modification time.
_DATE_WORDS = {"taken_at": "taken", "mtime": "mtime"}


def _image_files(targets: List[Path]) -> tuple[list[str], list[tuple[str, str]]]:
    from ..indexer.walk import walk

    walked = walk([str(t) for t in targets])
    return [f.path for f in walked.files], list(walked.problems)


@app.command()
def classify(
    targets: List[Path] = typer.Argument(..., help="Image files or folders (recursively)"),
    labels: Optional[str] = typer.Option(None, "--labels", "-l", help='Comma-separated labels, e.g. "cat,dog,car"'),
    labels_file: Optional[Path] = typer.Option(None, "--labels-file", help="File of labels: one or more per line, separated by commas; a # starts a comment"),
    template: List[str] = typer.Option([], "--template", help="Prompt template: each {} becomes the label, other braces stay as written (repeatable; default: CLIP's ensemble)"),
    collection: Optional[str] = typer.Option(None, "--collection", "-c", help="Use this collection's model (and its stored vectors of unchanged files)"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model spec"),
    index_dir: Optional[Path] = typer.Option(None, "--index-dir", help=_INDEX_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="JSON instead of CSV"),
    per_image: bool = typer.Option(False, "--rows", help="Always the per-image form (CSV rows path,label,"
                                   "probability,...; a JSON list), also for one image file: for scripts whose "
                                   "glob may match a single file"),
) -> None:
    """Zero-shot classification: probabilities per label. One image file gives label,probability rows (CSV) or one
    object (JSON); folders or several files give one row per image (CSV) or a list (JSON), as --rows always does."""
    from ..classify import DEFAULT_TEMPLATES, Classifier, parse_labels
    from ..indexer.pipeline import Mapper
    from ..indexer.reader import ParallelReader, ReadTask
    from ..model.resolve import load_model
    from ..store.collection import Collection
    from .index_cmds import _progress_bar

    label_list = parse_labels(labels, labels_file)
    files, problems = _image_files(targets)
    if not files and not problems:
        raise typer.BadParameter("no image files found", param_hint="TARGETS")
    single = not per_image and len(files) == 1 and len(targets) == 1 and targets[0].is_file()
    clashing = [label for label in label_list if label in ("path", "label", "probability")]
    if clashing and not as_json and not single:  # the per-image CSV's header would name two columns alike
        raise typer.BadParameter(f"label {clashing[0]!r} is also a column of the CSV output (path, label, "
                                 "probability, then one per label): use --json, or another word", param_hint="--labels")
    store, dim, spec = None, 0, model
    opened = None
    if collection:
        opened = Collection.open(collection, index_dir)
        remembered = opened.require_model()
        spec = model or remembered.spec
        if model is None or spec == remembered.spec:
            store, dim = opened.store, remembered.embed_dim
    clip = load_model(spec)
    if store is not None and clip.model_id != opened.require_model().model_id:
        store = None
    classifier = Classifier(clip, label_list, tuple(template) or DEFAULT_TEMPLATES)
    rows: list[dict] = []
    errors: list[dict] = [{"path": p, "error": r} for p, r in problems]
    pending: list[tuple[str, object]] = []

    def flush() -> None:
        if not pending:
            return
        vectors = mapper.encode([pixels for _, pixels in pending])
        for (path, _), scores in zip(pending, classifier.classify_vectors(vectors)):
            rows.append({"path": path, "scores": scores})
        pending.clear()

    def stored_vector(path: str):
        """The collection's vector of `path` when the file is unchanged since it was indexed, else None."""
        record = store.find_by_path(path) if store is not None else None
        if record is None:
            return None
        try:
            stat = os.stat(path)
        except OSError:  # gone since the walk: reported as the file is read
            return None
        if record.size != stat.st_size or record.mtime_ns != stat.st_mtime_ns:
            return None
        return store.vector(record.id, dim)

    to_read: list[ReadTask] = []
    for path in files:
        vector = stored_vector(path)
        if vector is not None:
            rows.append({"path": path, "scores": classifier.classify_vector(vector)})
            continue
        try:
            stat = os.stat(path)
        except OSError as exc:
            errors.append({"path": path, "error": exc.strerror or str(exc)})
            continue
        to_read.append(ReadTask(path, stat.st_size, stat.st_mtime_ns))
    # The files are decoded by the indexer's reader, as an indexing run decodes them: in decoder processes, one per
    # core, so a folder goes at the speed of every core and a file that crashes its decoder is only skipped. A bar on
    # stderr when it is a terminal (stdout carries the CSV/JSON, often into a file).
    mapper = Mapper(clip)
    with _progress_bar(len(to_read) > 1 and sys.stderr.isatty(), "classifying") as progress, \
            ParallelReader(clip.preprocess, (), workers=None if len(to_read) > 1 else 0) as reader:
        for done, result in enumerate(reader.read(to_read), 1):
            if result.error is not None:
                errors.append({"path": result.task.path, "error": result.error})
            else:
                pending.append((result.task.path, result.pixels))
                if len(pending) >= 32:
                    flush()
            if progress and (done % 8 == 0 or done == len(to_read)):
                if done == len(to_read):
                    flush()
                progress(done, len(to_read))
        flush()
    if opened is not None:
        opened.close()
    order = {path: i for i, path in enumerate(files)}
    rows.sort(key=lambda r: order[r["path"]])

    if as_json:
        out = [{"path": r["path"], "label": r["scores"][0].label, "probability": round(r["scores"][0].probability, 6),
                "probabilities": {s.label: round(s.probability, 6) for s in r["scores"]}} for r in rows]
        if single and out:
            payload: object = out[0]
        else:
            payload = out
        typer.echo(json.dumps(payload, indent=2, ensure_ascii=False))
    else:
        if single and len(rows) == 1:
            writer = csv.writer(sys.stdout, lineterminator="\n")
            writer.writerow(["label", "probability"])
            for score in rows[0]["scores"]:
                writer.writerow([score.label, f"{score.probability:.6f}"])
        else:
            writer = csv.writer(sys.stdout, lineterminator="\n")
            writer.writerow(["path", "label", "probability", *label_list])
            # Unix line ends (csv's default \r\n left a \r on every last field for cut, awk, sort); on a terminal a
            # name's control characters are escaped as in the listings (into a pipe the CSV keeps names exact).
            show = shown_path if sys.stdout.isatty() else str
            for r in rows:
                by_label = {s.label: s.probability for s in r["scores"]}
                writer.writerow([show(r["path"]), r["scores"][0].label, f"{r['scores'][0].probability:.6f}",
                                 *(f"{by_label[label]:.6f}" for label in label_list)])
    for e in errors:
        typer.echo(f"skipped {shown_path(e['path'])}: {e['error']}", err=True)
    if errors and not rows:
        raise typer.Exit(1)
