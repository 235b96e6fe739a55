"""Held-out evaluation of re-ranking with a bundle's ITM head, through the torch-free runtime.

For every query, the top `k` gallery images by the dual encoder (ITC) are re-scored by the head exactly as
`clipsearch search --rerank` does: image tokens from the visual graph, encoded and decoded with the codec the
index stores them with (int8 per token for emoji-mini), one ITM call per query, final score = match logit +
λ·cosine (λ from model.json). Reported: R@1/5/10 without and with re-ranking, over all queries and over the *compositional* queries — those whose concept has a
minimal pair in the gallery (a name that differs in one word or in a skin-tone suffix: "man cook"/"woman cook",
"thumbs up: dark skin tone"/"thumbs up: medium-dark skin tone"), the case a bag-of-words dual encoder blurs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from .evaluate import Gallery
from .itm_data import minimal_pairs

if TYPE_CHECKING:
    from ..model.itm import ItmScores


@dataclass(frozen=True)
class RankFigures:
    queries: int
    r1: float
    r5: float
    r10: float


@dataclass(frozen=True)
class RerankReport:
    bundle: str
    k: int
    itc_weight: float
    itc: RankFigures
    reranked: RankFigures
    compositional_itc: RankFigures
    compositional_reranked: RankFigures
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        def row(name: str, f: RankFigures) -> str:
            return f"{name:<28} {f.queries:>6} {f.r1:6.1f} {f.r5:6.1f} {f.r10:6.1f}"

        return [f"{'':<28} {'queries':>6} {'R@1':>6} {'R@5':>6} {'R@10':>6}",
                row("all, ITC only", self.itc), row(f"all, re-ranked top {self.k}", self.reranked),
                row("compositional, ITC only", self.compositional_itc),
                row(f"compositional, re-ranked top {self.k}", self.compositional_reranked),
                f"λ = {self.itc_weight:g}; {self.seconds:.0f} s"]


def _figures(ranked_concepts: list[np.ndarray], targets: np.ndarray, keep: np.ndarray) -> RankFigures:
    hits = {1: 0, 5: 0, 10: 0}
    for ranked, target, use in zip(ranked_concepts, targets, keep):
        if use:
            for k in hits:
                hits[k] += int((ranked[:k] == target).any())
    n = max(1, int(keep.sum()))
    return RankFigures(int(keep.sum()), 100.0 * hits[1] / n, 100.0 * hits[5] / n, 100.0 * hits[10] / n)


def compositional_queries(gallery: Gallery, labels: dict[int, str]) -> np.ndarray:
    """bool per query: its concept has a minimal pair among the gallery's concepts."""
    concepts = sorted(set(gallery.image_concepts))
    pairs = minimal_pairs([labels[c] for c in concepts])
    has_pair = {concepts[i] for i in pairs}
    return np.array([c in has_pair for c in gallery.query_concepts])


def embed_with_stored_tokens(model, images: Sequence[Path | bytes], batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [N, D], image tokens [N, T, Dv]) of image files or bytes, the tokens passed through the codec
    the index stores them with: what a search reads back."""
    from ..model.preprocess import load_pixels
    from ..store.collection import model_token_codec

    codec = model_token_codec(model)
    embeds, tokens = [], []
    for start in range(0, len(images), batch):
        pixels = np.stack([load_pixels(source, model.preprocess) for source in images[start:start + batch]])
        e, t = model.encode_pixels_with_tokens(pixels)
        embeds.append(e)
        tokens.append(codec.decode(codec.encode(t)))
    return np.concatenate(embeds), np.concatenate(tokens)


def reranking_model(bundle: Path | str, threads: int | None = None):
    """The bundle's `ClipModel`; ValueError when it has no ITM head."""
    from ..model.runtime import ClipModel

    model = ClipModel(bundle, threads=threads)
    if model.itm is None:
        raise ValueError(f"{bundle} has no ITM head")
    return model


def rerank_queries(model, image_emb: np.ndarray, image_tokens: np.ndarray, queries: Sequence[str], k: int,
                   log: Callable[[str], None]) -> Iterator[tuple[np.ndarray, ItmScores, np.ndarray]]:
    """Per query, in order, as `search --rerank` scores it: (gallery indices by ITC cosine, the head's scores of the
    top `k`, their final scores ITM match logit + λ·cosine)."""
    scorer = model.itm
    weight = scorer.spec.itc_weight
    for start in range(0, len(queries), 256):
        texts = list(queries[start:start + 256])
        sims = model.encode_text(texts) @ image_emb.T
        for text, sim in zip(texts, sims):
            order = np.argsort(-sim, kind="stable")
            top = order[:k]
            itm = scorer.score(text, image_tokens[top])
            yield order, itm, itm.match_logit + weight * sim[top]
        log(f"  {start + len(texts)}/{len(queries)} queries")


def evaluate_rerank(bundle: Path | str, gallery: Gallery, labels: dict[int, str], k: int = 32,
                    threads: int | None = None, log: Callable[[str], None] = print) -> RerankReport:
    started = time.perf_counter()
    model = reranking_model(bundle, threads)
    image_emb, image_tokens = embed_with_stored_tokens(model, gallery.images)
    g_concepts = np.asarray(gallery.image_concepts)
    itc_ranked, re_ranked = [], []
    for order, _, final in rerank_queries(model, image_emb, image_tokens, gallery.queries, k, log):
        itc_ranked.append(g_concepts[order[:10]])
        re_ranked.append(g_concepts[order[:k][np.argsort(-final, kind="stable")]][:10])
    targets = np.asarray(gallery.query_concepts)
    every = np.ones(len(targets), dtype=bool)
    comp = compositional_queries(gallery, labels)
    return RerankReport(str(bundle), k, model.itm.spec.itc_weight, _figures(itc_ranked, targets, every),
                        _figures(re_ranked, targets, every), _figures(itc_ranked, targets, comp),
                        _figures(re_ranked, targets, comp), time.perf_counter() - started)
