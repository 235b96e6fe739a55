"""Finding a model by what the user typed after `--model`.

A model spec is one of:
  * a bundle folder (anything containing model.json),
  * a name in the local model cache (`clipsearch models list`) or a bundled model (`emoji-mini`),
  * `ARCH/TAG`, an open_clip architecture and pretrained tag, exported into the cache on first use
    (needs the `export` extra and, the first time, a network connection),
  * `hf:ORG/REPO[/SUBFOLDER][@REVISION]`, a clipsearch bundle or an Immich CLIP export on the Hugging Face Hub,
    downloaded with huggingface_hub (no torch) and placed in the cache on first use (see `hub/`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .bundle import BundleInfo, is_bundle, read_bundle, recover_staged
from ..errors import ModelNotAvailable
from ..paths import model_cache_dir

BUNDLED_DIR = Path(__file__).parent / "bundled"
# The model a fresh install uses when nothing else is said: it ships inside the package and works offline.
DEFAULT_MODEL = "emoji-mini"
# What we recommend for real photos on a connected machine.
RECOMMENDED_PRETRAINED = "ViT-B-32/laion2b_s34b_b79k"
# The same without torch: a ready ONNX export on the Hugging Face Hub.
RECOMMENDED_HUB = "hf:immich-app/ViT-B-32__openai"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    origin: str  # "bundled" | "cache"


def default_model_spec() -> str:
    return os.environ.get("CLIPSEARCH_MODEL") or DEFAULT_MODEL


def cache_name(arch: str, tag: str) -> str:
    return f"{arch}__{tag}"


def list_models() -> list[ModelEntry]:
    entries = []
    for origin, root in (("bundled", BUNDLED_DIR), ("cache", model_cache_dir())):
        if root.is_dir():
            for child in sorted(root.iterdir()):
                if is_bundle(child):
                    entries.append(ModelEntry(child.name, child, origin))
    return entries


def _not_found(spec: str) -> ModelNotAvailable:
    known = ", ".join(e.name for e in list_models()) or "none"
    return ModelNotAvailable(
        f"no model '{spec}': not a bundle folder, not in the model cache ({model_cache_dir()}), not a bundled model",
        f"Known models: {known}. Use a bundle folder, a listed name, {RECOMMENDED_HUB} (downloaded on first use, "
        f"no torch), or ARCH/TAG such as {RECOMMENDED_PRETRAINED} "
        "(exported on first use; needs `pip install 'clipsearch[export]'` and a network connection once).",
    )


def _looks_like_a_path(spec: str) -> bool:
    """A spec written as a path (absolute, ~, ./ or ../), never an open_clip ARCH/TAG (architectures are names)."""
    return spec.startswith(("/", "~", "./", "../", ".\\")) or spec in (".", "..") or os.path.isabs(spec)


def _no_bundle_at(spec: str, folder: Path) -> ModelNotAvailable:
    """The error for a spec that names a path holding no bundle: what is there instead."""
    if folder.is_dir():
        missing = [name for name in ("model.json", "visual.onnx", "textual.onnx") if not (folder / name).exists()]
        what = f"missing {', '.join(missing)}" if missing else "its model.json cannot be read"
        return ModelNotAvailable(f"{spec}: not a model bundle ({what})",
                                 "A bundle folder holds model.json, visual.onnx, textual.onnx, tokenizer.json and "
                                 "preprocess.json: give the folder `clipsearch models export` or a hub download wrote.")
    there = "a file, not a folder" if folder.exists() else "no such folder"
    return ModelNotAvailable(f"{spec}: {there}, so no model bundle there",
                             "Check the path (a bundle is a folder), or give a model name from `clipsearch models list`.")


def resolve_model(spec: str | os.PathLike[str] | None = None, *, export_missing: bool = True) -> BundleInfo:
    """Turn a model spec into a readable bundle, exporting `ARCH/TAG` into the cache when needed."""
    text = str(spec) if spec is not None else default_model_spec()
    if text.startswith("hf:"):
        from .hub import resolve_hub

        return read_bundle(resolve_hub(text, fetch=export_missing))
    candidate = Path(text).expanduser()
    _recover(candidate)
    if is_bundle(candidate):
        return read_bundle(candidate)
    for root in (BUNDLED_DIR, model_cache_dir()):
        _recover(root / text)
        if is_bundle(root / text):
            return read_bundle(root / text)
    if _looks_like_a_path(text) or candidate.is_dir():
        raise _no_bundle_at(text, candidate)
    if "/" in text and not candidate.exists():
        arch, _, tag = text.partition("/")
        cached = model_cache_dir() / cache_name(arch, tag)
        _recover(cached)
        if is_bundle(cached):
            return read_bundle(cached)
        if not export_missing:
            raise _not_found(text)
        return read_bundle(_export_into_cache(arch, tag, cached))
    raise _not_found(text)


def suits_photos(info: BundleInfo) -> bool | None:
    """Whether a bundle is meant for photographs: model.json's "suits_photos" when it says, else what its source
    implies (pretrained open_clip, BLIP and Immich exports: yes; our trained and random-init models: no)."""
    stated = info.extra.get("suits_photos")
    if isinstance(stated, bool):
        return stated
    kind = str(info.source.get("kind", ""))
    if kind == "open_clip":
        return not info.source.get("random_init") and bool(info.source.get("pretrained"))
    if kind in ("transformers-blip", "immich"):
        return True
    if kind == "clipsearch-train":
        return False
    return None


def default_model_notice(chosen: str | None) -> str | None:
    """One line for a collection created without --model whose default is the bundled emoji model."""
    if chosen is not None:
        return None
    spec = default_model_spec()
    if spec not in ("emoji-mini", "emoji-mini-int8") or os.environ.get("CLIPSEARCH_MODEL"):
        return None
    return (f"note: using the bundled model {spec}, made for emoji and icons, not photographs; for photos use "
            f"--model {RECOMMENDED_HUB} (a one-time download, no torch) or set CLIPSEARCH_MODEL")


def _recover(folder: Path) -> None:
    """A bundle whose replacement was interrupted by a crash is put back (see `bundle.staged_folder`)."""
    if not folder.exists() and folder.name:
        try:
            recover_staged(folder)
        except OSError:
            pass


def _export_into_cache(arch: str, tag: str, target: Path) -> Path:
    from .export import ExportRequest, export_bundle  # torch is imported (or its absence reported) inside

    # int8 like `models export` (clipsearch.model.quantize: the text tower keeps fp32 activations)
    return export_bundle(ExportRequest(arch=arch, pretrained=tag, out=target, name=cache_name(arch, tag),
                                       precision="int8"))


def load_model(spec: str | os.PathLike[str] | None = None, threads: int | None = None):
    """Resolve a spec and open it as a `ClipModel` (sessions still lazy)."""
    from .runtime import ClipModel

    return ClipModel(resolve_model(spec), threads=threads)
