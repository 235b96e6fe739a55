"""The `clipsearch` command line.

Each sub-module registers its commands on `app`; library errors (`ClipsearchError`) become a short
message on stderr and exit code 1 — no traceback.
"""

from __future__ import annotations

import sys

import typer

from ..errors import ClipsearchError

app = typer.Typer(
    name="clipsearch",
    help="Find photos by describing them: index folders, search by text or example, classify.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # Imported for their side effect of adding commands to `app`. Each module keeps heavy imports
    # (onnxruntime, faiss, torch) inside its command functions so `clipsearch --help` stays fast.
    from . import index_cmds, model_cmds, search_cmds, serve_cmds, train_cmds  # noqa: F401


_register()


def main() -> None:
    try:
        app()
    except ClipsearchError as exc:
        typer.secho(f"error: {exc.message}", err=True, fg="red")
        if exc.hint:
            typer.echo(exc.hint, err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
