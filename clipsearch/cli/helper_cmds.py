"""`clipsearch helper status|stop`: the resident search helper of this environment (see clipsearch/resident)."""

from __future__ import annotations

import json

import typer

from . import app

helper_app = typer.Typer(help="The resident search helper that answers `clipsearch search` from memory.",
                         no_args_is_help=True)
app.add_typer(helper_app, name="helper")


@helper_app.command("status")
def status(as_json: bool = typer.Option(False, "--json", help='Print {"running", "socket", "pid", "uptime_seconds", '
                                        '"idle_seconds", "idle_limit_seconds", "resident_bytes", "collections"}')) -> None:
    """Whether a helper runs for these settings, since when, how big, with which collections loaded."""
    from ..resident import client, protocol

    where = protocol.address()
    reply = client.request("status") if where is not None else None
    running = bool(reply and reply.get("ok"))
    if as_json:
        row = {"running": running, "socket": str(where.socket_path) if where else None}
        if running:
            row.update({k: v for k, v in reply.items() if k != "ok"})
        typer.echo(json.dumps(row, indent=2))
        return
    if where is None:
        typer.echo("off: CLIPSEARCH_HELPER=0, or no private folder for its socket (see README, Searching from the shell)")
        return
    if not running:
        typer.echo(f"not running (socket {where.socket_path}); the next `clipsearch search` starts one")
    else:
        size = reply.get("resident_bytes")
        typer.echo(f"running: pid {reply['pid']}, up {reply['uptime_seconds']:.0f} s, idle {reply['idle_seconds']:.0f} s "
                   f"(exits after {reply['idle_limit_seconds']:.0f} s idle)"
                   + (f", {size / 2**20:.0f} MiB resident" if size else ""))
        typer.echo(f"socket: {where.socket_path}")
        for loaded in reply.get("collections", []):
            typer.echo(f"loaded: {loaded['collection']}" + (f" in {loaded['index_dir']}" if loaded.get("index_dir") else ""))
    others = _other_sockets(where)
    if others:  # helpers of other clipsearch code (an upgrade, another checkout) or settings; idle ones exit
        typer.echo(f"{len(others)} other helper socket{'s' if len(others) != 1 else ''} of yours (other clipsearch code "
                   "or settings): `clipsearch helper stop --all` stops them too")


def _other_sockets(where) -> list:
    return sorted(path for path in where.socket_path.parent.glob("*.sock") if path != where.socket_path)


@helper_app.command("stop")
def stop(every: bool = typer.Option(False, "--all", help="Also the helpers of other clipsearch code or settings "
                                    "(their sockets are removed: a helper exits when its socket goes)")) -> None:
    """Stop this environment's helper (the next search starts a new one unless CLIPSEARCH_HELPER=0)."""
    from ..resident import client, protocol

    reply = client.request("stop")
    if reply and reply.get("ok"):
        typer.echo(f"stopped the helper (pid {reply['pid']})")
    else:
        typer.echo("no helper running")
    where = protocol.address()
    if every and where is not None:
        others = _other_sockets(where)
        for path in others:
            path.unlink(missing_ok=True)
        if others:
            typer.echo(f"removed {len(others)} other helper socket{'s' if len(others) != 1 else ''}: "
                       "those helpers exit within a second")
