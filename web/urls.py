"""Links the API hands out: app-relative (they survive a reverse proxy's prefix via root_path)."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import Request

from .security import HOST_SCOPE_KEY, host_name


def image_urls(request: Request, image_id: int, collection: str) -> tuple[str, str]:
    """(thumbnail_url, image_url) for an image; `?collection=` only for a non-default collection."""
    root = request.scope.get("root_path", "").rstrip("/")
    default = request.app.state.web.settings.collection
    suffix = "" if collection == default else f"?collection={quote(collection)}"
    base = f"{root}/api/images/{image_id}"
    return f"{base}/thumbnail{suffix}", f"{base}/file{suffix}"


def absolute(request: Request, path: str) -> str:
    """An absolute URL for clients that need one (clip-back's front end shows `url` as is).

    The host is the one `security.HostCheck` accepted (a loopback name or a configured --allowed-host), never
    the raw Host header; without that check in front (an app mounted some other way) it is 'localhost'."""
    host = request.scope.get(HOST_SCOPE_KEY)
    if not host or host_name(host) not in request.app.state.web.allowed_hosts:
        port = (request.scope.get("server") or (None, None))[1]
        host = f"localhost:{port}" if port else "localhost"
    scheme = "https" if request.scope.get("scheme") == "https" else "http"
    return f"{scheme}://{host}{path}"
