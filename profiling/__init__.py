"""ditperf.profiling: NVML power sampling, power-proxy utilization, MFU, kernel rooflines."""

from ditperf.profiling.timing import Roofs, measure_roofs, time_ms

__all__ = ["Roofs", "measure_roofs", "time_ms"]
