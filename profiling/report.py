"""Power report files: JSON summary, CSV of samples, PNG timeline; and a console summary.

JSON schema (``schema_version`` 1, ``format`` "ditperf-power-report")::

    {
      "schema_version": 1, "format": "ditperf-power-report",
      "created": ISO-8601 UTC, "reader": "nvml" | "replay:<file>",
      "interval_s": requested sampling interval,
      "duration_s": monitor run time, "command": [argv] | null, "exit_code": int | null,
      "devices": [{"index", "name", "uuid", "driver", "power_limit_w", "power_field",
                   "energy_counter", "notes": [...],
                   "idle_power_w", "samples", "update": {power_update_period_s,
                   power_update_period_resolved, energy_update_period_s,
                   energy_update_period_resolved, sample_interval_s},
                   "calibration": note string}],
      "idle_source": "measured" | "given",
      "windows": [{"name", "t_start_s", "t_end_s" (from monitor start), "duration_s",
                   "items", "depth", "warnings": [...],
                   "devices": {"<index>": {energy_j, energy_source ("counter"|"samples"),
                       energy_j_counter, energy_j_samples, mean_power_w, sample_mean_power_w,
                       p50_power_w, peak_power_w, power_limit_w, power_proxy_util,
                       power_proxy_util_net_idle, idle_power_w, samples, sample_rate_hz,
                       *update periods*, energy_counter_wraps, energy_counter_resets,
                       energy_counter_longest_stall_s, mean_sm_clock_mhz,
                       mean_mem_clock_mhz, mean_gpu_util_pct, mean_mem_util_pct,
                       max_temp_c, clock_reasons_share {reason: share}, throttle_share,
                       j_per_item, estimated_mfu, [estimated_tflops,
                       estimated_mfu_in_range]}},
                   "flops": analytic FLOPs given for the window | null,
                   "total": {energy_j, mean_power_w, j_per_item, estimated_mfu, flops,
                             achieved_tflops, flops_mfu}}],
      "warnings": [...], "warnings_dropped": int (beyond the first 500),
      "read_errors": int, "first_read_error": str | null
    }

Units: seconds, watts, joules, MHz, percent for utilization, fractions (0..1) for
``*_util``, ``*_share`` and ``estimated_mfu``. ``null`` = not available.

CSV columns: ``t_s`` (from monitor start), ``device``, then the reading fields
(``power_w, energy_mj, limit_w, sm_clock_mhz, mem_clock_mhz, gpu_util_pct, mem_util_pct,
temp_c, clock_reasons``), empty where unsupported.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ditperf.profiling.readers import READING_FIELDS

if TYPE_CHECKING:
    from ditperf.profiling.power import PowerMonitor

SCHEMA_VERSION = 1
FORMAT = "ditperf-power-report"


def _clean(v: Any) -> Any:
    """JSON-safe: NaN/inf -> None, recursively."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def build_report(mon: PowerMonitor, *, command: list[str] | None = None, exit_code: int | None = None,
                 **extra: Any) -> dict[str, Any]:
    end = mon.t_stop if mon.t_stop is not None else mon.reader.now()
    devices = []
    for info in mon.infos:
        d = info.to_dict()
        d["idle_power_w"] = mon.idle_power_w.get(info.index)
        d["samples"] = len(mon.samples[info.index])
        d["update"] = mon.update_periods(info.index)
        d["calibration"] = mon.calibration_notes.get(info.index)
        devices.append(d)
    doc = {
        "schema_version": SCHEMA_VERSION,
        "format": FORMAT,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "reader": mon.reader.name,
        "interval_s": mon.interval_s,
        "duration_s": end - mon.t_start if mon.t_start is not None else None,
        "command": command,
        "exit_code": exit_code,
        "devices": devices,
        "idle_source": mon.idle_source,
        "windows": mon.windows,
        "warnings": list(mon.warnings),
        "warnings_dropped": mon.warnings_dropped,
        "read_errors": mon.errors,
        "first_read_error": mon.first_error,
        **extra,
    }
    return _clean(doc)


def write_json(doc: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(doc, indent=2))
    return p


def write_csv(mon: PowerMonitor, path: str | os.PathLike[str]) -> Path:
    """All samples, one row per (time, device), time from the monitor start."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    t0 = mon.t_start or 0.0
    with p.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t_s", "device", *READING_FIELDS[1:]])
        for info in mon.infos:
            for r in mon.samples[info.index]:
                row = [f"{r.t - t0:.6f}", info.index]
                for name in READING_FIELDS[1:]:
                    v = getattr(r, name)
                    row.append("" if v is None else (int(v) if name == "clock_reasons" else v))
                w.writerow(row)
    return p


def write_timeline_png(mon: PowerMonitor, path: str | os.PathLike[str], title: str | None = None) -> Path:
    """Power (with limit and idle), clocks and utilization over time; windows shaded."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    t0 = mon.t_start or 0.0
    fig = Figure(figsize=(11, 7.5), dpi=110)
    FigureCanvasAgg(fig)
    ax_p, ax_c, ax_u = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [2, 1, 1]})

    def col(rows: list, name: str) -> list[float]:
        return [math.nan if getattr(r, name) is None else float(getattr(r, name)) for r in rows]

    for info in mon.infos:
        rows = mon.samples[info.index]
        ts = [r.t - t0 for r in rows]
        tag = f"GPU {info.index}" if len(mon.infos) > 1 else info.name
        (line,) = ax_p.plot(ts, col(rows, "power_w"), lw=1.0, label=f"{tag} power")
        lim = col(rows, "limit_w")
        if any(math.isfinite(x) for x in lim):
            ax_p.plot(ts, lim, ls="--", lw=0.8, color=line.get_color(), alpha=0.7, label=f"{tag} limit")
        idle = mon.idle_power_w.get(info.index)
        if idle is not None:
            ax_p.axhline(idle, ls=":", lw=0.8, color=line.get_color(), alpha=0.7, label=f"{tag} idle")
        ax_c.plot(ts, col(rows, "sm_clock_mhz"), lw=0.9, label=f"{tag} SM")
        ax_c.plot(ts, col(rows, "mem_clock_mhz"), lw=0.9, ls="--", label=f"{tag} mem")
        ax_u.plot(ts, col(rows, "gpu_util_pct"), lw=0.9, label=f"{tag} GPU util")
        ax_u.plot(ts, col(rows, "mem_util_pct"), lw=0.9, ls="--", label=f"{tag} mem util")
    palette = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]
    shown = mon.windows if len(mon.windows) <= 60 else []  # thousands of spans: unreadable, slow
    for k, w in enumerate(shown):
        color = palette[k % len(palette)]
        for ax in (ax_p, ax_c, ax_u):
            ax.axvspan(w["t_start_s"], w["t_end_s"], color=color, alpha=0.08 + 0.04 * min(w.get("depth", 0), 3))
        top = 0.98 - 0.07 * (min(w.get("depth", 0), 5))
        ax_p.text(w["t_start_s"], top, f" {w['name']}", transform=ax_p.get_xaxis_transform(), fontsize=8,
                  va="top", color=color)
    ax_p.set_ylim(bottom=0)
    ax_p.set_ylabel("power (W)")
    ax_c.set_ylabel("clock (MHz)")
    ax_u.set_ylabel("utilization (%)")
    ax_u.set_xlabel("time since monitor start (s)")
    ax_u.set_ylim(-2, 102)
    for ax in (ax_p, ax_c, ax_u):
        ax.grid(alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=7, loc="upper right", ncol=2)
    fig.suptitle(title or f"ditperf power timeline ({mon.reader.name}, {mon.interval_s * 1e3:.0f} ms sampling)")
    fig.tight_layout()
    fig.savefig(p)
    return p


def write_report(mon: PowerMonitor, out_dir: str | os.PathLike[str], *, prefix: str = "power", png: bool = True,
                 **extra: Any) -> dict[str, Path]:
    """Write ``<prefix>.json``, ``<prefix>_samples.csv`` and ``<prefix>_timeline.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": write_json(build_report(mon, **extra), out / f"{prefix}.json"),
        "csv": write_csv(mon, out / f"{prefix}_samples.csv"),
    }
    if png:
        paths["png"] = write_timeline_png(mon, out / f"{prefix}_timeline.png")
    return paths


def _fmt(v: Any, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v * scale, spec) + suffix


def print_summary(doc: dict[str, Any], console: Any = None) -> None:
    """A rich table: one row per (window, device)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=max(175, Console().width))
    table = Table(title=f"power ({doc.get('reader')}, {_fmt(doc.get('interval_s'), '.0f', 1e3)} ms sampling)")
    cols = ["window", "GPU", "time s", "energy J", "src", "mean W", "p50 W", "peak W", "limit W", "util",
            "net idle", "J/item", "est.MFU", "flops MFU", "samples (Hz)", "upd ms", "throttle"]
    for c in cols:
        table.add_column(c, justify="left" if c in ("window", "src") else "right")
    for w in sorted(doc.get("windows", []), key=lambda w: (w["t_start_s"], w.get("depth", 0))):
        for dev, s in w["devices"].items():
            upd = s.get("energy_update_period_s") or s.get("power_update_period_s")
            table.add_row(
                "  " * int(w.get("depth", 0)) + w["name"], dev, _fmt(w["duration_s"], ".2f"),
                _fmt(s.get("energy_j"), ".1f"), s.get("energy_source", "-"), _fmt(s.get("mean_power_w"), ".0f"),
                _fmt(s.get("p50_power_w"), ".0f"), _fmt(s.get("peak_power_w"), ".0f"),
                _fmt(s.get("power_limit_w"), ".0f"), _fmt(s.get("power_proxy_util"), ".0f", 100, "%"),
                _fmt(s.get("power_proxy_util_net_idle"), ".0f", 100, "%"), _fmt(s.get("j_per_item"), ".3g"),
                _fmt(s.get("estimated_mfu"), ".0f", 100, "%"),
                _fmt((w.get("total") or {}).get("flops_mfu"), ".0f", 100, "%"),
                f"{s.get('samples', 0)} ({_fmt(s.get('sample_rate_hz'), '.0f')})", _fmt(upd, ".0f", 1e3),
                _fmt(s.get("throttle_share"), ".0f", 100, "%"))
    console.print(table)
    if any(s.get("estimated_mfu") is not None for w in doc.get("windows", []) for s in w["devices"].values()):
        console.print("est.MFU: the dense-GEMM MFU that draws this power (calibration); an upper bound for "
                      "mixed work (memory-bound kernels draw power too: ~2x the analytic MFU on DiT training "
                      "steps on an H100); flops MFU: analytic FLOPs / measured matmul roof")
    for d in doc.get("devices", []):
        notes = "; ".join(d.get("notes") or [])
        console.print(f"GPU {d['index']} {d['name']}: power from {d['power_field']}, idle "
                      f"{_fmt(d.get('idle_power_w'), '.0f')} W ({doc.get('idle_source')})"
                      + (f"; {notes}" if notes else "") + (f"; {d['calibration']}" if d.get("calibration") else ""))
    for msg in doc.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {msg}")


__all__ = ["FORMAT", "SCHEMA_VERSION", "build_report", "print_summary", "write_csv", "write_json",
           "write_report", "write_timeline_png"]
