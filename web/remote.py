"""Fetching a query image from a URL — only when the operator enabled it (`allow_remote_images`)."""

from __future__ import annotations

import urllib.error
import urllib.request
from urllib.parse import urlsplit

from .errors import ApiError
from .uploads import too_large


def fetch_image(url: str, limit: int, timeout: float) -> bytes:
    """GET an http(s) URL, reading at most `limit` bytes (413 beyond); other schemes are refused (400)."""
    if urlsplit(url).scheme not in ("http", "https"):
        raise ApiError(400, "image_url must be an http or https URL")
    request = urllib.request.Request(url, headers={"User-Agent": "clipsearch"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(limit + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ApiError(400, f"could not fetch image_url: {exc}") from exc
    if len(data) > limit:
        raise too_large(limit)
    return data
