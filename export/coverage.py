"""Per-operator TensorRT coverage of an ONNX model, offline or from the live parser.

Offline (always available): every top-level node is judged against the support matrix shipped
in ``export/data/trt_support.json`` (built from the onnx-tensorrt 10.1 operator table plus the
operators TensorRT release notes add later; see :mod:`ditperf.export.build_matrix`):

* op type in the matrix and marked Y, or a documented addition at or below ``--trt-version``;
* the node's primary data type (its first input, or its first output when it has none; types
  from ONNX shape inference) is in the op's supported types (DOUBLE is accepted where FP32 is,
  with a model-level note: TensorRT casts it down to FP32);
* static checks of the restrictions: LayerNormalization / MaxPool with more than one output
  used, ``axes`` inputs that must be initializers, Resize modes and antialiasing, BF16 Resize
  (reported by users), If/Loop/Scan bodies containing unsupported nodes;
* nodes in non-default domains need a TensorRT plugin (reported as such).

Model-level checks: the default-domain opset inside the matrix's range; decomposed LayerNorm
chains (ReduceMean/Sub/Pow/...: they overflow in FP16 under TensorRT).

Live (``--trt-version live``, or ``auto`` when ``import tensorrt`` works and a GPU is
present): ``OnnxParser.supports_model_v2`` then ``num_subgraphs``,
``is_subgraph_supported(i)``, ``get_subgraph_nodes(i)``, plus the parser errors with node
names (TensorRT 10.1+ and 11; ``supports_model`` was removed in 11). The parser decides node
support; matrix data still fills types and restriction text. Same table and JSON.

JSON schema ``ditperf.coverage/1`` (keys are stable; new keys may be added in /1)::

    {"schema": "ditperf.coverage/1", "model": str, "source": "matrix" | "live",
     "trt_version": str, "opset": {domain: version}, "opset_range": [min, max],
     "summary": {"nodes": int, "supported_nodes": int, "percent_supported": float,
                 "op_types": int, "unsupported_op_types": int, "fully_supported": bool},
     "issues": [{"kind": str, "message": str}],          # model-level problems / advice
     "operators": [{"op_type": str, "domain": str, "count": int, "supported_count": int,
                    "supported": "Y" | "N" | "partial", "decided_by": [str],
                    "types_used": [str], "supported_types": [str], "restrictions": str,
                    "reasons": [str], "nodes": [str], "unsupported_nodes": [str],
                    "node_ranges": [[first, last]]}],  # top-level node indices, unsupported
     "subgraphs": [{"index": int, "supported": bool, "nodes": [int]}]}   # live only

``decided_by`` values: ``matrix``, ``static-check``, ``plugin`` (custom domain),
``live-parser``.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import onnx
from ditperf.export.onnx_io import OnnxInputError, default_opset, dtype_name

SCHEMA = "ditperf.coverage/1"
DEFAULT_DOMAINS = ("", "ai.onnx")

# Input index of the ``axes`` (or ``axis``) tensor for ops whose restriction says it must be
# an initializer / constant.
_AXES_INPUT = {"ReduceL1": 1, "ReduceL2": 1, "ReduceLogSum": 1, "ReduceLogSumExp": 1,
               "ReduceMax": 1, "ReduceMean": 1, "ReduceMin": 1, "ReduceProd": 1, "ReduceSum": 1,
               "ReduceSumSquare": 1, "Slice": 3, "Squeeze": 1, "Unsqueeze": 1, "Pad": 3,
               "CumSum": 1}
_RESIZE_CTM = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric",
               "align_corners"}
_RESIZE_MODES = {"nearest", "linear"}
_RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}


@functools.lru_cache(maxsize=1)
def load_matrix() -> dict:
    """The shipped support matrix (package data; never reads the source table at runtime)."""
    text = resources.files("ditperf.export").joinpath("data/trt_support.json").read_text("utf-8")
    return json.loads(text)


def _version_tuple(v: str) -> tuple[int, ...]:
    if not re.fullmatch(r"\d+(\.\d+)*", v):
        raise OnnxInputError(f"--trt-version {v!r}: expected a version like 10.1, 10.15, 11.0 "
                             "or 'live'")
    return tuple(int(x) for x in v.split("."))


@dataclass
class OpRule:
    """What the matrix says about one op type at the requested TensorRT version."""

    supported: bool
    types: list[str]
    restrictions: str
    note: str = ""


def rules_for(trt_version: str) -> tuple[dict[str, OpRule], tuple[int, int], list[str]]:
    """Op rules, supported opset range and caveats for a TensorRT version (>= 10.1)."""
    m = load_matrix()
    want = _version_tuple(trt_version)
    if want < (10, 1):
        raise OnnxInputError(f"--trt-version {trt_version}: the shipped matrix starts at "
                             "TensorRT 10.1")
    rules = {k: OpRule(v["supported"], list(v["types"]), v["restrictions"])
             for k, v in m["operators"].items()}
    lo, hi = int(m["opset_min"]), int(m["opset_max"])
    caveats = []
    for add in m["additions"]:
        if want >= _version_tuple(add["since"]):
            rules[add["op_type"]] = OpRule(True, list(add["types"]), "", add["note"])
            if add["opset"] > hi:
                hi = add["opset"]
                caveats.append(f"opset range above {m['opset_max']} is assumed from the "
                               f"release notes (TensorRT {add['since']} adds opset-"
                               f"{add['opset']} {add['op_type']}); the shipped table covers "
                               f"TensorRT {m['trt_version']}")
        elif add["op_type"] not in rules:
            rules[add["op_type"]] = OpRule(
                False, list(add["types"]), "",
                f"added in TensorRT {add['since']} (opset {add['opset']}); not in "
                f"{trt_version}")
    return rules, (lo, hi), caveats[-1:]


# ----------------------------------------------------------------------------------------
# Graph facts


@dataclass
class GraphFacts:
    """Types, constants and consumers of a (shape-inferred) graph."""

    types: dict[str, int]
    constants: set[str]
    consumers: dict[str, list[int]]
    producers: dict[str, int]
    graph_outputs: set[str]


def _graph_facts(graph: onnx.GraphProto, outer: GraphFacts | None = None) -> GraphFacts:
    """``outer``: the enclosing graph's facts, for a control-flow body (If/Loop/Scan), which
    reads the outer scope's tensors by name (their types, and initializers as constants)."""
    types: dict[str, int] = dict(outer.types) if outer else {}
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    # names the body defines (its inputs: a Loop's carried values, a Scan's slices; its nodes'
    # outputs) are its own, whatever the outer scope holds under the same name
    defined = {vi.name for vi in graph.input} | {o for n in graph.node for o in n.output if o}
    constants = set(outer.constants) - defined if outer else set()
    for init in graph.initializer:
        types[init.name] = init.data_type
        constants.add(init.name)
    consumers: dict[str, list[int]] = {}
    producers: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(i)
        for name in node.output:
            if name:
                producers[name] = i
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
            constants.update(o for o in node.output if o)
            for a in node.attribute:
                if a.name == "value" and node.output[0] not in types:
                    types[node.output[0]] = a.t.data_type
    return GraphFacts(types, constants, consumers, producers, {o.name for o in graph.output})


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - shape inference is advisory here: fall back to declared types
        return model


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            v = onnx.helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def _used(name: str, facts: GraphFacts) -> bool:
    return bool(name) and (name in facts.consumers or name in facts.graph_outputs)


def _primary_type(node: onnx.NodeProto, facts: GraphFacts) -> str | None:
    """The type the op computes in: its first non-bool input's (Where's condition or a mask
    is not what decides support), else the first typed input or output."""
    found = [dtype_name(facts.types[n]) for n in list(node.input) + list(node.output) if n and n in facts.types]
    return next((t for t in found if t != "BOOL"), found[0] if found else None)


@dataclass
class NodeVerdict:
    index: int
    name: str
    op_type: str
    domain: str
    supported: bool
    decided_by: str
    types: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


def _static_checks(node: onnx.NodeProto, facts: GraphFacts, rule: OpRule, ptype: str | None,
                   pitfalls: dict) -> list[str]:
    """Restriction checks that need only the graph (no TensorRT)."""
    reasons = []
    op = node.op_type
    if ptype and rule.types and ptype not in rule.types and not (
            ptype == "DOUBLE" and "FP32" in rule.types):
        reasons.append(f"type {ptype} not supported (supported: {', '.join(rule.types)})")
    pit = pitfalls.get(op)
    if pit and ptype in pit["types"]:
        reasons.append(pit["message"])
    if op in ("LayerNormalization", "MaxPool"):
        extra = [o for o in node.output[1:] if _used(o, facts)]
        if extra:
            what = "Mean/InvStdDev" if op == "LayerNormalization" else "Indices"
            reasons.append(f"only the first output is supported; {what} output(s) "
                           f"{', '.join(extra)} are used")
    idx = _AXES_INPUT.get(op)
    if idx is not None and len(node.input) > idx and node.input[idx] and \
            node.input[idx] not in facts.constants:
        reasons.append(f"input {idx} (axes) must be an initializer/constant; "
                       f"'{node.input[idx]}' is computed")
    if op == "Resize":
        ctm = _attr(node, "coordinate_transformation_mode", "half_pixel")
        mode = _attr(node, "mode", "nearest")
        if ctm not in _RESIZE_CTM:
            reasons.append(f"Resize coordinate_transformation_mode '{ctm}' unsupported")
        if mode not in _RESIZE_MODES:
            reasons.append(f"Resize mode '{mode}' unsupported (nearest, linear only)")
        if mode == "nearest" and _attr(node, "nearest_mode", "round_prefer_floor") \
                not in _RESIZE_NEAREST:
            reasons.append(f"Resize nearest_mode '{_attr(node, 'nearest_mode')}' unsupported")
        if _attr(node, "antialias", 0):
            reasons.append("Resize antialiasing unsupported")
        if _attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
            reasons.append("Resize keep_aspect_ratio_policy must be 'stretch'")
    if op == "TopK" and _attr(node, "sorted", 1) != 1:
        reasons.append("TopK requires sorted=1")
    if op == "ScatterND" and _attr(node, "reduction", "none") != "none":
        reasons.append(f"ScatterND reduction '{_attr(node, 'reduction')}' unsupported (only none)")
    return reasons


def _judge_node(i: int, node: onnx.NodeProto, facts: GraphFacts, rules: dict[str, OpRule],
                trt_version: str, pitfalls: dict,
                functions: dict[tuple[str, str], onnx.FunctionProto] | None = None) -> NodeVerdict:
    name = node.name or f"{node.op_type}_{i}"
    ptype = _primary_type(node, facts)
    types = [ptype] if ptype else []
    fn = (functions or {}).get((node.domain, node.op_type))
    if fn is not None:  # a model-local function: the parser inlines it, so its body decides
        body = onnx.helper.make_graph(list(fn.node), fn.name, [], [])
        bad = _unsupported_in_body(body, rules, trt_version, pitfalls, functions)
        return NodeVerdict(i, name, node.op_type, node.domain, not bad, "function", types,
                           [f"local function body contains unsupported node(s): {', '.join(bad[:5])}"]
                           if bad else [])
    if node.domain not in DEFAULT_DOMAINS:
        return NodeVerdict(i, name, node.op_type, node.domain, False, "plugin", types,
                           [(f"custom domain '{node.domain}': needs a TensorRT plugin "
                            f"registered as '{node.op_type}'")])
    rule = rules.get(node.op_type)
    if rule is None:
        return NodeVerdict(i, name, node.op_type, "", False, "matrix", types,
                           [f"not in the TensorRT {trt_version} support matrix"])
    if not rule.supported:
        why = rule.note or f"marked N in the TensorRT {trt_version} support matrix"
        return NodeVerdict(i, name, node.op_type, "", False, "matrix", types, [why])
    reasons = _static_checks(node, facts, rule, ptype, pitfalls)
    for body in _bodies(node):
        bad = _unsupported_in_body(body, rules, trt_version, pitfalls, functions, outer=facts)
        if bad:
            reasons.append(f"body contains unsupported node(s): {', '.join(bad[:5])}")
    return NodeVerdict(i, name, node.op_type, "", not reasons,
                       "static-check" if reasons else "matrix", types, reasons)


def _bodies(node: onnx.NodeProto) -> Iterable[onnx.GraphProto]:
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def _unsupported_in_body(graph: onnx.GraphProto, rules, trt_version, pitfalls,
                         functions: dict[tuple[str, str], onnx.FunctionProto] | None = None,
                         outer: GraphFacts | None = None) -> list[str]:
    """Names of the unsupported nodes of a body: a control-flow branch (``outer``: the
    enclosing scope it reads) or a model-local function's (its own scope)."""
    facts = _graph_facts(graph, outer)
    bad = []
    for i, n in enumerate(graph.node):
        v = _judge_node(i, n, facts, rules, trt_version, pitfalls, functions)
        if not v.supported:
            why = v.reasons[0] if v.reasons else "unsupported"
            bad.append(f"{v.name} ({n.op_type}: {why[:100]})")
    return bad


# ----------------------------------------------------------------------------------------
# Model-level checks


def count_decomposed_layernorms(graph: onnx.GraphProto) -> int:
    """Pow(x - ReduceMean(x), 2) chains: the decomposed LayerNorm that overflows in FP16."""
    facts = _graph_facts(graph)
    n = 0
    for node in graph.node:
        if node.op_type != "Pow" or not node.input:
            continue
        sub_i = facts.producers.get(node.input[0])
        if sub_i is None or graph.node[sub_i].op_type != "Sub":
            continue
        sub = graph.node[sub_i]
        mean_i = facts.producers.get(sub.input[1]) if len(sub.input) > 1 else None
        if mean_i is not None and graph.node[mean_i].op_type == "ReduceMean":
            n += 1
    return n


def _ranges(indices: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for i in sorted(indices):
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


def _aggregate(verdicts: list[NodeVerdict], rules: dict[str, OpRule]) -> list[dict]:
    rows: dict[tuple[str, str], dict] = {}
    for v in verdicts:
        key = (v.domain, v.op_type)
        rule = rules.get(v.op_type) if v.domain in DEFAULT_DOMAINS else None
        row = rows.setdefault(key, {
            "op_type": v.op_type, "domain": v.domain, "count": 0, "supported_count": 0,
            "supported": "Y", "decided_by": [], "types_used": [],
            "supported_types": list(rule.types) if rule else [],
            "restrictions": (rule.restrictions or rule.note) if rule else "",
            "reasons": [], "nodes": [], "unsupported_nodes": [], "node_ranges": [],
            "_bad": []})
        row["count"] += 1
        row["nodes"].append(v.name)
        row["supported_count"] += int(v.supported)
        if v.decided_by not in row["decided_by"]:
            row["decided_by"].append(v.decided_by)
        for t in v.types:
            if t not in row["types_used"]:
                row["types_used"].append(t)
        if not v.supported:
            row["unsupported_nodes"].append(v.name)
            row["_bad"].append(v.index)
            for r in v.reasons:
                if r not in row["reasons"]:
                    row["reasons"].append(r)
    out = []
    for row in rows.values():
        bad = row.pop("_bad")
        row["node_ranges"] = _ranges(bad)
        row["supported"] = ("Y" if row["supported_count"] == row["count"] else
                            "N" if row["supported_count"] == 0 else "partial")
        out.append(row)
    out.sort(key=lambda r: (r["supported"] == "Y", r["domain"], r["op_type"]))
    return out


def _report(model: onnx.ModelProto, path: str, source: str, trt_version: str,
            verdicts: list[NodeVerdict], rules, opset_range, issues, subgraphs=None) -> dict:
    n = len(verdicts)
    ok = sum(v.supported for v in verdicts)
    ops = _aggregate(verdicts, rules)
    return {
        "schema": SCHEMA, "model": path, "source": source, "trt_version": trt_version,
        "opset": {(imp.domain or "ai.onnx"): int(imp.version) for imp in model.opset_import},
        "opset_range": list(opset_range),
        "summary": {"nodes": n, "supported_nodes": ok,
                    "percent_supported": round(100.0 * ok / n, 2) if n else 100.0,
                    "op_types": len(ops),
                    "unsupported_op_types": sum(r["supported"] != "Y" for r in ops),
                    "fully_supported": ok == n and not any(i["kind"] in ("opset", "parse")
                                                           for i in issues)},
        "issues": issues, "operators": ops, "subgraphs": subgraphs or [],
    }


def _model_issues(model: onnx.ModelProto, opset_range: tuple[int, int],
                  caveats: list[str]) -> list[dict]:
    issues = []
    opset = default_opset(model)
    lo, hi = opset_range
    if opset is None:
        issues.append({"kind": "opset", "message": "model imports no default-domain opset"})
    elif not lo <= opset <= hi:
        issues.append({"kind": "opset", "message": f"default-domain opset {opset} is outside "
                       f"the supported range {lo}..{hi}"})
    for c in caveats:
        issues.append({"kind": "note", "message": c})
    n_ln = count_decomposed_layernorms(model.graph)
    if n_ln:
        issues.append({"kind": "advice", "message": f"{n_ln} decomposed LayerNorm chain(s) "
                       "(ReduceMean/Sub/Pow...) overflow in FP16 under TensorRT: run "
                       "`ditperf export surgery --passes fold-layernorm` (opset >= 17)"})
    local = {(f.domain, f.name) for f in model.functions}  # inlined by the parser: not plugins
    custom = sorted({n.domain for n in model.graph.node
                     if n.domain not in DEFAULT_DOMAINS and (n.domain, n.op_type) not in local})
    if custom:
        issues.append({"kind": "plugin", "message": "custom domain(s) "
                       f"{', '.join(custom)}: their nodes need TensorRT plugins"})
    return issues


def analyze(model: onnx.ModelProto, *, trt_version: str = "10.1", path: str = "") -> dict:
    """Offline coverage report (see the module docstring for the JSON schema)."""
    rules, opset_range, caveats = rules_for(trt_version)
    pitfalls = load_matrix()["pitfalls"]
    inferred = _infer(model)
    facts = _graph_facts(inferred.graph)
    functions = {(f.domain, f.name): f for f in inferred.functions}
    verdicts = [_judge_node(i, n, facts, rules, trt_version, pitfalls, functions)
                for i, n in enumerate(inferred.graph.node)]
    issues = _model_issues(inferred, opset_range, caveats)
    doubles = [v.name for v in verdicts if v.types == ["DOUBLE"]]
    if doubles:
        issues.append({"kind": "note", "message": f"{len(doubles)} node(s) compute in DOUBLE (e.g. "
                       f"{', '.join(doubles[:3])}): TensorRT runs them in FP32"})
    return _report(inferred, path, "matrix", trt_version, verdicts, rules, opset_range, issues)


# ----------------------------------------------------------------------------------------
# Live TensorRT parser


def live_available() -> str | None:
    """None when the live parser can run here, else the reason it cannot."""
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken TensorRT install is "not usable", whatever it raises
        return "TensorRT is not installed (pip install 'ditperf[trt]' on a GPU machine)"
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU visible"
    except Exception:  # noqa: BLE001 - any CUDA query failure means no usable GPU
        return "torch cannot query CUDA"
    return None


def analyze_live(model: onnx.ModelProto, path: str) -> dict:
    """Coverage decided by TensorRT's ONNX parser (``supports_model_v2``, TensorRT >= 10.1).

    Nodes in supported subgraphs are supported; other nodes carry the parser's error for
    that node when it reported one.
    """
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not hasattr(parser, "supports_model_v2"):
        raise OnnxInputError(f"TensorRT {trt.__version__} has no OnnxParser.supports_model_v2 "
                             "(needs TensorRT >= 10.1); use --trt-version 10.1")
    data = Path(path).read_bytes()
    parser.supports_model_v2(data, os.path.abspath(path))
    node_ok: dict[int, bool] = {}
    subgraphs = []
    for i in range(parser.num_subgraphs):
        supported = bool(parser.is_subgraph_supported(i))
        nodes = [int(n) for n in parser.get_subgraph_nodes(i)]
        subgraphs.append({"index": i, "supported": supported, "nodes": nodes})
        for n in nodes:
            node_ok[n] = node_ok.get(n, True) and supported
    errors: dict[int, list[str]] = {}
    parse_issues = []
    for e in range(parser.num_errors):
        err = parser.get_error(e)
        idx = int(err.node())
        msg = f"{err.desc()}"
        name = err.node_name() if hasattr(err, "node_name") else ""
        if idx >= 0:
            errors.setdefault(idx, []).append(msg)
        else:
            parse_issues.append({"kind": "parse", "message": f"{name or 'model'}: {msg}"})
    trt_version = f"live {trt.__version__}"
    rules, opset_range, _ = rules_for(".".join(trt.__version__.split(".")[:2]))
    inferred = _infer(model)
    facts = _graph_facts(inferred.graph)
    verdicts = []
    for i, node in enumerate(inferred.graph.node):
        ptype = _primary_type(node, facts)
        ok = node_ok.get(i, i not in errors)
        reasons = errors.get(i, []) if not ok else []
        if not ok and not reasons:
            reasons = ["in an unsupported subgraph (the parser gave no error for this node)"]
        verdicts.append(NodeVerdict(i, node.name or f"{node.op_type}_{i}", node.op_type,
                                    node.domain if node.domain not in DEFAULT_DOMAINS else "",
                                    ok, "live-parser", [ptype] if ptype else [], reasons))
    issues = parse_issues + [i for i in _model_issues(inferred, opset_range, [])
                             if i["kind"] != "opset"]
    return _report(inferred, path, "live", trt_version, verdicts, rules, opset_range, issues,
                   subgraphs)


def coverage(path: str | os.PathLike, *, trt_version: str = "auto") -> dict:
    """Load ``path`` and report coverage; ``trt_version`` is a version, ``live`` or ``auto``
    (live when TensorRT and a GPU are present, else the shipped 10.1 matrix)."""
    from ditperf.export.onnx_io import load_model

    model = load_model(path, load_external_data=False)
    if trt_version in ("live", "auto"):
        why = live_available()
        if why is None:
            return analyze_live(model, str(path))
        if trt_version == "live":
            raise OnnxInputError(f"--trt-version live: {why}; use --trt-version 10.1 for the "
                                 "shipped support matrix")
        trt_version = load_matrix()["trt_version"]
    return analyze(model, trt_version=trt_version, path=str(path))


# ----------------------------------------------------------------------------------------
# Rendering


def render(report: dict, *, console=None, max_names: int = 3) -> None:
    """Print a Polygraphy-style table (operator, count, reason, node ranges) with rich.

    Supported rows show the matrix's restriction text (dimmed, shortened); rows with
    unsupported nodes show the reasons, the unsupported node index ranges and names.
    """
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=150)
    s = report["summary"]
    title = (f"TensorRT coverage of {report['model'] or 'model'} "
             f"[{report['source']}: {report['trt_version']}]")
    table = Table(title=title)
    table.add_column("Operator", no_wrap=True)
    table.add_column("Count", justify="right")
    table.add_column("OK", no_wrap=True)
    table.add_column("Types", no_wrap=True)
    table.add_column("Reason / restrictions", overflow="fold", ratio=3)
    table.add_column("Unsupported nodes", overflow="fold", ratio=2)
    table.add_column("By", no_wrap=True)
    for r in report["operators"]:
        op = r["op_type"] if not r["domain"] else f"{r['domain']}::{r['op_type']}"
        style = {"Y": "green", "N": "red", "partial": "yellow"}[r["supported"]]
        if r["reasons"]:
            reason = "; ".join(r["reasons"])
        else:
            reason = r["restrictions"] or ""
            if len(reason) > 70:
                reason = reason[:67] + "..."
            reason = f"[dim]{reason}[/dim]" if reason else ""
        bad = r["unsupported_nodes"]
        nodes = ""
        if bad:
            ranges = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in r["node_ranges"])
            nodes = f"[{ranges}] " + ", ".join(bad[:max_names]) + (
                f" (+{len(bad) - max_names})" if len(bad) > max_names else "")
            nodes = nodes.replace("[", "\\[")
        ok = r["supported"] if r["supported"] != "partial" else \
            f"{r['supported_count']}/{r['count']}"
        table.add_row(op, str(r["count"]), f"[{style}]{ok}[/{style}]", ", ".join(r["types_used"]),
                      reason, nodes, ", ".join(r["decided_by"]))
    console.print(table)
    for issue in report["issues"]:
        color = {"opset": "red", "parse": "red", "advice": "yellow", "plugin": "yellow"}.get(
            issue["kind"], "dim")
        console.print(f"[{color}]{issue['kind']}:[/{color}] {issue['message']}", highlight=False)
    verdict = "[green]fully supported[/green]" if s["fully_supported"] else \
        "[red]NOT fully supported[/red]"
    console.print(f"{s['supported_nodes']}/{s['nodes']} nodes supported "
                  f"({s['percent_supported']:.1f}%), {s['op_types']} op types, "
                  f"{s['unsupported_op_types']} with unsupported nodes: {verdict}")
