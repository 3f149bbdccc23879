"""TensorRT coverage (offline matrix), the shipped matrix, ONNX loading errors, external data."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from ditperf.export import coverage as cov
from ditperf.export.build_matrix import build, parse_table
from ditperf.export.onnx_io import (
    OnnxInputError,
    external_data_files,
    load_model,
    ort_max_ir_version,
    ort_session,
    save_model,
)
from onnx import TensorProto as T
from onnx import helper, numpy_helper

REPORT_KEYS = {"schema", "model", "source", "trt_version", "opset", "opset_range", "summary",
               "issues", "operators", "subgraphs"}
SUMMARY_KEYS = {"nodes", "supported_nodes", "percent_supported", "op_types",
                "unsupported_op_types", "fully_supported"}
OP_KEYS = {"op_type", "domain", "count", "supported_count", "supported", "decided_by",
           "types_used", "supported_types", "restrictions", "reasons", "nodes",
           "unsupported_nodes", "node_ranges"}


def _vi(name, t=T.FLOAT, shape=(2, 8)):
    return helper.make_tensor_value_info(name, t, list(shape) if shape is not None else None)


def _model(nodes, inputs, outputs, inits=(), opset=18, domains=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    ops = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(g, opset_imports=ops)


def _row(report, op):
    return next(r for r in report["operators"] if r["op_type"] == op)


def supported_model():
    w = numpy_helper.from_array(np.ones(8, np.float32), "w")
    nodes = [helper.make_node("LayerNormalization", ["x", "w"], ["ln"], axis=-1),
             helper.make_node("Relu", ["ln"], ["r"]),
             helper.make_node("MatMul", ["r", "m"], ["y"])]
    m = numpy_helper.from_array(np.ones((8, 8), np.float32), "m")
    return _model(nodes, [_vi("x")], [_vi("y")], [w, m])


def test_shipped_matrix_matches_source_table():
    m = cov.load_matrix()
    assert m["schema"] == "ditperf.trt_support_matrix/1"
    assert (m["opset_min"], m["opset_max"], m["trt_version"]) == (9, 20, "10.1")
    assert m["operators"]["LayerNormalization"]["supported"] is True
    assert m["operators"]["Det"]["supported"] is False
    assert "INT64" in m["operators"]["ConstantOfShape"]["types"]  # "INF64" typo fixed
    assert {a["op_type"] for a in m["additions"]} >= {"Attention", "RMSNormalization"}
    # the parser handles short rows and a missing closing pipe
    rows = parse_table("| Foo | Y | FP32, FP16 |\n| Bar | N |\n| Baz | Y | BOOL | note\n")
    assert rows["Foo"]["types"] == ["FP32", "FP16"] and not rows["Bar"]["supported"]
    assert rows["Baz"]["restrictions"] == "note"


def test_build_matrix_from_shared_table_if_present():
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "shared/trt/onnx-tensorrt-10.1-operators.md"
    if not src.exists():
        pytest.skip("shared TensorRT table not on this machine")
    built = build(src)
    assert built["operators"] == cov.load_matrix()["operators"]


def test_fully_supported_model():
    r = cov.analyze(supported_model(), path="m.onnx")
    assert set(r) == REPORT_KEYS and set(r["summary"]) == SUMMARY_KEYS
    assert all(set(op) == OP_KEYS for op in r["operators"])
    assert r["schema"] == "ditperf.coverage/1" and r["source"] == "matrix"
    assert r["summary"]["fully_supported"] and r["summary"]["percent_supported"] == 100.0
    assert _row(r, "LayerNormalization")["types_used"] == ["FP32"]
    json.dumps(r)  # serializable


def test_unsupported_unknown_and_custom_domain_ops():
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("Det", ["a"], ["b"]),
             helper.make_node("MyAttention", ["b"], ["c"], domain="ditperf.plugins"),
             helper.make_node("NoSuchOp", ["c"], ["y"])]
    m = _model(nodes, [_vi("x", shape=(3, 3))], [_vi("y", shape=None)], domains=["ditperf.plugins"])
    r = cov.analyze(m)
    assert r["summary"]["nodes"] == 4 and r["summary"]["supported_nodes"] == 1
    assert r["summary"]["percent_supported"] == 25.0 and not r["summary"]["fully_supported"]
    det, custom, unknown = _row(r, "Det"), _row(r, "MyAttention"), _row(r, "NoSuchOp")
    assert det["supported"] == "N" and det["node_ranges"] == [[1, 1]]
    assert custom["domain"] == "ditperf.plugins" and custom["decided_by"] == ["plugin"]
    assert "plugin" in custom["reasons"][0]
    assert "not in the TensorRT 10.1 support matrix" in unknown["reasons"][0]
    assert any(i["kind"] == "plugin" for i in r["issues"])


def test_scatternd_reduction_where_types_and_local_functions():
    """ScatterND with a reduction is refused; Where is judged by its data type, not its bool
    condition; a call of a model-local function is judged by the function's body (the
    parser inlines it), not reported as a plugin."""
    nodes = [helper.make_node("ScatterND", ["x", "idx", "upd"], ["s"], reduction="add"),
             helper.make_node("Where", ["c", "s", "x"], ["w"])]
    m = _model(nodes, [_vi("x"), _vi("idx", T.INT64, (1, 1)), _vi("upd", T.FLOAT, (1, 8)),
                       _vi("c", T.BOOL)], [_vi("w")])
    report = cov.analyze(m)
    assert "reduction 'add' unsupported" in " ".join(_row(report, "ScatterND")["reasons"])
    assert _row(report, "Where")["types_used"] == ["FP32"]
    fn = helper.make_function("local", "Sq", ["a"], ["b"], [helper.make_node("Mul", ["a", "a"], ["b"])],
                              [helper.make_opsetid("", 18)])
    g = helper.make_graph([helper.make_node("Sq", ["x"], ["y"], domain="local")], "g", [_vi("x")], [_vi("y")])
    local = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("local", 1)],
                              functions=[fn])
    report = cov.analyze(local)
    assert report["summary"]["fully_supported"], report
    assert _row(report, "Sq")["decided_by"] == ["function"]
    assert not any(i["kind"] == "plugin" for i in report["issues"])
    bad_fn = helper.make_function("local", "Sq", ["a"], ["b"], [helper.make_node("Mul", ["a", "a"], ["m"]),
                                                               helper.make_node("NonExistentOp", ["m"], ["b"])],
                                  [helper.make_opsetid("", 18)])
    local.ClearField("functions")
    local.functions.append(bad_fn)
    row = _row(cov.analyze(local), "Sq")
    assert row["supported"] == "N" and "NonExistentOp" in " ".join(row["reasons"])


def test_static_checks():
    nodes = [
        # LayerNormalization with its Mean output used
        helper.make_node("LayerNormalization", ["x", "w"], ["ln", "mean"], axis=-1),
        helper.make_node("Add", ["ln", "mean"], ["s"]),
        # axes computed at runtime
        helper.make_node("Shape", ["s"], ["shp"]),
        helper.make_node("Slice", ["shp", "st", "en"], ["ax"]),
        helper.make_node("Sub", ["ax", "two"], ["axes"]),
        helper.make_node("ReduceSum", ["s", "axes"], ["y"], keepdims=1),
        # bf16 Resize with a cubic mode
        helper.make_node("Cast", ["x4"], ["xb"], to=T.BFLOAT16),
        helper.make_node("Resize", ["xb", "", "sc"], ["rb"], mode="cubic"),
        helper.make_node("Cast", ["rb"], ["y2"], to=T.FLOAT),
    ]
    inits = [numpy_helper.from_array(np.ones(8, np.float32), "w"),
             numpy_helper.from_array(np.array([1], np.int64), "st"),
             numpy_helper.from_array(np.array([2], np.int64), "en"),
             numpy_helper.from_array(np.array([1], np.int64), "two"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc")]
    m = _model(nodes, [_vi("x"), _vi("x4", shape=(1, 1, 2, 2))], [_vi("y", shape=None),
                                                                  _vi("y2", shape=None)], inits)
    r = cov.analyze(m)
    ln = _row(r, "LayerNormalization")
    assert ln["supported"] == "N" and ln["decided_by"] == ["static-check"]
    assert "only the first output" in ln["reasons"][0]
    red = _row(r, "ReduceSum")
    assert red["supported"] == "N" and "must be an initializer" in red["reasons"][0]
    rs = _row(r, "Resize")
    assert rs["types_used"] == ["BF16"]
    text = " ".join(rs["reasons"])
    assert "BF16 Resize" in text and "mode 'cubic'" in text


def test_opset_range_versions_and_decomposed_layernorm():
    from test_export_surgery import decomposed_ln_model

    m = decomposed_ln_model(opset=18)
    r = cov.analyze(m)
    assert r["summary"]["fully_supported"]  # every node is supported...
    assert any("decomposed LayerNorm" in i["message"] for i in r["issues"])  # ...but advised
    att = _model([helper.make_node("Attention", ["q", "k", "v"], ["o"])],
                 [_vi(n, shape=(1, 2, 3, 8)) for n in "qkv"], [_vi("o", shape=None)], opset=23)
    r = cov.analyze(att, trt_version="10.1")
    assert not r["summary"]["fully_supported"]
    assert any(i["kind"] == "opset" and "23" in i["message"] for i in r["issues"])
    assert "added in TensorRT 10.14" in _row(r, "Attention")["reasons"][0]
    r = cov.analyze(att, trt_version="10.15")
    assert r["summary"]["fully_supported"] and r["opset_range"] == [9, 23]
    assert any(i["kind"] == "note" for i in r["issues"])  # the assumed opset range is stated
    with pytest.raises(OnnxInputError, match="starts at TensorRT 10.1"):
        cov.analyze(att, trt_version="8.6")
    with pytest.raises(OnnxInputError, match="expected a version"):
        cov.analyze(att, trt_version="newest")


def test_render_and_live_fallback(tmp_path, capsys):
    from rich.console import Console

    p = tmp_path / "m.onnx"
    onnx.save(supported_model(), str(p))
    r = cov.coverage(p, trt_version="auto")
    assert r["source"] in ("matrix", "live")
    con = Console(width=140, record=True)
    cov.render(r, console=con)
    text = con.export_text()
    assert "LayerNormalization" in text and "nodes supported" in text
    if cov.live_available() is not None:
        with pytest.raises(OnnxInputError, match="--trt-version live"):
            cov.coverage(p, trt_version="live")


# ---------------------------------------------------------------------------------------
# Loading errors and external data


def test_bad_files(tmp_path):
    good = tmp_path / "good.onnx"
    onnx.save(supported_model(), str(good))
    data = good.read_bytes()
    cases = {
        "missing.onnx": (None, "no such file"),
        "empty.onnx": (b"", "empty file"),
        "text.onnx": (b"this is not a model\n" * 20, "not an ONNX file"),
        "trunc.onnx": (data[: len(data) // 2], "truncated or corrupt"),
    }
    for name, (content, msg) in cases.items():
        p = tmp_path / name
        if content is not None:
            p.write_bytes(content)
        with pytest.raises(OnnxInputError, match=msg) as ei:
            load_model(p)
        assert "\n" not in str(ei.value)
    with pytest.raises(OnnxInputError, match="is a directory"):
        load_model(tmp_path)


def test_external_data_roundtrip_and_missing(tmp_path):
    """The >2 GB mechanism, forced on a small model: weights in <name>.data beside it."""
    m = supported_model()
    p = save_model(m, tmp_path / "ext.onnx", external_data=True, size_threshold=0)
    assert (tmp_path / "ext.onnx.data").is_file()
    light = load_model(p, load_external_data=False)
    assert external_data_files(light) == {"ext.onnx.data": 2}
    full = load_model(p)
    np.testing.assert_array_equal(numpy_helper.to_array(full.graph.initializer[1]), np.ones((8, 8)))
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    inline = ort_session(m).run(None, {"x": x})[0]
    np.testing.assert_allclose(ort_session(p).run(None, {"x": x})[0], inline, rtol=1e-6)
    # coverage reads only the graph, never the weights
    assert cov.coverage(p, trt_version="10.1")["summary"]["fully_supported"]
    # auto mode keeps small models inline
    q = save_model(m, tmp_path / "inline.onnx")
    assert not (tmp_path / "inline.onnx.data").exists() and q.stat().st_size > 256
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(OnnxInputError, match="external data file.*missing.*ext.onnx.data"):
        load_model(p)


def test_ort_ir_version_lowering(tmp_path, monkeypatch):
    from ditperf.export import onnx_io

    m = supported_model()
    m.ir_version = onnx.IR_VERSION  # what onnx writes by default (may exceed onnxruntime's)
    top = ort_max_ir_version()
    assert 7 <= top <= onnx.IR_VERSION
    # pretend onnxruntime is older (the GPU machine's 1.30 loads at most IR 13)
    monkeypatch.setattr(onnx_io, "ort_max_ir_version", lambda: 10)
    p = tmp_path / "hi.onnx"
    save_model(m, p, external_data=True, size_threshold=0)
    x = np.ones((2, 8), np.float32)
    assert ort_session(p).run(None, {"x": x})[0].shape == (2, 8)
    assert ort_session(m).run(None, {"x": x})[0].shape == (2, 8)
    assert not list(tmp_path.glob(".hi*"))  # temporary copy removed


# ---------------------------------------------------------------------------------------
# Verdict details: DOUBLE, partial rows, node ranges, control-flow bodies


def test_double_is_accepted_as_fp32() -> None:
    """DOUBLE is not in Relu's matrix types but TensorRT casts it down to FP32: a DOUBLE Relu
    is supported (not refused for its type) whenever the op takes FP32."""
    assert "DOUBLE" not in cov.load_matrix()["operators"]["Relu"]["types"]
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", T.DOUBLE)], [_vi("y", T.DOUBLE)])
    r = cov.analyze(m)
    relu = _row(r, "Relu")
    assert relu["types_used"] == ["DOUBLE"]
    assert relu["supported"] == "Y" and relu["reasons"] == [], relu
    assert r["summary"]["fully_supported"]


def test_partial_row_and_node_ranges() -> None:
    """An op type with supported and unsupported nodes is 'partial' (with the supported
    count), not 'N'; unsupported top-level node indices are merged into [first, last] runs
    of neighbours (nodes 1-3 and 5 here), as the table prints them."""
    sc = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc")
    x4 = _vi("x4", shape=(1, 1, 2, 2))
    nodes = [helper.make_node("Resize", ["x4", "", "sc"], ["r0"], mode="linear"),
             helper.make_node("Resize", ["x4", "", "sc"], ["r1"], mode="cubic"),
             helper.make_node("Det", ["sq"], ["d2"]),
             helper.make_node("Det", ["sq"], ["d3"]),
             helper.make_node("Relu", ["sq"], ["a4"]),
             helper.make_node("Det", ["a4"], ["d5"])]
    outs = [_vi(n, shape=None) for n in ("r0", "r1", "d2", "d3", "d5")]
    r = cov.analyze(_model(nodes, [x4, _vi("sq", shape=(3, 3))], outs, [sc]))
    rs = _row(r, "Resize")
    assert (rs["supported"], rs["count"], rs["supported_count"]) == ("partial", 2, 1), rs
    assert rs["unsupported_nodes"] == ["Resize_1"] and "mode 'cubic'" in " ".join(rs["reasons"])
    assert r["summary"]["unsupported_op_types"] == 2  # Resize (partial) and Det
    bad = {op["op_type"]: op["node_ranges"] for op in r["operators"] if op["node_ranges"]}
    assert bad == {"Resize": [[1, 1]], "Det": [[2, 3], [5, 5]]}
    # the same rule across op types: three neighbouring unsupported nodes of one type
    dets = [helper.make_node("Det", ["sq"], [f"d{i}"]) for i in range(3)] + [
        helper.make_node("Relu", ["sq"], ["a3"]), helper.make_node("Det", ["a3"], ["d4"])]
    r = cov.analyze(_model(dets, [_vi("sq", shape=(3, 3))],
                           [_vi(f"d{i}", shape=None) for i in (0, 1, 2, 4)]))
    assert _row(r, "Det")["node_ranges"] == [[0, 2], [4, 4]]


def _if_model(body_op: str) -> onnx.ModelProto:
    """An If whose then-branch runs ``body_op`` on an outer-scope tensor (else: Identity)."""
    def branch(op: str, out: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node(op, ["x"], [out])], f"{op}_branch", [],
                                 [_vi(out, shape=None)])

    node = helper.make_node("If", ["c"], ["y"], then_branch=branch(body_op, "t"),
                            else_branch=branch("Identity", "e"))
    return _model([node], [_vi("c", T.BOOL, ()), _vi("x")], [_vi("y", shape=None)])


def test_if_body_with_unsupported_node() -> None:
    """Control-flow bodies are judged: an If with an unknown op in its then-branch is
    unsupported (the reason names the body's node), the same If with a clean body is not."""
    clean = cov.analyze(_if_model("Relu"))
    assert _row(clean, "If")["supported"] == "Y" and clean["summary"]["fully_supported"], clean
    row = _row(cov.analyze(_if_model("NoSuchBodyOp")), "If")
    assert row["supported"] == "N" and row["decided_by"] == ["static-check"], row
    assert "body contains unsupported node(s)" in row["reasons"][0]
    assert "NoSuchBodyOp" in row["reasons"][0]


def test_bodies_see_the_outer_scope_and_local_functions() -> None:
    """A control-flow body reads the enclosing graph's tensors by name: an outer initializer
    used as ``axes`` is a constant there, an outer BF16 tensor keeps its type (so the BF16
    Resize pitfall is found inside the body), and a model-local function called in a body is
    judged by its own body (the parser inlines it), not as a plugin."""
    def if_model(body_nodes, inputs, inits=(), functions=()) -> onnx.ModelProto:
        then = helper.make_graph(body_nodes, "then", [], [_vi("t", shape=None)])
        other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [_vi("e", shape=None)])
        m = _model([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
                   [_vi("c", T.BOOL, ()), *inputs], [_vi("y", shape=None)], inits, domains=("local",))
        m.functions.extend(functions)
        return m

    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    r = cov.analyze(if_model([helper.make_node("ReduceSum", ["x", "axes"], ["t"])], [_vi("x")], [axes]))
    assert _row(r, "If")["supported"] == "Y", _row(r, "If")
    sc = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc")
    r = cov.analyze(if_model([helper.make_node("Resize", ["x", "", "sc"], ["t"], mode="linear")],
                             [_vi("x", T.BFLOAT16, (1, 1, 2, 2))], [sc]))
    row = _row(r, "If")
    assert row["supported"] == "N" and "BF16" in row["reasons"][0] and "Resize" in row["reasons"][0], row
    fn = helper.make_function("local", "MyRelu", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
                              [helper.make_opsetid("", 18)])
    r = cov.analyze(if_model([helper.make_node("MyRelu", ["x"], ["t"], domain="local")], [_vi("x")], functions=[fn]))
    assert _row(r, "If")["supported"] == "Y", _row(r, "If")
    bad = helper.make_function("local", "MyDet", ["a"], ["b"], [helper.make_node("NoSuchOp", ["a"], ["b"])],
                               [helper.make_opsetid("", 18)])
    r = cov.analyze(if_model([helper.make_node("MyDet", ["x"], ["t"], domain="local")], [_vi("x")], functions=[bad]))
    assert _row(r, "If")["supported"] == "N" and "MyDet" in _row(r, "If")["reasons"][0]


def test_double_nodes_get_a_model_level_note() -> None:
    """DOUBLE is accepted where FP32 is, but the report says TensorRT computes it in FP32."""
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", T.DOUBLE)], [_vi("y", T.DOUBLE)])
    notes = [i["message"] for i in cov.analyze(m)["issues"] if i["kind"] == "note"]
    assert any("1 node(s) compute in DOUBLE" in n and "FP32" in n for n in notes), notes
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x")], [_vi("y")])
    assert not any("DOUBLE" in i["message"] for i in cov.analyze(m)["issues"])


def test_a_body_input_shadows_an_outer_initializer_of_the_same_name() -> None:
    """A Loop body's own input (a carried value) is computed, even when the outer graph has an
    initializer of that name: ReduceSum's axes from it is not a constant."""
    body = helper.make_graph(
        [helper.make_node("ReduceSum", ["v", "ax"], ["s"]), helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Identity", ["ax"], ["ax_out"]), helper.make_node("Identity", ["v"], ["v_out"])],
        "body", [_vi("i", T.INT64, ()), _vi("cond_in", T.BOOL, ()), _vi("ax", T.INT64, (1,)), _vi("v")],
        [_vi("cond_out", T.BOOL, ()), _vi("ax_out", T.INT64, (1,)), _vi("v_out"), _vi("s", shape=None)])
    loop = helper.make_node("Loop", ["n", "c", "ax0", "x"], ["ax_final", "x_final", "scan_s"], body=body)
    outer_ax = numpy_helper.from_array(np.array([0], np.int64), "ax")  # unrelated outer tensor, same name
    n = numpy_helper.from_array(np.array(2, np.int64), "n")
    c = numpy_helper.from_array(np.array(True), "c")
    ax0 = numpy_helper.from_array(np.array([1], np.int64), "ax0")
    m = _model([loop], [_vi("x")], [_vi("x_final", shape=None)], [outer_ax, n, c, ax0])
    row = _row(cov.analyze(m), "Loop")
    assert row["supported"] == "N" and "axes" in row["reasons"][0], row
