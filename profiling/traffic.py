"""Analytic traffic of a DiT step: every operator's bytes and FLOPs, and the floors they imply.

Runs the model on the ``meta`` device (shapes only, nothing is computed: a t2i-1b training
step takes about a second on a CPU, no GPU needed) under a dispatch mode that records, per
ATen or ditperf operator: calls, bytes and FLOPs.

* bytes: each distinct input and output tensor once, at the elements it really holds (a
  broadcast view counts its stored elements, not its expanded size); an in-place op counts
  the tensor it mutates as read and written. Views and allocations are free.
* FLOPs: ``torch.utils.flop_counter``'s formulas (2 per multiply-add) for matmuls and
  convolutions; attention 4*B*H*Nq*Nk*D forward and 2.5x that backward (the convention of
  ``bench/attention.py``); elementwise work counts 0 (it is memory-bound by far).

Operators fall in three classes:

  matmul     mm / addmm / bmm / convolution: cuBLAS or cuDNN, the same in both backends
  attention  ``ditperf::attention(_bwd)``, or ``F.scaled_dot_product_attention`` counted as one
             fused kernel (flash / cuDNN / efficient on a GPU; the meta device would
             otherwise decompose it into a materialized N x N softmax; ``is_causal`` still
             counts the full N x N FLOPs, and a float mask gets no gradient)
  memory     everything else: norms, modulation, residual adds, GELU, casts, reductions

Floors at roofs T (TFLOP/s) and W (GB/s):

  serial floor = sum over every call of max(FLOPs / T, bytes / W)   (the roofline time of
                 each kernel, kernels one after another as on one CUDA stream)
  fused floor  = max(all FLOPs / T, all bytes / W)   (every memory-bound op hidden in a
                 matmul's prologue or epilogue: the bound no kernel decomposition beats)

``mode="train"`` is forward + backward of a mean-squared loss plus the fused AdamW update
(fp32 parameters, gradients and two moments: 16 bytes read and 12 written per parameter, a
line of its own); ``"forward"`` and ``"cfg-step"`` (the model at twice the batch, as a
classifier-free-guided denoising step runs it) are forward only, without autograd.

Modelling choices, all of which make the numbers lower bounds of real traffic:
weights and activations are in ``dtype`` (bf16) without autocast (autocast adds weight casts
and fp32 norm outputs to the eager backend; ditperf's kernels then also see an fp32 residual
stream); ``F.rms_norm`` (the torch backend's QK-norm) is counted as one fused kernel;
launch gaps and partial-sum buffers inside ditperf's kernels are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

Mode = Literal["train", "forward", "cfg-step"]
MODES: tuple[str, ...] = get_args(Mode)
OpClass = Literal["matmul", "attention", "memory"]

#: AdamW with fp32 states, fused: reads param, grad, exp_avg, exp_avg_sq; writes param and both moments.
ADAMW_BYTES_PER_PARAM = 4 * 4 + 3 * 4

#: Operators that move no data: allocations, aliases, metadata (views are found by schema).
_FREE = frozenset({
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
    "lift_fresh", "_unsafe_view", "_reshape_alias", "resize_", "set_", "sym_size", "sym_stride",
    "sym_numel", "sym_storage_offset", "is_same_size", "_local_scalar_dense",
})
_ATTENTION_OPS = {"ditperf.attention": 1.0, "ditperf.attention_bwd": 2.5}


@dataclass
class OpCost:
    """One operator's totals over the step."""

    op: str
    kind: OpClass
    calls: int = 0
    bytes: float = 0.0
    flops: float = 0.0
    #: (bytes, flops) of each call of a matmul / attention op: a small matmul is memory-bound
    per_call: list[tuple[float, float]] = field(default_factory=list, repr=False)

    def floor_s(self, flops_per_s: float, bytes_per_s: float) -> float:
        """Sum over calls of each call's roofline time, max(flops / T, bytes / W)."""
        if not self.per_call:
            return max(self.flops / flops_per_s, self.bytes / bytes_per_s)
        return sum(max(f / flops_per_s, b / bytes_per_s) for b, f in self.per_call)


@dataclass
class StepTraffic:
    """The ledger of one step of one model/backend; see the module docstring."""

    preset: str
    backend: str
    mode: str
    batch: int
    model_batch: int
    tokens: int
    text_len: int
    dtype: str
    params: int
    ops: list[OpCost] = field(default_factory=list)

    def totals(self) -> dict[str, dict[str, float]]:
        """Per class (matmul, attention, memory, all): calls, bytes, flops."""
        out = {k: {"calls": 0.0, "bytes": 0.0, "flops": 0.0} for k in ("matmul", "attention", "memory", "all")}
        for o in self.ops:
            for k in (o.kind, "all"):
                out[k]["calls"] += o.calls
                out[k]["bytes"] += o.bytes
                out[k]["flops"] += o.flops
        return out

    def floors_ms(self, tflops: float, gbps: float) -> dict[str, float]:
        """Serial and fused floors (ms) at ``tflops`` TFLOP/s and ``gbps`` GB/s, and their parts."""
        if not (0 < tflops < math.inf and 0 < gbps < math.inf):
            raise ValueError(f"roofs must be positive and finite, got {tflops} TFLOP/s and {gbps} GB/s")
        t = self.totals()
        f_s, b_s = tflops * 1e12, gbps * 1e9
        parts = {f"{kind}_ms": 1e3 * sum(o.floor_s(f_s, b_s) for o in self.ops if o.kind == kind)
                 for kind in ("matmul", "attention", "memory")}
        return {**parts, "serial_ms": sum(parts.values()),
                "fused_ms": max(t["all"]["flops"] / f_s, t["all"]["bytes"] / b_s) * 1e3}

    def to_dict(self, tflops: float | None = None, gbps: float | None = None) -> dict[str, Any]:
        """JSON-ready: the fields, class totals, ops by bytes, and the floors when roofs are given."""
        doc: dict[str, Any] = {k: v for k, v in asdict(self).items() if k != "ops"}
        doc["totals"] = self.totals()
        doc["ops"] = [{k: v for k, v in asdict(o).items() if k != "per_call"}
                      for o in sorted(self.ops, key=lambda o: -o.bytes)]
        if tflops and gbps:
            doc["roofs"] = {"tflops": tflops, "gbps": gbps}
            doc["floors_ms"] = self.floors_ms(tflops, gbps)
        return doc


def _stored_elements(t: torch.Tensor) -> int:
    """Elements a tensor really holds: broadcast (stride-0) dims count once."""
    return math.prod(s for s, st in zip(t.shape, t.stride(), strict=True) if st != 0) if t.numel() else 0


def _nbytes(tensors: list[torch.Tensor]) -> int:
    """Stored bytes of the distinct tensors (a tensor passed twice counts once)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += _stored_elements(t) * t.element_size()
    return total


def _attention_flops(q: torch.Tensor, k: torch.Tensor) -> float:
    """4 * B * H * Nq * Nk * D for (B, H, N, D) q and k."""
    return 4.0 * math.prod(q.shape[:-1]) * k.shape[-2] * q.shape[-1]


class _Ledger(TorchDispatchMode):
    """Records bytes and FLOPs of every operator that reaches the dispatcher."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, OpCost] = {}

    def record(self, op: str, kind: OpClass, nbytes: float, flops: float) -> None:
        """Add one call of ``op``."""
        cost = self.ops.setdefault(op, OpCost(op, kind))
        cost.calls += 1
        cost.bytes += nbytes
        cost.flops += flops
        if kind != "memory":
            cost.per_call.append((float(nbytes), float(flops)))

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        name = packet.__name__
        if func.is_view or name in _FREE:
            return out
        ins = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outs = [a for a in tree_leaves(out) if isinstance(a, torch.Tensor)]
        nbytes = _nbytes(ins) + _nbytes(outs)  # an in-place op's tensor: read and written
        op = f"{func.namespace}.{name}"
        if op in _ATTENTION_OPS:  # schema positions: (q, k, ...) and (grad_out, grad_lse, q, k, ...)
            first = 2 if op.endswith("_bwd") else 0
            q, k = args[first], args[first + 1]
            self.record(op, "attention", nbytes, _ATTENTION_OPS[op] * _attention_flops(q, k))
        elif packet in flop_registry:
            self.record(op, "matmul", nbytes, float(flop_registry[packet](*args, **kwargs, out_val=out)))
        else:
            self.record(op, "memory", nbytes, 0.0)
        return out


class _FusedStandIn(torch.autograd.Function):
    """Shapes of a fused torch kernel (SDPA, RMSNorm) whose traffic is recorded as one op."""

    @staticmethod
    def forward(ctx: Any, ledger: _Ledger, name: str, kind: OpClass, flops: float, out_shape: tuple[int, ...],
                bwd_outputs: int, *inputs: torch.Tensor) -> torch.Tensor:
        out = inputs[0].new_empty(out_shape)
        extra = 4 * math.prod(out_shape[:-1]) if kind == "attention" else 0  # the saved log-sum-exp
        ledger.record(f"{name} (fused)", kind, _nbytes(list(inputs)) + _nbytes([out]) + extra, flops)
        ctx.meta = (ledger, name, kind, flops, bwd_outputs, extra)
        ctx.save_for_backward(*inputs, out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        ledger, name, kind, flops, n_grads, extra = ctx.meta
        saved = ctx.saved_tensors
        inputs, out = saved[:-1], saved[-1]
        grads = [t.new_empty(t.shape) for t in inputs[:n_grads]]
        # reads every input, the output (attention) and its gradient; writes the input grads
        reads = list(inputs) + ([out] if kind == "attention" else []) + [grad]
        ledger.record(f"{name}_bwd (fused)", kind, _nbytes(reads) + _nbytes(grads) + extra, 2.5 * flops)
        return (None,) * 6 + tuple(grads) + (None,) * (len(inputs) - n_grads)


class _FusedTorchKernels(TorchFunctionMode):
    """Route F.scaled_dot_product_attention and F.rms_norm through :class:`_FusedStandIn`."""

    def __init__(self, ledger: _Ledger) -> None:
        super().__init__()
        self.ledger = ledger

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            names = ("query", "key", "value", "attn_mask")
            q, k, v, mask = (args[i] if len(args) > i else kwargs.get(n) for i, n in enumerate(names))
            extra = [mask] if isinstance(mask, torch.Tensor) else []
            shape = (*q.shape[:-1], v.shape[-1])
            return _FusedStandIn.apply(self.ledger, "aten.scaled_dot_product_attention", "attention",
                                       _attention_flops(q, k), shape, 3, q, k, v, *extra)
        if func is F.rms_norm:
            x = args[0] if args else kwargs["input"]
            weight = args[2] if len(args) > 2 else kwargs.get("weight")
            extra = [weight] if isinstance(weight, torch.Tensor) else []
            return _FusedStandIn.apply(self.ledger, "aten.rms_norm", "memory", 0.0, tuple(x.shape),
                                       1 + len(extra), x, *extra)
        return func(*args, **kwargs)


@contextmanager
def record_traffic() -> Iterator[_Ledger]:
    """Record every operator run inside the block (any device; ``meta`` computes nothing):
    ``ledger.ops`` maps "namespace.op" to its :class:`OpCost`."""
    ledger = _Ledger()
    with _FusedTorchKernels(ledger), ledger:
        yield ledger


def step_traffic(preset: Any, backend: str = "triton", mode: Mode = "train", batch: int = 1, *,
                 height: int | None = None, width: int | None = None, text_len: int | None = None,
                 dtype: torch.dtype = torch.bfloat16) -> StepTraffic:
    """Ledger of one ``mode`` step of ``preset`` (a name or DiTConfig) on ``backend`` at
    ``batch`` samples (a CFG step runs the model at 2 x batch). Shapes only: runs anywhere."""
    from ditperf.model import DiT, get_config

    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    for what, v in (("height", height), ("width", width), ("text_len", text_len)):
        if v is not None and v < 1:
            raise ValueError(f"{what} must be >= 1 (or None for the preset's), got {v}")
    cfg = get_config(preset) if isinstance(preset, str) else preset
    if text_len is not None and cfg.conditioning != "text":
        raise ValueError(f"text_len is for text presets; {cfg.name} is conditioned on {cfg.conditioning}")
    model_batch = 2 * batch if mode == "cfg-step" else batch
    with torch.device("meta"):
        model = DiT(cfg, backend=backend)
    model = model.to(dtype).requires_grad_(mode == "train")
    # one real sample for the shapes and dtypes (validation happens here), then meta tensors
    # at the full batch: nothing of batch size is allocated
    one = model.example_inputs(1, device="cpu", height=height, width=width, text_len=text_len)
    inputs = [torch.empty((model_batch, *t.shape[1:]), device="meta",
                          dtype=dtype if t.is_floating_point() and t.dim() > 1 else t.dtype) for t in one]
    with torch.set_grad_enabled(mode == "train"), record_traffic() as ledger:
        out = model(*inputs)
        if mode == "train":
            out.float().pow(2).mean().backward()
    ops = list(ledger.ops.values())
    params = sum(p.numel() for p in model.parameters())
    if mode == "train":
        ops.append(OpCost("optimizer: fused AdamW (fp32 states)", "memory", 1, float(params * ADAMW_BYTES_PER_PARAM)))
    h, w = height or cfg.latent_size[0], width or cfg.latent_size[1]
    tokens = (h // cfg.patch_size) * (w // cfg.patch_size)
    length = (text_len or cfg.text_len) if cfg.conditioning == "text" else 0
    return StepTraffic(cfg.name, backend, mode, batch, model_batch, tokens, length, str(dtype).removeprefix("torch."),
                       params, ops)


def _g(x: float) -> str:
    """3 significant digits, no exponent for the magnitudes of a table cell."""
    return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}"


def compare_table(ledgers: list[StepTraffic], tflops: float, gbps: float, top: int = 12) -> str:
    """Markdown: the classes and floors per ledger, then the ``top`` memory-bound operators."""
    header = ("| preset | mode | backend | matmul TFLOP | attention TFLOP | memory GB | memory ops | "
              "matmul ms | attention ms | memory ms | serial floor ms | fused floor ms |")
    title = (f"Floors at {tflops:g} TFLOP/s and {gbps:g} GB/s (serial: each kernel at its roofline time, one "
             "after another; fused: every memory-bound op hidden in a matmul):")
    lines = [title, "", header,
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in ledgers:
        t, f = s.totals(), s.floors_ms(tflops, gbps)
        cells = [t["matmul"]["flops"] / 1e12, t["attention"]["flops"] / 1e12, t["memory"]["bytes"] / 1e9]
        times = [f["matmul_ms"], f["attention_ms"], f["memory_ms"], f["serial_ms"], f["fused_ms"]]
        lines.append(f"| {s.preset} B={s.batch} | {s.mode} | {s.backend} | {' | '.join(map(_g, cells))} | "
                     f"{t['memory']['calls']:.0f} | {' | '.join(map(_g, times))} |")
    for s in ledgers:
        mem = sorted((o for o in s.ops if o.kind == "memory"), key=lambda o: -o.bytes)[:top]
        if not mem:
            continue
        lines += ["", f"{s.preset} {s.mode} {s.backend}: largest memory-bound operators", "",
                  "| operator | calls | GB | ms at roof |", "|---|---|---|---|"]
        lines += [f"| {o.op} | {o.calls} | {_g(o.bytes / 1e9)} | {_g(o.bytes / gbps / 1e6)} |" for o in mem]
    return "\n".join(lines)
