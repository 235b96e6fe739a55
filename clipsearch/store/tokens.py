"""ITM image tokens stored at index time: the compact codec, the per-collection setting, and the memory-mapped
file that re-ranking reads them from.

A model with an ITM head (model.json's "itm" object) gives, from the same call of the visual graph as the
embedding, each image's tokens [T, D] that the fusion head attends to. They are stored per image id:

* in SQLite (`image_tokens` table, the durable copy), written in the same transaction as the image's vector
  row, so a killed run never leaves an image with another image's tokens or tokens without an image;
* in `tokens.bin` beside the FAISS index (derived data, rebuilt from SQLite when the vectors are saved), which
  a searcher memory-maps: sorted ids, then the per-token scales, then the token matrix.

Storage is "int8" by default — each token (a row of D values) scaled by max|x| / 127 and rounded, so the
error of any value is at most half a step, max|x_row| / 254 — or "fp16" when model.json's itm object says
`"image_tokens_storage": "fp16"`. A stored int8 blob is the T float32 scales followed by the T*D int8
values; an fp16 blob is the T*D float16 values.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import CollectionError

TOKENS_FILE = "tokens.bin"
STORAGES = ("int8", "fp16")
DEFAULT_STORAGE = "int8"
# A collection of a model with an ITM head stores tokens unless told otherwise when one image's tokens take at
# most this much (the emoji-mini head: 10 tokens x 256 int8 ~ 2.6 KB); bigger heads (BLIP-base: 577 x 768,
# ~445 KB int8) only with `clipsearch index PATH --tokens`.
DEFAULT_MAX_TOKEN_BYTES = 64 * 1024
_MAGIC = b"CLIPSEARCH-TOKENS\n"
_HEADER_BYTES = 4096  # magic + JSON, zero padded; the arrays start here (aligned for every dtype)


@dataclass(frozen=True)
class TokenCodec:
    """How one image's tokens [T, D] are stored."""

    storage: str
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        if self.storage not in STORAGES:
            raise CollectionError(f"unknown image token storage {self.storage!r} (expected one of {', '.join(STORAGES)})")
        if len(self.shape) != 2 or min(self.shape) < 1:
            raise CollectionError(f"image tokens of shape {list(self.shape)} cannot be stored")

    @property
    def bytes_per_image(self) -> int:
        t, d = self.shape
        return t * d + 4 * t if self.storage == "int8" else 2 * t * d

    def describe(self) -> str:
        t, d = self.shape
        return f"{self.storage} {t}x{d}, {format_bytes(self.bytes_per_image)}/image"

    def to_meta(self) -> dict[str, str]:
        return {"tokens_storage": self.storage, "tokens_shape": f"{self.shape[0]},{self.shape[1]}"}

    @classmethod
    def from_meta(cls, storage: str | None, shape: str | None) -> "TokenCodec | None":
        if not storage or not shape:
            return None
        try:
            t, d = (int(x) for x in shape.split(","))
        except ValueError:
            return None
        return cls(storage, (t, d))

    # -- encoding ---------------------------------------------------------------------------------
    def encode(self, tokens: np.ndarray) -> list[bytes]:
        """float32 [N, T, D] -> one blob per image."""
        tokens = np.asarray(tokens, dtype=np.float32)
        if tokens.ndim != 3 or tokens.shape[1:] != tuple(self.shape):
            raise CollectionError(f"image tokens of shape {list(tokens.shape[1:])} do not match the collection's "
                                  f"{list(self.shape)}")
        if self.storage == "fp16":
            data = tokens.astype(np.float16)
            return [row.tobytes() for row in data]
        values, scales = quantize_int8(tokens)
        return [s.tobytes() + v.tobytes() for s, v in zip(scales, values)]

    def split(self, blob: bytes) -> tuple[np.ndarray | None, np.ndarray]:
        """(scales float32 [T] or None for fp16, values [T, D]) of one blob; CollectionError when malformed."""
        if len(blob) != self.bytes_per_image:
            raise CollectionError(f"stored image tokens have {len(blob)} bytes, expected {self.bytes_per_image}")
        t, d = self.shape
        if self.storage == "fp16":
            return None, np.frombuffer(blob, dtype=np.float16).reshape(t, d)
        return np.frombuffer(blob, dtype=np.float32, count=t), np.frombuffer(blob, dtype=np.int8, offset=4 * t).reshape(t, d)

    def decode(self, blobs: Sequence[bytes]) -> np.ndarray:
        """Blobs -> float32 [K, T, D]."""
        out = np.empty((len(blobs), *self.shape), dtype=np.float32)
        for i, blob in enumerate(blobs):
            scales, values = self.split(blob)
            out[i] = values if scales is None else values.astype(np.float32) * scales[:, None]
        return out

    def valid(self, blob: bytes) -> bool:
        """Right size and finite values (a corrupted row is treated as missing)."""
        try:
            scales, values = self.split(blob)
        except CollectionError:
            return False
        if scales is None:
            return bool(np.isfinite(values).all())
        return bool(np.isfinite(scales).all() and (scales >= 0).all())


def quantize_int8(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-token int8: float32 [..., T, D] -> (int8 values [..., T, D], float32 scales [..., T]) with
    value * scale == x up to scale / 2 = max|x_token| / 254 for every element (an all-zero token has scale 0)."""
    tokens = np.asarray(tokens, dtype=np.float32)
    peak = np.abs(tokens).max(axis=-1)
    scales = (peak / 127.0).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
    values = np.clip(np.rint(tokens / safe[..., None]), -127, 127).astype(np.int8)
    return values, scales


def dequantize_int8(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    return values.astype(np.float32) * np.asarray(scales, dtype=np.float32)[..., None]


def format_bytes(count: int | float) -> str:
    """Powers of 1024, named so (KiB, MiB, GiB): `stats` shows its disk line in MB (powers of 1000) beside these."""
    if count < 1024:
        return f"{int(count)} B"
    if count < 1024 ** 2:
        return f"{count / 1024:.1f} KiB"
    if count < 1024 ** 3:
        return f"{count / 1024 ** 2:.1f} MiB"
    return f"{count / 1024 ** 3:.2f} GiB"


# -- the memory-mapped file -----------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenFileHeader:
    storage: str
    shape: tuple[int, int]
    count: int
    tokens_gen: int  # the store's tokens generation the file reflects
    model_id: str

    def sections(self) -> tuple[int, int, int, int]:
        """(ids offset, scales offset, values offset, file size) in bytes."""
        t, d = self.shape
        n = self.count
        ids_at = _HEADER_BYTES
        scales_at = ids_at + _align(8 * n)
        scale_bytes = 4 * n * t if self.storage == "int8" else 0
        values_at = scales_at + _align(scale_bytes)
        value_bytes = n * t * d * (1 if self.storage == "int8" else 2)
        return ids_at, scales_at, values_at, values_at + value_bytes


def _align(n: int, to: int = 64) -> int:
    return (n + to - 1) // to * to


def write_token_file(path: Path, codec: TokenCodec, count: int, rows: Iterable[tuple[np.ndarray, list[bytes]]],
                     tokens_gen: int, model_id: str) -> None:
    """Write `count` rows, given as (ids int64 [n], blobs) chunks in increasing id order, atomically to `path`."""
    from .index.vectors import _atomic_write

    header = TokenFileHeader(codec.storage, tuple(codec.shape), int(count), int(tokens_gen), model_id)

    def write(tmp: Path) -> None:
        ids_at, scales_at, values_at, size = header.sections()
        raw = json.dumps({"format": 1, "storage": header.storage, "shape": list(header.shape), "count": header.count,
                          "tokens_gen": header.tokens_gen, "model_id": header.model_id}).encode("utf-8")
        head = _MAGIC + len(raw).to_bytes(4, "little") + raw
        if len(head) > _HEADER_BYTES:
            raise CollectionError("token file header too long")
        with open(tmp, "wb") as handle:
            handle.write(head.ljust(_HEADER_BYTES, b"\0"))
            handle.truncate(size)
        if not count:
            return
        t, d = header.shape
        mm = np.memmap(tmp, dtype=np.uint8, mode="r+")
        try:
            ids_out = mm[ids_at:ids_at + 8 * count].view(np.int64)
            values_dtype = np.int8 if header.storage == "int8" else np.float16
            values_out = mm[values_at:size].view(values_dtype).reshape(count, t, d)
            scales_out = mm[scales_at:scales_at + 4 * count * t].view(np.float32).reshape(count, t) \
                if header.storage == "int8" else None
            done = 0
            for ids, blobs in rows:
                n = len(ids)
                if done + n > count:
                    raise CollectionError(f"more token rows than the {count} counted")
                ids_out[done:done + n] = ids
                for i, blob in enumerate(blobs):
                    scales, values = codec.split(blob)
                    values_out[done + i] = values
                    if scales_out is not None:
                        scales_out[done + i] = scales
                done += n
            if done != count:
                raise CollectionError(f"{done} token rows written, {count} counted")
            if count > 1 and not (np.diff(ids_out) > 0).all():
                raise CollectionError("token rows are not in increasing id order")
            mm.flush()
        finally:
            del mm

    _atomic_write(path, write)


class TokenFile:
    """A memory-mapped `tokens.bin` (read only)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                stat = os.fstat(handle.fileno())
                head = handle.read(_HEADER_BYTES)
        except OSError as exc:
            raise CollectionError(f"{self.path}: unreadable ({exc.strerror or exc})") from exc
        self.identity = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if not head.startswith(_MAGIC) or len(head) < len(_MAGIC) + 4:
            raise CollectionError(f"{self.path}: not a token file")
        length = int.from_bytes(head[len(_MAGIC):len(_MAGIC) + 4], "little")
        try:
            raw = json.loads(head[len(_MAGIC) + 4:len(_MAGIC) + 4 + length].decode("utf-8"))
            self.header = TokenFileHeader(str(raw["storage"]), (int(raw["shape"][0]), int(raw["shape"][1])),
                                          int(raw["count"]), int(raw["tokens_gen"]), str(raw["model_id"]))
            self.codec = TokenCodec(self.header.storage, self.header.shape)
        except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError, CollectionError) as exc:
            raise CollectionError(f"{self.path}: malformed header ({exc})") from exc
        ids_at, scales_at, values_at, size = self.header.sections()
        if stat.st_size != size:
            raise CollectionError(f"{self.path}: {stat.st_size} bytes, its header says {size}")
        n = self.header.count
        t, d = self.header.shape
        if n:
            self.ids = np.memmap(self.path, dtype=np.int64, mode="r", offset=ids_at, shape=(n,))
            self.scales = (np.memmap(self.path, dtype=np.float32, mode="r", offset=scales_at, shape=(n, t))
                           if self.header.storage == "int8" else None)
            self.values = np.memmap(self.path, dtype=np.int8 if self.header.storage == "int8" else np.float16,
                                    mode="r", offset=values_at, shape=(n, t, d))
        else:
            self.ids = np.zeros(0, dtype=np.int64)
            self.scales, self.values = None, None

    @property
    def count(self) -> int:
        return self.header.count

    @property
    def tokens_gen(self) -> int:
        return self.header.tokens_gen

    def rows(self, ids: Sequence[int]) -> dict[int, int]:
        """id -> row of those `ids` the file holds."""
        if not self.count or not len(ids):
            return {}
        wanted = np.asarray(list(ids), dtype=np.int64)
        at = np.searchsorted(self.ids, wanted)
        at_clipped = np.minimum(at, self.count - 1)
        hit = np.asarray(self.ids[at_clipped]) == wanted
        return {int(i): int(r) for i, r, h in zip(wanted, at_clipped, hit) if h}

    def tokens(self, rows: Sequence[int]) -> np.ndarray:
        """float32 [K, T, D] of the given rows."""
        rows = np.asarray(list(rows), dtype=np.int64)
        if not len(rows):
            return np.zeros((0, *self.header.shape), dtype=np.float32)
        values = np.asarray(self.values[rows])
        if self.scales is None:
            return values.astype(np.float32)
        return dequantize_int8(values, np.asarray(self.scales[rows]))

    def blob(self, row: int) -> bytes:
        """The row as the codec stores it (to compare with SQLite)."""
        values = np.asarray(self.values[row])
        return values.tobytes() if self.scales is None else np.asarray(self.scales[row]).tobytes() + values.tobytes()

    def close(self) -> None:
        self.ids = self.scales = self.values = None

