"""The calibration sweep behind ``ditperf profile calibrate`` (GPU only).

Points, each run for ``seconds / 10`` (at least 1 s) after a short warm-up, inside a
:class:`PowerMonitor` window:

* idle (measured when the monitor starts): MFU 0 at idle power, anchors the map;
* bf16 GEMMs at full duty for n = 1024, 2048, 4096, 8192 (small ones are launch-bound:
  low MFU at modest power);
* n = 8192 at duty cycles 0.1, 0.25, 0.5, 0.75 and n = 4096 at 0.5: bursts of matmuls
  (~20 ms period), then ``sleep`` for the rest of the period, so the window's mean power
  and achieved TFLOP/s both scale with the duty;
* a device-to-device copy (memory-bound): recorded, not fitted (power without MFU).

Achieved TFLOP/s = 2 n^3 x matmuls / window duration (the window edges synchronize CUDA);
MFU = achieved / measured bf16 matmul roof (:func:`ditperf.profiling.measure_roofs`).
Inputs are random normal bf16 (zeros would draw less power and run faster than real data).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ditperf.profiling.calibration import Calibration, default_calibration_path, save_calibration
from ditperf.profiling.power import PowerMonitor
from ditperf.profiling.readers import NvmlReader, PowerUnavailable, nvml_index_for_cuda_device

PERIOD_S = 0.02
PLAN: tuple[tuple[int, float], ...] = (
    (1024, 1.0), (2048, 1.0), (8192, 0.1), (8192, 0.25), (4096, 0.5), (8192, 0.5), (8192, 0.75),
    (4096, 1.0), (8192, 1.0),
)


def _gemm_point(mon: PowerMonitor, idx: int, n: int, duty: float, seconds: float, roof: float) -> dict[str, Any]:
    import torch
    from ditperf.profiling.timing import time_ms

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: torch.matmul(a, b, out=c), warmup_ms=10, rep_ms=50)
    k = max(1, round(duty * PERIOD_S / (ms * 1e-3)))

    def burst() -> float:
        tb = time.perf_counter()
        for _ in range(k):
            torch.matmul(a, b, out=c)
        torch.cuda.synchronize()
        busy = time.perf_counter() - tb
        if duty < 1.0:
            time.sleep(busy * (1.0 - duty) / duty)
        return busy

    t_warm = time.perf_counter()
    while time.perf_counter() - t_warm < min(0.5, seconds / 4):
        burst()
    label = f"gemm n={n} duty={duty:g}"
    mon.begin_window(label)
    count = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        burst()
        count += k
    s = mon.end_window(label)
    dev = s["devices"][str(idx)]
    tflops = 2.0 * n**3 * count / s["duration_s"] / 1e12
    return {"label": label, "n": n, "duty": duty, "tflops": tflops, "mfu": tflops / roof,
            "power_w": dev["mean_power_w"], "seconds": s["duration_s"], "matmul_ms": ms,
            "mean_sm_clock_mhz": dev.get("mean_sm_clock_mhz"), "throttle_share": dev.get("throttle_share"),
            "energy_source": dev.get("energy_source")}


def _copy_point(mon: PowerMonitor, idx: int, seconds: float, mib: int = 1024) -> dict[str, Any]:
    import torch

    src = torch.randn(mib * 2**20 // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    for _ in range(5):
        dst.copy_(src)
    label = f"copy {mib} MiB"
    mon.begin_window(label)
    count = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(8):
            dst.copy_(src)
        torch.cuda.synchronize()
        count += 8
    s = mon.end_window(label)
    dev = s["devices"][str(idx)]
    gbps = 2.0 * src.numel() * src.element_size() * count / s["duration_s"] / 1e9
    return {"label": label, "gbps": gbps, "power_w": dev["mean_power_w"], "seconds": s["duration_s"]}


def run_calibration(*, seconds: float = 60.0, device: int = 0, interval_s: float = 0.02, out: Path | None = None,
                    save: bool = True, progress: bool = True, min_point_s: float = 1.0
                    ) -> tuple[Calibration, list[Path]]:
    """Run the sweep on CUDA device ``device``, fit, store; returns (calibration, paths written).

    Each of the 10 points runs ``max(min_point_s, seconds / 10)`` seconds (NVML power needs
    about a second to settle; tests pass a smaller ``min_point_s``)."""
    import torch
    from ditperf.cli.version import versions
    from ditperf.profiling.report import write_report
    from ditperf.profiling.timing import measure_roofs

    if not torch.cuda.is_available():
        raise PowerUnavailable("calibration needs a CUDA GPU")
    torch.cuda.set_device(device)
    idx = nvml_index_for_cuda_device(device)
    mon = PowerMonitor(reader=NvmlReader([idx]), interval_s=interval_s, idle_s=min(2.0, max(0.5, seconds / 30)),
                       calibration=None, close_reader=True)
    info = mon.infos[0]
    per_point = max(min_point_s, seconds / (len(PLAN) + 1))
    points: list[dict[str, Any]] = []
    with mon:
        idle = mon.idle_power_w[idx]
        roofs = measure_roofs()
        from rich.progress import Progress

        with Progress(disable=not progress, transient=True) as bar:
            task = bar.add_task("calibrating", total=len(PLAN) + 1)
            for n, duty in PLAN:
                bar.update(task, description=f"gemm n={n} duty={duty:g}")
                points.append(_gemm_point(mon, idx, n, duty, per_point, roofs.matmul_tflops))
                bar.advance(task)
            bar.update(task, description="device copy")
            copy = _copy_point(mon, idx, per_point)
            bar.advance(task)
        torch.cuda.empty_cache()
    if idle is not None:
        points.insert(0, {"label": "idle", "n": 0, "duty": 0.0, "tflops": 0.0, "mfu": 0.0, "power_w": idle,
                          "seconds": mon.idle_s})
    missing = [pt["label"] for pt in points if pt["power_w"] is None]
    if missing:
        raise PowerUnavailable(f"no power readings for calibration points {missing} (see the monitor warnings)")
    cal = Calibration.fit(points, gpu_name=info.name, driver=info.driver, power_limit_w=info.power_limit_w,
                          roof_tflops=roofs.matmul_tflops, idle_power_w=idle, memory_bound=copy,
                          software={**versions(), "power_field": info.power_field, "roofs": str(roofs.to_dict())})
    paths: list[Path] = []
    if save:
        try:
            paths.append(save_calibration(cal))
        except OSError as exc:  # e.g. a read-only home: --out still gets written
            if out is None:
                raise PowerUnavailable(f"cannot write the calibration to {default_calibration_path()}: "
                                       f"{exc.strerror or exc} (set DITPERF_CACHE_DIR or pass --out)") from None
            print(f"warning: cannot write the user cache {default_calibration_path()}: {exc.strerror or exc}")
            save = False
    if out is not None:
        out = Path(out)
        if not (save and out.resolve() == default_calibration_path().resolve()):
            paths.append(save_calibration(cal, out))
        paths.append(plot_calibration(cal, out.with_suffix(".png")))
        rep = write_report(mon, out.parent, prefix=out.stem + "_power")
        paths.extend(rep.values())
    return cal, paths


def plot_calibration(cal: Calibration, path: str | os.PathLike[str]) -> Path:
    """Scatter of the sweep points (power vs MFU), the fitted monotone map, the copy point."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(7, 4.8), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter([pt["power_w"] for pt in cal.points], [100 * pt["mfu"] for pt in cal.points], label="sweep points",
               zorder=3)
    for pt in cal.points:
        ax.annotate(pt["label"].replace("gemm ", ""), (pt["power_w"], 100 * pt["mfu"]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    ax.plot(cal.knots_power_w, [100 * m for m in cal.knots_mfu], color="C1", label="monotone fit")
    if cal.memory_bound:
        ax.scatter([cal.memory_bound["power_w"]], [0], marker="x", color="C3", zorder=3,
                   label=f"memory-bound copy ({cal.memory_bound['gbps']:.0f} GB/s)")
    if cal.power_limit_w:
        ax.axvline(cal.power_limit_w, ls="--", color="gray", lw=0.8, label="power limit")
    ax.set_xlabel("mean power (W)")
    ax.set_ylabel(f"MFU (% of measured {cal.roof_tflops:.0f} TFLOP/s bf16 roof)")
    ax.set_title(f"power -> MFU calibration: {cal.gpu_name}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(p)
    return p


def print_calibration(cal: Calibration) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"calibration {cal.key} (roof {cal.roof_tflops:.0f} TFLOP/s)")
    for col in ("point", "TFLOP/s", "MFU", "mean W", "fit MFU at W"):
        table.add_column(col, justify="left" if col == "point" else "right")
    for pt in cal.points:
        table.add_row(pt["label"], f"{pt['tflops']:.1f}", f"{100 * pt['mfu']:.1f}%", f"{pt['power_w']:.0f}",
                      f"{100 * cal.mfu_at(pt['power_w']):.1f}%")
    if cal.memory_bound:
        mb = cal.memory_bound
        table.add_row(f"{mb['label']} (not fitted)", f"{mb['gbps']:.0f} GB/s", "-", f"{mb['power_w']:.0f}",
                      f"{100 * cal.mfu_at(mb['power_w']):.1f}%")
    Console(width=max(120, Console().width)).print(table)
    print(cal.caveat)


__all__ = ["PLAN", "plot_calibration", "print_calibration", "run_calibration"]
