"""Calibrating a model's near-duplicate threshold (`clipsearch train duplicate-threshold`), torch-free.

Method: take distinct source images, make four altered copies of each (`altered_copies`: JPEG re-encode on
white, half size, a 5% crop, +10% brightness), embed every file through the runtime exactly as the indexer does
(decode from the file's bytes, transparency composited on white), group them as `clipsearch duplicates` does
(k-NN edges at a threshold, union-find), and score the groups pairwise against the truth (a source and its
copies are one family): precision = pairs grouped together that are one family / pairs grouped together,
recall = pairs of one family grouped together / pairs of one family. The chosen threshold is the one on the grid
with the highest F1 (ties: the higher threshold). With `min_precision` it is instead the lowest threshold (highest
recall) whose precision reaches that. For emoji-mini F1 is the rule: its precision stays at 0.89 from 0.91 to 0.96
(the distinct images it merges there are drawings that differ only in a skin tone or a gender sign, which embed at
0.94-0.98, above many true copies) and reaches 0.99 only at 0.985, where half of the copies are missed.

Sources: by default the validation split of the emoji training styles (the 411 sprites the model was not
trained on, `clipsearch.train.data._split` with seed 0, rendered again from their SVGs at 64 px like the Noto
images of sample_data/), so the Noto images that the tests measure on are never looked at; `--images FOLDER`
calibrates on any folder of distinct images instead (for photo models: distinct photos of your own).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageEnhance

ALTERATIONS = ("jpeg", "half", "crop5", "bright10")
DEFAULT_GRID = tuple(round(float(t), 4) for t in np.arange(0.80, 0.9995, 0.0025))
CALIBRATION_NEIGHBOURS = 16  # as `clipsearch duplicates` searches (duplicates.DEFAULT_NEIGHBOURS)


# -- altered copies ------------------------------------------------------------------------------
def on_white(image: Image.Image) -> Image.Image:
    """RGB with transparency composited on white, as the runtime shows an image to the model."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def altered_copy(image: Image.Image, how: str) -> tuple[bytes, str]:
    """One altered copy of `image` as file bytes and its file suffix:

    jpeg      re-encoded as JPEG quality 80 (transparency composited on white first, as the indexer does)
    half      resized to half its width and height (Lanczos), PNG
    crop5     5% of the width cut off the right and 5% of the height off the bottom, PNG
    bright10  brightness +10% (colour channels; transparency kept), PNG"""
    if how == "jpeg":
        out = io.BytesIO()
        on_white(image).save(out, format="JPEG", quality=80)
        return out.getvalue(), ".jpg"
    if how == "half":
        return _png(image.resize((max(1, image.width // 2), max(1, image.height // 2)), Image.Resampling.LANCZOS)), ".png"
    if how == "crop5":
        return _png(image.crop((0, 0, image.width - max(1, round(image.width * 0.05)),
                                image.height - max(1, round(image.height * 0.05))))), ".png"
    if how == "bright10":
        if image.mode == "RGBA":
            rgb, alpha = image.convert("RGB"), image.getchannel("A")
            brighter = ImageEnhance.Brightness(rgb).enhance(1.1).convert("RGBA")
            brighter.putalpha(alpha)
            return _png(brighter), ".png"
        return _png(ImageEnhance.Brightness(image.convert("RGB")).enhance(1.1)), ".png"
    raise ValueError(f"unknown alteration {how!r}: choose from {', '.join(ALTERATIONS)}")


def altered_copies(image: Image.Image, alterations: Sequence[str] = ALTERATIONS) -> dict[str, tuple[bytes, str]]:
    return {how: altered_copy(image, how) for how in alterations}


# -- scoring groups ------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairScore:
    """Pairwise precision and recall of a grouping against the true families."""

    threshold: float
    precision: float
    recall: float
    grouped_pairs: int
    true_pairs: int
    groups: int

    @property
    def f1(self) -> float:
        total = self.precision + self.recall
        return 2 * self.precision * self.recall / total if total else 0.0


def pair_score(groups: Iterable[Iterable[int]], family: dict[int, int], threshold: float = 0.0) -> PairScore:
    """Score `groups` (lists of ids) against `family` (id -> family; images of one family are copies)."""
    sizes: dict[int, int] = {}
    for f in family.values():
        sizes[f] = sizes.get(f, 0) + 1
    true_pairs = sum(n * (n - 1) // 2 for n in sizes.values())
    grouped = correct = count = 0
    for group in groups:
        members = list(group)
        count += 1
        grouped += len(members) * (len(members) - 1) // 2
        within: dict[int, int] = {}
        for m in members:
            within[family[m]] = within.get(family[m], 0) + 1
        correct += sum(n * (n - 1) // 2 for n in within.values())
    return PairScore(threshold=threshold, precision=correct / grouped if grouped else 1.0,
                     recall=correct / true_pairs if true_pairs else 1.0, grouped_pairs=grouped,
                     true_pairs=true_pairs, groups=count)


def group_vectors(vectors: np.ndarray, threshold: float, neighbours: int = CALIBRATION_NEIGHBOURS) -> list[list[int]]:
    """Group rows of `vectors` (L2-normalised) as `clipsearch duplicates` groups a collection: a flat FAISS
    index, k-NN edges at `threshold`, union-find. Ids are row numbers."""
    import faiss

    from ..duplicates import connected_groups, neighbour_pairs

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    ids = np.arange(len(vectors), dtype=np.int64)
    a, b, _ = neighbour_pairs(index.search, [(ids, vectors)], ids, threshold, min(neighbours, len(vectors) - 1))
    return connected_groups(a, b)


# -- calibration ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    model: str
    sources: int
    copies: int
    source_desc: str
    min_precision: float | None
    chosen: PairScore
    sweep: tuple[PairScore, ...]
    copy_similarity: dict  # alteration -> {min, p01, p05, median} of cosine(copy, source)
    nearest_distinct: dict  # {max, p99, p95, median} of each source's nearest other family
    copy_recall: dict  # alteration -> share of those copies grouped with their source at the chosen threshold

    def how(self) -> str:
        c = self.chosen
        rule = ("highest pairwise F1" if self.min_precision is None
                else f"lowest threshold with pairwise precision >= {self.min_precision:g}")
        return (f"{rule} (0.0025 grid) on {self.sources} {self.source_desc} + {self.copies} altered copies (JPEG q80 "
                f"on white, half size, 5% crop, +10% brightness): precision {c.precision:.3f}, recall {c.recall:.3f}; "
                "clipsearch train duplicate-threshold")

    def lines(self) -> list[str]:
        out = [f"{self.model}: {self.sources} sources ({self.source_desc}), {self.copies} altered copies"]
        for how, stats in self.copy_similarity.items():
            out.append(f"  cosine(copy, source) {how:9s} " + "  ".join(f"{k} {v:.4f}" for k, v in stats.items()))
        out.append("  nearest distinct image     " + "  ".join(f"{k} {v:.4f}" for k, v in self.nearest_distinct.items()))
        out.append("  copies grouped with their source at the chosen threshold: "
                   + ", ".join(f"{k} {v:.1%}" for k, v in self.copy_recall.items()))
        out.append("  threshold  precision  recall  groups")
        for s in self.sweep:
            mark = "  <- chosen" if s.threshold == self.chosen.threshold else ""
            out.append(f"  {s.threshold:.4f}    {s.precision:.4f}    {s.recall:.4f}  {s.groups}{mark}")
        return out


def embed_files(model, files: Sequence[bytes], batch: int = 64) -> np.ndarray:
    """Embed image file bytes as the indexer does (decode, composite on white, the model's preprocessing)."""
    from ..model.preprocess import open_image

    size = model.preprocess.size
    parts = []
    for start in range(0, len(files), batch):
        images = [open_image(data, draft_size=(size[1], size[0])) for data in files[start:start + batch]]
        parts.append(model.encode_images(images))
    return np.concatenate(parts) if parts else np.zeros((0, model.embed_dim), np.float32)


def calibrate(model, sources: Sequence[Image.Image], source_desc: str, *,
              min_precision: float | None = None, grid: Sequence[float] = DEFAULT_GRID,
              log: Callable[[str], None] = print) -> Calibration:
    """Sweep `grid` on `sources` and their altered copies; choose the threshold with the highest F1 (ties: the
    higher one), or with `min_precision` the lowest threshold whose precision reaches it (the highest grid value
    when none does)."""
    files: list[bytes] = []
    family: list[int] = []
    kind: list[str] = []
    for i, image in enumerate(sources):
        files.append(_png(image) if image.mode in ("RGBA", "RGB", "LA", "L", "P") else _png(image.convert("RGBA")))
        family.append(i)
        kind.append("source")
        for how, (data, _) in altered_copies(image).items():
            files.append(data)
            family.append(i)
            kind.append(how)
    log(f"embedding {len(files)} images")
    vectors = embed_files(model, files)
    families = np.array(family)
    kinds = np.array(kind)
    source_rows = {f: r for r, (f, k) in enumerate(zip(family, kind)) if k == "source"}
    copy_similarity = {}
    for how in ALTERATIONS:
        rows = np.nonzero(kinds == how)[0]
        sims = np.einsum("ij,ij->i", vectors[rows], vectors[[source_rows[f] for f in families[rows]]])
        copy_similarity[how] = _stats(sims, ("min", "p01", "p05", "median"))
    src = np.array([source_rows[f] for f in sorted(source_rows)])
    sims = vectors[src] @ vectors.T
    sims[families[src][:, None] == families[None, :]] = -2.0
    nearest_distinct = _stats(sims.max(axis=1), ("max", "p99", "p95", "median"))
    truth = dict(enumerate(family))
    sweep = []
    for threshold in grid:
        sweep.append(pair_score(group_vectors(vectors, float(threshold)), truth, float(threshold)))
    if min_precision is None:
        chosen = max(sweep, key=lambda s: (round(s.f1, 6), s.threshold))
    else:
        good = [s for s in sweep if s.precision >= min_precision]
        chosen = min(good, key=lambda s: s.threshold) if good else max(sweep, key=lambda s: s.threshold)
    group_of = {row: g for g, members in enumerate(group_vectors(vectors, chosen.threshold)) for row in members}
    copy_recall = {}
    for how in ALTERATIONS:
        rows = np.nonzero(kinds == how)[0]
        together = [row in group_of and group_of[row] == group_of.get(source_rows[families[row]]) for row in rows]
        copy_recall[how] = round(float(np.mean(together)), 4)
    return Calibration(model=model.info.name, sources=len(sources), copies=len(files) - len(sources),
                       source_desc=source_desc, min_precision=min_precision, chosen=chosen, sweep=tuple(sweep),
                       copy_similarity=copy_similarity, nearest_distinct=nearest_distinct, copy_recall=copy_recall)


def _stats(values: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    where = {"min": 0, "p01": 1, "p05": 5, "median": 50, "p95": 95, "p99": 99, "max": 100}
    return {name: round(float(np.percentile(values, where[name])), 4) for name in names}


# -- sources -------------------------------------------------------------------------------------
def validation_sprites(size: int = 64, seed: int = 0, val_fraction: float = 0.03) -> list[Image.Image]:
    """The emoji training styles' validation split (what `emoji_train_data` holds out with the same seed and
    fraction: the sprites the image tower never trained on), rendered again from their source files at `size`
    px on transparency. Needs the cached emoji dataset (`clipsearch train build-emoji-data`) and resvg-py."""
    from .data import _split
    from .emoji_data import TRAIN_STYLES, open_emoji_dataset, rasterise

    dataset = open_emoji_dataset(48)
    files: list[str] = []
    for style in TRAIN_STYLES:
        style_files = dataset.source_file(style)
        count = len(dataset.sprites(style).images)
        if len(style_files) != count:
            raise ValueError(f"{style}: {len(style_files)} files for {count} sprites")
        files.extend(style_files)
    _, val_idx = _split(len(files), val_fraction, np.random.default_rng(seed))
    return [Image.fromarray(rasterise(Path(files[i]), size), "RGBA") for i in val_idx]


def folder_images(folder: Path, limit: int | None = None) -> list[Image.Image]:
    """Distinct images of a folder (recursively, sorted by path), decoded as they are."""
    suffixes = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
    paths = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    images = []
    for path in paths[:limit] if limit else paths:
        with Image.open(path) as image:
            image.load()
            images.append(image.copy())
    return images


def write_threshold(bundle: Path, calibration: Calibration) -> dict:
    """Record the chosen threshold in the bundle's model.json as "duplicates" (model.json is not hashed and the
    model id comes from visual.onnx: the id does not change)."""
    from ..model.bundle import update_model_json

    def record(meta: dict) -> None:
        meta["duplicates"] = {"threshold": calibration.chosen.threshold,
                              "precision": round(calibration.chosen.precision, 4),
                              "recall": round(calibration.chosen.recall, 4), "how": calibration.how()}

    return update_model_json(bundle, record)["duplicates"]


def to_json(calibration: Calibration) -> dict:
    raw = asdict(calibration)
    raw["how"] = calibration.how()
    return raw
