"""Real NVML and GPU paths of ditperf.profiling (run by the lead on the GPU machine).

Each prints what it measured (run with -s to see it); budget ~25 s together on an H100.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest
import torch

pytestmark = pytest.mark.gpu


def _index() -> int:
    from ditperf.profiling.readers import nvml_index_for_cuda_device

    return nvml_index_for_cuda_device(torch.cuda.current_device())


def test_nvml_reader_reads_real_fields():
    from ditperf.profiling.readers import NvmlReader

    r = NvmlReader([_index()])
    try:
        (info,) = r.devices()
        a = r.read(info.index)
        time.sleep(0.2)
        b = r.read(info.index)
    finally:
        r.close()
    print(f"\n{info}\n{a}")
    assert info.power_limit_w is not None and info.power_limit_w > 50
    assert info.power_field in ("NVML_FI_DEV_POWER_INSTANT", "nvmlDeviceGetPowerUsage")
    assert a.power_w is not None and 5 < a.power_w < 2 * info.power_limit_w
    assert a.energy_mj is not None and b.energy_mj >= a.energy_mj
    assert a.sm_clock_mhz and a.mem_clock_mhz and a.temp_c and a.gpu_util_pct is not None
    assert a.clock_reasons is not None


def test_energy_counter_increases_under_matmul_load():
    from ditperf.profiling.power import PowerMonitor
    from ditperf.profiling.readers import NvmlReader

    idx = _index()
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    with PowerMonitor(reader=NvmlReader([idx]), interval_s=0.02, idle_s=0.5, calibration=None) as mon:
        mon.begin_window("matmul")
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < 2.0:
            for _ in range(10):
                x @ x
            torch.cuda.synchronize()
            n += 10
        s = mon.end_window("matmul", items=n)
    d = s["devices"][str(idx)]
    print(f"\nidle {mon.idle_power_w[idx]:.0f} W; matmul window: {json.dumps(d, indent=1)}")
    assert d["energy_source"] == "counter" and d["energy_j"] > 0
    assert d["mean_power_w"] > mon.idle_power_w[idx] + 50
    assert d["energy_j_samples"] == pytest.approx(d["energy_j"], rel=0.3)
    assert d["energy_update_period_s"] is not None and d["samples"] > 20
    assert 0 < d["power_proxy_util"] <= 1.2


def test_profile_power_cli_real(tmp_path):
    child = textwrap.dedent("""
        import time, torch
        from ditperf.profiling import power_window
        x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        with power_window("matmul", items=200):
            for _ in range(200):
                x @ x
    """)
    out = tmp_path / "p"
    proc = subprocess.run([sys.executable, "-m", "ditperf.cli", "profile", "power", "--idle-seconds", "0.5",
                           "--out", str(out), "--", sys.executable, "-c", child],
                          capture_output=True, text=True, timeout=120, check=False)
    print(proc.stdout[-3000:], proc.stderr[-2000:])
    assert proc.returncode == 0
    doc = json.loads((out / "power.json").read_text())
    names = {w["name"] for w in doc["windows"]}
    assert names == {"command", "matmul"}
    assert (out / "power_timeline.png").exists()


def test_calibrate_short(tmp_path, monkeypatch):
    from ditperf.profiling.calibration import find_calibration
    from ditperf.profiling.sweep import run_calibration

    monkeypatch.setenv("DITPERF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DITPERF_POWER_CALIBRATION", raising=False)
    cal, _paths = run_calibration(seconds=3.0, min_point_s=0.3, out=tmp_path / "cal.json", progress=False)
    print("\n" + json.dumps({"key": cal.key, "roof": cal.roof_tflops, "knots_w": cal.knots_power_w,
                             "knots_mfu": cal.knots_mfu,
                             "points": [(p["label"], round(p["power_w"]), round(p["mfu"], 3)) for p in cal.points],
                             "copy": cal.memory_bound}, indent=1))
    assert len(cal.points) == 10 and cal.points[0]["label"] == "idle"
    assert cal.roof_tflops > 50
    full = next(p for p in cal.points if p["label"] == "gemm n=8192 duty=1")
    assert full["mfu"] > 0.4 and full["power_w"] > cal.idle_power_w + 50
    assert all(b >= a for a, b in zip(cal.knots_mfu, cal.knots_mfu[1:]))
    assert (tmp_path / "cal.png").exists() and (tmp_path / "cal.json").exists()
    from ditperf.profiling.readers import NvmlReader

    r = NvmlReader([_index()])
    found, note = find_calibration(r.devices()[0])
    r.close()
    assert found is not None and found.key == cal.key, note


def test_kernels_quick(tmp_path):
    from ditperf.profiling.roofline import run_kernels

    doc, paths = run_kernels(tmp_path, quick=True)
    for r in doc["rows"]:
        print(r["kernel"], r["shape"], r["provider"], r["ms"], r.get("pct_roof"), r.get("bound"), r.get("error"))
    baselines = [r for r in doc["rows"] if r["provider"] != "ditperf"]
    assert baselines and all(r["ms"] and r["ms"] > 0 for r in baselines)
    attn = next(r for r in baselines if r["kernel"] == "attention")
    ln = next(r for r in baselines if r["kernel"] == "layer_norm")
    assert attn["bound"] == "compute" and ln["bound"] == "memory"
    assert all(p.exists() for p in paths)
