"""`clipsearch models …` (export, pull, list, info) and `clipsearch embed`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from . import app

models_app = typer.Typer(help="Export, list and inspect model bundles.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("export")
def export_cmd(
    arch: str = typer.Argument(..., help="open_clip architecture, e.g. ViT-B-32"),
    out: Path = typer.Option(..., "--out", help="Bundle folder to write"),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="open_clip tag (e.g. laion2b_s34b_b79k) or a checkpoint file"),
    random_init: bool = typer.Option(False, "--random-init", help="Random weights (tests and benchmarks)"),
    precision: str = typer.Option("int8", "--precision", help="int8 (default: image tower dynamic int8; text "
                                   "tower dynamic int8 when it keeps a mean cosine >= 0.995 to fp32, else int8 "
                                   "weights with fp32 activations) | fp32 | fp16"),
    name: Optional[str] = typer.Option(None, "--name", help="Name recorded in model.json"),
    seed: int = typer.Option(0, "--seed", help="Seed for --random-init"),
) -> None:
    """Export an open_clip model to an ONNX bundle."""
    from ..model.bundle import check_bundle_target
    from ..model.export import PRECISIONS, ExportRequest, export_bundle

    if precision not in PRECISIONS:
        raise typer.BadParameter(f"choose one of {', '.join(PRECISIONS)}", param_hint="--precision")
    if bool(pretrained) == random_init:
        raise typer.BadParameter("give exactly one of --pretrained TAG_OR_FILE and --random-init")
    check_bundle_target(out)
    folder = export_bundle(ExportRequest(arch=arch, pretrained=pretrained, random_init=random_init, out=out,
                                         precision=precision, name=name, seed=seed))
    typer.echo(f"exported {arch} ({precision}) to {folder}")


@models_app.command("export-blip")
def export_blip_cmd(
    model_id: str = typer.Argument(..., help="Hugging Face BlipForImageTextRetrieval id (e.g. Salesforce/blip-itm-base-coco) or a save_pretrained folder"),
    out: Path = typer.Option(..., "--out", help="Bundle folder to write"),
    precision: str = typer.Option("int8", "--precision", help="int8 (default: image tower dynamic int8; text "
                                   "tower dynamic int8 when it keeps a mean cosine >= 0.995 to fp32, else int8 "
                                   "weights with fp32 activations) | fp32 | fp16"),
    name: Optional[str] = typer.Option(None, "--name", help="Name recorded in model.json"),
) -> None:
    """Export a BLIP image-text retrieval model (ITC embeddings + ITM re-ranking head) to an ONNX bundle."""
    from ..model.blip import export_blip
    from ..model.bundle import check_bundle_target
    from ..model.export import PRECISIONS

    if precision not in PRECISIONS:
        raise typer.BadParameter(f"choose one of {', '.join(PRECISIONS)}", param_hint="--precision")
    check_bundle_target(out)
    folder = export_blip(model_id, out, precision=precision, name=name)
    typer.echo(f"exported {model_id} ({precision}) to {folder}")


@models_app.command("pull")
def pull_cmd(
    spec: str = typer.Argument(..., help="hf:ORG/REPO\\[/SUBFOLDER]\\[@REVISION], e.g. hf:immich-app/ViT-B-32__openai"),
    precision: str = typer.Option("int8", "--precision", help="int8 (default, as `models export`) | fp32: how an "
                                  "Immich export is converted (a published clipsearch bundle keeps its own)"),
) -> None:
    """Download a model from the Hugging Face Hub into the model cache (no torch): a clipsearch bundle, or an
    Immich CLIP export converted into one. Uses huggingface_hub's cache, HF_ENDPOINT and HF_HUB_OFFLINE."""
    from ..model.bundle import read_bundle
    from ..model.hub import is_hub_spec, pull

    if not is_hub_spec(spec):
        raise typer.BadParameter("write hf:ORG/REPO (open_clip ARCH/TAG models are exported with `models export`)",
                                 param_hint="SPEC")
    if precision not in ("int8", "fp32"):
        raise typer.BadParameter("choose int8 or fp32", param_hint="--precision")
    info = read_bundle(pull(spec, precision))
    hub = info.extra.get("hub") or {}
    licence = info.extra.get("license") or hub.get("license") or "not stated by the repository"
    typer.echo(f"{spec}: {info.name} (dim {info.embed_dim}, {info.precision}) from commit {str(hub.get('commit'))[:12]}, "
               f"licence: {licence}\n  in {info.path}\n  use it with: --model {spec}")


@models_app.command("list")
def list_cmd(
    architectures: bool = typer.Option(False, "--architectures", help="List the open_clip architectures and tags `models export` reproduces exactly instead"),
    as_json: bool = typer.Option(False, "--json", help="The list as JSON"),
) -> None:
    """Bundled and cached models (or, with --architectures, what open_clip can export exactly)."""
    if architectures:
        from ..model.export import import_open_clip
        from ..model.tokenizer_export import exportable_architectures

        open_clip = import_open_clip()
        supported = exportable_architectures(open_clip)  # decided from each config: nothing is downloaded
        pairs = [(a, t) for a, t in open_clip.list_pretrained() if a in supported]
        rows = [{"arch": a, "tag": t, "spec": f"{a}/{t}"} for a, t in pairs]
        typer.echo(json.dumps(rows, indent=2) if as_json else "\n".join(r["spec"] for r in rows))
        return
    from ..errors import BundleError
    from ..model.bundle import read_bundle
    from ..model.resolve import list_models, suits_photos

    rows = []
    for entry in list_models():
        try:
            info = read_bundle(entry.path)
        except BundleError as exc:  # one damaged bundle is listed as such, the others as usual
            rows.append({"name": entry.name, "origin": entry.origin, "path": str(entry.path), "embed_dim": None,
                         "precision": None, "photos": None, "spec": None, "error": exc.message})
            continue
        hub = info.extra.get("hub") or {}
        rows.append({"name": entry.name, "origin": entry.origin, "path": str(entry.path), "embed_dim": info.embed_dim,
                     "precision": info.precision, "photos": suits_photos(info), "spec": hub.get("spec")})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    elif not rows:
        typer.echo("no models yet; export one with `clipsearch models export ARCH --pretrained TAG --out DIR`")
    else:
        marks = {True: "photos", False: "not photos", None: "photos?"}
        for row in rows:
            if row.get("error"):
                typer.echo(f"{row['name']:<40} {row['origin']:<8} DAMAGED: {row['error']}")
                continue
            typer.echo(f"{row['name']:<40} {row['origin']:<8} {marks[row['photos']]:<10} dim={row['embed_dim']:<5} "
                       f"{row['precision']:<5} {row['path']}")
        if not any(row["photos"] for row in rows):
            typer.echo("no model for photographs yet: clipsearch models pull hf:immich-app/ViT-B-32__openai")


@models_app.command("info")
def info_cmd(
    model: str = typer.Argument(..., help="Bundle folder, model name, or a pulled hf:ORG/REPO"),
    verify: bool = typer.Option(False, "--verify", help="Check each file's sha256 against model.json"),
) -> None:
    """Print a bundle's model.json (and verify its checksums with --verify)."""
    from ..model.bundle import verify_bundle
    from ..model.resolve import resolve_model

    info = resolve_model(model, export_missing=False)
    raw = json.loads(info.file("model.json").read_text(encoding="utf-8"))
    raw["path"] = str(info.path)
    raw["model_id"] = info.model_id
    raw["sizes"] = {p.name: p.stat().st_size for p in sorted(info.path.iterdir()) if p.is_file()}
    hub = raw.get("hub") or {}
    raw["license"] = raw.get("license") or hub.get("license") or info.source.get("license") or "not stated"
    if hub:
        raw["provenance"] = {k: hub.get(k) for k in ("spec", "repo", "subfolder", "revision", "commit", "endpoint")}
    if verify:
        problems = verify_bundle(info)
        if not info.files:
            problems.append("model.json records no checksums: nothing could be verified")
        raw["verified"] = not problems
        raw["problems"] = problems
    typer.echo(json.dumps(raw, indent=2, ensure_ascii=False))
    if verify and raw["problems"]:
        raise typer.Exit(1)


@app.command("embed")
def embed_cmd(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Bundle folder, cached name, or ARCH/TAG"),
    text: Optional[List[str]] = typer.Option(None, "--text", help="Text to embed (repeatable)"),
    image: Optional[List[Path]] = typer.Option(None, "--image", help="Image file to embed (repeatable)"),
    as_json: bool = typer.Option(False, "--json", help="One JSON list per input"),
) -> None:
    """Print L2-normalised embeddings, one line per input: the --text ones first, then the --image ones, each in
    the order given."""
    from ..model.resolve import load_model
    from ..model.preprocess import open_image
    from ..model.tokenizer import unknown_words_error

    if not text and not image:
        raise typer.BadParameter("give --text and/or --image")
    for one in text or []:  # as `search` refuses it: an empty text embeds the padding alone, a meaningless vector
        if not one.strip():
            raise typer.BadParameter("empty text: describe something, e.g. --text \"a dog on a beach\"",
                                     param_hint="--text")
    clip = load_model(model)
    vectors = []
    if text:
        for one in text:  # as search and classify: a text of no known word embeds like every other such text
            if clip.tokenizer.knows_none_of(one):
                raise unknown_words_error(clip.info.name, one)
        vectors.extend(clip.encode_text(list(text)).tolist())
    if image:
        height, width = clip.preprocess.size
        images = [open_image(p, draft_size=(width, height)) for p in image]
        vectors.extend(clip.encode_images(images).tolist())
    for vector in vectors:
        typer.echo(json.dumps([round(v, 7) for v in vector]) if as_json else " ".join(f"{v:.7f}" for v in vector))
