"""ditperf.profiling: NVML power sampling, power-proxy utilization, MFU, kernel rooflines.

* :class:`PowerMonitor` (background NVML sampler, nestable windows, energy from the driver's
  counter) and its readers (:class:`NvmlReader`, :class:`ReplayReader` for tests);
* :func:`write_report` (JSON + CSV + PNG timeline), :func:`power_window` (mark spans from a
  process run under ``ditperf profile power``);
* power -> MFU calibration (:class:`Calibration`, :func:`find_calibration`);
* kernel timing and roofs (:func:`time_ms`, :func:`measure_roofs`, :func:`roofline_point`);
* the analytic traffic of a model step, no GPU needed (:func:`step_traffic`: bytes and FLOPs
  per operator on the meta device, serial and fused floors at given roofs);
* ``PowerCallback`` for Composer (Composer is the optional ``train`` extra).

Names are imported on first use (PEP 562), so ``ditperf --help`` and ``ditperf profile
power`` import neither torch nor Composer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY: dict[str, str] = {
    "Calibration": "calibration", "find_calibration": "calibration", "fit_monotone": "calibration",
    "save_calibration": "calibration", "load_calibrations": "calibration",
    "power_window": "marks",
    "PowerMonitor": "power",
    "DeviceInfo": "readers", "NvmlReader": "readers", "PowerUnavailable": "readers", "Reader": "readers",
    "Reading": "readers", "ReplayReader": "readers", "make_reader": "readers",
    "print_summary": "report", "write_report": "report",
    "roofline_point": "roofline",
    "time_ms": "timing", "measure_roofs": "timing", "Roofs": "timing",
    "StepTraffic": "traffic", "record_traffic": "traffic", "step_traffic": "traffic",
    "PowerCallback": "callback",  # needs Composer
}

__all__ = [
    "Calibration", "DeviceInfo", "NvmlReader", "PowerCallback", "PowerMonitor", "PowerUnavailable", "Reader",
    "Reading", "ReplayReader", "Roofs", "StepTraffic", "find_calibration", "fit_monotone", "load_calibrations", "make_reader",
    "measure_roofs", "power_window", "print_summary", "record_traffic", "roofline_point", "save_calibration",
    "step_traffic", "time_ms",
    "write_report",
]
assert sorted(__all__) == sorted(_LAZY)

if TYPE_CHECKING:  # for type checkers and IDEs
    from ditperf.profiling.calibration import (
        Calibration,
        find_calibration,
        fit_monotone,
        load_calibrations,
        save_calibration,
    )
    from ditperf.profiling.callback import PowerCallback
    from ditperf.profiling.marks import power_window
    from ditperf.profiling.power import PowerMonitor
    from ditperf.profiling.readers import (
        DeviceInfo,
        NvmlReader,
        PowerUnavailable,
        Reader,
        Reading,
        ReplayReader,
        make_reader,
    )
    from ditperf.profiling.report import print_summary, write_report
    from ditperf.profiling.roofline import roofline_point
    from ditperf.profiling.timing import Roofs, measure_roofs, time_ms
    from ditperf.profiling.traffic import StepTraffic, record_traffic, step_traffic


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"ditperf.profiling.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ditperf.profiling' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
