"""Query images sent by clients: size limits, base64 decoding, and a header-only check that the bytes are
an image of sane dimensions before anything decodes them (415 for non-images, 413 for bombs)."""

from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import io
import re
import sys
from dataclasses import dataclass

from fastapi import UploadFile
from PIL import Image, UnidentifiedImageError

from clipsearch.model.preprocess import pixel_limit

from .errors import ApiError

_DATA_URL_RE = re.compile(r"^data:[\w/+.-]*(;[\w=.-]+)*;base64,", re.I)
_READ_CHUNK = 1024 * 1024
# Resizing the short side to the model's input size multiplies the long side by the same factor, so a
# 1 x 100,000 image would become gigabytes of pixels: refuse shapes no photo has.
MAX_ASPECT_RATIO = 50
_HEADER_ONLY = 2**62  # pixels: no image header claims more (check_image's own limit applies after)


def _load_malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _load_malloc_trim()


def release_freed_memory() -> None:
    """Hand the pages freed by a large image decode back to the OS. glibc keeps freed heap memory in its
    per-thread arenas otherwise, so one big query image would leave the server hundreds of MB larger."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@dataclass(frozen=True)
class QueryImage:
    """Bytes that passed the checks, with what the header said about them."""

    data: bytes
    format: str
    width: int
    height: int


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"image is larger than the {limit:,} byte upload limit")


async def read_upload(upload: UploadFile, limit: int) -> bytes:
    """Read an uploaded file, refusing (413) once it exceeds `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await upload.read(_READ_CHUNK)
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def decode_base64_image(text: str, limit: int) -> bytes:
    """Decode base64 (optionally a data: URL); 400 when it is not base64, 413 when too large."""
    text = _DATA_URL_RE.sub("", text.strip(), count=1)
    if len(text) * 3 // 4 > limit + 3:
        raise too_large(limit)
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        try:  # clients sometimes send URL-safe base64
            data = base64.urlsafe_b64decode("".join(text.split()))
        except (binascii.Error, ValueError) as exc:
            raise ApiError(400, "image is not valid base64") from exc
    if len(data) > limit:
        raise too_large(limit)
    return data


def check_image(data: bytes, max_pixels: int) -> QueryImage:
    """Read only the header: 415 unless Pillow recognises an image, 413 beyond `max_pixels`."""
    if not data:
        raise ApiError(400, "the image is empty", "The upload had no bytes: send the image file itself.")
    try:
        # Only the header is read, so Pillow's own size check is lifted here: the limit below answers every size
        # with one message (Pillow's raised its own text, and its own limit, past twice its default).
        with pixel_limit(_HEADER_ONLY), Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            image_format = image.format or "unknown"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ApiError(415, "the upload is not an image in a supported format",
                       "Send a JPEG, PNG, WebP, GIF, BMP, TIFF or HEIC file.") from exc
    if width * height > max_pixels:
        raise ApiError(413, f"image of {width}x{height} pixels is larger than the {max_pixels:,} pixel limit "
                            "(decompression bomb?)")
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ApiError(400, f"image of {width}x{height} pixels has a more extreme shape than {MAX_ASPECT_RATIO}:1")
    return QueryImage(data, image_format, width, height)
