"""`clipsearch serve`: the REST API, the clip-back endpoints and the search page under uvicorn."""

from __future__ import annotations

import gc
import ipaddress
from pathlib import Path
from typing import List, Optional

import typer

from . import app

_INDEX_DIR_HELP = "Folder holding the collections (default: $CLIPSEARCH_HOME/collections or the per-user data dir)"
_WILDCARDS = {"0.0.0.0", "::", ""}


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1 (brackets allowed)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: loopback only)"),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="Port to listen on"),
    collection: str = typer.Option("default", "--collection", "-c", help="Collection served by default"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="CLIPSEARCH_API_KEY", show_envvar=True,
                                          help="Require this key on every API route (Bearer or X-API-Key)"),
    index_dir: Optional[Path] = typer.Option(None, "--index-dir", help=_INDEX_DIR_HELP),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model spec (default: the collection's model)"),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", min=0.01, help="Largest accepted upload"),
    allow_remote_images: bool = typer.Option(False, "--allow-remote-images",
                                             help="Let clip-back's image_url make this server fetch URLs"),
    cors_origin: List[str] = typer.Option([], "--cors-origin", help="Allow cross-origin calls from this origin (repeatable)"),
    model_threads: Optional[int] = typer.Option(None, "--model-threads", min=1,
                                                help="onnxruntime threads per model call (default: 1; requests run "
                                                     "side by side instead)"),
    workers: Optional[int] = typer.Option(None, "--workers", min=1,
                                          help="Threads for blocking work: search, SQLite, image decoding, "
                                               "thumbnails (default: 2 per core, at least 4)"),
    queue_limit: int = typer.Option(64, "--queue-limit", min=0,
                                    help="Requests that may wait for a worker; more get 503 with Retry-After"),
    # 8 = web.batching.DEFAULT_MAX_BATCH, not imported here: the CLI starts without numpy (a test keeps them equal)
    max_batch: int = typer.Option(8, "--max-batch", min=1,
                                  help="Most texts of concurrent queries embedded in one encoder call"),
    batch_lanes: Optional[int] = typer.Option(None, "--batch-lanes", min=1,
                                              help="Encoder calls at once (default: one per core, at least 2)"),
    batch_window_ms: float = typer.Option(2.0, "--batch-window-ms", min=0.0, max=1000.0,
                                          help="How long a text query waits for others to share its encoder call"),
    root_path: str = typer.Option("", "--root-path", help="URL prefix when behind a reverse proxy"),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level"),
    allowed_host: List[str] = typer.Option(
        [], "--allowed-host",
        help="A Host name clients use to reach the server (repeatable; any port). Loopback names and --host "
             "are always allowed; requests naming any other host get 400 (protects against DNS rebinding)"),
    insecure: bool = typer.Option(False, "--insecure",
                                  help="Allow a non-loopback --host without an API key (anyone who can reach it "
                                       "can search and download your photos)"),
) -> None:
    """Serve search over HTTP: REST API (/docs), clip-back endpoints and the page at /."""
    import uvicorn

    from ..web import ServerSettings, create_app

    key = api_key if api_key and api_key.strip() else None
    if not is_loopback(host) and key is None and not insecure:
        typer.secho(f"error: refusing to listen on {host} without an API key: anyone who can reach it could "
                    "search and download your photos.\n"
                    "Set --api-key KEY (or CLIPSEARCH_API_KEY), or pass --insecure if that is really what you "
                    "want. See SECURITY.md for running behind a reverse proxy.", err=True, fg="red")
        raise typer.Exit(2)
    hosts = tuple(allowed_host) + ((host,) if host not in _WILDCARDS else ())
    try:
        settings = ServerSettings(collection=collection, index_dir=index_dir, model=model, api_key=api_key,
                                  max_upload_bytes=int(max_upload_mb * 1024 * 1024),
                                  allow_remote_images=allow_remote_images, cors_origins=tuple(cors_origin),
                                  model_threads=model_threads, allowed_hosts=hosts, workers=workers,
                                  queue_limit=queue_limit, max_batch=max_batch, batch_window_ms=batch_window_ms,
                                  batch_lanes=batch_lanes)
    except ValueError as exc:
        typer.secho(f"error: {exc}", err=True, fg="red")
        raise typer.Exit(2) from exc
    _check_port_free(host, port)  # before the collection and model load: uvicorn would only say so after them
    web_app = create_app(settings)
    state = web_app.state.web
    state.open_default()  # a missing or empty collection is a clear error now, not on the first query
    state.warm_up()
    if not is_loopback(host) and settings.api_key is None:
        typer.secho(f"warning: listening on {host} without an API key (--insecure); anyone who can reach it can "
                    "search and download your photos", err=True, fg="yellow")
    if host in _WILDCARDS and not allowed_host:
        typer.secho("note: only loopback Host names are answered; add --allowed-host NAME for each name or "
                    "address clients use to reach this server", err=True, fg="yellow")
    typer.echo(f"clipsearch: serving collection {collection!r} on http://{_url_host(host)}:{port}/ "
               f"(API docs at /docs{', API key required' if settings.api_key else ''})", err=True)
    # What start-up made (modules, routes, schemas, the loaded model and index) lives as long as the server:
    # frozen, the garbage collector's full passes stop walking it (one unrecorded A/B of benchmarks/serve_load.py,
    # 20 s each: 301 QPS, p99 155 ms frozen against 269 QPS, p99 179 ms not; a single run on a noisy machine).
    gc.collect()
    gc.freeze()
    uvicorn.run(web_app, host=host, port=port, root_path=root_path, log_level=log_level,
                proxy_headers=False, server_header=False)


def _check_port_free(host: str, port: int) -> None:
    """Exit 1 with a one-line error when `host`:`port` cannot be listened on (in use, no such address), as uvicorn
    would bind it (SO_REUSEADDR, so a port in TIME_WAIT is not "in use")."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        typer.secho(f"error: cannot listen on {host}: {exc.strerror or exc}", err=True, fg="red")
        raise typer.Exit(1) from None
    for family, kind, proto, _, address in infos:  # uvicorn listens on every address the name gives
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        except OSError as exc:
            why = ("is in use (another server?)" if exc.errno == errno.EADDRINUSE else
                   f"cannot be used ({exc.strerror or exc})")
            typer.secho(f"error: port {port} on {host} {why}", err=True, fg="red")
            typer.echo("Choose another with --port N, or another --host.", err=True)
            raise typer.Exit(1) from None


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
