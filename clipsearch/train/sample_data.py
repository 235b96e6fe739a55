"""Writes `sample_data/`: a fixed set of held-out Noto emoji PNGs (named by CLDR slug) with their licence,
attribution and an index.json (file, CLDR name, flag or not) that tests and the README quickstart use.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from .emoji_data import HELDOUT_STYLE, EmojiDataset, slug

# Always included, so the README queries have something to find.
FEATURED = (
    "red heart", "green heart", "blue heart", "cat face", "dog face", "pizza", "hamburger", "birthday cake",
    "thumbs up", "thumbs up: dark skin tone", "thumbs down", "rocket", "airplane", "bicycle", "sun", "snowman",
    "umbrella with rain drops", "right arrow", "left arrow", "up arrow", "woman cook", "man cook", "red apple",
    "banana", "soccer ball", "guitar", "flag: Japan", "flag: Brazil", "fire", "crying face",
)

ATTRIBUTION = """# sample_data: Noto Color Emoji images

These {n} PNG images (64x64) are from **Noto Color Emoji** by Google
(https://github.com/googlefonts/noto-emoji), licensed under the **Apache License, Version 2.0**
(full text in `LICENSE-NOTO.txt`). Flag images in Noto Emoji are in the public domain.

They were taken unmodified from the npm package `emoji-datasource-google@{version}`
(https://github.com/iamcal/emoji-data, `img/google/64/`) and renamed by their CLDR short name
(from `emojibase-data`); `index.json` lists each file with its CLDR name.

Noto is the **held-out style** of the bundled `emoji-mini` model: none of these images (nor any other
Noto image) was used to train or tune it.
"""


def write_sample_data(dataset: EmojiDataset, out: Path, n: int = 300, seed: int = 0,
                      featured: Sequence[str] = FEATURED, version: str = "16.0.0") -> list[dict]:
    """Copy `n` Noto PNGs (featured ones first, the rest a fixed random draw) into `out`."""
    files = [Path(p) for p in dataset.source_file(HELDOUT_STYLE)]
    concepts = dataset.sprites(HELDOUT_STYLE).concepts.tolist()
    by_label = {dataset.concepts[c].label: i for i, c in enumerate(concepts)}
    chosen = [by_label[label] for label in featured if label in by_label]
    rest = [i for i in np.random.default_rng(seed).permutation(len(files)).tolist() if i not in set(chosen)]
    chosen = chosen + rest[: max(0, n - len(chosen))]
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in sorted(chosen, key=lambda j: dataset.concepts[concepts[j]].label):
        concept = dataset.concepts[concepts[i]]
        name = f"{slug(concept.label)}.png"
        shutil.copyfile(files[i], out / name)
        entries.append({"file": name, "label": concept.label, "hexcode": concept.hexcode, "is_flag": concept.is_flag})
    (out / "index.json").write_text(json.dumps(entries, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "ATTRIBUTION.md").write_text(ATTRIBUTION.format(n=len(entries), version=version), encoding="utf-8")
    apache = Path("/usr/share/common-licenses/Apache-2.0")
    header = "Noto Color Emoji images: Copyright Google LLC, licensed under the Apache License, Version 2.0.\n\n"
    if apache.is_file():
        (out / "LICENSE-NOTO.txt").write_text(header + apache.read_text(encoding="utf-8"), encoding="utf-8")
    return entries
