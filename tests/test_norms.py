"""Fused adaLN norm kernels (ditperf.kernels.norms): values, every gradient, custom-op
machinery (opcheck, torch.compile), bad input, and (GPU only) big shapes + CUDA graphs.

Accuracy idiom (flash-attention's): with ref64 the reference evaluated in fp64 on the same
inputs and `same` the torch reference at the input precision,
    max|kernel - ref64| <= 2 * max|same - ref64| + atol,   atol = ulp(dtype) * max(1, max|ref64|)
for every output and every gradient. Under the CPU interpreter bf16 rounds toward zero
(~2x torch's rounding error), which the factor 2 absorbs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence

import pytest
import torch
from ditperf.kernels import (
    _common,
    gated_residual_layer_norm,
    gated_residual_layer_norm_ref,
    layer_norm,
    layer_norm_ref,
    rms_norm,
    rms_norm_ref,
)
from ditperf.kernels import norms as norms_mod

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
ULP = {F32: 2.0**-20, F16: 2.0**-10, BF16: 2.0**-7, torch.float64: 0.0}


def rand(shape: Sequence[int], dtype: torch.dtype, device: torch.device, *, std: float = 1.0,
         mean: float = 0.0) -> torch.Tensor:
    """Random normal data (never zeros), drawn in fp32 then cast."""
    return (torch.randn(*shape, device=device) * std + mean).to(dtype)


def _max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref).abs().max().item()


def check_against_refs(kernel: Callable, ref: Callable, leaves: list[torch.Tensor | None],
                       names: list[str]) -> None:
    """Outputs and every gradient of ``kernel(*leaves)`` vs ``ref`` at the same precision vs
    ``ref`` in fp64. ``kernel``/``ref`` map the leaf list to a tensor or a tuple of tensors;
    None leaves stay None."""

    def run(fn: Callable, dtype: torch.dtype | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ls = [None if t is None else (t.detach() if dtype is None else t.detach().to(dtype)).requires_grad_()
              for t in leaves]
        outs = fn(*ls)
        outs = list(outs) if isinstance(outs, tuple) else [outs]
        live = [t for t in ls if t is not None]
        grads = torch.autograd.grad(outs, live, [g.to(o.dtype) for g, o in zip(douts, outs)])
        return outs, list(grads)

    # gradients flowing back into every output, drawn once in fp32
    with torch.no_grad():
        probe = ref(*[None if t is None else t.detach() for t in leaves])
    probe = list(probe) if isinstance(probe, tuple) else [probe]
    douts = [torch.randn(p.shape, device=p.device) for p in probe]

    k_out, k_grads = run(kernel, None)
    s_out, s_grads = run(ref, None)
    r_out, r_grads = run(ref, torch.float64)
    live_names = [n for n, t in zip(names, leaves) if t is not None]
    dtype = leaves[0].dtype
    for what, k, s, r in zip(["out"] * len(k_out) + ["d" + n for n in live_names],
                             k_out + k_grads, s_out + s_grads, r_out + r_grads):
        assert k.dtype == s.dtype and k.shape == s.shape, f"{what}: {k.dtype}{tuple(k.shape)} vs {s.dtype}{tuple(s.shape)}"
        assert torch.isfinite(k).all(), f"{what}: non-finite values"
        err, base = _max_err(k, r), _max_err(s, r)
        # a parameter gradient sums over rows (x.numel() / its numel of them): its rounding
        # error grows like the square root of that count, whatever order the sum runs in
        summed = max(1, leaves[0].numel() // k.numel())
        atol = ULP[k.dtype if k.dtype in ULP else dtype] * max(1.0, r.abs().max().item()) * math.sqrt(summed)
        assert err <= 2 * base + atol, f"{what}: max|kernel-ref64| = {err:.3g} > 2*{base:.3g} + {atol:.3g}"


# ----------------------------------------------------------------------------------------
# layer_norm
# ----------------------------------------------------------------------------------------

# (C, B, N, dtype, features): masked edges (C not a power of two, N odd), B = 1 and 3
LN_CASES = [
    (37, 1, 7, F32, "weight,bias,shift,scale"),
    (72, 3, 9, F16, "shift,scale"),
    (1000, 3, 5, BF16, "shift,scale"),
    (1152, 3, 33, BF16, "shift,scale"),
    (1152, 1, 17, F32, "weight"),
    (72, 3, 9, BF16, "weight,bias"),
    (1000, 1, 3, F16, "weight,bias,shift,scale"),
    (37, 3, 5, F32, ""),
    (37, 3, 5, BF16, "scale"),
    (72, 3, 5, F32, "shift"),
]


def _ln_leaves(C: int, B: int, N: int, dtype: torch.dtype, feats: str, device: torch.device,
               param_dtype: torch.dtype | None = None) -> list[torch.Tensor | None]:
    pd = param_dtype or dtype
    f = set(feats.split(","))
    return [
        rand((B, N, C), dtype, device, std=2.0, mean=0.5),
        rand((C,), pd, device, std=0.1, mean=1.0) if "weight" in f else None,
        rand((C,), pd, device, std=0.1) if "bias" in f else None,
        rand((B, C), pd, device, std=0.5) if "shift" in f else None,
        rand((B, C), pd, device, std=0.5) if "scale" in f else None,
    ]


def _ln(fn: Callable) -> Callable:
    return lambda x, w, b, sh, sc: fn(x, w, b, shift=sh, scale=sc, eps=1e-6)


LN_NAMES = ["x", "weight", "bias", "shift", "scale"]


@pytest.mark.parametrize("C,B,N,dtype,feats", LN_CASES,
                         ids=[f"C{c}-B{b}-N{n}-{str(d)[6:]}-{f or 'plain'}" for c, b, n, d, f in LN_CASES])
def test_layer_norm(C, B, N, dtype, feats, device):
    leaves = _ln_leaves(C, B, N, dtype, feats, device)
    check_against_refs(_ln(layer_norm), _ln(layer_norm_ref), leaves, LN_NAMES)


def test_layer_norm_fp32_params_with_bf16_x(device):
    """Autocast case: bf16 activations, fp32 parameters; grads come back in fp32."""
    leaves = _ln_leaves(1152, 3, 9, BF16, "weight,bias,shift,scale", device, param_dtype=F32)
    check_against_refs(_ln(layer_norm), _ln(layer_norm_ref), leaves, LN_NAMES)
    out = layer_norm(leaves[0], leaves[1], leaves[2], shift=leaves[3], scale=leaves[4])
    assert out.dtype == BF16


def test_layer_norm_2d_input(device):
    leaves = [rand((13, 72), F32, device), rand((72,), F32, device), rand((72,), F32, device)]
    check_against_refs(lambda x, w, b: layer_norm(x, w, b), lambda x, w, b: layer_norm_ref(x, w, b),
                       leaves, ["x", "weight", "bias"])


def test_layer_norm_strided_inputs(device):
    """Rows with a stride (x[:, ::2]) and shift/scale as chunks of a (B, 6C) adaLN output are
    read in place (no copy): same results as contiguous inputs."""
    B, N, C = 3, 11, 72
    base = rand((B, 2 * N, C), F32, device)
    mod = rand((B, 6 * C), F32, device, std=0.5)

    def kern(xb, m):
        shift, scale = m.chunk(6, dim=1)[:2]
        return layer_norm(xb[:, ::2], shift=shift, scale=scale)

    def ref(xb, m):
        shift, scale = m.chunk(6, dim=1)[:2]
        return layer_norm_ref(xb[:, ::2], shift=shift, scale=scale)

    check_against_refs(kern, ref, [base, mod], ["x_base", "mod"])


# ----------------------------------------------------------------------------------------
# rms_norm
# ----------------------------------------------------------------------------------------


def _qk_plain(B, H, N, D, dtype, device):
    return [rand((B, H, N, D), dtype, device, std=2.0), rand((D,), dtype, device, std=0.1, mean=1.0)]


RMS_CASES = {
    # QK-norm on the SDPA layout (B, H, N, D)
    "qk-BHND-bf16": (lambda d: _qk_plain(2, 3, 5, 64, BF16, d),
                     lambda f: (lambda x, w: f(x, w))),
    # (B, N, H, D) -> (B, H, N, D) view: three row levels, no copy
    "qk-transposed-f16": (lambda d: _qk_plain(2, 7, 3, 72, F16, d),
                          lambda f: (lambda x, w: f(x.transpose(1, 2), w))),
    # q sliced out of a fused (B, N, 3, H, D) qkv tensor
    "qk-qkv-slice-bf16": (lambda d: [rand((2, 5, 3, 2, 64), BF16, d), rand((64,), BF16, d, mean=1.0)],
                          lambda f: (lambda qkv, w: f(qkv[:, :, 0], w))),
    # 5-D permutation with > 3 unmergeable row levels: falls back to a contiguous copy
    "5d-permuted-f32": (lambda d: [rand((2, 3, 2, 3, 37), F32, d), rand((37,), F32, d, mean=1.0)],
                        lambda f: (lambda x, w: f(x.permute(1, 0, 3, 2, 4), w))),
    "modulated-1152-f32": (lambda d: [rand((3, 9, 1152), F32, d), rand((1152,), F32, d, mean=1.0),
                                      rand((3, 1152), F32, d), rand((3, 1152), F32, d)],
                           lambda f: (lambda x, w, sh, sc: f(x, w, shift=sh, scale=sc))),
    "modulated-37-bf16-noweight": (lambda d: [rand((1, 7, 37), BF16, d), rand((1, 37), BF16, d),
                                              rand((1, 37), BF16, d)],
                                   lambda f: (lambda x, sh, sc: f(x, shift=sh, scale=sc))),
}


@pytest.mark.parametrize("case", list(RMS_CASES))
def test_rms_norm(case, device):
    make, call = RMS_CASES[case]
    leaves = make(device)
    names = ["x", "weight", "shift", "scale"][: len(leaves)]
    check_against_refs(call(rms_norm), call(rms_norm_ref), leaves, names)


def test_rms_norm_keeps_transposed_layout(device):
    """QK-norm of a (B, N, H, D) -> (B, H, N, D) view returns the same memory layout."""
    x = rand((2, 5, 3, 64), F32, device).transpose(1, 2)
    out = rms_norm(x, rand((64,), F32, device))
    assert out.shape == x.shape and out.stride() == x.stride()


def _qkv_q(B: int, N: int, H: int, D: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Leaves for QK-norm of q sliced out of a fused qkv projection (B, N, 3*H*D)."""
    return [rand((B, N, 3 * H * D), dtype, device, std=2.0), rand((D,), dtype, device, std=0.1, mean=1.0)]


def _q_of(qkv: torch.Tensor, H: int) -> torch.Tensor:
    """q as the model slices it: (B, N, H, D) with strides (N*3*H*D, 3*H*D, D, 1)."""
    B, N, _ = qkv.shape
    return qkv.view(B, N, 3, H, -1)[:, :, 0]


@pytest.mark.parametrize("bwd_programs", ["default", "one-looping"])
def test_rms_norm_qkv_slice_rows_straddle_tiles(bwd_programs, device, monkeypatch):
    """q (B, N, H, D) from a fused qkv tensor: two row levels (B*N, H) that do not merge.
    All rows form one flat index space, so tiles of ROWS rows start and end inside a
    (b, n) group of H rows; the total row count (3*25*3 = 225) is not a multiple of ROWS
    (128 under the interpreter at D = 256), nor is the backward's rows per program (113)."""
    if bwd_programs == "one-looping":  # one backward program looping over 2 straddling tiles
        monkeypatch.setattr(norms_mod, "num_sms", lambda _device: 0)
    B, N, H, D = 3, 25, 3, 256
    leaves = _qkv_q(B, N, H, D, F32, device)
    q = _q_of(leaves[0], H)
    assert q.stride() == (N * 3 * H * D, 3 * H * D, D, 1)
    check_against_refs(lambda qkv, w: rms_norm(_q_of(qkv, H), w),
                       lambda qkv, w: rms_norm_ref(_q_of(qkv, H), w), leaves, ["qkv", "weight"])


def test_rms_norm_three_strided_levels(device):
    """q sliced from qkv and transposed to (B, H, N, D): strides (N*3*H*D, D, 3*H*D, 1), three
    row levels; 3*7*9 = 189 rows, so the first 128-row tile crosses every level boundary."""
    B, N, H, D = 3, 9, 7, 256
    leaves = _qkv_q(B, N, H, D, F16, device)
    q = _q_of(leaves[0], H).transpose(1, 2)
    assert norms_mod._levels(norms_mod._row_layout([q])[0]) == 3
    check_against_refs(lambda qkv, w: rms_norm(_q_of(qkv, H).transpose(1, 2), w),
                       lambda qkv, w: rms_norm_ref(_q_of(qkv, H).transpose(1, 2), w), leaves,
                       ["qkv", "weight"])
    out = rms_norm(q, leaves[1])
    assert out.stride() == torch.empty_like(q).stride()


class _GridSpy:
    """Wraps a launcher's kernel factory and records the number of programs per launch."""

    def __init__(self, factory: Callable) -> None:
        self.factory, self.programs = factory, []

    def __call__(self, block_c: int):
        kernel, spy = self.factory(block_c), self
        rows = norms_mod._interp_rows(block_c)

        class _Launch:
            def __getitem__(self, grid):
                g = grid({"ROWS": rows, "PROGS": norms_mod._INTERP_PROGS}) if callable(grid) else grid
                spy.programs.append(g[0])
                return kernel[grid]

        return _Launch()


@pytest.mark.skipif(not _common.INTERPRET, reason="program counts of the interpreter's tile sizes")
def test_program_counts(device, monkeypatch):
    """Without per-sample vectors the grid covers all rows at once (the tiny DiT's QK-norm:
    B*N*H = 512 rows of D = 32 -> one program forward and backward, not B*N = 256 groups); with
    them one forward program per sample (rows of one sample share the modulation vectors)."""
    fwd, bwd = _GridSpy(norms_mod._fwd_kernel), _GridSpy(norms_mod._bwd_kernel)
    monkeypatch.setattr(norms_mod, "_fwd_kernel", fwd)
    monkeypatch.setattr(norms_mod, "_bwd_kernel", bwd)
    B, N, H, D = 16, 16, 2, 32
    qkv = rand((B, N, 3 * H * D), F32, device).requires_grad_()
    rms_norm(_q_of(qkv, H), rand((D,), F32, device, mean=1.0)).sum().backward()
    assert (fwd.programs, bwd.programs) == ([1], [1])
    x = rand((B, N, 64), F32, device).requires_grad_()
    sh, sc = rand((B, 64), F32, device), rand((B, 64), F32, device)
    layer_norm(x, shift=sh, scale=sc).sum().backward()
    assert fwd.programs[1] == B and bwd.programs[1] == B


# ----------------------------------------------------------------------------------------
# gated_residual_layer_norm
# ----------------------------------------------------------------------------------------

GATED_CASES = [
    (1152, 3, 9, BF16, "gate,shift,scale"),
    (37, 1, 7, F32, "gate,shift,scale"),
    (72, 3, 5, F16, "shift,scale"),
    (1000, 3, 5, F32, "gate"),
    (72, 1, 3, BF16, ""),
]


def _gated_leaves(C, B, N, dtype, feats, device, param_dtype=None):
    pd = param_dtype or dtype
    f = set(feats.split(","))
    return [
        rand((B, N, C), dtype, device, std=2.0, mean=0.3),
        rand((B, N, C), dtype, device),
        rand((B, C), pd, device) if "gate" in f else None,
        rand((B, C), pd, device, std=0.5) if "shift" in f else None,
        rand((B, C), pd, device, std=0.5) if "scale" in f else None,
    ]


def _gated(fn):
    return lambda x, y, g, sh, sc: fn(x, y, g, shift=sh, scale=sc)


GATED_NAMES = ["x", "y", "gate", "shift", "scale"]


@pytest.mark.parametrize("C,B,N,dtype,feats", GATED_CASES,
                         ids=[f"C{c}-B{b}-N{n}-{str(d)[6:]}-{f or 'plain'}" for c, b, n, d, f in GATED_CASES])
def test_gated_residual_layer_norm(C, B, N, dtype, feats, device):
    leaves = _gated_leaves(C, B, N, dtype, feats, device)
    check_against_refs(_gated(gated_residual_layer_norm), _gated(gated_residual_layer_norm_ref), leaves,
                       GATED_NAMES)


def test_gated_fp32_params_with_bf16_x(device):
    leaves = _gated_leaves(72, 3, 5, BF16, "gate,shift,scale", device, param_dtype=F32)
    check_against_refs(_gated(gated_residual_layer_norm), _gated(gated_residual_layer_norm_ref), leaves,
                       GATED_NAMES)


@pytest.mark.parametrize("used", ["h_only", "x_new_only"])
def test_gated_one_output_used(used, device):
    """Only one of (x_new, h) reaches the loss: the other output's gradient is absent."""
    pick = 1 if used == "h_only" else 0
    leaves = _gated_leaves(72, 3, 5, F32, "gate,shift,scale", device)
    names = GATED_NAMES if used == "h_only" else GATED_NAMES[:3]
    if used == "x_new_only":  # shift/scale get no gradient at all then
        leaves = leaves[:3]

        def kern(x, y, g):
            return gated_residual_layer_norm(x, y, g, shift=None, scale=None)[0]

        def ref(x, y, g):
            return gated_residual_layer_norm_ref(x, y, g)[0]
    else:
        def kern(*ls):
            return _gated(gated_residual_layer_norm)(*ls)[pick]

        def ref(*ls):
            return _gated(gated_residual_layer_norm_ref)(*ls)[pick]
    check_against_refs(kern, ref, leaves, names)


def test_gated_x_new_is_stored_residual(device):
    """x_new is exactly the rounded x + gate*y, and h is the norm of that stored x_new."""
    x, y, g, sh, sc = _gated_leaves(72, 3, 5, BF16, "gate,shift,scale", device)
    x_new, h = gated_residual_layer_norm(x, y, g, shift=sh, scale=sc)
    h2 = layer_norm(x_new, shift=sh, scale=sc)
    torch.testing.assert_close(h, h2, atol=0, rtol=0)


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "no-prefetch"])
@pytest.mark.parametrize("op", ["layer_norm", "gated"])
def test_backward_row_loop(op, prefetch, device, monkeypatch):
    """One backward program per row group looping over several row tiles (the GPU's usual
    regime; the interpreter otherwise gives each program a single tile), with the next
    tile's loads issued before (PREFETCH) or after each tile's work."""
    monkeypatch.setattr(norms_mod, "num_sms", lambda _device: 0)  # -> 1 program per group
    if _common.INTERPRET:  # the interpreter's own config has no prefetch: set it both ways
        base = norms_mod._interp_bwd_config
        monkeypatch.setattr(norms_mod, "_interp_bwd_config", lambda bc: {**base(bc), "PREFETCH": prefetch})
        norms_mod._bwd_kernel.cache_clear()
        request_cleanup = norms_mod._bwd_kernel.cache_clear
    else:
        request_cleanup = None
    if op == "layer_norm":
        leaves = _ln_leaves(37, 2, 1100, F32, "weight,bias,shift,scale", device)
        check_against_refs(_ln(layer_norm), _ln(layer_norm_ref), leaves, LN_NAMES)
    else:
        leaves = _gated_leaves(37, 2, 1100, BF16, "gate,shift,scale", device)
        check_against_refs(_gated(gated_residual_layer_norm), _gated(gated_residual_layer_norm_ref),
                           leaves, GATED_NAMES)
    if request_cleanup is not None:  # the next test builds the kernel with the real config
        monkeypatch.undo()
        request_cleanup()


# ----------------------------------------------------------------------------------------
# Custom-op machinery
# ----------------------------------------------------------------------------------------


def test_compile_fullgraph_aot_eager(device):
    """All three ops inside one torch.compile(fullgraph=True) graph, forward and backward."""
    B, N, C = 2, 5, 72
    x, y = rand((B, N, C), F32, device), rand((B, N, C), F32, device)
    g, sh, sc = (rand((B, C), F32, device) for _ in range(3))
    w = rand((C,), F32, device, mean=1.0)
    leaves = [t.requires_grad_() for t in (x, y, g, sh, sc, w)]

    def block(x, y, g, sh, sc, w):
        x_new, h = gated_residual_layer_norm(x, y, g, shift=sh, scale=sc)
        h = rms_norm(h, w) + layer_norm(x_new, w, None, shift=sc, scale=sh)
        return (h * h).sum() + x_new.sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    eager_loss = block(*leaves)
    eager_grads = torch.autograd.grad(eager_loss, leaves)
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    torch.testing.assert_close(loss, eager_loss)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


def _opcheck(op, args) -> None:
    # test_schema / fake / autograd registration / aot dispatch (static and dynamic)
    result = torch.library.opcheck(op, args)
    bad = {k: v for k, v in result.items() if v != "SUCCESS"}
    assert not bad, bad


def test_opcheck_layer_norm(device):
    x = rand((2, 3, 37), F32, device).requires_grad_()
    w, b = rand((37,), F32, device).requires_grad_(), rand((37,), F32, device).requires_grad_()
    sh, sc = rand((2, 37), F32, device).requires_grad_(), rand((2, 37), F32, device).requires_grad_()
    _opcheck(torch.ops.ditperf.layer_norm.default, (x, w, b, sh, sc, 1e-6))
    _opcheck(torch.ops.ditperf.layer_norm.default, (x, None, None, None, None, 1e-5))
    _opcheck(torch.ops.ditperf.layer_norm_bwd.default, (rand((2, 3, 37), F32, device), x.detach(),
                                                        w.detach(), None, sh.detach(), None, 1e-6))


def test_opcheck_rms_norm(device):
    q = rand((2, 2, 3, 16), F32, device).requires_grad_()
    w = rand((16,), F32, device).requires_grad_()
    _opcheck(torch.ops.ditperf.rms_norm.default, (q, w, None, None, 1e-6))
    x = rand((2, 3, 16), F32, device).requires_grad_()
    sh, sc = rand((2, 16), F32, device).requires_grad_(), rand((2, 16), F32, device).requires_grad_()
    _opcheck(torch.ops.ditperf.rms_norm.default, (x, None, sh, sc, 1e-6))


def test_opcheck_gated(device):
    x, y = rand((2, 3, 24), F32, device).requires_grad_(), rand((2, 3, 24), F32, device).requires_grad_()
    g, sh, sc = (rand((2, 24), F32, device).requires_grad_() for _ in range(3))
    _opcheck(torch.ops.ditperf.gated_residual_layer_norm.default, (x, y, g, sh, sc, 1e-6))
    _opcheck(torch.ops.ditperf.gated_residual_layer_norm.default, (x, y, None, None, None, 1e-6))
    d = rand((2, 3, 24), F32, device)
    _opcheck(torch.ops.ditperf.gated_residual_layer_norm_bwd.default,
             (d, d, x.detach(), y.detach(), g.detach(), None, sc.detach(), 1e-6))


_SM90_COMPILE = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ditperf.kernels import norms as K

def sig(fn, consts, ptr):
    return {n: "constexpr" if n in consts else ptr.get(n, "fp32" if n == "eps" else "i32")
            for n in fn.arg_names}

target = GPUTarget("cuda", 90, 32)
# (IS_RMS, gated, weight+bias, modulated, row LEVELS, BLOCK_C, ROWS, num_warps, dtype)
for rms, gated, wb, mod, lv, bc, rows, warps, dt in [
        (False, True, False, True, 1, 2048, 1, 16, "bf16"), (False, False, True, True, 2, 1024, 2, 8, "fp16"),
        (True, False, True, False, 2, 128, 16, 16, "bf16"), (True, False, True, False, 3, 64, 64, 4, "fp16"),
        (False, False, False, True, 1, 8192, 1, 16, "fp32")]:
    flags = dict(IS_RMS=rms, HAS_RESIDUAL=gated, HAS_GATE=gated, HAS_WEIGHT=wb, HAS_BIAS=wb and not rms,
                 HAS_SHIFT=mod, HAS_SCALE=mod, LEVELS=lv, ALIGN=8, BLOCK_C=bc, ROWS=rows)
    none = {"Y": gated, "XNEW": gated, "GATE": gated, "W": wb, "BIAS": wb and not rms, "SHIFT": mod, "SCALE": mod}
    c = {**flags, **{k: None for k, v in none.items() if not v}}
    ptr = {n: "*" + dt for n in ("X", "Y", "GATE", "W", "BIAS", "SHIFT", "SCALE", "OUT", "XNEW")}
    triton.compile(ASTSource(K._norm_fwd_kernel, sig(K._norm_fwd_kernel, c, ptr), c), target=target,
                   options={"num_warps": warps})
    none = {"DXN": gated, "Y": gated, "DY": gated, "GATE": gated, "W": wb, "BIAS": wb and not rms,
            "SCALE": mod, "PART_W": wb, "PART_B": wb and not rms, "PART_SHIFT": mod, "PART_SCALE": mod,
            "PART_GATE": gated}
    c = {**flags, "HAS_DXN": gated, "STATIC_ITERS": 0, "PROGS": 4, "PREFETCH": True, "MIN_ROWS": 1,
         **{k: None for k, v in none.items() if not v}}
    ptr = {n: ("*fp32" if n.startswith("PART") else "*" + dt) for n in ("X", "DH", "DXN", "Y", "GATE", "W",
           "BIAS", "SCALE", "DX", "DY", "PART_W", "PART_B", "PART_SHIFT", "PART_SCALE", "PART_GATE")}
    triton.compile(ASTSource(K._norm_bwd_kernel, sig(K._norm_bwd_kernel, c, ptr), c), target=target,
                   options={"num_warps": warps})
print("compiled")
"""


def test_kernels_compile_for_sm90():
    """The interpreter never runs Triton's GPU compiler: compile representative fwd/bwd
    specializations to sm_90 machine code (no GPU needed) so type/layout errors show here."""
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the GPU tests compile and run the kernels for real")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"this triton cannot compile ahead of time: {exc}")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", _SM90_COMPILE], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


# ----------------------------------------------------------------------------------------
# Bad input: a ValueError/TypeError naming the argument, never a crash or garbage
# ----------------------------------------------------------------------------------------


def _bad_cases(dev: torch.device) -> list[tuple[str, Callable[[], object], type, str]]:
    x = rand((2, 3, 8), F32, dev)
    x16 = x.to(F16)
    v = rand((2, 8), F32, dev)
    w = rand((8,), F32, dev)
    return [
        ("int x", lambda: layer_norm(x.to(torch.int32)), TypeError, "x has dtype int32"),
        ("fp64 x", lambda: layer_norm(x.double()), TypeError, "x has dtype float64"),
        ("not a tensor", lambda: layer_norm([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
        ("shift not a tensor", lambda: layer_norm(x, shift=1.0), TypeError, "shift must be a torch.Tensor"),
        ("y None", lambda: gated_residual_layer_norm(x, None, None), TypeError, "y must be a torch.Tensor"),
        ("bf16 weight, f16 x", lambda: layer_norm(x16, w.to(BF16)), TypeError, "weight has dtype bfloat16"),
        ("f16 shift, f32 x", lambda: layer_norm(x, shift=v.half()), TypeError, "shift has dtype float16"),
        ("y dtype", lambda: gated_residual_layer_norm(x, x16, None), TypeError, "y has dtype float16"),
        ("weight shape", lambda: layer_norm(x, rand((7,), F32, dev)), ValueError, r"weight has shape \(7,\); expected \(8\)"),
        ("bias shape", lambda: layer_norm(x, w, rand((2, 8), F32, dev)), ValueError, "bias has shape"),
        ("shift batch", lambda: layer_norm(x, shift=rand((3, 8), F32, dev)), ValueError, r"shift has shape \(3, 8\); expected \(2, 8\)"),
        ("scale C", lambda: rms_norm(x, scale=rand((2, 9), F32, dev)), ValueError, r"scale has shape \(2, 9\)"),
        ("scale (B,1,C)", lambda: layer_norm(x, scale=v[:, None]), ValueError, r"expected \(2, 8\)"),
        ("gate shape", lambda: gated_residual_layer_norm(x, x, v[:1]), ValueError, "gate has shape"),
        ("y shape", lambda: gated_residual_layer_norm(x, x[:, :2], None), ValueError, "y has shape"),
        ("shift with 2-D x", lambda: layer_norm(x[0], shift=v), ValueError, r"expected \(B, N, C\)"),
        ("shift with 4-D x", lambda: rms_norm(x[None], shift=v), ValueError, r"expected \(B, N, C\)"),
        ("x last dim strided", lambda: layer_norm(x.transpose(1, 2)), ValueError, "x must have a contiguous last dimension"),
        ("shift last dim strided", lambda: layer_norm(x, shift=rand((8, 2), F32, dev).t()), ValueError, "shift must have a contiguous last dimension"),
        ("C = 0", lambda: layer_norm(x[..., :0]), ValueError, "empty"),
        ("N = 0", lambda: layer_norm(x[:, :0]), ValueError, "empty"),
        ("scalar x", lambda: rms_norm(x[0, 0, 0]), ValueError, "scalar"),
        ("C too large", lambda: layer_norm(torch.empty((1, norms_mod.MAX_C + 1), device=dev)), ValueError, "C <= 16384"),
        ("negative eps", lambda: layer_norm(x, eps=-1.0), ValueError, "eps"),
        ("eps type", lambda: layer_norm(x, eps="1e-6"), TypeError, "eps must be a float"),
        ("eps bool", lambda: layer_norm(x, eps=True), TypeError, "eps must be a float, got bool"),
        ("eps nan", lambda: rms_norm(x, eps=float("nan")), ValueError, "finite number >= 0, got nan"),
        ("eps inf", lambda: layer_norm(x, eps=math.inf), ValueError, "finite number >= 0, got inf"),
        # one device for every tensor (checked on the CPU too: meta stands in for a second device)
        ("shift on another device", lambda: layer_norm(x, shift=v.to("meta")), ValueError,
         "one device, got x on [a-z:0-9]+, shift on meta"),
        ("scale on another device", lambda: layer_norm(x, w, scale=v.to("meta")), ValueError,
         r"one device, got x on (\S+), weight on \1, scale on meta"),
        ("rms shift on another device", lambda: rms_norm(x, shift=v.to("meta")), ValueError,
         "shift on meta"),
        ("gate on another device", lambda: gated_residual_layer_norm(x, x, v.to("meta")), ValueError,
         "gate on meta"),
        ("y on another device", lambda: gated_residual_layer_norm(x, x.to("meta"), v), ValueError,
         "y on meta"),
    ]


_BAD_IDS = [c[0] for c in _bad_cases(torch.device("cpu"))]


@pytest.mark.parametrize("idx", range(len(_BAD_IDS)), ids=_BAD_IDS)
def test_bad_input(idx, device):
    _name, call, exc, match = _bad_cases(device)[idx]
    with pytest.raises(exc, match=match):
        call()


def test_cpu_tensor_without_interpreter(monkeypatch):
    """CPU tensors are refused (with how to fix it) when the kernels are not interpreted."""
    monkeypatch.setattr(_common, "INTERPRET", False)
    with pytest.raises(ValueError, match="x is a CPU tensor"):
        layer_norm(torch.randn(2, 3, 8))


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # interpreter: padding rows, eps = 0
def test_eps_zero_and_int_accepted(device):
    """eps is a number >= 0: eps = 0 (rows with nonzero variance) and an int eps are valid."""
    x, sh = rand((2, 3, 40), F32, device), rand((2, 40), F32, device)
    torch.testing.assert_close(layer_norm(x, shift=sh, eps=0), layer_norm_ref(x, shift=sh, eps=0.0))
    torch.testing.assert_close(rms_norm(x, eps=0.0), rms_norm_ref(x, eps=0.0))
    torch.testing.assert_close(layer_norm(x, eps=1), layer_norm_ref(x, eps=1.0))


def test_limits_of_C_and_row_count():
    """C = MAX_C is valid (MAX_C + 1 is refused: test_bad_input); more rows than the kernels'
    int32 row index (an expanded view: no memory) is a ValueError, not wrapped indices."""
    norms_mod._check_args("layer_norm", torch.empty(1, norms_mod.MAX_C))
    norms_mod._check_args("layer_norm", torch.empty(2, 3, norms_mod.MAX_C),
                          per_sample=(("shift", torch.empty(2, norms_mod.MAX_C)),))
    limit = norms_mod._MAX_ROWS
    assert norms_mod._row_groups(torch.empty(1, 8).expand(limit, 8), False) == (1, limit)
    assert norms_mod._row_groups(torch.empty(3, 5, 8), True) == (3, 5)
    with pytest.raises(ValueError, match=f"x has {limit + 1} rows.*int32.*at most {limit}"):
        norms_mod._row_groups(torch.empty(1, 1, 8).expand(2, (limit + 1) // 2, 8), False)


def test_align_hint_and_device_guard():
    """ALIGN: the largest power of two (<= cap) dividing every nonzero value; the norms' ALIGN
    divides C as well as the row strides (C = 36 rows sliced from a width-64 tensor: 4, not 16).
    device_guard makes a CUDA tensor's device current (built here without entering it)."""
    align_hint = _common.align_hint
    assert align_hint(72, cap=16) == 8 and align_hint(72, 144, 36, cap=16) == 4
    assert align_hint(6, cap=16) == 2 and align_hint(1024, 4096, cap=8) == 8
    assert align_hint(0, 48, 0, cap=16) == 16 and align_hint(0, 0, cap=8) == 8 and align_hint(cap=4) == 4
    assert norms_mod._align_of(36, [(5 * 64, 64, 0)]) == 4
    assert norms_mod._align_of(72, [(3 * 216, 216, 72)]) == 8
    guard = _common.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(_common.device_guard(torch.device("cpu")), contextlib.nullcontext)


def test_gated_y_with_another_layout(device):
    """y with its own row strides (a slice of a longer sequence: the (B, N) rows of y do not
    merge while x's do) and a 5-D permuted x, y (> 3 row levels: the contiguous-copy fallback,
    which must also return x_new)."""
    B, N, C = 2, 5, 40
    leaves = [rand((B, N, C), F32, device), rand((B, 2 * N, C), F32, device),
              rand((B, C), F32, device), rand((B, C), F32, device), rand((B, C), F32, device)]

    def call(fn):
        return lambda x, yb, g, sh, sc: fn(x, yb[:, :N], g, shift=sh, scale=sc)

    check_against_refs(call(gated_residual_layer_norm), call(gated_residual_layer_norm_ref), leaves,
                       ["x", "y_base", "gate", "shift", "scale"])
    perm = lambda t: t.permute(1, 0, 3, 2, 4)
    leaves = [rand((2, 3, 2, 3, 24), F32, device), rand((2, 3, 2, 3, 24), F32, device)]
    assert norms_mod._row_layout([perm(leaves[0])]) is None
    check_against_refs(lambda x, y: gated_residual_layer_norm(perm(x), perm(y), None),
                       lambda x, y: gated_residual_layer_norm_ref(perm(x), perm(y), None), leaves, ["x", "y"])


def test_broadcast_modulation_vectors(device):
    """shift/scale/gate broadcast over the batch ((1, C) expanded to (B, C): row stride 0) are
    read in place, and their gradients sum over the batch."""
    B, N, C = 3, 4, 40

    def expand(fn):
        return lambda *a: fn(*a[:-3], *(t if t is None else t.expand(B, C) for t in a[-3:]))

    leaves = _ln_leaves(C, B, N, F32, "weight,shift,scale", device)
    leaves[3:] = [rand((1, C), F32, device), rand((1, C), F32, device)]
    check_against_refs(expand(_ln(layer_norm)), expand(_ln(layer_norm_ref)), leaves, LN_NAMES)
    leaves = _gated_leaves(C, B, N, F32, "", device)[:2] + [rand((1, C), F32, device) for _ in range(3)]
    check_against_refs(expand(_gated(gated_residual_layer_norm)), expand(_gated(gated_residual_layer_norm_ref)),
                       leaves, GATED_NAMES)


# ----------------------------------------------------------------------------------------
# GPU: big shapes, CUDA graphs, inductor (run by the lead on the H100)
# ----------------------------------------------------------------------------------------


@pytest.mark.gpu
class TestGPU:
    def test_mixed_devices_refused(self):
        x = torch.randn(2, 3, 8, device="cuda")
        with pytest.raises(ValueError, match="one device"):
            layer_norm(x, shift=torch.randn(2, 8))

    def test_large_C_8192_bf16(self):
        leaves = _ln_leaves(8192, 2, 513, BF16, "weight,bias,shift,scale", torch.device("cuda"))
        check_against_refs(_ln(layer_norm), _ln(layer_norm_ref), leaves, LN_NAMES)

    def test_64k_tokens_gated_bf16(self):
        leaves = _gated_leaves(1152, 64, 1024, BF16, "gate,shift,scale", torch.device("cuda"))
        check_against_refs(_gated(gated_residual_layer_norm), _gated(gated_residual_layer_norm_ref),
                           leaves, GATED_NAMES)

    def test_64k_tokens_layer_norm_fp32_params(self):
        leaves = _ln_leaves(2048, 16, 4097, BF16, "shift,scale", torch.device("cuda"), param_dtype=F32)
        check_against_refs(_ln(layer_norm), _ln(layer_norm_ref), leaves, LN_NAMES)

    def test_qk_norm_bf16(self):
        dev = torch.device("cuda")
        leaves = [rand((4, 4096, 16, 128), BF16, dev, std=2.0), rand((128,), BF16, dev, mean=1.0)]
        check_against_refs(lambda x, w: rms_norm(x.transpose(1, 2), w),
                           lambda x, w: rms_norm_ref(x.transpose(1, 2), w), leaves, ["x", "weight"])

    def test_cuda_graph_capture(self):
        """Forward + backward replay inside a CUDA graph: no host syncs in the launchers."""
        dev = torch.device("cuda")
        x, y, g, sh, sc = (t.requires_grad_() for t in _gated_leaves(1152, 4, 256, BF16, "gate,shift,scale", dev))
        leaves = [x, y, g, sh, sc]

        def step():
            x_new, h = gated_residual_layer_norm(x, y, g, shift=sh, scale=sc)
            h2 = layer_norm(x_new, shift=sc, scale=sh)
            loss = (h.float() * h2.float()).sum()
            return [loss, *torch.autograd.grad(loss, leaves)]

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # autotune + warm-up outside the capture
                expected = step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(captured, expected):
            torch.testing.assert_close(a, b)

    def test_compile_inductor(self):
        dev = torch.device("cuda")
        leaves = [t.requires_grad_() for t in _gated_leaves(1152, 2, 64, BF16, "gate,shift,scale", dev)]

        def fn(x, y, g, sh, sc):
            x_new, h = gated_residual_layer_norm(x, y, g, shift=sh, scale=sc)
            return (rms_norm(h).float() * x_new.float()).sum()  # fp32 math: same in both

        compiled = torch.compile(fn, fullgraph=True)
        eager = fn(*leaves)
        got = compiled(*leaves)
        torch.testing.assert_close(got, eager, rtol=1e-3, atol=1e-2)
        for a, b in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(eager, leaves)):
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------------------
# Eager fast path (autograd.Function) vs the torch.library custom ops
# ----------------------------------------------------------------------------------------


def _outs_and_grads(fn: Callable, leaves: list[torch.Tensor | None]) -> list[torch.Tensor]:
    ins = [None if t is None else t.detach().clone().requires_grad_() for t in leaves]
    outs = fn(*ins)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    probes = [torch.randn_like(o) for o in outs]
    sum(((o.float() * p.float()).sum() for o, p in zip(outs, probes)), torch.zeros(())).backward()
    return [type(outs[0].grad_fn).__name__, *(o.detach() for o in outs), *(t.grad for t in ins if t is not None)]


@pytest.mark.parametrize("op", ["layer_norm", "rms_norm", "gated", "gated-x_new-only"])
def test_fast_path_equals_custom_op(op, device, monkeypatch):
    """Plain eager calls skip the dispatcher (kernels._common.eager_fast_path); with
    DITPERF_EAGER_FASTPATH=0 they go through the custom ops. Same kernels: bit-identical
    outputs and gradients, also when only x_new of the gated op is used (h's grad is None)."""
    B, N, C = 2, 5, 40
    if op == "layer_norm":
        leaves, fn = _ln_leaves(C, B, N, F32, "weight,bias,shift,scale", device), _ln(layer_norm)
    elif op == "rms_norm":
        leaves = [rand((B, N, C), BF16, device), rand((C,), F32, device, mean=1.0),
                  rand((B, C), F32, device), rand((B, C), F32, device)]
        fn = lambda x, w, sh, sc: rms_norm(x, w, shift=sh, scale=sc)
    else:
        leaves, fn = _gated_leaves(C, B, N, BF16, "gate,shift,scale", device), _gated(gated_residual_layer_norm)
        if op == "gated-x_new-only":
            inner = fn
            fn = lambda *a: inner(*a)[0]
    torch.manual_seed(0)
    fast = _outs_and_grads(fn, leaves)
    monkeypatch.setenv("DITPERF_EAGER_FASTPATH", "0")
    torch.manual_seed(0)
    slow = _outs_and_grads(fn, leaves)
    (fast_fn, *fast), (slow_fn, *slow) = fast, slow
    assert fast_fn.startswith("_") and "Fn" in fast_fn and "Fn" not in slow_fn, (fast_fn, slow_fn)
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


def test_alignment_hint_path(device, monkeypatch):
    """The GPU launches pass ALIGN > 1 (strides and C declared multiples of it, for 16-byte
    loads); the interpreter gets ALIGN = 1. Run the ALIGN > 1 index arithmetic here too: QK-norm
    of q sliced from a fused qkv (D = 72: ALIGN 8) and a modulated LayerNorm (C = 40)."""
    def gpu_align(C, strides):  # what _align returns on a GPU
        a = norms_mod._align_of(C, strides)
        return a, [tuple(s // a for s in st) for st in strides]

    monkeypatch.setattr(norms_mod, "_align", gpu_align)
    B, N, H, D = 2, 7, 3, 72
    leaves = _qkv_q(B, N, H, D, BF16, device)
    assert norms_mod._align_of(D, [_q_of(leaves[0], H).stride()[:3]]) == 8
    check_against_refs(lambda qkv, w: rms_norm(_q_of(qkv, H), w),
                       lambda qkv, w: rms_norm_ref(_q_of(qkv, H), w), leaves, ["qkv", "weight"])
    leaves = _ln_leaves(40, 2, 9, F32, "shift,scale", device)
    check_against_refs(_ln(layer_norm), _ln(layer_norm_ref), leaves, LN_NAMES)
