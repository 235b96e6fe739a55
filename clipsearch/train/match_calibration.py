"""Calibrating a bundle's match probability (`clipsearch train calibrate-match`), torch-free.

Platt scaling of the re-ranking score: `match` = σ(a·s + b), where s = ITM match logit + λ·ITC cosine is the final
score `search --rerank` sorts by, so the probability follows the result order. a and b are fitted by logistic
regression (Newton's method, Platt's smoothed targets) on pairs (s, whether the candidate shows what the query
names) made exactly as a search makes them: each query's top-k images by the dual encoder, their tokens through
the codec the index stores them with, one ITM call per query.

Fitting set for the emoji models: the ITM head's own validation split (held-out emoji families of the styles
only the head trains on, `family_split` with the head run's fraction and seed): never trained on, never Noto.
Held-out Noto is then scored once with the fitted values. Reported per set: expected calibration error (ECE, 10
equal-width bins, weighted by count) and Brier score, of the head's softmax and of the calibrated probability.
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np


@dataclass(frozen=True)
class RerankPairs:
    """One row per (query, re-ranked candidate): final score, the head's softmax, and whether it is a match."""

    scores: np.ndarray  # float64 [P]
    softmax: np.ndarray  # float64 [P]
    labels: np.ndarray  # bool [P]
    queries: int


@dataclass(frozen=True)
class Reliability:
    pairs: int
    positives: int
    ece: float
    brier: float


@dataclass(frozen=True)
class MatchCalibration:
    scale: float
    bias: float
    fitted_on: str
    fit: dict  # set name -> {"softmax": Reliability, "calibrated": Reliability}
    k: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    def model_json_entry(self) -> dict:
        return {"scale": round(self.scale, 6), "bias": round(self.bias, 6), "fitted_on": self.fitted_on,
                "k": self.k, "how": "clipsearch train calibrate-match (Platt scaling of the final re-ranking score)"}


def rerank_pairs(bundle: Path | str, images: Sequence[bytes | Path], image_concepts: Sequence[int],
                 queries: Sequence[str], query_concepts: Sequence[int], k: int = 32, threads: int | None = None,
                 log: Callable[[str], None] = print) -> RerankPairs:
    """Re-rank every query's ITC top `k` among `images` as `Searcher` does and return the scored pairs."""
    from .evaluate_rerank import embed_with_stored_tokens, rerank_queries, reranking_model

    model = reranking_model(bundle, threads)
    image_emb, image_tokens = embed_with_stored_tokens(model, images)
    concepts = np.asarray(image_concepts)
    scores, softmax, labels = [], [], []
    for (order, itm, final), target in zip(rerank_queries(model, image_emb, image_tokens, queries, k, log),
                                           query_concepts):
        scores.append(final.astype(np.float64))
        softmax.append(itm.probability.astype(np.float64))
        labels.append(concepts[order[:k]] == target)
    return RerankPairs(np.concatenate(scores), np.concatenate(softmax), np.concatenate(labels), len(queries))


def fit_platt(scores: np.ndarray, labels: np.ndarray, iterations: int = 100) -> tuple[float, float]:
    """(a, b) minimising the log loss of σ(a·s + b) against Platt's smoothed targets (positives (N+ + 1)/(N+ + 2),
    negatives 1/(N- + 2)), by Newton's method on standardised scores."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    positives, negatives = int(y.sum()), int((~y).sum())
    if positives == 0 or negatives == 0:
        raise ValueError("calibration needs both matching and non-matching pairs")
    target = np.where(y, (positives + 1.0) / (positives + 2.0), 1.0 / (negatives + 2.0))
    mean, std = s.mean(), s.std() or 1.0
    x = np.stack([(s - mean) / std, np.ones_like(s)], axis=1)
    w = np.zeros(2)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        gradient = x.T @ (p - target)
        hessian = (x * (p * (1 - p))[:, None]).T @ x + 1e-9 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    scale = w[0] / std
    return float(scale), float(w[1] - scale * mean)


def reliability(probabilities: np.ndarray, labels: np.ndarray, bins: int = 10) -> Reliability:
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 0.0, 1.0)
    y = np.asarray(labels, dtype=np.float64)
    which = np.minimum((p * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            ece += inside.sum() / len(p) * abs(p[inside].mean() - y[inside].mean())
    return Reliability(len(p), int(y.sum()), round(float(ece), 4), round(float(np.mean((p - y) ** 2)), 4))


def head_validation_set(dataset, styles: Sequence[str] | None = None, fraction: float = 0.15,
                        seed: int = 0) -> tuple[list[bytes], list[int], list[str], list[int]]:
    """(PNG bytes, concept per image, query names, concept per query) of the ITM head's validation families:
    the split `clipsearch train itm` chose λ on (same styles, fraction and seed as its defaults)."""
    from PIL import Image

    from .emoji_data import HEAD_STYLES
    from .itm_data import family_split

    sets = [dataset.sprites(s) for s in (styles or HEAD_STYLES)]
    sprites = np.concatenate([s.images for s in sets])
    sprite_concepts = np.concatenate([s.concepts for s in sets]).astype(np.int64)
    _, val = family_split(dataset.concepts, sprite_concepts, fraction, seed)
    images = []
    for index in val:
        out = io.BytesIO()
        Image.fromarray(sprites[index]).save(out, format="PNG")  # RGBA: composited on white as the indexer does
        images.append(out.getvalue())
    concepts = [int(sprite_concepts[i]) for i in val]
    query_concepts = sorted(set(concepts))
    return images, concepts, [dataset.concepts[c].label for c in query_concepts], query_concepts


def calibrate(fitting: RerankPairs, fitted_on: str, held_out: dict[str, RerankPairs], k: int,
              started: float) -> MatchCalibration:
    from ..model.itm import calibrated_match

    scale, bias = fit_platt(fitting.scores, fitting.labels)
    fit = {}
    for name, pairs in {fitted_on: fitting, **held_out}.items():
        calibrated = calibrated_match(pairs.scores, scale, bias)
        fit[name] = {"softmax": asdict(reliability(pairs.softmax, pairs.labels)),
                     "calibrated": asdict(reliability(calibrated, pairs.labels)), "queries": pairs.queries}
    return MatchCalibration(scale, bias, fitted_on, fit, k, time.perf_counter() - started)


def write_calibration(bundle: Path | str, calibration: MatchCalibration) -> dict:
    """Record the fit in model.json's "itm" object (model.json is not hashed; the model id does not change)."""
    from ..model.bundle import update_model_json

    def record(meta: dict) -> None:
        if not isinstance(meta.get("itm"), dict):
            raise ValueError(f"{bundle} has no ITM head")
        meta["itm"]["calibration"] = calibration.model_json_entry()

    return update_model_json(bundle, record)["itm"]["calibration"]
