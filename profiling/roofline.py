"""Kernel rooflines: ditperf's Triton kernels vs torch baselines against this GPU's roofs.

For each (kernel, shape, provider): median time with :func:`ditperf.profiling.time_ms`
(``triton.testing.do_bench``: warm-up, L2 flushed between repetitions), then

* achieved TFLOP/s = flops / time and GB/s = bytes / time, from analytic counts (bytes =
  tensors each kernel must read and write once, bf16; flops: attention 4 B H N^2 D, the
  norms a nominal ~10 per element — they are memory-bound by a wide margin);
* arithmetic intensity AI = flops / bytes; ridge point = matmul roof / copy roof;
  ``bound`` = "compute" when AI > ridge, else "memory";
* attainable = min(matmul roof, AI x copy roof) and ``pct_roof`` = achieved / attainable.

The roofs come from :func:`ditperf.profiling.measure_roofs` (device copy GB/s, bf16 matmul
TFLOP/s), measured once per run. With ``power=True`` each timing loop runs ~2 s inside a
:class:`PowerMonitor` window (mean power, power-proxy utilization, estimated MFU added to
the row; do_bench's L2-flush writes are inside the window too).

JSON (``schema_version`` 1, ``format`` "ditperf-kernel-roofline"): ``{"versions", "roofs",
"ridge_flop_per_byte", "rows": [{"kernel", "shape", "provider", "ms", "tflops", "gbps",
"flops", "bytes", "ai", "bound", "attainable_tflops", "pct_roof", "max_abs_err_vs_baseline",
"error", "power": {...} | null}]}``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
FORMAT = "ditperf-kernel-roofline"
NORM_FLOPS_PER_ELEMENT = 10


@dataclass
class KernelRow:
    kernel: str
    shape: str
    provider: str
    flops: float
    bytes: float
    ms: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    ai: float | None = None
    bound: str | None = None
    attainable_tflops: float | None = None
    pct_roof: float | None = None
    max_abs_err_vs_baseline: float | None = None
    error: str | None = None
    power: dict[str, Any] | None = field(default=None)


def roofline_point(ms: float, flops: float, nbytes: float, matmul_tflops: float, copy_gbps: float) -> dict[str, Any]:
    """Achieved rates, arithmetic intensity, bound and % of the attainable roof."""
    if ms <= 0 or nbytes <= 0 or matmul_tflops <= 0 or copy_gbps <= 0:
        raise ValueError("ms, bytes and both roofs must be > 0")
    sec = ms * 1e-3
    ai = flops / nbytes
    ridge = matmul_tflops * 1e12 / (copy_gbps * 1e9)
    attainable = min(matmul_tflops, ai * copy_gbps * 1e9 / 1e12)
    tflops = flops / sec / 1e12
    return {"tflops": tflops, "gbps": nbytes / sec / 1e9, "ai": ai, "bound": "compute" if ai > ridge else "memory",
            "attainable_tflops": attainable, "pct_roof": 100.0 * tflops / attainable if attainable > 0 else None}


def _cases(quick: bool, device: str = "cuda", tiny: bool = False
           ) -> list[tuple[str, str, float, float, dict[str, Callable[[], Any]]]]:
    """(kernel, shape, flops, bytes, {provider: fn}), bf16 (fp32 when ``tiny``: the CPU
    check of this plumbing under the Triton interpreter). Kernels are imported here."""
    import torch
    import torch.nn.functional as F
    from ditperf import kernels as K

    dev, dt = device, (torch.float32 if tiny else torch.bfloat16)
    out: list[tuple[str, str, float, float, dict[str, Callable[[], Any]]]] = []
    norm_shapes = [(8, 4096, 1152)] if quick else [(2, 1024, 1152), (8, 4096, 1152), (4, 4096, 3072)]
    if tiny:
        norm_shapes = [(2, 16, 64)]
    for b, n, c in norm_shapes:
        x = torch.randn(b, n, c, device=dev, dtype=dt)
        y = torch.randn(b, n, c, device=dev, dtype=dt)
        shift, scale, gate = (0.1 * torch.randn(b, c, device=dev, dtype=dt) for _ in range(3))
        e = b * n * c

        def ln_torch(x=x, shift=shift, scale=scale, c=c):
            return F.layer_norm(x, (c,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

        def grln_torch(x=x, y=y, gate=gate, shift=shift, scale=scale, c=c):
            xn = x + gate[:, None] * y
            return xn, F.layer_norm(xn, (c,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

        shape = f"B{b} N{n} C{c}"
        out.append(("layer_norm", shape, NORM_FLOPS_PER_ELEMENT * e, 2.0 * (2 * e + 2 * b * c), {
            "torch": ln_torch,
            "ditperf": lambda x=x, shift=shift, scale=scale: K.layer_norm(x, shift=shift, scale=scale)}))
        out.append(("gated_residual_layer_norm", shape, (NORM_FLOPS_PER_ELEMENT + 2) * e, 2.0 * (4 * e + 3 * b * c), {
            "torch": grln_torch,
            "ditperf": lambda x=x, y=y, gate=gate, shift=shift, scale=scale:
                K.gated_residual_layer_norm(x, y, gate, shift=shift, scale=scale)}))
    attn_shapes = [(2, 16, 4096, 64)] if quick else [(8, 16, 1024, 64), (2, 16, 4096, 64), (1, 16, 4096, 128),
                                                      (2, 16, 4096, 72)]
    if tiny:
        attn_shapes = [(1, 2, 64, 32)]
    for b, h, n, d in attn_shapes:
        q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=dt) for _ in range(3))
        out.append(("attention", f"B{b} H{h} N{n} D{d}", 4.0 * b * h * n * n * d, 2.0 * 4 * b * h * n * d, {
            "torch_sdpa": lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v),
            "ditperf": lambda q=q, k=k, v=v: K.attention(q, k, v)}))
    return out


def _max_err(a: Any, b: Any) -> float | None:
    import torch

    if isinstance(a, (tuple, list)):
        errs = [_max_err(x, y) for x, y in zip(a, b)]
        return max(e for e in errs if e is not None) if errs else None
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape:
        return float((a.float() - b.float()).abs().max())
    return None


def run_kernels(out_dir: str | os.PathLike[str], *, power: bool = False, quick: bool = False
                ) -> tuple[dict[str, Any], list[Path]]:
    """Time every case, write ``kernels.json`` and ``kernels_roofline.png`` to ``out_dir``."""
    import torch
    from ditperf.cli.version import versions
    from ditperf.profiling.timing import measure_roofs, time_ms

    if not torch.cuda.is_available():
        raise RuntimeError("kernel rooflines need a CUDA GPU")
    roofs = measure_roofs()
    mon = None
    if power:
        from ditperf.profiling.power import PowerMonitor
        from ditperf.profiling.readers import NvmlReader, nvml_index_for_cuda_device

        mon = PowerMonitor(reader=NvmlReader([nvml_index_for_cuda_device(torch.cuda.current_device())]),
                           interval_s=0.01, close_reader=True).start()
    rows: list[KernelRow] = []
    try:
        for kernel, shape, flops, nbytes, providers in _cases(quick):
            baseline_out = None
            for provider, fn in providers.items():
                row = KernelRow(kernel=kernel, shape=shape, provider=provider, flops=flops, bytes=nbytes)
                rows.append(row)
                try:
                    result = fn()
                    torch.cuda.synchronize()
                    if provider != "ditperf":
                        baseline_out = result
                    elif baseline_out is not None:
                        row.max_abs_err_vs_baseline = _max_err(result, baseline_out)
                    if mon is not None:
                        mon.begin_window(f"{kernel} {shape} {provider}")
                    row.ms = time_ms(fn, rep_ms=2000 if mon is not None else 100)
                    if mon is not None:
                        s = mon.end_window(f"{kernel} {shape} {provider}")
                        (dev,) = s["devices"].values()
                        row.power = {k: dev.get(k) for k in ("mean_power_w", "power_proxy_util",
                                                             "power_proxy_util_net_idle", "estimated_mfu",
                                                             "mean_sm_clock_mhz", "throttle_share")}
                    row.__dict__.update(roofline_point(row.ms, flops, nbytes, roofs.matmul_tflops, roofs.copy_gbps))
                except Exception as exc:  # noqa: BLE001 - one failing kernel must not stop the table
                    row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
                    if mon is not None:
                        for name in list(mon._open):
                            mon.end_window(name, sync=False)
    finally:
        if mon is not None:
            mon.stop()
    doc = {"schema_version": SCHEMA_VERSION, "format": FORMAT, "versions": versions(), "roofs": roofs.to_dict(),
           "ridge_flop_per_byte": roofs.matmul_tflops * 1e12 / (roofs.copy_gbps * 1e9),
           "rows": [asdict(r) for r in rows]}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jpath = out / "kernels.json"
    jpath.write_text(json.dumps(doc, indent=2))
    ppath = plot_roofline(doc, out / "kernels_roofline.png")
    return doc, [jpath, ppath]


def plot_roofline(doc: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Log-log roofline: attainable TFLOP/s vs arithmetic intensity, one point per row."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    roofs = doc["roofs"]
    peak, bw = roofs["matmul_tflops"], roofs["copy_gbps"]
    rows = [r for r in doc["rows"] if r.get("tflops") and r.get("ai")]
    ais = [r["ai"] for r in rows] or [1.0]
    lo = min(min(ais) / 4, 0.1)
    hi = max(max(ais) * 4, 4 * peak * 1e3 / bw)
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    fig = Figure(figsize=(8, 5.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(xs, [min(peak, x * bw / 1e3) for x in xs], color="black", lw=1.2,
            label=f"roof: {bw:.0f} GB/s copy, {peak:.0f} TFLOP/s bf16 matmul")
    markers = {"ditperf": "o", "torch": "s", "torch_sdpa": "^"}
    kernels = sorted({r["kernel"] for r in rows})
    for r in rows:
        color = f"C{kernels.index(r['kernel']) % 10}"
        ax.scatter([r["ai"]], [r["tflops"]], marker=markers.get(r["provider"], "D"), color=color, zorder=3,
                   edgecolor="black" if r["provider"] == "ditperf" else "none")
        ax.annotate(f"{r['provider']} {r['shape']} ({r['pct_roof']:.0f}%)", (r["ai"], r["tflops"]), fontsize=6,
                    xytext=(4, -3), textcoords="offset points")
    for i, k in enumerate(kernels):
        ax.scatter([], [], color=f"C{i % 10}", label=k)
    for prov, m in markers.items():
        ax.scatter([], [], color="gray", marker=m, label=prov)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(f"kernel roofline: {doc.get('versions', {}).get('gpu', roofs.get('device', ''))}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p)
    return p


def print_kernel_rows(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    r0 = doc["roofs"]
    table = Table(title=f"kernels vs roofs ({r0['copy_gbps']:.0f} GB/s, {r0['matmul_tflops']:.0f} TFLOP/s, "
                        f"ridge {doc['ridge_flop_per_byte']:.0f} FLOP/B)")
    for col in ("kernel", "shape", "provider", "ms", "TFLOP/s", "GB/s", "AI", "bound", "% roof", "max err", "W"):
        table.add_column(col, justify="left" if col in ("kernel", "shape", "provider", "bound") else "right")

    def f(v: Any, spec: str) -> str:
        return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)

    for r in doc["rows"]:
        if r.get("error"):
            table.add_row(r["kernel"], r["shape"], r["provider"], "[red]" + r["error"][:60], *[""] * 7)
            continue
        table.add_row(r["kernel"], r["shape"], r["provider"], f(r["ms"], ".4f"), f(r["tflops"], ".1f"),
                      f(r["gbps"], ".0f"), f(r["ai"], ".1f"), r["bound"] or "-", f(r["pct_roof"], ".0f"),
                      f(r.get("max_abs_err_vs_baseline"), ".2g"),
                      f((r.get("power") or {}).get("mean_power_w"), ".0f"))
    Console(width=max(140, Console().width)).print(table)


__all__ = ["KernelRow", "plot_roofline", "print_kernel_rows", "roofline_point", "run_kernels"]
