"""An Immich CLIP repository (e.g. immich-app/ViT-B-32__openai) -> a clipsearch bundle.

The layout, as Immich's exporter writes it and its loader reads it (immich-app/immich,
machine-learning/immich_model_exporter/exporters/onnx/models/openclip.py and
machine-learning/immich_ml/models/clip/{textual,visual}.py, models/transforms.py):

  config.json                  open_clip's model config (embed_dim, vision_cfg, text_cfg: context_length,
                               tokenizer_kwargs.clean == "canonicalize" for SigLIP-style towers)
  visual/model.onnx            input "image" float32 [1, 3, S, S] -> "embedding" [1, D], L2-normalised
  visual/preprocess_cfg.json   open_clip's preprocess config (size, mean, std, interpolation, resize_mode)
  textual/model.onnx           input "text" int32 [1, context_length] -> "embedding" [1, D], L2-normalised
                               (multilingual M-CLIP exports: "input_ids" + "attention_mask", int32)
  textual/tokenizer.json       a Hugging Face tokenizer (its post-processor adds the special tokens)
  textual/tokenizer_config.json  "pad_token": every query is padded to context_length with it and truncated to it

Text: Immich folds whitespace (`" ".join(text.split())`; with canonicalize also strips ASCII punctuation and
lower-cases), encodes with tokenizer.json, pads/truncates to context_length. The converted bundle does the
same (text.clean "immich"/"immich_canonicalize", pad_to "context"); the conversion checks the ids against
that procedure on probe texts and the embeddings against the original graphs, and refuses on any difference.
Images: the bundle applies open_clip's transform as preprocess_cfg.json states it (the model's own; Immich's
loader always resizes the shorter side bicubically and centre-crops, ignoring resize_mode).
"""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import BundleError
from ..bundle import PreprocessSpec, TextSpec, read_bundle, sha256_file, staged_folder, write_model_json
from .graphs import GraphInput, batch_graph
from .spec import HubRef

REQUIRED = ("config.json", "visual/model.onnx", "visual/preprocess_cfg.json", "textual/model.onnx",
            "textual/tokenizer.json", "textual/tokenizer_config.json")
# Only what the loader reads: Immich repositories also hold fp16/ARM-NN/RKNN variants we never download.
PATTERNS = ("config.json", "README.md", "visual/model.onnx", "visual/model.onnx.data", "visual/model.onnx_data",
            "visual/preprocess_cfg.json", "textual/model.onnx", "textual/model.onnx.data", "textual/model.onnx_data",
            "textual/tokenizer.json", "textual/tokenizer_config.json")
PROBE_TEXTS = (
    "a dog", "  A photo\tof   a CAT!  ", "Ünïcödé café — “quotes” &amp; ﬁne", "ΟΔΟΣ ΚΑΙ ΣΑΣ.", "",
    "line\nbreak\u3000wide\u00a0nbsp\x1cend", "emoji 🐶🌊 #hashtag @me",
    " ".join(f"mountain {i}" for i in range(80)),  # longer than any context: truncation must keep the same ids
    "C'est l'été: 10% off_now!",
)
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_RESIZE_MODES = ("shortest", "longest", "squash")
_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


def is_immich_layout(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "vision_cfg" in config and "text_cfg" in config


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read {path}: {exc}") from exc


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as AddedToken objects."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _immich_clean(text: str, canonicalize: bool) -> str:
    """Immich's transforms.clean_text, verbatim in behaviour."""
    text = " ".join(text.split())
    if canonicalize:
        text = text.translate(_PUNCTUATION).lower()
    return text


def immich_reference_inputs(tokenizer_path: Path, pad_token: str, context_length: int, canonicalize: bool,
                            text: str) -> tuple[list[int], list[int]]:
    """Token ids and attention mask of one text exactly as Immich's OpenClipTextualEncoder makes them."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.enable_padding(length=context_length, pad_token=pad_token, pad_id=tokenizer.token_to_id(pad_token))
    tokenizer.enable_truncation(max_length=context_length)
    encoding = tokenizer.encode(_immich_clean(text, canonicalize))
    return list(encoding.ids), list(encoding.attention_mask)


def _graph_inputs(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    return {v.name: v.type.tensor_type.elem_type for v in model.graph.input if v.name not in initializers}


def _precision(path: Path) -> str:
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(path), load_external_data=False)
    kinds = {t.data_type for t in model.graph.initializer}
    if kinds & {TensorProto.INT8, TensorProto.UINT8}:
        return "int8"
    if TensorProto.FLOAT16 in kinds and TensorProto.FLOAT not in kinds:
        return "fp16"
    return "fp32"


def _preprocess(raw: dict[str, Any], where: Path) -> PreprocessSpec:
    mode = raw.get("mode", "RGB")
    resize_mode = raw.get("resize_mode", "shortest")
    interpolation = raw.get("interpolation", "bicubic")
    if mode != "RGB" or resize_mode not in _RESIZE_MODES or interpolation not in _INTERPOLATIONS:
        raise BundleError(f"{where}: mode {mode!r}, resize_mode {resize_mode!r}, interpolation {interpolation!r} "
                          "is not a transform clipsearch reproduces",
                          f"Supported: RGB, resize_mode {'/'.join(_RESIZE_MODES)}, interpolation {'/'.join(_INTERPOLATIONS)}")
    if "mean" not in raw or "std" not in raw or "size" not in raw:
        raise BundleError(f"{where} lacks size, mean or std")
    return PreprocessSpec.from_dict(raw)


def text_plan(ref: HubRef, root: Path) -> tuple[TextSpec, int, list[GraphInput]]:
    """How the bundle turns text into the textual graph's inputs, or BundleError when that is not Immich's."""
    config = _json(root / "config.json")
    text_cfg = config.get("text_cfg") or {}
    context_length = int(text_cfg.get("context_length", 77))
    repo_name = ref.repo_id.split("/")[-1].lower()
    if repo_name.startswith("nllb"):
        raise BundleError(f"{ref.spec} is an NLLB-CLIP model: Immich prefixes each query with a FLORES-200 "
                          "language code, which clipsearch does not reproduce",
                          "Use another multilingual model, e.g. hf:immich-app/XLM-Roberta-Large-Vit-B-32")
    kwargs = text_cfg.get("tokenizer_kwargs") or {}
    clean = kwargs.get("clean") if isinstance(kwargs, dict) else None
    if clean not in (None, "canonicalize", "whitespace", "lower"):
        raise BundleError(f"{ref.spec}: text cleaning {clean!r} is not one Immich's loader applies")
    pad_token = _token_text(_json(root / "textual" / "tokenizer_config.json").get("pad_token"))
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(root / "textual" / "tokenizer.json"))
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises bare Exceptions
        raise BundleError(f"{ref.spec}: cannot read textual/tokenizer.json: {exc}") from exc
    pad_id = tokenizer.token_to_id(pad_token) if pad_token else None
    if pad_id is None:
        raise BundleError(f"{ref.spec}: tokenizer_config.json names no pad token that tokenizer.json knows "
                          f"({pad_token!r}): the padding Immich applies cannot be reproduced")
    graph_inputs = _graph_inputs(root / "textual" / "model.onnx")
    if set(graph_inputs) == {"text"}:
        inputs = [GraphInput("input_ids", "text", "int64")]
    elif set(graph_inputs) == {"input_ids", "attention_mask"}:
        inputs = [GraphInput("input_ids", "input_ids", "int64"), GraphInput("attention_mask", "attention_mask", "int64")]
    else:
        raise BundleError(f"{ref.spec}: the textual graph takes {sorted(graph_inputs)}; Immich's loaders feed "
                          "['text'] (open_clip) or ['attention_mask', 'input_ids'] (M-CLIP)")
    spec = TextSpec(tokenizer="hf_tokenizer_json", inputs=tuple(i.name for i in inputs),
                    clean="immich_canonicalize" if clean == "canonicalize" else "immich",
                    bos_id=None, eos_id=None, pad_id=int(pad_id), pad_to="context")
    _check_token_parity(ref, root, spec, pad_token, context_length)
    return spec, context_length, inputs


def _check_token_parity(ref: HubRef, root: Path, spec: TextSpec, pad_token: str, context_length: int) -> None:
    from tokenizers import Tokenizer

    from ..tokenizer import TextTokenizer

    path = root / "textual" / "tokenizer.json"
    ours = TextTokenizer(Tokenizer.from_file(str(path)), spec, context_length)(list(PROBE_TEXTS)).inputs
    for row, text in enumerate(PROBE_TEXTS):
        ids, mask = immich_reference_inputs(path, pad_token, context_length, spec.clean == "immich_canonicalize", text)
        same = ours["input_ids"][row].tolist() == ids
        if "attention_mask" in ours:
            same = same and ours["attention_mask"][row].tolist() == mask
        if not same:
            raise BundleError(
                f"{ref.spec}: clipsearch's tokenizer cannot reproduce Immich's token ids for {text[:40]!r} "
                "(tokenizer.json's special tokens or truncation differ from what the bundle format expresses)",
                "This repository is refused rather than searched with wrong ids; use another model or export "
                "one with `clipsearch models export`")


def _check_embeddings(ref: HubRef, root: Path, folder: Path, pad_token: str, canonicalize: bool) -> None:
    """The converted graphs give the original graphs' embeddings (one probe text and image)."""
    import onnxruntime as ort
    from PIL import Image

    from ..preprocess import image_to_pixels
    from ..runtime import ClipModel

    clip = ClipModel(read_bundle(folder), threads=1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3

    def original(name: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        session = ort.InferenceSession(str(root / name / "model.onnx"), options, providers=["CPUExecutionProvider"])
        typed = {}
        for value in session.get_inputs():
            typed[value.name] = feeds[value.name].astype(np.int32 if "int32" in value.type else
                                                         np.int64 if "int64" in value.type else np.float32)
        return session.run(None, typed)[0][0]

    text = PROBE_TEXTS[1]
    ids, mask = immich_reference_inputs(root / "textual" / "tokenizer.json", pad_token, clip.info.context_length,
                                        canonicalize, text)
    feeds = {"text": np.array([ids]), "input_ids": np.array([ids]), "attention_mask": np.array([mask])}
    gradient = np.linspace(0, 255, 96 * 72 * 3).reshape(72, 96, 3).astype(np.uint8)
    image = Image.fromarray(gradient, "RGB")
    pairs = [("textual", original("textual", feeds), clip.encode_text([text])[0]),
             ("visual", original("visual", {"image": image_to_pixels(image, clip.preprocess)[None]}),
              clip.encode_images([image])[0])]
    for what, expected, got in pairs:
        expected = expected / max(float(np.linalg.norm(expected)), 1e-12)
        if expected.shape != got.shape or not np.allclose(expected, got, atol=1e-4):
            raise BundleError(f"{ref.spec}: the converted {what} graph does not reproduce the original's embedding")


def _to_int8(root: Path, staging: Path, text_inputs: list[GraphInput]) -> dict[str, Any]:
    """Replace the staged fp32 graphs with int8 ones: each original batch-1 graph is quantised, then wrapped for
    batches like the fp32 one (image tower: dynamic int8; text tower: the recipe `choose_text_int8` picks on
    its fixed captions against the staged fp32 text graph). Returns the text choice for model.json."""
    import tempfile

    from ..quantize import FIDELITY_CAPTIONS, choose_text_int8, quantize_visual_dynamic
    from ..tokenizer import TextTokenizer

    feeds = TextTokenizer.from_bundle(read_bundle(staging))(list(FIDELITY_CAPTIONS)).inputs
    with tempfile.TemporaryDirectory(dir=staging.parent) as tmp:
        visual = Path(tmp) / "visual-int8.onnx"
        quantize_visual_dynamic(root / "visual" / "model.onnx", visual, conv=False)
        for stale in staging.glob("visual.onnx*"):
            stale.unlink()
        batch_graph(visual, staging / "visual.onnx", [GraphInput("pixel_values", "image", "float")], "image_embeds",
                    "visual")
        reference = Path(tmp) / "textual-fp32"
        reference.mkdir()
        for part in staging.glob("textual.onnx*"):
            part.replace(reference / part.name)
        choice = choose_text_int8(
            root / "textual" / "model.onnx", staging / "textual.onnx", feeds, reference=reference / "textual.onnx",
            finish=lambda quantized, out: batch_graph(quantized, out, text_inputs, "text_embeds", "textual"))
    return choice.to_dict()


def convert(ref: HubRef, root: Path, target: Path, provenance: dict[str, Any], precision: str = "int8") -> Path:
    """Write the bundle for the Immich repository snapshot `root` (its files already downloaded) at `target`:
    the published graphs wrapped for batches and checked against the originals, then (precision "int8", the
    default) quantised as `models export` does."""
    if precision not in ("int8", "fp32"):
        raise BundleError(f"unknown precision {precision!r} for a pulled model", "Choose int8 (default) or fp32")
    config = _json(root / "config.json")
    text, context_length, text_inputs = text_plan(ref, root)
    preprocess = _preprocess(_json(root / "visual" / "preprocess_cfg.json"), root / "visual" / "preprocess_cfg.json")
    pad_token = _token_text(_json(root / "textual" / "tokenizer_config.json").get("pad_token"))
    with staged_folder(target) as staging:
        out_dims = batch_graph(root / "visual" / "model.onnx", staging / "visual.onnx",
                               [GraphInput("pixel_values", "image", "float")], "image_embeds", "visual")
        batch_graph(root / "textual" / "model.onnx", staging / "textual.onnx", text_inputs, "text_embeds", "textual")
        shutil.copyfile(root / "textual" / "tokenizer.json", staging / "tokenizer.json")
        (staging / "preprocess.json").write_text(json.dumps(preprocess.to_dict(), indent=2) + "\n", encoding="utf-8")
        embed_dim = int(config.get("embed_dim") or out_dims[-1])
        from ... import __version__

        meta = {
            "name": ref.cache_name,
            "source": {"kind": "immich", "repo": ref.repo_id, "commit": provenance.get("commit"),
                       "open_clip_config": config},
            "embed_dim": embed_dim,
            "logit_scale": 100.0,
            "logit_scale_note": "not published by the repository: CLIP's 100 is assumed (only `classify` uses it)",
            "precision": _precision(root / "visual" / "model.onnx"),
            "context_length": context_length,
            "image_size": list(preprocess.size),
            "text": text,
            "license": provenance.get("license"),
            "hub": provenance,
            "suits_photos": True,
            "clipsearch_version": __version__,
        }
        write_model_json(staging, meta)
        _check_embeddings(ref, root, staging, pad_token, text.clean == "immich_canonicalize")
        if precision == "int8":  # quantised after the exact conversion was checked
            meta["text_int8"] = _to_int8(root, staging, text_inputs)
            meta["precision"] = "int8"
            write_model_json(staging, meta)
    return target


def source_checksums(root: Path) -> dict[str, str]:
    return {name: sha256_file(root / name) for name in PATTERNS if (root / name).is_file()}
