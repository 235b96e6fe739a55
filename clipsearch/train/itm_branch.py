"""A trainable copy of the image tower's trunk for the ITM head (training and export only, needs torch + onnx).

The head's image tokens normally come from the frozen tower's feature map, whose features the tower learned on
its training styles only. `ConvBranch` copies the part of visual.onnx that computes that feature map (Conv, Relu,
Add and Identity nodes: the tower's batch norms are folded into its convolutions) into torch modules initialised
with the tower's weights, so the ITM loss can fine-tune it on art the tower never saw while the tower itself, and
so every embedding and model id, stays as it is. Exported, the copy runs beside the tower inside visual.onnx (see
`itm_graphs.graft_image_tokens`).

The copy is described by a plain spec (ops and conv shapes), kept in the head's checkpoint to rebuild it.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from ..errors import ClipsearchError
from .itm_graphs import needed_nodes

_SUPPORTED = ("Conv", "Relu", "Add", "Identity")


def branch_spec(model: onnx.ModelProto, output: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The spec of the subgraph from the graph's image input to tensor `output`, and its conv weights
    ({conv name: array}). Raises if that subgraph holds anything but Conv, Relu, Add and Identity nodes."""
    graph = model.graph
    source = graph.input[0].name
    made_by = {out: node for node in graph.node for out in node.output}
    weights = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    needed = needed_nodes(graph, output)
    for i in needed:
        node = graph.node[i]
        if node.op_type not in _SUPPORTED:
            raise ClipsearchError(f"visual.onnx: cannot copy a {node.op_type} node into the ITM branch "
                                  f"(only {', '.join(_SUPPORTED)})")
        for tensor in node.input:
            if tensor and tensor != source and tensor not in weights and tensor not in made_by:
                raise ClipsearchError(f"visual.onnx: {tensor!r} does not come from the image input")

    def constant(tensor: str) -> np.ndarray:  # a weight, possibly behind Identity nodes (shared initialisers)
        while tensor not in weights and tensor in made_by and made_by[tensor].op_type == "Identity":
            tensor = made_by[tensor].input[0]
        return weights[tensor]

    names = {source: "x"}
    ops: list[dict] = []
    arrays: dict[str, np.ndarray] = {}
    for i in needed:
        node = graph.node[i]
        out = f"t{len(ops)}"
        if node.op_type == "Conv":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            w = constant(node.input[1])
            name = f"conv{len(arrays) // 2}"
            arrays[f"{name}.weight"] = w
            arrays[f"{name}.bias"] = constant(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(
                w.shape[0], w.dtype)
            pads = list(attrs.get("pads", [0, 0, 0, 0]))
            if pads[:2] != pads[2:] or list(attrs.get("dilations", [1, 1])) != [1, 1]:
                raise ClipsearchError("visual.onnx: asymmetric padding or dilation in the ITM branch")
            ops.append({"op": "Conv", "in": [names[node.input[0]]], "out": out, "name": name,
                        "cin": int(w.shape[1]) * int(attrs.get("group", 1)), "cout": int(w.shape[0]),
                        "kernel": int(w.shape[2]), "stride": int(list(attrs.get("strides", [1, 1]))[0]),
                        "pad": int(pads[0]), "groups": int(attrs.get("group", 1))})
        else:
            if node.op_type == "Identity":  # an alias; one of a weight is read through constant()
                if node.input[0] in names:
                    names[node.output[0]] = names[node.input[0]]
                continue
            ops.append({"op": node.op_type, "in": [names[t] for t in node.input], "out": out})
        names[node.output[0]] = out
    if output not in names:
        raise ClipsearchError(f"visual.onnx: {output!r} not reached from the image input")
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    return {"ops": ops, "output": names[output], "image_size": int(dims[-1]) if len(dims) == 4 else 0}, arrays


class ConvBranch(nn.Module):
    """The copied trunk: runs the spec's ops in order on normalised pixels [B, 3, H, W]."""

    def __init__(self, spec: dict) -> None:
        super().__init__()
        self.spec = spec
        self.convs = nn.ModuleDict({
            op["name"]: nn.Conv2d(op["cin"], op["cout"], op["kernel"], op["stride"], op["pad"], groups=op["groups"])
            for op in spec["ops"] if op["op"] == "Conv"})

    @classmethod
    def from_onnx(cls, model: onnx.ModelProto, output: str) -> "ConvBranch":
        spec, arrays = branch_spec(model, output)
        branch = cls(spec)
        with torch.no_grad():
            for key, value in arrays.items():
                name, kind = key.split(".")
                getattr(branch.convs[name], kind).copy_(torch.from_numpy(np.array(value)))
        return branch

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        values = {"x": pixels}
        for op in self.spec["ops"]:
            args = [values[name] for name in op["in"]]
            if op["op"] == "Conv":
                values[op["out"]] = self.convs[op["name"]](args[0])
            elif op["op"] == "Relu":
                values[op["out"]] = F.relu(args[0])
            else:
                values[op["out"]] = args[0] + args[1]
        return values[self.spec["output"]]
