"""PowerCallback in a tiny Composer fit on CPU, with a replayed power trace and for real
without NVML; and ditperf.profiling without Composer."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import pytest
import torch
from ditperf.profiling.calibration import Calibration, save_calibration
from ditperf.profiling.readers import REPLAY_ENV, synthetic_trace, write_replay

composer = pytest.importorskip("composer")

BATCH = 4


FLOPS_PER_SAMPLE = 2e12


def _fit(callback, batches: int, loggers=(), step_s: float = 0.02):
    from composer import Trainer
    from composer.models import ComposerModel
    from torch.utils.data import DataLoader, TensorDataset

    class Tiny(ComposerModel):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def forward(self, batch):
            time.sleep(step_s)  # a "step" long enough to hold a few power samples
            return self.lin(batch[0])

        def loss(self, outputs, batch):
            return ((outputs.squeeze(-1) - batch[1]) ** 2).mean()

        def flops_per_batch(self, batch):  # the hook Composer's SpeedMonitor uses too
            return FLOPS_PER_SAMPLE * len(batch[0])

    data = TensorDataset(torch.randn(BATCH * batches, 4), torch.randn(BATCH * batches))
    trainer = Trainer(model=Tiny(), train_dataloader=DataLoader(data, batch_size=BATCH), max_duration=f"{batches}ba",
                      callbacks=[callback], loggers=list(loggers), device="cpu", progress_bar=False,
                      log_to_console=False, seed=17)
    trainer.fit()
    trainer.close()
    return trainer


def test_callback_logs_power_metrics_with_replayed_trace(tmp_path, monkeypatch):
    from composer.loggers import InMemoryLogger
    from ditperf.profiling.callback import PowerCallback

    # a counter refreshed every 5 ms: window edges then cost at most ~2.5 ms x 520 W each
    info, samples = synthetic_trace(lambda t: 520.0, 60.0, update_period_s=0.005, limit_w=700.0)
    monkeypatch.setenv(REPLAY_ENV, str(write_replay(tmp_path / "r.json", [(info, samples)])))
    monkeypatch.setenv("DITPERF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DITPERF_POWER_CALIBRATION", raising=False)
    cal = Calibration.fit([{"power_w": 70.0, "mfu": 0.0}, {"power_w": 600.0, "mfu": 0.8}], gpu_name=info.name,
                          driver=info.driver, power_limit_w=700.0, roof_tflops=800.0)
    save_calibration(cal)
    cb = PowerCallback(interval_s=0.01, log_interval=3, out_dir=tmp_path / "power")
    mem = InMemoryLogger()
    _fit(cb, batches=8, loggers=[mem], step_s=0.05)
    assert not cb.disabled, cb.disabled_reason
    mean_w = [v for _, v in mem.data["power/mean_w"]]
    assert len(mean_w) == 3  # intervals ending at batches 3, 6 and the partial one at 8
    assert all(v == pytest.approx(520.0, rel=0.1) for v in mean_w), mean_w
    util = [v for _, v in mem.data["power/proxy_util"]]
    assert util == pytest.approx([w / 700.0 for w in mean_w])
    e = [v for _, v in mem.data["power/energy_j"]]
    per_img = [v for _, v in mem.data["power/energy_per_img_j"]]
    assert per_img[0] == pytest.approx(e[0] / (3 * BATCH)) and per_img[2] == pytest.approx(e[2] / (2 * BATCH))
    assert mem.data["power/total_energy_j"][-1][1] == pytest.approx(sum(e))
    # power-estimated and analytic (flops_per_batch) MFU, side by side
    est = [v for _, v in mem.data["power/estimated_mfu"]]
    assert est == pytest.approx([cal.mfu_at(w) for w in mean_w])
    fl = [v for _, v in mem.data["power/flops_mfu"]]
    expect = [FLOPS_PER_SAMPLE * h["items"] / h["seconds"] / 1e12 / 800.0 for h in cb.history]
    assert fl == pytest.approx(expect)
    fit = cb.fit_summary
    assert fit["items"] == 8 * BATCH and fit["energy_j"] == pytest.approx(sum(e))
    assert mem.data["power/fit/energy_per_img_j"][-1][1] == pytest.approx(sum(e) / (8 * BATCH))
    doc = json.loads((tmp_path / "power" / "power.json").read_text())
    assert [w["name"] for w in doc["windows"]] == ["interval 1", "interval 2", "interval 3"]
    assert doc["fit"]["items"] == 8 * BATCH
    assert (tmp_path / "power" / "power_timeline.png").exists()


def test_callback_without_nvml_warns_once_and_training_finishes(monkeypatch, caplog, nvml_absent):
    from ditperf.profiling.callback import PowerCallback

    monkeypatch.delenv(REPLAY_ENV, raising=False)
    cb = PowerCallback(log_interval=1)
    with caplog.at_level(logging.WARNING, logger="ditperf.profiling"):
        trainer = _fit(cb, batches=3, step_s=0.0)
    assert int(trainer.state.timestamp.batch) == 3
    assert cb.disabled and "NVML library" in cb.disabled_reason
    ours = [r for r in caplog.records if r.name.startswith("ditperf.profiling")]
    assert len(ours) == 1 and "PowerCallback disabled" in ours[0].getMessage()


def test_callback_argument_checks():
    from ditperf.profiling.callback import PowerCallback

    with pytest.raises(ValueError, match="log_interval"):
        PowerCallback(log_interval=0)
    with pytest.raises(ValueError, match="interval_s"):
        PowerCallback(interval_s=-1)


def test_profiling_imports_without_composer():
    code = (
        "import sys; sys.modules['composer'] = None\n"
        "from ditperf.profiling import PowerMonitor, power_window, write_report\n"
        "import ditperf.profiling.cli\n"
        "try:\n"
        "    from ditperf.profiling import PowerCallback\n"
        "except ImportError as e:\n"
        "    print('IMPORT-ERROR', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "IMPORT-ERROR PowerCallback needs Composer" in proc.stdout


def test_fit_summary_uses_only_intervals_with_measured_energy():
    """An interval whose energy could not be measured does not count as 0 J: energy, J/img
    and mean power come from the measured intervals, and the coverage says how much that is."""
    from ditperf.profiling.callback import _fit_summary

    history = [{"seconds": 2.0, "energy_j": 1000.0, "items": 100, "proxy_util": 0.7},
               {"seconds": 1.0, "energy_j": None, "items": 50, "proxy_util": None},
               {"seconds": 2.0, "energy_j": 1200.0, "items": 100, "proxy_util": 0.8}]
    fit = _fit_summary(history)
    assert fit["energy_j"] == 2200.0 and fit["items"] == 250 and fit["seconds"] == 5.0
    assert fit["mean_w"] == pytest.approx(550.0) and fit["energy_per_img_j"] == pytest.approx(11.0)
    assert fit["energy_coverage"] == pytest.approx(0.8) and fit["proxy_util"] == pytest.approx(0.75)
    none = _fit_summary([{"seconds": 1.0, "energy_j": None, "items": 5}])
    assert none["energy_j"] is None and none["mean_w"] is None and none["energy_per_img_j"] is None


def test_aggregate_sums_power_and_averages_ratios_over_gpus():
    import random

    from ditperf.profiling.callback import _aggregate

    keys = ("energy_j", "mean_power_w", "peak_power_w", "power_limit_w", "idle_power_w", "power_proxy_util",
            "power_proxy_util_net_idle", "throttle_share", "estimated_mfu")
    devs = {str(i): {k: random.uniform(0.1, 700.0) for k in keys} for i in range(random.randint(2, 4))}
    row = _aggregate({"duration_s": 1.5, "devices": devs})
    for ours, theirs in (("energy_j", "energy_j"), ("mean_w", "mean_power_w"), ("peak_w", "peak_power_w"),
                         ("limit_w", "power_limit_w"), ("idle_w", "idle_power_w")):
        assert row[ours] == pytest.approx(sum(d[theirs] for d in devs.values())), ours
    for ours, theirs in (("proxy_util", "power_proxy_util"), ("proxy_util_net_idle", "power_proxy_util_net_idle"),
                         ("throttle_share", "throttle_share"), ("estimated_mfu", "estimated_mfu")):
        assert row[ours] == pytest.approx(sum(d[theirs] for d in devs.values()) / len(devs)), ours
    assert row["seconds"] == 1.5
    devs["0"]["estimated_mfu"] = None  # one GPU without a calibration: no MFU for the interval
    assert _aggregate({"duration_s": 1.5, "devices": devs})["estimated_mfu"] is None


def test_fit_summary_ratios_are_time_weighted():
    import random

    from ditperf.profiling.callback import _fit_summary

    history = [{"seconds": random.uniform(0.1, 10.0), "energy_j": random.uniform(10, 1000), "items": 8,
                "proxy_util": random.random(), "estimated_mfu": random.random(), "flops_mfu": random.random()}
               for _ in range(random.randint(2, 6))]
    history[0]["seconds"] *= 20  # one long interval: a plain mean would be far off
    fit = _fit_summary(history)
    secs = sum(h["seconds"] for h in history)
    for key in ("proxy_util", "estimated_mfu", "flops_mfu"):
        assert fit[key] == pytest.approx(sum(h[key] * h["seconds"] for h in history) / secs), key
    assert fit["mean_w"] == pytest.approx(sum(h["energy_j"] for h in history) / secs)


class _FakeMonitor:
    """What PowerCallback._begin/_end use of a PowerMonitor; records the windows it closes."""

    def __init__(self) -> None:
        self.infos, self.samples, self.ended = [object()], {0: []}, []

    def begin_window(self, name):
        pass

    def end_window(self, name, items=None, *, flops=None):
        self.ended.append((name, items, flops))
        return {"duration_s": 2.0, "devices": {"0": {"energy_j": 100.0}}, "total": {"flops_mfu": None}}


def _state(samples: int, batch: int, model=None):
    from types import SimpleNamespace

    return SimpleNamespace(timestamp=SimpleNamespace(sample=SimpleNamespace(value=samples),
                                                     batch=SimpleNamespace(value=batch)),
                           model=model, batch=[torch.zeros(BATCH, 4)])


def test_interval_items_are_this_ranks_and_flops_need_every_batch():
    """items = global samples / world size (this rank's share: J/img per rank); an interval
    where one batch's flops_per_batch failed reports no FLOPs rather than a partial count."""
    import random
    from types import SimpleNamespace

    from ditperf.profiling.callback import PowerCallback

    calls = {"n": 0}

    class Model:  # reached through a DDP-style `.module`
        def flops_per_batch(self, batch):
            calls["n"] += 1
            if calls["n"] == 4:
                raise RuntimeError("no FLOP count for this batch")
            return FLOPS_PER_SAMPLE * len(batch[0])

    world = random.choice([2, 4, 8])
    cb = PowerCallback(log_interval=2)
    cb.monitor, cb._world = _FakeMonitor(), world
    wrapped = SimpleNamespace(module=Model())
    cb._begin(_state(0, 0, wrapped))
    for b in (1, 2):
        cb._count_flops(_state(b * BATCH * world, b, wrapped))
    row = cb._end(_state(2 * BATCH * world, 2, wrapped))
    assert cb.monitor.ended[-1] == ("interval 1", 2 * BATCH, 2 * BATCH * FLOPS_PER_SAMPLE)
    assert row["items"] == 2 * BATCH and row["batch"] == 2
    cb._begin(_state(2 * BATCH * world, 2, wrapped))
    for b in (3, 4):
        cb._count_flops(_state(b * BATCH * world, b, wrapped))
    cb._end(_state(4 * BATCH * world, 4, wrapped))
    assert cb.monitor.ended[-1] == ("interval 2", 2 * BATCH, None)
