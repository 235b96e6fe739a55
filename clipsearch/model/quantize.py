"""int8 graphs for bundles (export time only: needs the `onnx` package and onnxruntime.quantization).

Text towers get one of two recipes, chosen per model by how close it stays to the fp32 text embedding on a fixed
set of captions (`choose_text_int8`):

* **dynamic** — onnxruntime's dynamic int8 of every constant-weight MatMul (activations rounded to 8 bits per
  tensor at run time; attention scores stay fp32). About 3× faster than fp32 per query, but transformer text
  activations have outlier channels (LLM.int8(), Dettmers et al. 2022) that one scale per tensor handles badly.
* **weights** — int8 weights with one fp32 scale per output channel and a DequantizeLinear in front of each
  product; activations stay fp32. Nearly fp32 quality at the same file size, about half dynamic's speed.

The faster recipe is used when its mean cosine to fp32 reaches TEXT_FIDELITY_FLOOR, else the accurate one. On
emoji-mini's MiniLM tower dynamic int8 reached 0.986 and cost 1.4 points of held-out R@10, weight-only 0.998 and
0.3 points (MODEL_CARD.md, "How the int8 text graph was chosen"); the floor sits between the two.

Image towers: onnxruntime's dynamic int8 (MatMul/Gemm, and Conv for convnets): images are encoded in bulk, where
the speed-up is the point, and the measured cost is small (0.3 points of R@10 on emoji-mini).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

TEXT_FIDELITY_FLOOR = 0.995
_SUBJECTS = ("dog", "cat", "car", "bicycle", "tree", "beach", "mountain", "city street", "child", "old man", "woman",
             "red apple", "birthday cake", "sunset", "snowy field", "boat", "bird", "flower", "kitchen", "book")
_TEMPLATES = ("a photo of a {}", "a {} at night", "two {}s side by side", "a close-up of a {}",
              "a blurry photo of a {}", "a {} in the rain")
FIDELITY_CAPTIONS = tuple(t.format(s) for s in _SUBJECTS for t in _TEMPLATES)  # 120 fixed captions


@dataclass(frozen=True)
class TextInt8Choice:
    """Which int8 recipe a text graph got, and the fidelity (mean cosine to fp32) that decided it."""

    recipe: str  # "dynamic" | "weights"
    fidelity: dict[str, float]
    floor: float = TEXT_FIDELITY_FLOOR

    def to_dict(self) -> dict:
        return {"recipe": self.recipe, "mean_cosine_to_fp32": self.fidelity, "floor": self.floor,
                "captions": len(FIDELITY_CAPTIONS)}


def quantize_text_dynamic(source: Path, target: Path, exclude: Iterable[str] = ()) -> None:
    """onnxruntime's dynamic int8 of every constant-weight MatMul/Gemm (and the embedding tables)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Gemm", "Gather"], nodes_to_exclude=list(exclude),
                     extra_options={"MatMulConstBOnly": True})


def choose_text_int8(source: Path, target: Path, feeds: dict[str, np.ndarray], reference: Path | None = None,
                     finish: Callable[[Path, Path], None] | None = None) -> TextInt8Choice:
    """Write `target` with the faster text recipe if it keeps TEXT_FIDELITY_FLOOR on `feeds` (the tokenized
    FIDELITY_CAPTIONS), else with int8 weights and fp32 activations. `finish(quantized, target)` turns a
    quantized `source` into the graph that takes `feeds` (e.g. wraps a batch-1 graph for batches), and
    `reference` is the fp32 graph of that form (default: `source` itself)."""
    import onnxruntime as ort

    def embed(graph: Path) -> np.ndarray:
        session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        out = session.run(None, {k: v for k, v in feeds.items() if k in names})[0]
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    reference_embeds = embed(reference or source)
    fidelity = {}
    for recipe, quantize in (("dynamic", quantize_text_dynamic), ("weights", quantize_text_weights)):
        if finish is None:
            quantize(source, target)
        else:
            staged = target.with_name(target.name + ".quantized.onnx")
            try:
                quantize(source, staged)
                finish(staged, target)
            finally:
                staged.unlink(missing_ok=True)
        fidelity[recipe] = round(float(np.mean(np.sum(embed(target) * reference_embeds, axis=1))), 5)
        if recipe == "dynamic" and fidelity[recipe] >= TEXT_FIDELITY_FLOOR:
            return TextInt8Choice("dynamic", fidelity, TEXT_FIDELITY_FLOOR)
    return TextInt8Choice("weights", fidelity, TEXT_FIDELITY_FLOOR)


def quantize_text_weights(source: Path, target: Path, exclude: Iterable[str] = ()) -> None:
    """Write `target`: `source` with int8 weights and fp32 activations. `exclude`: node names to keep fp32."""
    import onnx
    from onnx import helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(source))
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    skipped = set(exclude)
    nodes = []
    for node in graph.node:
        weight_name = node.input[1] if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 else None
        tensor = initializers.get(weight_name) if weight_name else None
        if tensor is None or node.name in skipped or uses[weight_name] != 1 or len(tensor.dims) != 2:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(tensor).astype(np.float32)
        transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute)
        axis = 0 if transposed else 1  # the output-channel axis of B
        scale = np.abs(weight).max(axis=1 - axis) / 127.0
        scale[scale == 0] = 1.0
        shape = (-1, 1) if axis == 0 else (1, -1)
        quantized = np.clip(np.round(weight / scale.reshape(shape)), -127, 127).astype(np.int8)
        graph.initializer.remove(tensor)
        graph.initializer.extend([
            numpy_helper.from_array(quantized, f"{weight_name}_int8"),
            numpy_helper.from_array(scale.astype(np.float32), f"{weight_name}_scale"),
            numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{weight_name}_zero"),
        ])
        nodes.append(helper.make_node("DequantizeLinear", [f"{weight_name}_int8", f"{weight_name}_scale",
                                                           f"{weight_name}_zero"], [f"{weight_name}_dequantized"],
                                      name=f"{weight_name}_DequantizeLinear", axis=axis))
        node.input[1] = f"{weight_name}_dequantized"
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    staged = Path(str(target) + ".weights.onnx")
    try:
        onnx.save(model, str(staged))
        quantize_dynamic(str(staged), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["Gather"])
    finally:
        staged.unlink(missing_ok=True)


def quantize_visual_dynamic(source: Path, target: Path, conv: bool) -> None:
    """onnxruntime's dynamic int8 of an image tower; `conv` also quantises Conv (convnets, per tensor)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if conv:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QUInt8, per_channel=False,
                         op_types_to_quantize=["MatMul", "Gemm", "Gather", "Conv"])
    else:
        # Weights only (MatMulConstBOnly): activation x activation products (attention scores) stay fp32.
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm"], extra_options={"MatMulConstBOnly": True})


def convert_graph(path: Path, precision: str, text: bool, feeds: dict[str, np.ndarray] | None = None
                  ) -> TextInt8Choice | None:
    """Rewrite one fp32 graph in place as fp16, or as int8 with the recipe of its kind (`text`: a text tower or
    a fusion head that reads text; else an image tower). A text graph given `feeds` (see choose_text_int8) gets
    the faster recipe when it is faithful enough, and the choice is returned; without them, int8 weights."""
    if precision == "fp32":
        return None
    target = path.with_name(path.name + ".tmp")
    choice = None
    if precision == "int8":
        if text and feeds is not None:
            choice = choose_text_int8(path, target, feeds)
        elif text:
            quantize_text_weights(path, target)
        else:
            quantize_visual_dynamic(path, target, conv=False)
    elif precision == "fp16":
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx.save(convert_float_to_float16(onnx.load(str(path)), keep_io_types=True), str(target))
    else:
        raise ValueError(f"unknown precision {precision!r}; choose fp32, fp16 or int8")
    target.replace(path)
    return choice
