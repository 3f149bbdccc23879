"""Composer callback: GPU power, energy per image and power-proxy utilization while training.

::

    from ditperf.profiling.callback import PowerCallback
    trainer = Trainer(..., callbacks=[PowerCallback(log_interval=10)])

Every ``log_interval`` batches it closes a :class:`~ditperf.profiling.PowerMonitor` window
and logs, through Composer's loggers (``logger.log_metrics``), summed over the GPUs this
process monitors (its own CUDA device; all replayed devices under the test hook):

* ``power/mean_w``, ``power/peak_w``: mean (energy / time) and peak power of the interval;
* ``power/proxy_util``: mean power / enforced limit; ``power/proxy_util_net_idle``:
  the same net of the idle power measured at fit start;
* ``power/energy_j``, ``power/energy_per_img_j`` (this rank's samples:
  Composer's global sample count / world size), ``power/total_energy_j``;
* ``power/throttle_share``; ``power/estimated_mfu`` when this GPU has a calibration, and
  next to it ``power/flops_mfu`` when the model defines ``flops_per_batch(batch)`` (the
  same hook Composer's SpeedMonitor uses; this rank's FLOPs over the calibration's
  measured matmul roof): power-estimated and analytic MFU side by side.

At fit end: the same over the whole fit under ``power/fit/...``, and, with ``out_dir``,
the monitor's report files (JSON, CSV, PNG; intervals are its windows).

Never fatal: with no NVML (no GPU, no driver, no permission) it logs one warning and
disables itself; any later error does the same. Composer is optional for ditperf
(``pip install 'ditperf[train]'``): this module is the only one in ``ditperf.profiling``
that imports it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

try:
    from composer.core import Callback, State
    from composer.loggers import Logger
    from composer.models import ComposerModel
except ImportError as exc:  # pragma: no cover - exercised only without the train extra
    raise ImportError("PowerCallback needs Composer: pip install 'ditperf[train]'") from exc

from ditperf.profiling.power import PowerMonitor
from ditperf.profiling.readers import REPLAY_ENV, nvml_index_for_cuda_device

log = logging.getLogger("ditperf.profiling.callback")

#: Samples kept per device before older ones are dropped (~2.8 h at 50 ms).
MAX_SAMPLES = 200_000


class PowerCallback(Callback):
    """Logs GPU power / energy / power-proxy utilization every ``log_interval`` batches.

    Args:
        interval_s: power sampling interval in seconds.
        log_interval: batches per logged interval.
        out_dir: where to write the power report at fit end (None: no files).
    """

    def __init__(self, interval_s: float = 0.05, log_interval: int = 10, out_dir: str | os.PathLike[str] | None = None
                 ) -> None:
        if not (isinstance(interval_s, (int, float)) and 0.001 <= interval_s <= 10):
            raise ValueError(f"interval_s must be a number of seconds in [0.001, 10], got {interval_s!r}")
        if not (isinstance(log_interval, int) and log_interval >= 1):
            raise ValueError(f"log_interval must be an int >= 1, got {log_interval!r}")
        self.interval_s = float(interval_s)
        self.log_interval = log_interval
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.monitor: PowerMonitor | None = None
        self.disabled = False
        self.disabled_reason: str | None = None
        self.history: list[dict[str, Any]] = []
        self.fit_summary: dict[str, Any] | None = None
        self._batches = 0
        self._interval_no = 0
        self._window: str | None = None
        self._samples_at_begin = 0
        self._flops = 0.0
        self._flops_known = True
        self._world = 1

    # --- helpers -----------------------------------------------------------------------

    def _disable(self, reason: str) -> None:
        if not self.disabled:
            self.disabled = True
            self.disabled_reason = reason
            log.warning("PowerCallback disabled: %s", reason)
        if self.monitor is not None:
            with contextlib.suppress(Exception):  # already failing: stopping must not raise
                self.monitor.stop()

    @property
    def active(self) -> bool:
        return not self.disabled and self.monitor is not None and self.monitor.running

    def _devices(self) -> list[int] | None:
        if os.environ.get(REPLAY_ENV):
            return None
        import torch

        if torch.cuda.is_available():
            return [nvml_index_for_cuda_device(torch.cuda.current_device())]
        return None

    def _begin(self, state: State) -> None:
        assert self.monitor is not None
        self._interval_no += 1
        self._window = f"interval {self._interval_no}"
        self._samples_at_begin = int(state.timestamp.sample.value)
        self._flops, self._flops_known = 0.0, True
        self.monitor.begin_window(self._window)

    def _end(self, state: State) -> dict[str, Any] | None:
        assert self.monitor is not None and self._window is not None
        items = (int(state.timestamp.sample.value) - self._samples_at_begin) / self._world
        flops = self._flops if self._flops_known and self._flops > 0 else None
        s = self.monitor.end_window(self._window, items=items if items > 0 else None, flops=flops)
        self._window = None
        row = _aggregate(s)
        row.update(batch=int(state.timestamp.batch.value), items=items, flops_mfu=s["total"].get("flops_mfu"))
        self.history.append(row)
        if sum(len(v) for v in self.monitor.samples.values()) > MAX_SAMPLES * len(self.monitor.infos):
            self.monitor.trim_before(self.monitor.reader.now() - 60.0)
            self.monitor._warn("long run: samples older than the last minute were dropped from the timeline")
        return row

    def _count_flops(self, state: State) -> None:
        """Add this batch's analytic FLOPs (model.flops_per_batch, as SpeedMonitor)."""
        if not self._flops_known:
            return
        model = state.model
        if not isinstance(model, ComposerModel):
            model = model.module  # through DDP wrapping, as SpeedMonitor does
        fn = getattr(model, "flops_per_batch", None)
        if not callable(fn):
            self._flops_known = False
            return
        try:
            self._flops += float(fn(state.batch))
        except Exception:  # noqa: BLE001 - a failing FLOP count only drops flops_mfu
            self._flops_known = False

    # --- events ------------------------------------------------------------------------

    def fit_start(self, state: State, logger: Logger) -> None:
        if self.disabled:
            return
        try:
            from composer.utils import dist

            self._world = max(1, int(dist.get_world_size()))
            # the monitor owns its reader (NVML, or the replay test hook) and closes it on stop
            self.monitor = PowerMonitor(devices=self._devices(), interval_s=self.interval_s, idle_s=0.5)
            self.monitor.start()
            self._begin(state)
        except Exception as exc:  # noqa: BLE001 - never crash training (PowerUnavailable included)
            self._disable(str(exc) or type(exc).__name__)

    def batch_end(self, state: State, logger: Logger) -> None:
        if not self.active:
            return
        self._batches += 1
        self._count_flops(state)
        if self._batches % self.log_interval:
            return
        try:
            row = self._end(state)
            if row is not None:
                logger.log_metrics(_metrics(row, self.history, prefix="power"))
            self._begin(state)
        except Exception as exc:  # noqa: BLE001
            self._disable(f"{type(exc).__name__}: {exc}")

    def fit_end(self, state: State, logger: Logger) -> None:
        if not self.active:
            return
        try:
            if self._window is not None:
                if self._batches % self.log_interval:  # a partial interval: log it too
                    row = self._end(state)
                    if row is not None:
                        logger.log_metrics(_metrics(row, self.history, prefix="power"))
                else:  # opened after the last full interval, no batch in it
                    self.monitor.end_window(self._window)  # type: ignore[union-attr]
                    self._window = None
            self.monitor.stop()  # type: ignore[union-attr]
            self.fit_summary = _fit_summary(self.history)
            logger.log_metrics({f"power/fit/{k}": v for k, v in self.fit_summary.items() if v is not None})
            if self.out_dir is not None:
                from ditperf.profiling.report import write_report

                write_report(self.monitor, self.out_dir, png=len(self.history) <= 2000, fit=self.fit_summary)
        except Exception as exc:  # noqa: BLE001
            self._disable(f"{type(exc).__name__}: {exc}")

    def close(self, state: State, logger: Logger) -> None:
        if self.monitor is not None and self.monitor.running:
            self.monitor.stop()


def _aggregate(s: dict[str, Any]) -> dict[str, Any]:
    """One interval's window summary, summed (energy, power) or averaged (ratios) over devices."""
    devs = list(s["devices"].values())

    def total(key: str) -> float | None:
        vals = [d.get(key) for d in devs]
        return float(sum(vals)) if vals and all(v is not None for v in vals) else None

    def mean(key: str) -> float | None:
        vals = [d.get(key) for d in devs]
        return float(sum(vals) / len(vals)) if vals and all(v is not None for v in vals) else None

    return {"seconds": s["duration_s"], "energy_j": total("energy_j"), "mean_w": total("mean_power_w"),
            "peak_w": total("peak_power_w"), "limit_w": total("power_limit_w"), "idle_w": total("idle_power_w"),
            "proxy_util": mean("power_proxy_util"), "proxy_util_net_idle": mean("power_proxy_util_net_idle"),
            "throttle_share": mean("throttle_share"), "estimated_mfu": mean("estimated_mfu")}


def _metrics(row: dict[str, Any], history: list[dict[str, Any]], prefix: str) -> dict[str, float]:
    out = {
        "mean_w": row["mean_w"], "peak_w": row["peak_w"], "proxy_util": row["proxy_util"],
        "proxy_util_net_idle": row["proxy_util_net_idle"], "energy_j": row["energy_j"],
        "energy_per_img_j": row["energy_j"] / row["items"] if row["energy_j"] is not None and row["items"] else None,
        "total_energy_j": sum(h["energy_j"] or 0.0 for h in history),
        "throttle_share": row["throttle_share"], "estimated_mfu": row["estimated_mfu"],
        "flops_mfu": row.get("flops_mfu"),
    }
    return {f"{prefix}/{k}": float(v) for k, v in out.items() if v is not None}


def _fit_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Whole-fit numbers from the intervals (time-weighted where a ratio). Energy, J/img and
    mean power come from the intervals whose energy was measured only (an interval without
    it would otherwise count as 0 J and bias them low); ``energy_coverage`` is their share
    of the time."""
    secs = sum(h["seconds"] for h in history)
    measured = [h for h in history if h["energy_j"] is not None]
    energy = sum(h["energy_j"] for h in measured) if measured else None
    secs_e = sum(h["seconds"] for h in measured)
    items_e = sum(h["items"] or 0.0 for h in measured)
    items = sum(h["items"] or 0.0 for h in history)

    def tw(key: str) -> float | None:
        vals = [(h[key], h["seconds"]) for h in history if h.get(key) is not None]
        if not vals or secs <= 0:
            return None
        return sum(v * t for v, t in vals) / sum(t for _, t in vals)

    return {"seconds": secs, "energy_j": energy, "items": items,
            "energy_per_img_j": energy / items_e if energy is not None and items_e else None,
            "mean_w": energy / secs_e if energy is not None and secs_e > 0 else None,
            "energy_coverage": secs_e / secs if secs > 0 else None, "proxy_util": tw("proxy_util"),
            "proxy_util_net_idle": tw("proxy_util_net_idle"), "throttle_share": tw("throttle_share"),
            "estimated_mfu": tw("estimated_mfu"), "flops_mfu": tw("flops_mfu")}


__all__ = ["PowerCallback"]
