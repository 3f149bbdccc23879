"""ditperf.export: ONNX export of DiT presets, graph surgery, TensorRT coverage and engines.

Public API (imported on first use, so ``import ditperf.export`` stays light)::

    from ditperf.export import ExportSpec, export_onnx, check_file
    res = export_onnx(ExportSpec(preset="tiny", out="tiny.onnx", opset=23))
    from ditperf.export import run_passes, coverage_report, translation_table

* :mod:`ditperf.export.onnx_export` — ``ExportSpec``, ``export_onnx``, ``check_file``,
  ``build_model``, ``check_against_torch``;
* :mod:`ditperf.export.translations` — ``translation_table(opset)`` for the custom ops;
* :mod:`ditperf.export.surgery` — ``run_passes``, ``PluginSpec``, ``SurgeryOptions``,
  ``verify_numerics``, ``check_model``;
* :mod:`ditperf.export.coverage` — ``coverage_report`` (= ``coverage.coverage``: load a
  file and report), ``analyze``, ``render`` (JSON schema
  ``ditperf.coverage/1`` documented there);
* :mod:`ditperf.export.opset` — ``convert_opset``, ``lower_18_to_17``;
* :mod:`ditperf.export.onnx_io` — ``load_model``, ``save_model``, ``ort_session``,
  ``OnnxInputError``;
* :mod:`ditperf.export.engine` — ``build_engine``, ``TrtRunner``, ``time_against_torch``
  (TensorRT + GPU only).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ExportSpec": "onnx_export", "ExportResult": "onnx_export", "export_onnx": "onnx_export",
    "check_file": "onnx_export", "build_model": "onnx_export",
    "check_against_torch": "onnx_export",
    "translation_table": "translations",
    "run_passes": "surgery", "PluginSpec": "surgery", "SurgeryOptions": "surgery",
    "verify_numerics": "surgery", "check_model": "surgery",
    "coverage_report": "coverage", "analyze": "coverage", "render": "coverage",
    "convert_opset": "opset", "lower_18_to_17": "opset",
    "load_model": "onnx_io", "save_model": "onnx_io", "ort_session": "onnx_io",
    "OnnxInputError": "onnx_io",
    "build_engine": "engine", "TrtRunner": "engine", "time_against_torch": "engine",
    "TensorRTUnavailable": "engine",
}

__all__ = sorted(_LAZY)  # noqa: PLE0605


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        attr = "coverage" if name == "coverage_report" else name
        return getattr(importlib.import_module(f"ditperf.export.{_LAZY[name]}"), attr)
    raise AttributeError(f"module 'ditperf.export' has no attribute {name!r}")
