"""`clipsearch watch` (and `clipsearch index --watch`): index folders, then keep the collection current with
filesystem events until stopped."""

from __future__ import annotations

import json
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import typer

from . import app
from .index_cmds import (DEFAULT_CLI_BATCH, _INDEX_DIR_HELP, _Stopped, _collection_model, _interrupted, _print_summary,
                         _signal_handler, _stop_on_signals, encoder_lanes)

_STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@app.command()
def watch(
    paths: List[Path] = typer.Argument(..., help="Folders or image files to index and keep watching"),
    collection: str = typer.Option("default", "--collection", "-c", help="Collection name"),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model spec (default: the collection's model, else the default model)"),
    rescan_interval: float = typer.Option(
        300.0, "--rescan-interval", min=0,
        help="Seconds between full incremental runs over PATHS that catch what events missed (0: never)"),
    debounce: float = typer.Option(1.0, "--debounce", min=0.05, max=60,
                                   help="Seconds without changes before a batch is indexed (at most 5x this after "
                                        "its first change)"),
    batch_size: int = typer.Option(DEFAULT_CLI_BATCH, "--batch-size", min=1, max=4096,
                                    help="Images per encoder call (one call per encoder thread at a time)"),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Decoding processes (default: one per core; 0 = none)"),
    exclude: List[str] = typer.Option([], "--exclude", help="Glob of files or folders to leave out (repeatable)"),
    include_hidden: bool = typer.Option(False, "--include-hidden", help="Also walk hidden and tool folders (.git, node_modules, ...)"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Encoder threads (default: all cores)"),
    index_dir: Optional[Path] = typer.Option(None, "--index-dir", help=_INDEX_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print each run's summary as one line of JSON"),
    tokens: Optional[bool] = typer.Option(
        None, "--tokens/--no-tokens", help="Store ITM image tokens for `search --rerank` (as `clipsearch index`)"),
) -> None:
    """Index PATHS, then keep the collection current as files are added, changed, renamed or deleted, until
    Ctrl-C or SIGTERM (exit 0; during the first full run: exit 130/143, as an interrupted index). A running
    `clipsearch serve` sees the changes without a restart."""
    run_watch(paths, collection=collection, model=model, batch_size=batch_size, workers=workers, exclude=exclude,
              include_hidden=include_hidden, rebuild=False, threads=threads, index_dir=index_dir, as_json=as_json,
              tokens=tokens, rescan_interval=rescan_interval, debounce=debounce)


def run_watch(paths: Sequence[Path], *, collection: str, model: Optional[str], batch_size: int,
              workers: Optional[int], exclude: Sequence[str], include_hidden: bool, rebuild: bool,
              threads: Optional[int], index_dir: Optional[Path], as_json: bool, tokens: Optional[bool],
              rescan_interval: float = 300.0, debounce: float = 1.0) -> None:
    """The watch loop behind `watch` and `index --watch`. Stopping during the first full run is an interrupted
    `index` (exit 130/143); once watching, the first Ctrl-C/SIGTERM/SIGHUP lets the batch in progress finish
    (a periodic rescan is abandoned at once, safely) and exits 0; a second one abandons the batch too."""
    from ..indexer.pipeline import IndexOptions
    from ..indexer.watch import Watcher, WatchOptions
    from ..store.collection import Collection

    roots = [str(p) for p in paths]
    watcher: Watcher | None = None
    with _stop_on_signals():
        try:
            target = Collection.create(collection, index_dir)
            with target:
                try:
                    lanes = encoder_lanes(threads)
                    clip = _collection_model(target, model, 1, as_json, tokens, rebuild)
                    options = IndexOptions(batch_size=batch_size, workers=workers, exclude=tuple(exclude),
                                           include_hidden=include_hidden, rebuild=rebuild, tokens=tokens,
                                           encoder_lanes=lanes, share_cores=True)
                    watcher = Watcher(target, clip, roots, options,
                                      WatchOptions(debounce=debounce, max_delay=5 * debounce,
                                                   rescan_interval=rescan_interval),
                                      report=lambda report: _print_report(report, len(roots), rescan_interval, as_json),
                                      failed=_print_failure)
                    with _stop_gracefully(watcher):
                        watcher.run()
                except KeyboardInterrupt as exc:
                    signum = getattr(exc, "signum", signal.SIGINT)
                    if watcher is None or not watcher.ready.is_set():  # the first run did not finish
                        try:
                            count = target.store.count()
                        except Exception:  # noqa: BLE001 - the message must be printed whatever the store says
                            count = None
                        raise _interrupted(collection, count, signum) from None
                    _say(f"{collection}: stopped watching; the run in progress was abandoned (the index is "
                         f"consistent; the next start catches up)")
                    return
        except KeyboardInterrupt as exc:  # before the collection was open
            raise _interrupted(collection, None, getattr(exc, "signum", signal.SIGINT)) from None
    _say(f"{collection}: stopped watching")


@contextmanager
def _stop_gracefully(watcher) -> Iterator[None]:
    """While watching, a stop signal asks the watcher to stop after the batch in progress. During a full run (the
    first, or a rescan), or when a stop was asked for already, it unwinds the run as Ctrl-C stops `index`."""

    def on_signal(signum: int, _frame: object) -> None:
        if not watcher.ready.is_set() or watcher.phase == "rescan" or watcher.stopping:
            raise _Stopped(signum)
        watcher.stop()

    with _signal_handler(_STOP_SIGNALS, on_signal):
        yield


def _say(line: str) -> None:
    try:
        typer.echo(line, err=True)
    except OSError:  # SIGHUP: the terminal may be gone
        pass


def _print_report(report, root_count: int, rescan_interval: float, as_json: bool) -> None:
    summary = report.summary
    if as_json:
        typer.echo(json.dumps({"run": report.kind, "changed_paths": report.paths, **summary.to_dict()},
                              ensure_ascii=False))
    elif report.kind == "initial":
        _print_summary(summary)
    elif (report.kind == "changes" or summary.added or summary.updated or summary.reused or summary.moved
          or summary.removed):
        what = f"{report.paths} changed path{'s' * (report.paths != 1)}" if report.kind == "changes" else "rescan"
        _print_summary(summary, prefix=f"{time.strftime('%H:%M:%S')} {what}: ", list_skipped=report.kind == "changes",
                       tokens_line=False)
    if report.kind == "initial":
        every = f"rescan every {rescan_interval:g} s" if rescan_interval > 0 else "no rescans"
        _say(f"{summary.collection}: watching {root_count} path{'s' * (root_count != 1)} for changes ({every}; "
             f"Ctrl-C stops)")


def _print_failure(error) -> None:
    _say(f"error: {error.message} (will try again)")
    if error.hint:
        _say(error.hint)
