"""Fused non-causal attention for DiT shapes: a FlashAttention-2-style Triton kernel pair.

Math (per batch b, head h; s = ``scale``, default ``D**-0.5``)::

    S = s * Q K^T            (Nq, Nk), masked keys -> -inf
    P = softmax(S, dim=-1)   a row whose keys are all masked -> P row = 0
    O = P V                  (Nq, D)
    lse = logsumexp(S, -1)   (Nq,) fp32, natural log; -inf for an all-masked row

Forward (one program per (BLOCK_M query rows, h, b)): the Q tile is loaded once and kept
on chip; the program streams K/V tiles and keeps a running max ``m`` and running sum ``l``
in fp32 (online softmax). The softmax scale is folded into log2(e) so every exponential is
one ``exp2``: ``p = exp2(S * s * log2(e) - m)``. Only the last, partial key block takes the
masked path: the full blocks run an unmasked loop body (the loop over keys is split into
``N // BLOCK_N`` full blocks and one tail step). The N x N matrix is never stored.

Backward (no N x N matrix in memory, no atomics: deterministic, bit-identical reruns):

1. ``_bwd_dq_kernel``, one program per query block: computes
   ``delta = rowsum(dO * O) - dlse`` (the FA2 "preprocess", fused here because this
   kernel loads dO anyway; stored for step 2), then iterates over key blocks:
   ``P = exp2(S*log2e - lse*log2e)``, ``dP = dO V^T``, ``dS = P * (dP - delta)``,
   ``dQ += dS K``; finally ``dQ *= s``.
2. ``_bwd_dkdv_kernel``, one program per key block: iterates over query blocks with the
   transposed products ``P^T``, ``dV += P^T dO``, ``dK += dS^T Q``; ``dK *= s``.
   Keys masked by ``key_mask`` get exactly zero dK/dV (their rows are zeroed at the store:
   a masked key's column only feeds its own dK/dV row, so no per-block mask is needed).

The gradient of ``lse`` is supported too (``dS += P * dlse``, folded into delta), so the
custom op is fully differentiable in both outputs.

Layouts. q: (B, H, Nq, D), k, v: (B, H, Nk, D), any strides with ``stride(-1) == 1``: all
strides go to the kernel, so ``x.view(B, N, H, D).transpose(1, 2)`` or a slice of a packed
(B, N, 3, H, D) projection are read in place, without a copy. ``out`` is returned as a
(B, H, Nq, D) view of a (B, Nq, H, D)-contiguous buffer (the layout SDPA's flash backend
also returns): ``out.transpose(1, 2).reshape(B, Nq, H * D)`` -- what the DiT block feeds to
its output projection -- is then free. ``lse`` is a contiguous (B, H, Nq) fp32 tensor.
dq/dk/dv are allocated like q/k/v (``torch.empty_like``: same strides when the input is
dense, else contiguous).

Head dim. ``tl.dot`` needs power-of-two tile sizes, so D is covered by at most two
power-of-two tiles loaded with masks (never a padded copy in memory):

* padded: one tile of ``next_power_of_2(D)`` columns. At D=72 that is 128 columns: the two
  matmuls of the forward (QK^T reduces over D, PV produces D columns) and the four of the
  backward do 128/72 = 1.78x the tensor-core work, the softmax work is unchanged.
* split (when it saves work and :data:`SPLIT_HEAD_DIM` is on: by default only under the
  interpreter, see its note on triton 3.6 / H100): D = D0 + D1 with D0 the
  largest power of two <= D and D1 = next_power_of_2(D - D0) >= 16, each matmul done as two
  ``tl.dot``s. D=72 -> 64+16 = 80 columns (1.11x instead of 1.78x), D=96 -> 64+32 (exact),
  D=40/48 -> 32+16, D=80 -> 64+16, D=88 -> 64+32. D in {32, 64, 128} is already exact.

Masks. ``key_mask`` bool (B, Nk), True = real key. Masked keys get -inf scores. A query row
whose keys are ALL masked (e.g. a batch entry with no real key) returns zeros, its lse is
-inf, and its gradients are zeros; never NaN. :func:`joint_attention_mask` builds the mask
for SD3/MMDiT/Flux-style joint attention over concatenated text and image tokens.

Precision. bf16/fp16 inputs: both matmuls on tensor cores with fp32 accumulation, P and dS
rounded to the input dtype before their matmul (as FlashAttention does), softmax statistics
in fp32. fp32 inputs (meant for tests): ``input_precision="ieee"`` dots (no TF32): exact
but slow on a GPU (CUDA-core FMAs), so on a GPU fp32 always launches one small untuned
config (64x32 tiles, 4 warps, 1 stage; the bf16 tiles spilled kilobytes of registers in fp32
and took minutes to compile), ignoring ``DITPERF_ATTN_CONFIGS`` and the autotuner.

CUDA graphs / torch.compile. Launches allocate with ``torch.empty`` and never read a value
back to the host, so a warmed-up call can be captured in a CUDA graph. Warm up first: the
first call for a new (D, length bucket, dtype, mask) key runs the autotuner, which times
configurations (syncs) and cannot run inside a capture. The op is an opaque
``torch.library.custom_op`` (``ditperf::attention``, ``ditperf::attention_bwd``) with fake
implementations, so ``torch.compile(fullgraph=True)`` keeps it as one node.

Autotuning (GPU only; one fixed 128x128 config under the interpreter): BLOCK_M/BLOCK_N in
{64, 128}, num_stages 2-4, num_warps 4/8, keyed on D, the split and mask flags, the dtype and
the sequence lengths rounded up to a power of two (odd lengths do not retune). See
:data:`AUTOTUNE`: by default a curated subset of that space is timed per kernel (each
config is a separate compilation, ~1-5 s); "full" times the whole space; "off" launches the
first curated config that fits (tests). Configs whose estimated shared memory or register
footprint does not fit an H100 are pruned before compiling. Where Triton supports it
(``cache_results``), tuning results persist on disk across processes.

Note: ``ditperf.kernels.attention`` is the *function* (the package re-exports it); reach
this module with ``importlib.import_module("ditperf.kernels.attention")``.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import triton
import triton.language as tl
from ditperf.kernels._common import (
    FLOAT_DTYPES,
    INTERPRET,
    align_hint,
    autotune,
    check_tensor,
    device_guard,
    dot,
    eager_fast_path,
    next_power_of_2,
    require_kernel_device,
)

__all__ = ["AUTOTUNE", "SPLIT_HEAD_DIM", "attention", "attention_ref", "autotune_report",
           "head_dim_tiles", "joint_attention_mask"]

_LOG2E = 1.4426950408889634

#: Cover a non-power-of-two head dim with two power-of-two tiles when that saves matmul
#: work (D=72 -> 64+16). Read at each launch; ``DITPERF_ATTN_SPLIT_D=0`` (or setting this
#: to False) forces one padded tile (D=72 -> 128), e.g. to measure the difference.
def _split_default() -> bool:
    """``DITPERF_ATTN_SPLIT_D``: "1" split, "0" padded, "auto" (default): split only under the
    interpreter. Compiled on an H100 with triton 3.6 the split kernels (a 16-column second
    tile in every tl.dot) faulted with illegal memory accesses or gave run-to-run different
    results in 17 of 17 configurations, stages 1-4, while the padded kernels passed 40
    repeated launches of every shape (bench/diag_attention.py, 2026-11-27): a Triton sm_90
    code-generation problem of small dot tiles (cf. triton-lang/triton #11366, #10486)."""
    value = os.environ.get("DITPERF_ATTN_SPLIT_D", "auto").strip().lower()
    if value in ("1", "0"):
        return value == "1"
    return INTERPRET


@functools.cache
def split_known_bad() -> str:
    """Why the split path must not run here ("" when not known to be broken): compiled (not
    interpreted) with Triton >= 3.6 on an sm_90 (Hopper) GPU, where it was measured to fault.
    Evaluated on first use (it queries the GPU; importing ditperf must not initialize CUDA)."""
    if INTERPRET or not torch.cuda.is_available():
        return ""
    try:
        major, minor = (int(v) for v in triton.__version__.split(".")[:2])
        cc = torch.cuda.get_device_capability()
    except (ValueError, RuntimeError):
        return ""
    if (major, minor) >= (3, 6) and cc == (9, 0):
        return (f"triton {triton.__version__} on sm_90 miscompiles the 16-column head-dim tiles "
                "(illegal memory accesses / nondeterministic results, bench/results/"
                "2026-11-27-h100-6753518)")
    return ""


SPLIT_HEAD_DIM: bool = _split_default()

#: Narrowest second head-dim tile of the split path (16, the tl.dot minimum, or 32: D=72 ->
#: 64+32 = 96 columns instead of 64+16 = 80). The 16-column tiles are the ones that faulted on
#: triton 3.6 / sm_90; ``DITPERF_ATTN_SPLIT_MIN=32`` lets bench/diag_attention.py test whether
#: 32-column ones are safe there (still 1.33x less matmul work than the padded 128 at D=72).
SPLIT_MIN: int = int(os.environ.get("DITPERF_ATTN_SPLIT_MIN", "16"))
if SPLIT_MIN not in (16, 32, 64):
    raise ValueError(f"DITPERF_ATTN_SPLIT_MIN must be 16, 32 or 64, got {SPLIT_MIN}")

#: GPU autotuning: "curated" (default: a few Hopper configs per kernel, timed once per
#: tuning key), "full" (BLOCK_M/N in {64, 128} x num_stages 2-4 x num_warps 4/8, pruned by
#: shared memory and registers), or "off" (no timing: the first curated config that fits;
#: compile time only, for tests). Read at each launch; env ``DITPERF_ATTN_AUTOTUNE``.
AUTOTUNE: str = os.environ.get("DITPERF_ATTN_AUTOTUNE", "curated")

_MIN_D, _MAX_D = 8, 128
_MAX_GRID_YZ = 65535  # CUDA's limit on grid dimensions y and z (heads, batch)
# Lengths and D are runtime values that are not specialized on (divisibility by 16, == 1):
# one compilation per config serves every sequence length (and every D that maps to the
# same head-dim tiles), which keeps GPU compile and autotuning time down.
_NO_SPECIALIZE = ["H", "N_Q", "N_K", "NQ_BUCKET", "NK_BUCKET", "HEAD_DIM"]


# ----------------------------------------------------------------------------------------
# Triton device helpers
# ----------------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, acc, INTERPRET: tl.constexpr, IEEE: tl.constexpr):
    """``acc + a @ b``: tensor cores for bf16/fp16, exact fp32 (no TF32) when IEEE."""
    if IEEE:
        if INTERPRET:
            return tl.dot(a, b, acc)  # the interpreter's fp32 dot is exact already
        return tl.dot(a, b, acc, input_precision="ieee")
    return dot(a, b, acc, INTERPRET)


@triton.jit
def _to_i64(a, b, c):
    # tl.cast, not .to(): Triton passes an integer argument equal to 1 as a constexpr
    return tl.cast(a, tl.int64), tl.cast(b, tl.int64), tl.cast(c, tl.int64)


@triton.jit
def _load_tile(base, offs_r, stride_r, offs_c, r_lim, c_lim,
               MASK_R: tl.constexpr, MASK_C: tl.constexpr, INTERPRET: tl.constexpr,
               ALIGN: tl.constexpr):
    """Load rows ``offs_r`` x columns ``offs_c`` (column stride 1); masked only where asked,
    out-of-range elements read as 0. Upcast under the interpreter (bf16 is raw bits there).
    ``stride_r`` comes in units of ALIGN elements and ``c_lim`` is a multiple of ALIGN (see
    ``_common.align_hint``): written so that Triton's alignment analysis sees it and loads
    16-byte vectors (D = 72: a stride of 72 is not a multiple of 16, the only divisibility
    Triton specializes integer arguments on)."""
    # No helper calls and no unused ops here: each costs time under the interpreter (ALIGN = 1).
    ptrs = base + offs_r[:, None] * (stride_r * ALIGN) + offs_c[None, :]
    if MASK_C:
        if ALIGN > 1:
            cmask = (offs_c[None, :] // ALIGN) < (c_lim // ALIGN)
        else:
            cmask = offs_c[None, :] < c_lim
    if MASK_R:
        if MASK_C:
            x = tl.load(ptrs, mask=(offs_r[:, None] < r_lim) & cmask, other=0.0)
        else:
            x = tl.load(ptrs, mask=offs_r[:, None] < r_lim, other=0.0)
    else:
        if MASK_C:
            x = tl.load(ptrs, mask=cmask, other=0.0)
        else:
            x = tl.load(ptrs)
    if INTERPRET:
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_tile(base, x, offs_r, stride_r, offs_c, r_lim, c_lim, MASK_C: tl.constexpr,
                ALIGN: tl.constexpr):
    """Store rows < r_lim (always masked: once per program) and, if asked, columns < c_lim
    (alignment as in _load_tile)."""
    ptrs = base + offs_r[:, None] * (stride_r * ALIGN) + offs_c[None, :]
    x = x.to(base.dtype.element_ty)
    if MASK_C:
        if ALIGN > 1:
            cmask = (offs_c[None, :] // ALIGN) < (c_lim // ALIGN)
        else:
            cmask = offs_c[None, :] < c_lim
        tl.store(ptrs, x, mask=(offs_r[:, None] < r_lim) & cmask)
    else:
        tl.store(ptrs, x, mask=offs_r[:, None] < r_lim)


@triton.jit
def _load_vec(base, offs, stride, lim, other, MASK: tl.constexpr):
    if MASK:
        return tl.load(base + offs * stride, mask=offs < lim, other=other)
    return tl.load(base + offs * stride)


# ----------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------


@triton.jit
def _fwd_block(acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, km_base, start_n,
               stride_kn, stride_vn, stride_mn, N_K, qk_scale,
               HEAD_DIM, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, SPLIT: tl.constexpr,
               MASK_D0: tl.constexpr, MASK_D1: tl.constexpr, MASK_N: tl.constexpr,
               HAS_MASK: tl.constexpr, INTERPRET: tl.constexpr, IEEE: tl.constexpr,
               ALIGN: tl.constexpr):
    """One key block of the online softmax. ``acc1``/``q1`` are the second head-dim tile
    (ignored, passed through, when not SPLIT)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D0)
    k0 = _load_tile(k_base, offs_n, stride_kn, offs_d0, N_K, HEAD_DIM, MASK_N, MASK_D0, INTERPRET, ALIGN)
    qk = _mma(q0, tl.trans(k0), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), INTERPRET, IEEE)
    if SPLIT:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        k1 = _load_tile(k_base, offs_n, stride_kn, offs_d1, N_K, HEAD_DIM, MASK_N, MASK_D1,
                        INTERPRET, ALIGN)
        qk = _mma(q1, tl.trans(k1), qk, INTERPRET, IEEE)
    if MASK_N:
        qk = tl.where(offs_n[None, :] < N_K, qk, float("-inf"))
    if HAS_MASK:
        km = _load_vec(km_base, offs_n, stride_mn, N_K, 0, MASK_N)
        qk = tl.where(km[None, :] != 0, qk, float("-inf"))
    # log2 units: exp2(qk * qk_scale - m) == exp(scale * q.k - m'); qk_scale > 0, so the row
    # max is taken on the raw scores and the scaling fuses into one FMA per element.
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    if HAS_MASK:
        # A row with no real key so far keeps m = -inf; subtract 0 instead (no inf - inf).
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    p_lo = p.to(k_base.dtype.element_ty)
    v0 = _load_tile(v_base, offs_n, stride_vn, offs_d0, N_K, HEAD_DIM, MASK_N, MASK_D0, INTERPRET, ALIGN)
    acc0 = _mma(p_lo, v0, acc0 * alpha[:, None], INTERPRET, IEEE)
    if SPLIT:
        v1 = _load_tile(v_base, offs_n, stride_vn, offs_d1, N_K, HEAD_DIM, MASK_N, MASK_D1,
                        INTERPRET, ALIGN)
        acc1 = _mma(p_lo, v1, acc1 * alpha[:, None], INTERPRET, IEEE)
    return acc0, acc1, l_i, m_new


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _fwd_kernel_body(
    Q, K, V, KM, Out, Lse,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_mb, stride_mn, stride_ob, stride_oh, stride_on,
    H, N_Q, N_K, qk_scale, NQ_BUCKET, NK_BUCKET,
    HEAD_DIM, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, SPLIT: tl.constexpr,
    MASK_D0: tl.constexpr, MASK_D1: tl.constexpr, HAS_MASK: tl.constexpr,
    INTERPRET: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ALIGN: tl.constexpr, ROW64: tl.constexpr,
):
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    if ROW64:  # offsets reach 2**31 elements (see _needs_row64): 64-bit index math
        stride_qb, stride_qh, stride_qn = _to_i64(stride_qb, stride_qh, stride_qn)
        stride_kb, stride_kh, stride_kn = _to_i64(stride_kb, stride_kh, stride_kn)
        stride_vb, stride_vh, stride_vn = _to_i64(stride_vb, stride_vh, stride_vn)
        stride_ob, stride_oh, stride_on = _to_i64(stride_ob, stride_oh, stride_on)
    q_base = Q + off_b * (stride_qb * ALIGN) + off_h * (stride_qh * ALIGN)
    k_base = K + off_b * (stride_kb * ALIGN) + off_h * (stride_kh * ALIGN)
    v_base = V + off_b * (stride_vb * ALIGN) + off_h * (stride_vh * ALIGN)
    o_base = Out + off_b * (stride_ob * ALIGN) + off_h * (stride_oh * ALIGN)
    km_base = KM + off_b * stride_mb

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, BLOCK_D0)
    q0 = _load_tile(q_base, offs_m, stride_qn, offs_d0, N_Q, HEAD_DIM, True, MASK_D0, INTERPRET, ALIGN)
    acc0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    if SPLIT:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        q1 = _load_tile(q_base, offs_m, stride_qn, offs_d1, N_Q, HEAD_DIM, True, MASK_D1, INTERPRET, ALIGN)
        acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    else:
        q1 = q0
        acc1 = acc0
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    n_full = (N_K // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc0, acc1, l_i, m_i = _fwd_block(
            acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, km_base, start_n,
            stride_kn, stride_vn, stride_mn, N_K, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N,
            BLOCK_D0, BLOCK_D1, SPLIT, MASK_D0, MASK_D1, False, HAS_MASK, INTERPRET, IEEE, ALIGN)
    if n_full < N_K:
        acc0, acc1, l_i, m_i = _fwd_block(
            acc0, acc1, l_i, m_i, q0, q1, k_base, v_base, km_base, n_full,
            stride_kn, stride_vn, stride_mn, N_K, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N,
            BLOCK_D0, BLOCK_D1, SPLIT, MASK_D0, MASK_D1, True, HAS_MASK, INTERPRET, IEEE, ALIGN)

    if HAS_MASK:
        l_div = tl.where(l_i == 0.0, 1.0, l_i)  # all keys masked: acc is 0, output 0
    else:
        l_div = l_i
    inv_l = 1.0 / l_div
    _store_tile(o_base, acc0 * inv_l[:, None], offs_m, stride_on, offs_d0, N_Q, HEAD_DIM, MASK_D0, ALIGN)
    if SPLIT:
        _store_tile(o_base, acc1 * inv_l[:, None], offs_m, stride_on, offs_d1, N_Q, HEAD_DIM,
                    MASK_D1, ALIGN)
    # natural-log LSE; m is in log2 units. All keys masked: lse = -inf.
    lse = (m_i + tl.math.log2(l_div)) * 0.6931471805599453
    if HAS_MASK:
        lse = tl.where(l_i == 0.0, float("-inf"), lse)
    lse_base = Lse + (off_b * H + off_h) * N_Q
    tl.store(lse_base + offs_m, lse, mask=offs_m < N_Q)


# ----------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------


@triton.jit
def _lse_log2(lse):
    """lse in log2 units; an all-masked row (lse = -inf) becomes +inf so that P = 0."""
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def _dq_block(dq0, dq1, q0, q1, do0, do1, lse2, delta, k_base, v_base, km_base, start_n,
              stride_kn, stride_vn, stride_mn, N_K, qk_scale,
              HEAD_DIM, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, SPLIT: tl.constexpr,
              MASK_D0: tl.constexpr, MASK_D1: tl.constexpr, MASK_N: tl.constexpr,
              HAS_MASK: tl.constexpr, INTERPRET: tl.constexpr, IEEE: tl.constexpr,
               ALIGN: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D0)
    k0 = _load_tile(k_base, offs_n, stride_kn, offs_d0, N_K, HEAD_DIM, MASK_N, MASK_D0, INTERPRET, ALIGN)
    v0 = _load_tile(v_base, offs_n, stride_vn, offs_d0, N_K, HEAD_DIM, MASK_N, MASK_D0, INTERPRET, ALIGN)
    zeros = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    qk = _mma(q0, tl.trans(k0), zeros, INTERPRET, IEEE)
    dp = _mma(do0, tl.trans(v0), zeros, INTERPRET, IEEE)
    if SPLIT:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        k1 = _load_tile(k_base, offs_n, stride_kn, offs_d1, N_K, HEAD_DIM, MASK_N, MASK_D1,
                        INTERPRET, ALIGN)
        v1 = _load_tile(v_base, offs_n, stride_vn, offs_d1, N_K, HEAD_DIM, MASK_N, MASK_D1,
                        INTERPRET, ALIGN)
        qk = _mma(q1, tl.trans(k1), qk, INTERPRET, IEEE)
        dp = _mma(do1, tl.trans(v1), dp, INTERPRET, IEEE)
    p = tl.math.exp2(qk * qk_scale - lse2[:, None])
    if MASK_N:
        p = tl.where(offs_n[None, :] < N_K, p, 0.0)
    if HAS_MASK:
        km = _load_vec(km_base, offs_n, stride_mn, N_K, 0, MASK_N)
        p = tl.where(km[None, :] != 0, p, 0.0)
    ds = (p * (dp - delta[:, None])).to(k_base.dtype.element_ty)
    dq0 = _mma(ds, k0, dq0, INTERPRET, IEEE)
    if SPLIT:
        dq1 = _mma(ds, k1, dq1, INTERPRET, IEEE)
    return dq0, dq1


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _bwd_dq_kernel_body(
    Q, K, V, KM, Out, DO, DQ, Lse, GLse, Delta,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_mb, stride_mn,
    stride_ob, stride_oh, stride_on, stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    H, N_Q, N_K, qk_scale, sm_scale, NQ_BUCKET, NK_BUCKET,
    HEAD_DIM, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, SPLIT: tl.constexpr,
    MASK_D0: tl.constexpr, MASK_D1: tl.constexpr, HAS_MASK: tl.constexpr, HAS_GLSE: tl.constexpr,
    INTERPRET: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ALIGN: tl.constexpr, ROW64: tl.constexpr,
):
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    if ROW64:  # offsets reach 2**31 elements (see _needs_row64): 64-bit index math
        stride_qb, stride_qh, stride_qn = _to_i64(stride_qb, stride_qh, stride_qn)
        stride_kb, stride_kh, stride_kn = _to_i64(stride_kb, stride_kh, stride_kn)
        stride_vb, stride_vh, stride_vn = _to_i64(stride_vb, stride_vh, stride_vn)
        stride_ob, stride_oh, stride_on = _to_i64(stride_ob, stride_oh, stride_on)
        stride_dob, stride_doh, stride_don = _to_i64(stride_dob, stride_doh, stride_don)
        stride_dqb, stride_dqh, stride_dqn = _to_i64(stride_dqb, stride_dqh, stride_dqn)
    q_base = Q + off_b * (stride_qb * ALIGN) + off_h * (stride_qh * ALIGN)
    k_base = K + off_b * (stride_kb * ALIGN) + off_h * (stride_kh * ALIGN)
    v_base = V + off_b * (stride_vb * ALIGN) + off_h * (stride_vh * ALIGN)
    o_base = Out + off_b * (stride_ob * ALIGN) + off_h * (stride_oh * ALIGN)
    do_base = DO + off_b * (stride_dob * ALIGN) + off_h * (stride_doh * ALIGN)
    dq_base = DQ + off_b * (stride_dqb * ALIGN) + off_h * (stride_dqh * ALIGN)
    km_base = KM + off_b * stride_mb
    row_base = (off_b * H + off_h) * N_Q  # lse, dlse, delta: contiguous (B, H, Nq)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, BLOCK_D0)
    q0 = _load_tile(q_base, offs_m, stride_qn, offs_d0, N_Q, HEAD_DIM, True, MASK_D0, INTERPRET, ALIGN)
    do0 = _load_tile(do_base, offs_m, stride_don, offs_d0, N_Q, HEAD_DIM, True, MASK_D0, INTERPRET, ALIGN)
    o0 = _load_tile(o_base, offs_m, stride_on, offs_d0, N_Q, HEAD_DIM, True, MASK_D0, INTERPRET, ALIGN)
    delta = tl.sum(o0.to(tl.float32) * do0.to(tl.float32), 1)
    dq0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    if SPLIT:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        q1 = _load_tile(q_base, offs_m, stride_qn, offs_d1, N_Q, HEAD_DIM, True, MASK_D1, INTERPRET, ALIGN)
        do1 = _load_tile(do_base, offs_m, stride_don, offs_d1, N_Q, HEAD_DIM, True, MASK_D1,
                         INTERPRET, ALIGN)
        o1 = _load_tile(o_base, offs_m, stride_on, offs_d1, N_Q, HEAD_DIM, True, MASK_D1, INTERPRET, ALIGN)
        delta += tl.sum(o1.to(tl.float32) * do1.to(tl.float32), 1)
        dq1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    else:
        q1 = q0
        do1 = do0
        dq1 = dq0
    if HAS_GLSE:  # d lse / d S = P, so dS = P * (dP - delta + dlse)
        delta -= tl.load(GLse + row_base + offs_m, mask=offs_m < N_Q, other=0.0)
    tl.store(Delta + row_base + offs_m, delta, mask=offs_m < N_Q)
    lse2 = _lse_log2(tl.load(Lse + row_base + offs_m, mask=offs_m < N_Q, other=float("inf")))

    n_full = (N_K // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        dq0, dq1 = _dq_block(
            dq0, dq1, q0, q1, do0, do1, lse2, delta, k_base, v_base, km_base, start_n,
            stride_kn, stride_vn, stride_mn, N_K, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N,
            BLOCK_D0, BLOCK_D1, SPLIT, MASK_D0, MASK_D1, False, HAS_MASK, INTERPRET, IEEE, ALIGN)
    if n_full < N_K:
        dq0, dq1 = _dq_block(
            dq0, dq1, q0, q1, do0, do1, lse2, delta, k_base, v_base, km_base, n_full,
            stride_kn, stride_vn, stride_mn, N_K, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N,
            BLOCK_D0, BLOCK_D1, SPLIT, MASK_D0, MASK_D1, True, HAS_MASK, INTERPRET, IEEE, ALIGN)
    _store_tile(dq_base, dq0 * sm_scale, offs_m, stride_dqn, offs_d0, N_Q, HEAD_DIM, MASK_D0, ALIGN)
    if SPLIT:
        _store_tile(dq_base, dq1 * sm_scale, offs_m, stride_dqn, offs_d1, N_Q, HEAD_DIM, MASK_D1, ALIGN)


@triton.jit
def _dkdv_block(dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, lse_base, delta_base,
                start_m, stride_qn, stride_don, N_Q, qk_scale,
                HEAD_DIM, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, SPLIT: tl.constexpr,
                MASK_D0: tl.constexpr, MASK_D1: tl.constexpr, MASK_M: tl.constexpr,
                INTERPRET: tl.constexpr, IEEE: tl.constexpr,
               ALIGN: tl.constexpr):
    """One query block for a fixed key block, in transposed form (rows = keys). Query rows
    past N_Q read q = dO = 0, lse = +inf, delta = 0: they contribute exactly 0."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, BLOCK_D0)
    q0 = _load_tile(q_base, offs_m, stride_qn, offs_d0, N_Q, HEAD_DIM, MASK_M, MASK_D0, INTERPRET, ALIGN)
    do0 = _load_tile(do_base, offs_m, stride_don, offs_d0, N_Q, HEAD_DIM, MASK_M, MASK_D0,
                     INTERPRET, ALIGN)
    zeros = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    qk_t = _mma(k0, tl.trans(q0), zeros, INTERPRET, IEEE)
    dp_t = _mma(v0, tl.trans(do0), zeros, INTERPRET, IEEE)
    if SPLIT:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        q1 = _load_tile(q_base, offs_m, stride_qn, offs_d1, N_Q, HEAD_DIM, MASK_M, MASK_D1,
                        INTERPRET, ALIGN)
        do1 = _load_tile(do_base, offs_m, stride_don, offs_d1, N_Q, HEAD_DIM, MASK_M, MASK_D1,
                         INTERPRET, ALIGN)
        qk_t = _mma(k1, tl.trans(q1), qk_t, INTERPRET, IEEE)
        dp_t = _mma(v1, tl.trans(do1), dp_t, INTERPRET, IEEE)
    lse2 = _lse_log2(_load_vec(lse_base, offs_m, 1, N_Q, float("inf"), MASK_M))
    delta = _load_vec(delta_base, offs_m, 1, N_Q, 0.0, MASK_M)
    p_t = tl.math.exp2(qk_t * qk_scale - lse2[None, :])
    p_lo = p_t.to(q_base.dtype.element_ty)
    ds_t = (p_t * (dp_t - delta[None, :])).to(q_base.dtype.element_ty)
    dv0 = _mma(p_lo, do0, dv0, INTERPRET, IEEE)
    dk0 = _mma(ds_t, q0, dk0, INTERPRET, IEEE)
    if SPLIT:
        dv1 = _mma(p_lo, do1, dv1, INTERPRET, IEEE)
        dk1 = _mma(ds_t, q1, dk1, INTERPRET, IEEE)
    return dk0, dk1, dv0, dv1


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _bwd_dkdv_kernel_body(
    Q, K, V, KM, DO, DK, DV, Lse, Delta,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_mb, stride_mn, stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    H, N_Q, N_K, qk_scale, sm_scale, NQ_BUCKET, NK_BUCKET,
    HEAD_DIM, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, SPLIT: tl.constexpr,
    MASK_D0: tl.constexpr, MASK_D1: tl.constexpr, HAS_MASK: tl.constexpr,
    INTERPRET: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ALIGN: tl.constexpr, ROW64: tl.constexpr,
):
    pid_n = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    if ROW64:  # offsets reach 2**31 elements (see _needs_row64): 64-bit index math
        stride_qb, stride_qh, stride_qn = _to_i64(stride_qb, stride_qh, stride_qn)
        stride_kb, stride_kh, stride_kn = _to_i64(stride_kb, stride_kh, stride_kn)
        stride_vb, stride_vh, stride_vn = _to_i64(stride_vb, stride_vh, stride_vn)
        stride_dob, stride_doh, stride_don = _to_i64(stride_dob, stride_doh, stride_don)
        stride_dkb, stride_dkh, stride_dkn = _to_i64(stride_dkb, stride_dkh, stride_dkn)
        stride_dvb, stride_dvh, stride_dvn = _to_i64(stride_dvb, stride_dvh, stride_dvn)
    q_base = Q + off_b * (stride_qb * ALIGN) + off_h * (stride_qh * ALIGN)
    k_base = K + off_b * (stride_kb * ALIGN) + off_h * (stride_kh * ALIGN)
    v_base = V + off_b * (stride_vb * ALIGN) + off_h * (stride_vh * ALIGN)
    do_base = DO + off_b * (stride_dob * ALIGN) + off_h * (stride_doh * ALIGN)
    dk_base = DK + off_b * (stride_dkb * ALIGN) + off_h * (stride_dkh * ALIGN)
    dv_base = DV + off_b * (stride_dvb * ALIGN) + off_h * (stride_dvh * ALIGN)
    row_base = (off_b * H + off_h) * N_Q

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D0)
    k0 = _load_tile(k_base, offs_n, stride_kn, offs_d0, N_K, HEAD_DIM, True, MASK_D0, INTERPRET, ALIGN)
    v0 = _load_tile(v_base, offs_n, stride_vn, offs_d0, N_K, HEAD_DIM, True, MASK_D0, INTERPRET, ALIGN)
    dk0 = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
    if SPLIT:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        k1 = _load_tile(k_base, offs_n, stride_kn, offs_d1, N_K, HEAD_DIM, True, MASK_D1, INTERPRET, ALIGN)
        v1 = _load_tile(v_base, offs_n, stride_vn, offs_d1, N_K, HEAD_DIM, True, MASK_D1, INTERPRET, ALIGN)
        dk1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
    else:
        k1 = k0
        v1 = v0
        dk1 = dk0
        dv1 = dv0

    m_full = (N_Q // BLOCK_M) * BLOCK_M
    for start_m in range(0, m_full, BLOCK_M):
        dk0, dk1, dv0, dv1 = _dkdv_block(
            dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, Lse + row_base, Delta + row_base,
            start_m, stride_qn, stride_don, N_Q, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N,
            BLOCK_D0, BLOCK_D1, SPLIT, MASK_D0, MASK_D1, False, INTERPRET, IEEE, ALIGN)
    if m_full < N_Q:
        dk0, dk1, dv0, dv1 = _dkdv_block(
            dk0, dk1, dv0, dv1, k0, k1, v0, v1, q_base, do_base, Lse + row_base, Delta + row_base,
            m_full, stride_qn, stride_don, N_Q, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N,
            BLOCK_D0, BLOCK_D1, SPLIT, MASK_D0, MASK_D1, True, INTERPRET, IEEE, ALIGN)

    dk0 = dk0 * sm_scale
    dk1 = dk1 * sm_scale
    if HAS_MASK:  # masked keys: exactly zero gradient (their P column was never masked)
        real = tl.load(KM + off_b * stride_mb + offs_n * stride_mn, mask=offs_n < N_K, other=0) != 0
        dk0 = tl.where(real[:, None], dk0, 0.0)
        dv0 = tl.where(real[:, None], dv0, 0.0)
        dk1 = tl.where(real[:, None], dk1, 0.0)
        dv1 = tl.where(real[:, None], dv1, 0.0)
    _store_tile(dk_base, dk0, offs_n, stride_dkn, offs_d0, N_K, HEAD_DIM, MASK_D0, ALIGN)
    _store_tile(dv_base, dv0, offs_n, stride_dvn, offs_d0, N_K, HEAD_DIM, MASK_D0, ALIGN)
    if SPLIT:
        _store_tile(dk_base, dk1, offs_n, stride_dkn, offs_d1, N_K, HEAD_DIM, MASK_D1, ALIGN)
        _store_tile(dv_base, dv1, offs_n, stride_dvn, offs_d1, N_K, HEAD_DIM, MASK_D1, ALIGN)


# ----------------------------------------------------------------------------------------
# Autotuning
# ----------------------------------------------------------------------------------------

_AUTOTUNE_KEY = ["HEAD_DIM", "SPLIT", "BLOCK_D1", "HAS_MASK", "NQ_BUCKET", "NK_BUCKET"]  # + dtypes (automatic)

# Curated Hopper subsets (BLOCK_M, BLOCK_N, num_stages, num_warps) of the full space, checked
# with ``bench/attention.py --compile-check`` (sm_90, triton 3.3: all use HGMMA, no spills
# beyond a few bytes at the 255-register cap). fwd: a large Q block (K/V reuse), 8 warps for
# 128x128 tiles (O acc + S in registers). dq: iterates over keys, a large query block holds
# dQ. dkdv: iterates over queries with a key block holding dK and dV (two accumulators);
# BLOCK_M = 64 there (BLOCK_M = 128 spilled 30-80 bytes at every D).
_CURATED: dict[str, list[tuple[int, int, int, int]]] = {
    "fwd": [(128, 128, 3, 8), (128, 128, 1, 8)],
    "dq": [(128, 64, 3, 8), (128, 64, 1, 8)],
    "dkdv": [(64, 128, 3, 8), (64, 128, 1, 8)],
}
#: The wider list this started from (still compiled by ``bench/attention.py --compile-check``
#: and available through DITPERF_ATTN_CONFIGS): on the H100 / triton 3.6 only the configs
#: above were verified by bench/diag_attention.py (padded head dim, 40 repeated launches per
#: shape, bit-identical results); the rest faulted there in the split head-dim path and were
#: not re-tested padded, so they are not tuned over by default.
_CURATED_WIDE: dict[str, list[tuple[int, int, int, int]]] = {
    "fwd": [(128, 128, 3, 8), (128, 128, 2, 8), (128, 64, 3, 8), (128, 64, 3, 4), (64, 64, 4, 4)],
    "dq": [(128, 64, 3, 8), (128, 128, 2, 8), (64, 64, 3, 4), (64, 128, 3, 4)],
    "dkdv": [(64, 128, 3, 8), (64, 128, 2, 8), (64, 64, 3, 4), (64, 64, 4, 4)],
}
_INTERPRET_CONFIG = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=4, num_stages=1)
_MAX_BLOCK = 128  # the largest BLOCK_M / BLOCK_N any config uses (rows a tail tile may address)
# fp32 inputs on a GPU (IEEE dots on CUDA cores, meant for tests): one small config for every
# kind, never tuned and not subject to DITPERF_ATTN_CONFIGS. Every fp32 tile spills with the
# head dim padded to 128 (the FMA dot keeps whole operand rows per thread); ptxas -v for sm_90
# with triton 3.6 (fwd / dq / dkdv, D=72 with key mask): 64x32 tiles, 4 warps: 11 / 16 / 21 s to
# compile, 6 / 42 / 59 KB of spill stores; 32x32 tiles, 8 warps: 3 / 4 / 5 s, 1.4 / 2.4 / 2.6 KB.
_FP32_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=8, num_stages=1)
_SMEM_LIMIT = 232448  # H100/H200: 227 KB of shared memory per block
_ACC_REGS_LIMIT = 192  # fp32 tile registers per thread above which ptxas spilled (sm_90)


def _env_configs(kind: str) -> list[tuple[int, int, int, int]] | None:
    """Configs for ``kind`` from ``DITPERF_ATTN_CONFIGS`` (read at first launch of a kind), e.g.
    ``fwd=128x64x3x8,64x64x4x4;dq=64x64x3x4;dkdv=64x64x3x4`` (BLOCK_M x BLOCK_N x stages x
    warps): restricts autotuning to configs measured to work on a machine (bench/diag_attention.py
    writes it), or pins one config. Kinds not named keep their curated list."""
    spec = os.environ.get("DITPERF_ATTN_CONFIGS", "").strip()
    if not spec:
        return None
    for part in spec.split(";"):
        name, _, items = part.partition("=")
        if name.strip() != kind:
            continue
        try:
            configs = [tuple(int(v) for v in item.lower().split("x")) for item in items.split(",") if item.strip()]
        except ValueError:
            configs = []
        if not configs or any(len(c) != 4 for c in configs):
            raise ValueError(f"DITPERF_ATTN_CONFIGS: cannot read {part!r}; expected e.g. "
                             "'fwd=128x64x3x8,64x64x4x4' (BLOCK_M x BLOCK_N x num_stages x num_warps)")
        return configs  # type: ignore[return-value]
    return None


def _configs(kind: str, mode: str) -> list[triton.Config]:
    space = _env_configs(kind)
    if space is None:
        if mode == "full":
            space = list(itertools.product((64, 128), (64, 128), (2, 3, 4), (4, 8)))
        else:
            space = _CURATED[kind]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=s, num_warps=w)
            for bm, bn, s, w in space]


def _footprint(kind: str, cfg: triton.Config, d_cols: int, elem: int) -> tuple[int, float]:
    """(shared-memory bytes, fp32 tile registers per thread) of a config.

    Calibrated on sm_90 compiles (triton 3.3, bf16): smem is the resident tiles once plus
    the streamed tiles ``num_stages`` deep (exact there); ptxas spilled exactly when the
    register count below exceeded 192 (fwd: O acc + S + P/2; dq: dQ + S + dP; dkdv:
    dK + dV + S^T + dP^T).
    """
    bm, bn, s = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_stages
    threads = 32 * cfg.num_warps
    if kind == "fwd":  # resident Q; streamed K, V
        return elem * (bm * d_cols + s * 2 * bn * d_cols), (bm * d_cols + 1.5 * bm * bn) / threads
    if kind == "dq":  # resident Q, dO; streamed K, V
        return elem * (2 * bm * d_cols + s * 2 * bn * d_cols), (bm * d_cols + 2 * bm * bn) / threads
    # dkdv: resident K, V; streamed Q, dO and the lse/delta vectors
    smem = elem * (2 * bn * d_cols + s * 2 * bm * d_cols) + s * 2 * bm * 4
    return smem, (2 * bn * d_cols + 2 * bm * bn) / threads


def _prune(kind: str):
    def prune(configs: list[triton.Config], named_args: dict[str, Any],
              **kwargs: Any) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        if args.get("IEEE") or args["Q"].element_size() == 4:  # fp32: one small config
            return [_FP32_CONFIG]
        d_cols = args["BLOCK_D0"] + (args["BLOCK_D1"] if args["SPLIT"] else 0)
        elem = args["Q"].element_size()
        sizes = {c: _footprint(kind, c, d_cols, elem) for c in configs}
        kept = [c for c in configs if sizes[c][0] <= _SMEM_LIMIT and sizes[c][1] <= _ACC_REGS_LIMIT]
        if not kept:  # never prune everything: keep the smallest footprint
            kept = [min(configs, key=lambda c: sizes[c])]
        return kept
    return prune


#: kind -> un-tuned ``@triton.jit`` kernel (also used by ``bench/attention.py --compile-check``)
KERNEL_BODIES: dict[str, Any] = {"fwd": _fwd_kernel_body, "dq": _bwd_dq_kernel_body,
                                 "dkdv": _bwd_dkdv_kernel_body}


# Persist autotuning results on disk where this Triton supports it (3.4+): a second process
# (e.g. the model benchmark after the attention one) reuses them instead of re-timing.
_AUTOTUNE_EXTRA: dict[str, Any] = (
    {"cache_results": True}
    if "cache_results" in inspect.signature(triton.autotune).parameters else {})
_KERNELS: dict[tuple[str, str], Any] = {}


def _kernel(kind: str, mode: str) -> Any:
    """The autotuned kernel, built on first use: ``triton.autotune`` needs a GPU driver when
    it is applied (triton 3.3), so importing this module must not apply it."""
    if (kind, mode) not in _KERNELS:
        _KERNELS[kind, mode] = autotune(
            _configs(kind, mode), key=_AUTOTUNE_KEY, interpret_config=_INTERPRET_CONFIG,
            prune_configs_by={"early_config_prune": _prune(kind)}, **_AUTOTUNE_EXTRA,
        )(KERNEL_BODIES[kind])
    return _KERNELS[kind, mode]


def _launch(kind: str, grid: Any, args: tuple[Any, ...], meta: dict[str, Any]) -> None:
    """Launch one kernel kind under the current :data:`AUTOTUNE` mode."""
    if INTERPRET:  # one fixed config (triton.heuristics), no timing
        _kernel(kind, "curated")[grid](*args, **meta)
        return
    mode = AUTOTUNE
    if mode not in ("curated", "full", "off"):
        raise ValueError(f"ditperf attention: AUTOTUNE / DITPERF_ATTN_AUTOTUNE must be 'curated', "
                         f"'full' or 'off', got {mode!r}")
    if mode == "off" or meta.get("IEEE"):  # fp32: the one fp32 config, no timing (see _prune)
        _launch_untuned(kind, grid, args, meta)
        return
    _kernel(kind, mode)[grid](*args, **meta)


_UNTUNED: dict[tuple[Any, ...], triton.Config] = {}


def _launch_untuned(kind: str, grid: Any, args: tuple[Any, ...], meta: dict[str, Any]) -> None:
    """The first curated config that passes the prune and compiles within the device's
    resources (the smem estimate is calibrated on triton 3.3; a newer Triton may need a
    little more): remembered per kernel kind, head-dim tiles, flags and dtype. fp32 inputs
    get :data:`_FP32_CONFIG` (the prune returns only that)."""
    body = KERNEL_BODIES[kind]
    key = (kind, args[0].dtype, *sorted((k, v) for k, v in meta.items() if k != "HEAD_DIM"))
    if key in _UNTUNED:
        cfg = _UNTUNED[key]
        body[grid](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return
    from triton.runtime.errors import OutOfResources

    candidates = _prune(kind)(_configs(kind, "curated"), dict(zip(body.arg_names, args)), **meta)
    for i, cfg in enumerate(candidates):
        try:
            body[grid](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps,
                       num_stages=cfg.num_stages)
        except OutOfResources:
            if i == len(candidates) - 1:
                raise
            continue
        _UNTUNED[key] = cfg
        return


def autotune_report() -> dict[str, dict[str, str]]:
    """The configs the autotuner picked so far, per kernel kind and tuning key (GPU only)."""
    report: dict[str, dict[str, str]] = {}
    for (kind, _), tuned in _KERNELS.items():
        cache = getattr(tuned, "cache", None)  # triton.autotune's {key: best config}
        if cache:
            report.setdefault(kind, {}).update({str(k): str(c) for k, c in cache.items()})
    return report


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------


def head_dim_tiles(d: int, split: bool | None = None) -> tuple[int, int]:
    """(BLOCK_D0, BLOCK_D1) covering head dim ``d``; BLOCK_D1 == 0 means one padded tile.

    Split into a power of two plus a smaller power of two (>= :data:`SPLIT_MIN`, 16 = the
    tl.dot minimum by default) only when that covers fewer columns than ``next_power_of_2(d)``.
    """
    split = SPLIT_HEAD_DIM if split is None else split
    padded = max(16, next_power_of_2(d))
    if split:
        d0 = 1 << (d.bit_length() - 1)
        if 16 <= d0 < d:
            d1 = max(SPLIT_MIN, next_power_of_2(d - d0))
            if d0 + d1 < padded:
                if d1 == 16 and not INTERPRET and split_known_bad():
                    warnings.warn(f"ditperf attention: split head dim requested: {split_known_bad()}",
                                  RuntimeWarning, stacklevel=2)
                return d0, d1
    return padded, 0


def _bucket(n: int) -> int:
    """Autotune key for a sequence length: next power of two (>= 64)."""
    return max(64, next_power_of_2(n))


def _head_meta(d: int) -> dict[str, Any]:
    d0, d1 = head_dim_tiles(d)
    return {"HEAD_DIM": d, "BLOCK_D0": d0, "BLOCK_D1": max(d1, 16), "SPLIT": d1 > 0,
            "MASK_D0": d < d0, "MASK_D1": d1 > 0 and d < d0 + d1}


def _align(d: int, *tensors: torch.Tensor) -> int:
    """ALIGN for a launch: 1 under the interpreter (nothing to vectorize), else
    :func:`_align_of`."""
    return 1 if INTERPRET else _align_of(d, *tensors)


def _align_of(d: int, *tensors: torch.Tensor) -> int:
    """Power of two dividing D and every batch/head/row stride of ``tensors``, at most 16
    bytes of elements (``_common.align_hint``)."""
    return align_hint(d, *(s for t in tensors for s in t.stride()[:3]), cap=16 // tensors[0].element_size())


def _mask_args(key_mask: torch.Tensor | None,
               fallback: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    if key_mask is None:
        return fallback, 0, 0
    km = key_mask.view(torch.uint8)  # same bytes as bool; loaded and compared != 0
    return km, km.stride(0), km.stride(1)


def _needs_row64(*tensors: torch.Tensor) -> bool:
    """True when an index the kernels compute (in int32 by default) can reach 2**31
    elements: a batch/head/row stride that large, or a (batch, head) slice whose rows,
    padded to the largest block, span that far (e.g. a packed qkv view at very long N).
    The kernels then do their stride arithmetic in int64 (constexpr ROW64)."""
    limit = 2**31
    for t in tensors:
        if any(s >= limit for s in t.stride()[:3]):
            return True
        if (t.shape[2] + _MAX_BLOCK) * t.stride(2) + t.shape[3] >= limit:
            return True
    return False


def _strides3(t: torch.Tensor, align: int) -> tuple[int, int, int]:
    """Batch, head and row strides in units of ``align`` elements (the kernels multiply back)."""
    return t.stride(0) // align, t.stride(1) // align, t.stride(2) // align


def _alloc_out(q: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """out: (B, H, Nq, D) view of a (B, Nq, H, D) buffer; lse: (B, H, Nq) fp32."""
    b, h, nq, _ = q.shape
    out = torch.empty((b, nq, h, v.shape[-1]), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty((b, h, nq), device=q.device, dtype=torch.float32)
    return out, lse


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, nq, d = q.shape
    nk = k.shape[2]
    out, lse = _alloc_out(q, v)
    if out.numel() == 0:
        return out, lse
    if nk == 0:  # no keys at all: every row is "fully masked"
        return out.zero_(), lse.fill_(float("-inf"))
    km, smb, smn = _mask_args(key_mask, q)

    def grid(meta: dict[str, Any]) -> tuple[int, int, int]:
        return (triton.cdiv(nq, meta["BLOCK_M"]), h, b)

    a = _align(d, q, k, v, out)
    args = (q, k, v, km, out, lse,
            *_strides3(q, a), *_strides3(k, a), *_strides3(v, a), smb, smn, *_strides3(out, a),
            h, nq, nk, scale * _LOG2E, _bucket(nq), _bucket(nk))
    with device_guard(q.device):
        _launch("fwd", grid, args, {"HAS_MASK": key_mask is not None, "INTERPRET": INTERPRET,
                                    "IEEE": q.dtype == torch.float32, **_head_meta(d),
                                    "ALIGN": a, "ROW64": _needs_row64(q, k, v, out)})
    return out, lse


def _backward(grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor,
              k: torch.Tensor,
              v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, key_mask: torch.Tensor | None,
              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, nq, d = q.shape
    nk = k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((b, h, nq), device=q.device, dtype=torch.float32)
    km, smb, smn = _mask_args(key_mask, q)
    a = _align(d, q, k, v, out, grad_out, dq, dk, dv)
    common = {"HAS_MASK": key_mask is not None, "INTERPRET": INTERPRET,
              "IEEE": q.dtype == torch.float32,
              **_head_meta(d), "ALIGN": a, "ROW64": _needs_row64(q, k, v, out, grad_out, dq, dk, dv)}
    glse = grad_lse if grad_lse is not None else lse

    def grid_q(meta: dict[str, Any]) -> tuple[int, int, int]:
        return (triton.cdiv(nq, meta["BLOCK_M"]), h, b)

    def grid_k(meta: dict[str, Any]) -> tuple[int, int, int]:
        return (triton.cdiv(nk, meta["BLOCK_N"]), h, b)

    dq_args = (q, k, v, km, out, grad_out, dq, lse, glse, delta,
               *_strides3(q, a), *_strides3(k, a), *_strides3(v, a), smb, smn, *_strides3(out, a),
               *_strides3(grad_out, a), *_strides3(dq, a),
               h, nq, nk, scale * _LOG2E, scale, _bucket(nq), _bucket(nk))
    dkdv_args = (q, k, v, km, grad_out, dk, dv, lse, delta,
                 *_strides3(q, a), *_strides3(k, a), *_strides3(v, a), smb, smn, *_strides3(grad_out, a),
                 *_strides3(dk, a), *_strides3(dv, a),
                 h, nq, nk, scale * _LOG2E, scale, _bucket(nq), _bucket(nk))
    with device_guard(q.device):
        _launch("dq", grid_q, dq_args, {"HAS_GLSE": grad_lse is not None, **common})
        _launch("dkdv", grid_k, dkdv_args, common)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                  scale: float | None, *, reference: bool = False) -> float:
    """Validate shapes/dtypes/devices; return the resolved scale. ``reference``: the torch
    reference also accepts float64."""
    dtypes = FLOAT_DTYPES + ((torch.float64,) if reference else ())
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, dtypes=dtypes, required=True)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, N, D) (SDPA layout), "
                             f"got shape {tuple(t.shape)}")
    b, h, _, d = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"q, k, v must share one dtype, got q {q.dtype} and {name} {t.dtype}")
        if t.shape[0] != b or t.shape[1] != h:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; batch and heads must match q's "
                             f"(B={b}, H={h}): expected ({b}, {h}, Nk, {d})")
        if t.shape[3] != d:
            raise ValueError(f"{name} has head dim {t.shape[3]}; expected q's head dim D={d} "
                             "(q, k and v must share D)")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"k and v must have the same number of keys, got k {tuple(k.shape)} and "
                         f"v {tuple(v.shape)}")
    if d % 8 != 0 or not _MIN_D <= d <= _MAX_D:
        pad = min(_MAX_D, max(_MIN_D, -(-d // 8) * 8))
        hint = (f"pad q, k, v with zeros to D={pad} "
                f"(torch.nn.functional.pad(x, (0, {pad - d}))), pass "
                f"scale={d}**-0.5 explicitly and slice out[..., :{d}]" if d < _MAX_D else
                "split the heads (more heads of a smaller head dim)")
        raise ValueError(f"head dim D={d} is not supported: ditperf.attention needs D a "
                         f"multiple of 8 in [{_MIN_D}, {_MAX_D}]; {hint}")
    if key_mask is not None:
        check_tensor("key_mask", key_mask, dtype=None, last_dim_contiguous=False)
        if key_mask.dtype != torch.bool:
            raise ValueError(f"key_mask has dtype {key_mask.dtype}; expected torch.bool "
                             "(True = real key)")
        check_tensor("key_mask", key_mask, shape=(b, k.shape[2]), last_dim_contiguous=False)
    if not reference and (b > _MAX_GRID_YZ or h > _MAX_GRID_YZ):  # kernel grid (blocks, H, B): y, z capped
        raise ValueError(f"batch {b} x heads {h}: each must be <= {_MAX_GRID_YZ} (CUDA grid limit); "
                         "call attention on chunks of the batch")
    tensors = [("q", q), ("k", k), ("v", v)]
    if key_mask is not None:
        tensors.append(("key_mask", key_mask))
    devices = {t.device for _, t in tensors}
    if len(devices) != 1:
        listing = ", ".join(f"{n} on {t.device}" for n, t in tensors)
        raise ValueError(f"all tensors must be on one device, got {listing}")
    if scale is None:
        return d ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float (default D**-0.5), got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float, got {scale}")
    return float(scale)


# ----------------------------------------------------------------------------------------
# Custom ops
# ----------------------------------------------------------------------------------------


def _attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check_inputs(q, k, v, key_mask, scale)
    require_kernel_device(("q", q), ("k", k), ("v", v))
    return _forward(q, k, v, key_mask, scale)


@torch.library.custom_op("ditperf::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _attention_impl(q, k, v, key_mask, scale)


@_attention_op.register_fake
def _attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_mask: torch.Tensor | None,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check_inputs(q, k, v, key_mask, scale)
    return _alloc_out(q, v)


@torch.library.custom_op("ditperf::attention_bwd", mutates_args=())
def _attention_bwd_op(grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor,
                      k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                      key_mask: torch.Tensor | None, scale: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # a direct call of the op gets the forward's checks too (autograd's own calls pass the
    # tensors the forward validated and saved; the eager fast path skips this)
    _check_inputs(q, k, v, key_mask, scale)
    require_kernel_device(("q", q), ("k", k), ("v", v), ("out", out))
    check_tensor("out", out, shape=(*q.shape[:3], v.shape[3]), dtype=q.dtype,
                 last_dim_contiguous=out.numel() > 0)
    return _attention_bwd_impl(grad_out, grad_lse, q, k, v, out, lse, key_mask, scale)


def _attention_bwd_impl(grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor,
                        k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                        key_mask: torch.Tensor | None, scale: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_tensor("grad_out", grad_out, shape=out.shape, dtype=out.dtype,
                 last_dim_contiguous=grad_out.numel() > 0)
    check_tensor("lse", lse, shape=(q.shape[0], q.shape[1], q.shape[2]), dtype=torch.float32,
                 contiguous=True)
    if grad_lse is not None:
        check_tensor("grad_lse", grad_lse, shape=lse.shape, dtype=torch.float32, contiguous=True)
    return _backward(grad_out, grad_lse, q, k, v, out, lse, key_mask, scale)


@_attention_bwd_op.register_fake
def _attention_bwd_fake(grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor,
                        k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                        key_mask: torch.Tensor | None, scale: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx: Any, inputs: tuple[Any, ...],
                   output: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k, v, key_mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_mask)
    ctx.scale = scale


def _dense_last_dim(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _autograd_backward(ctx: Any, grad_out: torch.Tensor | None, grad_lse: torch.Tensor | None,
                       bwd: Any = None) -> tuple[torch.Tensor | None, ...]:
    q, k, v, out, lse, key_mask = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grad_out is None else _dense_last_dim(grad_out)
    if grad_lse is not None:
        grad_lse = grad_lse.contiguous()
    bwd = bwd or torch.ops.ditperf.attention_bwd
    dq, dk, dv = bwd(grad_out, grad_lse, q, k, v, out, lse, key_mask, ctx.scale)
    return dq, dk, dv, None, None


_attention_op.register_autograd(_autograd_backward, setup_context=_setup_context)


class _AttentionFn(torch.autograd.Function):
    """The eager fast path (``_common.eager_fast_path``): the same launchers as the custom op,
    without the dispatcher's per-call host time."""

    @staticmethod
    def forward(ctx: Any, q, k, v, key_mask, scale):  # type: ignore[override]
        ctx.set_materialize_grads(False)  # lse's gradient stays None unless lse is used
        out, lse = _attention_impl(q, k, v, key_mask, scale)
        _setup_context(ctx, (q, k, v, key_mask, scale), (out, lse))
        return out, lse

    @staticmethod
    def backward(ctx: Any, grad_out, grad_lse):  # type: ignore[override]
        return _autograd_backward(ctx, grad_out, grad_lse, _attention_bwd_impl)


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              key_mask: torch.Tensor | None = None,
              scale: float | None = None) -> torch.Tensor:
    """``softmax(scale * q k^T + mask) v`` with the fused Triton kernels (differentiable).

    Args:
        q: (B, H, Nq, D); k, v: (B, H, Nk, D); bf16/fp16 (fp32 for tests), same dtype and
            device; any strides with a contiguous last dim. D: a multiple of 8 in [8, 128].
        key_mask: optional bool (B, Nk), True = real key. A query row with no real key
            returns zeros (and zero gradients), never NaN.
        scale: softmax scale (> 0), default ``D**-0.5``.

    Returns:
        (B, H, Nq, D), a view of a (B, Nq, H, D)-contiguous buffer (so
        ``out.transpose(1, 2).reshape(B, Nq, H * D)`` is free).
    """
    s = _check_inputs(q, k, v, key_mask, scale)
    if eager_fast_path(q, k, v, key_mask):
        return _AttentionFn.apply(q, k, v, key_mask, s)[0]
    return torch.ops.ditperf.attention(q, k, v, key_mask, s)[0]


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                  key_mask: torch.Tensor | None = None,
                  scale: float | None = None) -> torch.Tensor:
    """Explicit ``softmax(scale * q k^T + mask) v`` in the inputs' precision (upcast the
    inputs to fp32/fp64 for an accurate reference). Fully masked rows give zeros."""
    s = _check_inputs(q, k, v, key_mask, scale, reference=True)
    scores = torch.matmul(q, k.transpose(-2, -1)) * s
    if key_mask is None:
        return torch.matmul(torch.softmax(scores, dim=-1), v)
    allowed = key_mask[:, None, None, :]
    none_real = ~key_mask.any(dim=-1)[:, None, None, None]
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(none_real, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(~allowed, 0.0)
    return torch.matmul(probs, v)


def joint_attention_mask(text_lengths: torch.Tensor | Sequence[int], text_len: int, image_len: int,
                         *, text_first: bool = True,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """Key mask (B, text_len + image_len) for joint attention over concatenated tokens.

    Token order: ``[text (text_len, right-padded), image (image_len)]`` when ``text_first``
    (Flux / PixArt-style), ``[image, text]`` otherwise (SD3 / diffusers' JointAttnProcessor
    concatenates the image stream first). True = real key: text position t of sample b is
    real iff ``t < text_lengths[b]``; every image token is real. Use the same order when
    concatenating q, k and v along the sequence axis. A tensor of lengths is range-checked,
    which reads it back to the host (skipped under torch.compile); build the mask once per
    batch, outside CUDA-graph capture.
    """
    if not isinstance(text_len, int) or not isinstance(image_len,
                      int) or text_len < 0 or image_len < 0:
        raise ValueError("text_len and image_len must be ints >= 0, "
                         f"got {text_len!r}, {image_len!r}")
    if isinstance(text_lengths, torch.Tensor):
        lengths = text_lengths
        if lengths.dim() != 1 or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise ValueError(f"text_lengths must be a 1-D integer tensor (B,), got {lengths.dtype} "
                             f"of shape {tuple(lengths.shape)}")
        if device is not None:
            lengths = lengths.to(device)
        if not torch.compiler.is_compiling() and bool(((lengths < 0) | (lengths > text_len)).any()):
            raise ValueError(f"text_lengths must lie in [0, text_len={text_len}], "
                             f"got {lengths.tolist()}")
    else:
        values = list(text_lengths)
        if not all(isinstance(n, int) and 0 <= n <= text_len for n in values):
            raise ValueError(f"text_lengths must be ints in [0, text_len={text_len}], got {values}")
        lengths = torch.tensor(values, dtype=torch.int64, device=device)
    text = torch.arange(text_len, device=lengths.device)[None, :] < lengths[:, None]
    image = torch.ones((lengths.shape[0], image_len), dtype=torch.bool, device=lengths.device)
    return torch.cat([text, image] if text_first else [image, text], dim=1)
