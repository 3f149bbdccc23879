"""`ditperf profile ...` on CPU: power under the replay test hook, the real no-GPU path,
bad input. The replay hook: DITPERF_POWER_REPLAY names a trace file that replaces NVML."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from ditperf.cli.main import main
from ditperf.profiling.readers import REPLAY_ENV, synthetic_trace, write_replay


@pytest.fixture
def replay(tmp_path, monkeypatch):
    # idle for the first 0.15 s (the CLI's idle measurement), then busy for good
    info, samples = synthetic_trace(lambda t: 70.0 if t < 0.15 else 480.0, 60.0, update_period_s=0.01)
    path = write_replay(tmp_path / "replay.json", [(info, samples)])
    monkeypatch.setenv(REPLAY_ENV, str(path))
    monkeypatch.setenv("DITPERF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DITPERF_POWER_CALIBRATION", raising=False)
    return path


def test_power_runs_command_writes_report_and_keeps_exit_code(replay, tmp_path, capsys):
    from ditperf.profiling.calibration import Calibration, save_calibration

    cal = Calibration.fit([{"power_w": 70.0, "mfu": 0.0}, {"power_w": 600.0, "mfu": 0.8}], gpu_name="Fake H100",
                          driver="550.00", power_limit_w=700.0, roof_tflops=800.0)
    save_calibration(cal)  # into DITPERF_CACHE_DIR (the replay fixture points it at tmp_path)
    child = textwrap.dedent("""
        import time
        from ditperf.profiling import power_window
        time.sleep(0.1)
        with power_window("steps", items=64, flops=1.2e14):
            time.sleep(0.3)
        raise SystemExit(3)
    """)
    out = tmp_path / "report"
    rc = main(["profile", "power", "--idle-seconds", "0.1", "--interval", "0.01", "--out", str(out), "--",
               sys.executable, "-c", child])
    assert rc == 3
    doc = json.loads((out / "power.json").read_text())
    assert doc["command"][0] == sys.executable and doc["exit_code"] == 3
    assert doc["reader"] == "replay:replay.json" and doc["idle_source"] == "measured"
    assert doc["devices"][0]["idle_power_w"] == 70.0
    windows = {w["name"]: w for w in doc["windows"]}
    assert set(windows) == {"command", "steps"}
    steps = windows["steps"]
    assert steps["items"] == 64 and steps["depth"] == 1
    assert steps["duration_s"] == pytest.approx(0.3, abs=0.25)
    d = steps["devices"]["0"]
    assert d["j_per_item"] == pytest.approx(d["energy_j"] / 64)
    assert d["mean_power_w"] == pytest.approx(480.0, rel=0.1)
    assert windows["command"]["duration_s"] >= steps["duration_s"]
    # the two MFUs side by side: from power (calibration) and from the analytic FLOPs
    assert d["estimated_mfu"] == pytest.approx(cal.mfu_at(d["mean_power_w"]))
    tot = steps["total"]
    assert tot["achieved_tflops"] == pytest.approx(1.2e14 / steps["duration_s"] / 1e12)
    assert tot["flops_mfu"] == pytest.approx(tot["achieved_tflops"] / 800.0)
    assert "Fake H100" in doc["devices"][0]["calibration"]
    assert (out / "power_samples.csv").stat().st_size > 0
    assert (out / "power_timeline.png").read_bytes()[:4] == b"\x89PNG"
    captured = capsys.readouterr()
    assert "steps" in captured.out and "command exited with 3" in captured.err


def test_power_command_not_found_exits_127(replay, capsys):
    rc = main(["profile", "power", "--", "no-such-command-xyz", "--flag"])
    err = capsys.readouterr().err
    assert rc == 127
    assert err.strip() == "ditperf profile: error: command not found: no-such-command-xyz"


@pytest.mark.parametrize("argv,match", [
    (["profile", "power"], "no command given"),
    (["profile", "power", "--devices", "a,b", "--", "true"], "--devices must be"),
    (["profile", "power", "--devices", "4", "--", "true"], "device index 4 does not exist"),
    (["profile", "power", "--interval", "0", "--", "true"], "--interval must be"),
])
def test_power_bad_input_one_line(replay, capsys, argv, match):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1


def test_power_without_nvml_for_real(tmp_path, nvml_absent):
    """No NVIDIA driver on this machine: one clear line, non-zero exit, no traceback."""

    env = {k: v for k, v in os.environ.items() if k != REPLAY_ENV}
    proc = subprocess.run([sys.executable, "-m", "ditperf.cli", "profile", "power", "--out", str(tmp_path / "o"),
                           "--", sys.executable, "-c", "pass"], capture_output=True, text=True, env=env, check=False,
                          timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "NVML library" in lines[0] and "needs an NVIDIA GPU" in lines[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("sub", ["calibrate", "kernels"])
def test_gpu_subcommands_say_they_need_a_gpu(sub, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("GPU machine")
    rc = main(["profile", sub])
    err = capsys.readouterr().err
    assert rc == 2 and "needs a CUDA GPU" in err and len(err.strip().splitlines()) == 1


def test_profile_without_subcommand_prints_help(capsys):
    assert main(["profile"]) == 2
    assert "ditperf profile power" in capsys.readouterr().out


def _start_profiled_sleeper(replay, tmp_path, pidfile):
    """`ditperf profile power -- python -c <write pid, sleep>` in its own process; returns
    (Popen of ditperf, pid of the profiled command)."""
    import time

    child = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    # output to files, not pipes: an orphaned command would hold pipes open
    log = (tmp_path / "log.txt").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "ditperf.cli", "profile", "power", "--idle-seconds", "0.05",
                             "--no-png", "--out", str(tmp_path / "o"), "--", sys.executable, "-c", child],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not (pidfile.exists() and pidfile.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "log.txt").read_text()
        time.sleep(0.05)
    return proc, int(pidfile.read_text())


def _gone(pid: int, wait_s: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_sigterm_is_forwarded_and_report_still_written(replay, tmp_path):
    import signal

    proc, child_pid = _start_profiled_sleeper(replay, tmp_path, tmp_path / "pid")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM, (tmp_path / "log.txt").read_text()
    assert _gone(child_pid)
    assert json.loads((tmp_path / "o" / "power.json").read_text())["exit_code"] == 128 + signal.SIGTERM


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_killed_profiler_does_not_leave_the_command_running(replay, tmp_path):
    import signal

    proc, child_pid = _start_profiled_sleeper(replay, tmp_path, tmp_path / "pid")
    proc.send_signal(signal.SIGKILL)  # what subprocess.run(timeout=...) does to us
    proc.wait(timeout=60)
    gone = _gone(child_pid)
    if not gone:
        os.kill(child_pid, signal.SIGKILL)
    assert gone, "the profiled command outlived a SIGKILLed `ditperf profile power`"


def _stopped_monitor(power_w: float, seconds: float):
    """A replayed, hand-clocked monitor sampled every 20 ms for ``seconds``, then stopped."""
    from ditperf.profiling.power import PowerMonitor
    from ditperf.profiling.readers import ManualClock, ReplayReader

    info, samples = synthetic_trace(lambda t: power_w, seconds + 1.0, update_period_s=0.05)
    clock = ManualClock()
    mon = PowerMonitor(reader=ReplayReader([info], {0: samples}, clock=clock), interval_s=0.02, idle_power_w=60.0,
                       background=False, calibration=None, sync_cuda=False).start()
    mon.begin_window("all")
    while clock.t < mon.t_start + seconds:
        clock.advance(0.02)
        mon.sample()
    mon.end_window("all")
    mon.stop()
    return mon, clock


def test_report_times_are_from_the_monitor_start(tmp_path):
    """CSV ``t_s`` and the report's ``duration_s`` count from the monitor's start and end at
    its stop (not at the time the report is written); non-finite values become null."""
    import csv
    import random

    from ditperf.profiling.report import build_report, write_csv

    seconds = random.uniform(0.3, 1.0)
    mon, clock = _stopped_monitor(random.uniform(100.0, 600.0), seconds)
    clock.advance(30.0)  # the report is written later
    rows = list(csv.DictReader(write_csv(mon, tmp_path / "s.csv").open()))
    want = [r.t - mon.t_start for r in mon.samples[0]]
    assert [float(r["t_s"]) for r in rows] == pytest.approx(want, abs=1e-6)
    assert 0.0 <= float(rows[0]["t_s"]) < 0.05 and all(r["device"] == "0" for r in rows)
    assert float(rows[0]["power_w"]) == mon.samples[0][0].power_w
    doc = build_report(mon, command=["x"], exit_code=0, extra={"ratio": float("inf"), "v": [float("-inf"), 1.5]})
    assert doc["duration_s"] == pytest.approx(mon.t_stop - mon.t_start) and doc["duration_s"] < seconds + 0.1
    assert doc["extra"] == {"ratio": None, "v": [None, 1.5]}
    json.dumps(doc, allow_nan=False)  # strict JSON: no Infinity / NaN


def test_print_summary_cells():
    """One row per (window, device) in start order, nested windows after their parent;
    fractions shown as percent."""
    import io
    import random

    from ditperf.profiling.report import print_summary
    from rich.console import Console

    def stats(util, net, mfu, throttle):
        return {"energy_j": 1234.5, "energy_source": "counter", "mean_power_w": 512.0, "p50_power_w": 500.0,
                "peak_power_w": 650.0, "power_limit_w": 700.0, "power_proxy_util": util,
                "power_proxy_util_net_idle": net, "j_per_item": 0.0123, "estimated_mfu": mfu, "samples": 20,
                "sample_rate_hz": 20.0, "energy_update_period_s": 0.1, "throttle_share": throttle}

    fr = [random.uniform(0.05, 0.95) for _ in range(5)]
    doc = {"reader": "replay", "interval_s": 0.05, "idle_source": "given",
           "windows": [{"name": "late", "t_start_s": 2.0, "duration_s": 1.0, "depth": 0,
                        "devices": {"0": stats(0.5, 0.4, None, 0.0)}, "total": {}},
                       {"name": "inner", "t_start_s": 0.5, "duration_s": 0.5, "depth": 1,
                        "devices": {"0": stats(0.5, 0.4, None, 0.0)}, "total": {}},
                       {"name": "early", "t_start_s": 0.5, "duration_s": 1.25, "depth": 0,
                        "devices": {"0": stats(*fr[:4])}, "total": {"flops_mfu": fr[4]}}],
           "devices": [{"index": 0, "name": "Fake H100", "power_field": "instant", "idle_power_w": 80.0,
                        "notes": ["a note"], "calibration": "calibration note"}],
           "warnings": ["look out"]}
    buf = io.StringIO()
    print_summary(doc, console=Console(file=buf, width=250))
    text = buf.getvalue()
    lines = [ln for ln in text.splitlines() if ln.startswith("│")]
    assert [ln.split("│")[1].rstrip() for ln in lines] == [" early", "   inner", " late"]
    cells = [c.strip() for c in lines[0].split("│")[1:-1]]
    pct = [f"{100 * v:.0f}%" for v in fr]
    assert cells[:6] == ["early", "0", "1.25", "1234.5", "counter", "512"]
    assert cells[9:] == [pct[0], pct[1], "0.0123", pct[2], pct[4], "20 (20)", "100", pct[3]]
    assert "est.MFU: the dense-GEMM MFU that draws this power" in text  # the footnote, as one GPU has it
    assert "GPU 0 Fake H100: power from instant, idle 80 W (given); a note; calibration note" in text
    assert "warning: look out" in text
