"""Image decoding and the model's own transform, in Pillow + numpy (no torch).

`open_image` turns a file into an RGB Pillow image: EXIF orientation applied, JPEG decoded in draft mode
when the file is much larger than the model input, decompression bombs refused, the first frame of an
animation. `image_to_pixels` reproduces open_clip's transform as described by preprocess.json.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .bundle import PreprocessSpec
from .errors import ImageError

# Twice Pillow's default bomb limit; anything larger is refused rather than decoded (~180 MP).
MAX_IMAGE_PIXELS = 2 * 89_478_485

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


def open_image(source: str | os.PathLike[str] | bytes | BinaryIO, draft_size: tuple[int, int] | None = None,
               max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode `source` (path, bytes or file object) into an RGB image.

    With `draft_size`, JPEGs are decoded at the smallest DCT scale that keeps both sides at least
    twice `draft_size` (so the later high-quality resize still sees more pixels than it outputs).
    Raises ImageError with a human-readable reason for anything that is not a decodable image.
    """
    name = str(source) if isinstance(source, (str, os.PathLike)) else "<upload>"
    if isinstance(source, bytes):
        if not source:
            raise ImageError(f"{name}: empty file")
        source = io.BytesIO(source)
    if _looks_like_heif(source):
        _register_heif()  # imported only when needed: pillow_heif costs ~0.15 s to import
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(source)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError(f"{name}: {width}x{height} is larger than the {max_pixels:,} pixel limit (decompression bomb?)")
            if draft_size is not None and image.format == "JPEG":
                image.draft("RGB", (draft_size[0] * 2, draft_size[1] * 2))
            image.load()
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except ImageError:
        raise
    except FileNotFoundError as exc:
        raise ImageError(f"{name}: no such file") from exc
    except PermissionError as exc:
        raise ImageError(f"{name}: permission denied") from exc
    except IsADirectoryError as exc:
        raise ImageError(f"{name}: is a directory") from exc
    except UnidentifiedImageError as exc:
        if isinstance(source, (str, os.PathLike)) and os.path.getsize(source) == 0:
            raise ImageError(f"{name}: empty file") from exc
        raise ImageError(f"{name}: not a recognised image format") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{name}: refused as a decompression bomb ({exc})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{name}: corrupt or truncated image ({exc})") from exc


def _looks_like_heif(source: str | os.PathLike[str] | BinaryIO) -> bool:
    """HEIC/HEIF/AVIF by file name, or by the ISO-BMFF `ftyp` box for bytes and file objects."""
    if isinstance(source, (str, os.PathLike)):
        return Path(source).suffix.lower() in HEIF_SUFFIXES
    try:
        position = source.tell()
        head = source.read(12)
        source.seek(position)
    except (AttributeError, OSError, ValueError):
        return False
    return len(head) >= 12 and head[4:8] == b"ftyp"


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparency on white, as a viewer shows it (emoji and logos are drawn for light pages).
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() or 1.0
        return Image.fromarray((array / peak * 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


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
    resized = resize_for_model(image, spec)
    array = np.asarray(resized, dtype=np.float32) * np.float32(1.0 / 255.0)
    array = (array - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def load_pixels(source: str | os.PathLike[str] | bytes | BinaryIO, spec: PreprocessSpec) -> np.ndarray:
    """Decode and transform in one step (the indexer's per-file work)."""
    return image_to_pixels(open_image(source, draft_size=(spec.size[1], spec.size[0])), spec)
