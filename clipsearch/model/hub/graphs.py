"""A graph exported for one input at a time (Immich traces its towers with batch 1) -> a bundle graph that
takes a batch: an ONNX `Scan` runs the unchanged original graph once per row (same nodes, same weights, so
the same numbers), then the row's embedding is L2-normalised (a no-op up to float rounding for Immich's
graphs, which normalise already; the bundle format promises it). Needs the `onnx` package, not torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...errors import BundleError

_PREFIX = "__clipsearch_"


@dataclass(frozen=True)
class GraphInput:
    """One input of the bundle graph (`name`, int64 or float32) fed to the original graph's `source` input."""

    name: str
    source: str
    elem_type: str  # "float" | "int64"


def _onnx():
    try:
        import onnx
    except ImportError as exc:
        raise BundleError("converting this model needs the onnx package, which is not installed",
                          "Install it with `pip install onnx` (no torch needed)") from exc
    return onnx


def _rename(graph, old: str, new: str) -> None:
    """Rename a value everywhere in `graph` and its subgraphs (If/Loop/Scan bodies see outer names)."""
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
        node.output[:] = [new if n == old else n for n in node.output]
        for attr in node.attribute:
            if attr.HasField("g"):
                _rename(attr.g, old, new)
            for sub in attr.graphs:
                _rename(sub, old, new)
    for values in (graph.input, graph.output, graph.value_info):
        for value in values:
            if value.name == old:
                value.name = new
    for tensor in graph.initializer:
        if tensor.name == old:
            tensor.name = new


def _dims(value) -> list[int | str]:
    dims = []
    for dim in value.type.tensor_type.shape.dim:
        dims.append(dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or "?"))
    return dims


def default_opset(model) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def batch_graph(source: Path, target: Path, inputs: list[GraphInput], output: str, what: str) -> list[int | str]:
    """Write `target` (+ `target`.data, the weights) from the batch-1 graph `source`; returns the original
    graph's output shape. BundleError when the graph is not one this wrapping reproduces exactly."""
    onnx = _onnx()
    from onnx import TensorProto, helper

    try:
        model = onnx.load(str(source))
    except Exception as exc:  # noqa: BLE001 - protobuf/external-data errors of many types
        raise BundleError(f"cannot read the {what} graph {source}: {exc}") from exc
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    graph_inputs = [v for v in graph.input if v.name not in initializers]
    wanted = {i.source for i in inputs}
    if {v.name for v in graph_inputs} != wanted:
        raise BundleError(f"the {what} graph takes {sorted(v.name for v in graph_inputs)}, expected {sorted(wanted)}",
                          "This repository's layout differs from the Immich exports clipsearch reproduces")
    if len(graph.output) != 1:
        raise BundleError(f"the {what} graph has {len(graph.output)} outputs, expected one embedding")
    opset = default_opset(model)
    if opset < 13:
        raise BundleError(f"the {what} graph uses ONNX opset {opset}; clipsearch converts opset 13 or later")
    types = {"float": TensorProto.FLOAT, "int64": TensorProto.INT64}
    outer_names = {i.name for i in inputs} | {output}
    by_source = {v.name: v for v in graph_inputs}

    body = helper.make_graph([], "row", [], [])
    body.CopyFrom(graph)
    del body.input[:]
    del body.output[:]
    body.name = "row"
    for name in list(outer_names):  # a body may not reuse a name of the graph around it
        _rename(body, name, _PREFIX + "inner_" + name)
    prefix, rows = [], []
    axes0 = helper.make_tensor(_PREFIX + "axes0", TensorProto.INT64, [1], [0])
    for index, spec in enumerate(inputs):
        original = by_source[spec.source]
        dims = _dims(original)
        if not dims or (isinstance(dims[0], int) and dims[0] != 1):
            raise BundleError(f"the {what} graph's input {spec.source} has shape {dims}, not [1 or batch, ...]")
        inner = spec.source if spec.source not in outer_names else _PREFIX + "inner_" + spec.source
        row = f"{_PREFIX}row_{index}"
        rows.append(helper.make_tensor_value_info(row, types[spec.elem_type], dims[1:]))
        source_type = original.type.tensor_type.elem_type
        if source_type == types[spec.elem_type]:
            prefix.append(helper.make_node("Unsqueeze", [row, axes0.name], [inner]))
        else:
            prefix.append(helper.make_node("Unsqueeze", [row, axes0.name], [f"{_PREFIX}unsq_{index}"]))
            prefix.append(helper.make_node("Cast", [f"{_PREFIX}unsq_{index}"], [inner], to=source_type))
    embedding = graph.output[0]
    out_dims = _dims(embedding)
    inner_out = embedding.name if embedding.name not in outer_names else _PREFIX + "inner_" + embedding.name
    if len(out_dims) != 2 or (isinstance(out_dims[0], int) and out_dims[0] != 1):
        raise BundleError(f"the {what} graph's output has shape {out_dims}, expected [1, dim]")
    suffix = [helper.make_node("Squeeze", [inner_out, axes0.name], [_PREFIX + "vec_raw"])]
    vec = _PREFIX + "vec_raw"
    if embedding.type.tensor_type.elem_type != TensorProto.FLOAT:
        suffix.append(helper.make_node("Cast", [vec], [_PREFIX + "vec_f32"], to=TensorProto.FLOAT))
        vec = _PREFIX + "vec_f32"
    last = helper.make_tensor(_PREFIX + "axis_last", TensorProto.INT64, [1], [-1])
    eps = helper.make_tensor(_PREFIX + "eps", TensorProto.FLOAT, [], [1e-12])
    suffix += [
        helper.make_node("Mul", [vec, vec], [_PREFIX + "sq"]),
        helper.make_node("ReduceSum", [_PREFIX + "sq", last.name], [_PREFIX + "sumsq"], keepdims=1),
        helper.make_node("Sqrt", [_PREFIX + "sumsq"], [_PREFIX + "norm"]),
        helper.make_node("Max", [_PREFIX + "norm", eps.name], [_PREFIX + "norm_safe"]),
        helper.make_node("Div", [vec, _PREFIX + "norm_safe"], [_PREFIX + "vec"]),
    ]
    nodes = list(body.node)
    del body.node[:]
    body.node.extend(prefix + nodes + suffix)
    body.initializer.extend([axes0, last, eps])
    body.input.extend(rows)
    body.output.extend([helper.make_tensor_value_info(_PREFIX + "vec", TensorProto.FLOAT, out_dims[1:])])

    outer_inputs = []
    for spec in inputs:
        dims = _dims(by_source[spec.source])
        outer_inputs.append(helper.make_tensor_value_info(spec.name, types[spec.elem_type], ["batch", *dims[1:]]))
    scan = helper.make_node("Scan", [i.name for i in inputs], [output], body=body, num_scan_inputs=len(inputs))
    outer = helper.make_graph([scan], graph.name or what, outer_inputs,
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", *out_dims[1:]])])
    wrapped = helper.make_model(outer, opset_imports=list(model.opset_import), producer_name="clipsearch")
    wrapped.ir_version = model.ir_version
    target = Path(target)
    data = target.with_name(target.name + ".data")
    for stale in (target, data):
        if stale.exists():
            stale.unlink()
    onnx.save_model(wrapped, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return out_dims
