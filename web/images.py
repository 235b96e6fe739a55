"""Serving indexed images by id: the original file and a ≤ N px JPEG thumbnail cached on disk.

Bytes are only ever read from the path the database holds for an id; clients never name a path. And they
are only served while that path still holds the image that was indexed: the file is opened once, and the
open file itself (not the path again) is checked — a regular file, the size and mtime_ns stored when it
was indexed, really located inside one of the collection's indexed folders (a symlink re-pointed outside
them, e.g. to /etc/passwd, is refused), and recognised as an image — then streamed from that very file
descriptor, so that nothing swapped in between the checks and the read can be served.

Thumbnails live in `<collection folder>/thumbnails/`, named by id and content hash so that a re-indexed
(changed) file gets a new thumbnail.
"""

from __future__ import annotations

import email.utils
import errno
import mimetypes
import os
import stat
import tempfile
import warnings
from pathlib import Path
from typing import BinaryIO, Sequence
from urllib.parse import quote

import anyio
from fastapi.responses import FileResponse
from PIL import Image, UnidentifiedImageError
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from clipsearch.errors import ImageError
from clipsearch.model.preprocess import open_image
from clipsearch.paths import is_url_path
from clipsearch.store.database import ImageRecord

from .errors import ApiError

THUMBNAIL_DIR = "thumbnails"
THUMBNAIL_QUALITY = 85
CACHE_HEADERS = {"Cache-Control": "private, max-age=3600"}
_CHUNK = 256 * 1024
_PROC_FD = "/proc/self/fd"


def _gone(record: ImageRecord, why: str) -> ApiError:
    return ApiError(404, f"image {record.id} is no longer on disk{why}", "Re-run `clipsearch index` on its folder.")


def _changed(record: ImageRecord, why: str) -> ApiError:
    return ApiError(410, f"image {record.id} changed on disk since it was indexed ({why})",
                    "Re-run `clipsearch index` on its folder.")


def _inside(path: str, roots: Sequence[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def _opened_location(fd: int, path: str) -> str | None:
    """Where the open file really is. On Linux /proc names the opened inode's path (no race with the path on
    disk); elsewhere resolve the path and accept it only if it is the very file we hold open."""
    if os.path.isdir(_PROC_FD):
        try:
            return os.readlink(f"{_PROC_FD}/{fd}")
        except OSError:
            pass
    resolved = os.path.realpath(path)
    try:
        disk, held = os.stat(resolved), os.fstat(fd)
    except OSError:
        return None
    return resolved if (disk.st_dev, disk.st_ino) == (held.st_dev, held.st_ino) else None


def open_indexed(record: ImageRecord, roots: Sequence[str]) -> BinaryIO:
    """Open the file of `record` only if it is still the indexed image (see the module docstring).

    404 when it is gone or resolves outside every indexed root (nothing is said about where it points),
    410 when it changed (size, mtime or no longer an image). The returned file is positioned at 0."""
    # Resolve first and never open anything outside the roots (opening some devices has side effects); then
    # open the resolved path with O_NOFOLLOW, so a last component swapped for a symlink meanwhile fails (ELOOP),
    # and check where the open file really is (a folder swapped meanwhile is caught there).
    if is_url_path(record.path):  # an imported row whose image is a URL: never fetched, never served
        raise ApiError(404, f"image {record.id} was imported as a URL ({record.path[:200]}): this server serves "
                            "files on its own disk only", "Open the URL itself.")
    resolved = os.path.realpath(record.path)
    if not _inside(resolved, roots):
        if not os.path.lexists(record.path):
            raise _gone(record, "")
        raise _gone(record, " inside the indexed folders")
    flags = (os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
             | getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(resolved, flags)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            raise _gone(record, "") from exc
        raise _gone(record, f" or cannot be read ({exc.strerror or exc})") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _changed(record, "not a regular file")
        location = _opened_location(fd, resolved)
        if location is None or not _inside(location, roots):
            raise _gone(record, " inside the indexed folders")
        if info.st_size != record.size or info.st_mtime_ns != record.mtime_ns:
            raise _changed(record, "size or modification time differ")
        os.set_blocking(fd, True)
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    try:
        _identify(handle)
    except BaseException:
        handle.close()
        raise
    handle.seek(0)
    return handle


def _identify(handle: BinaryIO) -> None:
    """Pillow recognises the header as an image (without decoding pixels), or 410."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(handle):
                pass  # the header parsed
    except Image.DecompressionBombError:
        return  # an image all right; whether it may be decoded is the thumbnail's business
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ApiError(410, "the file on disk is no longer an image",
                       "Re-run `clipsearch index` on its folder.") from exc


class OpenFileResponse(Response):
    """Streams an already opened (and checked) file: exactly `size` bytes from `start`, then closes it (a 206 of one
    byte range when `whole` is the file's size and the part is less)."""

    def __init__(self, handle: BinaryIO, size: int, media_type: str, headers: dict[str, str], start: int = 0,
                 whole: int | None = None) -> None:
        part = whole is not None and (start, size) != (0, whole)
        extra = {"content-range": f"bytes {start}-{start + size - 1}/{whole}"} if part else {}
        super().__init__(content=None, status_code=206 if part else 200, media_type=media_type,
                         headers={**headers, **extra, "accept-ranges": "bytes", "content-length": str(size)})
        self.handle = handle
        self.size = size
        if start:
            handle.seek(start)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            if scope.get("method") == "HEAD":
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            remaining = self.size
            while remaining > 0:
                chunk = await anyio.to_thread.run_sync(self.handle.read, min(_CHUNK, remaining))
                if not chunk:  # truncated while being sent: end the body short, the client sees the mismatch
                    break
                remaining -= len(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": remaining > 0})
            if remaining > 0:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.handle.close()


def not_modified(if_none_match: str | None, response: Response) -> Response:
    """A 304 (with the validators and caching headers) when `if_none_match` names the response's ETag (or is
    "*"), else the response itself. An open file the 304 does not send is closed."""
    etag = response.headers.get("etag")
    if not if_none_match or not etag:
        return response
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    if "*" not in tags and etag.removeprefix("W/") not in tags:
        return response
    if isinstance(response, OpenFileResponse):
        response.handle.close()
    kept = {k: v for k, v in response.headers.items() if k in ("etag", "cache-control", "last-modified")}
    return Response(status_code=304, headers=kept)


def _disposition(name: str) -> str:
    quoted = quote(name)
    return f"inline; filename*=utf-8''{quoted}" if quoted != name else f'inline; filename="{name}"'


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, length) of a single `Range: bytes=...` request on a file of `size` bytes; None to send it whole (no
    header, several ranges, another unit, or a malformed one, all of which RFC 9110 lets a server ignore). An
    unsatisfiable range is a 416 (ApiError)."""
    if not header:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or last.isdigit()) or (first and not first.isdigit()) or (
            last and not last.isdigit()):
        return None
    if not first:  # the last N bytes
        length = min(int(last), size)
        if length == 0:
            raise ApiError(416, f"the range asks for none of the file's {size:,} bytes", "Ask for bytes=0- or less.",
                           {"content-range": f"bytes */{size}"})
        return size - length, length
    start = int(first)
    if last and int(last) < start:
        return None  # bytes=5-3 is no valid range (RFC 9110 14.1.2): ignored
    end = min(int(last), size - 1) if last else size - 1
    if start >= size:
        raise ApiError(416, f"the range starts past the file's {size:,} bytes",
                       f"Ask for a range within bytes=0-{max(0, size - 1)}.", {"content-range": f"bytes */{size}"})
    return start, end - start + 1


def original_file(record: ImageRecord, roots: Sequence[str], range_header: str | None = None) -> Response:
    """The indexed file's bytes (one byte range of them with `range_header`: a download can resume)."""
    handle = open_indexed(record, roots)  # a file that is gone is a 404 whatever range was asked
    try:
        part = byte_range(range_header, record.size)
    except ApiError:
        handle.close()
        raise
    name = Path(record.path).name
    media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    headers = {**CACHE_HEADERS, "content-disposition": _disposition(name),
               "last-modified": email.utils.formatdate(record.mtime_ns / 1e9, usegmt=True),
               "etag": f'"{record.content_hash[:32]}"'}
    if part is None:
        return OpenFileResponse(handle, record.size, media_type, headers)
    return OpenFileResponse(handle, part[1], media_type, headers, start=part[0], whole=record.size)


class ThumbnailCache:
    """Makes thumbnails on first request and keeps them under `folder`."""

    def __init__(self, folder: Path, max_px: int, max_pixels: int) -> None:
        self.folder = Path(folder)
        self.max_px = max_px
        self.max_pixels = max_pixels

    def path_for(self, record: ImageRecord) -> Path:
        return self.folder / f"{record.id}-{record.content_hash[:16]}-{self.max_px}.jpg"

    def get(self, record: ImageRecord, roots: Sequence[str]) -> Path:
        """The cached thumbnail, made from the checked original when missing. The original is checked on every
        request, so a thumbnail is only served while its image is still the indexed one."""
        with open_indexed(record, roots) as handle:
            cached = self.path_for(record)
            if cached.is_file():
                return cached
            try:
                image = open_image(handle, draft_size=(self.max_px, self.max_px), max_pixels=self.max_pixels)
            except ImageError as exc:
                raise ApiError(410, f"image {record.id} can no longer be read: {exc.message}",
                               "Re-run `clipsearch index` on its folder.") from exc
        image.thumbnail((self.max_px, self.max_px))
        self.folder.mkdir(parents=True, exist_ok=True)
        # Write to a temporary file and rename, so concurrent requests never see half a thumbnail.
        handle_fd, temporary = tempfile.mkstemp(dir=self.folder, prefix=".tmp-", suffix=".jpg")
        try:
            with os.fdopen(handle_fd, "wb") as out:
                image.save(out, format="JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
            os.replace(temporary, cached)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return cached

    def response(self, record: ImageRecord, roots: Sequence[str]) -> FileResponse:
        path = self.get(record, roots)
        # The stat up front: the ETag and Last-Modified are then known before the response is sent (a 304 needs them).
        return FileResponse(path, media_type="image/jpeg", headers=CACHE_HEADERS, stat_result=os.stat(path))
