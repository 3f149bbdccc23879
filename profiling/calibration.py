"""Power -> MFU calibration: a monotone map from a GPU's mean power to the fraction of its
measured bf16 matmul roof that a GEMM-dominated workload achieves.

Why: power is the one utilization signal every GPU exposes cheaply and continuously; a
kernel that keeps the tensor cores busy draws more of it. ``ditperf profile calibrate``
runs bf16 GEMMs of increasing size and duty cycle (plus a memory-bound copy) under the
:class:`~ditperf.profiling.PowerMonitor`, records (achieved TFLOP/s, mean power) pairs,
and fits a monotone non-decreasing, piecewise-linear map power -> MFU by isotonic
regression (pool-adjacent-violators). The map is stored in a JSON file keyed by GPU name,
driver and enforced power limit; the monitor and the Composer callback then report
``estimated_mfu`` for any window.

Caveats (also written into the file): the map holds for GEMM-dominated work at the same
power limit; a memory-bound kernel can draw much power at near-zero MFU (the calibration
records one copy point to show how much), so read ``estimated_mfu`` as "the MFU a GEMM
workload drawing this power would have". MFU here is relative to the *measured* matmul
roof (``roof_tflops``), not the datasheet peak; ``estimated_tflops`` = MFU x roof lets you
divide by any peak you prefer.

File format (``schema_version`` 1)::

    {"schema_version": 1, "format": "ditperf-power-calibration",
     "calibrations": {"<gpu name>|driver <driver>|limit <W> W": {
         "gpu_name", "driver", "power_limit_w", "idle_power_w", "roof_tflops",
         "knots_power_w": [...], "knots_mfu": [...],      # the monotone map
         "points": [{"label", "n", "duty", "tflops", "mfu", "power_w", "seconds"}, ...],
         "memory_bound": {"label", "gbps", "power_w", "seconds"} | null,
         "created", "software": {...}, "caveat"}}}

Default location: ``$DITPERF_POWER_CALIBRATION`` (a file), else
``$DITPERF_CACHE_DIR/power_calibration.json``, else
``${XDG_CACHE_HOME:-~/.cache}/ditperf/power_calibration.json``. Files shipped in
``ditperf/profiling/data/*.json`` are searched after it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from ditperf.profiling.readers import DeviceInfo

SCHEMA_VERSION = 1
FORMAT = "ditperf-power-calibration"
CAVEAT = ("estimated_mfu assumes GEMM-dominated work at this power limit; memory-bound work draws "
          "power at low MFU (see memory_bound). MFU is relative to the measured bf16 matmul roof.")


def calibration_key(gpu_name: str, driver: str, power_limit_w: float | None) -> str:
    limit = "unknown" if power_limit_w is None else f"{power_limit_w:.0f}"
    return f"{gpu_name}|driver {driver}|limit {limit} W"


def default_calibration_path() -> Path:
    """Where calibrations are stored and looked up (see the module docstring)."""
    explicit = os.environ.get("DITPERF_POWER_CALIBRATION")
    if explicit:
        return Path(explicit)
    cache = os.environ.get("DITPERF_CACHE_DIR")
    if cache:
        return Path(cache) / "power_calibration.json"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ditperf" / "power_calibration.json"


def isotonic_increasing(y: Sequence[float], w: Sequence[float] | None = None) -> np.ndarray:
    """Weighted least-squares non-decreasing fit of ``y`` (in the given order) by
    pool-adjacent-violators: merge neighbouring blocks while a block's mean exceeds the
    next one's; each block's value is its weighted mean."""
    y_arr = np.asarray(y, dtype=float)
    w_arr = np.ones_like(y_arr) if w is None else np.asarray(w, dtype=float)
    if y_arr.ndim != 1 or w_arr.shape != y_arr.shape:
        raise ValueError("y and w must be 1-D and the same length")
    if np.any(w_arr <= 0):
        raise ValueError("weights must be > 0")
    means: list[float] = []
    weights: list[float] = []
    counts: list[int] = []
    for yi, wi in zip(y_arr, w_arr):
        means.append(float(yi))
        weights.append(float(wi))
        counts.append(1)
        while len(means) > 1 and means[-2] > means[-1]:
            m2, w2, c2 = means.pop(), weights.pop(), counts.pop()
            m1, w1, c1 = means.pop(), weights.pop(), counts.pop()
            means.append((m1 * w1 + m2 * w2) / (w1 + w2))
            weights.append(w1 + w2)
            counts.append(c1 + c2)
    return np.repeat(np.asarray(means), counts)


def fit_monotone(power_w: Sequence[float], mfu: Sequence[float]) -> tuple[list[float], list[float]]:
    """Knots (power, mfu) of a non-decreasing piecewise-linear map fitted to the pairs.

    Points are ordered by power (equal powers averaged), fitted isotonically, and each
    pooled block becomes one knot at its mean power (a block is a run of points the data
    cannot order: their mean is the best estimate there). Needs >= 2 distinct powers.
    """
    p = np.asarray(power_w, dtype=float)
    m = np.asarray(mfu, dtype=float)
    if p.shape != m.shape or p.ndim != 1:
        raise ValueError("power_w and mfu must be 1-D sequences of the same length")
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(m))):
        raise ValueError("power_w and mfu must be finite")
    order = np.argsort(p, kind="stable")
    p, m = p[order], m[order]
    up, inv, cnt = np.unique(p, return_inverse=True, return_counts=True)
    if up.size < 2:
        raise ValueError("calibration needs points at two or more distinct power levels")
    um = np.bincount(inv, weights=m) / cnt
    fitted = isotonic_increasing(um, cnt)
    knots_p: list[float] = []
    knots_m: list[float] = []
    i = 0
    while i < up.size:
        j = i
        while j + 1 < up.size and fitted[j + 1] == fitted[i]:
            j += 1
        wsum = cnt[i:j + 1].sum()
        knots_p.append(float((up[i:j + 1] * cnt[i:j + 1]).sum() / wsum))
        knots_m.append(float(max(0.0, fitted[i])))
        i = j + 1
    if len(knots_p) == 1:  # everything pooled: a flat map spanning the measured range
        knots_p = [float(up[0]), float(up[-1])]
        knots_m = knots_m * 2
    return knots_p, knots_m


@dataclass
class Calibration:
    """A fitted power -> MFU map for one (GPU, driver, power limit)."""

    gpu_name: str
    driver: str
    power_limit_w: float | None
    roof_tflops: float
    knots_power_w: list[float]
    knots_mfu: list[float]
    idle_power_w: float | None = None
    points: list[dict[str, Any]] = field(default_factory=list)
    memory_bound: dict[str, Any] | None = None
    created: str = ""
    software: dict[str, str] = field(default_factory=dict)
    caveat: str = CAVEAT

    def __post_init__(self) -> None:
        kp, km = self.knots_power_w, self.knots_mfu
        if len(kp) != len(km) or len(kp) < 2:
            raise ValueError("a calibration needs >= 2 knots with as many MFU values as powers")
        if any(b <= a for a, b in pairwise(kp)) or any(b < a for a, b in pairwise(km)):
            raise ValueError("calibration knots must have increasing power and non-decreasing MFU")
        if not self.roof_tflops > 0:
            raise ValueError(f"roof_tflops must be > 0, got {self.roof_tflops}")

    @property
    def key(self) -> str:
        return calibration_key(self.gpu_name, self.driver, self.power_limit_w)

    @classmethod
    def fit(cls, points: Sequence[dict[str, Any]], *, gpu_name: str, driver: str, power_limit_w: float | None,
            roof_tflops: float, idle_power_w: float | None = None, memory_bound: dict[str, Any] | None = None,
            software: dict[str, str] | None = None) -> Calibration:
        """Fit from sweep points (dicts with ``power_w`` and ``mfu``)."""
        kp, km = fit_monotone([pt["power_w"] for pt in points], [pt["mfu"] for pt in points])
        return cls(gpu_name=gpu_name, driver=driver, power_limit_w=power_limit_w, roof_tflops=roof_tflops,
                   knots_power_w=kp, knots_mfu=km, idle_power_w=idle_power_w, points=list(points),
                   memory_bound=memory_bound,
                   created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                   software=dict(software or {}))

    def mfu_at(self, power_w: float) -> float:
        """Estimated MFU fraction (of the measured roof) at this mean power. Linear between
        knots, clamped to the end knots outside the calibrated range."""
        return float(np.interp(float(power_w), self.knots_power_w, self.knots_mfu))

    def in_range(self, power_w: float) -> bool:
        return self.knots_power_w[0] <= power_w <= self.knots_power_w[-1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def load_calibrations(path: str | os.PathLike[str]) -> dict[str, Calibration]:
    """All calibrations in one file (empty when the file does not exist)."""
    p = Path(path)
    if not p.exists():
        return {}
    try:
        doc = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"calibration file {p} cannot be read: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{p} is not a {FORMAT} file")
    if int(doc.get("schema_version", 0)) > SCHEMA_VERSION:
        raise ValueError(f"{p} has schema_version {doc['schema_version']}; this ditperf reads <= {SCHEMA_VERSION}")
    cals = doc.get("calibrations", {})
    if not isinstance(cals, dict):
        raise ValueError(f"{p}: 'calibrations' must be an object keyed by GPU/driver/limit")  # noqa: TRY004 - one exception type for every malformed file
    out: dict[str, Calibration] = {}
    for key, entry in cals.items():
        try:
            cal = Calibration.from_dict(entry)
            if len(cal.knots_power_w) != len(cal.knots_mfu) or not cal.knots_power_w:
                raise ValueError("knots_power_w and knots_mfu must be non-empty and of one length")
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{p}: calibration {key!r} is malformed ({exc})") from None
        out[key] = cal
    return out


def save_calibration(cal: Calibration, path: str | os.PathLike[str] | None = None) -> Path:
    """Add (or replace) ``cal`` in the file at ``path`` (default location when None),
    written atomically. Returns the path."""
    p = Path(path) if path is not None else default_calibration_path()
    existing = load_calibrations(p) if p.exists() else {}
    existing[cal.key] = cal
    doc = {"schema_version": SCHEMA_VERSION, "format": FORMAT,
           "calibrations": {k: v.to_dict() for k, v in existing.items()}}
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=p.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=2)
    os.replace(tmp, p)
    return p


def _search_paths(path: str | os.PathLike[str] | None) -> list[Path]:
    if path is not None:
        return [Path(path)]
    shipped = sorted((Path(__file__).parent / "data").glob("*.json"))
    return [default_calibration_path(), *shipped]


def find_calibration(info: DeviceInfo, path: str | os.PathLike[str] | None = None
                     ) -> tuple[Calibration | None, str]:
    """The calibration for this device, and a note saying where it came from (or why none).

    Exact (name, driver, limit) match first; otherwise the same GPU name and power limit
    (within 1 W) with another driver is used and the note says so. A different power limit
    never matches (the power -> clock relation changes with the cap).
    """
    near: tuple[Calibration, Path] | None = None
    for p in _search_paths(path):
        try:
            cals = load_calibrations(p)
        except ValueError as exc:
            return None, str(exc)
        key = calibration_key(info.name, info.driver, info.power_limit_w)
        if key in cals:
            return cals[key], f"calibration {key!r} from {p}"
        for cal in cals.values():
            same_limit = (cal.power_limit_w is not None and info.power_limit_w is not None
                          and abs(cal.power_limit_w - info.power_limit_w) <= 1.0)
            if near is None and cal.gpu_name == info.name and same_limit:
                near = (cal, p)
    if near is not None:
        cal, p = near
        return cal, f"calibration from {p} made with driver {cal.driver} (this GPU runs {info.driver})"
    return None, f"no calibration for {info.name} at {info.power_limit_w} W (run `ditperf profile calibrate`)"


__all__ = ["CAVEAT", "Calibration", "calibration_key", "default_calibration_path", "find_calibration",
           "fit_monotone", "isotonic_increasing", "load_calibrations", "save_calibration"]
