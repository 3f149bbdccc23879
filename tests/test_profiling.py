"""Power monitor bookkeeping, statistics, readers and report files, on replayed traces.

Deterministic tests drive a :class:`ReplayReader` with a :class:`ManualClock` and call
``PowerMonitor.sample()`` themselves (``background=False``); one test runs the real thread.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import types

import numpy as np
import pytest
from ditperf.profiling.calibration import Calibration, save_calibration
from ditperf.profiling.power import (
    PowerMonitor,
    counter_energy_at,
    detect_update_period,
    hold_shares,
    integrate,
    longest_stall,
    unwrap_counter,
)
from ditperf.profiling.readers import (
    DeviceInfo,
    ManualClock,
    NvmlReader,
    PowerUnavailable,
    ReplayReader,
    synthetic_trace,
)
from ditperf.profiling.report import (
    build_report,
    print_summary,
    write_csv,
    write_json,
    write_timeline_png,
)

DT = 0.02  # sampling interval used by the deterministic tests


def step_power(idle: float, busy: float, t_on: float, t_off: float):
    return lambda t: busy if t_on <= t < t_off else idle


def make_monitor(traces, *, idle_power_w=None, calibration=None):
    clock = ManualClock()
    reader = ReplayReader([i for i, _ in traces], {i.index: s for i, s in traces}, clock=clock)
    mon = PowerMonitor(reader=reader, interval_s=DT, idle_power_w=idle_power_w, background=False,
                       calibration=calibration, sync_cuda=False)
    mon.start()
    return mon, clock


def run_until(mon, clock, t_rel: float) -> None:
    """Advance the clock in DT steps (sampling each) until t_rel seconds after the trace start.
    The small offset keeps sample times away from the trace's update instants."""
    target = mon.reader.start + t_rel
    while clock.t < target - 1e-9:
        clock.advance(min(DT, target - clock.t))
        mon.sample()


# --------------------------------------------------------------------------------------
# pure statistics
# --------------------------------------------------------------------------------------


def test_unwrap_counter_handles_32bit_wrap_and_resets():
    t = np.arange(6, dtype=float) * 0.1
    start = 2.0**32 - 15_000.0
    raw = np.array([start, start + 10_000, (start + 20_000) % 2**32, (start + 30_000) % 2**32, 500.0, 10_500.0])
    power = np.full(6, 100.0)  # 100 W x 0.1 s = 10 J = 10_000 mJ per step
    cum, wraps, resets = unwrap_counter(t, raw, power, max_power_w=1400)
    assert wraps == 1 and resets == 1
    np.testing.assert_allclose(np.diff(cum), [10_000] * 5)  # the reset interval is integrated from power


def test_integrate_is_exact_for_piecewise_linear_power():
    t = np.array([0.0, 1.0, 2.0, 3.0])
    p = np.array([100.0, 300.0, 300.0, 100.0])
    assert integrate(t, p, 0.0, 3.0) == pytest.approx(200 + 300 + 200)
    assert integrate(t, p, 0.5, 1.5) == pytest.approx(0.5 * (200 + 300) / 2 + 0.5 * 300)
    assert integrate(t, p, 2.0, 2.0) == 0.0


@pytest.mark.parametrize("period,resolved", [(0.1, True), (0.05, True), (0.01, False)])
def test_detect_update_period(period, resolved):
    t = np.arange(0, 4, DT)
    rng = np.random.default_rng(int(period * 1e3))
    levels = rng.uniform(100, 600, size=int(4 / period) + 2)
    v = levels[np.floor(t / period + 1e-9).astype(int)]
    got, ok = detect_update_period(t, v)
    assert ok is resolved
    assert got == pytest.approx(max(period, DT), rel=0.15)


def test_longest_stall_and_hold_shares():
    t = np.arange(10) * 0.5
    e = np.array([0, 1, 2, 2, 2, 2, 3, 4, 4, 5], dtype=float)
    p = np.full(10, 200.0)
    assert longest_stall(t, e, p) == pytest.approx(1.5)
    assert longest_stall(t, e, np.zeros(10)) == 0.0  # no power drawn: not stuck
    masks = np.array([0, 0, 4, 4, 4, 4, 0, 0, 0x24, 0])
    shares = hold_shares(t, masks, 0.0, 5.0)
    assert shares[0x4] == pytest.approx(2.5 / 5.0)
    assert shares[0x20] == pytest.approx(0.5 / 5.0)


def test_counter_energy_at_corrects_refresh_lag():
    # counter refreshed every 0.1 s with 100 W; sampled every 0.02 s
    tp = np.arange(0, 1.0001, DT)
    pp = np.full_like(tp, 100.0)
    cum = np.floor(tp / 0.1 + 1e-9) * 0.1 * 100.0 * 1e3  # mJ, step function
    # a plain read at 0.47 s shows 40 J; the estimate adds the 0.07 s since the last refresh
    assert counter_energy_at(0.47, tp, cum, tp, pp) / 1e3 == pytest.approx(47.0, abs=2.0)


# --------------------------------------------------------------------------------------
# monitor windows on replayed traces
# --------------------------------------------------------------------------------------


def test_window_energy_power_and_utilization():
    idle, busy = 80.0, 520.0
    info, s = synthetic_trace(step_power(idle, busy, 1.0, 3.0), 5.0, update_period_s=0.1, limit_w=700.0)
    mon, clock = make_monitor([(info, s)], idle_power_w=idle)
    run_until(mon, clock, 1.2)
    mon.begin_window("busy")
    run_until(mon, clock, 2.8)
    w = mon.end_window("busy", items=32)
    d = w["devices"]["0"]
    true_j = busy * 1.6
    assert d["energy_source"] == "counter"
    # counter edges are known to within about one sampling interval of power
    assert d["energy_j"] == pytest.approx(true_j, abs=2 * DT * busy)
    assert d["energy_j_samples"] == pytest.approx(true_j, abs=2 * DT * busy)
    assert d["mean_power_w"] == pytest.approx(busy, rel=0.03)
    assert d["p50_power_w"] == busy and d["peak_power_w"] == busy
    assert d["power_proxy_util"] == pytest.approx(busy / 700.0, rel=0.03)
    assert d["power_proxy_util_net_idle"] == pytest.approx((busy - idle) / (700.0 - idle), rel=0.03)
    assert d["j_per_item"] == pytest.approx(d["energy_j"] / 32)
    assert w["total"]["energy_j"] == pytest.approx(d["energy_j"])
    assert d["samples"] == pytest.approx(1.6 / DT, abs=4)  # + the samples taken at both edges
    assert d["sample_rate_hz"] == pytest.approx(1 / DT, rel=0.06)
    assert d["energy_update_period_s"] == pytest.approx(0.1, rel=0.15)
    assert d["energy_update_period_resolved"] is True
    assert d["throttle_share"] == 0.0
    assert d["estimated_mfu"] is None
    assert not w["warnings"]


def test_nested_windows_and_misuse():
    info, s = synthetic_trace(step_power(70.0, 400.0, 0.5, 10.0), 4.0, update_period_s=0.05)
    mon, clock = make_monitor([(info, s)], idle_power_w=70.0)
    mon.begin_window("outer")
    run_until(mon, clock, 1.0)
    mon.begin_window("inner")
    with pytest.raises(ValueError, match="already open"):
        mon.begin_window("inner")
    run_until(mon, clock, 2.0)
    inner = mon.end_window("inner")
    run_until(mon, clock, 3.0)
    outer = mon.end_window("outer")
    with pytest.raises(ValueError, match="not open"):
        mon.end_window("inner")
    with pytest.raises(ValueError, match="items"):
        mon.begin_window("x")
        mon.end_window("x", items=-3)
    assert inner["depth"] == 1 and outer["depth"] == 0
    e_in, e_out = inner["devices"]["0"]["energy_j"], outer["devices"]["0"]["energy_j"]
    assert e_in == pytest.approx(400.0, abs=2 * DT * 400)
    assert e_out == pytest.approx(0.5 * 70 + 2.5 * 400, abs=4 * DT * 400)
    assert [w["name"] for w in mon.windows] == ["inner", "outer"]


def test_monitor_argument_checks():
    info, s = synthetic_trace(lambda t: 100.0, 1.0)
    reader = ReplayReader([info], {0: s}, clock=ManualClock())
    with pytest.raises(ValueError, match="interval_s"):
        PowerMonitor(reader=reader, interval_s=0)
    mon = PowerMonitor(reader=reader, background=False, calibration=None)
    with pytest.raises(RuntimeError, match="start"):
        mon.begin_window("early")


def test_energy_counter_wraparound_gives_same_energy():
    power = step_power(90.0, 600.0, 0.3, 3.0)
    plain = synthetic_trace(power, 3.0, update_period_s=0.05, energy_start_mj=2.0**32 - 700_000)
    wrapped = synthetic_trace(power, 3.0, update_period_s=0.05, energy_start_mj=2.0**32 - 700_000,
                              energy_wrap=2.0**32)
    assert min(x["energy_mj"] for x in wrapped[1]) < 700_000  # it really wraps inside the window
    results = []
    for trace in (plain, wrapped):
        mon, clock = make_monitor([trace], idle_power_w=90.0)
        run_until(mon, clock, 0.5)
        mon.begin_window("w")
        run_until(mon, clock, 2.5)
        results.append(mon.end_window("w"))
    a, b = (r["devices"]["0"] for r in results)
    assert b["energy_source"] == "counter" and b["energy_counter_wraps"] == 1
    assert b["energy_j"] == pytest.approx(a["energy_j"], rel=1e-9)
    assert any("wrapped" in w for w in results[1]["warnings"])


def test_stuck_counter_falls_back_to_samples():
    info, s = synthetic_trace(lambda t: 450.0, 6.0, update_period_s=0.05, stuck=(1.0, 4.0))
    mon, clock = make_monitor([(info, s)], idle_power_w=80.0)
    run_until(mon, clock, 1.5)
    mon.begin_window("stuck")
    run_until(mon, clock, 3.5)
    w = mon.end_window("stuck")
    d = w["devices"]["0"]
    assert d["energy_source"] == "samples"
    assert d["energy_j_counter"] == pytest.approx(0.0, abs=450 * 2 * DT)  # the frozen counter read ~0 J
    assert d["energy_j"] == pytest.approx(450.0 * 2.0, rel=0.02)
    assert d["energy_counter_longest_stall_s"] >= 1.9
    assert any("stuck" in msg for msg in w["warnings"])


def test_short_window_warns_and_uses_samples():
    info, s = synthetic_trace(lambda t: 300.0 + 100.0 * (int(t / 0.1) % 2), 3.0, update_period_s=0.1)
    mon, clock = make_monitor([(info, s)], idle_power_w=60.0)
    run_until(mon, clock, 1.0)
    mon.begin_window("tiny")
    run_until(mon, clock, 1.04)
    w = mon.end_window("tiny")
    d = w["devices"]["0"]
    assert d["energy_source"] == "samples"
    assert any("shorter than the energy counter's update period" in msg for msg in w["warnings"])
    assert d["energy_j"] == pytest.approx(d["energy_j_samples"])
    assert 0.04 * 300 <= d["energy_j"] <= 0.04 * 400 + 1e-6


def test_throttle_share_and_reason_names():
    def reasons(t: float) -> int:  # idle at first, then the power cap in the second half
        return 0x4 if t >= 2.0 else (0x1 if t < 0.5 else 0)

    info, s = synthetic_trace(lambda t: 650.0, 4.0, update_period_s=0.05, reasons=reasons)
    mon, clock = make_monitor([(info, s)], idle_power_w=70.0)
    run_until(mon, clock, 1.0)
    mon.begin_window("w")
    run_until(mon, clock, 3.0)
    d = mon.end_window("w")["devices"]["0"]
    assert d["throttle_share"] == pytest.approx(0.5, abs=0.05)
    assert d["clock_reasons_share"]["sw_power_cap"] == pytest.approx(0.5, abs=0.05)
    assert "gpu_idle" not in d["clock_reasons_share"]


def test_two_devices_totals():
    a = synthetic_trace(lambda t: 200.0, 3.0, index=0)
    b = synthetic_trace(lambda t: 500.0, 3.0, index=1)
    mon, clock = make_monitor([a, b], idle_power_w={0: 60.0, 1: 70.0})
    run_until(mon, clock, 0.5)
    mon.begin_window("w")
    run_until(mon, clock, 2.5)
    w = mon.end_window("w", items=10)
    e0, e1 = w["devices"]["0"]["energy_j"], w["devices"]["1"]["energy_j"]
    assert w["total"]["energy_j"] == pytest.approx(e0 + e1)
    assert w["total"]["j_per_item"] == pytest.approx((e0 + e1) / 10)
    assert w["total"]["mean_power_w"] == pytest.approx(700.0, rel=0.03)
    assert w["devices"]["1"]["idle_power_w"] == 70.0


def test_estimated_mfu_from_calibration(tmp_path):
    info, s = synthetic_trace(lambda t: 500.0, 3.0, name="Fake H100", driver="550.00", limit_w=700.0)
    cal = Calibration.fit([{"power_w": 80.0, "mfu": 0.0}, {"power_w": 300.0, "mfu": 0.3},
                           {"power_w": 650.0, "mfu": 0.7}],
                          gpu_name="Fake H100", driver="550.00", power_limit_w=700.0, roof_tflops=700.0)
    path = save_calibration(cal, tmp_path / "cal.json")
    mon, clock = make_monitor([(info, s)], idle_power_w=80.0, calibration=str(path))
    run_until(mon, clock, 0.5)
    mon.begin_window("w")
    run_until(mon, clock, 2.5)
    d = mon.end_window("w")["devices"]["0"]
    assert d["estimated_mfu"] == pytest.approx(cal.mfu_at(d["mean_power_w"]))
    assert d["estimated_mfu"] == pytest.approx(0.3 + 0.4 * 200 / 350, rel=0.03)
    assert d["estimated_tflops"] == pytest.approx(d["estimated_mfu"] * 700.0)
    assert "cal.json" in mon.calibration_notes[0]


def test_two_devices_mfu_totals_use_every_gpu(tmp_path) -> None:
    """A two-GPU window's total ``flops_mfu`` divides the achieved TFLOP/s by the sum of
    both GPUs' measured roofs (the FLOPs ran on both), and the total ``estimated_mfu`` is
    the per-GPU estimates weighted by roof (estimated TFLOP/s of both over the same summed
    roofs, so the two totals compare), not the first GPU's nor a plain mean. The GPUs differ
    in roof (700 vs 500 TFLOP/s) and power (200 vs 500 W) so that any shortcut shows."""
    points = [{"power_w": 80.0, "mfu": 0.0}, {"power_w": 300.0, "mfu": 0.3}, {"power_w": 650.0, "mfu": 0.7}]
    path = tmp_path / "cal.json"
    for name, roof in (("Fake H100", 700.0), ("Fake H800", 500.0)):
        save_calibration(Calibration.fit(points, gpu_name=name, driver="550.00", power_limit_w=700.0,
                                         roof_tflops=roof), path)
    a = synthetic_trace(lambda t: 200.0, 3.0, index=0, name="Fake H100")
    b = synthetic_trace(lambda t: 500.0, 3.0, index=1, name="Fake H800")
    mon, clock = make_monitor([a, b], idle_power_w=80.0, calibration=str(path))
    assert [mon.calibrations[i].roof_tflops for i in (0, 1)] == [700.0, 500.0]
    run_until(mon, clock, 0.5)
    mon.begin_window("w")
    run_until(mon, clock, 2.5)
    flops = 3.0e15
    w = mon.end_window("w", flops=flops)
    tot, d0, d1 = w["total"], w["devices"]["0"], w["devices"]["1"]
    assert d0["estimated_mfu"] == pytest.approx(0.3 * 120 / 220, rel=0.03)  # 200 W between the 80/300 W knots
    assert d1["estimated_mfu"] == pytest.approx(0.3 + 0.4 * 200 / 350, rel=0.03)
    assert tot["estimated_mfu"] == pytest.approx((d0["estimated_mfu"] * 700 + d1["estimated_mfu"] * 500) / 1200)
    achieved = flops / w["duration_s"] / 1e12
    assert tot["achieved_tflops"] == pytest.approx(achieved)
    assert tot["flops_mfu"] == pytest.approx(achieved / (700.0 + 500.0))


def test_background_thread_measures_idle_and_samples():
    info, s = synthetic_trace(step_power(75.0, 400.0, 0.6, 100.0), 30.0, update_period_s=0.05)
    reader = ReplayReader([info], {0: s})
    with PowerMonitor(reader=reader, interval_s=0.01, idle_s=0.3, calibration=None) as mon:
        assert mon.idle_power_w[0] == 75.0
        with mon.window("w", items=4):
            import time

            time.sleep(0.4)
    assert not mon.running and mon._thread is not None and not mon._thread.is_alive()
    d = mon.windows[0]["devices"]["0"]
    assert d["samples"] >= 5 and d["sample_rate_hz"] > 0
    assert d["j_per_item"] == pytest.approx(d["energy_j"] / 4)


def test_not_idle_at_start_warns():
    info, s = synthetic_trace(lambda t: 600.0, 3.0, limit_w=700.0)
    mon, _ = make_monitor([(info, s)])
    assert mon.idle_power_w[0] == 600.0
    assert any("not idle" in w for w in mon.warnings)


def test_read_errors_are_counted_not_raised():
    class Flaky(ReplayReader):
        calls = 0

        def read(self, index):
            Flaky.calls += 1
            if Flaky.calls % 2 == 0:
                raise OSError("transient")
            return super().read(index)

    info, s = synthetic_trace(lambda t: 100.0, 2.0)
    clock = ManualClock()
    mon = PowerMonitor(reader=Flaky([info], {0: s}, clock=clock), background=False, idle_power_w=50.0,
                       calibration=None)
    mon.start()
    for _ in range(10):
        clock.advance(DT)
        mon.sample()
    assert mon.errors == 5 and "transient" in mon.first_error
    assert len(mon.samples[0]) == 6


# --------------------------------------------------------------------------------------
# report files
# --------------------------------------------------------------------------------------


def _finished_monitor():
    info, s = synthetic_trace(step_power(80.0, 500.0, 0.5, 1.5), 2.5, update_period_s=0.05)
    mon, clock = make_monitor([(info, s)], idle_power_w=80.0)
    run_until(mon, clock, 0.4)
    mon.begin_window("outer")
    run_until(mon, clock, 0.8)
    mon.begin_window("inner")
    run_until(mon, clock, 1.2)
    mon.end_window("inner", items=8)
    run_until(mon, clock, 1.7)
    mon.end_window("outer")
    run_until(mon, clock, 2.0)
    mon.stop()
    return mon


def test_json_csv_png_files(tmp_path):
    mon = _finished_monitor()
    doc = build_report(mon, command=["python", "x.py"], exit_code=0)
    path = write_json(doc, tmp_path / "p.json")
    back = json.loads(path.read_text())
    assert back["schema_version"] == 1 and back["format"] == "ditperf-power-report"
    assert [w["name"] for w in back["windows"]] == ["inner", "outer"]
    assert back["devices"][0]["power_field"] == "replay"
    assert back["devices"][0]["update"]["energy_update_period_s"] == pytest.approx(0.05, rel=0.2)
    assert back["windows"][0]["devices"]["0"]["j_per_item"] > 0
    assert "NaN" not in path.read_text()

    rows = list(csv.DictReader((write_csv(mon, tmp_path / "s.csv")).open()))
    assert len(rows) == len(mon.samples[0])
    assert set(rows[0]) >= {"t_s", "device", "power_w", "energy_mj", "clock_reasons"}
    assert float(rows[-1]["t_s"]) > float(rows[0]["t_s"])

    png = write_timeline_png(mon, tmp_path / "t.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_print_summary_lists_windows_and_warnings():
    from rich.console import Console

    mon = _finished_monitor()
    mon.warnings.append("example warning")
    buf = io.StringIO()
    print_summary(mon.report(), console=Console(file=buf, width=200))
    text = buf.getvalue()
    assert "outer" in text and "inner" in text and "example warning" in text and "counter" in text


# --------------------------------------------------------------------------------------
# NvmlReader with a stand-in pynvml module (the real one runs in the gpu tests)
# --------------------------------------------------------------------------------------


def fake_nvml(*, instant=True, new_reasons=True, count=1, init_error=None):
    import pynvml

    m = types.SimpleNamespace(**{k: getattr(pynvml, k) for k in dir(pynvml)
                                 if k.startswith(("NVML", "nvmlClocks"))})
    err = pynvml.NVMLError
    state = {"energy": 1_000_000, "shutdown": 0}

    def init():
        if init_error is not None:
            raise err(init_error)

    def field_values(h, ids):
        ret = pynvml.NVML_SUCCESS if instant else pynvml.NVML_ERROR_NOT_SUPPORTED
        return [types.SimpleNamespace(nvmlReturn=ret, valueType=pynvml.NVML_VALUE_TYPE_UNSIGNED_INT,
                                      value=types.SimpleNamespace(uiVal=345_000))]

    def energy(h):
        state["energy"] += 5_000
        return state["energy"]

    def not_found(h):
        raise err(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)

    m.nvmlInit = init
    m.nvmlShutdown = lambda: state.__setitem__("shutdown", state["shutdown"] + 1)
    m.nvmlDeviceGetCount = lambda: count
    m.nvmlSystemGetDriverVersion = lambda: "550.54.15"
    m.nvmlDeviceGetHandleByIndex = lambda i: f"h{i}"
    m.nvmlDeviceGetName = lambda h: b"NVIDIA H100 80GB HBM3"
    m.nvmlDeviceGetUUID = lambda h: "GPU-1234"
    m.nvmlDeviceGetFieldValues = field_values
    m.nvmlDeviceGetPowerUsage = lambda h: 300_000
    m.nvmlDeviceGetTotalEnergyConsumption = energy
    m.nvmlDeviceGetEnforcedPowerLimit = lambda h: 700_000
    m.nvmlDeviceGetClockInfo = lambda h, kind: 1980 if kind == pynvml.NVML_CLOCK_SM else 2619
    m.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=97, memory=41)
    m.nvmlDeviceGetTemperature = lambda h, sensor: 55
    m.nvmlDeviceGetCurrentClocksEventReasons = (lambda h: 0x4) if new_reasons else not_found
    m.nvmlDeviceGetCurrentClocksThrottleReasons = lambda h: 0x20
    m._state = state
    return m


def test_nvml_reader_reads_instant_power_and_all_fields():
    nv = fake_nvml()
    r = NvmlReader(None, nvml=nv)
    (info,) = r.devices()
    assert info.power_field == "NVML_FI_DEV_POWER_INSTANT" and info.power_limit_w == 700.0
    assert info.name == "NVIDIA H100 80GB HBM3" and info.driver == "550.54.15" and not info.notes
    a, b = r.read(0), r.read(0)
    assert a.power_w == 345.0 and a.limit_w == 700.0 and a.sm_clock_mhz == 1980 and a.mem_clock_mhz == 2619
    assert a.gpu_util_pct == 97 and a.mem_util_pct == 41 and a.temp_c == 55 and a.clock_reasons == 0x4
    assert b.energy_mj > a.energy_mj and b.t >= a.t
    r.close()
    r.close()
    assert nv._state["shutdown"] == 1


def test_nvml_reader_falls_back_and_says_which_field():
    r = NvmlReader([0], nvml=fake_nvml(instant=False, new_reasons=False))
    (info,) = r.devices()
    assert info.power_field == "nvmlDeviceGetPowerUsage"
    assert any("POWER_INSTANT unsupported" in n for n in info.notes)
    reading = r.read(0)
    assert reading.power_w == 300.0 and reading.clock_reasons == 0x20  # the older throttle-reasons call


@pytest.mark.parametrize("code,match", [("NVML_ERROR_NO_PERMISSION", "insufficient permissions"),
                                        ("NVML_ERROR_DRIVER_NOT_LOADED", "driver is not loaded")])
def test_nvml_reader_init_errors_are_one_line(code, match):
    import pynvml

    with pytest.raises(PowerUnavailable, match=match) as ei:
        NvmlReader(nvml=fake_nvml(init_error=getattr(pynvml, code)))
    assert "\n" not in str(ei.value)


def test_nvml_reader_bad_device_index():
    with pytest.raises(PowerUnavailable, match=r"device index 2 does not exist: NVML sees 2 GPU\(s\)"):
        NvmlReader([0, 2], nvml=fake_nvml(count=2))


def test_nvml_reader_without_driver_for_real(nvml_absent):
    """This machine has no NVIDIA driver: the real pynvml fails to load libnvidia-ml."""

    with pytest.raises(PowerUnavailable, match="NVML library .* was not found") as ei:
        NvmlReader()
    assert "\n" not in str(ei.value)


def test_replay_reader_validation(tmp_path):
    info = DeviceInfo(index=0, name="x")
    with pytest.raises(ValueError, match="unknown fields"):
        ReplayReader([info], {0: [{"t": 0.0, "watts": 3}]})
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(PowerUnavailable, match="not a ditperf-power-replay file"):
        ReplayReader.from_file(bad)
    with pytest.raises(PowerUnavailable, match="cannot read replay file"):
        ReplayReader.from_file(tmp_path / "missing.json")


def test_random_power_trace_energy_matches_truth():
    """Random piecewise-constant power (fresh each run): counter energy within one sampling
    interval of power at each edge of the exact integral."""
    period = random.choice([0.02, 0.05, 0.1])
    levels = [random.uniform(60, 700) for _ in range(200)]
    fn = lambda t: levels[min(int(t / period + 1e-9), len(levels) - 1)]
    info, s = synthetic_trace(fn, 3.0, update_period_s=period)
    mon, clock = make_monitor([(info, s)], idle_power_w=60.0)
    t0, t1 = random.uniform(0.3, 0.8), random.uniform(1.8, 2.6)
    run_until(mon, clock, t0)
    mon.begin_window("w")
    run_until(mon, clock, t1)
    d = mon.end_window("w")["devices"]["0"]
    grid = np.arange(mon.reader.start + 0.0, mon.reader.start + 3.0, 1e-4)
    truth = sum(fn(t - mon.reader.start) for t in grid if mon.windows[0]["t_start_s"] + mon.t_start <= t
                < mon.windows[0]["t_end_s"] + mon.t_start) * 1e-4
    assert d["energy_source"] == "counter"
    assert d["energy_j"] == pytest.approx(truth, abs=2 * (DT + 1e-3) * 700 + 1e-6)
    assert math.isfinite(d["energy_j_samples"])


def test_trim_keeps_open_windows_and_same_statistics():
    info, s = synthetic_trace(lambda t: 100.0 + 300.0 * ((t * 3) % 1), 8.0, update_period_s=0.05)
    results = []
    for trim in (False, True):
        mon, clock = make_monitor([(info, s)], idle_power_w=60.0)
        run_until(mon, clock, 2.0)
        mon.begin_window("w")
        run_until(mon, clock, 5.0)
        if trim:
            n_before = len(mon.samples[0])
            dropped = mon.trim_before(clock.t, margin_s=1.0)  # capped at the open window's start
            assert 0 < dropped < n_before and mon.samples[0][1].t >= mon._open["w"].t0 - 1.0
        run_until(mon, clock, 7.0)
        results.append(mon.end_window("w")["devices"]["0"])
    keys = ("energy_j", "energy_j_samples", "mean_power_w", "p50_power_w", "samples")
    assert {k: results[1][k] for k in keys} == pytest.approx({k: results[0][k] for k in keys})


def test_marks_pairing(tmp_path, monkeypatch):
    from ditperf.profiling.marks import MARKS_ENV, mark, power_window, read_marks

    monkeypatch.delenv(MARKS_ENV, raising=False)
    with power_window("ignored"):  # not under the profiler: a no-op
        pass
    path = tmp_path / "marks.jsonl"
    monkeypatch.setenv(MARKS_ENV, str(path))
    with power_window("a", items=3, flops=5e12), power_window("b"):
        pass
    mark("c", "begin")
    mark("d", "end")
    with open(path, "a") as f:
        f.write("garbage\n")
    spans, warnings = read_marks(path)
    assert [(n, items, flops) for n, _, _, items, flops in spans] == [("a", 3, 5e12), ("b", None, None)]
    assert all(t1 >= t0 for _, t0, t1, _, _ in spans)
    assert any("'c' began but never ended" in w for w in warnings)
    assert any("'d' ended without a begin" in w for w in warnings)
    assert any("unreadable" in w for w in warnings)
    with pytest.raises(ValueError, match="event"):
        mark("x", "start")
