"""Training data of the fusion ITM head: features of rendered emoji and captions, computed once with
onnxruntime from the very graphs of the bundle the head is for (so the head learns from what the product
computes at index and query time, int8 text graph included), plus the negatives that teach it what a dual
encoder blurs.

* Images: every training-style sprite on white (as the runtime composites transparency) and `copies`
  augmented renderings of it; two-emoji scenes side by side or one above the other.
* Captions: each concept's CLDR name and templates; each scene's caption, its swapped caption ("B next to
  A" for a picture of A left of B) and one with the other relation ("A above B" for a side-by-side picture).
* Minimal pairs: concepts whose names differ in exactly one word ("man cook"/"woman cook", "left arrow"/
  "right arrow", "thumbs up: dark skin tone"/"thumbs up: medium-dark skin tone", "red heart"/"blue heart"),
  or by a skin-tone suffix only ("thumbs up"/"thumbs up: dark skin tone"). Their names are the constructed
  negatives of each other's images.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from .data import SCENE_TEMPLATES, SINGLE_TEMPLATES, article

if TYPE_CHECKING:
    from .emoji_data import Concept

SKIN_TONE_SUFFIX = " skin tone"


# The words a dual encoder blurs: a minimal pair swaps one of these for another of these.
MODIFIERS = frozenset("""
    light medium-light medium medium-dark dark
    man woman person men women people boy girl boys girls
    left right up down upper lower
    red orange yellow green blue purple brown black white pink grey gray
    one two three four five six seven eight nine ten
""".split())


def _words(label: str) -> list[str]:
    return label.lower().replace(",", " ,").replace(":", " :").split()


def minimal_pairs(labels: Sequence[str]) -> dict[int, list[int]]:
    """concept -> the concepts whose label is the same but for one modifier word (skin tone, gender, direction,
    colour, count) swapped for another, or for a skin-tone suffix after a colon ("thumbs up" /
    "thumbs up: dark skin tone"). Labels of one word have no minimal pair."""
    words = [_words(label) for label in labels]
    buckets: dict[tuple, list[int]] = {}
    for i, w in enumerate(words):
        for pos in range(len(w)):
            if len(w) > 1 and w[pos] in MODIFIERS:
                buckets.setdefault((tuple(w[:pos]), tuple(w[pos + 1:])), []).append(i)
    pairs: dict[int, set[int]] = {}
    for members in buckets.values():
        for i in members:
            for j in members:
                if i != j:
                    pairs.setdefault(i, set()).add(j)
    by_label = {label.lower(): i for i, label in enumerate(labels)}
    for i, label in enumerate(labels):
        base, sep, rest = label.lower().partition(": ")
        if sep and rest.endswith(SKIN_TONE_SUFFIX) and "," not in rest and base in by_label:
            j = by_label[base]
            pairs.setdefault(i, set()).add(j)
            pairs.setdefault(j, set()).add(i)
    return {i: sorted(js) for i, js in pairs.items()}


@dataclass(frozen=True)
class Scene:
    a: int
    b: int
    layout: int  # 0: a left of b, 1: a above b
    caption: int
    negatives: tuple[int, ...]  # swapped and other-relation captions


@dataclass
class Captions:
    texts: list[str]
    index: dict[str, int]

    def add(self, text: str) -> int:
        if text not in self.index:
            self.index[text] = len(self.texts)
            self.texts.append(text)
        return self.index[text]


def concept_caption_ids(captions: Captions, labels: Sequence[str]) -> list[list[int]]:
    """Per concept: its name, then the single templates (same order for every concept, so a minimal-pair
    negative can take the same template)."""
    return [[captions.add(label), *(captions.add(t.format(label)) for t in SINGLE_TEMPLATES)] for label in labels]


def make_scenes(captions: Captions, labels: Sequence[str], concepts: np.ndarray, n: int,
                rng: np.random.Generator) -> list[Scene]:
    scenes = []
    for _ in range(n):
        a, b = (int(x) for x in rng.choice(concepts, 2, replace=False))
        layout = int(rng.integers(2))
        templates = SCENE_TEMPLATES[layout][:-1]  # "A and B" says nothing about the layout
        t = int(rng.integers(len(templates)))
        la, lb = article(labels[a]), article(labels[b])
        caption = captions.add(templates[t].format(a=la, b=lb))
        swapped = captions.add(templates[t].format(a=lb, b=la))
        other = SCENE_TEMPLATES[1 - layout][:-1]
        wrong = captions.add(other[int(rng.integers(len(other)))].format(a=la, b=lb))
        scenes.append(Scene(a, b, layout, caption, (swapped, wrong)))
    return scenes


@dataclass
class ItmFeatures:
    """Everything the head trains on, as arrays (cached as .npz in the work folder)."""

    image_embeds: np.ndarray  # float32 [N, E]
    feature_maps: np.ndarray  # float16 [N, C, H, W]
    image_concepts: np.ndarray  # int [N]; -1 for scenes
    image_scene: np.ndarray  # int [N]; scene index, -1 for singles
    image_val: np.ndarray  # bool [N]: validation sprite (clean rendering), never trained on
    text_embeds: np.ndarray  # float32 [M, E]
    text_states: np.ndarray  # float16 [sum of lengths, Dt]
    text_offsets: np.ndarray  # int64 [M + 1]
    image_unseen: np.ndarray | None = None  # bool [N]: art of a head style, which the towers never saw
    # The renderings themselves, for a head with its own image branch: uint8 [N, 3, S, S] and the bundle's
    # normalisation (mean, std per channel)
    pixels: np.ndarray | None = None
    pixel_mean: np.ndarray | None = None
    pixel_std: np.ndarray | None = None

    def image_inputs(self, rows: np.ndarray, pixels: bool = False) -> np.ndarray:
        """What the head's image side reads for these rows: the tower's feature maps, or with `pixels` the
        normalised renderings (float32 [B, 3, S, S]) for a head with its own branch."""
        if not pixels:
            return self.feature_maps[rows].astype(np.float32)
        if self.pixels is None:
            raise ValueError("these features hold no pixels (computed without an image branch)")
        x = self.pixels[rows].astype(np.float32) / 255.0
        return (x - self.pixel_mean[None, :, None, None]) / self.pixel_std[None, :, None, None]

    def states(self, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Padded hidden states float32 [B, L, Dt] and attention mask int64 [B, L] of the given captions."""
        lengths = self.text_offsets[np.asarray(ids) + 1] - self.text_offsets[np.asarray(ids)]
        width = int(lengths.max())
        out = np.zeros((len(ids), width, self.text_states.shape[1]), dtype=np.float32)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for row, (i, n) in enumerate(zip(ids, lengths)):
            start = int(self.text_offsets[i])
            out[row, :n] = self.text_states[start:start + n]
            mask[row, :n] = 1
        return out, mask

    def save(self, path: Path) -> None:
        np.savez(path, **{k: v for k, v in self.__dict__.items() if v is not None})

    @classmethod
    def load(cls, path: Path) -> "ItmFeatures":
        with np.load(path) as raw:
            return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


@dataclass(frozen=True)
class ItmCorpus:
    labels: list[str]
    captions: list[str]
    concept_captions: list[list[int]]
    scenes: list[Scene]
    pairs: dict[int, list[int]]
    singles: np.ndarray  # sprite indices rendered as singles (training)
    val: np.ndarray  # sprite indices of the validation split
    first_unseen: int | None = None  # sprites from this index on are head styles' art (unseen by the towers)

    def key(self, extra: str) -> str:
        digest = hashlib.sha256(extra.encode())
        digest.update(json.dumps([self.captions, self.singles.tolist(), self.val.tolist()]).encode())
        return digest.hexdigest()[:16]


def build_corpus(labels: Sequence[str], sprite_concepts: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
                 n_scenes: int, seed: int, first_unseen: int | None = None) -> ItmCorpus:
    rng = np.random.default_rng(seed + 1)
    captions = Captions([], {})
    per_concept = concept_caption_ids(captions, labels)
    present = np.unique(sprite_concepts[train_idx])
    scenes = make_scenes(captions, labels, present, n_scenes, rng)
    return ItmCorpus(list(labels), captions.texts, per_concept, scenes, minimal_pairs(labels), train_idx, val_idx,
                     first_unseen)


def family_split(concepts: Sequence["Concept"], sprite_concepts: np.ndarray, val_fraction: float,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) sprite indices, split by emoji family (an emoji with all its skin tones): no
    validation image has a sibling of another tone, or the same emoji in another of these styles, in training."""
    families = sorted({c.base_label for c in concepts})
    rng = np.random.default_rng(seed)
    held = {families[i] for i in rng.permutation(len(families))[:int(round(len(families) * val_fraction))]}
    is_val = np.array([concepts[int(c)].base_label in held for c in sprite_concepts], dtype=bool)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def style_split(style_sizes: Sequence[int], held: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices over styles stacked in order (`style_sizes` images each): style `held` whole
    is the validation split, as Noto is held out of everything (its emoji are trained on in the other styles)."""
    is_val = np.concatenate([np.full(size, i == held) for i, size in enumerate(style_sizes)])
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def encode_texts_with_states(encode: Callable[[list[str]], tuple[np.ndarray, np.ndarray, np.ndarray]],
                             texts: Sequence[str], batch: int = 128,
                             log: Callable[[str], None] = print) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeds [M, E], ragged states [sum L, Dt] fp16, offsets [M + 1]); `encode` gives per batch the
    embeddings, the padded states and the lengths. Batches are formed by length, so padding stays small."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    embeds: list[np.ndarray | None] = [None] * len(texts)
    states: list[np.ndarray | None] = [None] * len(texts)
    for start in range(0, len(order), batch):
        ids = order[start:start + batch]
        emb, st, lengths = encode([texts[i] for i in ids])
        for row, i in enumerate(ids):
            embeds[i] = emb[row]
            states[i] = st[row, :lengths[row]].astype(np.float16)
        if (start // batch) % 50 == 0:
            log(f"  captions {start + len(ids)}/{len(texts)}")
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in states])
    return np.stack(embeds).astype(np.float32), np.concatenate(states), offsets
