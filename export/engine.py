"""Build a TensorRT engine from an ONNX file and time it against the PyTorch model.

Typed against the documented TensorRT Python API of 10.x (>= 10.1) and 11.x:
``Builder.create_network(flags)``, ``OnnxParser.parse_from_file`` (resolves external data
next to the file), ``IBuilderConfig.set_memory_pool_limit``, optimization profiles for
dynamic inputs, ``Builder.build_serialized_network``, ``Runtime.deserialize_cuda_engine``,
``ICudaEngine.num_io_tensors / get_tensor_name / get_tensor_mode / get_tensor_dtype``,
``IExecutionContext.set_input_shape / set_tensor_address / execute_async_v3``.

Precision: ``--strongly-typed`` builds exactly the types in the ONNX graph (export with
``--dtype fp16|bf16``); ``--fp16`` / ``--bf16`` are TensorRT 10's weak-typing flags, removed
in TensorRT 11 (where every network is strongly typed): on 11 they are refused with the fix.

TensorRT is not installable on CPU-only machines: without it every entry point raises
:class:`TensorRTUnavailable` with one line saying how to get it.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ditperf.export.onnx_io import OnnxInputError, load_model

INSTALL_HINT = ("TensorRT is not installed: on a machine with an NVIDIA GPU run "
                "`pip install 'ditperf[trt]'` (TensorRT wheels do not install on CPU-only "
                "machines)")


class TensorRTUnavailable(RuntimeError):
    """``import tensorrt`` failed or no GPU is present."""


def import_tensorrt():
    """The ``tensorrt`` module, or :class:`TensorRTUnavailable` with the install hint."""
    try:
        import tensorrt as trt
    except Exception as exc:
        raise TensorRTUnavailable(INSTALL_HINT) from exc
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT needs a CUDA GPU and none is visible")
    return trt


@dataclass
class EngineResult:
    plan: str
    trt_version: str
    precision: str
    build_s: float
    plan_bytes: int
    timings_ms: dict[str, float] = field(default_factory=dict)
    max_rel_error: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _trt_major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def _parse_errors(parser) -> str:
    msgs = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = ""
        if err.node() >= 0:
            name = err.node_name() if hasattr(err, "node_name") else ""
            op = err.node_operator() if hasattr(err, "node_operator") else ""
            where = f"node {err.node()} {name} ({op}): "
        msgs.append(f"{where}{err.desc()}")
    return "; ".join(msgs[:5]) + (f" (+{len(msgs) - 5} more)" if len(msgs) > 5 else "")


def build_engine(onnx_path: str | os.PathLike, plan_path: str | os.PathLike, *,
                 fp16: bool = False, bf16: bool = False, strongly_typed: bool = False,
                 workspace_gib: float = 8.0, batch_range: tuple[int, int, int] = (1, 2, 8),
                 log=print) -> EngineResult:
    """Parse ``onnx_path`` and write a serialized engine to ``plan_path``.

    Dynamic (``-1``) input dims get an optimization profile: the batch dim (0) spans
    ``batch_range`` = (min, opt, max); other dynamic dims are refused (export static sizes).
    """
    trt = import_tensorrt()
    load_model(onnx_path, load_external_data=False)  # one-line errors for bad files
    major = _trt_major(trt)
    if (fp16 or bf16) and major >= 11:
        raise OnnxInputError("--fp16/--bf16 are TensorRT 10 weak-typing flags, removed in "
                             f"TensorRT {trt.__version__}: export with --dtype fp16|bf16 and "
                             "build with --strongly-typed")
    if (fp16 or bf16) and strongly_typed:
        raise OnnxInputError("--strongly-typed takes precision from the ONNX types; drop "
                             "--fp16/--bf16 (export with --dtype fp16|bf16 instead)")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        raise OnnxInputError(f"TensorRT {trt.__version__} cannot parse {onnx_path}: "
                             f"{_parse_errors(parser)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    precision = "strongly-typed" if strongly_typed or major >= 11 else "fp32"
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        precision = "fp16 (weak typing)"
    if bf16:
        config.set_flag(trt.BuilderFlag.BF16)
        precision = "bf16 (weak typing)"
    dynamic = False
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        shape = list(inp.shape)
        if any(d < 0 for d in shape[1:]):
            raise OnnxInputError(f"input {inp.name} has dynamic dims {shape} beyond the batch: "
                                 "export with static --height/--width/--text-len")
        if shape and shape[0] < 0:
            dynamic = True
            lo, opt, hi = batch_range
            profile.set_shape(inp.name, [lo] + shape[1:], [opt] + shape[1:], [hi] + shape[1:])
    if dynamic:
        config.add_optimization_profile(profile)
    log(f"building TensorRT {trt.__version__} engine ({precision}) ...")
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    build_s = time.perf_counter() - t0
    if plan is None:
        raise OnnxInputError(f"TensorRT {trt.__version__} failed to build an engine from "
                             f"{onnx_path} (see the TensorRT log above)")
    Path(plan_path).parent.mkdir(parents=True, exist_ok=True)
    with open(plan_path, "wb") as f:
        f.write(plan)
    return EngineResult(plan=str(plan_path), trt_version=trt.__version__, precision=precision,
                        build_s=build_s, plan_bytes=os.path.getsize(plan_path))


class TrtRunner:
    """Runs a deserialized engine on torch CUDA tensors (by input name)."""

    def __init__(self, plan_path: str | os.PathLike) -> None:
        import torch

        trt = import_tensorrt()
        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        with open(plan_path, "rb") as f:
            self.engine = self.runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise OnnxInputError(f"{plan_path}: TensorRT {trt.__version__} cannot deserialize "
                                 "it (built by another TensorRT version or GPU?)")
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names
                       if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]
        self._dtypes = {
            trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
            trt.DataType.INT32: torch.int32, trt.DataType.INT8: torch.int8,
            trt.DataType.BOOL: torch.bool, trt.DataType.UINT8: torch.uint8,
        }
        for name, tdt in (("BF16", torch.bfloat16), ("INT64", torch.int64)):
            if hasattr(trt.DataType, name):
                self._dtypes[getattr(trt.DataType, name)] = tdt

    def __call__(self, feeds: dict[str, Any]) -> dict[str, Any]:
        import torch

        stream = torch.cuda.current_stream()
        keep = []
        for name in self.inputs:
            t = feeds[name]
            want = self._dtypes[self.engine.get_tensor_dtype(name)]
            t = t.to(device="cuda", dtype=want).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            out = torch.empty(shape, device="cuda",
                              dtype=self._dtypes[self.engine.get_tensor_dtype(name)])
            self.context.set_tensor_address(name, out.data_ptr())
            outs[name] = out
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return outs


def time_against_torch(onnx_path: str | os.PathLike, plan_path: str | os.PathLike, *,
                       batch: int | None = None, compile_torch: bool = True,
                       log=print) -> tuple[dict[str, float], float]:
    """Median ms of the TensorRT engine, the eager PyTorch model and ``torch.compile`` of it,
    on the same inputs; plus max |trt - eager| / max |eager|."""
    import torch
    from ditperf.export.onnx_export import build_model, example_inputs, read_metadata
    from ditperf.profiling import time_ms

    meta = read_metadata(load_model(onnx_path, load_external_data=False))
    if "preset" not in meta:
        raise OnnxInputError(f"{onnx_path}: no ditperf metadata; timing against PyTorch needs "
                             "a file written by `ditperf export onnx`")
    ckpt = meta.get("ckpt") if meta.get("ckpt") not in (None, "None") else None
    model = build_model(meta["preset"], ckpt=ckpt, backend=meta.get("backend", "torch"),
                        dtype=meta.get("dtype", "fp32"), seed=int(meta.get("seed", "0"))).cuda()
    if batch is None:
        batch = 2 if meta.get("batch") == "dynamic" else int(meta.get("batch", "1"))
    sizes = {k: (int(meta[k]) if meta.get(k) not in (None, "None") else None)
             for k in ("height", "width", "text_len")}
    args = tuple(a.cuda() for a in example_inputs(model, batch, sizes | {"dtype": meta.get(
        "dtype", "fp32")}, seed=7))
    runner = TrtRunner(plan_path)
    feeds = dict(zip(model.input_names, args, strict=True))
    timings = {}
    with torch.inference_mode():
        ref = model(*args)
        got = next(iter(runner(feeds).values()))
        scale = ref.float().abs().max().clamp_min(1e-12)
        err = float((got.float() - ref.float()).abs().max() / scale)
        log("timing TensorRT ...")
        timings["tensorrt"] = time_ms(lambda: runner(feeds))
        log(f"timing PyTorch eager ({model.backend} backend) ...")
        timings[f"torch eager ({model.backend})"] = time_ms(lambda: model(*args))
        if compile_torch:
            log("compiling the PyTorch model (torch.compile) ...")
            compiled = torch.compile(model)
            compiled(*args)
            timings[f"torch.compile ({model.backend})"] = time_ms(lambda: compiled(*args))
    return timings, err
