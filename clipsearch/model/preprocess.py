"""Image decoding and the model's own transform, in Pillow + numpy (no torch).

`open_image` turns a file into an RGB Pillow image: EXIF orientation applied, JPEG decoded in draft mode
when the file is much larger than the model input, images over `MAX_IMAGE_PIXELS` refused, non-regular
files (FIFOs, sockets, devices) refused before they are opened, 16-bit images converted in their native
depth, the first frame of an animation. `image_to_pixels` reproduces open_clip's transform as described
by preprocess.json.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import io
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterator

from PIL import Image, ImageOps, UnidentifiedImageError

from .bundle import PreprocessSpec
from ..errors import ImageError

if TYPE_CHECKING:
    import numpy as np
# numpy is imported where it is used: the indexer's decoder processes need only Pillow, and start faster without it.

# The project's pixel limit: larger images are refused as possible decompression bombs. 250 megapixels
# takes every camera photo (a 100 MP medium-format frame is 12000 x 8400) and most stitched panoramas;
# Pillow's own default (89.5 MP warning, 179 MP error) is replaced by this limit inside `open_image`.
MAX_IMAGE_PIXELS = 250_000_000
MAX_IMAGE_FILE_BYTES = 512 * 1024 * 1024  # larger files are refused unread (indexing and query images)

_HEIF_REGISTERED = False


def _register_heif() -> None:
    global _HEIF_REGISTERED  # a one-way, idempotent plugin registration, not mutable program state
    if _HEIF_REGISTERED:
        return
    try:
        from pillow_heif import register_heif_opener

        register_heif_opener()
    except ImportError:  # HEIC support is optional
        pass
    _HEIF_REGISTERED = True


_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}

HEIF_SUFFIXES = {".heic", ".heif", ".avif"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", *HEIF_SUFFIXES}


def _describe_mode(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISDIR(mode):
        return "directory"
    return "special file"


def not_regular_reason(mode: int) -> str:
    """The reason a file of this st_mode is refused: 'is a directory' or 'not a regular file (fifo)'."""
    kind = _describe_mode(mode)
    return "is a directory" if kind == "directory" else f"not a regular file ({kind})"


def open_regular_file(path: str | os.PathLike[str]) -> BinaryIO:
    """Open `path` for reading only if it is a regular file (after following symlinks).

    FIFOs, sockets and device nodes are refused *before* they are opened (opening a FIFO blocks until a
    writer appears; opening some devices has side effects), and the opened file is checked again with
    fstat, so a file swapped for a FIFO between the two checks is refused too (O_NONBLOCK keeps that
    open from blocking). Raises ImageError with a short reason.
    """
    name = os.fspath(path)
    try:
        mode = os.stat(name).st_mode
    except OSError as exc:
        raise ImageError(f"{name}: {_os_error_reason(name, exc)}") from exc
    if not stat.S_ISREG(mode):
        raise ImageError(f"{name}: {not_regular_reason(mode)}")
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as exc:
        raise ImageError(f"{name}: {_os_error_reason(name, exc)}") from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ImageError(f"{name}: {not_regular_reason(mode)}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_at_most(handle: BinaryIO, limit: int) -> bytes:
    """Up to `limit` + 1 bytes of an open file (one more than allowed tells the caller it is too large).

    Sized by fstat: `read(limit + 1)` with a limit of hundreds of megabytes makes Python allocate that much for
    every file (about 1 CPU ms per 2 MB photo here). A file that grew since fstat is read on to the limit."""
    try:
        expected = os.fstat(handle.fileno()).st_size
    except (AttributeError, OSError, ValueError):
        expected = limit
    data = handle.read(min(expected, limit) + 1)
    if len(data) > expected and len(data) <= limit:  # it grew: read the rest, still bounded
        data += handle.read(limit + 1 - len(data))
    return data


def read_image_file(path: str | os.PathLike[str], max_bytes: int | None = None) -> bytes:
    """The bytes of an image file, refusing non-regular files (see `open_regular_file`) and, with
    `max_bytes`, files larger than that. Callers that read a user-given path before `open_image(bytes)`
    (search by example image) use this instead of `Path.read_bytes`, which hangs on a FIFO."""
    with open_regular_file(path) as handle:
        if max_bytes is not None:
            size = os.fstat(handle.fileno()).st_size
            if size > max_bytes:
                raise ImageError(f"{os.fspath(path)}: file too large ({size:,} bytes)")
        try:
            data = handle.read() if max_bytes is None else read_at_most(handle, max_bytes)
        except OSError as exc:
            raise ImageError(f"{os.fspath(path)}: {_os_error_reason(os.fspath(path), exc)}") from exc
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageError(f"{os.fspath(path)}: file too large (more than {max_bytes:,} bytes)")
    return data


def _os_error_reason(name: str, exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "dangling symlink" if os.path.islink(name) else "no such file"
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.EISDIR:
        return "is a directory"
    return f"cannot read ({exc.strerror or exc})"


# The pixel limit in force for the current thread/task: `open_image` sets it, Pillow's own check reads it.
_PIXEL_LIMIT: contextvars.ContextVar[int | None] = contextvars.ContextVar("clipsearch_pixel_limit", default=None)


class PixelLimitExceeded(Image.DecompressionBombError):
    """An image larger than the project's pixel limit (a DecompressionBombError, so Pillow callers see one)."""


def _install_pixel_limit_hook() -> None:
    """Route Pillow's decompression-bomb check through `_PIXEL_LIMIT`.

    Pillow checks sizes against its module-global `Image.MAX_IMAGE_PIXELS` in `Image.open` and in several
    plugins (GIF/MPO frames, TIFF tiles, crop). Changing that global would change it for every caller in
    the process; instead the check consults the limit set by `pixel_limit()` for the current context and
    falls through to Pillow's unchanged check everywhere else.
    """
    original = getattr(Image, "_decompression_bomb_check", None)
    if original is None or getattr(original, "_clipsearch_hook", False):
        return

    def check(size, *args, **kwargs):  # type: ignore[no-untyped-def]
        limit = _PIXEL_LIMIT.get()
        if limit is None:
            return original(size, *args, **kwargs)
        pixels = max(1, size[0]) * max(1, size[1])
        if pixels > limit:
            raise PixelLimitExceeded(_limit_message(size[0], size[1], limit))
        return None

    check._clipsearch_hook = True  # type: ignore[attr-defined]
    Image._decompression_bomb_check = check  # type: ignore[attr-defined]


_install_pixel_limit_hook()


def _limit_message(width: int, height: int, limit: int) -> str:
    return (f"{width}x{height} is {width * height / 1e6:.1f} megapixels, more than the "
            f"{limit / 1e6:g}-megapixel limit (refused as a possible decompression bomb)")


@contextlib.contextmanager
def pixel_limit(max_pixels: int = MAX_IMAGE_PIXELS) -> Iterator[None]:
    """Within this block Pillow (in this thread) refuses images over `max_pixels` and does not warn below it."""
    token = _PIXEL_LIMIT.set(int(max_pixels))
    try:
        yield
    finally:
        _PIXEL_LIMIT.reset(token)


def open_image(source: str | os.PathLike[str] | bytes | BinaryIO, draft_size: tuple[int, int] | None = None,
               max_pixels: int = MAX_IMAGE_PIXELS, name: str | None = None) -> Image.Image:
    """Decode `source` (path, bytes or file object) into an RGB image. `name`: what errors call it (default: the
    path, or "<upload>" for bytes and file objects).

    With `draft_size`, JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides at
    least `draft_size` (the later bicubic resize never enlarges), and
    16-bit images are reduced in their native depth before conversion. Images over `max_pixels`
    (default `MAX_IMAGE_PIXELS`) are refused before any pixel is decoded; a path that is not a regular
    file is refused before it is opened. Raises ImageError with a human-readable reason for anything
    that is not a decodable image.
    """
    if name is None:
        name = str(source) if isinstance(source, (str, os.PathLike)) else "<upload>"
    owned: BinaryIO | None = None
    if isinstance(source, bytes):
        if not source:
            raise ImageError(f"{name}: empty file")
        stream: BinaryIO = io.BytesIO(source)
        heif = _looks_like_heif(stream)
    elif isinstance(source, (str, os.PathLike)):
        owned = stream = open_regular_file(source)
        heif = Path(source).suffix.lower() in HEIF_SUFFIXES or _looks_like_heif(stream)
    else:
        stream = source
        heif = _looks_like_heif(stream)
    if heif:
        _register_heif()  # imported only when needed: pillow_heif costs ~0.15 s to import
    try:
        with pixel_limit(max_pixels):
            image = Image.open(stream)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(f"{name}: {_limit_message(width, height, max_pixels)}")
            if draft_size is not None and image.format == "JPEG":
                # benchmarks/decode.py, 12 MP camera JPEGs: 23 CPU ms per photo instead of 30 when keeping twice the
                # input, with the model input at 41 dB PSNR or more (mean 50) against a full decode's (twice the input:
                # 53-55 dB); the DCT scaling averages like a box filter.
                image.draft("RGB", (draft_size[0], draft_size[1]))
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # no copy of an upright image
            return _to_rgb(image, draft_size)
    except ImageError:
        raise
    except FileNotFoundError as exc:
        raise ImageError(f"{name}: no such file") from exc
    except PermissionError as exc:
        raise ImageError(f"{name}: permission denied") from exc
    except IsADirectoryError as exc:
        raise ImageError(f"{name}: is a directory") from exc
    except UnidentifiedImageError as exc:
        if owned is not None and os.fstat(owned.fileno()).st_size == 0:
            raise ImageError(f"{name}: empty file") from exc
        raise ImageError(f"{name}: not a recognised image format") from exc
    except PixelLimitExceeded as exc:
        raise ImageError(f"{name}: {exc}") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: refused as a decompression bomb ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{name}: corrupt or truncated image ({exc})") from exc
    finally:
        if owned is not None:
            owned.close()


def _looks_like_heif(source: BinaryIO) -> bool:
    """HEIC/HEIF/AVIF by the ISO-BMFF `ftyp` box."""
    try:
        position = source.tell()
        head = source.read(12)
        source.seek(position)
    except (AttributeError, OSError, ValueError):
        return False
    return len(head) >= 12 and head[4:8] == b"ftyp"


_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_BAND_PIXELS = 1 << 22  # rows converted at a time from high-depth images (~4 M pixels: 16 MB of uint32)


def _to_rgb(image: Image.Image, draft_size: tuple[int, int] | None = None) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparency on white, as a viewer shows it (emoji and logos are drawn for light pages).
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in _HIGH_DEPTH_MODES:
        return _high_depth_to_8bit(image, draft_size).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_8bit(image: Image.Image, draft_size: tuple[int, int] | None) -> Image.Image:
    """16/32-bit greyscale -> 8-bit 'L' in the image's native depth, a band of rows at a time.

    16-bit samples are full-scale (65535 -> 255, rounded: v / 257). 32-bit 'I' images whose values fit
    0..255 or 0..65535 are read as 8- or 16-bit data; any other range is stretched from min..max. With
    `draft_size`, a large image is first box-reduced (natively, no conversion) to at least twice that
    size, so the conversion never touches full-resolution pixels. No float64 anywhere: uint32 for
    16-bit data, float32 only for out-of-range 32-bit data.
    """
    import numpy as np

    width, height = image.size
    if draft_size is not None:
        factor = min(width // (2 * max(1, draft_size[0])), height // (2 * max(1, draft_size[1])))
        if factor >= 2:
            image = image.resize((max(1, width // factor), max(1, height // factor)), Image.Resampling.BOX)
            width, height = image.size
    low, high = (0, 65535) if image.mode.startswith("I;16") else image.getextrema()
    if image.mode.startswith("I;16"):
        scale = None
    elif low >= 0 and high <= 255:
        low, high, scale = 0, 255, None
    elif low >= 0 and high <= 65535:
        low, high, scale = 0, 65535, None
    else:
        scale = np.float32(255.0 / max(1, high - low))
    out = np.empty((height, width), dtype=np.uint8)
    rows = max(1, _BAND_PIXELS // max(1, width))
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        band = np.asarray(image.crop((0, top, width, bottom)))
        if scale is not None:
            values = (band.astype(np.float32) - np.float32(low)) * scale
            out[top:bottom] = np.clip(values + np.float32(0.5), 0, 255).astype(np.uint8)
        elif high == 255:
            out[top:bottom] = band
        else:
            out[top:bottom] = ((band.astype(np.uint32) + 128) // 257).astype(np.uint8)
    return Image.fromarray(out)  # uint8 [H, W] -> mode "L"


def resize_for_model(image: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """Resize and crop/pad an RGB image to the model's input size, as open_clip's transform does."""
    target_h, target_w = spec.size
    resample = _RESAMPLE.get(spec.interpolation, Image.Resampling.BICUBIC)
    width, height = image.size
    if spec.resize_mode == "squash":
        return image.resize((target_w, target_h), resample)
    if spec.resize_mode == "longest":
        scale = min(target_h / height, target_w / width)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        resized = image.resize((new_w, new_h), resample)
        canvas = Image.new("RGB", (target_w, target_h), (spec.fill_color,) * 3)
        canvas.paste(resized, ((target_w - new_w) // 2, (target_h - new_h) // 2))
        return canvas
    # "shortest": torchvision Resize(int) keeps the aspect, shorter side = size, then CenterCrop.
    short, long_ = (width, height) if width <= height else (height, width)
    size = min(target_h, target_w)
    new_short, new_long = size, int(size * long_ / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    left = int(round((new_w - target_w) / 2.0))
    top = int(round((new_h - target_h) / 2.0))
    if new_long > 4 * size:
        # Extreme aspect ratio (a 1 x 100000 strip would become 64 x 6.4M pixels): resample only the
        # source region that survives the centre crop.
        scale_x, scale_y = width / new_w, height / new_h
        box = (left * scale_x, top * scale_y, (left + target_w) * scale_x, (top + target_h) * scale_y)
        return image.resize((target_w, target_h), resample, box=box)
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), resample)
    return image.crop((left, top, left + target_w, top + target_h))


def image_to_pixels(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """RGB image -> float32 [3, H, W], resized/cropped and normalised with the model's mean and std."""
    import numpy as np

    resized = resize_for_model(image, spec)
    array = np.asarray(resized, dtype=np.float32) * np.float32(1.0 / 255.0)
    array = (array - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def load_pixels(source: str | os.PathLike[str] | bytes | BinaryIO, spec: PreprocessSpec) -> np.ndarray:
    """Decode and transform in one step (the indexer's per-file work)."""
    return image_to_pixels(open_image(source, draft_size=(spec.size[1], spec.size[0])), spec)
