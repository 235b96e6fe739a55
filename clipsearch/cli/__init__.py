"""The `clipsearch` command line.

Each sub-module registers its commands on `app`; library errors (`ClipsearchError`) become a short
message on stderr and exit code 1 — no traceback. An argument that is not valid UTF-8 (Python hands such
bytes over as lone surrogates) is refused up front with exit code 2, unless it names an existing file or
folder, which is passed on as it is.
"""

from __future__ import annotations

import errno
import os
import sys

import typer

from ..errors import ClipsearchError
from ..text import is_utf8

app = typer.Typer(
    name="clipsearch",
    help="Find photos by describing them: index folders, search by text or example, classify.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(wanted: bool) -> None:
    if wanted:
        from .. import __version__

        typer.echo(f"clipsearch {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit")) -> None:
    """Options that come before the command."""


def _register() -> None:
    # Imported for their side effect of adding commands to `app`. Each module keeps heavy imports
    # (onnxruntime, faiss, torch) inside its command functions so `clipsearch --help` stays fast.
    from . import index_cmds, model_cmds, search_cmds, serve_cmds, train_cmds, watch_cmds  # noqa: F401
    from . import library_cmds  # noqa: F401
    from . import interchange_cmds  # noqa: F401
    from . import helper_cmds  # noqa: F401


_register()


def _undecodable_argument(argv: list[str]) -> str | None:
    """The first argument that is not valid UTF-8 and does not name an existing file, else None."""
    for arg in argv:
        if not is_utf8(arg) and not os.path.lexists(arg):  # a real file name in its own bytes is passed on
            return arg
    return None


def _shown(arg: str) -> str:
    """The argument's bytes with the undecodable ones as \\xNN."""
    return os.fsencode(arg).decode("utf-8", "backslashreplace")


def _utf8_error(what: str) -> None:
    typer.secho(f"error: {what} is not valid UTF-8", err=True, fg="red")
    typer.echo("Give text arguments in UTF-8 (check the terminal's or script's encoding, e.g. LANG=C.UTF-8).",
               err=True)
    sys.exit(2)


# Commands that hold nothing needing an orderly interpreter shutdown once they return (their files are closed,
# their writes committed): the process ends right after flushing its output, skipping the 50-150 ms Python spends
# tearing down onnxruntime, FAISS and numpy. `index` closes its collection and stops its decoder processes
# before it returns; not with the options that leave something running behind it: --ray (Ray's atexit shutdown)
# and --watch (runs until stopped). Not for commands that may leave helpers behind (uvicorn).
_QUICK_EXIT_COMMANDS = frozenset({"search", "index"})
_QUICK_EXIT_EXCLUDED_OPTIONS = {"index": ("--ray", "--watch")}


def quick_exit_allowed(argv: list[str]) -> bool:
    """Whether the command line `argv` (without the program name) may end with `os._exit` once it returns."""
    if not argv or argv[0] not in _QUICK_EXIT_COMMANDS:
        return False
    excluded = _QUICK_EXIT_EXCLUDED_OPTIONS.get(argv[0], ())
    # Any word that is, or starts as, an excluded option (also a path after "--"; then the exit is only slower).
    return not any(arg == option or arg.startswith(option + "=") for arg in argv[1:] for option in excluded)


def main() -> None:
    if quick_exit_allowed(sys.argv[1:]):
        try:
            code = _run_to_exit_code()
        except KeyboardInterrupt:  # a second Ctrl-C while the first one's stop was being reported
            code = 130
        _quick_exit(code)
    _run()


def _run_to_exit_code() -> int:
    try:
        _run()
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return int(exc.code or 0)
        print(exc.code, file=sys.stderr)
        return 1
    return 0


def _quick_exit(code: int) -> None:
    import signal

    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # exiting already: another Ctrl-C must not print a traceback
    except ValueError:  # not the main thread
        pass
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):  # a reader that went away (`| head`), or a closed stream
        code = code or 1
    os._exit(code)


def _run() -> None:
    bad = _undecodable_argument(sys.argv[1:])
    if bad is not None:
        _utf8_error(f"argument '{_shown(bad)}'")
    try:
        app()
    except ClipsearchError as exc:
        typer.secho(f"error: {exc.message}", err=True, fg="red")
        if exc.hint:
            typer.echo(exc.hint, err=True)
        sys.exit(1)
    except Exception as exc:
        if not isinstance(exc, UnicodeEncodeError) or "surrogate" not in str(exc):
            if _out_of_space(exc):
                typer.secho(f"error: no space left on the device ({exc})", err=True, fg="red")
                typer.echo("Free some space and run the same command again: what was committed is kept, and an "
                           "indexing run goes on from there.", err=True)
                sys.exit(1)
            raise
        # A non-UTF-8 file name that exists reached a place that needs text (a stored path, say).
        shown = _shown(exc.object) if isinstance(exc.object, str) else repr(exc.object)
        _utf8_error(f"'{shown}'")


def _out_of_space(exc: BaseException) -> bool:
    """True when `exc`, or an exception it arose from, is a full disk (an OSError, SQLite's or FAISS's words)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        text = str(exc)
        if "database or disk is full" in text or "No space left on device" in text:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


if __name__ == "__main__":
    main()
