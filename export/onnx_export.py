"""Export a ditperf DiT preset to ONNX (dynamo exporter) and check it with onnxruntime.

``export_onnx(ExportSpec(...))``:

1. builds the model (``--ckpt`` weights, or seeded random weights: without a checkpoint the
   zero-initialized adaLN / final layers are given small random values too, otherwise the
   model outputs exactly 0 and a numeric check proves nothing);
2. ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)`` with the
   translations in :mod:`ditperf.export.translations` (the Triton backend's custom ops become
   LayerNormalization + Mul/Add, MatMul/Softmax/MatMul or opset-23 Attention/RMSNormalization);
3. opset 17: the dynamo exporter's minimum is 18 (asking for 17 silently gives 18), so the
   model is exported at 18 and lowered with ``onnx.version_converter``; the report says so;
4. saves inline, or with external data (``<name>.onnx.data``) when the model passes the 2 GB
   protobuf limit (t2i-1b in fp32 is ~4 GB) or when asked;
5. records what is needed to rebuild the same PyTorch model in the ONNX ``metadata_props``
   (``ditperf.preset``, ``ditperf.seed``, ``ditperf.ckpt``, sizes, dtype, backend), so
   ``ditperf export check model.onnx`` compares against the same weights;
6. checks numerics with onnxruntime on CPU against the PyTorch model (default).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ditperf.export.check import TOLERANCE, compare_outputs
from ditperf.export.onnx_io import OnnxInputError, default_opset, load_model

SUPPORTED_OPSETS = (17, 18, 20, 23)
DTYPES = ("fp32", "fp16", "bf16")
#: numeric check by default only below this parameter footprint (bytes): ORT + torch copies.
CHECK_MAX_BYTES = 3 * 2**30
META_PREFIX = "ditperf."


@dataclass
class ExportSpec:
    """What to export. ``batch`` is an int or ``"dynamic"`` (example batch 2, a symbolic
    batch dimension in the graph)."""

    preset: str
    out: str
    ckpt: str | None = None
    height: int | None = None
    width: int | None = None
    text_len: int | None = None
    batch: int | str = 1
    opset: int = 18
    dtype: str = "fp32"
    backend: str = "triton"
    attention: str = "auto"
    seed: int = 0
    external_data: bool | None = None  # None: only when > 2 GB
    check: bool | None = None  # None: when the model fits in memory comfortably


@dataclass
class ExportResult:
    path: str
    data_path: str | None
    opset_requested: int
    opset: int
    notes: list[str]
    ops: dict[str, int]
    nodes: int
    params: int
    bytes: int
    seconds: float
    check: dict | None = None
    spec: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def torch_dtype(name: str):
    import torch

    try:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    except KeyError:
        raise OnnxInputError(f"--dtype {name!r}: expected one of {', '.join(DTYPES)}") from None


def _validate(spec: ExportSpec) -> None:
    if spec.opset not in SUPPORTED_OPSETS:
        raise OnnxInputError(f"--opset {spec.opset}: expected one of "
                             f"{', '.join(map(str, SUPPORTED_OPSETS))}")
    torch_dtype(spec.dtype)
    if spec.backend not in ("torch", "triton"):
        raise OnnxInputError(f"--backend {spec.backend!r}: expected torch or triton")
    if not (spec.batch == "dynamic" or (isinstance(spec.batch, int) and spec.batch >= 1)):
        raise OnnxInputError(f"--batch {spec.batch!r}: expected a positive integer or 'dynamic'")
    if spec.attention == "onnx" and spec.opset < 23:
        raise OnnxInputError("--attention onnx (the ONNX Attention op) needs --opset 23")
    for name in ("height", "width", "text_len"):
        v = getattr(spec, name)
        if v is not None and v < 1:
            raise OnnxInputError(f"--{name.replace('_', '-')} {v}: expected a positive integer")
    if spec.ckpt is not None and not Path(spec.ckpt).is_file():
        raise OnnxInputError(f"--ckpt {spec.ckpt}: no such file")


# ----------------------------------------------------------------------------------------
# Model


def _strip_prefixes(sd: dict[str, Any], wanted: set[str]) -> dict[str, Any]:
    for prefix in ("", "model.", "module.", "_orig_mod.", "model.module.", "model._orig_mod."):
        cand = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if wanted <= set(cand):
            return {k: v for k, v in cand.items() if k in wanted}
    return sd


def load_checkpoint(model, path: str) -> None:
    """Load weights from a plain ``state_dict`` file, a dict with ``state_dict``/``model``, or
    a Composer checkpoint (``state.model``), stripping ``model.``/``module.`` prefixes."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise OnnxInputError(f"--ckpt {path}: cannot read it with torch.load ({exc})") from exc
    sd = obj
    if isinstance(obj, dict) and "state" in obj and isinstance(obj["state"], dict):
        sd = obj["state"].get("model", obj["state"])
    elif isinstance(obj, dict):
        for key in ("state_dict", "model", "ema"):
            if isinstance(obj.get(key), dict):
                sd = obj[key]
                break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise OnnxInputError(f"--ckpt {path}: no tensor state_dict found inside")
    want = set(model.state_dict())
    sd = _strip_prefixes(sd, want)
    missing = sorted(want - set(sd))
    if missing:
        raise OnnxInputError(f"--ckpt {path}: {len(missing)} parameter(s) of preset "
                             f"{model.config.name!r} missing, e.g. {', '.join(missing[:3])}")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise OnnxInputError(f"--ckpt {path}: does not fit preset {model.config.name!r}: "
                             f"{first}") from exc


def perturb_zero_init(model, seed: int, std: float = 0.02) -> int:
    """Give every all-zero parameter small random values (seeded); returns how many.

    adaLN-Zero makes a fresh DiT output exactly 0, which would make any numeric check pass.
    """
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    n = 0
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
                n += 1
    return n


def build_model(preset: str, *, ckpt: str | None = None, backend: str = "torch",
                dtype: str = "fp32", seed: int = 0):
    """The DiT ``preset`` in eval mode with checkpoint or seeded random weights."""
    import torch
    from ditperf.model import DiT

    torch.manual_seed(seed)
    try:
        model = DiT(preset, backend=backend)
    except (KeyError, ValueError) as exc:
        raise OnnxInputError(f"--preset {preset!r}: {exc}") from exc
    if ckpt:
        load_checkpoint(model, ckpt)
    else:
        perturb_zero_init(model, seed)
    return model.to(torch_dtype(dtype)).eval()


def example_inputs(model, batch: int, spec_like: dict, seed: int = 0) -> tuple:
    import torch

    g = torch.Generator().manual_seed(seed + 12345)
    return model.example_inputs(batch, device="cpu", dtype=torch_dtype(spec_like["dtype"]),
                                height=spec_like.get("height"), width=spec_like.get("width"),
                                text_len=spec_like.get("text_len"), generator=g)


# ----------------------------------------------------------------------------------------
# Export


def _quiet_export(fn: Callable[[], Any]) -> Any:
    """Run the exporter with its per-step chatter reduced to warnings."""
    import logging

    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export",
                                               "torch._export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        return fn()
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def _exporter_message(exc: BaseException) -> str:
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("<class") and "Error" in ln:
            return ln
    return lines[0] if lines else type(exc).__name__


def _dynamic_shapes(model, args: tuple) -> tuple:
    import torch

    batch = torch.export.Dim("batch", min=1, max=4096)
    return tuple({0: batch} if isinstance(a, torch.Tensor) and a.dim() >= 1 else None
                 for a in args)


def _metadata(spec: ExportSpec, opset: int) -> dict[str, str]:
    keys = ("preset", "ckpt", "height", "width", "text_len", "batch", "dtype", "backend",
            "attention", "seed")
    meta = {META_PREFIX + k: str(getattr(spec, k)) for k in keys if getattr(spec, k) is not None}
    meta[META_PREFIX + "opset_requested"] = str(spec.opset)
    meta[META_PREFIX + "opset"] = str(opset)
    return meta


def read_metadata(model_proto) -> dict[str, str]:
    return {p.key[len(META_PREFIX):]: p.value for p in model_proto.metadata_props
            if p.key.startswith(META_PREFIX)}


def _set_metadata(proto, meta: dict[str, str]) -> None:
    keep = [p for p in proto.metadata_props if p.key not in meta]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


def export_onnx(spec: ExportSpec, *, log: Callable[[str], None] = print,
                model=None) -> ExportResult:
    """Export ``spec.preset`` to ``spec.out`` (see the module docstring)."""
    import onnx
    import torch
    from ditperf.export.onnx_io import require

    _validate(spec)
    require("onnxscript", "ONNX export (torch.onnx.export with dynamo=True)")
    from ditperf.export.translations import translation_table

    t0 = time.perf_counter()
    if model is None:
        log(f"building {spec.preset} ({spec.backend} backend, {spec.dtype}, "
            f"{'ckpt ' + spec.ckpt if spec.ckpt else f'random weights, seed {spec.seed}'})")
        model = build_model(spec.preset, ckpt=spec.ckpt, backend=spec.backend, dtype=spec.dtype,
                            seed=spec.seed)
    params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    dynamic = spec.batch == "dynamic"
    batch = 2 if dynamic else int(spec.batch)
    args = example_inputs(model, batch, asdict(spec), seed=spec.seed)
    notes: list[str] = []
    export_opset = max(spec.opset, 18)
    if spec.opset < 18:
        notes.append(f"opset {spec.opset}: torch's dynamo exporter writes opset >= 18; exported "
                     f"at 18 and lowered exactly to {spec.opset} by ditperf.export.opset "
                     "(onnx's version converter has no 18->17 Split adapter)")
    table = translation_table(export_opset, spec.attention)
    log(f"exporting with torch.onnx.export(dynamo=True, opset {export_opset}"
        f"{', dynamic batch' if dynamic else f', batch {batch}'}) ...")
    kwargs = {"dynamo": True, "opset_version": export_opset, "custom_translation_table": table,
              "input_names": list(model.input_names),
              "output_names": list(model.output_names), "verbose": False, "optimize": True}
    if dynamic:
        kwargs["dynamic_shapes"] = _dynamic_shapes(model, args)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used.*")
            prog = _quiet_export(lambda: torch.onnx.export(model, args, **kwargs))
    except Exception as exc:
        raise OnnxInputError(f"torch.onnx.export failed: {_exporter_message(exc)}") from exc
    out = Path(spec.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = out.parent / (out.name + ".data")
    if data.exists():
        data.unlink()
    external = spec.external_data
    if external is None:
        external = param_bytes > 2**31 - 2**27
    meta = _metadata(spec, spec.opset)
    for k, v in meta.items():
        prog.model.metadata_props[k] = v
    log(f"saving {out}{' + external data ' + data.name if external else ''} ...")
    prog.save(out, external_data=external)
    del prog
    proto = onnx.load(str(out), load_external_data=False)
    if spec.opset < 18:
        from ditperf.export.opset import convert_opset

        proto = convert_opset(proto, spec.opset)
        _set_metadata(proto, meta)
        onnx.save_model(proto, str(out))
    got = default_opset(proto)
    if got != spec.opset:
        notes.append(f"asked for opset {spec.opset}, the file has opset {got}")
    ops = Counter(n.op_type for n in proto.graph.node)
    result = ExportResult(
        path=str(out), data_path=str(data) if data.exists() else None,
        opset_requested=spec.opset, opset=int(got or 0), notes=notes,
        ops=dict(sorted(ops.items())), nodes=len(proto.graph.node), params=params,
        bytes=out.stat().st_size + (data.stat().st_size if data.exists() else 0),
        seconds=0.0, spec=asdict(spec))
    do_check = spec.check if spec.check is not None else param_bytes <= CHECK_MAX_BYTES
    if do_check:
        log("checking numerics with onnxruntime (CPU) against the PyTorch model ...")
        try:
            result.check = check_against_torch(
                out, model, meta={k[len(META_PREFIX):]: v for k, v in meta.items()},
                batch=3 if dynamic else batch, seed=spec.seed + 1, log=log)
        except OnnxInputError as exc:  # onnxruntime cannot load or run it (bf16, old ORT)
            if spec.check:
                raise
            notes.append(f"numeric check skipped: {exc}")
    elif spec.check is None:
        notes.append(f"numeric check skipped: {param_bytes / 2**30:.1f} GiB of weights "
                     "(run `ditperf export check` on a machine with enough memory)")
    result.seconds = time.perf_counter() - t0
    return result


# ----------------------------------------------------------------------------------------
# Numeric check


def _to_numpy(t) -> Any:
    import torch

    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.detach().cpu().numpy()


#: Above this many parameters a Triton-backend reference is not run under the CPU
#: interpreter (minutes per forward): the torch backend is the reference instead.
INTERPRETER_MAX_PARAMS = 20_000_000


def _reference_model(model, log: Callable[[str], None]):
    """(model, device, description): the GPU when present; on CPU the Triton backend only
    for small models (the interpreter is slow), else the torch backend (same weights)."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = sum(p.numel() for p in model.parameters())
    if device.type == "cpu" and model.backend == "triton" and n > INTERPRETER_MAX_PARAMS:
        log(f"reference: torch backend ({n / 1e6:.0f}M params are too slow for the Triton "
            "interpreter on CPU)")
        model.set_backend("torch")
    return model.to(device), device


@contextlib.contextmanager
def _no_tf32():
    """fp32 means fp32 for the reference: cuDNN convolutions default to TF32 on Ampere+."""
    import torch

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def check_against_torch(path: str | os.PathLike, model, *, meta: dict[str, str],
                        batch: int | None = None, seed: int = 1,
                        log: Callable[[str], None] = lambda _m: None) -> dict:
    """onnxruntime (CPU) vs ``model`` on the same random inputs: max abs/rel error.

    ``batch`` defaults to the exported batch (2 for a dynamic batch, whose graph is then
    checked at 3 by the export command: a different size than the traced one). The PyTorch
    reference runs on the GPU when there is one."""
    import torch
    from ditperf.export.onnx_io import ort_session

    if batch is None:
        batch = 2 if meta.get("batch", "1") == "dynamic" else int(meta.get("batch", "1"))
    try:
        sess = ort_session(path)
    except OnnxInputError:
        raise
    except Exception as exc:
        hint = (" (onnxruntime's CPU provider lacks most bf16 kernels: check an fp32 or fp16 "
                "export instead)" if meta.get("dtype") == "bf16" else "")
        raise OnnxInputError(f"onnxruntime cannot load {path}: "
                             f"{str(exc).strip().splitlines()[0][:300]}{hint}") from exc
    names = [i.name for i in sess.get_inputs()]
    static_b = sess.get_inputs()[0].shape[0] if sess.get_inputs()[0].shape else None
    if isinstance(static_b, int) and static_b != batch:
        raise OnnxInputError(f"{path} has a static batch of {static_b}; checking batch {batch} "
                             "needs an export with --batch dynamic (or --batch "
                             f"{batch})")
    missing = [n for n in names if n not in model.input_names]
    if missing:
        raise OnnxInputError(f"{path}: ONNX inputs {missing} do not match the model's inputs "
                             f"{list(model.input_names)} (was it exported from this preset?)")
    args = example_inputs(model, batch, {k: _maybe_int(meta.get(k)) for k in
                                         ("height", "width", "text_len")} |
                          {"dtype": meta.get("dtype", "fp32")}, seed=seed)
    by_name = dict(zip(model.input_names, args, strict=True))
    feeds = {n: _to_numpy(by_name[n]) for n in names}
    model, device = _reference_model(model, log)
    with torch.no_grad(), _no_tf32():
        ref = model(*(a.to(device) for a in args)).float().cpu()
    t0 = time.perf_counter()
    try:
        (got,) = sess.run(None, feeds)
    except Exception as exc:
        raise OnnxInputError(f"onnxruntime (CPU) cannot run {path}: "
                             f"{str(exc).strip().splitlines()[0][:300]}") from exc
    ort_ms = (time.perf_counter() - t0) * 1e3
    err = compare_outputs({"v": ref.numpy()}, {"v": got.astype("float32")})
    dtype = meta.get("dtype", "fp32")
    tol = TOLERANCE.get(dtype, 1e-4)
    ok = math.isfinite(err["max_rel"]) and err["max_rel"] <= tol
    return {"batch": batch, "max_abs": err["max_abs"], "max_rel": err["max_rel"],
            "ref_max": err["outputs"]["v"]["ref_max"], "tolerance_rel": tol, "ok": ok,
            "ort_ms": ort_ms,
            "reference": f"PyTorch {model.backend} backend on {device.type}, {dtype}"}


def _maybe_int(v: str | None) -> int | None:
    return int(v) if v not in (None, "None", "") else None


def check_file(path: str | os.PathLike, *, preset: str | None = None, ckpt: str | None = None,
               backend: str | None = None, batch: int | None = None, seed: int | None = None,
               log: Callable[[str], None] = print) -> dict:
    """``ditperf export check``: rebuild the PyTorch model the file was exported from (from
    its metadata, overridable) and compare onnxruntime against it."""
    proto = load_model(path, load_external_data=False)
    meta = read_metadata(proto)
    preset = preset or meta.get("preset")
    if not preset:
        raise OnnxInputError(f"{path}: no ditperf metadata in the file; pass --preset (and "
                             "--ckpt for trained weights)")
    if meta.get("preset") and preset != meta["preset"]:
        log(f"warning: the file was exported from preset {meta['preset']!r}, checking "
            f"against {preset!r}")
    ckpt = ckpt or (meta.get("ckpt") if meta.get("ckpt") not in (None, "None") else None)
    seed = seed if seed is not None else int(meta.get("seed", "0"))
    backend = backend or meta.get("backend", "torch")
    dtype = meta.get("dtype", "fp32")
    if not ckpt and not meta:
        log("warning: no checkpoint and no ditperf metadata: the weights will not match")
    meta = dict(meta, backend=backend, dtype=dtype)
    model = build_model(preset, ckpt=ckpt, backend=backend, dtype=dtype, seed=seed)
    log(f"comparing onnxruntime (CPU) with PyTorch {preset} ({backend} backend, {dtype}, "
        f"{'ckpt ' + ckpt if ckpt else f'seed {seed}'}) ...")
    return check_against_torch(path, model, meta=meta, batch=batch, seed=seed + 1, log=log)
