"""Training the fusion ITM head of a bundle (`clipsearch train itm`): features, negatives, loss, and λ.

Recipe (ALBEF's, over a frozen dual encoder): each step takes a batch of positive pairs with distinct
concepts (single emoji and two-emoji scenes); for every pair one hard negative text and one hard negative
image are drawn from the softmax of the dual encoder's own similarities with the positives masked, and
constructed negatives are added: a minimal-pair name for a single ("woman cook" for a man cook) and the
swapped or other-relation caption for a scene. Loss: 2-way cross-entropy over all of them. The image tokens
go through int8 rounding as the index stores them.

With art the towers never saw (the head styles, `ItmFeatures.image_unseen`), half of each batch's singles come
from it, each with two more negatives mined over the whole pool (the image's ITC look-alike names, the name's
look-alike images), and the listwise loss draws from it too.

λ (the ITC weight of the final score, ITM match logit + λ·cosine) is chosen on the validation split: held-out
emoji families of the head styles, or without them the training styles' sprites neither tower nor head trained
on; the value with the best R@1 of re-ranking the top 32, among those that do not lower R@10.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .itm_data import ItmCorpus, ItmFeatures
from .itm_head import ItmHead, ItmHeadConfig

ITC_WEIGHTS = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0, 100.0)
RERANK_K = 32


@dataclass(frozen=True)
class ItmTrainConfig:
    steps: int = 1500
    batch_singles: int = 64
    batch_scenes: int = 24
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 50
    mining_temperature: float = 1.0 / 50.0  # softmax(sim / T) over the batch for the hard negatives
    time_budget_s: float | None = None
    seed: int = 0
    log_every: int = 50
    # The re-ranking loss: queries whose candidates are their ITC top `rank_candidates` (distinct concepts among
    # the training renderings, the right one included), scored by ITM margin + λ·cosine (λ learned, starting
    # at rank_itc_weight), softmax cross-entropy towards the right image.
    rank_queries: int = 0  # off by default: on the training styles it lowered validation R@1 (MODEL_CARD); with
    # unseen art its queries and candidates come from that art
    rank_candidates: int = 16
    rank_itc_weight: float = 20.0
    init: str | None = None  # a head checkpoint to start from
    # With art the towers never saw (ItmFeatures.image_unseen): the share of each batch's singles drawn from it,
    # and for each such single two more negatives mined over the whole pool rather than the batch: a name among
    # the image's ITC top `global_k` names and an image among its name's ITC top `global_k` images — the
    # confusions the head meets when it re-ranks a top 32 (0: off).
    unseen_fraction: float = 0.5
    global_k: int = 16
    branch_lr_scale: float = 0.3  # a head with its own image branch: the branch's learning rate, relative
    style_jitter: bool = False  # ... and its training renderings through `style_jitter`


@dataclass
class ItmTrainResult:
    head: ItmHead
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    learned_itc_weight: float | None = None


class _Sampler:
    """Batches of distinct concepts: single renderings (training sprites) and scenes."""

    def __init__(self, features: ItmFeatures, corpus: ItmCorpus, cfg: ItmTrainConfig) -> None:
        self.f, self.c, self.cfg = features, corpus, cfg
        self.rng = np.random.default_rng(cfg.seed)
        train = ~features.image_val
        self.singles = np.flatnonzero(train & (features.image_scene < 0))
        self.scene_images = np.flatnonzero(features.image_scene >= 0)
        unseen = features.image_unseen if features.image_unseen is not None else np.zeros(len(train), bool)
        self.unseen = np.flatnonzero(train & (features.image_scene < 0) & unseen)
        self.seen = np.flatnonzero(train & (features.image_scene < 0) & ~unseen)
        self.near_names, self.near_images = ({}, {}) if not cfg.global_k else self._neighbours(cfg.global_k)

    def _neighbours(self, k: int) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
        """Per unseen training image: the concepts of its ITC top-k names (its own left out); per concept: its
        name's ITC top-k unseen training images of other concepts."""
        if not len(self.unseen):
            return {}, {}
        names = self.f.text_embeds[[c[0] for c in self.c.concept_captions]]
        images = self.f.image_embeds[self.unseen]
        k = max(1, min(k, len(names) - 1, len(images) - 1))
        concepts = self.f.image_concepts[self.unseen]
        near_names: dict[int, np.ndarray] = {}
        for start in range(0, len(images), 2048):
            sim = images[start:start + 2048] @ names.T
            sim[np.arange(len(sim)), concepts[start:start + 2048]] = -np.inf
            for row, top in zip(self.unseen[start:start + 2048], np.argpartition(-sim, k, axis=1)[:, :k]):
                near_names[int(row)] = top
        near_images: dict[int, np.ndarray] = {}
        present = np.unique(concepts)
        for start in range(0, len(present), 512):
            chunk = present[start:start + 512]
            sim = names[chunk] @ images.T
            sim[concepts[None, :] == chunk[:, None]] = -np.inf
            for concept, top in zip(chunk, np.argpartition(-sim, k, axis=1)[:, :k]):
                near_images[int(concept)] = self.unseen[top]
        return near_names, near_images

    def _single_candidates(self) -> np.ndarray:
        n = self.cfg.batch_singles * 3
        if not len(self.unseen) or not self.cfg.unseen_fraction:
            return self.rng.choice(self.singles, n, replace=False)
        m = min(int(round(n * self.cfg.unseen_fraction)), len(self.unseen))
        pool = np.concatenate([self.rng.choice(self.unseen, m, replace=False),
                               self.rng.choice(self.seen, min(n - m, len(self.seen)), replace=False)])
        self.rng.shuffle(pool)
        return pool

    def batch(self) -> tuple[np.ndarray, np.ndarray, list[int | None], list[tuple[int, int]]]:
        """(image rows, positive caption ids, constructed negative caption id or None per pair, the pool-mined
        negative pairs as (image row, caption id))."""
        rows, caps, negs = [], [], []
        mined: list[tuple[int, int]] = []
        taken: set[int] = set()
        for row in self._single_candidates():
            concept = int(self.f.image_concepts[row])
            if concept in taken:
                continue
            taken.add(concept)
            variants = self.c.concept_captions[concept]
            v = 0 if self.rng.random() < 0.6 else int(self.rng.integers(len(variants)))
            rows.append(row)
            caps.append(variants[v])
            mates = self.c.pairs.get(concept)
            negs.append(self.c.concept_captions[int(self.rng.choice(mates))][v] if mates else None)
            if int(row) in self.near_names:
                other = int(self.rng.choice(self.near_names[int(row)]))
                mined.append((int(row), self.c.concept_captions[other][v]))
            if concept in self.near_images:
                mined.append((int(self.rng.choice(self.near_images[concept])), variants[v]))
            if len(rows) == self.cfg.batch_singles:
                break
        n = 0
        for row in self.rng.choice(self.scene_images, self.cfg.batch_scenes * 3, replace=False):
            scene = self.c.scenes[int(self.f.image_scene[row])]
            if scene.a in taken or scene.b in taken:
                continue
            taken.update((scene.a, scene.b))
            rows.append(row)
            caps.append(scene.caption)
            negs.append(int(self.rng.choice(scene.negatives)))
            n += 1
            if n == self.cfg.batch_scenes:
                break
        return np.array(rows), np.array(caps), negs, mined

    def ranking_batch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(caption ids [B], candidate rows [B, K] of distinct concepts in ITC order with the right concept's
        best rendering among them, index of that one per query [B])."""
        k = self.cfg.rank_candidates
        pool = self.unseen if len(self.unseen) else self.singles  # unseen art: where the towers' top 1 is wrong
        rows = self.rng.choice(pool, self.cfg.rank_queries, replace=False)
        caps = []
        for row in rows:
            variants = self.c.concept_captions[int(self.f.image_concepts[row])]
            caps.append(variants[0] if self.rng.random() < 0.6 else variants[int(self.rng.integers(len(variants)))])
        caps = np.array(caps)
        sims = self.f.text_embeds[caps] @ self.f.image_embeds[pool].T
        wide = min(20 * k, sims.shape[1] - 1)  # enough renderings to hold k distinct concepts
        top = np.argpartition(-sims, wide, axis=1)[:, :wide]
        cands, targets = [], []
        for q, row in enumerate(rows):
            concept = int(self.f.image_concepts[row])
            order = top[q][np.argsort(-sims[q, top[q]])]
            seen: set[int] = set()
            chosen: list[int] = []
            for col in order:
                c = int(self.f.image_concepts[pool[col]])
                if c not in seen:
                    seen.add(c)
                    chosen.append(int(pool[col]))
                if len(chosen) == k:
                    break
            concepts = [int(self.f.image_concepts[r]) for r in chosen]
            if concept not in concepts:
                chosen[-1] = int(row)
                concepts[-1] = concept
            cands.append(chosen)
            targets.append(concepts.index(concept))
        return caps, np.array(cands), np.array(targets)


def _mine(sim: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """For each row, a column drawn from softmax(sim / T) with the diagonal masked."""
    logits = sim / temperature
    np.fill_diagonal(logits, -np.inf)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    cumulative = p.cumsum(axis=1)
    draws = rng.random((len(p), 1))
    return np.minimum((cumulative < draws).sum(axis=1), len(p) - 1)


def style_jitter(rgb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Changes of drawing style that keep an emoji's meaning, on RGB in [0, 1] [B, 3, H, W]: blur or sharpening,
    thicker or thinner dark outlines, saturation and gamma (never hue: a red heart stays red)."""
    b = len(rgb)

    def pick(p: float) -> torch.Tensor:
        return (torch.rand(b, 1, 1, 1, generator=gen) < p).float()

    blurred = F.avg_pool2d(F.pad(rgb, (1, 1, 1, 1), mode="replicate"), 3, 1)
    amount = torch.rand(b, 1, 1, 1, generator=gen)
    rgb = rgb + pick(0.25) * amount * (blurred - rgb) + pick(0.2) * amount * (rgb - blurred)  # blur / sharpen
    thick = -F.max_pool2d(-F.pad(rgb, (1, 1, 1, 1), mode="replicate"), 3, 1)  # dark strokes grow
    thin = F.max_pool2d(F.pad(rgb, (1, 1, 1, 1), mode="replicate"), 3, 1)
    rgb = rgb + pick(0.2) * 0.5 * (thick - rgb) + pick(0.15) * 0.5 * (thin - rgb)
    grey = (rgb * torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]).sum(1, keepdim=True)
    saturation = 0.6 + 0.7 * torch.rand(b, 1, 1, 1, generator=gen)
    rgb = grey + saturation * (rgb - grey)
    gamma = torch.exp((torch.rand(b, 1, 1, 1, generator=gen) - 0.5) * 0.4)
    return rgb.clamp(0.0, 1.0) ** gamma


def _tokens(head: ItmHead, features: ItmFeatures, rows: np.ndarray, jitter: torch.Generator | None = None
            ) -> torch.Tensor:
    """Image tokens of `rows` (repeats computed once); with `jitter`, a head with its own branch sees the
    renderings through `style_jitter`."""
    unique, inverse = np.unique(rows, return_inverse=True)
    inputs = torch.from_numpy(features.image_inputs(unique, head.branch is not None))
    if jitter is not None and head.branch is not None:
        mean = torch.from_numpy(features.pixel_mean)[None, :, None, None]
        std = torch.from_numpy(features.pixel_std)[None, :, None, None]
        inputs = (style_jitter(inputs * std + mean, jitter) - mean) / std
    tokens = head.image_tokens(inputs, torch.from_numpy(features.image_embeds[unique]))
    return tokens[torch.from_numpy(inverse.reshape(-1))]


def train_itm_head(features: ItmFeatures, corpus: ItmCorpus, head_cfg: ItmHeadConfig, cfg: ItmTrainConfig,
                   log: Callable[[str], None] = print, branch: torch.nn.Module | None = None) -> ItmTrainResult:
    """Train a head (with `branch`: one with its own image branch, reading the renderings' pixels)."""
    torch.manual_seed(cfg.seed)
    head = ItmHead(head_cfg, branch)
    if cfg.init:
        head, _ = load_head(Path(cfg.init))
        head.train()
    log_lambda = torch.nn.Parameter(torch.tensor(float(np.log(cfg.rank_itc_weight))))
    named = [(n, p) for n, p in head.named_parameters() if not n.startswith("branch.")]
    decay = [p for n, p in named if p.ndim >= 2 and "pos" not in n]
    other = [p for n, p in named if not (p.ndim >= 2 and "pos" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
              {"params": other + [log_lambda], "weight_decay": 0.0, "base_lr": cfg.lr}]
    if head.branch is not None:
        groups.append({"params": list(head.branch.parameters()), "weight_decay": 0.0,
                       "base_lr": cfg.lr * cfg.branch_lr_scale})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))
    sampler = _Sampler(features, corpus, cfg)
    rng = np.random.default_rng(cfg.seed + 7)
    jitter = torch.Generator().manual_seed(cfg.seed + 11) if cfg.style_jitter else None
    started = time.perf_counter()
    history: list[dict] = []
    running = None
    step = 0
    for step in range(1, cfg.steps + 1):
        elapsed = time.perf_counter() - started
        progress = max(step / cfg.steps, elapsed / cfg.time_budget_s if cfg.time_budget_s else 0.0)
        if progress >= 1.0:
            step -= 1
            break
        factor = min(1.0, step / cfg.warmup) * (0.02 + 0.98 * 0.5 * (1 + np.cos(np.pi * min(progress, 1.0))))
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor
        rows, caps, negs, mined = sampler.batch()
        sim = features.image_embeds[rows] @ features.text_embeds[caps].T
        neg_text = caps[_mine(sim, cfg.mining_temperature, rng)]
        neg_image = rows[_mine(sim.T.copy(), cfg.mining_temperature, rng)]
        built = [(r, n) for r, n in zip(rows, negs) if n is not None] + mined
        pair_rows = np.concatenate([rows, rows, neg_image, [r for r, _ in built]]).astype(np.int64)
        pair_caps = np.concatenate([caps, neg_text, caps, [n for _, n in built]]).astype(np.int64)
        labels = torch.zeros(len(pair_rows), dtype=torch.long)
        labels[:len(rows)] = 1
        states, mask = features.states(pair_caps)
        logits = head(torch.from_numpy(states), torch.from_numpy(mask), _tokens(head, features, pair_rows, jitter))
        # positives are a quarter of the pairs: weight them up to half of the loss
        weights = torch.where(labels == 1, float(len(labels) - len(rows)) / len(rows), 1.0)
        loss = (F.cross_entropy(logits, labels, reduction="none") * weights).sum() / weights.sum()
        if cfg.rank_queries:
            r_caps, r_rows, r_target = sampler.ranking_batch()
            b, k = r_rows.shape
            flat = r_rows.reshape(-1)
            states, mask = features.states(np.repeat(r_caps, k))
            tokens = _tokens(head, features, flat, jitter)
            pair = head(torch.from_numpy(states), torch.from_numpy(mask), tokens)
            margin = (pair[:, 1] - pair[:, 0]).view(b, k)
            itc = torch.from_numpy(np.einsum("bd,bkd->bk", features.text_embeds[r_caps], features.image_embeds[r_rows]))
            rank_loss = F.cross_entropy(margin + log_lambda.exp() * itc, torch.from_numpy(r_target))
            loss = loss + rank_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        value = float(loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        if step % cfg.log_every == 0:
            with torch.no_grad():
                acc = float((logits.argmax(1) == labels).float().mean())
            history.append({"step": step, "loss": round(running, 4), "acc": round(acc, 4),
                            "seconds": round(time.perf_counter() - started, 1)})
            log(f"itm step {step}/{cfg.steps}  loss {running:.3f}  acc {acc:.3f}  λ {float(log_lambda.exp()):.1f}  "
                f"lr {opt.param_groups[0]['lr']:.2e}  {time.perf_counter() - started:.0f}s")
    head.eval()
    return ItmTrainResult(head, step, time.perf_counter() - started, history, float(log_lambda.exp()))


@torch.no_grad()
def head_logits(head: ItmHead, features: ItmFeatures, caption: int, rows: np.ndarray) -> np.ndarray:
    """Match margin (logit 1 − logit 0) of one caption against image rows."""
    states, mask = features.states([caption])
    tokens = _tokens(head, features, rows)
    logits = head(torch.from_numpy(states).expand(len(rows), -1, -1), torch.from_numpy(mask).expand(len(rows), -1),
                  tokens)
    return (logits[:, 1] - logits[:, 0]).numpy()


@dataclass(frozen=True)
class RerankFigures:
    itc_weight: float
    r1: float
    r10: float


def validation_rerank(head: ItmHead, features: ItmFeatures, corpus: ItmCorpus,
                      weights=ITC_WEIGHTS, k: int = RERANK_K) -> tuple[RerankFigures, list[RerankFigures]]:
    """R@1/R@10 on the validation split (gallery: its sprites; queries: their names) for ITC alone
    (weight inf) and re-ranked with each λ; returns the chosen λ's figures and all of them."""
    rows = np.flatnonzero(features.image_val)
    concepts = features.image_concepts[rows]
    queries = sorted(set(int(c) for c in concepts))
    caps = [corpus.concept_captions[c][0] for c in queries]
    sims = features.text_embeds[caps] @ features.image_embeds[rows].T
    tops, margins = [], []
    for qi, cap in enumerate(caps):
        top = np.argsort(-sims[qi])[:k]
        tops.append(top)
        margins.append(head_logits(head, features, cap, rows[top]))

    def figures(weight: float) -> RerankFigures:
        r1 = r10 = 0
        for qi, concept in enumerate(queries):
            top = tops[qi]
            score = sims[qi, top] if np.isinf(weight) else margins[qi] + weight * sims[qi, top]
            ranked = concepts[top[np.argsort(-score, kind="stable")]]
            r1 += int(ranked[0] == concept)
            r10 += int((ranked[:10] == concept).any())
        return RerankFigures(weight, 100.0 * r1 / len(queries), 100.0 * r10 / len(queries))

    base = figures(float("inf"))
    rows_out = [base] + [figures(w) for w in weights]
    allowed = [f for f in rows_out[1:] if f.r10 >= base.r10] or rows_out[1:]
    chosen = max(allowed, key=lambda f: (f.r1, f.r10, -f.itc_weight))
    return chosen, rows_out


def save_head(head: ItmHead, path: Path, extra: dict | None = None) -> None:
    branch = {"branch": head.branch.spec} if head.branch is not None else {}
    torch.save({"cfg": head.cfg.to_dict(), "state": head.state_dict(), **branch, **(extra or {})}, path)


def load_head(path: Path) -> tuple[ItmHead, dict]:
    from .itm_branch import ConvBranch

    raw = torch.load(path, map_location="cpu", weights_only=False)
    head = ItmHead(ItmHeadConfig.from_dict(raw["cfg"]), ConvBranch(raw["branch"]) if raw.get("branch") else None)
    head.load_state_dict(raw["state"])
    head.eval()
    return head, raw
