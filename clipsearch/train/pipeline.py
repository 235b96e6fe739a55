"""End-to-end runs behind `clipsearch train`: data -> training -> bundles -> held-out figures.

Kept apart from the CLI so tests and scripts call the same code path as the command.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .. import paths
from ..errors import ClipsearchError
from .towers import ConvImageTower, ConvTowerConfig, TextHead


@dataclass(frozen=True)
class RunRequest:
    out: Path  # bundle folder of the first precision; further precisions go to OUT-<precision>
    name: str
    pairs: Path | None = None  # a user's pairs file, or None for the emoji dataset
    precisions: tuple[str, ...] = ("fp32",)
    work_dir: Path | None = None
    image_size: int = 64
    n_scenes: int = 20000
    evaluate_noto: bool = False
    source: dict = field(default_factory=dict)


def default_work_dir(name: str) -> Path:
    return paths.home() / "training" / name


def bundle_paths(out: Path, precisions: Sequence[str]) -> list[Path]:
    return [out if i == 0 else out.with_name(f"{out.name}-{p}") for i, p in enumerate(precisions)]


def load_checkpoint(path: Path) -> tuple[ConvImageTower, TextHead, float, dict]:
    """Image tower, text head and logit scale from a training checkpoint."""
    from .trainer import _load_checkpoint

    if not Path(path).is_file():
        raise ClipsearchError(f"{path}: no such checkpoint")
    state = _load_checkpoint(Path(path))
    tower = ConvImageTower(ConvTowerConfig.from_dict(state["tower_cfg"]))
    tower.load_state_dict(state["tower"])
    tower.eval()
    weight = state["head"]["proj.weight"]
    head = TextHead(weight.shape[1], weight.shape[0])
    head.load_state_dict(state["head"])
    scale = float(state["logit_scale"].exp().clamp(max=100).item())
    return tower, head, scale, state


def export_checkpoint(checkpoint: Path, out: Path, name: str, precisions: Sequence[str],
                      source: dict | None = None, log: Callable[[str], None] = print) -> list[Path]:
    """Write one bundle per precision from a checkpoint; returns their folders."""
    from .export_bundle import write_emoji_bundle
    from .towers import load_minilm
    from .trainer import preprocess_spec

    tower, head, scale, state = load_checkpoint(checkpoint)
    text_tower = load_minilm()
    meta = {"kind": "clipsearch-train", "steps": int(state["step"]), "train_seconds": round(float(state["seconds"]))}
    meta.update(source or {})
    written = []
    for precision, folder in zip(precisions, bundle_paths(Path(out), precisions)):
        bundle_name = name if folder.name == Path(out).name else f"{name}-{precision}"
        write_emoji_bundle(tower, head, folder, bundle_name, precision, preprocess_spec(tower.cfg.image_size), scale,
                           meta, text_tower)
        log(f"wrote {precision} bundle {folder} ({folder_size_mb(folder):.1f} MB)")
        written.append(folder)
    return written


def folder_size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file()) / 1e6


def run(request: RunRequest, cfg, log: Callable[[str], None] = print) -> list[Path]:
    """Build the training data, train (resuming when asked), export the bundles, optionally score Noto."""
    from .data import emoji_train_data, pairs_train_data
    from .emoji_data import build_emoji_dataset
    from .pairs import read_pairs
    from .trainer import cached_text_embedder, train

    work = Path(cfg.work_dir)
    embed = cached_text_embedder(work, log)
    if request.pairs is not None:
        data = pairs_train_data(read_pairs(request.pairs), embed, request.image_size, seed=cfg.seed)
        source = {"pairs": str(request.pairs)}
    else:
        dataset = build_emoji_dataset(size=request.image_size, log=log)
        data = emoji_train_data(dataset, embed, n_scenes=request.n_scenes, seed=cfg.seed)
        source = {"data": "emoji: twemoji + openmoji + fluent-flat + fluent-color (npm), CLDR names via emojibase-data"}
    result = train(cfg, data, log)
    log(f"trained {result.steps} steps in {result.seconds / 60:.1f} min")
    folders = export_checkpoint(work / "checkpoint.pt", request.out, request.name, request.precisions,
                                {**source, **request.source}, log)
    if request.pairs is None:
        from .emoji_data import MODEL_ATTRIBUTION

        for folder in folders:
            (folder / "ATTRIBUTION.md").write_text(MODEL_ATTRIBUTION, encoding="utf-8")
    if request.evaluate_noto:
        from .evaluate import evaluate_bundle, noto_gallery

        gallery = noto_gallery()
        reports = []
        for folder in folders:
            report = evaluate_bundle(folder, gallery, threads=cfg.threads)
            log(f"held-out Noto, {folder.name}: full {report.full} | no flags {report.no_flags}")
            reports.append(report.to_dict())
        (work / "heldout-noto.json").write_text(json.dumps(reports, indent=2) + "\n", encoding="utf-8")
    return folders
