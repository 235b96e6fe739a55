"""Training data in memory: RGBA sprites, the captions of each concept, their locked text embeddings,
and (for emoji) a pool of scene compositions with relational captions.

A *concept* is what a caption names: an emoji (CLDR name), or for a user's pairs file one distinct
caption. Batches hold each concept at most once, so a batch never contains a false negative.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from .emoji_data import TRAIN_STYLES, EmojiDataset
from .pairs import Pair

SINGLE_TEMPLATES = ("an emoji of {}", "{} emoji", "a picture of {}")
# layout 0: A left of B; layout 1: A above B.
SCENE_TEMPLATES = {
    0: ("{a} next to {b}", "{a} on the left and {b} on the right", "{a} to the left of {b}",
        "{b} to the right of {a}", "{a} and {b}"),
    1: ("{a} above {b}", "{b} below {a}", "{a} on top of {b}", "{b} under {a}", "{a} and {b}"),
}


@dataclass(frozen=True)
class TrainData:
    sprites: np.ndarray  # uint8 [N, S, S, 4] RGBA
    sprite_concepts: np.ndarray  # int [N]
    concept_captions: list[np.ndarray]  # per concept: caption indices, the first is the main caption
    captions: list[str]
    text_embeds: np.ndarray  # float32 [M, D] locked text-tower embeddings of `captions`
    train_idx: np.ndarray  # sprite indices used for training
    val_idx: np.ndarray  # sprite indices held out for the periodic evaluation
    scenes: np.ndarray  # int [K, 4]: concept a, concept b, layout, caption index (may be empty)

    @property
    def image_size(self) -> int:
        return int(self.sprites.shape[1])


def article(label: str) -> str:
    if not label or not label[0].islower():
        return label
    return ("an " if label[0] in "aeiou" else "a ") + label


def _split(n: int, val_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    n_val = int(round(n * val_fraction)) if n > 10 else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def emoji_train_data(dataset: EmojiDataset, embed: Callable[[Sequence[str]], np.ndarray],
                     styles: Sequence[str] = TRAIN_STYLES, n_scenes: int = 20000, val_fraction: float = 0.03,
                     seed: int = 0) -> TrainData:
    """Sprites of the training styles, CLDR captions (+ templates and keywords) and scene captions."""
    rng = np.random.default_rng(seed)
    sets = [dataset.sprites(s) for s in styles]
    sprites = np.concatenate([s.images for s in sets])
    sprite_concepts = np.concatenate([s.concepts for s in sets]).astype(np.int64)
    captions: list[str] = []
    concept_captions: list[np.ndarray] = []
    for c in dataset.concepts:
        variants = [c.label, *(t.format(c.label) for t in SINGLE_TEMPLATES)]
        if c.tags:
            variants.append(f"{c.label}: {', '.join(c.tags[:6])}" if c.tone == 0 else c.label)
        start = len(captions)
        captions.extend(variants)
        concept_captions.append(np.arange(start, len(captions)))
    train_idx, val_idx = _split(len(sprites), val_fraction, rng)
    present = np.unique(sprite_concepts[train_idx])
    scenes = []
    for _ in range(n_scenes):
        a, b = rng.choice(present, 2, replace=False)
        layout = int(rng.integers(2))
        template = SCENE_TEMPLATES[layout][int(rng.integers(len(SCENE_TEMPLATES[layout])))]
        la, lb = article(dataset.concepts[a].label), article(dataset.concepts[b].label)
        scenes.append((a, b, layout, len(captions)))
        captions.append(template.format(a=la, b=lb))
    text_embeds = embed(captions)
    return TrainData(sprites, sprite_concepts, concept_captions, captions, text_embeds, train_idx, val_idx,
                     np.array(scenes, dtype=np.int64).reshape(-1, 4))


def load_sprite(path: Path, size: int) -> np.ndarray:
    """An image file fitted (aspect kept) into a transparent size×size RGBA canvas."""
    from ..model.preprocess import open_image

    image = open_image(path)
    with Image.open(path) as raw:  # keep real transparency when the file has it
        if raw.mode in ("RGBA", "LA", "PA") or "transparency" in raw.info:
            image = raw.convert("RGBA")
    image = image.convert("RGBA")
    image.thumbnail((size, size), Image.Resampling.BICUBIC)
    canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return np.asarray(canvas, dtype=np.uint8)


def pairs_train_data(pairs: Sequence[Pair], embed: Callable[[Sequence[str]], np.ndarray], size: int,
                     val_fraction: float = 0.05, seed: int = 0) -> TrainData:
    """A user's pairs file: each distinct caption is a concept; images are loaded once into memory."""
    rng = np.random.default_rng(seed)
    captions = sorted({p.caption for p in pairs})
    index = {c: i for i, c in enumerate(captions)}
    sprites = np.stack([load_sprite(p.image, size) for p in pairs])
    sprite_concepts = np.array([index[p.caption] for p in pairs], dtype=np.int64)
    train_idx, val_idx = _split(len(pairs), val_fraction, rng)
    return TrainData(sprites, sprite_concepts, [np.array([i]) for i in range(len(captions))], captions,
                     embed(captions), train_idx, val_idx, np.zeros((0, 4), dtype=np.int64))


def captions_key(captions: Sequence[str], tower_id: str) -> str:
    digest = hashlib.sha256(tower_id.encode())
    for c in captions:
        digest.update(c.encode("utf-8") + b"\0")
    return digest.hexdigest()[:16]


class BatchSampler:
    """Batches of distinct concepts: singles walk through the training images epoch by epoch, scenes are
    drawn from the pool among concepts not already in the batch."""

    def __init__(self, data: TrainData, batch_size: int, scene_fraction: float, seed: int,
                 main_caption_p: float = 0.7) -> None:
        self.data = data
        self.n_scenes = int(round(batch_size * scene_fraction)) if len(data.scenes) else 0
        self.n_singles = batch_size - self.n_scenes
        self.rng = np.random.default_rng(seed)
        self.main_caption_p = main_caption_p
        self.queue: list[int] = []
        self.deferred: list[int] = []
        self.epochs_done = 0

    def _next_single(self, taken: set[int]) -> int | None:
        for _ in range(len(self.deferred)):
            idx = self.deferred.pop(0)
            if int(self.data.sprite_concepts[idx]) not in taken:
                return idx
            self.deferred.append(idx)
        while True:
            if not self.queue:
                self.queue = self.rng.permutation(self.data.train_idx).tolist()
                self.epochs_done += 1
            idx = self.queue.pop()
            if int(self.data.sprite_concepts[idx]) not in taken:
                return idx
            self.deferred.append(idx)
            if len(self.deferred) > 10 * self.n_singles:
                return None

    def next(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(single sprite indices, their caption indices, scene rows)."""
        taken: set[int] = set()
        singles, caps = [], []
        n_concepts = len(np.unique(self.data.sprite_concepts[self.data.train_idx]))
        for _ in range(min(self.n_singles, n_concepts)):
            idx = self._next_single(taken)
            if idx is None:
                break
            concept = int(self.data.sprite_concepts[idx])
            taken.add(concept)
            singles.append(idx)
            options = self.data.concept_captions[concept]
            use_main = len(options) == 1 or self.rng.random() < self.main_caption_p
            caps.append(int(options[0] if use_main else options[self.rng.integers(1, len(options))]))
        scenes = []
        tries = 0
        while len(scenes) < self.n_scenes and tries < 20 * self.n_scenes:
            tries += 1
            row = self.data.scenes[self.rng.integers(len(self.data.scenes))]
            a, b = int(row[0]), int(row[1])
            if a in taken or b in taken:
                continue
            taken.update((a, b))
            scenes.append(row)
        scene_rows = np.array(scenes, dtype=np.int64).reshape(-1, 4)
        return np.array(singles, dtype=np.int64), np.array(caps, dtype=np.int64), scene_rows

    def state(self) -> dict:
        return {"queue": list(self.queue), "deferred": list(self.deferred), "epochs_done": self.epochs_done}

    def load_state(self, state: dict) -> None:
        self.queue = list(state["queue"])
        self.deferred = list(state["deferred"])
        self.epochs_done = int(state["epochs_done"])
