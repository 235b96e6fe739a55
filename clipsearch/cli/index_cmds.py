"""`clipsearch index`, `clipsearch check`, `clipsearch stats`."""

from __future__ import annotations

import json
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import typer
import typer.core

from . import app

# Per encoder call. With one call per core on one intra-op thread each, 8 images cost less CPU per image than 32
# (ViT-B-32 int8 on these 2 cores: benchmarks/RESULTS.md, indexing); small models barely notice.
DEFAULT_CLI_BATCH = 8
_INDEX_DIR_HELP = "Folder holding the collections (default: $CLIPSEARCH_HOME/collections or the per-user data dir)"


@contextmanager
def _progress_bar(enabled: bool, label: str = "indexing", unit: str = "img/s", rate_format: str = ".1f") -> Iterator:
    """A rich progress bar (count, rate, ETA) on a terminal; no callback otherwise."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:{rate_format}} {unit}" if speed else f"– {unit}")

    progress = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), RateColumn(), TextColumn("ETA"),
                        TimeRemainingColumn(), console=Console(stderr=True), transient=False)
    with progress:
        task = progress.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


class _Stopped(KeyboardInterrupt):
    """SIGTERM/SIGHUP turned into the same unwinding as Ctrl-C (a KeyboardInterrupt), remembering the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    """While indexing, SIGTERM and SIGHUP stop the run the way Ctrl-C does: the current batch is the last,
    the FAISS index is brought in line with what SQLite committed, decoder processes are stopped."""

    def stop(signum: int, _frame: object) -> None:
        raise _Stopped(signum)

    with _signal_handler((signal.SIGTERM, signal.SIGHUP), stop):
        yield


@contextmanager
def _signal_handler(signums, handler) -> Iterator[None]:
    """`handler` for `signums` while the block runs, the previous handlers after it. Outside the main thread (an
    embedding program) nothing is installed: its handlers are left alone."""
    previous = {}
    try:
        for signum in signums:
            previous[signum] = signal.signal(signum, handler)
    except ValueError:
        pass
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _interrupted(name: str, count: int | None, signum: int, rebuild: bool = False) -> "typer.Exit":
    """The line an interrupted run prints, and its exit status (128 + signal: 130 Ctrl-C, 143 SIGTERM). An
    interrupted --rebuild keeps serving the generation it was replacing, and starting it again starts over."""
    if rebuild:
        kept = f" ({count} images)" if count is not None else ""
        line = (f"{name}: rebuild interrupted; searches still use the index it was replacing{kept}; "
                "run index --rebuild again to start it over")
    else:
        so_far = f" ({count} images indexed so far)" if count is not None else ""
        line = f"{name}: interrupted; run again to finish{so_far}"
    try:
        typer.echo(line, err=True)
    except OSError:  # SIGHUP: the terminal may be gone
        pass
    return typer.Exit(128 + signum)


class _IndexCommand(typer.core.TyperCommand):
    """`index` with `--ray [ADDRESS]`: Typer options cannot take an optional value, so a `--ray` not followed by an
    address (nothing, an option, or an existing file or folder) is read as `--ray=local` before parsing."""

    def parse_args(self, ctx, args: List[str]) -> List[str]:
        return super().parse_args(ctx, _ray_value_optional(args))


def _ray_value_optional(args: List[str]) -> List[str]:
    import os

    out: List[str] = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        following = args[i + 1] if i + 1 < len(args) else None
        if arg == "--ray" and (following is None or following.startswith("-") or os.path.lexists(following)):
            arg = "--ray=local"
        out.append(arg)
    return out


@app.command(cls=_IndexCommand)
def index(
    paths: List[Path] = typer.Argument(..., help="Folders or image files to index (recursively)"),
    collection: str = typer.Option("default", "--collection", "-c", help="Collection name"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model spec (default: the collection's model, else the default model)"),
    batch_size: int = typer.Option(DEFAULT_CLI_BATCH, "--batch-size", min=1, max=4096,
                                    help="Images per encoder call (one call per encoder thread at a time)"),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Decoding processes (default: one per core; 0 = none)"),
    exclude: List[str] = typer.Option([], "--exclude", help="Glob of files or folders to leave out (repeatable)"),
    include_hidden: bool = typer.Option(False, "--include-hidden", help="Also walk hidden and tool folders (.git, node_modules, ...)"),
    rebuild: bool = typer.Option(False, "--rebuild", help="Re-embed everything (PATHS and every folder indexed before) into a new generation (needed to switch models); searches use the old one until it is complete"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Encoder threads (default: all cores)"),
    index_dir: Optional[Path] = typer.Option(None, "--index-dir", help=_INDEX_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON"),
    tokens: Optional[bool] = typer.Option(
        None, "--tokens/--no-tokens",
        help="Store the ITM image tokens that `search --rerank` reads (models with an ITM head; on by default when "
             "they take at most 64 KB per image). --tokens also computes them for images indexed without them; "
             "--no-tokens drops them. The choice is remembered"),
    forget_missing: bool = typer.Option(
        False, "--forget-missing",
        help="Remove the images of a PATH that no longer exists (a deleted folder or file), and with --rebuild leave "
             "out what it cannot embed again (folders indexed before that are gone, rows brought in by "
             "import-embeddings). Without it they are kept: an unplugged disk or share is never forgotten unasked"),
    watch: bool = typer.Option(False, "--watch", help="Keep watching PATHS afterwards and index what changes "
                                                      "(as `clipsearch watch` with its default --debounce and --rescan-interval, which "
                                                      "that command sets; --json prints one line per run)"),
    max_index_memory: Optional[str] = typer.Option(
        None, "--max-index-memory", metavar="SIZE",
        help="Memory the vector index may keep resident, e.g. 2GB, 500MB (default: 25% of RAM; remembered). Past "
             "50k photos it picks the index: IVF-PQ codes, smaller codes with OPQ, or inverted lists on disk"),
    ray: Optional[str] = typer.Option(
        None, "--ray", metavar="[ADDRESS]",
        help="Read, decode and embed on Ray Data (needs the ray extra): --ray alone starts a local Ray instance; "
             "--ray ray://HEAD:10001 (or HEAD:6379, auto) uses an existing cluster. The value after --ray is its "
             "address unless it starts with - or names an existing file. Shards in clip-retrieval's layout are "
             "merged into the collection"),
    ray_concurrency: Optional[int] = typer.Option(
        None, "--ray-concurrency", min=1, help="With --ray: encoder actors (default: one per CPU; per GPU with --ray-gpus)"),
    ray_cpus: float = typer.Option(1.0, "--ray-cpus", min=0.0, help="With --ray: CPUs per encoder actor"),
    ray_gpus: float = typer.Option(0.0, "--ray-gpus", min=0.0, help="With --ray: GPUs per encoder actor (CUDA)"),
    ray_shards: Optional[Path] = typer.Option(
        None, "--ray-shards", help="With --ray: keep the shards (img_emb/, metadata/) in this new folder"),
) -> None:
    """Index photos: new files are embedded, changed ones re-embedded, vanished ones removed."""
    budget = _parse_size(max_index_memory, "--max-index-memory") if max_index_memory is not None else None
    ray_options = _ray_options(ray, ray_concurrency, ray_cpus, ray_gpus, ray_shards, watch)
    if watch:
        if forget_missing:  # a watcher's rescans never forget what is gone (an unplugged disk must not cost the index)
            raise typer.BadParameter("applies to one indexing run, not to --watch", param_hint="--forget-missing")
        from .watch_cmds import run_watch

        if budget is not None:
            from ..store.collection import Collection

            with Collection.create(collection, index_dir) as target:
                if target.exists:
                    target.set_index_memory_budget(budget)

        run_watch(paths, collection=collection, model=model, batch_size=batch_size, workers=workers,
                  exclude=exclude, include_hidden=include_hidden, rebuild=rebuild, threads=threads,
                  index_dir=index_dir, as_json=as_json, tokens=tokens)
        return
    roots = [_index_path(p, ray_options) for p in paths]  # a URL without --ray is refused before anything starts
    from ..indexer.reader import StartedDecoders

    # A local run's decoder processes start before the heavy imports and the walk: their interpreters boot on the
    # other core meanwhile (in traces with 12 MP photos on 2 cores the first batch was encoded 0.1-0.2 s sooner; the
    # end-to-end benchmark, benchmarks/index_throughput.py, does not resolve a gain that small from its noise). The run
    # adopts them; the block stops any it did not (nothing needed reading). --ray and --workers 0 start none.
    # They share one core token per encoder lane with the encoder calls (indexer/cores.py).
    lanes = encoder_lanes(threads) if ray_options is None else 1
    with _stop_on_signals(), StartedDecoders(workers if ray_options is None else 0, core_tokens=lanes) as decoders:
        from ..store.collection import Collection
        from ..indexer.pipeline import IndexOptions
        from ..indexer.runner import LocalRunner

        try:
            target = Collection.create(collection, index_dir)
            with target:
                try:
                    if budget is not None:
                        target.set_index_memory_budget(budget)
                    clip = _collection_model(target, model, 1 if ray_options is None else threads, as_json, tokens,
                                             rebuild)
                    options = IndexOptions(batch_size=batch_size, workers=workers, exclude=tuple(exclude),
                                           include_hidden=include_hidden, rebuild=rebuild, tokens=tokens,
                                           encoder_lanes=lanes, share_cores=ray_options is None,
                                           forget_missing=forget_missing)
                    show_bar = not as_json and sys.stderr.isatty()
                    with _progress_bar(show_bar) as progress:
                        runner = (LocalRunner(options, decoders) if ray_options is None
                                  else _ray_runner(options, ray_options))
                        summary = runner.run(target, clip, roots, progress)
                except KeyboardInterrupt as exc:
                    try:
                        count = target.store.count()
                    except Exception:  # noqa: BLE001 - the message must be printed whatever the store says
                        count = None
                    raise _interrupted(collection, count, getattr(exc, "signum", signal.SIGINT), rebuild) from None
        except KeyboardInterrupt as exc:  # before the collection was open
            raise _interrupted(collection, None, getattr(exc, "signum", signal.SIGINT)) from None
    if as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=2, ensure_ascii=False))
        return
    _print_summary(summary, tokens_line=summary.total > 0)
    if summary.total == 0:
        from .display import shown_path

        why = ("none of the files found could be read (above)" if summary.skipped else
               "no image files were found in " + ", ".join(shown_path(str(p)) for p in paths))
        typer.echo(f"note: collection {collection} holds no images: {why}", err=True)


def _ray_options(ray: Optional[str], concurrency: Optional[int], cpus: float, gpus: float,
                 shards: Optional[Path], watch: bool):
    """The `RayOptions` of --ray and its companions (None without --ray; Ray itself is imported only by the run)."""
    if ray is None:
        if concurrency is not None or shards is not None or cpus != 1.0 or gpus != 0.0:
            raise typer.BadParameter("--ray-concurrency, --ray-cpus, --ray-gpus and --ray-shards go with --ray",
                                     param_hint="--ray")
        return None
    if watch:
        raise typer.BadParameter("watch mode indexes locally: leave out --ray or --watch", param_hint="--ray")
    from ..indexer.ray_runner import RayError, RayOptions, parse_address

    try:
        address = parse_address(ray)
    except RayError as exc:
        raise typer.BadParameter(str(exc), param_hint="--ray") from None
    return RayOptions(address=address, concurrency=concurrency, num_cpus=cpus, num_gpus=gpus, shards_dir=shards)


def _ray_runner(options, ray_options):
    from ..indexer.ray_runner import RayRunner

    return RayRunner(options, ray_options)


def _index_path(path: Path, ray_options) -> str:
    """A PATHS argument as given to the runner: with --ray an fsspec URL (s3://...) is kept as typed (Path() would
    fold its // into one, which is put back here)."""
    import os
    import re

    text = str(path)
    match = re.fullmatch(r"([A-Za-z][A-Za-z0-9+.-]+):/+(.*)", text, flags=re.DOTALL)
    if match is None or os.path.exists(text):
        return text
    scheme, rest = match.groups()
    if scheme == "file":
        return "/" + rest
    if ray_options is None:  # else the walk said "no such file or folder" of the URL joined to the current folder
        raise typer.BadParameter(f"{scheme}://{rest} is a URL: without --ray, index reads local folders and files; "
                                 "URLs are read by `index --ray` (pip install 'clipsearch[ray]')", param_hint="PATHS")
    return f"{scheme}://{rest}"


def _parse_size(text: str, option: str) -> int:
    """'2GB', '500MB', '1.5G', '4096' (bytes) -> bytes (powers of 1000; KiB/MiB/GiB/TiB: of 1024)."""
    import re

    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not match or float(match.group(1)) <= 0:
        raise typer.BadParameter(f"{text!r} is not a size such as 2GB, 500MB or 1.5GiB", param_hint=option)
    base = 1024 if match.group(3) else 1000
    return int(float(match.group(1)) * base ** " kmgt".index(match.group(2) or " "))


def _print_summary(summary, prefix: str = "", list_skipped: bool = True, tokens_line: bool = True) -> None:
    """The human-readable lines of an `IndexSummary` (stdout; skipped files on stderr)."""
    done = summary.embedded + summary.reused
    rate = f", {done / summary.seconds:.1f} img/s" if done and summary.seconds else ""  # none: no rate to speak of
    moved = f"{summary.moved} moved, " if summary.moved else ""  # renamed: the same image under a new path
    typer.echo(f"{prefix}{summary.collection}: {summary.added} added, {summary.updated} updated, {summary.reused} "
               f"reused, {moved}{summary.removed} removed, {summary.unchanged} unchanged, {len(summary.skipped)} skipped; "
               f"{summary.total} images in total ({summary.seconds:.1f} s{rate})")
    from .display import shown_path

    if summary.vanished_roots:
        typer.echo(f"  gone from disk, so their images left the collection: "
                   f"{', '.join(shown_path(r) for r in summary.vanished_roots)}")
    if summary.rebuilt_roots:
        typer.echo(f"  --rebuild also re-embedded the folders indexed before: "
                   f"{', '.join(shown_path(r) for r in summary.rebuilt_roots)}")
    if summary.tokens and (tokens_line or summary.tokens_added):
        added = f", {summary.tokens_added} added to indexed images" if summary.tokens_added else ""
        typer.echo(f"  ITM image tokens: {summary.tokens}, {_format_bytes(summary.token_bytes_per_image)}/image{added}")
    if list_skipped:
        for skipped in summary.skipped:
            typer.echo(f"  skipped {shown_path(skipped.path)}: {skipped.reason}", err=True)


def _format_bytes(count: int) -> str:
    from ..store.tokens import format_bytes

    return format_bytes(count)


def encoder_lanes(threads: Optional[int]) -> int:
    """`--threads N` (default: all cores) runs N encoder batches at once, each call on one intra-op thread
    (indexer/lanes.py): the model is opened with one thread per call."""
    return threads or os.cpu_count() or 1


def _collection_model(target, model: Optional[str], threads: Optional[int], as_json: bool,
                      tokens: Optional[bool], rebuild: bool = False):
    """The model an indexing run of `target` uses (--model, else the collection's own, else the default, with the
    one-line notice when that is the bundled emoji model), after saying what happens to ITM tokens. A collection
    whose database cannot be read has no model to remember: only --rebuild with --model indexes it again."""
    from ..errors import UnreadableStoreError
    from ..model.resolve import default_model_notice, load_model

    try:
        remembered = target.model
    except UnreadableStoreError:
        if not (rebuild and model):
            raise
        remembered = None
    spec = model or (remembered.spec if remembered else None)
    clip = (remembered.load(target.name, threads=threads) if model is None and remembered is not None
            else load_model(spec, threads=threads))
    notice = default_model_notice(spec)
    if notice and not as_json:
        typer.echo(notice, err=True)
    _announce_tokens(target, clip, tokens)
    return clip


def _announce_tokens(target, clip, requested: Optional[bool]) -> None:
    """Say on stderr what storing ITM image tokens costs when asked for with --tokens, and why a model with an
    ITM head stores none when its tokens are too big to store by default. A model without a head says nothing."""
    from ..errors import CollectionError

    try:
        choice = target.choose_tokens(clip, requested)
    except CollectionError:
        return  # the run reports it
    if choice.codec is not None and requested:
        typer.echo(f"{target.name}: storing ITM image tokens ({choice.codec.describe()})", err=True)
    elif choice.codec is None and getattr(clip, "has_itm", False) and requested is None and target.tokens_setting != "off":
        typer.echo(f"{target.name}: not storing ITM image tokens: {choice.reason} (search --rerank needs them)",
                   err=True)


@app.command()
def check(
    collection: str = typer.Option("default", "--collection", "-c", help="Collection name"),
    index_dir: Optional[Path] = typer.Option(None, "--index-dir", help=_INDEX_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="The result as one JSON object (ok, problems)"),
) -> None:
    """Verify that SQLite and FAISS agree (counts, ids, model); exit 1 with the details when they do not."""
    import sqlite3

    from ..store.collection import Collection

    with Collection.open(collection, index_dir) as target:
        report = target.check()
        try:
            tokens_stored = target.store.count_tokens()
        except sqlite3.DatabaseError:  # a damaged database: the report says so
            tokens_stored = 0
        codec = target.token_codec
    token_bytes = codec.bytes_per_image if codec is not None and tokens_stored else None
    if as_json:
        typer.echo(json.dumps({"collection": report.name, "ok": report.ok, "images": report.images,
                               "index_count": report.index_count, "tokens_stored": tokens_stored,
                               "token_bytes_per_image": token_bytes, "problems": report.problems}, indent=2))
    elif report.ok:
        tokens_note = f", {tokens_stored} with ITM tokens ({token_bytes} bytes/image)" if token_bytes else ""
        typer.echo(f"{report.name}: ok ({report.images} images, index holds {report.index_count}{tokens_note})")
    else:
        typer.secho(f"{report.name}: {len(report.problems)} problem(s)", err=True, fg="red")
        for problem in report.problems:
            typer.echo(f"  - {problem}", err=True)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def stats(
    collection: str = typer.Option("default", "--collection", "-c", help="Collection name"),
    index_dir: Optional[Path] = typer.Option(None, "--index-dir", help=_INDEX_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="The figures as one JSON object"),
) -> None:
    """Counts, model, index type and bytes on disk of a collection."""
    from dataclasses import asdict

    from ..store.collection import Collection

    with Collection.open(collection, index_dir) as target:
        info = target.stats()
        running = not info.index_fresh and target.being_indexed()
    if as_json:
        typer.echo(json.dumps(asdict(info), indent=2, ensure_ascii=False))
        return
    model = info.model
    typer.echo(f"collection   {info.name}  ({info.folder})")
    # The stored skips: files that could not be used, not read again until they change. What a walk cannot stat
    # (dangling links, FIFOs, loops) is listed by each run, never stored.
    typer.echo(f"images       {info.images}  (+{info.skipped} unusable files remembered, skipped until they change)")
    typer.echo(f"model        {model.model_id if model else '-'}")
    typer.echo(f"index        {info.index_kind or '-'}, {info.index_count if info.index_count is not None else '-'} vectors"
               f"{'' if info.index_fresh else '  (behind: an indexing run is writing)' if running else '  (stale: run clipsearch index again)'}")
    if info.index_factory:
        typer.echo(f"  structure  {info.index_factory}{'  (inverted lists on disk)' if info.index_on_disk else ''}")
    if info.index_nprobe is not None:
        recall = (f", recall@10 {info.index_recall:.3f} on held-out queries (target {info.index_target_recall:.2f})"
                  if info.index_recall is not None else "")
        typer.echo(f"  search     nprobe {info.index_nprobe} of {info.index_nlist} lists, refine x{info.index_refine_factor}"
                   f"{recall}")
    if info.index_budget_bytes:
        typer.echo(f"  memory     ~{_format_bytes(info.index_resident_bytes or 0)} resident, budget "
                   f"{_format_bytes(info.index_budget_bytes)}")
    if info.index_trained_on:
        typer.echo(f"  trained    at {info.index_trained_on} vectors{', ' + info.index_trained_at if info.index_trained_at else ''}"
                   f"{' (' + info.index_train_reason + ')' if info.index_train_reason else ''}")
    for reason in info.index_reasons:
        typer.echo(f"  why        {reason}")
    if info.tokens_stored or info.tokens == "on":
        t, d = info.token_shape or (0, 0)
        typer.echo(f"tokens       {info.tokens_stored} images, {info.token_storage} {t}x{d}, "
                   f"{info.token_bytes_per_image} bytes/image ({_format_bytes(info.tokens_stored * (info.token_bytes_per_image or 0))})")
    elif info.tokens == "off":
        typer.echo("tokens       off (index --tokens stores them for search --rerank)")
    typer.echo(f"disk         {info.bytes_on_disk / 1e6:.2f} MB")
