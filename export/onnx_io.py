"""Loading, saving and validating ONNX files, with one-line errors for bad input.

Everything here works on ``onnx.ModelProto`` and never imports torch, so the surgery and
coverage commands stay light.

* :func:`load_model` turns the ways an input can be wrong (missing file, not ONNX, truncated,
  external data missing, no graph) into :class:`OnnxInputError` with one clear line.
* :func:`save_model` writes weights inline, or to one external data file when the model would
  pass protobuf's 2 GiB limit (or when asked): ``<name>.onnx`` + ``<name>.onnx.data``.
* :func:`ort_max_ir_version` feature-detects the highest ONNX IR version the installed
  onnxruntime loads (onnx 1.23 writes IR 14; onnxruntime 1.30 loads at most 13), and
  :func:`ort_session` lowers a model's ``ir_version`` to it before building a session.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import TensorProto

#: protobuf refuses to serialize messages of 2 GiB or more.
PROTOBUF_LIMIT = 2**31 - 1
#: Inline weights only below this many bytes (headroom for the graph itself).
INLINE_LIMIT = 2**31 - 2**27


class OnnxInputError(ValueError):
    """A user-supplied ONNX file (or option about it) is unusable; the message is one line."""


def require(module: str, purpose: str):
    """Import an optional dependency or raise a one-line :class:`OnnxInputError` saying how
    to install it (onnxruntime and onnxscript ship with ``ditperf[dev]``)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        pkg = module.split(".")[0]
        raise OnnxInputError(f"{purpose} needs the {pkg} package: pip install {pkg} "
                             "(or pip install 'ditperf[dev]')") from exc


ONNX_TO_TRT_TYPE = {
    TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
    TensorProto.DOUBLE: "DOUBLE", TensorProto.INT32: "INT32", TensorProto.INT64: "INT64",
    TensorProto.INT8: "INT8", TensorProto.UINT8: "UINT8", TensorProto.BOOL: "BOOL",
    TensorProto.INT4: "INT4", TensorProto.FLOAT8E4M3FN: "FP8", TensorProto.INT16: "INT16",
    TensorProto.UINT16: "UINT16", TensorProto.UINT32: "UINT32", TensorProto.UINT64: "UINT64",
    TensorProto.STRING: "STRING", TensorProto.FLOAT8E5M2: "FP8E5M2",
    TensorProto.COMPLEX64: "COMPLEX64", TensorProto.COMPLEX128: "COMPLEX128",
}


def dtype_name(elem_type: int) -> str:
    """ONNX element type -> the short name TensorRT's tables use (``FP32``, ``BF16``...)."""
    return ONNX_TO_TRT_TYPE.get(elem_type, TensorProto.DataType.Name(elem_type)
                                if elem_type in TensorProto.DataType.values() else str(elem_type))


def default_opset(model: onnx.ModelProto) -> int | None:
    """The model's opset for the default ("" / ai.onnx) domain, or None when absent."""
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return None


def iter_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """All nodes, including those inside If/Loop/Scan bodies (depth first)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_nodes(g)


def external_data_files(model: onnx.ModelProto) -> dict[str, int]:
    """``{location: number of tensors}`` for initializers stored outside the .onnx file."""
    files: dict[str, int] = {}
    for init in model.graph.initializer:
        if init.data_location == TensorProto.EXTERNAL:
            loc = next((e.value for e in init.external_data if e.key == "location"), "")
            files[loc] = files.get(loc, 0) + 1
    return files


def _describe_decode_failure(path: Path, head: bytes) -> str:
    size = path.stat().st_size
    # An ONNX ModelProto written by onnx/torch starts with field 1 (ir_version, varint): 0x08.
    if head[:1] == b"\x08":
        return (f"{path}: cannot parse the ONNX protobuf ({size} bytes): the file looks "
                "truncated or corrupt (re-export or re-copy it)")
    return f"{path}: not an ONNX file (the {size} bytes do not parse as an ONNX ModelProto)"


def load_model(path: str | os.PathLike, *, load_external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX model or raise :class:`OnnxInputError` saying what is wrong, in one line.

    With ``load_external_data=False`` the initializers stored in external files keep their
    references (cheap for multi-GB models); their files must still exist.
    """
    p = Path(path)
    if not p.exists():
        raise OnnxInputError(f"{p}: no such file")
    if p.is_dir():
        raise OnnxInputError(f"{p}: is a directory, expected an .onnx file")
    if p.stat().st_size == 0:
        raise OnnxInputError(f"{p}: empty file, not an ONNX model")
    with open(p, "rb") as f:
        head = f.read(16)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise OnnxInputError(_describe_decode_failure(p, head)) from exc
    if model.ir_version == 0 or not model.HasField("graph") or (
            not model.graph.node and not model.graph.output):
        raise OnnxInputError(f"{p}: not an ONNX model (no IR version or no graph inside)")
    files = external_data_files(model)
    missing = [loc for loc in files if not (p.parent / loc).is_file()]
    if missing:
        n = sum(files[m] for m in missing)
        raise OnnxInputError(
            f"{p}: external data file(s) missing next to the model: {', '.join(missing)} "
            f"({n} weight tensors); copy them into {p.parent or '.'}")
    if load_external_data and files:
        try:
            onnx.load_external_data_for_model(model, str(p.parent))
        except Exception as exc:
            raise OnnxInputError(f"{p}: cannot read its external data ({exc})") from exc
    return model


def model_nbytes(model: onnx.ModelProto) -> int:
    """Approximate serialized size: initializer bytes plus the rest of the graph."""
    total = 0
    for init in model.graph.initializer:
        if init.data_location == TensorProto.EXTERNAL:
            continue
        total += len(init.raw_data) or init.ByteSize()
    return total + 4096 + sum(n.ByteSize() for n in model.graph.node)


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *,
               external_data: bool | None = None, size_threshold: int = 1024,
               keep_in_memory: bool = True) -> Path:
    """Save ``model``; ``external_data=None`` chooses external data iff the model is too big
    for one protobuf (> ~1.9 GiB). External data goes to ``<name>.data`` beside the model
    (tensors below ``size_threshold`` bytes stay inline). Returns the path written.

    onnx moves the weights out of the in-memory proto when it writes external data; with
    ``keep_in_memory`` (default) they are read back so ``model`` stays usable; pass False to
    save memory and time on multi-GB models that are not used afterwards."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = model_nbytes(model) > INLINE_LIMIT or bool(external_data_files(model))
    if external_data:
        location = p.name + ".data"
        data_path = p.parent / location
        if data_path.exists():
            data_path.unlink()  # onnx appends to an existing file
        onnx.save_model(model, str(p), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=location, size_threshold=size_threshold)
        if external_data_files(model) and not data_path.is_file():
            raise OnnxInputError(f"{p}: its weights refer to external data that was not "
                                 f"written ({data_path.name}); the model had lost its weights")
        if keep_in_memory:
            onnx.load_external_data_for_model(model, str(p.parent))
    else:
        onnx.save_model(model, str(p))
    return p


@functools.cache
def ort_max_ir_version() -> int:
    """Highest ONNX IR version the installed onnxruntime accepts (probed with a 1-node model)."""
    ort = require("onnxruntime", "running ONNX models")

    x = onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "probe",
                                   [x], [y])
    for ir in range(onnx.IR_VERSION, 3, -1):
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
        model.ir_version = ir
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            return ir
        except Exception:  # noqa: BLE001, S112 - this IR version is not loadable: try the next
            continue
    return 7


@functools.cache
def ort_runs_opset23() -> bool:
    """Whether the installed onnxruntime's CPU provider runs opset-23 ``Attention`` and
    ``RMSNormalization`` (1.32 does; older releases may not)."""
    import numpy as np

    h = onnx.helper
    vi = [h.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1, 2, 8]) for n in "qkv"]
    nodes = [h.make_node("Attention", ["q", "k", "v"], ["a"]),
             h.make_node("RMSNormalization", ["a", "w"], ["y"], axis=-1)]
    w = onnx.numpy_helper.from_array(np.ones(8, np.float32), "w")
    model = h.make_model(h.make_graph(nodes, "probe", vi, [h.make_tensor_value_info(
        "y", TensorProto.FLOAT, [1, 1, 2, 8])], initializer=[w]),
        opset_imports=[h.make_opsetid("", 23)])
    try:
        sess = ort_session(model)
        x = np.ones((1, 1, 2, 8), np.float32)
        sess.run(None, {"q": x, "k": x, "v": x})
        return True
    except Exception:  # noqa: BLE001 - any failure means this onnxruntime lacks the op
        return False


def ort_session(model: onnx.ModelProto | str | os.PathLike, *, threads: int | None = None):
    """An onnxruntime CPU session, lowering ``ir_version`` when onnxruntime needs it.

    A path with external data is loaded by path (written to a temporary copy of the .onnx
    next to the data when its IR version must be lowered, so relative data paths resolve).
    """
    ort = require("onnxruntime", "running ONNX models")

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    max_ir = ort_max_ir_version()
    if isinstance(model, onnx.ModelProto):
        if model.ir_version > max_ir:
            model = _with_ir(model, max_ir)
        return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)
    p = Path(model)
    proto = load_model(p, load_external_data=False)
    if proto.ir_version <= max_ir:
        return ort.InferenceSession(str(p), opts, providers=providers)
    proto = _with_ir(proto, max_ir)
    if not external_data_files(proto):
        return ort.InferenceSession(proto.SerializeToString(), opts, providers=providers)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.stem}.ir{max_ir}.", suffix=".onnx", dir=p.parent)
    os.close(fd)
    try:
        onnx.save_model(proto, tmp)
        return ort.InferenceSession(tmp, opts, providers=providers)
    finally:
        os.unlink(tmp)


def _with_ir(model: onnx.ModelProto, ir: int) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.ir_version = ir
    return out
