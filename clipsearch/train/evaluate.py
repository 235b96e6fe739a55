"""Retrieval metrics (numpy only) and the held-out evaluation of a bundle through the torch-free runtime.

`recall_at_k` counts a text→image query as a hit at K when an image of the query's concept is among
the K most similar gallery images. `evaluate_bundle` embeds a gallery of image files and a list of
queries with `clipsearch.model.runtime.ClipModel`, exactly as `clipsearch search` would.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Recall:
    """Text→image recall of one evaluation (fractions in 0..1)."""

    queries: int
    gallery: int
    r1: float
    r5: float
    r10: float

    def as_percent(self) -> dict[str, float]:
        return {"R@1": round(100 * self.r1, 2), "R@5": round(100 * self.r5, 2), "R@10": round(100 * self.r10, 2)}

    def __str__(self) -> str:
        p = self.as_percent()
        return (f"R@1 {p['R@1']:.1f}%  R@5 {p['R@5']:.1f}%  R@10 {p['R@10']:.1f}%  "
                f"({self.queries} queries, {self.gallery} images)")


def recall_at_k(text_emb: np.ndarray, image_emb: np.ndarray, query_concepts: Sequence[int],
                gallery_concepts: Sequence[int], chunk: int = 1024) -> Recall:
    """Text→image R@1/5/10; a query hits when any gallery image of its concept ranks within K."""
    q_concepts = np.asarray(query_concepts)
    g_concepts = np.asarray(gallery_concepts)
    hits = {1: 0, 5: 0, 10: 0}
    for start in range(0, len(text_emb), chunk):
        sims = text_emb[start : start + chunk] @ image_emb.T
        k = min(10, sims.shape[1])
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(sims, top, axis=1).argsort(axis=1)[:, ::-1]
        ranked = np.take_along_axis(top, order, axis=1)
        correct = g_concepts[ranked] == q_concepts[start : start + chunk, None]
        for kk in hits:
            hits[kk] += int(correct[:, :kk].any(axis=1).sum())
    n = max(1, len(text_emb))
    return Recall(len(text_emb), len(image_emb), hits[1] / n, hits[5] / n, hits[10] / n)


@dataclass(frozen=True)
class HeldOutReport:
    """Held-out figures of one bundle: the full gallery and the same without flags."""

    bundle: str
    precision: str
    full: Recall
    no_flags: Recall
    seconds: float
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"bundle": self.bundle, "precision": self.precision, "full": asdict(self.full),
                "no_flags": asdict(self.no_flags), "full_percent": self.full.as_percent(),
                "no_flags_percent": self.no_flags.as_percent(), "seconds": round(self.seconds, 1), **self.extra}


@dataclass(frozen=True)
class Gallery:
    """Images to search (files) and the queries that should find them."""

    images: list[Path]
    image_concepts: list[int]
    queries: list[str]
    query_concepts: list[int]
    flag_concepts: frozenset[int] = frozenset()


def embed_gallery(model, images: Sequence[Path], batch: int = 256) -> np.ndarray:
    from ..model.preprocess import load_pixels

    parts = []
    for start in range(0, len(images), batch):
        pixels = np.stack([load_pixels(p, model.preprocess) for p in images[start : start + batch]])
        parts.append(model.encode_pixels(pixels))
    return np.concatenate(parts) if parts else np.zeros((0, model.embed_dim), np.float32)


def evaluate_bundle(bundle: Path | str, gallery: Gallery, threads: int | None = None) -> HeldOutReport:
    """Embed `gallery` with the ONNX bundle (torch-free runtime) and measure text→image recall."""
    from ..model.runtime import ClipModel

    started = time.perf_counter()
    model = ClipModel(bundle, threads=threads)
    image_emb = embed_gallery(model, gallery.images)
    text_emb = np.concatenate([model.encode_text(gallery.queries[i : i + 256])
                               for i in range(0, len(gallery.queries), 256)])
    full = recall_at_k(text_emb, image_emb, gallery.query_concepts, gallery.image_concepts)
    keep_q = np.array([c not in gallery.flag_concepts for c in gallery.query_concepts])
    keep_g = np.array([c not in gallery.flag_concepts for c in gallery.image_concepts])
    no_flags = recall_at_k(text_emb[keep_q], image_emb[keep_g],
                           np.asarray(gallery.query_concepts)[keep_q], np.asarray(gallery.image_concepts)[keep_g])
    return HeldOutReport(model.info.name, model.info.precision, full, no_flags, time.perf_counter() - started)


def noto_gallery(dataset=None, limit: int | None = None, seed: int = 0) -> Gallery:
    """The held-out Noto gallery (all of it, or a fixed random sample of `limit` concepts) from the cache."""
    from .emoji_data import HELDOUT_STYLE, open_emoji_dataset

    dataset = dataset or open_emoji_dataset()
    files = [Path(p) for p in dataset.source_file(HELDOUT_STYLE)]
    concepts = dataset.sprites(HELDOUT_STYLE).concepts.tolist()
    order = np.arange(len(files))
    if limit is not None and limit < len(files):
        order = np.sort(np.random.default_rng(seed).choice(len(files), limit, replace=False))
    cs = [int(concepts[i]) for i in order]
    return Gallery(
        images=[files[i] for i in order], image_concepts=cs,
        queries=[dataset.concepts[c].label for c in cs], query_concepts=cs,
        flag_concepts=frozenset(c.index for c in dataset.concepts if c.is_flag),
    )


def folder_gallery(folder: Path) -> Gallery:
    """A gallery from a folder with `index.json` ([{"file", "label", "is_flag"}]), e.g. sample_data/."""
    entries = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    return Gallery(
        images=[folder / e["file"] for e in entries], image_concepts=list(range(len(entries))),
        queries=[e["label"] for e in entries], query_concepts=list(range(len(entries))),
        flag_concepts=frozenset(i for i, e in enumerate(entries) if e.get("is_flag")),
    )
