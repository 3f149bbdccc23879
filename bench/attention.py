"""Benchmark ditperf's fused attention against PyTorch SDPA's backends on DiT shapes.

    python bench/attention.py                   # GPU: all shapes and providers
    python bench/attention.py --quick           # GPU: 3 shapes (the time-boxed suite uses this)
    python bench/attention.py --smoke           # CPU interpreter: tiny shapes, correctness only
    python bench/attention.py --compile-check   # no GPU needed: compile every curated config
                                                # for sm_90, report smem/registers/spills/HGMMA
    python bench/attention.py --out attention.json [--autotune curated|full|off]

In-process use (bench/run.py): ``run(smoke, quick) -> list[Row]``. ditperf rows carry
``extra["correct"]`` (False makes ``main`` exit 1), ``extra["vs_best_sdpa"]``,
``extra["best_sdpa"]``, ``extra["vs_cudnn"]`` and ``extra["target_met"]``.

Shapes (B, H, Nq, Nk, D), bf16, SDPA layout, random normal inputs: self-attention
(8,16,1024,1024,72), (4,16,4096,4096,72), (4,16,4096,4096,128), (2,24,4096,4096,64),
(1,16,16384,16384,128); cross-attention image->text (4,16,4096,120,72), and the same with a
key mask (padded captions: each sample keeps 60-120 of its 120 text tokens). --quick:
(4,16,4096,4096,72), (4,16,4096,4096,128), (4,16,4096,120,72) unmasked and masked.
Modes: fwd (no autograd), bwd (autograd.grad on a retained graph), fwd+bwd.
Providers: ditperf (its defaults: D=72 as one padded 128 tile on a GPU, 64+16 under the
interpreter); ditperf-padded (forced padded; full run only, where it differs); ditperf-split32
(D=72 as 64+32 = 96 columns, only with DITPERF_ATTN_SPLIT32_OK=1, which the suite's
diag-split32 part sets when those kernels pass its repeated-launch check); sdpa-flash / sdpa-efficient / sdpa-cudnn (``torch.nn.attention.sdpa_kernel`` with one
backend each; a backend that refuses a shape is recorded with ``extra["skipped"]`` and the
reason); compiled-math (torch.compile of the explicit softmax(QK^T)V, only where the N x N
score matrix is small: B*H*Nq*Nk <= 2**28, full run only). Baseline column: sdpa-flash.

FLOPs: fwd 4*B*H*Nq*Nk*D (two matmuls), bwd 2.5x that (five matmuls), fwd+bwd 3.5x; % roof
against the measured bf16 matmul rate (bench/roofs.py). Bytes (each tensor once, e = 2):
fwd e*B*H*D*(2*Nq + 2*Nk) + 4*B*H*Nq (q, o; k, v; lse), bwd e*B*H*D*(4*Nq + 4*Nk) +
8*B*H*Nq; the cross-attention shapes (Nk = 120) are closer to the copy roof than the matmul
one, so their % roof is reported against whichever is closer.

Floors (METHOD.md's two numbers, with the workplace's measured H100 roofs ~790 TFLOP/s bf16
matmul and ~3.0 TB/s copy): (4,16,4096,4096,128) fwd 137 GFLOP -> 0.174 ms vs 268 MB ->
0.09 ms: compute-bound, floor 0.17 ms; (4,16,4096,4096,72) fwd 77 GFLOP -> 0.098 ms (the
split tiles do 80/72 of that); cross (4,16,4096,120,72) fwd 9 GFLOP -> 0.011 ms vs 79 MB ->
0.026 ms: memory-bound, floor 26 us.

Targets on H100 (issue 3, bf16): fwd >= 600 TFLOP/s at D=128 and >= 1.0x cuDNN; bwd >= 0.9x
cuDNN; at D=72 >= 1.2x the best SDPA backend.

Prediction, written before any GPU run (H100 SXM, triton 3.6, N=4096 unless noted):
  D=128 fwd ~430 TFLOP/s (N=16384: ~450), ~0.65-0.75x cuDNN (~600-650), ~1.15x flash (~370):
        misses the 600 target; this kernel is plain pointer-based Triton (cp.async loads, wgmma
        via HGMMA, no TMA, no warp specialization / ping-pong, no FA3-style overlap of
        softmax and matmuls), which is where FA3/cuDNN get their last 30-40%.
  D=128 bwd ~250-280 TFLOP/s, ~0.55-0.65x cuDNN (~450): misses 0.9x. Two kernels
        (dQ, then dK/dV) recompute P twice; no atomics (deterministic).
  D=72  fwd ~300-340 TFLOP/s counted at D=72 (split 64+16 = 80 columns of matmul work);
        flash runs its D=96 kernel (~250 counted at 72), cuDNN unknown at D=72 (~300?):
        ~1.0-1.3x best SDPA (1.2x target: a coin flip; it hinges on cuDNN at D=72).
        ditperf-padded (128 columns) ~20-30% slower than the split.
  D=72  bwd ~170-200 TFLOP/s, ~0.8-1.0x best SDPA.
  D=64  fwd ~330 TFLOP/s (exp-bound at small D), ~0.75x cuDNN.
  cross (Nk=120) ~40-60 us fwd, memory-bound (~1.5-2 TB/s), within 0.8-1.2x of SDPA.

Measured (H100 80GB HBM3, triton 3.6, torch 2.11, 2026-11-27, bench/results/*-0a3e5e2): D=128
fwd 506 TFLOP/s (1.47x flash, 0.74x cuDNN 679), bwd 412 (0.81x cuDNN); D=72 (padded to 128:
the split path faults on triton 3.6 / sm_90) fwd 275 (1.18x flash, 0.71x cuDNN 387), bwd 245
(1.32x flash, 0.82x cuDNN); cross fwd 96 us (0.89x flash, cuDNN 57 us). Targets: not met.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (
    Row,
    base_parser,
    finish,
    report_correctness,
    roofs_or_none,
    setup_interpreter_if_needed,
)

BENCH = "attention"
BASELINE = "sdpa-flash"
SDPA_BACKENDS = ("flash", "efficient", "cudnn")
MODES = ("fwd", "bwd", "fwd+bwd")
MODE_FLOPS = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
TARGET_FWD_TFLOPS_D128 = 600.0


@dataclass(frozen=True)
class Shape:
    b: int
    h: int
    nq: int
    nk: int
    d: int
    mask: bool = False

    @property
    def case(self) -> str:
        return "cross+mask" if self.mask else ("cross" if self.nk != self.nq else "self")

    @property
    def label(self) -> str:
        n = f"N{self.nq}" if self.nq == self.nk else f"Nq{self.nq} Nk{self.nk}"
        return f"B{self.b} H{self.h} {n} D{self.d}"

    def flops(self, mode: str) -> float:
        return MODE_FLOPS[mode] * 4 * self.b * self.h * self.nq * self.nk * self.d

    def bytes(self, mode: str, elem: int) -> int:
        bh = self.b * self.h
        fwd = elem * bh * self.d * (2 * self.nq + 2 * self.nk) + 4 * bh * self.nq
        bwd = elem * bh * self.d * (4 * self.nq + 4 * self.nk) + 8 * bh * self.nq
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


FULL_SHAPES = [
    Shape(8, 16, 1024, 1024, 72), Shape(4, 16, 4096, 4096, 72), Shape(4, 16, 4096, 4096, 128),
    Shape(2, 24, 4096, 4096, 64), Shape(1, 16, 16384, 16384, 128), Shape(4, 16, 4096, 120, 72),
    Shape(4, 16, 4096, 120, 72, mask=True),
]
QUICK_SHAPES = [Shape(4, 16, 4096, 4096, 72), Shape(4, 16, 4096, 4096, 128),
                Shape(4, 16, 4096, 120, 72), Shape(4, 16, 4096, 120, 72, mask=True)]
SMOKE_SHAPES = [Shape(1, 2, 40, 40, 72), Shape(2, 1, 33, 9, 32, mask=True)]


# ----------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------


def _attn_module() -> Any:
    return importlib.import_module("ditperf.kernels.attention")


@contextlib.contextmanager
def _split_head_dim(enabled: bool, split_min: int | None = None) -> Iterator[None]:
    mod = _attn_module()
    old = mod.SPLIT_HEAD_DIM, mod.SPLIT_MIN
    mod.SPLIT_HEAD_DIM = enabled
    if split_min is not None:
        mod.SPLIT_MIN = split_min
    try:
        yield
    finally:
        mod.SPLIT_HEAD_DIM, mod.SPLIT_MIN = old


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(QK^T * D^-0.5 + mask) V, materializing the scores (what torch.compile sees)."""
    s = torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.matmul(torch.softmax(s.float(), dim=-1).to(q.dtype), v)


def providers(shape: Shape, smoke: bool, quick: bool) -> dict[str, Callable[..., torch.Tensor]]:
    """name -> fn(q, k, v, mask) for this shape."""
    import torch.nn.functional as F
    from ditperf.kernels import attention

    def ditperf(q, k, v, mask):
        return attention(q, k, v, key_mask=mask)

    def ditperf_padded(q, k, v, mask):
        with _split_head_dim(False):
            return attention(q, k, v, key_mask=mask)

    def ditperf_split32(q, k, v, mask):
        with _split_head_dim(True, split_min=32):
            return attention(q, k, v, key_mask=mask)

    def sdpa(backend: Any) -> Callable[..., torch.Tensor]:
        from torch.nn.attention import sdpa_kernel

        def fn(q, k, v, mask):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(
                    q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
        return fn

    out: dict[str, Callable[..., torch.Tensor]] = {"ditperf": ditperf}
    if smoke:  # CPU: the default SDPA dispatch (math / CPU flash) as the torch provider
        out["sdpa"] = lambda q, k, v, mask: F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])
        return out
    tiles = _attn_module().head_dim_tiles
    if not quick and tiles(shape.d, True) != tiles(shape.d, False):
        out["ditperf-padded"] = ditperf_padded
    # the 64+32 split of D=72 (96 columns instead of 128), only where bench/diag_attention.py
    # found it safe on this GPU (run with DITPERF_ATTN_SPLIT_MIN=32: the suite's diag-split32)
    if os.environ.get("DITPERF_ATTN_SPLIT32_OK") == "1":
        with _split_head_dim(True, split_min=32):
            split32 = tiles(shape.d, True)
        if split32 != tiles(shape.d, False):
            out["ditperf-split32"] = ditperf_split32
    from torch.nn.attention import SDPBackend

    for name in SDPA_BACKENDS:
        backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                   "cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None)}[name]
        if backend is not None:
            out[f"sdpa-{name}"] = sdpa(backend)
    if not quick and shape.b * shape.h * shape.nq * shape.nk <= 2**28:
        out["compiled-math"] = torch.compile(_math_attention, dynamic=False)
    return out


# ----------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0
                ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """q, k, v leaves (requires_grad), grad_out, key mask (each sample keeps Nk/2..Nk keys)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def r(n: int) -> torch.Tensor:
        x = torch.randn(shape.b, shape.h, n, shape.d, device=device, generator=gen)
        return x.to(dtype).requires_grad_()

    leaves = [r(shape.nq), r(shape.nk), r(shape.nk)]
    g = torch.randn(shape.b, shape.h, shape.nq, shape.d, device=device, generator=gen).to(dtype)
    mask = None
    if shape.mask:
        keep = torch.randint(shape.nk // 2, shape.nk + 1, (shape.b,), device=device, generator=gen)
        mask = torch.arange(shape.nk, device=device)[None, :] < keep[:, None]
    return leaves, g, mask


def check(fn: Callable[..., torch.Tensor], others: dict[str, Callable[..., torch.Tensor]],
          leaves: list[torch.Tensor], g: torch.Tensor, mask: torch.Tensor | None) -> dict[str, Any]:
    """ditperf's output and gradients against a high-precision reference (fp64 on CPU, fp32
    through SDPA on GPU): correct when max|ditperf-ref| <= 2*max|torch-ref| + atol*max|ref|
    for every tensor, torch = the most accurate SDPA backend at the same precision, atol =
    2**-8 on GPU, 2**-6 under the interpreter (its fp32->bf16 casts round toward zero)."""
    ref_dtype = torch.float32 if leaves[0].is_cuda else torch.float64
    atol = 2.0**-8 if leaves[0].is_cuda else 2.0**-6

    def run(f: Callable[..., torch.Tensor], dtype: torch.dtype | None) -> list[torch.Tensor]:
        ls = [t.detach().to(dtype or t.dtype).requires_grad_() for t in leaves]
        out = f(*ls, mask)
        return [out.detach(), *torch.autograd.grad(out, ls, g.to(out.dtype))]

    import torch.nn.functional as F

    def reference(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v,
                                              attn_mask=None if m is None else m[:, None, None, :])

    ref = run(reference, ref_dtype)
    got = run(fn, None)
    torch_errs: list[float] = []
    for other in others.values():
        try:
            res = run(other, None)
        except Exception:  # noqa: BLE001, S112 - a refusing backend has no error to compare
            continue
        torch_errs.append(max((a.to(ref_dtype) - b).abs().max().item() for a, b in zip(res, ref)))
        if len(torch_errs) >= 2:
            break
    base = min(torch_errs) if torch_errs else float("nan")
    ok, worst = True, 0.0
    for a, b in zip(got, ref):
        err = (a.to(ref_dtype) - b).abs().max().item()
        worst = max(worst, err)
        bound = 2 * (base if torch_errs else 0.0) + atol * max(1.0, b.abs().max().item())
        ok &= bool(err <= bound)
    return {"correct": ok, "max_err": worst, "torch_max_err": base}


def _timers(fn: Callable[..., torch.Tensor], leaves: list[torch.Tensor], g: torch.Tensor,
            mask: torch.Tensor | None) -> dict[str, Callable[[], object]]:
    """fwd (no autograd), bwd (grad on a retained graph), fwd+bwd. Builds the graph once:
    autotuning / compilation happen here, outside the timed region."""
    out = fn(*leaves, mask)

    def fwd() -> object:
        with torch.no_grad():
            return fn(*leaves, mask)

    def bwd() -> object:
        return torch.autograd.grad(out, leaves, g, retain_graph=True)

    def fwd_bwd() -> object:
        return torch.autograd.grad(fn(*leaves, mask), leaves, g)

    fwd()  # first calls outside the timed region (torch.compile builds its backward here)
    bwd()
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}


def _error_text(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:300]


def run(smoke: bool = False, quick: bool = False, *, budget_s: float | None = None) -> list[Row]:
    """Measure every (shape, provider, mode); return benchlib rows (see the module doc)."""
    from ditperf.profiling import time_ms

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    shapes = SMOKE_SHAPES if smoke else (QUICK_SHAPES if quick else FULL_SHAPES)
    warm, rep = (10, 40) if quick else (25, 100)
    start = time.perf_counter()
    rows: list[Row] = []
    try:
        from tqdm import tqdm

        progress = tqdm(shapes, desc="attention shapes", unit="shape", file=sys.stderr,
                        disable=smoke)
    except ImportError:
        progress = shapes
    for shape in progress:
        leaves, g, mask = make_inputs(shape, dtype, device)
        provs = providers(shape, smoke, quick)
        others = {n: f for n, f in provs.items() if n.startswith("sdpa")}
        t_check = time.perf_counter()
        # the check makes ditperf's first calls (autotuning happens there)
        verdict = check(provs["ditperf"], others, leaves, g, mask)
        verdict["check_s"] = round(time.perf_counter() - t_check, 2)
        for name, fn in provs.items():
            over = budget_s is not None and time.perf_counter() - start > budget_s
            timers: dict[str, Callable[[], object]] = {}
            reason = f"time budget of {budget_s:.0f} s spent" if over else None
            if not over:
                try:
                    timers = _timers(fn, leaves, g, mask)
                except Exception as exc:  # noqa: BLE001 - a refusing backend is recorded, not fatal
                    reason = _error_text(exc)
            for mode in MODES:
                extra: dict[str, Any] = {"mode": mode, "dtype": "bf16", "mask": shape.mask,
                                         "flops": shape.flops(mode), "bytes": shape.bytes(mode, 2)}
                if name == "ditperf":
                    extra.update(verdict)
                ms = None
                if reason is not None:
                    extra["skipped"] = reason
                else:
                    try:
                        ms = time_ms(timers[mode], warmup_ms=warm, rep_ms=rep)
                    except Exception as exc:  # noqa: BLE001
                        extra["skipped"] = _error_text(exc)
                tflops = gbps = None
                if ms is not None and not smoke:
                    tflops = shape.flops(mode) / (ms * 1e-3) / 1e12
                    gbps = shape.bytes(mode, 2) / (ms * 1e-3) / 1e9
                rows.append(Row(BENCH, f"{shape.case} {mode}", shape.label, name, ms=ms,
                                tflops=tflops, gbps=gbps, extra=extra))
        del leaves, g, mask
        if device.type == "cuda":
            torch.cuda.empty_cache()
    add_sdpa_ratios(rows)
    return rows


def add_sdpa_ratios(rows: list[Row]) -> None:
    """extra for non-SDPA rows: vs_best_sdpa (best SDPA ms / ms), best_sdpa, vs_cudnn."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.case, r.shape), []).append(r)
    for group in groups.values():
        sdpa = [r for r in group if r.provider.startswith("sdpa") and r.ms]
        best = min(sdpa, key=lambda r: r.ms, default=None)
        cudnn = next((r for r in sdpa if r.provider == "sdpa-cudnn"), None)
        for r in group:
            if not r.ms or r.provider.startswith("sdpa"):
                continue
            if best is not None:
                r.extra["vs_best_sdpa"] = best.ms / r.ms
                r.extra["best_sdpa"] = best.provider
            if cudnn is not None:
                r.extra["vs_cudnn"] = cudnn.ms / r.ms


def report_targets(rows: list[Row]) -> list[str]:
    """One line per ditperf GPU row that an issue-3 target applies to."""
    lines = []
    for r in rows:
        if r.provider != "ditperf" or r.tflops is None:
            continue
        mode, d = r.extra["mode"], int(r.shape.rsplit("D", 1)[1])
        checks = []
        if d == 128 and mode == "fwd" and r.case.startswith("self"):
            checks.append((r.tflops >= TARGET_FWD_TFLOPS_D128, f"{r.tflops:.0f} TFLOP/s (>= 600)"))
            if "vs_cudnn" in r.extra:
                x = r.extra["vs_cudnn"]
                checks.append((x >= 1.0, f"{x:.2f}x cuDNN (>= 1.0)"))
        if d == 128 and mode == "bwd" and r.case.startswith("self") and "vs_cudnn" in r.extra:
            x = r.extra["vs_cudnn"]
            checks.append((x >= 0.9, f"{x:.2f}x cuDNN (>= 0.9)"))
        if d == 72 and "vs_best_sdpa" in r.extra:
            checks.append((r.extra["vs_best_sdpa"] >= 1.2,
                           f"{r.extra['vs_best_sdpa']:.2f}x {r.extra['best_sdpa']} (>= 1.2)"))
        if not checks:
            continue
        r.extra["target_met"] = all(ok for ok, _ in checks)
        lines.append(f"{'MET ' if r.extra['target_met'] else 'MISS'} {r.case:<14} {r.shape:<24} "
                     + "; ".join(text for _, text in checks))
    return lines


# ----------------------------------------------------------------------------------------
# Compile check (no GPU needed)
# ----------------------------------------------------------------------------------------


_POINTERS = {"Q": "bf16", "K": "bf16", "V": "bf16", "KM": "u8", "Out": "bf16", "DO": "bf16",
             "DQ": "bf16", "DK": "bf16", "DV": "bf16",
             "Lse": "fp32", "GLse": "fp32", "Delta": "fp32"}


def _signature(body: Any, const: dict[str, Any]) -> tuple[dict[str, str], dict[tuple[int], Any]]:
    """Triton signature + divisibility attributes as the JIT would specialize a launch on
    16-byte-aligned bf16 tensors (strides divisible by 16; lengths are never specialized)."""
    sig: dict[str, str] = {}
    attrs: dict[tuple[int], Any] = {}
    for i, name in enumerate(body.arg_names):
        if name in const:
            sig[name] = "constexpr"
        elif name in _POINTERS:
            sig[name] = "*" + _POINTERS[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("stride") and not name.startswith("stride_m"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _resources(kernel: Any) -> dict[str, Any]:
    """Shared memory (Triton metadata), registers / spills (ptxas -v), HGMMA count (SASS)."""
    import re
    import subprocess
    import tempfile

    import triton

    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    out: dict[str, Any] = {"smem": int(kernel.metadata.shared)}
    with tempfile.TemporaryDirectory() as td:
        ptx, cubin = Path(td) / "k.ptx", Path(td) / "k.cubin"
        ptx.write_text(kernel.asm["ptx"])
        cubin.write_bytes(kernel.asm["cubin"])
        if (bindir / "ptxas").exists():
            cmd = [str(bindir / "ptxas"), "-v", "--gpu-name=sm_90a", str(ptx), "-o", f"{ptx}.o"]
            info = subprocess.run(cmd, check=False, capture_output=True, text=True).stderr
            regs = re.search(r"Used (\d+) registers", info)
            spill = re.search(r"(\d+) bytes spill stores", info)
            out["regs"] = int(regs.group(1)) if regs else None
            out["spill_bytes"] = int(spill.group(1)) if spill else None
        if (bindir / "cuobjdump").exists():
            cmd = [str(bindir / "cuobjdump"), "-sass", str(cubin)]
            sass = subprocess.run(cmd, check=False, capture_output=True, text=True).stdout
            out["hgmma"] = len(re.findall(r"\bHGMMA", sass))
    return out


def compile_check(head_dims: tuple[int, ...] = (64, 72, 96, 128), row64: bool = False) -> list[dict[str, Any]]:
    """Compile every curated config of each kernel (bf16, with and without key mask) for
    sm_90 with ``triton.compile``: runs on a CPU-only machine (Triton ships ptxas). Configs
    the launcher would prune (shared memory / register estimate) are skipped. ``row64``:
    the int64-index variant (tensors past 2**31 elements)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod = _attn_module()
    results = []
    for kind, body in mod.KERNEL_BODIES.items():
        for d, has_mask in ((d, m) for d in head_dims for m in (False, True)):
            meta = mod._head_meta(d)
            cols = meta["BLOCK_D0"] + (meta["BLOCK_D1"] if meta["SPLIT"] else 0)
            const = {k: v for k, v in meta.items() if k != "HEAD_DIM"}
            const.update(HAS_MASK=has_mask, INTERPRET=False, IEEE=False, ALIGN=8, ROW64=row64)
            if kind == "dq":
                const["HAS_GLSE"] = False
            for cfg in mod._configs(kind, "curated"):
                smem_est, regs_est = mod._footprint(kind, cfg, cols, 2)
                if smem_est > mod._SMEM_LIMIT or regs_est > mod._ACC_REGS_LIMIT:
                    continue
                c = dict(const, **cfg.kwargs)
                entry: dict[str, Any] = {
                    "kernel": kind, "D": d, "mask": has_mask,
                    "config": (c["BLOCK_M"], c["BLOCK_N"], cfg.num_stages, cfg.num_warps)}
                sig, attrs = _signature(body, c)
                try:
                    kernel = triton.compile(
                        ASTSource(body, sig, c, attrs), target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
                    entry.update(_resources(kernel))
                except Exception as exc:  # noqa: BLE001 - reported, makes the check fail
                    entry["error"] = _error_text(exc)
                results.append(entry)
                print(entry, flush=True)
    return results


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.split("\n\n")[0])
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = __doc__.split("\n\n", 1)[1]
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop timing after this many seconds (rows kept with ms empty); "
                        "default: none, or 100 with --quick")
    p.add_argument("--autotune", choices=("curated", "full", "off"), default=None,
                   help="GPU autotuning of the ditperf kernels (default: curated; "
                        "same as DITPERF_ATTN_AUTOTUNE)")
    p.add_argument("--compile-check", action="store_true",
                   help="compile every curated config (D in 64/72/96/128, with and without mask) "
                        "for sm_90 and report smem/registers/spills/HGMMA; no GPU needed "
                        "(~100 compilations: minutes); exit 1 if one fails or lacks HGMMA")
    args = p.parse_args(argv)
    if args.autotune:
        os.environ["DITPERF_ATTN_AUTOTUNE"] = args.autotune
    if args.compile_check:
        os.environ["TRITON_INTERPRET"] = "0"  # compile for the GPU target, never interpret
        results = compile_check()
        bad = [r for r in results if "error" in r or r.get("hgmma") == 0]
        spills = [r for r in results if (r.get("spill_bytes") or 0) > 0]
        print(f"{len(results)} kernels compiled for sm_90: {len(bad)} failed or without HGMMA; "
              f"{len(spills)} spill (worst {max((r['spill_bytes'] for r in spills), default=0)} "
              "bytes)")
        if args.out is not None:
            import json

            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2))
        return 1 if bad else 0
    setup_interpreter_if_needed(args.smoke)
    budget = args.budget_s if args.budget_s is not None else (100.0 if args.quick else None)
    t0 = time.perf_counter()
    rows = run(smoke=args.smoke, quick=args.quick, budget_s=budget)
    roofs = None if args.smoke else roofs_or_none()
    title = ("attention (smoke: CPU interpreter, timings meaningless)" if args.smoke
             else "attention (bf16, ms = do_bench median)")
    extra_meta = {}
    if not args.smoke:
        extra_meta["autotune"] = _attn_module().autotune_report()
        extra_meta["autotune_mode"] = _attn_module().AUTOTUNE
    finish(rows, title=title, baseline=BASELINE, out=args.out, roofs=roofs, extra_meta=extra_meta)
    for line in ([] if args.smoke else report_targets(rows)):
        print(line)
    bad = [f"{r.case} {r.shape}: max err {r.extra['max_err']:.3g} "
           f"vs torch {r.extra['torch_max_err']:.3g}"
           for r in rows
           if r.provider == "ditperf" and r.extra["mode"] == "fwd" and not r.extra["correct"]]
    return report_correctness(rows, bad, time.perf_counter() - t0)


if __name__ == "__main__":
    sys.exit(main())
