"""The training loop: an image tower trained into a locked MiniLM text space (LiT) with the symmetric
InfoNCE loss of CLIP, AdamW, linear warm-up + cosine decay, bf16 autocast where the CPU has native bf16,
resumable checkpoints and a held-out evaluation every N steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ClipsearchError
from ..model.bundle import PreprocessSpec
from .augment import composite_white, render_batch
from .data import BatchSampler, TrainData, captions_key
from .evaluate import Recall, recall_at_k
from .towers import ConvImageTower, ConvTowerConfig, MiniLMTextTower, TextHead

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
TEXT_TOWER_ID = "all-MiniLM-L6-v2"


@dataclass(frozen=True)
class TrainConfig:
    work_dir: Path  # checkpoints and caches
    steps: int | None = None
    epochs: float | None = None  # passes over the training images (used when steps is None)
    batch_size: int = 256
    scene_fraction: float = 0.25
    lr: float = 2e-3
    head_lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_steps: int = 200
    eval_every: int = 250
    checkpoint_every: int = 250
    log_every: int = 25
    threads: int = 2
    seed: int = 0
    autocast: str = "auto"  # "auto" | "bf16" | "fp32"
    resume: bool = False
    fresh: bool = False  # start over even when the work folder holds an unfinished run's checkpoint
    time_budget_s: float | None = None  # stop (with the schedule fully decayed) after this much training time
    tower: ConvTowerConfig = field(default_factory=ConvTowerConfig)

    def total_steps(self, n_train_images: int) -> int:
        if self.steps is not None:
            return max(1, int(self.steps))
        singles = max(1, self.batch_size - int(round(self.batch_size * self.scene_fraction)))
        return max(1, int(math.ceil((self.epochs or 1.0) * n_train_images / singles)))


@dataclass(frozen=True)
class EvalPoint:
    step: int
    seconds: float
    loss: float
    val: Recall


@dataclass
class TrainResult:
    image_tower: ConvImageTower
    head: TextHead
    logit_scale: float
    steps: int
    seconds: float
    history: list[EvalPoint]
    preprocess: PreprocessSpec


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def preprocess_spec(size: int) -> PreprocessSpec:
    return PreprocessSpec(size=(size, size), resize_mode="longest", interpolation="bicubic", mean=MEAN, std=STD,
                          fill_color=255)


def normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def embed_texts(texts: Sequence[str], tower: MiniLMTextTower, tokenizer, batch: int = 256,
                log: Callable[[str], None] = print) -> np.ndarray:
    """Locked-tower embeddings of `texts` (sorted by length to pad little)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), tower.width), dtype=np.float32)
    tokenizer.no_padding()
    tokenizer.no_truncation()
    started = time.perf_counter()
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        enc = tokenizer.encode_batch([texts[i] for i in idx])
        width = min(128, max(len(e.ids) for e in enc))
        ids = np.zeros((len(idx), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for r, e in enumerate(enc):
            row = e.ids[:width]
            if len(e.ids) > width:
                row[-1] = e.ids[-1]
            ids[r, : len(row)] = row
            mask[r, : len(row)] = 1
        with torch.no_grad():
            out[idx] = tower(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        if start and start % (batch * 40) == 0:
            log(f"  embedded {start}/{len(texts)} captions ({time.perf_counter() - started:.0f}s)")
    return out


def cached_text_embedder(work_dir: Path, log: Callable[[str], None] = print) -> Callable[[Sequence[str]], np.ndarray]:
    """An `embed(captions)` that loads MiniLM lazily and caches results as .npy in work_dir."""

    def embed(captions: Sequence[str]) -> np.ndarray:
        cache = work_dir / f"text-{captions_key(captions, TEXT_TOWER_ID)}.npy"
        if cache.is_file():
            return np.load(cache)
        from tokenizers import Tokenizer

        from .towers import load_minilm, minilm_dir

        log(f"embedding {len(captions)} captions with the locked MiniLM text tower")
        values = embed_texts(captions, load_minilm(), Tokenizer.from_file(str(minilm_dir() / "tokenizer.json")), log=log)
        work_dir.mkdir(parents=True, exist_ok=True)
        np.save(cache, values)
        return values

    return embed


def lr_factor(step: int, warmup: int, progress: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 2% as `progress` goes 0 -> 1."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def embed_sprites(tower: ConvImageTower, sprites_u8: np.ndarray, batch: int = 512) -> np.ndarray:
    """Eval-mode image embeddings of RGBA sprites composited on white (torch side)."""
    tower.eval()
    parts = []
    with torch.no_grad():
        for start in range(0, len(sprites_u8), batch):
            parts.append(tower(normalise(composite_white(sprites_u8[start : start + batch]))).float().numpy())
    return np.concatenate(parts) if parts else np.zeros((0, tower.cfg.embed_dim), np.float32)


def evaluate_val(tower: ConvImageTower, head: TextHead, data: TrainData) -> Recall:
    """Text→image recall on the held-out training images (queries: each concept's main caption)."""
    if len(data.val_idx) == 0:
        return Recall(0, 0, 0.0, 0.0, 0.0)
    gallery_concepts = data.sprite_concepts[data.val_idx]
    image_emb = embed_sprites(tower, data.sprites[data.val_idx])
    concepts = np.unique(gallery_concepts)
    with torch.no_grad():
        text = head(torch.from_numpy(data.text_embeds[[int(data.concept_captions[c][0]) for c in concepts]])).numpy()
    return recall_at_k(text, image_emb, concepts, gallery_concepts)


def _param_groups(tower: nn.Module, head: TextHead, logit_scale: nn.Parameter, cfg: TrainConfig) -> list[dict]:
    decay, no_decay = [], []
    for p in tower.parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr},
        {"params": no_decay + [logit_scale], "weight_decay": 0.0, "lr": cfg.lr},
        {"params": list(head.parameters()), "weight_decay": 0.0, "lr": cfg.head_lr},
    ]


def _load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises pickle, zip and runtime errors for a damaged or foreign file
        raise ClipsearchError(f"{path} is not a readable training checkpoint ({str(exc)[:160]})",
                              "Start over with --fresh, or give another --work-dir.") from exc
    if not isinstance(state, dict) or "tower" not in state:
        raise ClipsearchError(f"{path} is not a clipsearch training checkpoint",
                              "Start over with --fresh, or give another --work-dir.")
    return state


def train(cfg: TrainConfig, data: TrainData, log: Callable[[str], None] = print) -> TrainResult:
    torch.set_num_threads(max(1, cfg.threads))
    torch.manual_seed(cfg.seed)
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ckpt_path = work / "checkpoint.pt"
    tower_cfg = ConvTowerConfig(**{**asdict(cfg.tower), "image_size": data.image_size})
    tower = ConvImageTower(tower_cfg).to(memory_format=torch.channels_last)
    head = TextHead(data.text_embeds.shape[1], tower_cfg.embed_dim)
    logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    total = cfg.total_steps(len(data.train_idx))
    opt = torch.optim.AdamW(_param_groups(tower, head, logit_scale, cfg), betas=(0.9, 0.98), eps=1e-6)
    warmup = min(cfg.warmup_steps, total // 5)
    base_lrs = [g["lr"] for g in opt.param_groups]
    sampler = BatchSampler(data, cfg.batch_size, cfg.scene_fraction, cfg.seed)
    use_bf16 = cfg.autocast == "bf16" or (cfg.autocast == "auto" and cpu_has_bf16())
    start_step, elapsed, history = 0, 0.0, []
    if not cfg.resume and not cfg.fresh and ckpt_path.is_file():
        earlier = _load_checkpoint(ckpt_path)
        if int(earlier.get("total", 0)) > int(earlier.get("step", 0)):
            raise ClipsearchError(
                f"{work} holds an unfinished run's checkpoint (step {earlier['step']} of {earlier['total']})",
                "Continue it with --resume, or start over (replacing it) with --fresh.")
    if cfg.resume and ckpt_path.is_file():
        state = _load_checkpoint(ckpt_path)
        try:
            tower.load_state_dict(state["tower"])
            head.load_state_dict(state["head"])
        except RuntimeError as exc:
            raise ClipsearchError(f"{ckpt_path} was trained with another tower than these settings "
                                  "(--widths, --image-size)",
                                  "Resume with the settings it was started with, or start over with --fresh.") from exc
        with torch.no_grad():
            logit_scale.copy_(state["logit_scale"])
        opt.load_state_dict(state["opt"])
        sampler.load_state(state["sampler"])
        start_step, elapsed = int(state["step"]), float(state["seconds"])
        history = state.get("history", [])
        if start_step >= total:
            # The run was already this far: resuming trains nothing (the learning-rate schedule is over).
            raise ClipsearchError(f"{ckpt_path} is at step {start_step}, and --steps asks for {total}: nothing is "
                                  "left to train",
                                  f"Resume with --steps larger than {start_step} (the run was started for "
                                  f"{state.get('total', '?')}), or start over with --fresh.")
        log(f"resumed from {ckpt_path} at step {start_step}")

    by_concept: dict[int, np.ndarray] = {}
    train_concepts = data.sprite_concepts[data.train_idx]
    for c in np.unique(train_concepts):
        by_concept[int(c)] = data.train_idx[train_concepts == c]
    text_embeds = torch.from_numpy(data.text_embeds)
    gen = torch.Generator().manual_seed(cfg.seed + start_step)
    rng = np.random.default_rng(cfg.seed + start_step)

    def save(step: int) -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"tower": tower.state_dict(), "head": head.state_dict(), "logit_scale": logit_scale.detach(),
                    "opt": opt.state_dict(), "sampler": sampler.state(), "step": step, "total": total,
                    "seconds": elapsed, "history": history, "tower_cfg": tower_cfg.to_dict()}, tmp)
        tmp.replace(ckpt_path)

    log(f"training {sum(p.numel() for p in tower.parameters()) / 1e6:.2f}M-parameter image tower for {total} steps "
        f"(batch {cfg.batch_size}, {len(data.train_idx)} training images, {len(data.scenes)} scene captions, "
        f"{'bf16' if use_bf16 else 'fp32'})")
    t0 = time.perf_counter()
    running = 0.0
    step, done = start_step, start_step

    def progress(step_: int) -> float:
        by_steps = (step_ - warmup) / max(1, total - warmup)
        if cfg.time_budget_s is None or step_ < warmup:
            return by_steps
        return max(by_steps, (elapsed + time.perf_counter() - t0) / cfg.time_budget_s)

    last = step >= total
    while not last:
        tower.train()
        factor = lr_factor(step, warmup, progress(step))
        for group, base in zip(opt.param_groups, base_lrs):
            group["lr"] = base * factor
        singles, caps, scenes = sampler.next()
        pick = lambda cs: np.array([rng.choice(by_concept[int(c)]) for c in cs], dtype=np.int64)  # noqa: E731
        a_idx, b_idx = pick(scenes[:, 0]), pick(scenes[:, 1])
        x = render_batch(data.sprites[singles], data.sprites[a_idx], data.sprites[b_idx], scenes[:, 2],
                         data.image_size, gen)
        text_idx = torch.from_numpy(np.concatenate([caps, scenes[:, 3]]))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            image = tower(normalise(x))
        text = head(text_embeds[text_idx])
        logits = logit_scale.exp().clamp(max=100) * image.float() @ text.T
        labels = torch.arange(len(logits))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = float(loss.detach())
        running = 0.9 * running + 0.1 * value if step > start_step else value
        step = done = step + 1
        last = done == total or (done >= warmup and progress(done) >= 1.0)
        if done % cfg.log_every == 0 or last:
            now = elapsed + time.perf_counter() - t0
            log(f"step {done}/{total}  loss {running:.3f}  lr {opt.param_groups[0]['lr']:.2e}  "
                f"scale {logit_scale.exp().item():.1f}  {now:.0f}s")
        if cfg.eval_every and (done % cfg.eval_every == 0 or last):
            val = evaluate_val(tower, head, data)
            now = elapsed + time.perf_counter() - t0
            history.append(EvalPoint(done, now, running, val))
            log(f"eval step {done}: val {val}")
        if cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or last):
            elapsed_save = elapsed
            elapsed = elapsed_save + time.perf_counter() - t0
            t0 = time.perf_counter()
            save(done)
    elapsed += time.perf_counter() - t0
    tower.eval()
    return TrainResult(tower, head, float(logit_scale.exp().clamp(max=100).item()), done, elapsed, history,
                       preprocess_spec(data.image_size))
