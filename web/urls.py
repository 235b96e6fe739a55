"""Links the API hands out: app-relative (they survive a reverse proxy's prefix via root_path)."""

from __future__ import annotations

from urllib.parse import quote

from fastapi import Request


def image_urls(request: Request, image_id: int, collection: str) -> tuple[str, str]:
    """(thumbnail_url, image_url) for an image; `?collection=` only for a non-default collection."""
    root = request.scope.get("root_path", "").rstrip("/")
    default = request.app.state.web.settings.collection
    suffix = "" if collection == default else f"?collection={quote(collection)}"
    base = f"{root}/api/images/{image_id}"
    return f"{base}/thumbnail{suffix}", f"{base}/file{suffix}"


def absolute(request: Request, path: str) -> str:
    """An absolute URL for clients that need one (clip-back's front end shows `url` as is)."""
    return f"{request.url.scheme}://{request.url.netloc}{path}"
