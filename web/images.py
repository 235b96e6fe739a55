"""Serving indexed images by id: the original file and a ≤ N px JPEG thumbnail cached on disk.

Bytes are only ever read from the path the database holds for an id; clients never name a path.
Thumbnails live in `<collection folder>/thumbnails/`, named by id and content hash so that a
re-indexed (changed) file gets a new thumbnail.
"""

from __future__ import annotations

import mimetypes
import os
import tempfile
from pathlib import Path

from fastapi.responses import FileResponse

from clipsearch.errors import ImageError
from clipsearch.preprocess import open_image
from clipsearch.store import ImageRecord

from .errors import ApiError

THUMBNAIL_DIR = "thumbnails"
THUMBNAIL_QUALITY = 85
CACHE_HEADERS = {"Cache-Control": "private, max-age=3600"}


def original_file(record: ImageRecord) -> FileResponse:
    path = Path(record.path)
    if not path.is_file():
        raise ApiError(404, f"image {record.id} is no longer on disk", "Re-run `clipsearch index` on its folder.")
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return FileResponse(path, media_type=media_type, headers=CACHE_HEADERS,
                        content_disposition_type="inline", filename=path.name)


class ThumbnailCache:
    """Makes thumbnails on first request and keeps them under `folder`."""

    def __init__(self, folder: Path, max_px: int, max_pixels: int) -> None:
        self.folder = Path(folder)
        self.max_px = max_px
        self.max_pixels = max_pixels

    def path_for(self, record: ImageRecord) -> Path:
        return self.folder / f"{record.id}-{record.content_hash[:16]}-{self.max_px}.jpg"

    def get(self, record: ImageRecord) -> Path:
        cached = self.path_for(record)
        if cached.is_file():
            return cached
        if not Path(record.path).is_file():
            raise ApiError(404, f"image {record.id} is no longer on disk", "Re-run `clipsearch index` on its folder.")
        try:
            image = open_image(record.path, draft_size=(self.max_px, self.max_px), max_pixels=self.max_pixels)
        except ImageError as exc:
            raise ApiError(404, f"image {record.id} can no longer be read: {exc.message}") from exc
        image.thumbnail((self.max_px, self.max_px))
        self.folder.mkdir(parents=True, exist_ok=True)
        # Write to a temporary file and rename, so concurrent requests never see half a thumbnail.
        handle, temporary = tempfile.mkstemp(dir=self.folder, prefix=".tmp-", suffix=".jpg")
        try:
            with os.fdopen(handle, "wb") as out:
                image.save(out, format="JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
            os.replace(temporary, cached)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return cached

    def response(self, record: ImageRecord) -> FileResponse:
        return FileResponse(self.get(record), media_type="image/jpeg", headers=CACHE_HEADERS)
