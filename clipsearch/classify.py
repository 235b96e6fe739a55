"""Zero-shot classification with CLIP's prompt ensembling.

Each label is embedded through several prompt templates; the normalised embeddings are averaged and
normalised again (Radford et al. 2021, §3.1.4). Probabilities are a softmax over the model's
logit_scale × cosine similarity. A `Classifier` embeds the labels once and classifies any number of
images (or already-indexed vectors) against them; a `LabelCache` shared by several classifiers (the web
app keeps one) embeds each label once per model.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np

from .errors import QueryError

# The 7-template ensemble that CLIP's authors selected on ImageNet (CLIP repository, "Prompt_Engineering_for_ImageNet").
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
MAX_LABELS = 1000
# Labels embedded per model call: bounds the text batch (labels x templates prompts) whatever the label count.
LABELS_PER_BATCH = 16


@dataclass(frozen=True)
class LabelScore:
    label: str
    probability: float
    similarity: float


def parse_labels(text: str | None = None, file: str | os.PathLike[str] | None = None) -> list[str]:
    """Labels from a comma-separated string and/or a file (one per line or comma-separated); '#' comments."""
    raw: list[str] = []
    if text:
        raw.extend(text.split(","))
    if file is not None:
        try:
            content = Path(file).read_text(encoding="utf-8-sig")  # a BOM is not part of the first label
        except OSError as exc:
            raise QueryError(f"{file}: cannot read labels file ({exc.strerror or exc})") from exc
        except UnicodeDecodeError as exc:
            raise QueryError(f"{file}: labels file is not UTF-8 text") from exc
        for line in content.splitlines():
            line = line.split("#", 1)[0]
            raw.extend(line.split(","))
    labels: list[str] = []
    for label in (item.strip() for item in raw):
        if label and label not in labels:
            labels.append(label)
    if not labels:
        raise QueryError("no labels given", 'Give them comma-separated, e.g. "cat,dog,car" (the CLI also takes '
                                            '--labels-file FILE).')
    if len(labels) > MAX_LABELS:
        raise QueryError(f"{len(labels)} labels is more than {MAX_LABELS}")
    return labels


class LabelCache:
    """A bounded LRU of ensembled label embeddings keyed by (model id, templates, label); thread-safe.

    Owned by whoever shares it (e.g. one per web app): there is no process-wide cache."""

    def __init__(self, max_entries: int = 4096) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, tuple[str, ...], str], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, model_id: str, templates: tuple[str, ...], labels: Sequence[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        with self._lock:
            for label in labels:
                key = (model_id, templates, label)
                vector = self._entries.get(key)
                if vector is not None:
                    self._entries.move_to_end(key)
                    found[label] = vector
        return found

    def put(self, model_id: str, templates: tuple[str, ...], vectors: dict[str, np.ndarray]) -> None:
        with self._lock:
            for label, vector in vectors.items():
                key = (model_id, templates, label)
                self._entries[key] = vector
                self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)


def fill_template(template: str, label: str) -> str:
    """`template` with every ``{}`` replaced by `label`; any other brace is kept as written (not str.format, which
    raises on ``{name}`` or a lone ``{`` that a user's template may hold)."""
    return template.replace("{}", label)


class Classifier:
    """Labels embedded once with prompt ensembling; classify images or vectors against them."""

    def __init__(self, model, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                 cache: LabelCache | None = None) -> None:
        if not labels:
            raise QueryError("no labels given")
        if not templates or any("{}" not in t for t in templates):
            raise QueryError("every prompt template must contain '{}'")
        tokenizer = getattr(model, "tokenizer", None)
        for label in labels:  # an all-[UNK] label embeds like every other one: a coin toss between them
            if tokenizer is not None and tokenizer.knows_none_of(label):
                from .model.tokenizer import unknown_words_error

                raise unknown_words_error(model.info.name, label, "the label ")
        if tokenizer is not None and len({label.casefold() for label in labels}) < len(labels):
            # "heart" and "Heart" to a lowercasing tokenizer: one text, whose probability the two would split.
            seen: dict[tuple[int, ...], str] = {}
            for label, ids in zip(labels, tokenizer.token_ids(list(labels))):
                first = seen.setdefault(tuple(ids), label)
                if first != label:
                    raise QueryError(f"labels {first!r} and {label!r} are the same text to model {model.info.name} "
                                     "(its tokenizer reads them alike): they would split one probability",
                                     "Give each label once.")
        self.model = model
        self.labels = list(labels)
        self.templates = tuple(templates)
        self.logit_scale = float(model.info.logit_scale)
        self.cache = cache
        self.label_vectors = self._label_vectors()

    def _label_vectors(self) -> np.ndarray:
        model_id = str(getattr(self.model, "model_id", "")) if self.cache is not None else ""
        found = self.cache.get(model_id, self.templates, self.labels) if self.cache is not None else {}
        missing = [label for label in dict.fromkeys(self.labels) if label not in found]
        for start in range(0, len(missing), LABELS_PER_BATCH):
            batch = missing[start:start + LABELS_PER_BATCH]
            fresh = dict(zip(batch, self._embed_labels(batch)))
            if self.cache is not None and model_id:
                self.cache.put(model_id, self.templates, fresh)
            found.update(fresh)
        return np.stack([found[label] for label in self.labels]).astype(np.float32)

    def _embed_labels(self, labels: Sequence[str]) -> np.ndarray:
        prompts = [fill_template(template, label) for label in labels for template in self.templates]
        encoded = self.model.encode_text(prompts).reshape(len(labels), len(self.templates), -1)
        encoded /= np.linalg.norm(encoded, axis=-1, keepdims=True)
        mean = encoded.mean(axis=1)
        return (mean / np.linalg.norm(mean, axis=-1, keepdims=True)).astype(np.float32)

    def probabilities(self, image_vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities [N, L], cosine similarities [N, L]) for L2-normalised image vectors [N, D]."""
        similarity = np.asarray(image_vectors, dtype=np.float32).reshape(-1, self.label_vectors.shape[1]) @ self.label_vectors.T
        logits = self.logit_scale * similarity
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True), similarity

    def classify_vector(self, vector: np.ndarray) -> list[LabelScore]:
        probs, sims = self.probabilities(vector[None, :])
        return self._ranked(probs[0], sims[0])

    def classify_vectors(self, vectors: np.ndarray) -> list[list[LabelScore]]:
        probs, sims = self.probabilities(vectors)
        return [self._ranked(p, s) for p, s in zip(probs, sims)]

    def classify_image(self, image) -> list[LabelScore]:
        """`image`: a PIL image, a path, or bytes."""
        return self.classify_vector(self.model.encode_images([_as_image(image)])[0])

    def _ranked(self, probs: np.ndarray, sims: np.ndarray) -> list[LabelScore]:
        order = np.argsort(-probs, kind="stable")
        return [LabelScore(self.labels[i], float(probs[i]), float(sims[i])) for i in order]


def _as_image(image):
    from PIL import Image

    from .model.preprocess import open_image

    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    return open_image(image)


def classify(model, image: "str | os.PathLike[str] | bytes | BinaryIO | object", labels: Sequence[str],
             templates: Sequence[str] = DEFAULT_TEMPLATES) -> list[tuple[str, float]]:
    """Zero-shot classify one image: [(label, probability)], most likely first."""
    return [(s.label, s.probability) for s in Classifier(model, labels, templates).classify_image(image)]
