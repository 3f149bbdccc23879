"""Opset conversion: onnx's version converter, plus an exact 18 -> 17 lowering.

torch's dynamo exporter writes opset >= 18 (asking for 17 silently gives 18), and onnx's
version converter has no 18 -> 17 adapter for ``Split`` (it fails on any DiT graph, whose
adaLN ``chunk(6)`` is a Split). Opset 18 changed only a few operators, so
:func:`lower_18_to_17` rewrites exactly those, when the rewrite is exact:

* ``Reduce{Mean,Max,Min,Prod,L1,L2,LogSum,LogSumExp,SumSquare}``: constant ``axes`` input ->
  ``axes`` attribute (``ReduceSum`` takes an input since 13: unchanged);
* ``Split``: ``num_outputs`` attribute -> equal split (opset 13 default) or, for an uneven
  split, a constant ``split`` sizes input computed from the inferred shape;
* ``Resize``: drops the 18-only attributes when they hold their defaults;
* ``Pad`` without ``axes``, ``ScatterND``/``ScatterElements`` with reduction none/add/mul,
  ``LpPool`` with ``ceil_mode=0``: unchanged.

Anything else introduced in 18 (``GroupNormalization``, ``Col2Im``, ``CenterCropPad``,
``Bitwise*``, Pad with ``axes``, Reduce with computed axes, ...) stops the conversion with a
one-line error naming the node.
"""

from __future__ import annotations

import numpy as np
import onnx
from ditperf.export.onnx_io import OnnxInputError, default_opset
from onnx import helper, numpy_helper

_REDUCE_18 = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}
_NEW_IN_18 = {"GroupNormalization", "Col2Im", "CenterCropPad", "BitwiseAnd", "BitwiseOr",
              "BitwiseXor", "BitwiseNot", "OptionalGetElement", "OptionalHasElement"}


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    # external-data initializers are weights, never axes: skip them (their data is not loaded)
    vals = {i.name: numpy_helper.to_array(i) for i in graph.initializer
            if i.data_location != onnx.TensorProto.EXTERNAL}
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
            for a in n.attribute:
                if a.name == "value":
                    vals[n.output[0]] = numpy_helper.to_array(a.t)
    return vals


def _attr(node: onnx.NodeProto, name: str):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return None


def _drop_attr(node: onnx.NodeProto, name: str) -> None:
    keep = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(keep)


def _fail(node: onnx.NodeProto, why: str) -> OnnxInputError:
    return OnnxInputError(f"cannot lower opset 18 to 17: node {node.name or node.op_type} "
                          f"({node.op_type}) {why}; use --opset 18")


def lower_18_to_17(model: onnx.ModelProto) -> onnx.ModelProto:
    """Exact opset 18 -> 17 rewrite (see the module docstring); returns a new model."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    consts = _constants(g)
    shapes: dict[str, list] = {}
    if any(n.op_type == "Split" for n in g.node):
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
            for vi in list(inferred.graph.value_info) + list(inferred.graph.input):
                dims = vi.type.tensor_type.shape.dim
                shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        except Exception:  # noqa: BLE001, S110 - shapes are a hint here; none is fine
            pass
    new_inits = []
    for node in g.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        op = node.op_type
        if op in _NEW_IN_18:
            raise _fail(node, "does not exist before opset 18")
        if op in _REDUCE_18:
            if _attr(node, "noop_with_empty_axes"):
                raise _fail(node, "uses noop_with_empty_axes=1")
            _drop_attr(node, "noop_with_empty_axes")
            if len(node.input) > 1 and node.input[1]:
                axes = consts.get(node.input[1])
                if axes is None:
                    raise _fail(node, "has computed (non-constant) axes")
                node.attribute.append(helper.make_attribute("axes", [int(a) for a in
                                                                     axes.reshape(-1)]))
                del node.input[1:]
        elif op == "Split":
            n_out = _attr(node, "num_outputs")
            if n_out is None:
                continue
            _drop_attr(node, "num_outputs")
            axis = int(_attr(node, "axis") or 0)
            dims = shapes.get(node.input[0])
            size = dims[axis] if dims and -len(dims) <= axis < len(dims) else None
            if size is not None and size % n_out:
                chunk = -(-size // n_out)
                sizes = [chunk] * (size // chunk) + ([size % chunk] if size % chunk else [])
                name = f"{node.name or 'split'}_sizes_opset17"
                new_inits.append(numpy_helper.from_array(np.array(sizes, np.int64), name))
                node.input.append(name)
            elif size is None:
                raise _fail(node, "splits a dimension of unknown size into num_outputs parts")
        elif op == "Resize":
            if _attr(node, "antialias") or (_attr(node, "keep_aspect_ratio_policy") not in
                                            (None, b"stretch", "stretch")) or _attr(node, "axes"):
                raise _fail(node, "uses antialias/axes/keep_aspect_ratio_policy (opset 18)")
            for a in ("antialias", "keep_aspect_ratio_policy", "axes"):
                _drop_attr(node, a)
        elif op == "Pad" and len(node.input) > 3 and node.input[3]:
            raise _fail(node, "has an axes input (opset 18)")
        elif op in ("ScatterND", "ScatterElements"):
            red = _attr(node, "reduction")
            if red not in (None, b"none", b"add", b"mul", "none", "add", "mul"):
                raise _fail(node, f"uses reduction={red!r} (opset 18)")
        elif op == "LpPool" and _attr(node, "ceil_mode"):
            raise _fail(node, "uses ceil_mode (opset 18)")
    g.initializer.extend(new_inits)
    # drop initializers nobody reads any more (the former axes inputs)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    for imp in out.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = 17
    return out


def convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Convert the default-domain opset; 18 -> 17 uses :func:`lower_18_to_17`, the rest
    onnx's version converter. One-line :class:`OnnxInputError` when impossible."""
    from onnx import version_converter

    cur = default_opset(model)
    if cur is None:
        raise OnnxInputError("the model imports no default-domain (ai.onnx) opset")
    if cur == opset:
        return model
    if cur >= 18 and opset == 17:
        if cur > 18:
            model = convert_opset(model, 18)
        return lower_18_to_17(model)
    try:
        return version_converter.convert_version(model, opset)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxInputError(f"cannot convert the model from opset {cur} to {opset} with "
                             f"onnx.version_converter: {msg[:200]}") from exc
