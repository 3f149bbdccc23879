"""ONNX graph surgery for TensorRT with onnx-graphsurgeon (+ onnx shape inference).

Passes (run in the order given; each returns counts of what it changed):

``fold-constants``
    shape inference, then ``Graph.fold_constants()`` (onnxruntime evaluates constant
    subgraphs). Shape inference first matters: without it fewer shape subgraphs fold.
``cleanup``
    remove dead nodes/tensors, topological sort (also run after every pass).
``cast-chains``
    ``Cast(Cast(x, T1), T2)`` -> ``Cast(x, T2)`` when ``T0 -> T1`` is lossless (e.g.
    fp16 -> fp32 -> fp16 becomes nothing, fp16 -> fp32 -> fp64 one Cast); identity Casts
    (``to`` == input type) are removed. A lossy middle cast (fp32 -> fp16 -> fp32 rounds) is
    kept: removing it would change numerics.
``fold-layernorm``
    ``ReduceMean -> Sub -> Pow(2) -> ReduceMean -> Add(eps) -> Sqrt -> Div`` (+ optional
    ``Mul(gamma)``, ``Add(beta)``) over the trailing axes -> one ``LayerNormalization``
    (``stash_type=1``: fp32 statistics; the decomposed chain overflows in FP16 in TensorRT).
    Needs opset >= 17. Matched by hand, not with ``gs.GraphPattern`` (which finds nothing
    when one tensor, ``x - mean``, feeds two pattern nodes).
``fold-attention``
    ``MatMul(Q*s1, K^T*s2) [*|/ scale] [+ mask] -> Softmax(-1) -> MatMul(., V)`` on 4-D
    (B, H, N, D) tensors -> one opset-23 ``Attention`` (scale = s1*s2*scale, explicit; an
    fp32 Softmax between Casts becomes ``softmax_precision=FLOAT``). Needs opset >= 23.
    torch's masked-SDPA guard ``Where(IsNaN(P), 0, P)`` moves to the Attention output. Rows
    whose keys are all masked are implementation-defined for ``Attention`` (onnxruntime
    returns 0; the MatMul form gives NaN or, with a finite-min bias, the mean of V); ditperf's
    models never produce such rows (every sample has a real text token).
``cast-around``
    for ops a precision does not support (default: BF16 ``Resize``, which users report
    unsupported in TensorRT, plus every op whose matrix types lack the tensor's type but
    include FP32): ``Cast`` the inputs of that type to fp32 and the outputs back.
``plugin``
    replace nodes by custom-domain nodes (TensorRT plugin style): by op type
    (``Attention:ditperf.plugins``) or a subgraph between named tensors
    (``MyOp=in1,in2->out1@my.domain``).

The result passes ``onnx.checker``; :func:`verify_numerics` compares onnxruntime outputs
before and after (only possible while the graph stays in standard ops).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from ditperf.export.onnx_io import OnnxInputError, default_opset, model_nbytes
from ditperf.export.opset import convert_opset
from onnx import TensorProto
from onnx_graphsurgeon.logger import G_LOGGER

G_LOGGER.colors = False
G_LOGGER.severity = G_LOGGER.ERROR

DEFAULT_PASSES = ("fold-constants", "cast-chains", "fold-layernorm", "fold-attention",
                  "cast-around", "cleanup")
ALL_PASSES = DEFAULT_PASSES + ("plugin",)
MIN_SURGERY_OPSET = 13
PLUGIN_DOMAIN = "ditperf.plugins"


@dataclass
class PassReport:
    """What one pass changed: ``changes`` counts by kind, ``notes`` say what was skipped."""

    name: str
    changes: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    nodes_before: int = 0
    nodes_after: int = 0

    def to_dict(self) -> dict:
        return {"pass": self.name, "changes": self.changes, "notes": self.notes,
                "nodes_before": self.nodes_before, "nodes_after": self.nodes_after}

    def line(self) -> str:
        ch = ", ".join(f"{k}={v}" for k, v in self.changes.items() if v) or "no change"
        note = f" ({'; '.join(self.notes)})" if self.notes else ""
        return f"{self.name:15s} {self.nodes_before:5d} -> {self.nodes_after:5d} nodes: {ch}{note}"


@dataclass
class PluginSpec:
    """A plugin replacement: by ``op_type`` (``inputs``/``outputs`` empty) or a subgraph
    between named tensors, replaced by one node ``name`` in ``domain``."""

    name: str
    domain: str = PLUGIN_DOMAIN
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> PluginSpec:
        """``OP[:DOMAIN]`` or ``NAME=IN1,IN2->OUT1[,OUT2][@DOMAIN]``."""
        m = re.fullmatch(r"\s*([\w.]+)\s*=\s*([^>]*)->\s*([^@]+?)\s*(?:@\s*([\w.]+))?\s*", text)
        if m:
            ins = [s.strip() for s in m.group(2).rstrip("-").split(",") if s.strip()]
            outs = [s.strip() for s in m.group(3).split(",") if s.strip()]
            if not ins or not outs:
                raise OnnxInputError(f"--plugin {text!r}: expected NAME=IN1,IN2->OUT1[@DOMAIN]")
            return cls(m.group(1), m.group(4) or PLUGIN_DOMAIN, ins, outs)
        m = re.fullmatch(r"\s*(\w+)\s*(?::\s*([\w.]+))?\s*", text)
        if not m:
            raise OnnxInputError(f"--plugin {text!r}: expected OP[:DOMAIN] (e.g. "
                                 "Attention:ditperf.plugins) or NAME=IN1,IN2->OUT1[@DOMAIN]")
        return cls(m.group(1), m.group(2) or PLUGIN_DOMAIN)


@dataclass
class SurgeryOptions:
    opset: int | None = None
    plugins: list[PluginSpec] = field(default_factory=list)
    cast_around: list[tuple[str, int]] | None = None  # (op_type, ONNX dtype); None = default


# ----------------------------------------------------------------------------------------
# Helpers


def infer_shapes(model: onnx.ModelProto, *, skeleton_above: int = 2**31 - 2**27
                 ) -> onnx.ModelProto:
    """onnx shape inference (with data propagation). Models above ``skeleton_above`` bytes
    (protobuf cannot serialize > 2 GiB) are inferred on a weightless skeleton whose large
    initializers keep only dims and type; the inferred ``value_info`` is copied back."""
    if model_nbytes(model) < skeleton_above:
        try:
            return onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception:  # noqa: BLE001 - data propagation is optional; plain inference next
            return onnx.shape_inference.infer_shapes(model)
    skel = skeleton(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(skel, data_prop=True)
    except Exception:  # noqa: BLE001 - data propagation is optional; plain inference next
        inferred = onnx.shape_inference.infer_shapes(skel)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without the weights' bytes: initializers above 4 KiB become graph
    inputs of the same name, type and shape. Shape inference and ``onnx.checker`` need
    nothing more, and it serializes far below protobuf's 2 GiB limit."""
    skel = onnx.ModelProto()
    skel.ir_version = model.ir_version
    skel.opset_import.extend(model.opset_import)
    skel.functions.extend(model.functions)
    skel.metadata_props.extend(model.metadata_props)
    g = skel.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.value_info.extend(model.graph.value_info)
    inputs = {i.name for i in model.graph.input}
    for init in model.graph.initializer:
        if init.data_location != TensorProto.EXTERNAL and init.ByteSize() <= 4096:
            g.initializer.append(init)
        elif init.name not in inputs:  # dims and type are all that is needed of a weight
            g.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type,
                                                              list(init.dims)))
    return skel


def onnx_dtype(dt) -> int | None:
    """graphsurgeon dtype (numpy dtype or ONNX int for bf16 & co.) -> ONNX element type."""
    if dt is None:
        return None
    if isinstance(dt, int):
        return dt
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dt))
    except Exception:  # noqa: BLE001 - a dtype ONNX cannot name: the caller reports it
        return None


def _producer(t: gs.Tensor, op: str | Sequence[str]) -> gs.Node | None:
    ops = (op,) if isinstance(op, str) else tuple(op)
    if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op in ops:
        return t.inputs[0]
    return None


def _const(t: gs.Tensor) -> np.ndarray | None:
    """Values of a constant tensor (initializer or Constant node output)."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    node = _producer(t, "Constant")
    if node is not None and "value" in node.attrs and isinstance(node.attrs["value"], gs.Constant):
        return np.asarray(node.attrs["value"].values)
    return None


def _scalar(t: gs.Tensor) -> float | None:
    v = _const(t)
    if v is None or v.size != 1:
        return None
    return float(v.reshape(()))


def _only_consumers(t: gs.Tensor, nodes: Sequence[gs.Node], graph: gs.Graph) -> bool:
    """``t`` is used exactly by ``nodes`` (each once) and is not a graph output."""
    if t in graph.outputs:
        return False
    return sorted(id(n) for n in t.outputs) == sorted(id(n) for n in nodes)


def _replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    for consumer in list(old.outputs):
        for i, x in enumerate(list(consumer.inputs)):
            if x is old:
                consumer.inputs[i] = new


def _reduce_axes(node: gs.Node) -> list[int] | None:
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > 1:
        v = _const(node.inputs[1])
        return None if v is None else [int(a) for a in v.reshape(-1)]
    return None


def _trailing_axis(axes: list[int] | None, rank: int | None) -> int | None:
    """First normalized axis when ``axes`` are the trailing dims (e.g. [-1] -> -1)."""
    if not axes:
        return None
    if all(a < 0 for a in axes):
        s = sorted(axes)
        return s[0] if s == list(range(-len(s), 0)) else None
    if rank is None:
        return None
    s = sorted(a % rank for a in axes)
    return s[0] - rank if s == list(range(rank - len(s), rank)) else None


def _np_dtype(t: gs.Tensor) -> np.dtype | None:
    return t.dtype if isinstance(t.dtype, np.dtype) else None


_uid = [0]


def _name(prefix: str) -> str:
    _uid[0] += 1
    return f"{prefix}_ditperf_{_uid[0]}"


# ----------------------------------------------------------------------------------------
# Passes (each mutates the graph and returns (changes, notes))


def pass_fold_constants(graph: gs.Graph, opts: SurgeryOptions) -> tuple[dict, list]:
    before = len(graph.nodes)
    graph.fold_constants(error_ok=True)
    graph.cleanup()
    return {"nodes_removed": before - len(graph.nodes)}, []


def pass_cleanup(graph: gs.Graph, opts: SurgeryOptions) -> tuple[dict, list]:
    before = len(graph.nodes)
    graph.cleanup(remove_unused_node_outputs=True).toposort()
    return {"nodes_removed": before - len(graph.nodes)}, []


# (from, to) pairs of ONNX types for which from -> to -> from round-trips exactly.
_F, _H, _B, _D = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE
_I8, _I16, _I32, _I64 = TensorProto.INT8, TensorProto.INT16, TensorProto.INT32, TensorProto.INT64
_U8, _BOOL = TensorProto.UINT8, TensorProto.BOOL
_LOSSLESS = {
    (_H, _F), (_H, _D), (_B, _F), (_B, _D), (_F, _D),
    (_I8, _I16), (_I8, _I32), (_I8, _I64), (_I16, _I32), (_I16, _I64), (_I32, _I64),
    (_U8, _I16), (_U8, _I32), (_U8, _I64), (_I8, _H), (_U8, _H), (_I8, _F), (_U8, _F),
    (_I16, _F), (_I32, _D), (_I8, _D), (_U8, _D), (_I16, _D),
    (_BOOL, _I8), (_BOOL, _U8), (_BOOL, _I16), (_BOOL, _I32), (_BOOL, _I64), (_BOOL, _H),
    (_BOOL, _B), (_BOOL, _F), (_BOOL, _D),
}


def pass_cast_chains(graph: gs.Graph, opts: SurgeryOptions) -> tuple[dict, list]:
    identity = chains = lossy = 0
    for node in list(graph.nodes):
        if node.op != "Cast" or not node.outputs:
            continue
        src = node.inputs[0]
        to = int(node.attrs["to"])
        out = node.outputs[0]
        if onnx_dtype(src.dtype) == to and out not in graph.outputs:
            _replace_uses(out, src)
            node.outputs.clear()
            identity += 1
            continue
        prev = _producer(src, "Cast")
        if prev is None:
            continue
        t0 = onnx_dtype(prev.inputs[0].dtype)
        t1 = int(prev.attrs["to"])
        if t0 is None or (t0, t1) not in _LOSSLESS:
            if t0 is not None:
                lossy += 1
            continue
        orig = prev.inputs[0]
        if to == t0 and out not in graph.outputs:
            _replace_uses(out, orig)  # x -> wider -> back: a no-op
            node.outputs.clear()
        else:
            node.inputs[0] = orig
        chains += 1
    notes = [f"{lossy} lossy Cast chain(s) kept"] if lossy else []
    return {"identity_casts_removed": identity, "cast_chains_shortened": chains}, notes


def _match_layernorm(div: gs.Node, graph: gs.Graph) -> dict | None:
    """Match the decomposed LayerNorm ending in ``div``; return its parts or None."""
    if div.op != "Div" or len(div.inputs) != 2:
        return None
    d, std = div.inputs
    sub = _producer(d, "Sub")
    sqrt = _producer(std, "Sqrt")
    if sub is None or sqrt is None:
        return None
    x, mean = sub.inputs
    rm1 = _producer(mean, "ReduceMean")
    if rm1 is None or rm1.inputs[0] is not x or rm1.attrs.get("keepdims", 1) != 1:
        return None
    add = _producer(sqrt.inputs[0], "Add")
    if add is None:
        return None
    eps, var = None, None
    for a, b in ((0, 1), (1, 0)):
        e = _scalar(add.inputs[a])
        if e is not None:
            eps, var = e, add.inputs[b]
            break
    rm2 = _producer(var, "ReduceMean") if var is not None else None
    if rm2 is None or rm2.attrs.get("keepdims", 1) != 1:
        return None
    sq = rm2.inputs[0]
    pw = _producer(sq, ("Pow", "Mul"))
    if pw is None:
        return None
    if pw.op == "Pow" and not (pw.inputs[0] is d and _scalar(pw.inputs[1]) == 2.0):
        return None
    if pw.op == "Mul" and not (pw.inputs[0] is d and pw.inputs[1] is d):
        return None
    rank = len(x.shape) if x.shape is not None else None
    ax1 = _trailing_axis(_reduce_axes(rm1), rank)
    ax2 = _trailing_axis(_reduce_axes(rm2), rank)
    if ax1 is None or ax1 != ax2:
        return None
    # every intermediate must feed only the chain
    pw_users = [pw] if pw.op == "Pow" else [pw, pw]
    ok = (_only_consumers(mean, [sub], graph) and _only_consumers(d, pw_users + [div], graph)
          and _only_consumers(sq, [rm2], graph) and _only_consumers(var, [add], graph)
          and _only_consumers(add.outputs[0], [sqrt], graph)
          and _only_consumers(std, [div], graph))
    if not ok:
        return None
    out, gamma, beta, last = div.outputs[0], None, None, div
    mul = out.outputs[0] if len(out.outputs) == 1 and out not in graph.outputs else None
    if mul is not None and mul.op == "Mul":
        other = mul.inputs[1] if mul.inputs[0] is out else mul.inputs[0]
        if _const(other) is not None and _const(other).ndim <= 1:
            gamma, last, out = other, mul, mul.outputs[0]
            nxt = out.outputs[0] if len(out.outputs) == 1 and out not in graph.outputs else None
            if nxt is not None and nxt.op == "Add":
                other = nxt.inputs[1] if nxt.inputs[0] is out else nxt.inputs[0]
                if _const(other) is not None and _const(other).ndim <= 1:
                    beta, last, out = other, nxt, nxt.outputs[0]
    return {"x": x, "eps": eps, "axis": ax1, "gamma": gamma, "beta": beta, "last": last,
            "out": out}


def pass_fold_layernorm(graph: gs.Graph, opts: SurgeryOptions) -> tuple[dict, list]:
    if (graph.opset or 0) < 17:
        return {"layernorms_folded": 0}, [(f"skipped: LayerNormalization needs opset >= 17 "
                                          f"(model has {graph.opset}; use --opset 17)")]
    folded, notes = 0, []
    for node in list(graph.nodes):
        m = _match_layernorm(node, graph)
        if m is None:
            continue
        x, out = m["x"], m["out"]
        dt = _np_dtype(x)
        gamma, beta = m["gamma"], m["beta"]
        norm_shape = None
        if x.shape is not None and all(isinstance(s, int) for s in x.shape[m["axis"]:]):
            norm_shape = tuple(x.shape[m["axis"]:])
        if gamma is None or (_const(gamma).ndim == 0):
            if norm_shape is None or dt is None:
                notes.append(f"{node.name}: normalized size or dtype unknown, kept")
                continue
            g = np.ones(norm_shape, dt) * (1 if gamma is None else _const(gamma))
            gamma = gs.Constant(_name("ln_gamma"), g.astype(dt))
        if beta is not None and _const(beta).ndim == 0:
            if norm_shape is None or dt is None:
                notes.append(f"{node.name}: normalized size or dtype unknown, kept")
                continue
            beta = gs.Constant(_name("ln_beta"), np.full(norm_shape, _const(beta), dt))
        inputs = [x, gamma] + ([beta] if beta is not None else [])
        m["last"].outputs.clear()
        graph.nodes.append(gs.Node("LayerNormalization", name=_name("LayerNorm"),
                                   attrs={"axis": m["axis"], "epsilon": m["eps"],
                                          "stash_type": 1},
                                   inputs=inputs, outputs=[out]))
        folded += 1
    return {"layernorms_folded": folded}, notes


def _scale_chain(t: gs.Tensor, allow_transpose: bool) -> tuple[gs.Tensor, float, bool]:
    """Walk back through Mul-by-scalar (and one last-two-dims Transpose when allowed)."""
    scale, transposed = 1.0, False
    while True:
        mul = _producer(t, ("Mul", "Div"))
        if mul is not None and len(t.outputs) == 1:
            for a, b in ((0, 1), (1, 0)):
                s = _scalar(mul.inputs[b])
                if s is not None and (mul.op == "Mul" or b == 1):
                    scale *= s if mul.op == "Mul" else 1.0 / s
                    t = mul.inputs[a]
                    break
            else:
                return t, scale, transposed
            continue
        tr = _producer(t, "Transpose")
        if allow_transpose and not transposed and tr is not None and len(t.outputs) == 1:
            perm = list(tr.attrs.get("perm", []))
            if perm == [0, 1, 3, 2]:
                t, transposed = tr.inputs[0], True
                continue
        return t, scale, transposed


def _expand_mask_rows(graph: gs.Graph, mask: gs.Tensor, q: gs.Tensor) -> gs.Tensor | None:
    """Broadcast a (.., 1, Nk) mask to (.., Nq, Nk): the Attention spec allows broadcasting,
    but onnxruntime (1.32) requires the mask's query dimension to equal Nq."""
    if mask.shape is None or len(mask.shape) < 2:
        return None
    nq = q.shape[2]
    if nq == 1 or mask.shape[-2] != 1:
        return mask
    r = len(mask.shape)
    shape_inputs: list[gs.Tensor]
    if isinstance(nq, int):
        target = gs.Constant(_name("mask_rows"), np.array([1] * (r - 2) + [nq, 1], np.int64))
    else:
        nq_t = gs.Variable(_name("nq"), dtype=np.int64, shape=[1])
        graph.nodes.append(gs.Node("Shape", name=_name("Shape"), attrs={"start": 2, "end": 3},
                                   inputs=[q], outputs=[nq_t]))
        target = gs.Variable(_name("mask_rows"), dtype=np.int64, shape=[r])
        shape_inputs = [gs.Constant(_name("ones"), np.ones(r - 2, np.int64)), nq_t,
                        gs.Constant(_name("one"), np.ones(1, np.int64))]
        graph.nodes.append(gs.Node("Concat", name=_name("Concat"), attrs={"axis": 0},
                                   inputs=shape_inputs, outputs=[target]))
    expanded = gs.Variable(_name(f"{mask.name}_rows"), dtype=mask.dtype)
    graph.nodes.append(gs.Node("Expand", name=_name("Expand"), inputs=[mask, target],
                               outputs=[expanded]))
    return expanded


def _nan_guard(p: gs.Tensor) -> gs.Tensor | None:
    """``Where(IsNaN(p), 0, p)`` after a Softmax (torch's masked SDPA: rows with every key
    masked become 0): returns the guarded tensor, or None when the pattern is absent."""
    users = list(p.outputs)
    if len(users) != 2 or {u.op for u in users} != {"IsNaN", "Where"}:
        return None
    isnan = next(u for u in users if u.op == "IsNaN")
    where = next(u for u in users if u.op == "Where")
    if where.inputs[0] is not isnan.outputs[0] or where.inputs[2] is not p or \
            _scalar(where.inputs[1]) != 0.0 or len(isnan.outputs[0].outputs) != 1:
        return None
    return where.outputs[0]


def pass_fold_attention(graph: gs.Graph, opts: SurgeryOptions) -> tuple[dict, list]:
    if (graph.opset or 0) < 23:
        return {"attentions_folded": 0}, [(f"skipped: ONNX Attention needs opset >= 23 (model "
                                          f"has {graph.opset}; use --opset 23)")]
    folded, guards, notes = 0, 0, []
    for sm in list(graph.nodes):
        if sm.op != "Softmax" or sm.attrs.get("axis", -1) not in (-1, 3):
            continue
        p = sm.outputs[0]
        precision = None
        nan_guard = _nan_guard(p)
        if nan_guard is not None:
            p = nan_guard
        post = p.outputs[0] if len(p.outputs) == 1 else None
        if post is not None and post.op == "Cast":
            precision, p = int(TensorProto.FLOAT), post.outputs[0]
            post = p.outputs[0] if len(p.outputs) == 1 else None
        if post is None or post.op != "MatMul" or post.inputs[0] is not p or p in graph.outputs:
            continue
        s = sm.inputs[0]
        pre_cast = _producer(s, "Cast")
        if pre_cast is not None and precision is not None:
            s = pre_cast.inputs[0]
        elif precision is not None:
            continue
        mask = None
        add = _producer(s, "Add")
        if add is not None and len(s.outputs) == 1:
            for a, b in ((0, 1), (1, 0)):
                if _producer(add.inputs[a], ("MatMul", "Mul", "Div")) is not None:
                    mask, s = add.inputs[b], add.inputs[a]
                    break
            else:
                continue
        scores, post_scale, _ = _scale_chain(s, allow_transpose=False)
        mm = _producer(scores, "MatMul")
        if mm is None or len(scores.outputs) != 1:
            continue
        q, q_scale, _ = _scale_chain(mm.inputs[0], allow_transpose=False)
        k, k_scale, transposed = _scale_chain(mm.inputs[1], allow_transpose=True)
        v = post.inputs[1]
        if any(t.shape is None or len(t.shape) != 4 for t in (q, k, v)):
            notes.append(f"{sm.name}: Q/K/V not known to be 4-D, kept")
            continue
        if not transposed:
            kt = gs.Variable(_name("k_bhnd"), dtype=k.dtype)
            graph.nodes.append(gs.Node("Transpose", name=_name("Transpose"),
                                       attrs={"perm": [0, 1, 3, 2]}, inputs=[k], outputs=[kt]))
            k = kt
        attrs = {"scale": float(q_scale * k_scale * post_scale)}
        if precision is not None:
            attrs["softmax_precision"] = precision
        if mask is not None:
            mask = _expand_mask_rows(graph, mask, q)
            if mask is None:
                notes.append(f"{sm.name}: mask rank unknown, kept")
                continue
        out = post.outputs[0]
        post.outputs.clear()
        inputs = [q, k, v] + ([mask] if mask is not None else [])
        att_out = out
        if nan_guard is not None:  # keep "fully masked row -> 0" whatever Attention gives
            att_out = gs.Variable(_name("attention_raw"), dtype=out.dtype, shape=out.shape)
            isnan = gs.Variable(_name("attention_isnan"), dtype=np.bool_, shape=out.shape)
            zero = gs.Constant(_name("zero"), np.zeros((), _np_dtype(out) or np.float32))
            graph.nodes.append(gs.Node("IsNaN", name=_name("IsNaN"), inputs=[att_out],
                                       outputs=[isnan]))
            graph.nodes.append(gs.Node("Where", name=_name("Where"),
                                       inputs=[isnan, zero, att_out], outputs=[out]))
            guards += 1
        graph.nodes.append(gs.Node("Attention", name=_name("Attention"), attrs=attrs,
                                   inputs=inputs, outputs=[att_out]))
        folded += 1
    return {"attentions_folded": folded, "nan_guards_moved": guards}, notes


def default_cast_around(graph: gs.Graph) -> list[tuple[str, int]]:
    """(op, dtype) pairs to compute in fp32: matrix ops lacking BF16/FP16 (but with FP32),
    plus BF16 Resize (unsupported in practice)."""
    from ditperf.export.coverage import load_matrix

    m = load_matrix()
    pairs = {("Resize", _B)}
    used = {n.op for n in graph.nodes}
    for op in used:
        info = m["operators"].get(op)
        if not info or not info["supported"] or "FP32" not in info["types"]:
            continue
        for name, t in (("BF16", _B), ("FP16", _H)):
            if name not in info["types"]:
                pairs.add((op, t))
    return sorted(pairs)


def pass_cast_around(graph: gs.Graph, opts: SurgeryOptions) -> tuple[dict, list]:
    targets = opts.cast_around if opts.cast_around is not None else default_cast_around(graph)
    wrapped = inserted = 0
    for node in list(graph.nodes):
        types = {t for op, t in targets if op == node.op}
        if not types:
            continue
        changed = False
        for i, inp in enumerate(list(node.inputs)):
            if isinstance(inp, gs.Variable | gs.Constant) and onnx_dtype(inp.dtype) in types:
                up = gs.Variable(_name(f"{inp.name}_fp32"), dtype=np.float32, shape=inp.shape)
                graph.nodes.append(gs.Node("Cast", name=_name("CastUp"),
                                           attrs={"to": int(_F)}, inputs=[inp], outputs=[up]))
                node.inputs[i] = up
                inserted += 1
                changed = True
        if not changed:
            continue
        for i, out in enumerate(list(node.outputs)):
            t = onnx_dtype(out.dtype)
            if t in types:
                mid = gs.Variable(_name(f"{out.name}_fp32"), dtype=np.float32, shape=out.shape)
                node.outputs[i] = mid
                graph.nodes.append(gs.Node("Cast", name=_name("CastDown"), attrs={"to": int(t)},
                                           inputs=[mid], outputs=[out]))
                inserted += 1
        wrapped += 1
    return {"nodes_wrapped": wrapped, "casts_inserted": inserted}, []


def _subgraph_between(graph: gs.Graph, inputs: list[gs.Tensor],
                      outputs: list[gs.Tensor]) -> list[gs.Node]:
    stop = {id(t) for t in inputs}
    seen: dict[int, gs.Node] = {}
    stack = list(outputs)
    while stack:
        t = stack.pop()
        if id(t) in stop:
            continue
        for n in t.inputs:
            if id(n) not in seen:
                seen[id(n)] = n
                stack.extend(n.inputs)
    return list(seen.values())


def pass_plugin(graph: gs.Graph, opts: SurgeryOptions) -> tuple[dict, list]:
    if not opts.plugins:
        return {}, ["no --plugin given"]
    tensors = graph.tensors()
    by_op = replaced_sub = 0
    notes = []
    domains = set()
    for spec in opts.plugins:
        if not spec.inputs:
            for node in graph.nodes:
                if node.op == spec.name and node.domain in (None, "", "ai.onnx"):
                    node.domain = spec.domain
                    node.attrs.setdefault("plugin_version", "1")
                    node.attrs.setdefault("plugin_namespace", "")
                    by_op += 1
                    domains.add(spec.domain)
            continue
        missing = [n for n in spec.inputs + spec.outputs if n not in tensors]
        if missing:
            raise OnnxInputError(f"--plugin {spec.name}: no tensor named {', '.join(missing)} "
                                 "in the graph")
        ins = [tensors[n] for n in spec.inputs]
        outs = [tensors[n] for n in spec.outputs]
        nodes = _subgraph_between(graph, ins, outs)
        if any(not t.inputs for t in outs) or not nodes:
            raise OnnxInputError(f"--plugin {spec.name}: the outputs are not computed from "
                                 "the given inputs")
        leaked = [t.name for n in nodes for t in n.inputs
                  if isinstance(t, gs.Variable) and not t.inputs and t not in ins]
        if leaked:
            notes.append(f"{spec.name}: the subgraph also reads {', '.join(leaked[:3])} "
                         "(kept as extra plugin inputs)")
            ins += [tensors[n] for n in dict.fromkeys(leaked)]
        for n in nodes:
            for o in n.outputs:
                if o in outs:
                    n.outputs.remove(o)
        graph.nodes.append(gs.Node(spec.name, name=_name(spec.name), domain=spec.domain,
                                   attrs={"plugin_version": "1", "plugin_namespace": ""},
                                   inputs=ins, outputs=outs))
        replaced_sub += len(nodes)
        domains.add(spec.domain)
    for d in sorted(domains):
        graph.import_domains = [i for i in graph.import_domains if i.domain != d] + [
            onnx.helper.make_opsetid(d, 1)]
    return {"nodes_retargeted": by_op, "subgraph_nodes_replaced": replaced_sub}, notes


PASS_FUNCS: dict[str, Callable[[gs.Graph, SurgeryOptions], tuple[dict, list]]] = {
    "fold-constants": pass_fold_constants,
    "cleanup": pass_cleanup,
    "cast-chains": pass_cast_chains,
    "fold-layernorm": pass_fold_layernorm,
    "fold-attention": pass_fold_attention,
    "cast-around": pass_cast_around,
    "plugin": pass_plugin,
}


# ----------------------------------------------------------------------------------------
# Driver


def run_passes(model: onnx.ModelProto, passes: Sequence[str] = DEFAULT_PASSES,
               options: SurgeryOptions | None = None) -> tuple[onnx.ModelProto, list[PassReport]]:
    """Apply ``passes`` in order and return the new model and one report per pass."""
    opts = options or SurgeryOptions()
    unknown = [p for p in passes if p not in PASS_FUNCS]
    if unknown:
        raise OnnxInputError(f"unknown pass(es) {', '.join(unknown)}; choose from "
                             f"{', '.join(ALL_PASSES)}")
    if opts.plugins and "plugin" not in passes:
        passes = list(passes) + ["plugin"]
    opset = default_opset(model)
    if opset is None:
        raise OnnxInputError("the model imports no default-domain (ai.onnx) opset")
    if opts.opset is not None:
        model = convert_opset(model, opts.opset)
    elif opset < MIN_SURGERY_OPSET:
        raise OnnxInputError(f"opset {opset} is too old for surgery (the passes assume opset >= "
                             f"{MIN_SURGERY_OPSET}); add --opset 17 to convert it first")
    ir_version, meta = model.ir_version, list(model.metadata_props)
    reports = []
    for name in passes:
        model = infer_shapes(model)
        graph = gs.import_onnx(model)
        rep = PassReport(name, nodes_before=len(graph.nodes))
        rep.changes, rep.notes = PASS_FUNCS[name](graph, opts)
        graph.cleanup(remove_unused_node_outputs=name == "cleanup").toposort()
        rep.nodes_after = len(graph.nodes)
        model = gs.export_onnx(graph)
        model.ir_version = ir_version
        reports.append(rep)
    del model.metadata_props[:]
    model.metadata_props.extend(meta)
    return infer_shapes(model), reports


def check_model(model: onnx.ModelProto) -> None:
    """``onnx.checker`` with ``full_check`` (shape inference too); models above ~1.9 GiB are
    checked on their :func:`skeleton` (the weights themselves are not validated)."""
    if model_nbytes(model) < 2**31 - 2**27:
        onnx.checker.check_model(model, full_check=True)
    else:
        onnx.checker.check_model(skeleton(model), full_check=True)


def verify_numerics(before: onnx.ModelProto | str, after: onnx.ModelProto | str, *, seed: int = 0,
                    dims: dict[str, int] | None = None) -> dict:
    """Run both models in onnxruntime on the same random inputs; max abs/rel difference per
    output (models or paths; use paths above 2 GiB). Raises :class:`OnnxInputError` when
    either model cannot run (custom domains)."""
    from ditperf.export.check import compare_outputs, random_feeds
    from ditperf.export.onnx_io import ort_session

    try:
        s0, s1 = ort_session(before), ort_session(after)
    except Exception as exc:
        raise OnnxInputError(f"onnxruntime cannot run the model: {str(exc).splitlines()[0]}") \
            from exc
    feeds = random_feeds(s0, seed=seed, dims=dims)
    names = [o.name for o in s0.get_outputs()]
    r0 = dict(zip(names, s0.run(None, feeds), strict=True))
    names1 = [o.name for o in s1.get_outputs()]
    wanted = {i.name for i in s1.get_inputs()}
    r1 = dict(zip(names1, s1.run(None, {k: v for k, v in feeds.items() if k in wanted}),
                  strict=True))
    return compare_outputs(r0, r1)
