"""ONNX translations of ditperf's custom ops for the dynamo exporter.

``torch.onnx.export(..., dynamo=True, custom_translation_table=translation_table(opset))``
maps each ``torch.ops.ditperf.*`` forward op to standard ONNX (the exporter never runs the
Triton kernels: it traces with fake tensors and calls these functions on symbolic values):

``layer_norm(x, weight, bias, shift, scale, eps)``
    ``LayerNormalization(x, weight|ones, bias, axis=-1, epsilon=eps, stash_type=1)`` (fp32
    statistics, opset >= 17; never the ReduceMean/Pow chain that overflows in FP16 under
    TensorRT), then the adaLN modulation ``* (1 + scale) + shift`` as Mul/Add with
    ``Unsqueeze`` of the (B, C) vectors to (B, 1, C).
``gated_residual_layer_norm(x, y, gate, shift, scale, eps)``
    ``x_new = x + Unsqueeze(gate) * y`` (Add only when gate is None), then as above;
    returns ``(x_new, h)``.
``rms_norm(x, weight, shift, scale, eps)``
    opset >= 23: ``RMSNormalization(x, weight|ones, axis=-1, epsilon=eps, stash_type=1)``.
    Below 23 a decomposition computed in fp32 whatever the model dtype:
    ``Cast(fp32) -> Mul(x, x) -> ReduceMean(-1) -> Add(eps) -> Sqrt -> Reciprocal -> Mul ->
    Cast back`` (x*x rather than Pow, and the fp32 casts keep FP16 engines from overflowing).
``attention(q, k, v, key_mask, scale) -> (out, lse)``
    opset < 23 (or ``attention="matmul"``): ``MatMul(q*sqrt(s), K^T*sqrt(s))`` (the scale
    split over q and k as torch's SDPA decomposition does, to keep FP16 scores in range)
    ``+ mask bias -> Softmax(-1) -> MatMul(., v)``; opset >= 23 (``attention="onnx"``):
    one ``Attention(q, k, v, mask, scale=s)`` node. The bool key mask (B, Nk) becomes an
    additive bias of 0 / -inf (MatMul form) or a (B, 1, Nq, Nk) bool mask (Attention form).
    A batch row whose keys are all masked gives zeros, like the kernel (not the NaN that
    softmax over -inf gives): ``Where(any key real, out, 0)``. ``lse`` (fp32 (B, H, Nq)) is
    computed as ReduceLogSumExp of the scores only if something uses it; the DiT does not,
    so the exporter's dead-code elimination removes it (the export tests check that).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional

import numpy as np
from onnxscript.onnx_types import TensorType

# Annotations the exporter reads to build each function's signature (Optional[...] rather
# than ``| None``: the exporter recognises typing.Optional).
T = TensorType
OptT = Optional[TensorType]  # noqa: UP045

ATTENTION_FORMS = ("auto", "matmul", "onnx")


def _opset_module(opset: int):
    import onnxscript

    return onnxscript.opset23 if opset >= 23 else onnxscript.opset18


def translation_table(opset: int, attention: str = "auto") -> dict[Callable, Callable]:
    """``{torch.ops.ditperf.<op>.default: onnx_fn}`` for the dynamo exporter.

    ``attention``: ``auto`` (the opset-23 ``Attention`` node when ``opset >= 23``, else
    MatMul/Softmax/MatMul), ``matmul`` or ``onnx`` (needs opset >= 23).
    """
    import ditperf.kernels  # noqa: F401  (registers torch.ops.ditperf.*)
    import torch
    from onnxscript import ir

    if attention not in ATTENTION_FORMS:
        raise ValueError(f"attention must be one of {ATTENTION_FORMS}, got {attention!r}")
    if attention == "onnx" and opset < 23:
        raise ValueError(f"attention='onnx' (the ONNX Attention op) needs opset >= 23, got {opset}")
    op = _opset_module(opset)
    use_attention_op = attention == "onnx" or (attention == "auto" and opset >= 23)
    use_rms_op = opset >= 23

    def const(value, dtype) -> object:
        """Scalar constant of ONNX element type ``dtype`` (an ``ir.DataType``)."""
        return op.Constant(value=ir.tensor(np.array(value, dtype=dtype.numpy())))

    def i64(values) -> object:
        return op.Constant(value=ir.tensor(np.array(values, dtype=np.int64)))

    def info(x) -> tuple[int, object]:
        """Rank and element type of a graph input of the op (intermediates carry neither)."""
        if x.shape is None or x.dtype is None:
            raise ValueError("ditperf ONNX translation needs op inputs of known rank and type")
        return len(x.shape), x.dtype

    def cast(t, dtype):
        return t if t is None or t.dtype == dtype else op.Cast(t, to=dtype)

    def ones_like_last(x, dtype):
        return op.Expand(const(1.0, dtype), op.Shape(x, start=-1))

    def per_sample(v, rank: int, dtype):
        """(B, C) -> (B, 1, ..., 1, C) to broadcast over the token dims of a rank-``rank`` x."""
        return op.Unsqueeze(cast(v, dtype), i64(list(range(1, rank - 1))))

    def modulate(h, shift, scale, rank: int, dtype):
        if scale is not None:
            h = op.Mul(h, op.Add(per_sample(scale, rank, dtype), const(1.0, dtype)))
        if shift is not None:
            h = op.Add(h, per_sample(shift, rank, dtype))
        return h

    def ln(x, weight, bias, eps, dtype):
        w = cast(weight, dtype) if weight is not None else ones_like_last(x, dtype)
        inputs = [x, w] + ([cast(bias, dtype)] if bias is not None else [])
        return op.LayerNormalization(*inputs, axis=-1, epsilon=eps, stash_type=1)[0]

    def layer_norm(x: T, weight: OptT, bias: OptT, shift: OptT, scale: OptT, eps: float):
        rank, dt = info(x)
        return modulate(ln(x, weight, bias, eps, dt), shift, scale, rank, dt)

    def gated_residual_layer_norm(x: T, y: T, gate: OptT, shift: OptT, scale: OptT,
                                  eps: float):
        rank, dt = info(x)
        x_new = op.Add(x, y if gate is None else op.Mul(per_sample(gate, rank, dt), y))
        return x_new, modulate(ln(x_new, None, None, eps, dt), shift, scale, rank, dt)

    def rms_norm(x: T, weight: OptT, shift: OptT, scale: OptT, eps: float):
        rank, dt = info(x)
        if use_rms_op:
            w = cast(weight, dt) if weight is not None else ones_like_last(x, dt)
            h = op.RMSNormalization(x, w, axis=-1, epsilon=eps, stash_type=1)
        else:
            f32 = ir.DataType.FLOAT
            xf = cast(x, f32)
            ms = op.ReduceMean(op.Mul(xf, xf), i64([-1]), keepdims=1)
            h = op.Mul(xf, op.Reciprocal(op.Sqrt(op.Add(ms, const(eps, f32)))))
            h = h if dt == f32 else op.Cast(h, to=dt)
            if weight is not None:
                h = op.Mul(h, cast(weight, dt))
        return modulate(h, shift, scale, rank, dt)

    def zero_fully_masked(out, key_mask, dtype):
        """Rows of a batch element with no real key -> 0 (the kernel's semantics)."""
        f32 = ir.DataType.FLOAT
        real = op.Cast(key_mask, to=f32)
        any_real = op.Greater(op.ReduceMax(real, i64([-1]), keepdims=1), const(0.0, f32))
        any_real = op.Unsqueeze(any_real, i64([1, 2]))  # (B, 1, 1, 1)
        return op.Where(any_real, out, const(0.0, dtype))

    def attention(q: T, k: T, v: T, key_mask: OptT, scale: float):
        _, dt = info(q)
        kt = op.Transpose(k, perm=[0, 1, 3, 2])
        root = const(math.sqrt(scale), dt)
        scores = op.MatMul(op.Mul(q, root), op.Mul(kt, root))
        if key_mask is not None:
            m4 = op.Unsqueeze(key_mask, i64([1, 2]))  # (B, 1, 1, Nk)
            scores = op.Add(scores, op.Where(m4, const(0.0, dt), const(-math.inf, dt)))
        # log-sum-exp (fp32, (B, H, Nq)): dead code unless the caller uses it
        lse = op.ReduceLogSumExp(op.Cast(scores, to=ir.DataType.FLOAT), i64([-1]), keepdims=0)
        if use_attention_op:
            mask = None
            if key_mask is not None:
                rows = op.Concat(i64([1, 1]), op.Shape(q, start=2, end=3), i64([1]), axis=0)
                mask = op.Expand(op.Unsqueeze(key_mask, i64([1, 2])), rows)  # (B,1,Nq,Nk)
            out = op.Attention(q, k, v, mask, scale=float(scale))[0]
        else:
            out = op.MatMul(op.Softmax(scores, axis=-1), v)
        if key_mask is not None:
            out = zero_fully_masked(out, key_mask, dt)
        return out, lse

    fns = {"layer_norm": layer_norm, "gated_residual_layer_norm": gated_residual_layer_norm,
           "rms_norm": rms_norm, "attention": attention}
    ns = torch.ops.ditperf
    # only the ops this build registers (a model that calls a missing op fails on its own)
    return {getattr(ns, name).default: fn for name, fn in fns.items() if hasattr(ns, name)}
