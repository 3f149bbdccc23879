"""Fused LayerNorm / RMSNorm with adaLN modulation and the gated residual, in Triton.

A DiT block normalizes every token and then modulates it per sample. Eager PyTorch runs
that in 3+ passes over memory (norm, ``* (1 + scale)``, ``+ shift``, and ``x + gate * y``
before it); here each forward is one read of the inputs and one write of the outputs, and
each backward one read of what it needs and one write of each gradient.

Math (row r of x belongs to sample b; C features; all statistics and sums in fp32)::

    mean_r = sum_c x / C                                   (LayerNorm only)
    rstd_r = 1 / sqrt(sum_c (x - mean)^2 / C + eps)        (RMSNorm: sum_c x^2 / C)
    xhat   = (x - mean) * rstd                             (RMSNorm: x * rstd)
    h0     = xhat * weight + bias                          (weight, bias: (C,), optional)
    h      = h0 * (1 + scale[b]) + shift[b]                (scale, shift: (B, C), optional)

``gated_residual_layer_norm``: ``x_new = x + gate[b] * y`` (gate None means 1), rounded to
x's dtype and stored, then ``h = LN(x_new) * (1 + scale[b]) + shift[b]`` (no weight/bias:
the DiT adaLN norm has no affine parameters).

Backward (``dh`` the gradient of h, ``s = 1 + scale[b]``)::

    dshift[b] = sum_{r in b} dh            dscale[b] = sum_{r in b} dh * h0
    dh0 = dh * s                           dbias = sum_r dh0     dweight = sum_r dh0 * xhat
    g = dh0 * weight
    dx = rstd * (g - xhat * mean_c(g * xhat) - mean_c(g))        (RMS: no mean_c(g) term)
    gated: dxn = dx + dx_new (gradient arriving on x_new);  dx_total = dxn,
           dy = gate[b] * dxn,  dgate[b] = sum_{r in b} dxn * y

The backward recomputes mean/rstd from the row it loads anyway (the row sits in registers),
so the forward ops return only their outputs and nothing extra is stored.

Layout: the leading dims of x are rows. With shift/scale/gate, x must be (B, N, C) and the
per-sample vectors (B, C); without them any (..., C) works (QK-norm on (B, H, N, D) or
(B, N, H, D) with weight (D,)). Rows may be strided (up to three leading dims that do not
merge, e.g. a ``transpose(1, 2)`` of (B, N, H, D), or q sliced out of a fused qkv tensor) as
long as the last dim is contiguous; outputs are allocated with ``torch.empty_like(x)``.
Per-sample vectors may be row-strided views, e.g. ``mod.chunk(6, dim=1)`` of a (B, 6C) adaLN
projection, without a copy.

Dtypes: x (and y) fp32, fp16 or bf16; outputs in x's dtype. weight/bias/shift/scale/gate
either in x's dtype or fp32 (the autocast case: bf16 activations, fp32 parameters); they are
read as fp32 and their gradients come back in their own dtype.

Limits: 1 <= C <= MAX_C (16384): the whole row is held in registers (one pass over memory;
BLOCK_C = next_power_of_2(C)). eps >= 0.

Rows: all leading dims form one flat row-major index r; a strided layout is described by
up to three levels (R0, R1, R2) with per-tensor strides, and the kernels decompose r into
(i0, i1, i2) with an int32 div/mod per row (none for a single level, e.g. contiguous x).
Row groups: with shift/scale/gate, one group per sample (rows [b*N, (b+1)*N)), so each
program loads its sample's vectors once; without them, one group of ALL rows, so tiles
straddle sample/head boundaries (QK-norm of q sliced from a fused qkv tensor, (B, N, H, D)
with H*D < row stride, gets cdiv(B*N*H, ROWS) programs, not B*N groups of H rows).

Grid: forward, one program per ROWS rows of one row group; backward, a fixed number of
programs per row group (about PROGS per SM in total, autotuned), each looping over its rows
with the next tile's loads in flight (PREFETCH) and keeping the
dweight / dbias / dshift / dscale / dgate partial sums in registers, then writing one fp32
partial row per program; a torch ``.sum`` over the small (programs, C) buffer finishes them. On a GPU,
``ROWS`` and ``num_warps`` are autotuned per ``BLOCK_C`` (key: C and the feature flags); under
the interpreter one config with large row blocks (its cost is per program step).

Predicted on H100 before any run: forward 2.4-2.8 TB/s, backward 2.0-2.4 TB/s, 2.5-3.5x eager.
Measured (H100, triton 3.6, bf16, 32k tokens, C=1152; bench/results/2026-11-27-*): forward
gated residual + LN 2.0-2.8 TB/s (93% of copy in 2 s loops), LN + modulate 1.0-1.7 TB/s,
QK-RMSNorm (D=72) 1.0 TB/s after the ALIGN fix (0.6 before); backward 0.5-1.1 TB/s, 0.8-1.3x
eager (0.4-0.5 TB/s and 0.6-0.8x before the prefetch / smaller-tile rework), below target.
Eager timings of these ~0.1-0.4 ms calls carry per-call CPU time (custom-op dispatch,
autograd, Triton launch); the sweep in bench/norms.py times configs from CUDA graphs.
Registers (ptxas -v, sm_90, bf16): forward 40-96; backward 100-255 for the candidates
(prefetch adds ~25-45), no spills except in 4-warp gated tiles (not in the candidate list).
"""


# No ``from __future__ import annotations`` here: the triton 3.3 interpreter recognizes
# constexpr parameters only from a real ``tl.constexpr`` annotation (a string annotation turns
# them into runtime arrays: slower, and numpy >= 2.4 rejects them as loop bounds).
import functools
import math
import numbers
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from ditperf.kernels._common import (
    FLOAT_DTYPES,
    INTERPRET,
    align_hint,
    autotune,
    check_tensor,
    device_guard,
    eager_fast_path,
    next_power_of_2,
    num_sms,
    require_kernel_device,
)

#: Largest feature count: a row of MAX_C fp32 values is held in registers (64 KiB per row).
MAX_C = 16384

__all__ = [
    "MAX_C",
    "gated_residual_layer_norm",
    "gated_residual_layer_norm_ref",
    "layer_norm",
    "layer_norm_ref",
    "rms_norm",
    "rms_norm_ref",
]


# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _normalize_rows(x, mask, rmask, C, eps, IS_RMS: tl.constexpr):
    """(xhat, rstd) of a [ROWS, BLOCK_C] fp32 tile whose masked entries are 0.

    LayerNorm: xhat = (x - mean) * rstd, rstd = 1/sqrt(var + eps), var = mean((x - mean)^2)
    (two-pass over registers, no cancellation). RMSNorm: xhat = x * rstd, rstd =
    1/sqrt(mean(x^2) + eps). rstd is 0 on masked rows so that eps = 0 cannot make NaN there.
    """
    if IS_RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=1) / C
        xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / C
    rstd = tl.where(rmask, tl.math.rsqrt(var + eps), 0.0)
    return xc * rstd[:, None], rstd


@triton.jit
def _row_index(rows, R1, R2, LEVELS: tl.constexpr):
    """(i0, i1, i2) of flat row indices ``rows`` (int32 [ROWS]) as int64 [ROWS, 1] columns.

    The rows of x (..., C) form one row-major index space r over up to three leading levels
    of sizes (R0, R1, R2): r = (i0 * R1 + i1) * R2 + i2, so a tile of consecutive rows may
    straddle level boundaries. The div/mod run once per row (not per element), in int32.
    LEVELS (constexpr) is the number of levels in use: with 1 (contiguous rows) there is no
    division at all; unused indices are returned as i2 and must not be read (see _offs).
    """
    if LEVELS == 1:
        i2 = rows
        i1 = rows
        i0 = rows
    elif LEVELS == 2:
        i2 = rows % R2
        i1 = rows // R2
        i0 = i1
    else:
        t = rows // R2
        i2 = rows - t * R2
        i0 = t // R1
        i1 = t - i0 * R1
    return (i0.to(tl.int64)[:, None], i1.to(tl.int64)[:, None], i2.to(tl.int64)[:, None])


@triton.jit
def _offs(i0, i1, i2, s0, s1, s2, LEVELS: tl.constexpr, ALIGN: tl.constexpr):
    """Element offsets of the rows (i0, i1, i2) of one tensor whose row strides (s0, s1, s2)
    come in units of ALIGN elements (``_common.align_hint``): multiplied back by the constexpr
    ALIGN, Triton knows them to be multiples of it and loads rows as 16-byte vectors."""
    if LEVELS == 1:
        off = i2 * (s2 * ALIGN)
    elif LEVELS == 2:
        off = i1 * (s1 * ALIGN) + i2 * (s2 * ALIGN)
    else:
        off = i0 * (s0 * ALIGN) + i1 * (s1 * ALIGN) + i2 * (s2 * ALIGN)
    return off


@triton.jit
def _norm_fwd_kernel(
    X, Y, GATE, W, BIAS, SHIFT, SCALE, OUT, XNEW,
    G, R1, R2, C,
    sx0, sx1, sx2, sy0, sy1, sy2, so0, so1, so2, sn0, sn1, sn2,
    s_gate, s_shift, s_scale,
    eps,
    IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SHIFT: tl.constexpr,
    HAS_SCALE: tl.constexpr, LEVELS: tl.constexpr, ALIGN: tl.constexpr, BLOCK_C: tl.constexpr,
    ROWS: tl.constexpr,
):
    """Forward of one [ROWS, BLOCK_C] tile of rows of row group q.

    The rows form groups of G consecutive flat rows: the sample b (G = N) when modulated, so
    shift/scale/gate rows are loaded once per program; otherwise one group of all rows, so a
    tile may span level boundaries of a strided layout (see _row_index). Element offsets are
    i0*s0 + i1*s1 + i2*s2 + c for each tensor (its own strides).
      HAS_RESIDUAL: x <- x + gate[q] * y (gate = 1 without HAS_GATE), stored to XNEW in x's
                    dtype and normalized as stored (rounded), like eager does.
      out = (norm(x) * w + b) * (1 + scale[q]) + shift[q]   (each factor optional)
    """
    pid = tl.program_id(0)
    n_blk = tl.cdiv(G, ROWS)
    q = pid // n_blk
    blk = pid - q * n_blk
    q64 = q.to(tl.int64)
    local = blk * ROWS + tl.arange(0, ROWS)
    rmask = local < G
    i0, i1, i2 = _row_index(q * G + local, R1, R2, LEVELS)
    cols = tl.arange(0, BLOCK_C)
    if ALIGN > 1:  # == cols < C (C % ALIGN == 0), so that Triton sees runs of ALIGN equal bits
        cmask = (cols // ALIGN) < (C // ALIGN)
    else:
        cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    c2 = cols[None, :]

    x = tl.load(X + _offs(i0, i1, i2, sx0, sx1, sx2, LEVELS, ALIGN) + c2, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        y = tl.load(Y + _offs(i0, i1, i2, sy0, sy1, sy2, LEVELS, ALIGN) + c2, mask=mask,
                    other=0.0).to(tl.float32)
        if HAS_GATE:
            g = tl.load(GATE + q64 * s_gate + cols, mask=cmask, other=0.0).to(tl.float32)
            x = x + g[None, :] * y
        else:
            x = x + y
        xn = x.to(XNEW.dtype.element_ty)
        tl.store(XNEW + _offs(i0, i1, i2, sn0, sn1, sn2, LEVELS, ALIGN) + c2, xn, mask=mask)
        x = xn.to(tl.float32)

    h, _rstd = _normalize_rows(x, mask, rmask, C, eps, IS_RMS)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        h = h * w[None, :]
    if HAS_BIAS:
        b = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)
        h = h + b[None, :]
    if HAS_SCALE:
        sc = tl.load(SCALE + q64 * s_scale + cols, mask=cmask, other=0.0).to(tl.float32)
        h = h * (1.0 + sc[None, :])
    if HAS_SHIFT:
        sh = tl.load(SHIFT + q64 * s_shift + cols, mask=cmask, other=0.0).to(tl.float32)
        h = h + sh[None, :]
    tl.store(OUT + _offs(i0, i1, i2, so0, so1, so2, LEVELS, ALIGN) + c2, h.to(OUT.dtype.element_ty),
             mask=mask)


@triton.jit
def _bwd_loads(X, DH, DXN, Y, i0, i1, i2, c2, mask, sx0, sx1, sx2, sd0, sd1, sd2, se0, se1, se2,
               sy0, sy1, sy2, LEVELS: tl.constexpr, ALIGN: tl.constexpr, HAS_DXN: tl.constexpr,
               HAS_GATE: tl.constexpr):
    """One row tile of the backward's inputs, raw dtype: (x, dh, dx_new, y); an absent
    dx_new / y is returned as x (unused; no load)."""
    x = tl.load(X + _offs(i0, i1, i2, sx0, sx1, sx2, LEVELS, ALIGN) + c2, mask=mask, other=0.0)
    dh = tl.load(DH + _offs(i0, i1, i2, sd0, sd1, sd2, LEVELS, ALIGN) + c2, mask=mask, other=0.0)
    e = x
    y = x
    if HAS_DXN:
        e = tl.load(DXN + _offs(i0, i1, i2, se0, se1, se2, LEVELS, ALIGN) + c2, mask=mask, other=0.0)
    if HAS_GATE:
        y = tl.load(Y + _offs(i0, i1, i2, sy0, sy1, sy2, LEVELS, ALIGN) + c2, mask=mask, other=0.0)
    return x, dh, e, y


@triton.jit
def _norm_bwd_kernel(
    X, DH, DXN, Y, GATE, W, BIAS, SCALE, DX, DY,
    PART_W, PART_B, PART_SHIFT, PART_SCALE, PART_GATE,
    G, R1, R2, C, groups, n_sm,
    sx0, sx1, sx2, sd0, sd1, sd2, se0, se1, se2, sy0, sy1, sy2,
    sdx0, sdx1, sdx2, sdy0, sdy1, sdy2,
    s_gate, s_scale,
    eps,
    IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_DXN: tl.constexpr,
    HAS_GATE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr, LEVELS: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_C: tl.constexpr, ROWS: tl.constexpr, PROGS: tl.constexpr, PREFETCH: tl.constexpr,
    MIN_ROWS: tl.constexpr, STATIC_ITERS: tl.constexpr,
):
    """Backward for rows [p*rows_per_prog, (p+1)*rows_per_prog) of row group q (G rows:
    the sample when modulated, else all rows; rows decomposed as in the forward). Each group
    gets P = clamp(cdiv(PROGS * n_sm, groups), 1, cdiv(G, MIN_ROWS)) programs (about PROGS
    per SM in total; the launcher computes the same P from the config the autotuner chose).

    X is the normalized input (x_new for the gated op). Per tile, with s = 1 + scale[q]:
      h0 = xhat*w + b;  dh0 = dh*s;  g = dh0*w
      dx = rstd * (g - xhat*mean_c(g*xhat) - mean_c(g))        (RMS: no mean_c(g))
      HAS_RESIDUAL: dx += dx_new (if HAS_DXN); DX <- dx; DY <- gate[q]*dx (HAS_GATE)
    Column partial sums over this program's rows, written once to PART_*[q*P + p, :]:
      dshift: dh;  dscale: dh*h0;  dbias: dh0;  dweight: dh0*xhat;  dgate: dx*y.

    PREFETCH: the loads of tile i+1 are issued before tile i is computed (a GPU load only
    blocks at the first use of its registers), so each program keeps a tile of loads in
    flight while it reduces; without it the loads and the reductions alternate. (Triton's
    software pipeliner does not pipeline loads that feed no tl.dot: checked on 3.3 and 3.6.)
    """
    pid = tl.program_id(0)
    P = tl.maximum(tl.minimum(tl.cdiv(PROGS * n_sm, groups), tl.cdiv(G, MIN_ROWS)), 1)
    rows_per_prog = tl.cdiv(G, P)
    q = pid // P
    p = pid - q * P
    q64 = q.to(tl.int64)
    row_lo = q * G + p * rows_per_prog
    row_hi = q * G + tl.minimum(p * rows_per_prog + rows_per_prog, G)
    cols = tl.arange(0, BLOCK_C)
    if ALIGN > 1:  # == cols < C (C % ALIGN == 0), so that Triton sees runs of ALIGN equal bits
        cmask = (cols // ALIGN) < (C // ALIGN)
    else:
        cmask = cols < C
    c2 = cols[None, :]

    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        s = 1.0 + tl.load(SCALE + q64 * s_scale + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_GATE:
        g8 = tl.load(GATE + q64 * s_gate + cols, mask=cmask, other=0.0).to(tl.float32)
    # [ROWS, BLOCK_C] accumulators: element-wise adds in the loop (no cross-warp reduction
    # and barrier per tile), one column reduction at the end.
    acc_w = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    acc_b = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    acc_shift = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    acc_scale = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    acc_gate = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)

    if PREFETCH:  # the first tile's loads (raw dtype: converting would wait for them)
        rows = row_lo + tl.arange(0, ROWS)
        i0, i1, i2 = _row_index(rows, R1, R2, LEVELS)
        mask = (rows < row_hi)[:, None] & cmask[None, :]
        x_raw, dh_raw, e_raw, y_raw = _bwd_loads(
            X, DH, DXN, Y, i0, i1, i2, c2, mask, sx0, sx1, sx2, sd0, sd1, sd2, se0, se1, se2,
            sy0, sy1, sy2, LEVELS, ALIGN, HAS_DXN, HAS_GATE)

    # Under the interpreter the trip count is the constexpr STATIC_ITERS: it turns every
    # assigned value into an array, and numpy >= 2.4 refuses arrays as range() bounds.
    for it in range(STATIC_ITERS if STATIC_ITERS > 0 else tl.cdiv(rows_per_prog, ROWS)):
        if PREFETCH:  # this tile was loaded last iteration; issue the next tile's loads now
            rmask = rows < row_hi
            j0, j1, j2 = i0, i1, i2
            cur_mask = mask
            x, dh, dxn, y = x_raw, dh_raw, e_raw, y_raw
            rows += ROWS
            i0, i1, i2 = _row_index(rows, R1, R2, LEVELS)
            mask = (rows < row_hi)[:, None] & cmask[None, :]
            x_raw, dh_raw, e_raw, y_raw = _bwd_loads(
                X, DH, DXN, Y, i0, i1, i2, c2, mask, sx0, sx1, sx2, sd0, sd1, sd2, se0, se1, se2,
                sy0, sy1, sy2, LEVELS, ALIGN, HAS_DXN, HAS_GATE)
            x = x.to(tl.float32)
            dh = dh.to(tl.float32)
            if HAS_DXN:
                dxn = dxn.to(tl.float32)
            if HAS_GATE:
                y = y.to(tl.float32)
        else:  # load this tile, then work on it (inline loads: the interpreter's path, where
            # every jit helper call costs ~1 ms)
            cur_rows = row_lo + it * ROWS + tl.arange(0, ROWS)
            rmask = cur_rows < row_hi
            j0, j1, j2 = _row_index(cur_rows, R1, R2, LEVELS)
            cur_mask = rmask[:, None] & cmask[None, :]
            x = tl.load(X + _offs(j0, j1, j2, sx0, sx1, sx2, LEVELS, ALIGN) + c2, mask=cur_mask,
                        other=0.0).to(tl.float32)
            dh = tl.load(DH + _offs(j0, j1, j2, sd0, sd1, sd2, LEVELS, ALIGN) + c2, mask=cur_mask,
                         other=0.0).to(tl.float32)
            if HAS_DXN:
                dxn = tl.load(DXN + _offs(j0, j1, j2, se0, se1, se2, LEVELS, ALIGN) + c2, mask=cur_mask,
                              other=0.0).to(tl.float32)
            if HAS_GATE:
                y = tl.load(Y + _offs(j0, j1, j2, sy0, sy1, sy2, LEVELS, ALIGN) + c2, mask=cur_mask,
                            other=0.0).to(tl.float32)

        xhat, rstd = _normalize_rows(x, cur_mask, rmask, C, eps, IS_RMS)
        if HAS_SHIFT:
            acc_shift += dh
        if HAS_SCALE:
            h0 = xhat
            if HAS_WEIGHT:
                h0 = h0 * w[None, :]
            if HAS_BIAS:
                h0 = h0 + b[None, :]
            acc_scale += dh * h0
            dh = dh * s[None, :]
        if HAS_BIAS:
            acc_b += dh
        if HAS_WEIGHT:
            acc_w += dh * xhat
            dh = dh * w[None, :]
        c_xhat = tl.sum(dh * xhat, axis=1) / C
        if IS_RMS:
            dx = (dh - xhat * c_xhat[:, None]) * rstd[:, None]
        else:
            c_mean = tl.sum(dh, axis=1) / C
            dx = (dh - xhat * c_xhat[:, None] - c_mean[:, None]) * rstd[:, None]
        if HAS_RESIDUAL:
            if HAS_DXN:
                dx += dxn
            if HAS_GATE:
                acc_gate += dx * y
                tl.store(DY + _offs(j0, j1, j2, sdy0, sdy1, sdy2, LEVELS, ALIGN) + c2,
                         (dx * g8[None, :]).to(DY.dtype.element_ty), mask=cur_mask)
        tl.store(DX + _offs(j0, j1, j2, sdx0, sdx1, sdx2, LEVELS, ALIGN) + c2, dx.to(DX.dtype.element_ty),
                 mask=cur_mask)

    part = pid.to(tl.int64) * C + cols
    if HAS_WEIGHT:
        tl.store(PART_W + part, tl.sum(acc_w, axis=0), mask=cmask)
    if HAS_BIAS:
        tl.store(PART_B + part, tl.sum(acc_b, axis=0), mask=cmask)
    if HAS_SHIFT:
        tl.store(PART_SHIFT + part, tl.sum(acc_shift, axis=0), mask=cmask)
    if HAS_SCALE:
        tl.store(PART_SCALE + part, tl.sum(acc_scale, axis=0), mask=cmask)
    if HAS_GATE:
        tl.store(PART_GATE + part, tl.sum(acc_gate, axis=0), mask=cmask)


# --------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------

_FLAG_KEYS = ["C", "IS_RMS", "HAS_RESIDUAL", "HAS_GATE", "HAS_WEIGHT", "HAS_BIAS", "HAS_SHIFT",
              "HAS_SCALE"]

#: Elements of a [ROWS, BLOCK_C] tile under the interpreter: its cost is per program step,
#: nearly independent of tile size, so tiles are large there (1 row/program is ~50x slower).
_INTERP_TILE = 1 << 15


def _interp_rows(block_c: int) -> int:
    return max(1, _INTERP_TILE // block_c)


def _gpu_configs(block_c: int, max_tile: int, per_thread: tuple[int, ...]) -> list[triton.Config]:
    """(ROWS, num_warps) candidates for a memory-bound row kernel: [ROWS, BLOCK_C] tiles of
    2K..max_tile elements (at least one row) holding ``per_thread`` fp32 values per thread per
    live array: enough bytes in flight per SM without register spills (checked with ptxas -v
    for sm_90: no spills, or a few bytes in the largest gated backward tiles). 1-6 configs
    per BLOCK_C."""
    if block_c >= max_tile:  # one row per program, as many threads as it takes
        return [triton.Config({"ROWS": 1}, num_warps=16)]
    configs = []
    rows = max(1, 2048 // block_c)
    while rows * block_c <= max_tile:
        for warps in (4, 8, 16):
            if rows * block_c // (32 * warps) in per_thread:
                configs.append(triton.Config({"ROWS": rows}, num_warps=warps))
        rows *= 2
    return configs


def _tune_bench(fn, quantiles):
    """Shorter autotune timing than Triton's default (25 ms warmup + 100 ms per config)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


@functools.cache
def _fwd_kernel(block_c: int):
    return autotune(_gpu_configs(block_c, 16384, (4, 8, 16)), key=_FLAG_KEYS,
                    interpret_config=triton.Config({"ROWS": _interp_rows(block_c)}),
                    do_bench=_tune_bench)(_norm_fwd_kernel)


#: Backward programs per SM (in total over all row groups): more programs keep more loads in
#: flight, fewer write fewer partial-sum rows. Autotuned among these on a GPU.
_BWD_PROGS = (8,)
#: The interpreter's backward: programs per (fake) SM; its cost is per program step.
_INTERP_PROGS = 4


def _bwd_configs(block_c: int) -> list[triton.Config]:
    """(ROWS, num_warps, PROGS) candidates for the backward. Unlike the forward, each program
    holds several live tiles (x, dh, xhat, dx and 2-5 accumulators, plus the next tile's
    loads), so the tiles hold 4-16 fp32 values per thread per array with 8-16 warps: at
    ~100-250 registers per thread, 1-4 programs fit on an SM. The first GPU measurement (16
    warps, no prefetch, 4 programs per SM) reached only 0.4-0.5 TB/s; the H100 sweep of
    2026-11-27 (eager-timed) put 2 rows x 8 warps with prefetch, 8 programs per SM, first.
    ``DITPERF_NORM_BWD_CONFIGS="ROWSxWARPSxPROGS[xPREFETCH],..."`` replaces the list (e.g. a
    sweep in bench/norms.py)."""
    spec = os.environ.get("DITPERF_NORM_BWD_CONFIGS", "").strip()
    if spec:
        configs = []
        for item in spec.split(","):
            try:
                vals = [int(v) for v in item.strip().lower().split("x")]
            except ValueError:
                vals = []
            if len(vals) not in (3, 4):
                raise ValueError(f"DITPERF_NORM_BWD_CONFIGS: cannot read {item!r}; expected e.g. "
                                 "'1x8x4,2x8x8x0' (ROWS x num_warps x programs per SM [x prefetch 0/1])")
            rows, warps, progs = vals[:3]
            configs.append(triton.Config({"ROWS": rows, "PROGS": progs,
                                          "PREFETCH": bool(vals[3]) if len(vals) == 4 else True},
                                         num_warps=warps))
        return configs
    if block_c >= 8192:  # one row per program, as many threads as it takes
        return [triton.Config({"ROWS": 1, "PROGS": 2, "PREFETCH": True}, num_warps=16)]
    configs = []
    rows = max(1, 1024 // block_c)
    while rows * block_c <= 8192:
        for warps in (8, 16):
            if rows * block_c // (32 * warps) in (4, 8, 16):
                configs += [triton.Config({"ROWS": rows, "PROGS": progs, "PREFETCH": True},
                                          num_warps=warps) for progs in _BWD_PROGS]
        rows *= 2
    return configs


def _interp_bwd_config(block_c: int) -> dict[str, int | bool]:
    # no prefetch: under the interpreter a program usually has one tile, and the prefetch
    # would load a second (masked) one for nothing
    return {"ROWS": _interp_rows(block_c), "PROGS": _INTERP_PROGS, "PREFETCH": False}


@functools.cache
def _bwd_kernel(block_c: int):
    return autotune(_bwd_configs(block_c), key=_FLAG_KEYS + ["HAS_DXN"],
                    interpret_config=triton.Config(_interp_bwd_config(block_c)),
                    do_bench=_tune_bench)(_norm_bwd_kernel)


def _bwd_programs(groups: int, G: int, progs: int, n_sm: int, min_rows: int) -> int:
    """Programs per row group, P (the kernel computes the same from its PROGS)."""
    return max(1, min(triton.cdiv(progs * n_sm, groups), triton.cdiv(G, min_rows)))


# --------------------------------------------------------------------------------------
# Row layout: leading dims -> flat rows over (R0, R1, R2) with per-tensor strides
# --------------------------------------------------------------------------------------


def _row_layout(tensors: list[torch.Tensor]
                ) -> tuple[tuple[int, int, int], list[tuple[int, int, int]]] | None:
    """Describe the rows of same-shaped tensors (..., C) as three nested indices.

    Returns ((R0, R1, R2), [(s0, s1, s2) per tensor]) or None when the leading dims need
    more than three levels for some tensor. Size-1 dims are dropped and adjacent dims merged
    where every tensor allows it (contiguous inputs become one level); missing outer levels
    get size 1. The flat row index r = (i0 * R1 + i1) * R2 + i2 is the row-major index over
    all leading dims, so a per-sample row group (sample b = rows [b*N, (b+1)*N)) is a range
    of r whatever the layout.
    """
    shape = tensors[0].shape[:-1]
    dims = [(size, [t.stride(i) for t in tensors]) for i, size in enumerate(shape) if size != 1]
    merged: list[tuple[int, list[int]]] = []
    for size, strides in dims:
        if merged:
            psize, pstrides = merged[-1]
            if all(ps == s * size for ps, s in zip(pstrides, strides)):
                merged[-1] = (psize * size, strides)
                continue
        merged.append((size, strides))
    if len(merged) > 3:
        return None
    while len(merged) < 3:
        merged.insert(0, (1, [0] * len(tensors)))
    sizes = tuple(m[0] for m in merged)
    per_tensor = [tuple(m[1][k] for m in merged) for k in range(len(tensors))]
    return sizes, per_tensor  # type: ignore[return-value]


def _align_of(C: int, strides: list[tuple[int, int, int]]) -> int:
    """Power of two (<= 16) dividing C and every row stride (``_common.align_hint``): QK-norm
    rows of D = 72 (stride 72 or 3*H*72) get 8, where Triton alone would load 2 bytes at a time."""
    return align_hint(C, *(s for st in strides for s in st), cap=16)


def _align(C: int, strides: list[tuple[int, int, int]]) -> tuple[int, list[tuple[int, int, int]]]:
    """(ALIGN, the row strides in units of ALIGN elements) for a launch; ALIGN = 1 under the
    interpreter (no vector loads to enable; the index arithmetic would only cost time)."""
    a = 1 if INTERPRET else _align_of(C, strides)
    return a, [tuple(s // a for s in st) for st in strides]  # type: ignore[misc]


def _levels(sizes: tuple[int, int, int]) -> int:
    """Row levels the kernels must decompose (constexpr LEVELS): 1 = one stride, no div/mod."""
    return 3 if sizes[0] > 1 else 2 if sizes[1] > 1 else 1


#: Flat row indices are int32 in the kernels (tile overhang included).
_MAX_ROWS = 2**31 - 1 - MAX_C


def _row_groups(x: torch.Tensor, per_sample: bool) -> tuple[int, int]:
    """(groups, G): with per-sample vectors one group per sample (G = N rows) so that each
    program loads its sample's vectors once; otherwise all rows form one group, so tiles of
    ROWS rows span samples/heads and the program count is set by the total row count."""
    rows = x.numel() // x.shape[-1]
    if rows > _MAX_ROWS:
        raise ValueError(f"x has {rows} rows (all leading dims); the kernels index rows in int32 "
                         f"and support at most {_MAX_ROWS}")
    if per_sample:
        return x.shape[0], x.shape[1]
    return 1, rows


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def _check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    return eps


def _check_args(op: str, x: torch.Tensor, *, y: torch.Tensor | None = None,
                params: tuple[tuple[str, torch.Tensor | None], ...] = (),
                per_sample: tuple[tuple[str, torch.Tensor | None], ...] = ()) -> None:
    """Shapes, dtypes and strides (no data access: also runs on fake tensors).

    x: (..., C) float, or (B, N, C) when any per-sample vector is given; y: like x;
    params: (C,) in x's dtype or fp32; per_sample: (B, C) in x's dtype or fp32.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES, required=True)
    modulated = any(t is not None for _, t in per_sample)
    if modulated and x.dim() != 3:
        names = ", ".join(n for n, t in per_sample if t is not None)
        raise ValueError(f"{op}: x has shape {tuple(x.shape)}; expected (B, N, C) when {names} "
                         "is given (per-sample modulation)")
    if x.dim() == 0:
        raise ValueError(f"{op}: x is a scalar; expected (..., C)")
    C = x.shape[-1]
    if C == 0 or x.numel() == 0:
        raise ValueError(f"{op}: x has shape {tuple(x.shape)}: empty; expected (..., C) with C >= 1 "
                         "and at least one row")
    if C > MAX_C:
        raise ValueError(f"{op}: x has C = {C} features; the kernels hold a whole row in registers "
                         f"and support C <= {MAX_C}")
    if y is not None:
        check_tensor("y", y, dtype=x.dtype, shape=tuple(x.shape))
    param_dtypes = (x.dtype, torch.float32)
    for name, t in params:
        check_tensor(name, t, shape=(C,), dtypes=param_dtypes)
    for name, t in per_sample:
        check_tensor(name, t, shape=(x.shape[0], C), dtypes=param_dtypes)


def _check_device(x: torch.Tensor, *others: tuple[str, torch.Tensor | None]) -> torch.device:
    return require_kernel_device(("x", x), *[(n, t) for n, t in others if t is not None])


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _s(t: torch.Tensor | None) -> int:
    """Row stride of a (B, C) per-sample vector (0 when absent)."""
    return 0 if t is None else t.stride(0)


def _norm_fwd(x: torch.Tensor, y: torch.Tensor | None, gate: torch.Tensor | None,
              weight: torch.Tensor | None, bias: torch.Tensor | None, shift: torch.Tensor | None,
              scale: torch.Tensor | None, eps: float, is_rms: bool
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the forward kernel; returns (h, x_new or None). Inputs already validated."""
    C = x.shape[-1]
    block_c = next_power_of_2(C)
    per_sample = any(t is not None for t in (gate, shift, scale))
    out = torch.empty_like(x)
    xnew = torch.empty_like(x) if y is not None else None
    tensors = [x, out] + ([y, xnew] if y is not None else [])
    groups, G = _row_groups(x, per_sample)
    layout = _row_layout(tensors)  # type: ignore[arg-type]
    if layout is None:  # > 3 unmergeable leading dims: run on contiguous copies
        h_c, xn_c = _norm_fwd(x.contiguous(), None if y is None else y.contiguous(), gate, weight,
                              bias, shift, scale, eps, is_rms)
        out.copy_(h_c)
        if xnew is not None:
            xnew.copy_(xn_c)
        return out, xnew
    sizes, strides = layout
    align, strides = _align(C, strides)
    z = (0, 0, 0)
    sx, so = strides[0], strides[1]
    sy, sn = (strides[2], strides[3]) if y is not None else (z, z)
    kernel = _fwd_kernel(block_c)

    def grid(meta):
        return (groups * triton.cdiv(G, meta["ROWS"]),)

    with device_guard(x.device):
        kernel[grid](
            x, y, gate, weight, bias, shift, scale, out, xnew,
            G, sizes[1], sizes[2], C, *sx, *sy, *so, *sn, _s(gate), _s(shift), _s(scale), eps,
            IS_RMS=is_rms, HAS_RESIDUAL=y is not None, HAS_GATE=gate is not None,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None, LEVELS=_levels(sizes), ALIGN=align,
            BLOCK_C=block_c,
        )
    return out, xnew


def _norm_bwd(dh: torch.Tensor, x: torch.Tensor, dxn: torch.Tensor | None, y: torch.Tensor | None,
              gate: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
              shift: torch.Tensor | None, scale: torch.Tensor | None, eps: float, is_rms: bool
              ) -> list[torch.Tensor]:
    """Run the backward kernel; returns [dx, dy (gated with gate), dgate, dweight, dbias,
    dshift, dscale], each only when its input is present, in that order."""
    C = x.shape[-1]
    block_c = next_power_of_2(C)
    per_sample = any(t is not None for t in (gate, shift, scale))
    if dh.stride(-1) != 1 and C != 1:
        dh = dh.contiguous()
    if dxn is not None and dxn.stride(-1) != 1 and C != 1:
        dxn = dxn.contiguous()
    dx = torch.empty_like(x)
    dy = torch.empty_like(y) if (y is not None and gate is not None) else None
    tensors = [x, dh, dx] + [t for t in (dxn, y, dy) if t is not None]
    groups, G = _row_groups(x, per_sample)
    layout = _row_layout(tensors)
    if layout is None:  # > 3 unmergeable leading dims: run on contiguous copies
        grads = _norm_bwd(dh.contiguous(), x.contiguous(), None if dxn is None else dxn.contiguous(),
                          None if y is None else y.contiguous(), gate, weight, bias, shift, scale,
                          eps, is_rms)
        dx.copy_(grads[0])
        if dy is not None:
            dy.copy_(grads[1])
        return [dx] + ([dy] if dy is not None else []) + grads[1 + (dy is not None):]
    sizes, strides = layout
    align, strides = _align(C, strides)
    rest = iter(strides[3:])
    z = (0, 0, 0)
    se = next(rest) if dxn is not None else z
    sy = next(rest) if y is not None else z
    sdy = next(rest) if dy is not None else z

    min_rows = _interp_rows(block_c) if INTERPRET else 1
    n_sm = num_sms(x.device)
    kernel = _bwd_kernel(block_c)
    # the partial-sum buffer fits the config with the most programs (P grows with PROGS);
    # the autotuned kernel keeps its config list (the interpreter's wrapper has none)
    progs_max = max((c.kwargs["PROGS"] for c in getattr(kernel, "configs", ())), default=_INTERP_PROGS)
    p_max = _bwd_programs(groups, G, progs_max, n_sm, min_rows)
    n_part = sum(t is not None for t in (weight, bias, shift, scale, gate))
    part = torch.empty((max(n_part, 1), groups * p_max, C), device=x.device, dtype=torch.float32)
    slots = iter(range(n_part))
    pw, pb, psh, psc, pg = (part[next(slots)] if t is not None else None
                            for t in (weight, bias, shift, scale, gate))

    def grid(meta):
        return (groups * _bwd_programs(groups, G, meta["PROGS"], n_sm, min_rows),)

    static_iters = 0
    if INTERPRET:
        P = _bwd_programs(groups, G, _INTERP_PROGS, n_sm, min_rows)
        static_iters = triton.cdiv(triton.cdiv(G, P), min_rows)
    with device_guard(x.device):
        kernel[grid](
            x, dh, dxn, y, gate, weight, bias, scale, dx, dy,
            pw, pb, psh, psc, pg,
            G, sizes[1], sizes[2], C, groups, n_sm,
            *strides[0], *strides[1], *se, *sy, *strides[2], *sdy,
            _s(gate), _s(scale), eps,
            IS_RMS=is_rms, HAS_RESIDUAL=y is not None, HAS_DXN=dxn is not None,
            HAS_GATE=gate is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None, LEVELS=_levels(sizes), ALIGN=align,
            BLOCK_C=block_c, MIN_ROWS=min_rows, STATIC_ITERS=static_iters,
        )
    # the config the autotuner ran (it sets best_config on every call, cached or not)
    chosen = getattr(kernel, "best_config", None)
    progs = chosen.kwargs["PROGS"] if chosen is not None else _INTERP_PROGS
    P = _bwd_programs(groups, G, progs, n_sm, min_rows)
    grads = [dx]
    if dy is not None:
        grads.append(dy)
    B = x.shape[0]
    for t, p in ((gate, pg), (weight, pw), (bias, pb), (shift, psh), (scale, psc)):
        if t is None:
            continue
        if t.dim() == 2:  # per-sample: sum the P partials of each sample
            grads.append(p[: B * P].view(B, P, C).sum(1).to(t.dtype))
        else:  # per-feature: sum all partials
            grads.append(p[: groups * P].sum(0).to(t.dtype))
    return grads


# --------------------------------------------------------------------------------------
# Custom ops (schemas are a contract: see the brief / export code)
# --------------------------------------------------------------------------------------


def _empty_grads(x: torch.Tensor, y: torch.Tensor | None, gate, weight, bias, shift, scale
                 ) -> list[torch.Tensor]:
    grads = [torch.empty_like(x)]
    if y is not None and gate is not None:
        grads.append(torch.empty_like(y))
    for t in (gate, weight, bias, shift, scale):
        if t is not None:
            grads.append(torch.empty(t.shape, dtype=t.dtype, device=t.device))
    return grads


# layer_norm ---------------------------------------------------------------------------


def _layer_norm_impl(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                     shift: torch.Tensor | None, scale: torch.Tensor | None, eps: float) -> torch.Tensor:
    _check_args("layer_norm", x, params=(("weight", weight), ("bias", bias)),
                per_sample=(("shift", shift), ("scale", scale)))
    _check_device(x, ("weight", weight), ("bias", bias), ("shift", shift), ("scale", scale))
    return _norm_fwd(x, None, None, weight, bias, shift, scale, eps, is_rms=False)[0]


def _layer_norm_bwd_impl(dh, x, weight, bias, shift, scale, eps):
    return _norm_bwd(dh, x, None, None, None, weight, bias, shift, scale, eps, is_rms=False)


@torch.library.custom_op("ditperf::layer_norm", mutates_args=())
def _layer_norm_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   shift: torch.Tensor | None, scale: torch.Tensor | None, eps: float) -> torch.Tensor:
    return _layer_norm_impl(x, weight, bias, shift, scale, eps)


@_layer_norm_op.register_fake
def _(x, weight, bias, shift, scale, eps):
    _check_args("layer_norm", x, params=(("weight", weight), ("bias", bias)),
                per_sample=(("shift", shift), ("scale", scale)))
    return torch.empty_like(x)


@torch.library.custom_op("ditperf::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(dh: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                       bias: torch.Tensor | None, shift: torch.Tensor | None,
                       scale: torch.Tensor | None, eps: float) -> list[torch.Tensor]:
    return _layer_norm_bwd_impl(dh, x, weight, bias, shift, scale, eps)


@_layer_norm_bwd_op.register_fake
def _(dh, x, weight, bias, shift, scale, eps):
    return _empty_grads(x, None, None, weight, bias, shift, scale)


def _layer_norm_setup(ctx, inputs, output) -> None:
    x, weight, bias, shift, scale, eps = inputs
    ctx.save_for_backward(x, weight, bias, shift, scale)
    ctx.eps = eps


def _layer_norm_backward(ctx, dh, bwd=None):
    x, weight, bias, shift, scale = ctx.saved_tensors
    bwd = bwd or torch.ops.ditperf.layer_norm_bwd
    grads = iter(bwd(dh, x, weight, bias, shift, scale, ctx.eps))
    dx = next(grads)
    rest = [next(grads) if t is not None else None for t in (weight, bias, shift, scale)]
    return (dx, *rest, None)


_layer_norm_op.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


class _LayerNormFn(torch.autograd.Function):
    """The eager fast path (see ``_common.eager_fast_path``): same launchers, no dispatcher."""

    @staticmethod
    def forward(ctx, x, weight, bias, shift, scale, eps):
        out = _layer_norm_impl(x, weight, bias, shift, scale, eps)
        _layer_norm_setup(ctx, (x, weight, bias, shift, scale, eps), out)
        return out

    @staticmethod
    def backward(ctx, dh):
        return _layer_norm_backward(ctx, dh, _layer_norm_bwd_impl)


# rms_norm -----------------------------------------------------------------------------


def _rms_norm_impl(x: torch.Tensor, weight: torch.Tensor | None, shift: torch.Tensor | None,
                   scale: torch.Tensor | None, eps: float) -> torch.Tensor:
    _check_args("rms_norm", x, params=(("weight", weight),),
                per_sample=(("shift", shift), ("scale", scale)))
    _check_device(x, ("weight", weight), ("shift", shift), ("scale", scale))
    return _norm_fwd(x, None, None, weight, None, shift, scale, eps, is_rms=True)[0]


def _rms_norm_bwd_impl(dh, x, weight, shift, scale, eps):
    return _norm_bwd(dh, x, None, None, None, weight, None, shift, scale, eps, is_rms=True)


@torch.library.custom_op("ditperf::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor | None, shift: torch.Tensor | None,
                 scale: torch.Tensor | None, eps: float) -> torch.Tensor:
    return _rms_norm_impl(x, weight, shift, scale, eps)


@_rms_norm_op.register_fake
def _(x, weight, shift, scale, eps):
    _check_args("rms_norm", x, params=(("weight", weight),),
                per_sample=(("shift", shift), ("scale", scale)))
    return torch.empty_like(x)


@torch.library.custom_op("ditperf::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(dh: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                     shift: torch.Tensor | None, scale: torch.Tensor | None,
                     eps: float) -> list[torch.Tensor]:
    return _rms_norm_bwd_impl(dh, x, weight, shift, scale, eps)


@_rms_norm_bwd_op.register_fake
def _(dh, x, weight, shift, scale, eps):
    return _empty_grads(x, None, None, weight, None, shift, scale)


def _rms_norm_setup(ctx, inputs, output) -> None:
    x, weight, shift, scale, eps = inputs
    ctx.save_for_backward(x, weight, shift, scale)
    ctx.eps = eps


def _rms_norm_backward(ctx, dh, bwd=None):
    x, weight, shift, scale = ctx.saved_tensors
    bwd = bwd or torch.ops.ditperf.rms_norm_bwd
    grads = iter(bwd(dh, x, weight, shift, scale, ctx.eps))
    dx = next(grads)
    rest = [next(grads) if t is not None else None for t in (weight, shift, scale)]
    return (dx, *rest, None)


_rms_norm_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


class _RMSNormFn(torch.autograd.Function):
    """The eager fast path of ``rms_norm``."""

    @staticmethod
    def forward(ctx, x, weight, shift, scale, eps):
        out = _rms_norm_impl(x, weight, shift, scale, eps)
        _rms_norm_setup(ctx, (x, weight, shift, scale, eps), out)
        return out

    @staticmethod
    def backward(ctx, dh):
        return _rms_norm_backward(ctx, dh, _rms_norm_bwd_impl)


# gated_residual_layer_norm ------------------------------------------------------------


def _check_gated(x, y, gate, shift, scale) -> None:
    _check_args("gated_residual_layer_norm", x, y=y,
                per_sample=(("gate", gate), ("shift", shift), ("scale", scale)))


def _gated_impl(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None,
                shift: torch.Tensor | None, scale: torch.Tensor | None,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check_gated(x, y, gate, shift, scale)
    _check_device(x, ("y", y), ("gate", gate), ("shift", shift), ("scale", scale))
    h, x_new = _norm_fwd(x, y, gate, None, None, shift, scale, eps, is_rms=False)
    return x_new, h


def _gated_bwd_impl(dx_new, dh, x_new, y, gate, shift, scale, eps):
    return _norm_bwd(dh, x_new, dx_new, y, gate, None, None, shift, scale, eps, is_rms=False)


@torch.library.custom_op("ditperf::gated_residual_layer_norm", mutates_args=())
def _gated_op(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None,
              shift: torch.Tensor | None, scale: torch.Tensor | None,
              eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _gated_impl(x, y, gate, shift, scale, eps)


@_gated_op.register_fake
def _(x, y, gate, shift, scale, eps):
    _check_gated(x, y, gate, shift, scale)
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("ditperf::gated_residual_layer_norm_bwd", mutates_args=())
def _gated_bwd_op(dx_new: torch.Tensor | None, dh: torch.Tensor, x_new: torch.Tensor,
                  y: torch.Tensor, gate: torch.Tensor | None, shift: torch.Tensor | None,
                  scale: torch.Tensor | None, eps: float) -> list[torch.Tensor]:
    return _gated_bwd_impl(dx_new, dh, x_new, y, gate, shift, scale, eps)


@_gated_bwd_op.register_fake
def _(dx_new, dh, x_new, y, gate, shift, scale, eps):
    return _empty_grads(x_new, y, gate, None, None, shift, scale)


def _gated_setup(ctx, inputs, output) -> None:
    _x, y, gate, shift, scale, eps = inputs
    ctx.save_for_backward(output[0], y, gate, shift, scale)
    ctx.eps = eps


def _gated_backward(ctx, dx_new, dh, bwd=None):
    x_new, y, gate, shift, scale = ctx.saved_tensors
    if dh is None:  # only x_new was used: h contributes nothing
        dh = torch.zeros_like(x_new)
    bwd = bwd or torch.ops.ditperf.gated_residual_layer_norm_bwd
    grads = iter(bwd(dx_new, dh, x_new, y, gate, shift, scale, ctx.eps))
    dx = next(grads)
    dy = next(grads) if gate is not None else dx  # gate None: y enters with weight 1
    rest = [next(grads) if t is not None else None for t in (gate, shift, scale)]
    return (dx, dy, *rest, None)


_gated_op.register_autograd(_gated_backward, setup_context=_gated_setup)


class _GatedFn(torch.autograd.Function):
    """The eager fast path of ``gated_residual_layer_norm``."""

    @staticmethod
    def forward(ctx, x, y, gate, shift, scale, eps):
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None (as above)
        out = _gated_impl(x, y, gate, shift, scale, eps)
        _gated_setup(ctx, (x, y, gate, shift, scale, eps), out)
        return out

    @staticmethod
    def backward(ctx, dx_new, dh):
        return _gated_backward(ctx, dx_new, dh, _gated_bwd_impl)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


#: The norm ops' inputs that may not be None (the rest are optional vectors).
_REQUIRED = {"x": "", "y": " (the branch output)"}


def _check_types(op: str, **tensors: object) -> None:
    """TypeError for a non-tensor argument, before the dispatcher turns it into a RuntimeError."""
    for name, t in tensors.items():
        if t is None and name in _REQUIRED:
            raise TypeError(f"{op}: {name} must be a torch.Tensor{_REQUIRED[name]}, got None")
        if t is not None and not isinstance(t, torch.Tensor):
            what = "a torch.Tensor" if name in _REQUIRED else "a torch.Tensor or None"
            raise TypeError(f"{op}: {name} must be {what}, got {type(t).__name__}")


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               *, shift: torch.Tensor | None = None, scale: torch.Tensor | None = None,
               eps: float = 1e-6) -> torch.Tensor:
    """``(LN(x) * weight + bias) * (1 + scale[:, None]) + shift[:, None]`` in one pass.

    x: (B, N, C) (or any (..., C) without shift/scale); weight, bias: (C,); shift, scale:
    (B, C); each optional, in x's dtype or fp32. Returns x's shape and dtype. Differentiable
    (Triton backward); a ``ditperf::layer_norm`` custom op.
    """
    _check_types("layer_norm", x=x, weight=weight, bias=bias, shift=shift, scale=scale)
    if eager_fast_path(x, weight, bias, shift, scale):
        return _LayerNormFn.apply(x, weight, bias, shift, scale, _check_eps(eps))
    return torch.ops.ditperf.layer_norm(x, weight, bias, shift, scale, _check_eps(eps))


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, *, shift: torch.Tensor | None = None,
             scale: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """``(x / sqrt(mean(x^2) + eps) * weight) * (1 + scale[:, None]) + shift[:, None]``.

    x: (..., C), all leading dims are rows (QK-norm: (B, H, N, D) or (B, N, H, D) with weight
    (D,)); shift/scale (B, C) need x (B, N, C). A ``ditperf::rms_norm`` custom op.
    """
    _check_types("rms_norm", x=x, weight=weight, shift=shift, scale=scale)
    if eager_fast_path(x, weight, shift, scale):
        return _RMSNormFn.apply(x, weight, shift, scale, _check_eps(eps))
    return torch.ops.ditperf.rms_norm(x, weight, shift, scale, _check_eps(eps))


def gated_residual_layer_norm(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None, *,
                              shift: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                              eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_new = x + gate[:, None] * y``; ``h = LN(x_new) * (1 + scale[:, None]) + shift[:, None]``.

    The DiT block transition in one pass (one read of x and y, one write of x_new and h).
    x, y: (B, N, C) same dtype; gate/shift/scale: (B, C) or None (gate None means 1).
    Returns (x_new, h). A ``ditperf::gated_residual_layer_norm`` custom op.
    """
    _check_types("gated_residual_layer_norm", x=x, y=y, gate=gate, shift=shift, scale=scale)
    if eager_fast_path(x, y, gate, shift, scale):
        return _GatedFn.apply(x, y, gate, shift, scale, _check_eps(eps))
    return torch.ops.ditperf.gated_residual_layer_norm(x, y, gate, shift, scale, _check_eps(eps))


# --------------------------------------------------------------------------------------
# Torch references (same signatures; run at the input precision = the eager baseline)
# --------------------------------------------------------------------------------------


def _modulate_ref(h: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor | None) -> torch.Tensor:
    if scale is not None:
        h = h * (1 + scale.to(h.dtype).unsqueeze(1))
    if shift is not None:
        h = h + shift.to(h.dtype).unsqueeze(1)
    return h


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                   *, shift: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                   eps: float = 1e-6) -> torch.Tensor:
    """Eager torch: ``F.layer_norm`` then ``* (1 + scale[:, None]) + shift[:, None]`` (params cast
    to x's dtype; call on fp64 inputs for an accurate reference)."""
    h = F.layer_norm(x, (x.shape[-1],), _cast(weight, x.dtype), _cast(bias, x.dtype), eps)
    return _modulate_ref(h, shift, scale)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None = None, *, shift: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """Eager torch: ``F.rms_norm`` then the adaLN modulation."""
    h = F.rms_norm(x, (x.shape[-1],), _cast(weight, x.dtype), eps)
    return _modulate_ref(h, shift, scale)


def gated_residual_layer_norm_ref(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None, *,
                                  shift: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                                  eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager torch: ``x_new = x + gate[:, None] * y`` then :func:`layer_norm_ref` (no affine)."""
    x_new = x + y if gate is None else x + gate.to(x.dtype).unsqueeze(1) * y
    return x_new, layer_norm_ref(x_new, shift=shift, scale=scale, eps=eps)
