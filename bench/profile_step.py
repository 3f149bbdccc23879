"""Where a DiT training step's time goes, per provider: ``torch.profiler`` over a few steps
(fwd + bwd + AdamW, bf16 autocast on a GPU), kernel time summed by category.

    python bench/profile_step.py [--preset dit-xl-2] [--batch 64] [--steps 3] [--out FILE.json]
        [--providers eager,triton,triton-norms+sdpa] [--cfg-preset t2i-1b]
    python bench/profile_step.py --smoke      # tiny preset on CPU (interpreter): plumbing only

Why: bench/model.py says *that* the triton backend's step is no faster than eager although
its kernels beat eager's one by one; this says *where*: GEMMs, attention (ditperf's or
SDPA's), norms and element-wise work (ditperf's fused kernels vs torch's), the optimizer,
copies, and how much of the wall time the device is busy at all (a host-bound step shows
device-busy well under wall time).

Cases: training steps of ``--preset``, then CFG denoising steps of ``--cfg-preset`` (one
image, model batch 2, bf16 weights), the latter back to back as a sampler runs them.

Rows: one per (provider, category): ``ms`` = device time per step in that category (on CPU:
host time of the ops), ``extra.top`` = the category's largest kernels. One row per provider
with case ``step``: wall ms per step (back to back, unprofiled), ``extra.device_busy_ms`` (from
the profiled run), ``extra.profiled_wall_ms``, and ``extra.synced_call_ms`` (median of single
calls each followed by a sync, unprofiled). Categories are assigned from
kernel names (see ``CATEGORIES``); unmatched kernels are ``other``, listed so nothing hides.
With ``--out F.json`` also ``F.png``: stacked bars per provider, wall time marked.
"""

from __future__ import annotations

import re
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import Row, base_parser, finish, setup_interpreter_if_needed

BENCH = "profile-step"

#: (category, regex over the lower-cased kernel / op name); first match wins.
CATEGORIES: list[tuple[str, str]] = [
    # ditperf's Triton kernels (GPU) and its ops / autograd Functions (CPU host time)
    ("attention ditperf", r"_fwd_kernel_body|_bwd_dq_kernel|_bwd_dkdv_kernel|ditperf::attention|_attentionfn"),
    ("norms ditperf", r"_norm_fwd_kernel|_norm_bwd_kernel|ditperf::|_layernormfn|_rmsnormfn|_gatedfn"),
    ("attention sdpa", r"flash|fmha|cudnn|attention|sdpa|_efficient_attention"),
    ("gemm", r"gemm|cutlass|xmma|wgmma|nvjet|cublas|aten::mm|aten::addmm|aten::bmm|matmul|aten::linear"),
    ("optimizer", r"adam|multi_tensor|foreach|_fused"),
    ("norm/softmax torch", r"layer_norm|layernorm|rms_norm|softmax"),
    ("copy/cast", r"copy|memcpy|memset|cast|to_copy|_to_|fill"),
    ("elementwise/reduce", r"elementwise|vectorized|reduce|aten::(add|mul|sub|div|silu|gelu|tanh|sum|mean|where|pow|exp)"),
]


def categorize(name: str) -> str:
    low = name.lower()
    for cat, pattern in CATEGORIES:
        if re.search(pattern, low):
            return cat
    return "other"


def _kernel_times(prof: Any, cuda: bool) -> dict[str, float]:
    """name -> total microseconds: CUDA kernels on a GPU; top-level-free CPU ops (self
    time) on CPU."""
    out: dict[str, float] = defaultdict(float)
    if cuda:
        for evt in prof.events():
            if evt.device_type == torch.autograd.DeviceType.CUDA:
                out[evt.name] += evt.time_range.elapsed_us()
    else:
        for evt in prof.key_averages():
            if evt.self_cpu_time_total > 0:
                out[evt.key] += evt.self_cpu_time_total
    return out


def _train_setup(provider: str, preset: str, batch: int, device: torch.device) -> tuple[Any, str, Any]:
    """(step function, shape label, model): one optimizer step as bench/model.py times it."""
    from ditperf.model import get_config

    import model as M  # bench/model.py: the same step, model and batch as the model benchmark

    cfg = get_config(preset)
    torch.manual_seed(0)
    net = M._perturbed_model(cfg, device)
    M._set_backend(net, provider)
    opt, data, autocast = M._train_parts(net, batch, device)
    shape = f"train B={batch} {cfg.latent_channels}x{cfg.latent_size[0]}x{cfg.latent_size[1]} ({cfg.num_tokens()} tok)"
    return M._train_step(net, opt, data, autocast, device), shape, net


def _cfg_setup(provider: str, preset: str, device: torch.device) -> tuple[Any, str, Any]:
    """(step function, shape label, model): one CFG denoising step of one image (model batch
    2), as bench/model.py's cfg-step case."""
    from ditperf.model import get_config, make_step

    import model as M

    cfg = get_config(preset)
    net, x, cond, grid = M._cfg_model(cfg, device)
    M._set_backend(net, provider)
    step = make_step(net, cond, cfg_scale=4.0)

    def run() -> None:
        with torch.no_grad():
            step(x, grid[0], grid[1])

    shape = f"cfg-step 1 img {cfg.latent_channels}x{cfg.latent_size[0]}x{cfg.latent_size[1]} ({cfg.num_tokens()} tok)"
    return run, shape, net


def _provider_rows(provider: str, preset: str, batch: int, steps: int, device: torch.device,
                   mode: str = "train") -> list[Row]:
    from torch.profiler import ProfilerActivity, profile

    import model as M

    step, shape, net = (_train_setup(provider, preset, batch, device) if mode == "train"
                        else _cfg_setup(provider, preset, device))
    for _ in range(2):  # compile, autotune, allocate
        step()
    M._sync()
    cuda = device.type == "cuda"
    # back to back without the profiler (its tracing costs host time per launch, more for the
    # backend with more launches): the step time and the denominator of the busy fraction
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    M._sync()
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:  # the same steps again, for the per-kernel split only
        for _ in range(steps):
            step()
        M._sync()
    profiled_ms = (time.perf_counter() - t0) * 1e3 / steps
    times = _kernel_times(prof, cuda)
    by_cat: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for name, us in times.items():
        by_cat[categorize(name)].append((name, us))
    busy_ms = sum(times.values()) / 1e3 / steps
    synced_ms = M._time_loop(step, 1, steps)  # each call alone, synced: how bench/model.py times a CFG step
    rows = [Row(BENCH, "step", shape, provider, wall_ms,
                extra={"device_busy_ms": busy_ms, "busy_fraction": busy_ms / wall_ms if wall_ms else None,
                       "synced_call_ms": synced_ms, "profiled_wall_ms": profiled_ms, "steps": steps,
                       "timing": "device kernels" if cuda else "host ops (CPU)"})]
    for cat, items in sorted(by_cat.items(), key=lambda kv: -sum(us for _, us in kv[1])):
        items.sort(key=lambda kv: -kv[1])
        total_ms = sum(us for _, us in items) / 1e3 / steps
        top = [{"name": n[:120], "ms_per_step": us / 1e3 / steps} for n, us in items[:6]]
        rows.append(Row(BENCH, cat, shape, provider, total_ms,
                        extra={"share_of_busy": total_ms / busy_ms if busy_ms else None, "kernels": len(items),
                               "top": top}))
    print(f"  {provider}: wall {wall_ms:.1f} ms/step back to back ({profiled_ms:.1f} under the profiler), "
          f"{synced_ms:.1f} ms per synced call, device busy {busy_ms:.1f} ms", flush=True)
    for r in rows[1:]:
        print(f"    {r.case:20s} {r.ms:9.2f} ms  ({r.extra['kernels']} kernels; top: {r.extra['top'][0]['name'][:70]})",
              flush=True)
    del net, step
    M._free()
    return rows


def run(smoke: bool, quick: bool, *, preset: str = "dit-xl-2", batch: int = 64, steps: int = 3,
        providers: tuple[str, ...] = ("eager", "triton", "triton-norms+sdpa"),
        cfg_preset: str | None = "t2i-1b") -> list[Row]:
    """Training steps of ``preset`` for every provider, then (``cfg_preset``) CFG inference
    steps, pipelined as a sampler runs them (no sync between steps)."""
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    if smoke:
        preset, batch, steps, cfg_preset = "tiny", 2, 1, "tiny"
    rows: list[Row] = []
    cases = [("train", preset)] + ([("cfg", cfg_preset)] if cfg_preset else [])
    for mode, name in cases:
        print(f"[profile-step {mode} {name}] batch {batch if mode == 'train' else 2}, {steps} profiled steps "
              f"on {device}", flush=True)
        for provider in providers:
            try:
                rows += _provider_rows(provider, name, batch, steps, device, mode)
            except Exception as exc:  # noqa: BLE001 - record, go on with the next provider
                rows.append(Row(BENCH, "step", f"{mode} {name}", provider, None,
                                extra={"error": f"{type(exc).__name__}: {exc}"}))
                print(f"  {provider}: failed: {exc}", flush=True)
    return rows


def plot(rows: list[Row], path: Path) -> None:
    """Stacked bars: device ms per step by category for each provider, one panel per case,
    with the wall time per step marked (the gap is time the device sat idle)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shapes = list(dict.fromkeys(r.shape for r in rows if r.case == "step" and r.ms))
    cats = [c for c, _ in CATEGORIES] + ["other"]
    colors = dict(zip(cats, ["#d62728", "#ff9896", "#1f77b4", "#2ca02c", "#9467bd", "#aec7e8", "#8c564b",
                             "#bcbd22", "#7f7f7f"]))
    fig = Figure(figsize=(10, 2.2 + 1.6 * len(shapes) * 2))
    FigureCanvasAgg(fig)
    for i, shape in enumerate(shapes):
        ax = fig.add_subplot(len(shapes), 1, i + 1)
        provs = list(dict.fromkeys(r.provider for r in rows if r.shape == shape and r.case == "step" and r.ms))
        for y, prov in enumerate(provs):
            left = 0.0
            for cat in cats:
                ms = sum(r.ms or 0 for r in rows if r.shape == shape and r.provider == prov and r.case == cat)
                if ms > 0:
                    ax.barh(y, ms, left=left, color=colors[cat], label=cat)  # legend deduplicated below
                    left += ms
            wall = next(r.ms for r in rows if r.shape == shape and r.provider == prov and r.case == "step")
            ax.plot([wall, wall], [y - 0.4, y + 0.4], color="black", lw=2)
        ax.set_yticks(range(len(provs)), provs)
        ax.set_xlabel("ms per step (bars: device time by category; black line: wall time)")
        ax.set_title(shape, fontsize=10)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--preset", default="dit-xl-2")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--providers", default="eager,triton,triton-norms+sdpa",
                   help="comma-separated bench/model.py providers (eager, triton, triton-norms+sdpa)")
    p.add_argument("--cfg-preset", default="t2i-1b", help="text preset for the CFG inference step ('' = skip)")
    args = p.parse_args(argv)
    setup_interpreter_if_needed(args.smoke)
    providers = tuple(x.strip() for x in args.providers.split(",") if x.strip())
    rows = run(args.smoke, args.quick, preset=args.preset, batch=args.batch, steps=args.steps, providers=providers,
               cfg_preset=args.cfg_preset or None)
    finish(rows, title=f"training step profile ({'tiny' if args.smoke else args.preset})", baseline="eager",
           out=args.out)
    if args.out is not None and any(r.ms for r in rows if r.case == "step"):
        plot(rows, args.out.with_suffix(".png"))
    return 0 if all(r.ms is not None for r in rows if r.case == "step") else 1


if __name__ == "__main__":
    sys.exit(main())
