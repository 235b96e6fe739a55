"""Generated photo folders for the indexing and search tests (tiny, distinct, deterministic images)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


def block_image(seed: int, size: tuple[int, int] = (160, 120), grid: int = 4) -> Image.Image:
    """A grid of random colour blocks: distinct low-frequency content that survives resizing."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 256, size=(grid, grid, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize(size, Image.Resampling.NEAREST)


def make_photos(folder: Path, count: int, start_seed: int = 0) -> list[Path]:
    """`count` images alternating JPEG / PNG, half of them in a sub-folder."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        sub = folder / "sub" if i % 2 else folder
        sub.mkdir(exist_ok=True)
        path = sub / f"photo_{i:03d}.{'jpg' if i % 3 else 'png'}"
        block_image(start_seed + i).save(path, quality=92) if path.suffix == ".jpg" else block_image(start_seed + i).save(path)
        paths.append(path)
    return paths


def bump_mtime(path: Path, seconds: int = 5) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + seconds * 1_000_000_000))
