"""Graph surgery for the fusion ITM head (export time, needs the `onnx` package).

* `image_feature_map` and `text_hidden_states` find, in a bundle's own graphs, the tensors the head reads: the
  image tower's last feature map (what its global pooling reduces) and the text tower's last hidden states (what
  its masked mean pooling sums). Found by the pooling ops, so the fp32 and the int8 graphs both work.
* `tapped` returns a graph with such internal tensors added as outputs (for computing training features with
  onnxruntime from exactly the graphs the product runs).
* `needed_nodes` walks back from a tensor to the nodes it depends on; `first_output_only` uses it to strip a
  bundle's graph back to its embedding output, `itm_branch` to find the trunk it copies.
* `graft_image_tokens` adds the head's image tokenizer to visual.onnx: every existing node is kept as it
  is, so the embedding output is unchanged, and a second output `image_tokens` appears.
"""

from __future__ import annotations

import onnx
from onnx import helper

from ..errors import ClipsearchError

IMAGE_TOKENS = "image_tokens"
TEXT_TOKENS = "token_features"


def _producer(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def image_feature_map(model: onnx.ModelProto, side: int | None = None) -> str:
    """The feature map the head reads: what the global pooling reduces (the last stage), or with `side` the
    last ReLU output of that spatial size (e.g. 6 for the 6×6 stage before the last one at 48 px)."""
    pooled = next((node.input[0] for node in model.graph.node if node.op_type in ("ReduceMean", "GlobalAveragePool")),
                  None)
    if pooled is None:
        raise ClipsearchError("cannot find the image tower's pooling in visual.onnx (no ReduceMean)")
    if side is None:
        return pooled
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info}
    found = None
    for node in model.graph.node:
        if node.op_type == "Relu" and shapes.get(node.output[0], [])[-2:] == [side, side]:
            found = node.output[0]
    if found is None:
        raise ClipsearchError(f"visual.onnx has no {side}×{side} feature map")
    return found


def text_hidden_states(model: onnx.ModelProto) -> str:
    made_by = _producer(model.graph)
    for node in model.graph.node:
        if node.op_type == "ReduceSum":
            mul = made_by.get(node.input[0])
            if mul is not None and mul.op_type == "Mul":
                return mul.input[0]
    raise ClipsearchError("cannot find the text tower's masked mean pooling in textual.onnx (no Mul → ReduceSum)")


def tapped(model: onnx.ModelProto, outputs: dict[str, str]) -> onnx.ModelProto:
    """A copy of `model` with internal tensors exposed as extra outputs: {new output name: tensor name}."""
    tapped_model = onnx.ModelProto()
    tapped_model.CopyFrom(model)
    graph = tapped_model.graph
    for name, tensor in outputs.items():
        graph.node.append(helper.make_node("Identity", [tensor], [name], name=f"tap_{name}"))
        graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return tapped_model


def needed_nodes(graph: onnx.GraphProto, tensor: str) -> list[int]:
    """Indices, in graph order, of the nodes that `tensor` depends on (walking producers back from it)."""
    made_by = {out: i for i, node in enumerate(graph.node) for out in node.output}
    needed: set[int] = set()
    stack = [tensor]
    while stack:
        i = made_by.get(stack.pop())
        if i is not None and i not in needed:
            needed.add(i)
            stack.extend(t for t in graph.node[i].input if t)
    return sorted(needed)


def first_output_only(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` reduced to its first output and the nodes and weights it needs: a bundle's graph as it
    was before an ITM head was grafted on or its hidden states exposed (so the bundle can get a new head)."""
    needed = needed_nodes(model.graph, model.graph.output[0].name)
    reduced = onnx.ModelProto()
    reduced.CopyFrom(model)
    nodes = [reduced.graph.node[i] for i in needed]
    used = {t for node in nodes for t in node.input}
    inits = [init for init in reduced.graph.initializer if init.name in used]
    del reduced.graph.node[:]
    reduced.graph.node.extend(nodes)
    del reduced.graph.initializer[:]
    reduced.graph.initializer.extend(inits)
    del reduced.graph.output[1:]
    kept = {t for node in nodes for t in node.output}
    infos = [v for v in reduced.graph.value_info if v.name in kept]
    del reduced.graph.value_info[:]
    reduced.graph.value_info.extend(infos)
    return reduced


def graft_image_tokens(visual: onnx.ModelProto, tokenizer: onnx.ModelProto) -> onnx.ModelProto:
    """visual.onnx + the image tokenizer graph (inputs `feature_map` or `pixel_values`, and `embeds`; output
    `image_tokens`), wired to the visual graph's feature map — or, for a head with its own image branch, to the
    graph's pixel input — and its embedding output. Outputs: the embedding, then image_tokens."""
    embeds = visual.graph.output[0].name
    first = tokenizer.graph.input[0]
    if first.name == "pixel_values":  # the head's own copy of the trunk runs beside the tower
        exposed = tapped(visual, {"itm_pixels": visual.graph.input[0].name})
        wiring = ("itm_pixels", "pixel_values")
    else:
        grid = [d.dim_value for d in first.type.tensor_type.shape.dim]  # [batch, C, H, W]
        feature_map = image_feature_map(visual, grid[-1] if len(grid) == 4 and grid[-1] > 0 else None)
        exposed = tapped(visual, {"itm_feature_map": feature_map})
        wiring = ("itm_feature_map", "feature_map")
    merged = onnx.compose.merge_models(
        exposed, tokenizer, io_map=[wiring, (embeds, "embeds")],
        prefix2="itm_", outputs=[embeds, f"itm_{IMAGE_TOKENS}"])
    # name the new output plainly
    for node in merged.graph.node:
        node.output[:] = [IMAGE_TOKENS if o == f"itm_{IMAGE_TOKENS}" else o for o in node.output]
    for out in merged.graph.output:
        if out.name == f"itm_{IMAGE_TOKENS}":
            out.name = IMAGE_TOKENS
    onnx.checker.check_model(merged)
    return merged


def expose_text_states(textual: onnx.ModelProto) -> onnx.ModelProto:
    """textual.onnx with its last hidden states as a second output, `token_features` [B, L, D]."""
    return tapped(textual, {TEXT_TOKENS: text_hidden_states(textual)})
