"""Numeric checks: onnxruntime (CPU) against a reference on the same random inputs.

Errors reported per output: ``max_abs`` = max |onnx - ref|, ``max_rel`` = max_abs / max |ref|
(relative to the output's magnitude: elementwise relative error explodes near zeros and
says nothing about a whole tensor).
"""

from __future__ import annotations

import numpy as np

#: Pass threshold on ``max_rel`` per model dtype (the reference runs the same dtype).
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 6e-2}
_DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


def dtype_name(a: np.ndarray) -> str:
    """"fp32", "fp16", "bf16", "fp64", or numpy's name for other dtypes."""
    return _DTYPE_NAMES.get(np.asarray(a).dtype.name, np.asarray(a).dtype.name)


def tolerance_for(dtype: str) -> float:
    """``max_rel`` an output of this dtype may differ by: TOLERANCE (fp64 as fp32), 0 for
    integer and bool outputs."""
    return TOLERANCE.get("fp32" if dtype == "fp64" else dtype, 0.0)

_ORT_NP = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def _np_type(ort_type: str):
    if ort_type == "tensor(bfloat16)":
        import ml_dtypes

        return ml_dtypes.bfloat16
    if ort_type not in _ORT_NP:
        raise ValueError(f"input type {ort_type} is not supported by the random-input generator")
    return _ORT_NP[ort_type]


def random_feeds(session, *, seed: int = 0, dims: dict[str, int] | None = None,
                 default_dim: int = 2) -> dict[str, np.ndarray]:
    """Random inputs for every session input: normal floats, ints in [0, 2), random bools
    (at least one True per row, so masks never blank a whole row). Symbolic dimensions take
    ``dims[name]`` or ``default_dim``."""
    rng = np.random.default_rng(seed)
    feeds = {}
    dims = dims or {}
    for inp in session.get_inputs():
        shape = [d if isinstance(d, int) and d >= 0 else dims.get(str(d), default_dim)
                 for d in inp.shape]
        t = _np_type(inp.type)
        if t is np.bool_:
            a = rng.random(shape) < 0.7
            if a.ndim:
                a[..., 0] = True
        elif np.issubdtype(np.dtype(t), np.integer):
            a = rng.integers(0, 2, size=shape).astype(t)
        else:
            a = rng.standard_normal(shape).astype(np.float32).astype(t)
        feeds[inp.name] = a
    return feeds


def compare_outputs(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict:
    """Per-output and overall ``max_abs`` / ``max_rel`` (see the module docstring).

    Non-finite values must sit at the same places with the same value (NaN where the
    reference has NaN, +inf where it has +inf); anything else, or a reference without a
    single finite value, makes that output's errors NaN, which no tolerance accepts."""
    per = {}
    for name, r in ref.items():
        if name not in got:
            raise ValueError(f"output {name!r} missing from the compared model")
        a = np.asarray(got[name], dtype=np.float64)
        b = np.asarray(r, dtype=np.float64)
        if a.shape != b.shape:
            raise ValueError(f"output {name!r}: shape {a.shape} != reference {b.shape}")
        fin_a, fin_b = np.isfinite(a), np.isfinite(b)
        same_nonfinite = bool(np.array_equal(fin_a, fin_b) and np.array_equal(np.isnan(a), np.isnan(b))
                              and np.array_equal(a[np.isinf(b)], b[np.isinf(b)]))
        ok = same_nonfinite and (fin_b.any() or b.size == 0)
        diff = np.abs(a[fin_b] - b[fin_b]) if ok else np.empty(0)
        max_abs = float(diff.max()) if diff.size else 0.0
        scale = float(np.abs(b[fin_b]).max()) if fin_b.any() else 0.0
        entry = {"max_abs": max_abs if ok else float("nan"),
                 "max_rel": (max_abs / scale if scale > 0 else max_abs) if ok else float("nan"),
                 "ref_max": scale, "shape": list(b.shape), "dtype": dtype_name(r)}
        if not ok:
            entry["note"] = ("no finite reference value" if same_nonfinite else
                             f"non-finite values differ: {int((~fin_a).sum())} vs {int((~fin_b).sum())} in the "
                             "reference, or at other places")
        per[name] = entry

    def worst(key: str) -> float:
        vals = [v[key] for v in per.values()]
        return float("nan") if any(np.isnan(vals)) else max(vals, default=0.0)

    return {"outputs": per, "max_abs": worst("max_abs"), "max_rel": worst("max_rel")}
