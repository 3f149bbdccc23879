"""PowerMonitor: background NVML sampling, Zeus-style measurement windows, power-proxy
utilization and energy.

Usage::

    with PowerMonitor() as mon:                 # idle power measured for 0.5 s at start
        mon.begin_window("train")
        train(...)
        summary = mon.end_window("train", items=n_images)   # J/image when items given
    write_report(mon, "power-report/")          # JSON + CSV + PNG (ditperf.profiling.report)

Definitions (per window and device; windows may nest or overlap):

* ``energy_j``: from the driver's energy counter (``energy_source = "counter"``): at each
  window edge, the counter's value at its last refresh plus the power samples' integral
  since then (the counter is a step function refreshed every update period; this removes
  most of that lag), deltas summed with 32/64-bit wrap-around handled (a decrease that a wrap explains is a wrap; any other decrease is a
  reset, and that interval uses the power samples). Cross-check ``energy_j_samples``: the
  trapezoid integral of the power samples. The samples are used instead
  (``energy_source = "samples"``) when the device has no counter, when the counter is stuck
  (no change for longer than ``max(1 s, 10 x its update period)`` while drawing power), or
  when the window is shorter than the counter's update period (it may read 0 J; a warning
  says so).
* ``mean_power_w`` = energy_j / duration_s; ``sample_mean_power_w`` the time-weighted mean
  of the samples; ``p50_power_w`` / ``peak_power_w`` over the samples in the window.
* ``power_proxy_util`` = mean_power_w / enforced limit; ``power_proxy_util_net_idle`` =
  (mean - idle) / (limit - idle), the share of the *dynamic* power range in use.
* ``power_update_period_s`` / ``energy_update_period_s``: how often the value actually
  changes (NVML refreshes at ~10-50 Hz, slower than one can poll): the mean gap between
  changes over the whole recording; ``update_period_resolved`` is False when it changed
  at (nearly) every sample, i.e. the true period is <= the sampling interval.
* ``throttle_share``: time share with a performance-limiting clock-event reason
  (power cap, thermal, HW slowdown, power brake, board limit, reliability); per-reason
  shares in ``clock_reasons_share``.
* ``j_per_item`` = energy_j / items; ``estimated_mfu`` from a power->MFU calibration of
  this GPU (see :mod:`ditperf.profiling.calibration`). When the caller gives the window's
  analytic FLOP count, ``total`` also has ``achieved_tflops`` and ``flops_mfu`` (against the
  same measured roof as the calibration): the two MFUs side by side.

Window edges call ``torch.cuda.synchronize()`` (current device) when torch is imported and
CUDA is initialized, so queued kernels are charged to the window that launched them, and
read every device once right at the edge.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
from ditperf.profiling.readers import (
    CLOCK_EVENT_REASONS,
    THROTTLE_MASK,
    DeviceInfo,
    PowerUnavailable,
    Reader,
    Reading,
    make_reader,
)

log = logging.getLogger("ditperf.profiling")

#: A counter that does not move for longer than max(STUCK_MIN_S, STUCK_PERIODS x update
#: period) while the device draws power is called stuck.
STUCK_MIN_S = 1.0
STUCK_PERIODS = 10
WRAP_MODULI = (2.0**32, 2.0**64)
MAX_LOGGED = 20
#: Update periods are detected over at most this many recent samples (~1 min at 20 ms).
PERIOD_SAMPLES = 3000
MAX_WARNINGS = 500


def cuda_synchronize() -> None:
    """Synchronize the current CUDA device if torch is already imported and CUDA is
    initialized (never imports torch, never creates a CUDA context)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    with contextlib.suppress(Exception):  # a failed sync must not break measurement
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()


# --------------------------------------------------------------------------------------
# Pure statistics on sample arrays (tested directly)
# --------------------------------------------------------------------------------------


def unwrap_counter(t: np.ndarray, e: np.ndarray, power_w: np.ndarray | None = None,
                   max_power_w: float = 2000.0) -> tuple[np.ndarray, int, int]:
    """Cumulative energy (mJ, starting at 0) from raw counter values.

    A decrease is a wrap when adding a modulus (2^32 or 2^64) gives a delta that fits in
    ``max_power_w`` over that interval (plus 1 s of slack); otherwise it is a reset and the
    interval's energy is taken from the power samples (trapezoid), or 0 without them.
    Returns (cumulative, wraps, resets).
    """
    n = len(e)
    cum = np.zeros(n)
    wraps = resets = 0
    for i in range(1, n):
        d = e[i] - e[i - 1]
        dt = max(t[i] - t[i - 1], 0.0)
        if d < 0:
            limit = max_power_w * 1e3 * (dt + 1.0)
            for mod in WRAP_MODULI:
                if e[i - 1] < mod and 0 <= e[i] + mod - e[i - 1] <= limit:
                    d = e[i] + mod - e[i - 1]
                    wraps += 1
                    break
            else:
                resets += 1
                if power_w is not None and np.isfinite(power_w[i - 1]) and np.isfinite(power_w[i]):
                    d = 0.5 * (power_w[i - 1] + power_w[i]) * dt * 1e3
                else:
                    d = 0.0
        cum[i] = cum[i - 1] + d
    return cum, wraps, resets


def counter_energy_at(tq: float, te: np.ndarray, cum: np.ndarray, tp: np.ndarray, pp: np.ndarray,
                      max_extrapolate_s: float = math.inf, update_period_s: float | None = None) -> float:
    """Energy (mJ, on the unwrapped counter's scale) at time ``tq``.

    The counter is a step function refreshed every update period, so a plain read lags by
    up to one period. Estimate: the value at the last sample where it changed (or the
    first sample) plus the power samples' integral from the refresh time to ``tq``, over at
    most ``max_extrapolate_s`` (so a stuck counter still reads as stuck). The refresh
    happened after the previous sample and, when the update period U is known, within U
    before the changed sample: its estimate is the middle of that interval. This cuts the
    edge error from ~(update period x power) to ~(min(U, sampling gap) / 2 x power).
    """
    if len(te) == 0:
        return math.nan
    if tq <= te[0]:
        return float(cum[0] - integrate(tp, pp, tq, te[0]) * 1e3)
    last = int(np.searchsorted(te, tq, side="right") - 1)
    k = last
    while k > 0 and cum[k] == cum[k - 1]:
        k -= 1
    if k > 0:
        lower = te[k - 1] if update_period_s is None else max(te[k - 1], te[k] - update_period_s)
        t_ref = 0.5 * (lower + te[k])
    else:
        t_ref = te[0]
    return float(cum[k] + integrate(tp, pp, t_ref, min(tq, t_ref + max_extrapolate_s)) * 1e3)


def integrate(t: np.ndarray, y: np.ndarray, t0: float, t1: float) -> float:
    """Trapezoid integral of the piecewise-linear y(t) over [t0, t1] (y held constant
    outside the sampled range)."""
    if t1 <= t0 or len(t) == 0:
        return 0.0
    inside = (t > t0) & (t < t1)
    ts = np.concatenate(([t0], t[inside], [t1]))
    ys = np.interp(ts, t, y)
    return float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(ts)))


def change_times(t: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Times of the samples whose value differs from the previous sample's."""
    if len(v) < 2:
        return np.zeros(0)
    changed = np.nonzero(v[1:] != v[:-1])[0] + 1
    return t[changed]


def detect_update_period(t: np.ndarray, v: np.ndarray) -> tuple[float | None, bool]:
    """How often ``v`` really changes: the mean gap between changes after dropping gaps
    longer than 5x the median (pauses, stuck spells). Returns (period_s, resolved), where
    resolved is False when the value changed at nearly every sample (then the true period
    is at most the sampling interval and the returned value is that interval)."""
    ct = change_times(t, v)
    if len(ct) < 3:
        return None, False
    gaps = np.diff(ct)
    med = float(np.median(gaps))
    kept = gaps[gaps <= 5 * med]
    period = float(kept.mean()) if kept.size else med
    sample_dt = float(np.median(np.diff(t))) if len(t) > 1 else period
    return period, period > 1.5 * sample_dt


def longest_stall(t: np.ndarray, e: np.ndarray, power_w: np.ndarray, min_power_w: float = 1.0) -> float:
    """Longest span (s) over which the counter did not change while the samples show the
    device drawing more than ``min_power_w``."""
    longest = 0.0
    start: float | None = None
    for i in range(1, len(e)):
        if e[i] == e[i - 1] and power_w[i] > min_power_w:
            if start is None:
                start = t[i - 1]
            longest = max(longest, t[i] - start)
        else:
            start = None
    return float(longest)


def hold_shares(t: np.ndarray, masks: np.ndarray, t0: float, t1: float) -> dict[int, float]:
    """Time share of [t0, t1] during which each bit of ``masks`` was set, holding each
    sample's value until the next sample."""
    if t1 <= t0 or len(t) == 0:
        return {}
    edges = np.clip(np.concatenate((t, [max(t1, t[-1])])), t0, t1)
    dur = np.diff(edges)
    total = t1 - t0
    shares: dict[int, float] = {}
    for bit in CLOCK_EVENT_REASONS:
        on = (masks.astype(np.int64) & bit) != 0
        shares[bit] = float(dur[on].sum() / total)
    # the interval before the first sample takes the first sample's value
    if t[0] > t0:
        first = int(masks[0])
        for bit in shares:
            if first & bit:
                shares[bit] += float((min(t[0], t1) - t0) / total)
    return shares


# --------------------------------------------------------------------------------------
# Monitor
# --------------------------------------------------------------------------------------


@dataclass
class _Open:
    name: str
    t0: float
    depth: int


def _check_positive(name: str, v: float | None) -> None:
    if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0):
        raise ValueError(f"{name} must be a positive number, got {v!r}")


def _t(r: Reading) -> float:
    return r.t


def _arr(rows: Sequence[Reading], name: str) -> np.ndarray:
    return np.array([np.nan if getattr(r, name) is None else float(getattr(r, name)) for r in rows])


def _finite_mean(a: np.ndarray) -> float | None:
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else None


class PowerMonitor:
    """Samples every device of ``reader`` every ``interval_s`` seconds in a thread.

    Args:
        devices: NVML indices to read (None: all). Ignored when ``reader`` is given.
        interval_s: sampling interval (NVML values refresh at ~10-50 Hz; 0.02 s resolves that).
        reader: a :class:`~ditperf.profiling.readers.Reader`; default
            :func:`~ditperf.profiling.readers.make_reader` (NVML, or the replay test hook).
        idle_power_w: idle power per device (a number for all, or {index: W}); None
            measures it at :meth:`start` over ``idle_s`` seconds (median power).
        idle_s: idle measurement length when ``idle_power_w`` is None.
        calibration: "auto" looks up a power->MFU calibration per device; None disables;
            a path searches that file only.
        sync_cuda: synchronize CUDA at window edges (see module docstring).
        background: False runs no thread (tests call :meth:`sample` themselves).
        close_reader: close the reader at :meth:`stop` (default: only a reader the monitor
            made itself).
    """

    def __init__(self, devices: Sequence[int] | None = None, interval_s: float = 0.02, reader: Reader | None = None,
                 idle_power_w: float | Mapping[int, float] | None = None, *, idle_s: float = 0.5,
                 calibration: str | None = "auto", sync_cuda: bool = True, background: bool = True,
                 close_reader: bool | None = None) -> None:
        if not (isinstance(interval_s, (int, float)) and 0.001 <= interval_s <= 60):
            raise ValueError(f"interval_s must be a number of seconds in [0.001, 60], got {interval_s!r}")
        if idle_s < 0:
            raise ValueError(f"idle_s must be >= 0, got {idle_s}")
        self.interval_s = float(interval_s)
        self.idle_s = float(idle_s)
        self._own_reader = reader is None if close_reader is None else close_reader
        self.reader: Reader = reader if reader is not None else make_reader(devices)
        self.infos: list[DeviceInfo] = self.reader.devices()
        if not self.infos:
            raise PowerUnavailable("the reader has no devices")
        self._given_idle = idle_power_w
        self.idle_power_w: dict[int, float | None] = {}
        self.idle_source = "given" if idle_power_w is not None else "measured"
        self.sync_cuda = sync_cuda
        self.background = background
        self.samples: dict[int, list[Reading]] = {i.index: [] for i in self.infos}
        self.windows: list[dict[str, Any]] = []
        self.warnings: list[str] = []
        self.warnings_dropped = 0
        self.errors = 0
        self._consecutive_errors = 0
        self.first_error: str | None = None
        self.t_start: float | None = None
        self.t_stop: float | None = None
        self._open: dict[str, _Open] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._calibration_opt = calibration
        self.calibrations: dict[int, Any] = {}
        self.calibration_notes: dict[int, str] = {}

    # --- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.t_start is not None and self.t_stop is None

    def start(self) -> Self:
        """Measure idle power (unless given), then start the sampling thread."""
        if self.t_start is not None:
            raise RuntimeError("this PowerMonitor was already started (make a new one)")
        self.t_start = self.reader.now()
        self.sample()
        self._set_idle()
        self._load_calibrations()
        if self.background:
            self._thread = threading.Thread(target=self._run, name="ditperf-power", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling (open windows stay open but can no longer grow)."""
        if not self.running:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 10 * self.interval_s))
        self.sample()
        self.t_stop = self.reader.now()
        if self._open:
            self._warn(f"windows still open at stop: {sorted(self._open)}")
        if self._own_reader:
            self.reader.close()

    def _set_idle(self) -> None:
        given = self._given_idle
        if given is not None:
            for info in self.infos:
                value = given.get(info.index) if isinstance(given, Mapping) else given
                self.idle_power_w[info.index] = None if value is None else float(value)
            return
        deadline = self.reader.now() + self.idle_s
        if self.background:
            while self.reader.now() < deadline:
                time.sleep(self.interval_s)
                self.sample()
        for info in self.infos:
            p = _arr(self.samples[info.index], "power_w")
            p = p[np.isfinite(p)]
            idle = float(np.median(p)) if p.size else None
            self.idle_power_w[info.index] = idle
            limit = info.power_limit_w
            if idle is not None and limit and idle > 0.4 * limit:
                self._warn(f"GPU {info.index} drew {idle:.0f} W at start ({100 * idle / limit:.0f}% of its "
                           f"{limit:.0f} W limit): it was not idle, so the net-of-idle numbers are too low; "
                           "pass idle_power_w / --idle-power")

    def _load_calibrations(self) -> None:
        opt = self._calibration_opt
        for info in self.infos:
            if opt is None:
                self.calibrations[info.index] = None
                continue
            from ditperf.profiling.calibration import find_calibration

            cal, note = find_calibration(info, None if opt == "auto" else opt)
            self.calibrations[info.index] = cal
            self.calibration_notes[info.index] = note

    def _run(self) -> None:
        next_t = self.reader.now()
        while not self._stop.is_set():
            next_t += self.interval_s
            delay = next_t - self.reader.now()
            if delay < 0:  # fell behind (slow reads): skip ahead instead of bursting
                next_t = self.reader.now()
                delay = 0.0
            if self._stop.wait(delay):
                break
            self.sample()
            if self._consecutive_errors > 50 * len(self.infos):
                self._warn(f"sampling stopped after {self.errors} read errors (first: {self.first_error})")
                break

    def sample(self) -> None:
        """Read every device once (thread-safe; called by the thread and at window edges)."""
        with self._lock:
            for info in self.infos:
                try:
                    r = self.reader.read(info.index)
                except Exception as exc:  # noqa: BLE001 - a failed read is counted, not fatal
                    self.errors += 1
                    self._consecutive_errors += 1
                    if self.first_error is None:
                        self.first_error = f"{type(exc).__name__}: {exc}"
                    continue
                self._consecutive_errors = 0
                self.samples[info.index].append(r)

    def _warn(self, msg: str) -> None:
        """Keep a warning for the report and log it (the first MAX_LOGGED distinct ones)."""
        if msg in self.warnings:
            return
        if len(self.warnings) >= MAX_WARNINGS:
            self.warnings_dropped += 1
            return
        self.warnings.append(msg)
        if len(self.warnings) <= MAX_LOGGED:
            log.warning(msg)
        elif len(self.warnings) == MAX_LOGGED + 1:
            log.warning("further power-monitor warnings are only kept in the report")

    # --- windows -----------------------------------------------------------------------

    def begin_window(self, name: str, *, sync: bool | None = None) -> None:
        """Open a window (names must be unique among open windows; windows may nest)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"window name must be a non-empty string, got {name!r}")
        if not self.running:
            raise RuntimeError("start the PowerMonitor before opening windows")
        if name in self._open:
            raise ValueError(f"window {name!r} is already open")
        if self.sync_cuda if sync is None else sync:
            cuda_synchronize()
        self.sample()
        self._open[name] = _Open(name, self.reader.now(), len(self._open))

    def end_window(self, name: str, items: float | None = None, *, flops: float | None = None,
                   sync: bool | None = None) -> dict[str, Any]:
        """Close a window and return its summary (also kept in :attr:`windows`).

        ``items``: work items done in the window (J/item). ``flops``: FLOPs the window
        executed by analytic count; the summary then shows the resulting MFU next to the
        power-estimated one (both relative to the calibration's measured roof)."""
        if name not in self._open:
            raise ValueError(f"window {name!r} is not open (open: {sorted(self._open) or 'none'})")
        _check_positive("items", items)
        _check_positive("flops", flops)
        if self.sync_cuda if sync is None else sync:
            cuda_synchronize()
        self.sample()
        w = self._open.pop(name)
        summary = self.summarize(name, w.t0, self.reader.now(), items=items, flops=flops, depth=w.depth)
        self.windows.append(summary)
        return summary

    @contextlib.contextmanager
    def window(self, name: str, items: float | None = None, flops: float | None = None) -> Iterator[None]:
        """``with mon.window("step", items=batch):`` = begin_window + end_window."""
        self.begin_window(name)
        try:
            yield
        finally:
            self.end_window(name, items=items, flops=flops)

    def add_window(self, name: str, t0: float, t1: float, items: float | None = None, *,
                   flops: float | None = None, depth: int = 0) -> dict[str, Any]:
        """Summarize a span given by its clock times (e.g. marks written by a profiled
        process) and keep it with the windows."""
        _check_positive("items", items)
        _check_positive("flops", flops)
        summary = self.summarize(name, t0, t1, items=items, flops=flops, depth=depth)
        self.windows.append(summary)
        return summary

    def trim_before(self, t: float, margin_s: float = 2.0) -> int:
        """Drop samples older than ``t - margin_s`` (long runs: bound memory); returns how
        many. ``t`` is capped at the oldest open window's start, and ``margin_s`` of history
        is kept before it (the counter's last refresh before a window edge must remain)."""
        with self._lock:
            cap = min([w.t0 for w in self._open.values()] + [t]) - margin_s
            dropped = 0
            for idx, rows in self.samples.items():
                first = bisect.bisect_left(rows, cap, key=_t)
                keep = rows[max(0, first - 1):]
                dropped += len(rows) - len(keep)
                self.samples[idx] = keep
            return dropped

    # --- statistics --------------------------------------------------------------------

    def update_periods(self, index: int, rows: Sequence[Reading] | None = None) -> dict[str, Any]:
        """Update periods of the power and energy readings, from ``rows`` (default: the
        last PERIOD_SAMPLES samples)."""
        rows = self.samples[index][-PERIOD_SAMPLES:] if rows is None else rows
        t = _arr(rows, "t")
        out: dict[str, Any] = {}
        for key, fname in (("power", "power_w"), ("energy", "energy_mj")):
            v = _arr(rows, fname)
            ok = np.isfinite(v)
            period, resolved = detect_update_period(t[ok], v[ok]) if ok.sum() > 3 else (None, False)
            out[f"{key}_update_period_s"] = period
            out[f"{key}_update_period_resolved"] = resolved
        sample_dt = np.diff(t)
        out["sample_interval_s"] = float(np.median(sample_dt)) if sample_dt.size else None
        return out

    def summarize(self, name: str, t0: float, t1: float, *, items: float | None = None,
                  flops: float | None = None, depth: int = 0) -> dict[str, Any]:
        """Summary of [t0, t1] for every device, plus totals (see module docstring)."""
        if t1 < t0:
            raise ValueError(f"window {name!r} ends before it begins ({t0} > {t1})")
        duration = t1 - t0
        with self._lock:
            snap = {i: list(rows) for i, rows in self.samples.items()}
        per_dev: dict[str, dict[str, Any]] = {}
        warnings: list[str] = []
        for info in self.infos:
            rows = snap[info.index]
            # update periods from the samples up to the window's end; statistics from the
            # samples around the window only (cost independent of the run's length)
            i_end = bisect.bisect_right(rows, t1, key=_t)
            periods = self.update_periods(info.index, rows[max(0, i_end - PERIOD_SAMPLES):i_end + 1])
            pad = 1.0 + 3.0 * (periods["energy_update_period_s"] or 0.0)
            i0 = bisect.bisect_left(rows, t0 - pad, key=_t)
            i1 = bisect.bisect_right(rows, t1 + pad, key=_t)
            stats = self._device_stats(info, rows[max(0, i0 - 1):i1 + 1], periods, t0, t1, items, warnings)
            per_dev[str(info.index)] = stats
        energy = [d["energy_j"] for d in per_dev.values() if d.get("energy_j") is not None]
        total_e = float(sum(energy)) if len(energy) == len(per_dev) else None
        mfus = [d.get("estimated_mfu") for d in per_dev.values()]
        roofs = [getattr(self.calibrations.get(i.index), "roof_tflops", None) for i in self.infos]
        est = None
        if mfus and all(m is not None for m in mfus):
            # weighted by each GPU's roof: estimated TFLOP/s of all GPUs over their summed roofs,
            # the same denominator as flops_mfu (the plain mean when the roofs are equal)
            est = float(np.average(mfus, weights=roofs)) if all(roofs) else float(np.mean(mfus))
        total: dict[str, Any] = {
            "energy_j": total_e,
            "mean_power_w": total_e / duration if total_e is not None and duration > 0 else None,
            "j_per_item": total_e / items if total_e is not None and items else None,
            "estimated_mfu": est,
            "flops": flops,
            "achieved_tflops": flops / duration / 1e12 if flops and duration > 0 else None,
            "flops_mfu": None,
        }
        if total["achieved_tflops"] is not None and all(roofs):
            # analytic MFU against the same measured roof the power estimate is calibrated on
            total["flops_mfu"] = total["achieved_tflops"] / float(sum(roofs))
        for w in warnings:
            self._warn(w)
        return {"name": name, "t_start_s": t0 - (self.t_start or t0), "t_end_s": t1 - (self.t_start or t0),
                "duration_s": duration, "items": items, "flops": flops, "depth": depth, "devices": per_dev,
                "total": total,
                "warnings": warnings}

    def _device_stats(self, info: DeviceInfo, rows: list[Reading], periods: dict[str, Any], t0: float, t1: float,
                      items: float | None, warnings: list[str]) -> dict[str, Any]:
        idx = info.index
        label = f"window [{t0 - (self.t_start or t0):.3f}, {t1 - (self.t_start or t0):.3f}] s, GPU {idx}"
        duration = t1 - t0
        t = _arr(rows, "t")
        p = _arr(rows, "power_w")
        okp = np.isfinite(p)
        base: dict[str, Any] = {"duration_s": duration, "idle_power_w": self.idle_power_w.get(idx)}
        if okp.sum() == 0:
            warnings.append(f"{label}: no power samples")
            return {**base, "samples": 0, "energy_j": None}
        tp, pp = t[okp], p[okp]
        inside = (t >= t0) & (t <= t1)
        n_in = int(inside.sum())
        p_in = p[inside & okp]
        e_samples_j = integrate(tp, pp, t0, t1)
        e_period = periods["energy_update_period_s"]

        # counter energy
        e = _arr(rows, "energy_mj")
        oke = np.isfinite(e)
        e_counter_j = None
        wraps = resets = 0
        stall = 0.0
        if oke.sum() >= 2:
            te, ee = t[oke], e[oke]
            cum, wraps, resets = unwrap_counter(te, ee, p[oke], max_power_w=2 * (info.power_limit_w or 1000.0))
            reach = 2.0 * (e_period or 0.25)  # extrapolate past the last refresh by <= 2 periods
            e_counter_j = (counter_energy_at(t1, te, cum, tp, pp, reach, e_period)
                           - counter_energy_at(t0, te, cum, tp, pp, reach, e_period)) / 1e3
            win = (te >= t0 - (e_period or 0)) & (te <= t1)
            stall = longest_stall(te[win], ee[win], p[oke][win])
        source = "samples"
        energy_j = e_samples_j
        if e_counter_j is None:
            if info.energy_counter:
                warnings.append(f"{label}: no energy counter readings; energy integrated from power samples")
        elif e_period is not None and duration < e_period:
            warnings.append(f"{label}: window ({duration * 1e3:.1f} ms) is shorter than the energy counter's "
                            f"update period ({e_period * 1e3:.0f} ms): energy from power samples x duration")
        elif stall > max(STUCK_MIN_S, STUCK_PERIODS * (e_period or 0.1)) or (
                e_counter_j == 0 and e_samples_j > 0):
            warnings.append(f"{label}: energy counter stuck for {stall:.2f} s while drawing power: "
                            "energy integrated from power samples instead")
        else:
            source, energy_j = "counter", e_counter_j
        if wraps:
            warnings.append(f"{label}: energy counter wrapped {wraps}x (handled)")
        if resets:
            warnings.append(f"{label}: energy counter went backwards {resets}x (reset?): those intervals use "
                            "power samples")
        if n_in < 2:
            warnings.append(f"{label}: only {n_in} sample(s) inside the window: statistics are rough")

        lim = _arr(rows, "limit_w")
        lim_in = lim[inside & np.isfinite(lim)]
        limit = float(lim_in.mean()) if lim_in.size else info.power_limit_w
        mean_w = energy_j / duration if duration > 0 else (float(p_in.mean()) if p_in.size else None)
        idle = self.idle_power_w.get(idx)
        util = mean_w / limit if (mean_w is not None and limit) else None
        net = None
        if util is not None and idle is not None and limit and limit > idle:
            net = (mean_w - idle) / (limit - idle)
        stats: dict[str, Any] = {
            **base,
            "energy_j": energy_j,
            "energy_source": source,
            "energy_j_counter": e_counter_j,
            "energy_j_samples": e_samples_j,
            "mean_power_w": mean_w,
            "sample_mean_power_w": e_samples_j / duration if duration > 0 else None,
            "p50_power_w": float(np.median(p_in)) if p_in.size else None,
            "peak_power_w": float(p_in.max()) if p_in.size else None,
            "power_limit_w": limit,
            "power_proxy_util": util,
            "power_proxy_util_net_idle": net,
            "samples": n_in,
            "sample_rate_hz": (n_in - 1) / duration if duration > 0 and n_in > 1 else None,
            **periods,
            "energy_counter_wraps": wraps,
            "energy_counter_resets": resets,
            "energy_counter_longest_stall_s": stall,
        }
        for key, fname in (("mean_sm_clock_mhz", "sm_clock_mhz"), ("mean_mem_clock_mhz", "mem_clock_mhz"),
                           ("mean_gpu_util_pct", "gpu_util_pct"), ("mean_mem_util_pct", "mem_util_pct")):
            stats[key] = _finite_mean(_arr(rows, fname)[inside])
        temp = _arr(rows, "temp_c")[inside]
        temp = temp[np.isfinite(temp)]
        stats["max_temp_c"] = float(temp.max()) if temp.size else None
        reasons = _arr(rows, "clock_reasons")
        okr = np.isfinite(reasons)
        if okr.any():
            shares = hold_shares(t[okr], reasons[okr], t0, t1)
            stats["clock_reasons_share"] = {CLOCK_EVENT_REASONS[b]: s for b, s in shares.items() if s > 0}
            # reasons overlap in time: the share is that of the union of the throttle bits
            stats["throttle_share"] = _union_share(t[okr], reasons[okr], t0, t1, THROTTLE_MASK)
        else:
            stats["clock_reasons_share"] = None
            stats["throttle_share"] = None
        stats["j_per_item"] = energy_j / items if items else None
        cal = self.calibrations.get(idx)
        if cal is not None and mean_w is not None:
            mfu = cal.mfu_at(mean_w)
            stats["estimated_mfu"] = mfu
            stats["estimated_tflops"] = mfu * cal.roof_tflops
            stats["estimated_mfu_in_range"] = cal.in_range(mean_w)
        else:
            stats["estimated_mfu"] = None
        return stats

    # --- report ------------------------------------------------------------------------

    def report(self, **extra: Any) -> dict[str, Any]:
        """The JSON-ready report (schema in :mod:`ditperf.profiling.report`)."""
        from ditperf.profiling.report import build_report

        return build_report(self, **extra)


def _union_share(t: np.ndarray, masks: np.ndarray, t0: float, t1: float, mask: int) -> float:
    flags = ((masks.astype(np.int64) & mask) != 0).astype(np.int64)
    return hold_shares(t, flags, t0, t1).get(0x1, 0.0)


__all__ = ["PowerMonitor", "counter_energy_at", "cuda_synchronize", "detect_update_period", "hold_shares", "integrate",
           "longest_stall", "unwrap_counter"]
