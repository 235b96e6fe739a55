"""int8 graphs for bundles (export time only: needs the `onnx` package and onnxruntime.quantization).

Two recipes, one per tower kind:

* Text towers: **weight-only int8**. Every constant weight of a MatMul/Gemm is stored as int8 with one fp32
  scale per output channel and a DequantizeLinear in front of the product; activations stay fp32. Embedding
  tables (Gather) are quantised the same way by onnxruntime. Why: dynamic quantisation also rounds every
  activation to 8 bits with one scale per tensor, and transformer text activations have outlier channels
  (LLM.int8(), Dettmers et al. 2022). On emoji-mini's MiniLM tower that cost 1.4 points of held-out R@10
  (mean cosine to the fp32 text embedding 0.986); weight-only int8 costs 0.3 points (cosine 0.998) at the
  same file size. See MODEL_CARD.md, "How the int8 text graph was chosen".
* Image towers: onnxruntime's **dynamic int8** (MatMul/Gemm, and Conv for convnets): there the speed-up is
  the point (images are encoded in bulk) and the measured cost is small (0.2–0.3 points of R@10 on emoji-mini).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

TEXT_RECIPE = "int8 weights (per output channel), fp32 activations"
VISUAL_RECIPE = "dynamic int8"


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


def convert_graph(path: Path, precision: str, text: bool) -> None:
    """Rewrite one fp32 graph in place as fp16, or as int8 with the recipe of its kind (`text`: a text
    tower or a fusion head that reads text; else an image tower). fp32 leaves it as it is."""
    if precision == "fp32":
        return
    target = path.with_name(path.name + ".tmp")
    if precision == "int8":
        if text:
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
