"""Model bundles: a folder that holds everything needed to embed text and images without torch.

Layout (format ``clipsearch-bundle/1``)::

    visual.onnx       input  pixel_values  float32 [batch, 3, H, W]  -> image_embeds float32 [batch, D], L2-normalised
    *.onnx.data       optional: a graph's weights as ONNX external data (memory-mapped at load time)
    textual.onnx      inputs named in model.json "text.inputs" (int64 [batch, seq]) -> text_embeds float32 [batch, D], L2-normalised
                      seq is dynamic: the runtime pads only to the longest query of the batch
    tokenizer.json    a Hugging Face `tokenizers` file (CLIP byte-level BPE, or WordPiece for BERT-like towers)
    preprocess.json   image transform: size, resize_mode, interpolation, crop, mean, std, fill_color
    model.json        name, source, embed_dim, logit_scale, precision, context_length, text spec, sha256 per file
    itm.onnx          optional: a re-ranking head, described by model.json's "itm" object (see itm.py)

The `text` object of model.json says how to turn strings into graph inputs::

    {"tokenizer": "clip_bpe" | "wordpiece" | "hf_open_clip", "inputs": ["input_ids"] | ["input_ids", "attention_mask"],
     "clean": "open_clip" | "none" | "open_clip_whitespace" | "open_clip_lower" | "open_clip_canonicalize"
              | "immich" | "immich_canonicalize",
     "bos_id": int | null, "eos_id": int | null, "pad_id": int, "pad_to": "longest" | "context"}

(an unknown clean mode is a BundleError, never raw text); a top-level "text_rules" object adds what open_clip's
Hugging Face tokenizers do after padding (truncation side; "replace_ids", e.g. strip_sep_token's {sep: 0}).
Other optional keys: "model_id_from" (the sha256 of an earlier visual graph whose embedding this one keeps, so
the model id and the collections built with it stay valid), "links" ({file: "../SIBLING/file"}: a file
stored once in a sibling bundle, see `linked_files`) and "duplicates" ({"threshold": cosine, "how": text}: the
model's own near-duplicate threshold, see `DuplicateSpec`). model.json itself is not hashed and the model id
comes from visual.onnx, so such metadata can be added to a bundle without changing its id.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import BundleError
from ..paths import fsync_dir

BUNDLE_FORMAT = "clipsearch-bundle/1"
BUNDLE_FILES = ("visual.onnx", "textual.onnx", "tokenizer.json", "preprocess.json", "model.json")
HASHED_FILES = ("visual.onnx", "textual.onnx", "tokenizer.json", "preprocess.json")
# Optional: graph weights stored beside the graph (ONNX external data), hashed when present.
WEIGHT_FILES = ("visual.onnx.data", "textual.onnx.data")
ITM_FILES = ("itm.onnx", "itm.onnx.data")  # the optional ITM head (and its external weights)


@dataclass(frozen=True)
class TextSpec:
    tokenizer: str = "clip_bpe"
    inputs: tuple[str, ...] = ("input_ids",)
    clean: str = "open_clip"
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int = 0
    pad_to: str = "longest"  # "longest" (dynamic sequence axis) or "context" (graph needs context_length)


@dataclass(frozen=True)
class PreprocessSpec:
    size: tuple[int, int] = (224, 224)
    resize_mode: str = "shortest"  # "shortest" (resize + centre crop), "longest" (resize + pad), "squash"
    interpolation: str = "bicubic"  # "bicubic" | "bilinear"
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    fill_color: int = 0

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "PreprocessSpec":
        """ValueError (with what is wrong) for anything but the shape `to_dict` writes."""
        if not isinstance(raw, dict):
            raise ValueError(f"expected a JSON object, not {type(raw).__name__}")
        size = raw.get("size", 224)
        if isinstance(size, (int, float)) and not isinstance(size, bool):
            size = [size, size]
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_positive_int(v) for v in size)):
            raise ValueError(f"size must be a positive whole number or [height, width], not {size!r}")
        spec = cls(
            size=(int(size[0]), int(size[1])),
            resize_mode=str(raw.get("resize_mode", "shortest")),
            interpolation=str(raw.get("interpolation", "bicubic")),
            mean=_three_numbers(raw.get("mean", list(cls.mean)), "mean"),
            std=_three_numbers(raw.get("std", list(cls.std)), "std"),
            fill_color=int(raw.get("fill_color", 0)),
        )
        if spec.resize_mode not in ("shortest", "longest", "squash"):
            raise ValueError(f"unknown resize_mode {spec.resize_mode!r}")
        if spec.interpolation not in ("bicubic", "bilinear", "nearest"):  # model.preprocess's resampling filters
            raise ValueError(f"unknown interpolation {spec.interpolation!r}")
        if min(spec.std) <= 0:
            raise ValueError("std must be positive")
        return spec

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "resize_mode": self.resize_mode,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "fill_color": self.fill_color,
        }


def _positive_int(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 1 and float(value).is_integer()


def _three_numbers(value: Any, name: str) -> tuple[float, float, float]:
    if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                                 for v in value)):
        raise ValueError(f"{name} must be three numbers (R, G, B), not {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


@dataclass(frozen=True)
class BundleInfo:
    """What model.json says about a bundle, plus the folder it was read from."""

    path: Path
    name: str
    source: dict[str, Any]
    embed_dim: int
    logit_scale: float
    precision: str
    context_length: int
    text: TextSpec
    files: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_id(self) -> str:
        """Identifies the vector space: two bundles with the same id produce comparable image vectors.

        It is derived from visual.onnx's sha256, or from model.json's "model_id_from" when a later graph keeps
        the embedding of an earlier one and only adds outputs (e.g. the image tokens of an ITM head): then
        collections indexed with the earlier graph stay searchable."""
        graph, weights = self.files.get("visual.onnx", ""), self.files.get("visual.onnx.data", "")
        digest = (hashlib.sha256(f"{graph}:{weights}".encode()).hexdigest() if weights else graph)[:12]
        derived = self.extra.get("model_id_from")
        if isinstance(derived, str) and derived:
            digest = derived[:12]
        return f"{self.name}@{digest}" if digest else self.name

    def file(self, name: str) -> Path:
        """The path of one of the bundle's files; a file shared with a sibling bundle (model.json "links")
        lives in that sibling's folder."""
        link = self.links.get(name)
        return self.path / (link if link is not None else name)

    @property
    def links(self) -> dict[str, str]:
        return linked_files(self.path, self.extra.get("links"))

    @property
    def duplicates(self) -> "DuplicateSpec | None":
        """model.json's optional "duplicates" object (the model's near-duplicate threshold), or None."""
        return DuplicateSpec.from_raw(self.path, self.extra.get("duplicates"))


@dataclass(frozen=True)
class DuplicateSpec:
    """A model's near-duplicate threshold: two images whose embeddings have at least this cosine similarity
    are copies of one another (resized, re-encoded, slightly cropped or colour-shifted). Cosines are not
    comparable between models, so each bundle carries its own, calibrated for it (`how` says on what)."""

    threshold: float
    how: str = ""

    @classmethod
    def from_raw(cls, folder: Path, raw: Any) -> "DuplicateSpec | None":
        if raw is None:
            return None
        threshold = raw.get("threshold") if isinstance(raw, dict) else None
        if (isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold)
                or not 0 < threshold <= 1):
            raise BundleError(f"{folder / 'model.json'}: \"duplicates\" must be an object whose \"threshold\" is a "
                              f"cosine similarity above 0 and at most 1, not {raw!r}"[:300])
        return cls(threshold=float(threshold), how=str(raw.get("how", "")))


def linked_files(folder: Path, raw: Any) -> dict[str, str]:
    """model.json's "links": {file: "../SIBLING/file"}: a file stored once for bundles side by side (the
    bundled emoji-mini and emoji-mini-int8 share their text graph). Only a sibling folder's file of the same
    name is accepted: nothing outside the folder that holds the bundles can be named."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BundleError(f"{folder / 'model.json'}: \"links\" is not an object")
    links = {}
    for name, target in raw.items():
        parts = Path(str(target)).parts
        if (len(parts) != 3 or parts[0] != ".." or parts[2] != name or parts[1] in ("", ".", "..")
                or "/" in name or "\\" in name):
            raise BundleError(f"{folder / 'model.json'}: link {name!r} -> {target!r} must name the same file in a "
                              "sibling bundle (\"../SIBLING/FILE\")")
        links[str(name)] = str(target)
    return links


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_bundle(path: Path) -> bool:
    return path.is_dir() and (path / "model.json").is_file()


def read_bundle(path: Path | str) -> BundleInfo:
    """Read and validate a bundle folder (all files present, model.json well-formed)."""
    folder = Path(path)
    try:
        links = linked_files(folder, json.loads((folder / "model.json").read_text(encoding="utf-8")).get("links"))
    except (OSError, ValueError, AttributeError):
        links = {}  # reported below (missing or malformed model.json)
    missing = [name for name in BUNDLE_FILES if not (folder / links.get(name, name)).is_file()]
    unlinked = sorted({Path(links[name]).parts[1] for name in missing if name in links})
    if unlinked:  # a bundle copied without the sibling it shares files with
        raise BundleError(f"{folder} shares {', '.join(n for n in missing if n in links)} with the bundle beside it, "
                          f"../{unlinked[0]}, which is not there",
                          f"Copy {unlinked[0]} next to it (both folders side by side), or use {unlinked[0]} itself.")
    if missing:
        raise BundleError(
            f"{folder} is not a complete model bundle: missing {', '.join(missing)}",
            "Export one with: clipsearch models export ARCH --pretrained TAG --out DIR",
        )
    try:
        raw = json.loads((folder / "model.json").read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise TypeError(f"a JSON object is expected, not {type(raw).__name__}")
        text_raw = raw.get("text", {})
        text = TextSpec(
            tokenizer=str(text_raw.get("tokenizer", "clip_bpe")),
            inputs=tuple(text_raw.get("inputs", ["input_ids"])),
            clean=str(text_raw.get("clean", "open_clip")),
            bos_id=text_raw.get("bos_id"),
            eos_id=text_raw.get("eos_id"),
            pad_id=int(text_raw.get("pad_id", 0)),
            pad_to=str(text_raw.get("pad_to", "longest")),
        )
        known = {"name", "source", "embed_dim", "logit_scale", "precision", "context_length", "text", "files"}
        if int(raw["embed_dim"]) < 1 or int(raw.get("context_length", 77)) < 2:
            raise ValueError("embed_dim must be at least 1 and context_length at least 2 (start and end tokens)")
        return BundleInfo(
            path=folder,
            name=str(raw["name"]),
            source=dict(raw.get("source", {})),
            embed_dim=int(raw["embed_dim"]),
            logit_scale=float(raw.get("logit_scale", 100.0)),
            precision=str(raw.get("precision", "fp32")),
            context_length=int(raw.get("context_length", 77)),
            text=text,
            files=dict(raw.get("files", {})),
            extra={k: v for k, v in raw.items() if k not in known},
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BundleError(f"{folder / 'model.json'} is malformed: {exc}",
                          "Export or download the bundle again.") from exc


def read_preprocess(info: BundleInfo) -> PreprocessSpec:
    try:
        raw = json.loads(info.file("preprocess.json").read_text(encoding="utf-8"))
    except ValueError as exc:
        raise BundleError(f"{info.file('preprocess.json')} is malformed: {exc}") from exc
    try:
        return PreprocessSpec.from_dict(raw)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{info.file('preprocess.json')} is malformed: {exc}",
                          "Export or download the bundle again (clipsearch models info --verify says what changed).") from exc


def write_model_json(folder: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Write model.json with the sha256 of each bundle file; returns what was written."""
    meta = dict(meta)
    meta.setdefault("format", BUNDLE_FORMAT)
    if isinstance(meta.get("text"), TextSpec):
        text = asdict(meta["text"])
        text["inputs"] = list(text["inputs"])
        meta["text"] = text
    links = linked_files(folder, meta.get("links"))
    meta["files"] = {name: sha256_file(folder / links.get(name, name)) for name in HASHED_FILES + WEIGHT_FILES + ITM_FILES
                     if (folder / links.get(name, name)).is_file()}
    (folder / "model.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return meta


def update_model_json(folder: Path | str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Read model.json, let `change` edit it in place, and replace the file atomically (a temporary file beside
    it, renamed over it): for records that do not touch the hashed files, such as calibrations."""
    path = Path(folder) / "model.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    change(meta)
    handle, temporary = tempfile.mkstemp(prefix=".model-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return meta


def verify_bundle(info: BundleInfo) -> list[str]:
    """Return a list of problems (files whose sha256 differs from model.json); empty when intact."""
    problems = []
    for name, expected in info.files.items():
        target = info.file(name)
        if not target.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(target) != expected:
            problems.append(f"{name}: sha256 differs from model.json")
    return problems


def _aside(out: Path) -> Path:
    """Where `staged_folder` parks the old folder while the new one moves in."""
    return out.parent / f".{out.name}.old"


def _rename(source: Path, target: Path) -> None:
    os.rename(source, target)


def recover_staged(out: Path | str) -> None:
    """Finish or undo a `staged_folder` swap that a crash interrupted: with `out` missing, the old folder
    parked aside goes back; with `out` present, the parked old folder is deleted."""
    out = Path(out)
    aside = _aside(out)
    if not aside.exists():
        return
    if out.exists():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        _rename(aside, out)
        fsync_dir(out.parent)


def check_bundle_target(out: Path | str) -> None:
    """BundleError unless a bundle may be written to `out`: a new or empty folder, or a bundle's own (it is
    replaced whole). Any other folder would be deleted with everything in it, so it is refused, as are the
    current folder and those holding it (`--out .`)."""
    out = Path(out)
    hint = "Give --out a new or empty folder, or the folder of a bundle to replace."
    here = Path.cwd().resolve()
    target = out.resolve()
    if out.name in ("", ".", "..") or target == here or target in here.parents:
        raise BundleError(f"{out}: a bundle cannot replace the current folder or a folder that holds it", hint)
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise BundleError(f"{out} exists and is not a folder", hint)
    if (out / "model.json").is_file():
        return
    if any(out.iterdir()):
        raise BundleError(f"{out} is a folder that is not a model bundle: writing a bundle there would delete what "
                          "it holds", hint)


@contextmanager
def staged_folder(out: Path | str) -> Iterator[Path]:
    """Build a bundle in a hidden sibling folder; it replaces `out` only when the block completes, so a
    crash or an error never leaves a half-written bundle behind, nor no bundle at all.

    The swap is: rename the old `out` aside, rename the new folder in, delete the old one. A crash between
    the renames leaves the old folder aside, and `recover_staged` (called by the next `staged_folder` on
    the same `out` and by model resolution) puts it back."""
    out = Path(out)
    recover_staged(out)
    check_bundle_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield staging
        _usual_modes(staging)
        fsync_dir(staging)
        aside = _aside(out)
        if out.exists():
            _rename(out, aside)
        try:
            _rename(staging, out)
        except BaseException:
            if aside.exists() and not out.exists():
                _rename(aside, out)  # undo: the old bundle stays
            raise
        fsync_dir(out.parent)
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _usual_modes(folder: Path) -> None:
    """The modes a folder and files made by hand would have (0777/0666 less the umask): the staging folder and
    temporary files are private (0700/0600), and a bundle is often shared between users."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for child in folder.rglob("*"):
        if child.is_symlink():
            continue
        os.chmod(child, (0o777 if child.is_dir() else 0o666) & ~mask)


def share_files(folder: Path, sibling: Path, names: tuple[str, ...]) -> dict[str, Any]:
    """Store files once for two bundles side by side: each of `names` that is byte-identical in `folder` and
    in its sibling `sibling` is deleted from `folder` and recorded in its model.json "links". Returns the new
    model.json. BundleError when a file differs (sharing it would change the model)."""
    folder, sibling = Path(folder), Path(sibling)
    if folder.resolve().parent != sibling.resolve().parent:
        raise BundleError(f"{folder} and {sibling} are not side by side: only sibling bundles can share files")
    meta = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    links = dict(meta.get("links") or {})
    for name in names:
        own = folder / name
        if name in links:
            continue
        if sha256_file(own) != sha256_file(sibling / name):
            raise BundleError(f"{own} differs from {sibling / name}: it cannot be shared")
        own.unlink()
        links[name] = f"../{sibling.name}/{name}"
    meta["links"] = links
    return write_model_json(folder, meta)
