"""Reading GPU power telemetry, kept apart from the bookkeeping in :mod:`power`.

A :class:`Reader` answers, per device, one :class:`Reading` at a time (instant power,
energy counter, enforced limit, clocks, utilization, temperature, clock-event reasons) and
a clock (:meth:`Reader.now`). :class:`PowerMonitor` only talks to that protocol, so its
statistics can be tested with :class:`ReplayReader`, which replays recorded or synthetic
sample sequences (including energy-counter wrap-around and stuck counters).

:class:`NvmlReader` is the real one (``pynvml`` from ``nvidia-ml-py``):

* power: ``nvmlDeviceGetFieldValues(NVML_FI_DEV_POWER_INSTANT)`` when the GPU supports it
  (the instantaneous reading), else ``nvmlDeviceGetPowerUsage`` (on Ampere and newer a
  ~1 s running average); :attr:`DeviceInfo.power_field` says which one is used;
* energy: ``nvmlDeviceGetTotalEnergyConsumption`` (mJ since the driver loaded: the
  authoritative source for energy; Volta and newer);
* ``nvmlDeviceGetEnforcedPowerLimit``, ``nvmlDeviceGetClockInfo`` (SM, memory),
  ``nvmlDeviceGetUtilizationRates``, ``nvmlDeviceGetTemperature``, and
  ``nvmlDeviceGetCurrentClocksEventReasons`` (or the older
  ``nvmlDeviceGetCurrentClocksThrottleReasons``), each feature-detected: a field the GPU
  does not support reads as ``None`` and a note says so.

Time is ``time.monotonic()`` (CLOCK_MONOTONIC on Linux: one clock for all processes, so
window marks written by a profiled child process line up with the samples).

Test hook: when the environment variable ``DITPERF_POWER_REPLAY`` names a replay file
(format in :meth:`ReplayReader.from_file`), :func:`make_reader` returns a
:class:`ReplayReader` playing it in real time instead of opening NVML. The CLI and the
Composer callback create their readers through :func:`make_reader`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

REPLAY_ENV = "DITPERF_POWER_REPLAY"
REPLAY_FORMAT = "ditperf-power-replay"

#: Clock-event ("throttle") reason bits, as in NVML's ``nvmlClocksEventReason*``.
CLOCK_EVENT_REASONS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
    0x200: "board_limit",
    0x400: "reliability",
}
#: Reasons that mean the GPU runs slower than it could (counted in ``throttle_share``);
#: idle, application clocks, display clock and sync boost are not performance limits.
THROTTLE_MASK = 0x4 | 0x8 | 0x20 | 0x40 | 0x80 | 0x200 | 0x400


class PowerUnavailable(RuntimeError):
    """Power telemetry cannot be read here (no NVML library, no GPU, no permission, bad
    device index). The message is one line meant for the user."""


@dataclass(frozen=True, slots=True)
class Reading:
    """One device's telemetry at time ``t`` (seconds, ``time.monotonic()``).

    ``None`` means the field is not supported on this device (or this reader).
    """

    t: float
    power_w: float | None = None
    energy_mj: float | None = None
    limit_w: float | None = None
    sm_clock_mhz: float | None = None
    mem_clock_mhz: float | None = None
    gpu_util_pct: float | None = None
    mem_util_pct: float | None = None
    temp_c: float | None = None
    clock_reasons: int | None = None


READING_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Reading))


@dataclass(frozen=True)
class DeviceInfo:
    """What a reader knows about one device. ``index`` is the NVML index (which ignores
    ``CUDA_VISIBLE_DEVICES``); ``power_field`` names the power source actually read."""

    index: int
    name: str
    uuid: str = ""
    driver: str = ""
    power_limit_w: float | None = None
    power_field: str = "unknown"
    energy_counter: bool = True
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["notes"] = list(self.notes)
        return d


@runtime_checkable
class Reader(Protocol):
    """Per-device telemetry source used by :class:`ditperf.profiling.PowerMonitor`."""

    name: str

    def devices(self) -> list[DeviceInfo]:
        """The devices this reader reads, in order."""
        ...

    def now(self) -> float:
        """The reader's clock (seconds); window edges are stamped with it."""
        ...

    def read(self, index: int) -> Reading:
        """One reading of device ``index`` (an index from :meth:`devices`)."""
        ...

    def close(self) -> None:
        ...


# --------------------------------------------------------------------------------------
# NVML
# --------------------------------------------------------------------------------------


def _nvml_error_line(nvml: Any, exc: Exception, what: str) -> str:
    """One clear line for an NVML failure while doing ``what``."""
    kind = type(exc).__name__
    if isinstance(exc, getattr(nvml, "NVMLError_LibraryNotFound", ())):
        return (f"{what}: the NVML library (libnvidia-ml.so) was not found: no NVIDIA driver on this "
                "machine, so GPU power cannot be read (power profiling needs an NVIDIA GPU)")
    if isinstance(exc, getattr(nvml, "NVMLError_DriverNotLoaded", ())):
        return f"{what}: the NVIDIA driver is not loaded (nvidia-smi would fail too)"
    if isinstance(exc, getattr(nvml, "NVMLError_NoPermission", ())):
        return (f"{what}: NVML says insufficient permissions (run as a user who can open /dev/nvidia*, "
                "or ask the admin; inside a container pass the GPU with --gpus)")
    if isinstance(exc, getattr(nvml, "NVMLError_LibRmVersionMismatch", ())):
        return f"{what}: NVML/driver version mismatch (the driver was upgraded: reboot or reload it)"
    return f"{what}: NVML error {kind}: {exc}"


class NvmlReader:
    """Reads the GPUs through ``pynvml``. Every optional field is probed once at start;
    unsupported ones read as ``None`` and are listed in :attr:`DeviceInfo.notes`.

    ``nvml`` lets tests pass a stand-in module; by default ``import pynvml``.
    """

    name = "nvml"

    def __init__(self, devices: Sequence[int] | None = None, *, nvml: Any = None) -> None:
        if nvml is None:
            try:
                import pynvml as nvml  # type: ignore[no-redef]
            except ImportError as exc:
                raise PowerUnavailable(
                    "cannot import pynvml: install nvidia-ml-py (pip install nvidia-ml-py)") from exc
        self._nvml = nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            raise PowerUnavailable(_nvml_error_line(nvml, exc, "cannot start NVML")) from None
        self._open = True
        try:
            self._setup(devices)
        except Exception:
            self.close()
            raise

    def _setup(self, devices: Sequence[int] | None) -> None:
        nvml = self._nvml
        try:
            count = int(nvml.nvmlDeviceGetCount())
            driver = _text(nvml.nvmlSystemGetDriverVersion())
        except nvml.NVMLError as exc:
            raise PowerUnavailable(_nvml_error_line(nvml, exc, "cannot list GPUs")) from None
        if count == 0:
            raise PowerUnavailable("NVML sees no GPU on this machine")
        wanted = list(range(count)) if devices is None else [int(d) for d in devices]
        bad = [d for d in wanted if not 0 <= d < count]
        if bad:
            raise PowerUnavailable(
                f"device index {bad[0]} does not exist: NVML sees {count} GPU(s), indices 0..{count - 1}")
        if len(set(wanted)) != len(wanted):
            raise PowerUnavailable(f"device indices repeat: {wanted}")
        self._handles: dict[int, Any] = {}
        self._infos: list[DeviceInfo] = []
        self._supported: dict[int, dict[str, bool]] = {}
        self._power_mode: dict[int, str] = {}
        self._reasons_fn: dict[int, Callable[[Any], int] | None] = {}
        for idx in wanted:
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(idx)
                name = _text(nvml.nvmlDeviceGetName(handle))
            except nvml.NVMLError as exc:
                raise PowerUnavailable(_nvml_error_line(nvml, exc, f"cannot open GPU {idx}")) from None
            self._handles[idx] = handle
            self._infos.append(self._probe(idx, handle, name, driver))

    # --- probing -----------------------------------------------------------------------

    def _try(self, fn: Callable[[], Any]) -> tuple[bool, Any, Exception | None]:
        try:
            return True, fn(), None
        except self._nvml.NVMLError as exc:
            if isinstance(exc, getattr(self._nvml, "NVMLError_NoPermission", ())):
                return False, None, exc
            if isinstance(exc, getattr(self._nvml, "NVMLError_GpuIsLost", ())):
                raise PowerUnavailable(_nvml_error_line(self._nvml, exc, "GPU lost")) from None
            return False, None, exc
        except (AttributeError, NotImplementedError) as exc:  # older pynvml without the function
            return False, None, exc

    def _probe(self, idx: int, handle: Any, name: str, driver: str) -> DeviceInfo:
        nvml = self._nvml
        notes: list[str] = []
        ok_inst, inst, _ = self._try(lambda: self._instant_power_w(handle))
        if ok_inst and inst is not None and inst > 0:
            mode, field = "instant", "NVML_FI_DEV_POWER_INSTANT"
        else:
            ok_use, _, err = self._try(lambda: nvml.nvmlDeviceGetPowerUsage(handle))
            if not ok_use:
                raise PowerUnavailable(
                    f"GPU {idx} ({name}): power cannot be read "
                    f"({_nvml_error_line(nvml, err, 'nvmlDeviceGetPowerUsage') if err else 'unsupported'})")
            mode, field = "usage", "nvmlDeviceGetPowerUsage"
            notes.append("NVML_FI_DEV_POWER_INSTANT unsupported: using nvmlDeviceGetPowerUsage "
                         "(a ~1 s running average on Ampere and newer: short peaks are smoothed)")
        self._power_mode[idx] = mode
        sup: dict[str, bool] = {}
        probes: dict[str, Callable[[], Any]] = {
            "energy": lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(handle),
            "limit": lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle),
            "sm_clock": lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
            "mem_clock": lambda: nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM),
            "util": lambda: nvml.nvmlDeviceGetUtilizationRates(handle),
            "temp": lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
        }
        limit_w = None
        for key, fn in probes.items():
            ok, value, err = self._try(fn)
            sup[key] = ok
            if not ok:
                notes.append(f"{key} unsupported ({type(err).__name__})")
            elif key == "limit":
                limit_w = float(value) / 1000.0
        if not sup["energy"]:
            notes.append("no energy counter: energy is integrated from power samples")
        self._reasons_fn[idx] = None
        for fname in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"):
            fn = getattr(nvml, fname, None)
            if fn is None:
                continue
            ok, _, _ = self._try(lambda fn=fn: fn(handle))
            if ok:
                self._reasons_fn[idx] = fn
                break
        if self._reasons_fn[idx] is None:
            notes.append("clock-event (throttle) reasons unsupported")
        self._supported[idx] = sup
        uuid = ""
        ok, value, _ = self._try(lambda: nvml.nvmlDeviceGetUUID(handle))
        if ok:
            uuid = _text(value)
        return DeviceInfo(index=idx, name=name, uuid=uuid, driver=driver, power_limit_w=limit_w,
                          power_field=field, energy_counter=sup["energy"], notes=tuple(notes))

    def _instant_power_w(self, handle: Any) -> float | None:
        nvml = self._nvml
        (fv,) = nvml.nvmlDeviceGetFieldValues(handle, [nvml.NVML_FI_DEV_POWER_INSTANT])
        if int(fv.nvmlReturn) != int(getattr(nvml, "NVML_SUCCESS", 0)):
            return None
        return _field_value(nvml, fv) / 1000.0  # mW -> W

    # --- Reader protocol ---------------------------------------------------------------

    def devices(self) -> list[DeviceInfo]:
        return list(self._infos)

    def now(self) -> float:
        return time.monotonic()

    def read(self, index: int) -> Reading:
        nvml = self._nvml
        h = self._handles[index]
        sup = self._supported[index]
        t = time.monotonic()
        if self._power_mode[index] == "instant":
            power = self._instant_power_w(h)
            if power is None:  # transient failure of the field: fall back for this sample
                power = nvml.nvmlDeviceGetPowerUsage(h) / 1000.0
        else:
            power = nvml.nvmlDeviceGetPowerUsage(h) / 1000.0
        energy = float(nvml.nvmlDeviceGetTotalEnergyConsumption(h)) if sup["energy"] else None
        limit = nvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0 if sup["limit"] else None
        sm = float(nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM)) if sup["sm_clock"] else None
        mem = float(nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM)) if sup["mem_clock"] else None
        gpu_u = mem_u = None
        if sup["util"]:
            u = nvml.nvmlDeviceGetUtilizationRates(h)
            gpu_u, mem_u = float(u.gpu), float(u.memory)
        temp = float(nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)) if sup["temp"] else None
        fn = self._reasons_fn[index]
        reasons = int(fn(h)) if fn is not None else None
        return Reading(t=t, power_w=power, energy_mj=energy, limit_w=limit, sm_clock_mhz=sm,
                       mem_clock_mhz=mem, gpu_util_pct=gpu_u, mem_util_pct=mem_u, temp_c=temp,
                       clock_reasons=reasons)

    def close(self) -> None:
        if getattr(self, "_open", False):
            self._open = False
            with contextlib.suppress(Exception):  # shutting down must not raise
                self._nvml.nvmlShutdown()


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _field_value(nvml: Any, fv: Any) -> float:
    """The numeric value of an ``nvmlFieldValue_t`` according to its ``valueType``."""
    vt = int(fv.valueType)
    attr = {
        getattr(nvml, "NVML_VALUE_TYPE_DOUBLE", 0): "dVal",
        getattr(nvml, "NVML_VALUE_TYPE_UNSIGNED_INT", 1): "uiVal",
        getattr(nvml, "NVML_VALUE_TYPE_UNSIGNED_LONG", 2): "ulVal",
        getattr(nvml, "NVML_VALUE_TYPE_UNSIGNED_LONG_LONG", 3): "ullVal",
        getattr(nvml, "NVML_VALUE_TYPE_SIGNED_LONG_LONG", 4): "sllVal",
        getattr(nvml, "NVML_VALUE_TYPE_SIGNED_INT", 5): "siVal",
        getattr(nvml, "NVML_VALUE_TYPE_UNSIGNED_SHORT", 6): "usVal",
    }.get(vt, "uiVal")
    return float(getattr(fv.value, attr))


# --------------------------------------------------------------------------------------
# Replay (tests, demos)
# --------------------------------------------------------------------------------------


class ManualClock:
    """A clock tests advance by hand (``clock.advance(0.02)``)."""

    def __init__(self, t0: float = 1000.0) -> None:
        self.t = float(t0)

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> float:
        self.t += float(dt)
        return self.t


class ReplayReader:
    """Replays recorded per-device sample sequences.

    ``samples[index]`` is a list of dicts with ``t`` (seconds from the start of the trace)
    and any :class:`Reading` fields. A read at reader time ``now`` returns the latest
    sample with ``t <= now - start`` (values hold between samples, as NVML's do between
    updates; after the last sample the last values hold, i.e. the counter looks stuck).
    The reading's own ``t`` is the read time. ``clock`` defaults to ``time.monotonic``;
    pass a :class:`ManualClock` for deterministic tests. ``start`` is the clock value at
    trace time 0 (default: the reader's first :meth:`now` or :meth:`read`, i.e. when a
    monitor starts reading).
    """

    def __init__(self, devices: Sequence[DeviceInfo], samples: Mapping[int, Sequence[Mapping[str, Any]]], *,
                 clock: Callable[[], float] | None = None, start: float | None = None,
                 name: str = "replay") -> None:
        self._infos = list(devices)
        self._clock = clock or time.monotonic
        self._start = None if start is None else float(start)
        self.name = name
        self._seq: dict[int, list[dict[str, Any]]] = {}
        self._times: dict[int, list[float]] = {}
        for info in self._infos:
            seq = sorted((dict(s) for s in samples[info.index]), key=lambda s: float(s["t"]))
            if not seq:
                raise ValueError(f"replay samples for device {info.index} are empty")
            unknown = set().union(*seq) - set(READING_FIELDS)
            if unknown:
                raise ValueError(f"replay samples have unknown fields {sorted(unknown)}; "
                                 f"expected some of {list(READING_FIELDS)}")
            self._seq[info.index] = seq
            self._times[info.index] = [float(s["t"]) for s in seq]

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, devices: Sequence[int] | None = None,
                  clock: Callable[[], float] | None = None) -> ReplayReader:
        """Load a replay file: JSON ``{"format": "ditperf-power-replay", "version": 1,
        "devices": [DeviceInfo fields...], "samples": {"<index>": [{"t": s, "power_w": W,
        "energy_mj": mJ, ...}, ...]}}`` (see :func:`synthetic_trace` to make one)."""
        p = Path(path)
        try:
            doc = json.loads(p.read_text())
        except OSError as exc:
            raise PowerUnavailable(f"cannot read replay file {p}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise PowerUnavailable(f"replay file {p} is not JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != REPLAY_FORMAT:
            raise PowerUnavailable(f"replay file {p} is not a {REPLAY_FORMAT} file")
        infos = [DeviceInfo(**{**d, "notes": tuple(d.get("notes", ()))}) for d in doc["devices"]]
        if devices is not None:
            known = [i.index for i in infos]
            bad = [d for d in devices if d not in known]
            if bad:
                raise PowerUnavailable(f"device index {bad[0]} does not exist: the replay has devices {known}")
            infos = [i for i in infos if i.index in set(devices)]
        samples = {int(k): v for k, v in doc["samples"].items()}
        return cls(infos, samples, clock=clock, name=f"replay:{p.name}")

    @property
    def start(self) -> float:
        """Clock value at trace time 0 (fixed by the first use when not given)."""
        if self._start is None:
            self._start = self._clock()
        return self._start

    def devices(self) -> list[DeviceInfo]:
        return list(self._infos)

    def now(self) -> float:
        t = self._clock()
        if self._start is None:
            self._start = t
        return t

    def read(self, index: int) -> Reading:
        t = self.now()
        times = self._times[index]
        rel = t - self.start
        # latest sample at or before rel (binary search)
        lo, hi = 0, len(times)
        while lo < hi:
            mid = (lo + hi) // 2
            if times[mid] <= rel:
                lo = mid + 1
            else:
                hi = mid
        s = self._seq[index][max(lo - 1, 0)]
        return Reading(t=t, **{k: v for k, v in s.items() if k != "t"})

    def close(self) -> None:
        pass


def synthetic_trace(power_w: Callable[[float], float], duration_s: float, *, update_period_s: float = 0.1,
                    limit_w: float = 700.0, energy_start_mj: float = 5.0e9, energy_wrap: float | None = None,
                    stuck: tuple[float, float] | None = None, name: str = "Fake H100",
                    index: int = 0, driver: str = "550.00", reasons: Callable[[float], int] | None = None
                    ) -> tuple[DeviceInfo, list[dict[str, Any]]]:
    """A device trace as NVML would show it: ``power_w(t)`` is sampled once per
    ``update_period_s`` and held; the energy counter (mJ) is the exact integral of that
    held power, also updated once per period; clocks/utilization follow power.

    ``energy_wrap`` wraps the counter modulo that value; ``stuck=(t0, t1)`` freezes the
    counter during that span (it then jumps to the true value, as a counter that lagged).
    """
    if update_period_s <= 0:
        raise ValueError(f"update_period_s must be > 0, got {update_period_s}")
    n = math.ceil(duration_s / update_period_s) + 1
    out: list[dict[str, Any]] = []
    energy = float(energy_start_mj)
    frozen: float | None = None
    for i in range(n):
        t = i * update_period_s
        p = float(power_w(t))
        if i:
            energy += float(power_w(t - update_period_s)) * update_period_s * 1e3
        shown = energy
        if stuck is not None and stuck[0] <= t < stuck[1]:
            frozen = energy if frozen is None else frozen
            shown = frozen
        if energy_wrap is not None:
            shown = shown % energy_wrap
        frac = max(0.0, min(1.0, p / limit_w))
        out.append({
            "t": round(t, 9), "power_w": p, "energy_mj": float(round(shown)), "limit_w": limit_w,
            "sm_clock_mhz": 345.0 + 1635.0 * min(1.0, 2 * frac), "mem_clock_mhz": 2619.0,
            "gpu_util_pct": 100.0 * min(1.0, 1.5 * frac), "mem_util_pct": 60.0 * frac,
            "temp_c": 30.0 + 40.0 * frac, "clock_reasons": reasons(t) if reasons else (0x1 if frac < 0.2 else 0x0),
        })
    info = DeviceInfo(index=index, name=name, uuid=f"GPU-fake-{index}", driver=driver, power_limit_w=limit_w,
                      power_field="replay", energy_counter=True)
    return info, out


def write_replay(path: str | os.PathLike[str], traces: Sequence[tuple[DeviceInfo, list[dict[str, Any]]]]) -> Path:
    """Write traces (from :func:`synthetic_trace` or recorded) as a replay file."""
    p = Path(path)
    doc = {"format": REPLAY_FORMAT, "version": 1, "devices": [i.to_dict() for i, _ in traces],
           "samples": {str(i.index): s for i, s in traces}}
    p.write_text(json.dumps(doc))
    return p


def make_reader(devices: Sequence[int] | None = None) -> Reader:
    """The reader the CLI and callback use: a :class:`ReplayReader` when the test hook
    ``DITPERF_POWER_REPLAY`` names a replay file, else :class:`NvmlReader`. Raises
    :class:`PowerUnavailable` with one line when power cannot be read."""
    replay = os.environ.get(REPLAY_ENV)
    if replay:
        return ReplayReader.from_file(replay, devices=devices)
    return NvmlReader(devices)


def nvml_index_for_cuda_device(device: int) -> int:
    """The NVML index of CUDA device ``device``: matched by UUID (robust to
    CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER), else torch's own mapping, else the index."""
    import torch

    reader = NvmlReader(None)
    try:
        infos = reader.devices()
    finally:
        reader.close()
    uuid = str(getattr(torch.cuda.get_device_properties(device), "uuid", "") or "").lower()
    uuid = uuid.removeprefix("gpu-")
    if uuid:
        for info in infos:
            if info.uuid.lower().removeprefix("gpu-") == uuid:
                return info.index
    helper = getattr(torch.cuda, "_get_nvml_device_index", None)
    if helper is not None:
        with contextlib.suppress(Exception):  # fall through to the plain index
            return int(helper(device))
    return device


def reasons_names(mask: int) -> list[str]:
    """Names of the clock-event reason bits set in ``mask``."""
    return [name for bit, name in CLOCK_EVENT_REASONS.items() if mask & bit]


def reading_to_row(r: Reading) -> dict[str, Any]:
    return {k: getattr(r, k) for k in READING_FIELDS}


__all__ = [
    "CLOCK_EVENT_REASONS",
    "REPLAY_ENV",
    "THROTTLE_MASK",
    "DeviceInfo",
    "ManualClock",
    "NvmlReader",
    "PowerUnavailable",
    "Reader",
    "Reading",
    "ReplayReader",
    "make_reader",
    "nvml_index_for_cuda_device",
    "reasons_names",
    "synthetic_trace",
    "write_replay",
]
