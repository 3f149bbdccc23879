"""``ditperf demo``: the whole library on an embedded default, end to end.

Steps (each timed; a failing step is reported and the others still run):

1. data     synthesize a small MDS dataset of precomputed latents (+ text embeddings)
2. train    train with the Triton backend through Composer (loss must go down)
3. backends check triton vs torch backend outputs of the trained model
4. export   ONNX export (custom ops -> LayerNormalization / attention subgraphs) + onnxruntime
            check, graph surgery, TensorRT coverage table
5. sample   a few latents with classifier-free guidance (Euler, shifted grid)

On CPU (default where there is no GPU): preset ``tiny``, Triton kernels in the CPU
interpreter, a few minutes on 2 cores. On a GPU: preset ``dit-b-2`` in bf16, with img/s and
MFU from Composer's SpeedMonitor and power-proxy utilization + energy from NVML.
Writes ``demo-report/`` (``report.json``, ``loss.png``, ``samples.png``; on a GPU also the
power report and timeline) and ends with a summary table.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# What runs where. CPU: small enough for the Triton interpreter on 2 cores.
PLANS: dict[str, dict[str, Any]] = {
    "cpu": {"preset": "tiny", "config": "tiny-cpu", "samples": 256, "batches": 30, "batch_size": 16,
            "sample_steps": 8, "overrides": ["data.num_workers=0", "data.persistent_workers=false"]},
    "gpu": {"preset": "dit-b-2", "config": "dit-xl-2", "samples": 4096, "batches": 60, "batch_size": 64,
            "sample_steps": 20, "overrides": ["data.num_workers=4", "optimizer.lr=3e-4", "scheduler.t_warmup=5ba",
                                              "ema.half_life=20ba", "console_log_interval=10ba"]},
}


@dataclass
class Step:
    name: str
    status: str = "not run"
    seconds: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Demo:
    out: Path
    where: str
    plan: dict[str, Any]
    steps: list[Step] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> Step:
        from rich.console import Console

        console = Console()
        step = Step(name)
        self.steps.append(step)
        console.rule(f"[bold]{len(self.steps)}. {name}")
        t0 = time.perf_counter()
        try:
            step.result = fn() or {}
            step.status = "ok"
        except Exception as exc:  # noqa: BLE001 - one failed step must not hide the others
            step.status = "FAILED"
            step.error = f"{type(exc).__name__}: {exc}"
            console.print(f"[red]{name} failed: {step.error}")
            (self.out / f"{name}-error.txt").write_text(traceback.format_exc())
        step.seconds = time.perf_counter() - t0
        return step

    def add_file(self, path: Path | str) -> None:
        self.files.append(str(path))


# -- steps ---------------------------------------------------------------------------------------


def step_data(demo: Demo) -> dict[str, Any]:
    from ditperf.model import get_config
    from ditperf.trainer.data import synth_dataset

    config = get_config(demo.plan["preset"])
    folder = demo.out / "data"
    schema = synth_dataset(folder, config, demo.plan["samples"], overwrite=True)
    demo.state["data"] = folder
    demo.add_file(folder)
    return {"folder": str(folder), "samples": schema.total_samples, "preset": config.name,
            "buckets": [b.name for b in schema.buckets], "conditioning": schema.conditioning}


def step_train(demo: Demo) -> dict[str, Any]:
    from ditperf.trainer.config import load_config
    from ditperf.trainer.train import train

    ckpt = demo.out / "checkpoints"
    plan = demo.plan
    overrides = [f"data.local={demo.state['data']}", f"model.preset={plan['preset']}", "model.backend=triton",
                 f"max_duration={plan['batches']}ba", f"global_train_batch_size={plan['batch_size']}",
                 f"save_folder={ckpt}", f"save_interval={plan['batches']}ba", "save_overwrite=true",
                 f"summary_file={demo.out / 'train_summary.json'}", "run_name=ditperf-demo",
                 "console_log_interval=5ba", *plan["overrides"]]
    if demo.where == "gpu":
        overrides.append(f"callbacks.power.out_dir={demo.out / 'power'}")
    cfg = load_config(plan["config"], overrides)
    summary = train(cfg)
    trainer = summary.pop("_trainer", None)
    losses = _loss_series(trainer)
    demo.state["checkpoint"] = _newest_checkpoint(ckpt)
    demo.state["losses"] = losses
    demo.add_file(ckpt)
    demo.add_file(demo.out / "train_summary.json")
    png = demo.out / "loss.png"
    _plot_losses(losses, png, f"{plan['preset']} (triton backend) on {demo.where.upper()}")
    demo.add_file(png)
    if demo.where == "gpu" and (demo.out / "power").exists():
        demo.add_file(demo.out / "power")
    first, last = summary.get("loss_first5_mean"), summary.get("loss_last5_mean")
    if first is not None and last is not None and not last < first:
        raise RuntimeError(f"loss did not go down: {first:.4f} (first 5 batches) -> {last:.4f} (last 5)")
    keep = ("params", "batches", "samples", "loss_first5_mean", "loss_last5_mean", "img_per_s_median",
            "mfu_median", "tflops_per_device_last", "device", "precision", "wall_s")
    result = {k: summary.get(k) for k in keep}
    power = summary.get("power") or {}
    if power:
        result["power"] = power
    return result


def step_backends(demo: Demo) -> dict[str, Any]:
    import torch

    model, device = _trained_model(demo, "torch")
    g = torch.Generator().manual_seed(0)
    inputs = tuple(t.to(device) for t in model.example_inputs(4, generator=g))
    with torch.no_grad(), _autocast(device):
        ref = model(*inputs).float()
        model.set_backend("triton")
        out = model(*inputs).float()
    diff = (out - ref).abs().max().item()
    rel = diff / max(ref.abs().max().item(), 1e-12)
    tol = 5e-2 if device.type == "cuda" else 1e-4  # bf16 autocast on GPU, fp32 on CPU
    if not rel <= tol:
        raise RuntimeError(f"triton and torch backends disagree: max abs diff {diff:.3e} (relative {rel:.2e} > {tol})")
    return {"max_abs_diff": diff, "max_rel_diff": rel, "tolerance_rel": tol, "batch": 4,
            "dtype": "bf16 autocast" if device.type == "cuda" else "fp32"}


def step_export(demo: Demo) -> dict[str, Any]:
    from ditperf.cli.main import main as cli

    onnx_path = demo.out / "model.onnx"
    surgery_path = demo.out / "model.surgery.onnx"
    ckpt = demo.state.get("checkpoint")
    args = ["export", "onnx", "--preset", demo.plan["preset"], "--out", str(onnx_path), "--backend", "triton",
            "--batch", "dynamic", "--json", str(demo.out / "export.json")]
    if ckpt:
        args += ["--ckpt", str(ckpt)]
    if cli(args) != 0:
        raise RuntimeError("ditperf export onnx failed (see above)")
    if cli(["export", "surgery", str(onnx_path), str(surgery_path), "--json", str(demo.out / "surgery.json")]) != 0:
        raise RuntimeError("ditperf export surgery failed (see above)")
    coverage_json = demo.out / "coverage.json"
    rc = cli(["export", "coverage", str(surgery_path), "--json", str(coverage_json)])
    for p in (onnx_path, surgery_path, demo.out / "export.json", demo.out / "surgery.json", coverage_json):
        demo.add_file(p)
    export = json.loads((demo.out / "export.json").read_text())
    coverage = json.loads(coverage_json.read_text())
    return {"onnx": str(onnx_path), "export": _pick(export, ("opset", "nodes", "ops", "check", "notes")),
            "coverage_percent": _pick(coverage, ("summary",)).get("summary"), "fully_supported": rc == 0}


def step_sample(demo: Demo) -> dict[str, Any]:
    import torch
    from ditperf.model import sample

    model, device = _trained_model(demo, "torch")
    cfg = model.config
    n = 4
    g = torch.Generator().manual_seed(1)
    if cfg.conditioning == "class":
        cond = (torch.arange(n, device=device) % cfg.num_classes,)
    else:
        _, _, text, text_mask = model.example_inputs(n, generator=g)
        cond = (text.to(device), text_mask.to(device))
    kwargs: dict[str, Any] = {}
    if cfg.edit:
        src = torch.randn(n, cfg.latent_channels, *cfg.latent_size, generator=g).to(device)
        mask = torch.zeros(n, 1, *cfg.latent_size, device=device)
        mask[..., cfg.latent_size[0] // 4:, :] = 1.0
        kwargs = {"edit_source": src * (1 - mask), "edit_mask": mask}
    t0 = time.perf_counter()
    with _autocast(device):
        latents = sample(model, cond, steps=demo.plan["sample_steps"], cfg_scale=4.0,
                         generator=torch.Generator(device=device).manual_seed(2), **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if not torch.isfinite(latents).all():
        raise RuntimeError("sampled latents contain NaN/inf")
    png = demo.out / "samples.png"
    _plot_latents(latents.cpu(), png)
    demo.add_file(png)
    torch.save(latents.cpu(), demo.out / "samples.pt")
    demo.add_file(demo.out / "samples.pt")
    return {"shape": list(latents.shape), "steps": demo.plan["sample_steps"], "cfg_scale": 4.0,
            "seconds": seconds, "mean": latents.mean().item(), "std": latents.std().item()}


# -- helpers -------------------------------------------------------------------------------------


def _pick(doc: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: doc[k] for k in keys if k in doc}


def _autocast(device: Any) -> Any:
    import contextlib

    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _newest_checkpoint(folder: Path) -> Path | None:
    files = sorted(folder.glob("ep*-ba*-rank0.pt"), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


def _trained_model(demo: Demo, backend: str) -> tuple[Any, Any]:
    """The demo's model with the trained weights (the EMA is what Composer swaps in at the
    end of fit and saves), on the GPU when there is one."""
    import torch
    from ditperf.export.onnx_export import load_checkpoint
    from ditperf.model import DiT

    device = torch.device("cuda" if demo.where == "gpu" else "cpu")
    model = DiT(demo.plan["preset"], backend=backend).eval()
    ckpt = demo.state.get("checkpoint")
    if ckpt is None:
        raise RuntimeError("no trained checkpoint (the train step failed)")
    load_checkpoint(model, str(ckpt))
    return model.to(device), device


def _loss_series(trainer: Any) -> list[float]:
    if trainer is None:
        return []
    from composer.loggers import InMemoryLogger

    for dest in trainer.logger.destinations:
        if isinstance(dest, InMemoryLogger):
            return [float(v) for _, v in dest.data.get("loss/train/total", [])]
    return []


def _plot_losses(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, marker=".", lw=1)
    ax.set(xlabel="batch", ylabel="flow-matching loss", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_latents(latents: Any, path: Path) -> None:
    """First three latent channels of each sample as an RGB tile (per-sample normalized)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = latents.shape[0]
    fig, axes = plt.subplots(1, n, figsize=(2 * n, 2.2), squeeze=False)
    for i, ax in enumerate(axes[0]):
        img = latents[i, :3].permute(1, 2, 0)
        img = (img - img.min()) / (img.max() - img.min() + 1e-8)
        ax.imshow(img.numpy(), interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(f"sample {i}", fontsize=8)
    fig.suptitle("sampled latents (channels 0-2)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _headline(step: Step) -> str:
    r = step.result
    if step.status != "ok":
        return step.error or ""
    if step.name == "data":
        return f"{r['samples']} samples of {r['preset']} ({r['conditioning']}), buckets {', '.join(r['buckets'])}"
    if step.name == "train":
        parts = [f"{r['batches']} batches, loss {r['loss_first5_mean']:.4f} -> {r['loss_last5_mean']:.4f}"]
        if r.get("img_per_s_median"):
            parts.append(f"{r['img_per_s_median']:.1f} img/s")
        if r.get("mfu_median"):
            parts.append(f"MFU {100 * r['mfu_median']:.1f}%")
        power = r.get("power") or {}
        if power.get("proxy_util") is not None:
            parts.append(f"power-proxy {100 * power['proxy_util']:.0f}%")
        if power.get("energy_per_img_j") is not None:
            parts.append(f"{power['energy_per_img_j']:.2f} J/img")
        return ", ".join(parts)
    if step.name == "backends":
        return f"max |triton - torch| = {r['max_abs_diff']:.2e} (relative {r['max_rel_diff']:.1e}, {r['dtype']})"
    if step.name == "export":
        cov = r.get("coverage_percent") or {}
        pct = cov.get("percent_supported")
        coverage = f"{cov.get('supported_nodes')}/{cov.get('nodes')} nodes ({pct:.0f}%)" if pct is not None else "?"
        return (f"model.onnx, opset {r['export'].get('opset', '?')}; TensorRT coverage {coverage}"
                + ("" if r["fully_supported"] else " (not fully supported)"))
    if step.name == "sample":
        return f"{r['shape']} in {r['seconds']:.2f} s ({r['steps']} Euler steps, CFG {r['cfg_scale']})"
    return ""


def _print_summary(demo: Demo, versions: dict[str, str], total_s: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"ditperf demo on {versions.get('gpu')} ({demo.plan['preset']}), {total_s:.0f} s")
    table.add_column("step")
    table.add_column("status")
    table.add_column("seconds", justify="right")
    table.add_column("result")
    for s in demo.steps:
        table.add_row(s.name, s.status if s.status == "ok" else f"[red]{s.status}", f"{s.seconds:.1f}", _headline(s))
    console = Console()
    console.print(table)
    console.print(f"report: {demo.out / 'report.json'}")
    console.print("files: " + ", ".join(str(Path(f).relative_to(demo.out)) if str(f).startswith(str(demo.out))
                                         else str(f) for f in demo.files))


def run_demo(out: Path, where: str, *, batches: int | None = None, skip: tuple[str, ...] = ()) -> int:
    from ditperf.cli.version import versions

    if where == "cpu":
        import ditperf.kernels  # noqa: F401 - turns on the Triton interpreter before Composer imports triton
    plan = dict(PLANS[where])
    if batches:
        plan["batches"] = batches
    out.mkdir(parents=True, exist_ok=True)
    demo = Demo(out=out, where=where, plan=plan)
    info = versions()
    t0 = time.perf_counter()
    steps = (("data", step_data), ("train", step_train), ("backends", step_backends),
             ("export", step_export), ("sample", step_sample))
    for name, fn in steps:
        if name in skip:
            demo.steps.append(Step(name, status="skipped"))
            continue
        demo.run(name, lambda fn=fn: fn(demo))
    total = time.perf_counter() - t0
    report = {"schema_version": 1, "where": where, "plan": plan, "versions": info, "total_s": total,
              "steps": [s.__dict__ for s in demo.steps], "losses": demo.state.get("losses", []), "files": demo.files}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    _print_summary(demo, info, total)
    return 0 if all(s.status in ("ok", "skipped") for s in demo.steps) else 1


def _run(args: argparse.Namespace) -> int:
    import torch
    from ditperf.cli.errors import UserError

    where = args.device
    if where == "auto":
        where = "gpu" if torch.cuda.is_available() else "cpu"
    if where == "gpu" and not torch.cuda.is_available():
        raise UserError("--device gpu: no CUDA GPU is visible (torch.cuda.is_available() is False)")
    return run_demo(args.out, where, batches=args.batches, skip=tuple(args.skip or ()))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole library end to end on an embedded default",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("demo-report"), help="report folder (default demo-report/)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="auto: the GPU plan when CUDA is available, else the CPU plan")
    p.add_argument("--batches", type=int, default=None, help="training batches (default: 30 on CPU, 60 on GPU)")
    p.add_argument("--skip", nargs="*", choices=("data", "train", "backends", "export", "sample"),
                   help="steps to skip")
    p.set_defaults(func=_run)
