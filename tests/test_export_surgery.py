"""Graph surgery passes on hand-made ONNX graphs: node counts + onnxruntime numerics."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from ditperf.export.check import random_feeds
from ditperf.export.onnx_io import OnnxInputError, ort_runs_opset23, ort_session
from ditperf.export.surgery import (
    PluginSpec,
    SurgeryOptions,
    check_model,
    run_passes,
    verify_numerics,
)
from onnx import TensorProto as T
from onnx import helper, numpy_helper

pytest.importorskip("onnxruntime")


def _model(nodes, inputs, outputs, inits=(), opset=18, domains=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    ops = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(g, opset_imports=ops)


def _c(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def _ops(model):
    return [n.op_type for n in model.graph.node]


def decomposed_ln_model(C=24, affine=True, opset=18):
    """x (2, 5, C) -> LN(x) * g + b, written as the ReduceMean/Pow chain (+ a Relu after)."""
    rng = np.random.default_rng(1)
    x = helper.make_tensor_value_info("x", T.FLOAT, [2, 5, C])
    y = helper.make_tensor_value_info("y", T.FLOAT, [2, 5, C])
    inits = [_c("axes", np.array([-1], np.int64)), _c("two", np.float32(2.0)),
             _c("eps", np.float32(1e-5)),
             _c("gamma", rng.standard_normal(C).astype(np.float32)),
             _c("beta", rng.standard_normal(C).astype(np.float32))]
    nodes = [
        helper.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=1),
        helper.make_node("Sub", ["x", "mean"], ["d"]),
        helper.make_node("Pow", ["d", "two"], ["d2"]),
        helper.make_node("ReduceMean", ["d2", "axes"], ["var"], keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["std"]),
        helper.make_node("Div", ["d", "std"], ["n"]),
    ]
    last = "n"
    if affine:
        nodes += [helper.make_node("Mul", ["n", "gamma"], ["ng"]),
                  helper.make_node("Add", ["ng", "beta"], ["nb"])]
        last = "nb"
    nodes.append(helper.make_node("Relu", [last], ["y"]))
    return _model(nodes, [x], [y], inits, opset=opset)


def attention_model(with_mask=True, pre_scaled=True, nan_guard=False, B=2, H=3, N=7, M=5, D=8):
    """SDPA as the torch exporter decomposes it: Q*sqrt(s) @ (K^T*sqrt(s)) + mask -> Softmax
    -> @ V (or post-scaled scores with Div when ``pre_scaled`` is False)."""
    q = helper.make_tensor_value_info("q", T.FLOAT, [B, H, N, D])
    k = helper.make_tensor_value_info("k", T.FLOAT, [B, H, M, D])
    v = helper.make_tensor_value_info("v", T.FLOAT, [B, H, M, D])
    out = helper.make_tensor_value_info("out", T.FLOAT, [B, H, N, D])
    s = D ** -0.5
    inits = [_c("sq", np.float32(s ** 0.5)), _c("div", np.float32(D ** 0.5))]
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2])]
    if pre_scaled:
        nodes += [helper.make_node("Mul", ["q", "sq"], ["qs"]),
                  helper.make_node("Mul", ["kt", "sq"], ["kts"]),
                  helper.make_node("MatMul", ["qs", "kts"], ["scores"])]
    else:
        nodes += [helper.make_node("MatMul", ["q", "kt"], ["raw"]),
                  helper.make_node("Div", ["raw", "div"], ["scores"])]
    inputs = [q, k, v]
    sm_in = "scores"
    if with_mask:
        inputs.append(helper.make_tensor_value_info("mask", T.FLOAT, [B, 1, 1, M]))
        nodes.append(helper.make_node("Add", ["scores", "mask"], ["masked"]))
        sm_in = "masked"
    nodes.append(helper.make_node("Softmax", [sm_in], ["p"], axis=-1))
    p = "p"
    if nan_guard:  # torch's masked SDPA: rows with every key masked -> 0
        inits.append(_c("zero", np.float32(0)))
        nodes += [helper.make_node("IsNaN", ["p"], ["isnan"]),
                  helper.make_node("Where", ["isnan", "zero", "p"], ["pg"])]
        p = "pg"
    nodes.append(helper.make_node("MatMul", [p, "v"], ["out"]))
    return _model(nodes, inputs, [out], inits, opset=18)


def test_fold_layernorm_affine_and_plain():
    for affine in (True, False):
        m = decomposed_ln_model(affine=affine)
        new, reps = run_passes(m, ["fold-layernorm", "cleanup"])
        assert reps[0].changes["layernorms_folded"] == 1
        assert _ops(new) == ["LayerNormalization", "Relu"]
        ln = new.graph.node[0]
        assert len(ln.input) == (3 if affine else 2)
        assert {a.name: helper.get_attribute_value(a) for a in ln.attribute}["stash_type"] == 1
        check_model(new)
        err = verify_numerics(m, new, seed=3)
        assert err["max_abs"] < 1e-5, err


def test_fold_layernorm_keeps_shared_intermediates():
    """When x - mean is also used elsewhere the chain cannot be removed: nothing folds."""
    m = decomposed_ln_model()
    m.graph.node.append(helper.make_node("Identity", ["d"], ["d_out"]))
    m.graph.output.append(helper.make_tensor_value_info("d_out", T.FLOAT, [2, 5, 24]))
    new, reps = run_passes(m, ["fold-layernorm"])
    assert reps[0].changes["layernorms_folded"] == 0
    assert "Pow" in _ops(new)


def test_fold_layernorm_needs_opset_17():
    m = decomposed_ln_model(opset=15)
    m.graph.initializer.remove(m.graph.initializer[0])  # opset 15: axes as an attribute
    for n in m.graph.node:
        if n.op_type == "ReduceMean":
            del n.input[1]
            n.attribute.append(helper.make_attribute("axes", [-1]))
    new, reps = run_passes(m, ["fold-layernorm"])
    assert reps[0].changes["layernorms_folded"] == 0 and "opset >= 17" in reps[0].notes[0]
    new, reps = run_passes(m, ["fold-layernorm"], SurgeryOptions(opset=17))
    assert reps[0].changes["layernorms_folded"] == 1
    assert _ops(new).count("LayerNormalization") == 1
    assert verify_numerics(m, new)["max_abs"] < 1e-5


@pytest.mark.skipif(not ort_runs_opset23(), reason="this onnxruntime cannot run Attention-23")
@pytest.mark.parametrize("with_mask,pre_scaled,guard", [(True, True, True), (False, False, False)])
def test_fold_attention_to_opset23(with_mask, pre_scaled, guard):
    m = attention_model(with_mask=with_mask, pre_scaled=pre_scaled, nan_guard=guard)
    _, reps = run_passes(m, ["fold-attention"])
    assert reps[0].changes["attentions_folded"] == 0 and "opset >= 23" in reps[0].notes[0]
    new, reps = run_passes(m, ["fold-attention", "cleanup"], SurgeryOptions(opset=23))
    assert reps[0].changes["attentions_folded"] == 1
    # onnxruntime wants the mask's query dim = Nq: the (B,1,1,M) mask is expanded
    expect = (["Expand", "Attention"] if with_mask else ["Attention"]) + (
        ["IsNaN", "Where"] if guard else [])
    assert _ops(new) == expect
    assert reps[0].changes["nan_guards_moved"] == int(guard)
    check_model(new)
    err = verify_numerics(m, new, seed=5)
    assert err["max_abs"] < 1e-5, err


def test_cast_chains():
    x = helper.make_tensor_value_info("x", T.FLOAT16, [4, 6])
    y = helper.make_tensor_value_info("y", T.FLOAT16, [4, 6])
    z = helper.make_tensor_value_info("z", T.FLOAT, [4, 6])
    w = helper.make_tensor_value_info("w", T.FLOAT, [4, 6])
    nodes = [
        # fp16 -> fp32 -> fp16: a no-op, both casts go
        helper.make_node("Cast", ["x"], ["a"], to=T.FLOAT),
        helper.make_node("Cast", ["a"], ["b"], to=T.FLOAT16),
        helper.make_node("Relu", ["b"], ["y"]),
        # fp16 -> fp32 -> fp64 -> fp32: shortened to one cast (+ identity removed)
        helper.make_node("Cast", ["x"], ["c"], to=T.FLOAT),
        helper.make_node("Cast", ["c"], ["d"], to=T.DOUBLE),
        helper.make_node("Cast", ["d"], ["e"], to=T.FLOAT),
        helper.make_node("Cast", ["e"], ["e2"], to=T.FLOAT),  # identity
        helper.make_node("Neg", ["e2"], ["z"]),
        # lossy: fp16 -> fp32 -> (x*1.001 in fp32) -> fp16 -> fp32 must stay
        helper.make_node("Mul", ["c", "k"], ["f"]),
        helper.make_node("Cast", ["f"], ["g"], to=T.FLOAT16),
        helper.make_node("Cast", ["g"], ["h"], to=T.FLOAT),
        helper.make_node("Abs", ["h"], ["w"]),
    ]
    m = _model(nodes, [x], [y, z, w], [_c("k", np.float32(1.001))])
    new, reps = run_passes(m, ["cast-chains", "cleanup"])
    ch = reps[0].changes
    assert ch["identity_casts_removed"] >= 1 and ch["cast_chains_shortened"] >= 2, ch
    assert "lossy" in " ".join(reps[0].notes)
    assert _ops(new).count("Cast") == 4, _ops(new)  # c, e (x->fp32 x2 paths), g, h kept
    check_model(new)
    assert verify_numerics(m, new)["max_abs"] == 0.0


def test_cast_around_bf16_resize():
    import ml_dtypes

    x = helper.make_tensor_value_info("x", T.FLOAT, [1, 2, 4, 4])
    y = helper.make_tensor_value_info("y", T.FLOAT, [1, 2, 8, 8])
    nodes = [helper.make_node("Cast", ["x"], ["xb"], to=T.BFLOAT16),
             helper.make_node("Resize", ["xb", "", "scales"], ["rb"], mode="linear"),
             helper.make_node("Cast", ["rb"], ["y"], to=T.FLOAT)]
    m = _model(nodes, [x], [y], [_c("scales", np.array([1, 1, 2, 2], np.float32))])
    new, reps = run_passes(m, ["cast-around", "cast-chains", "cleanup"])
    assert reps[0].changes == {"nodes_wrapped": 1, "casts_inserted": 2}
    resize = next(n for n in new.graph.node if n.op_type == "Resize")
    types = {vi.name: vi.type.tensor_type.elem_type for vi in new.graph.value_info}
    assert types[resize.input[0]] == T.FLOAT and types[resize.output[0]] == T.FLOAT
    check_model(new)
    # the fp32 Resize of the bf16-rounded input, rounded to bf16 again, is the reference
    feeds = random_feeds(ort_session(new), seed=2)
    xb = feeds["x"].astype(ml_dtypes.bfloat16).astype(np.float32)
    ref_m = _model([helper.make_node("Resize", ["x", "", "scales"], ["r"], mode="linear")],
                   [x], [helper.make_tensor_value_info("r", T.FLOAT, None)],
                   [_c("scales", np.array([1, 1, 2, 2], np.float32))])
    ref = ort_session(ref_m).run(None, {"x": xb})[0].astype(ml_dtypes.bfloat16).astype(np.float32)
    got = ort_session(new).run(None, feeds)[0]
    np.testing.assert_array_equal(got, ref)


def test_plugin_by_op_type_and_subgraph():
    m = attention_model()
    new, reps = run_passes(m, ["fold-attention"], SurgeryOptions(
        opset=23, plugins=[PluginSpec.parse("Attention:ditperf.plugins")]))
    att = [n for n in new.graph.node if n.op_type == "Attention"]
    assert len(att) == 1 and att[0].domain == "ditperf.plugins"
    assert reps[-1].changes["nodes_retargeted"] == 1
    assert any(i.domain == "ditperf.plugins" for i in new.opset_import)
    check_model(new)
    with pytest.raises(OnnxInputError, match="onnxruntime cannot run"):
        verify_numerics(m, new)
    # subgraph between tensors: scores .. p -> one custom node
    spec = PluginSpec.parse("MaskedSoftmax=scores,mask->p@my.plugins")
    assert (spec.inputs, spec.outputs, spec.domain) == (["scores", "mask"], ["p"], "my.plugins")
    new, reps = run_passes(m, ["cleanup"], SurgeryOptions(plugins=[spec]))
    assert reps[-1].changes["subgraph_nodes_replaced"] == 2  # Add + Softmax
    assert "MaskedSoftmax" in _ops(new) and "Softmax" not in _ops(new)
    check_model(new)


def test_bad_options():
    m = attention_model()
    with pytest.raises(OnnxInputError, match="unknown pass"):
        run_passes(m, ["fold-everything"])
    with pytest.raises(OnnxInputError, match="expected OP"):
        PluginSpec.parse("not a spec!")
    with pytest.raises(OnnxInputError, match="no tensor named"):
        run_passes(m, [], SurgeryOptions(plugins=[PluginSpec.parse("X=nope->p")]))
    old = _model([helper.make_node("Relu", ["x"], ["y"])],
                 [helper.make_tensor_value_info("x", T.FLOAT, [2])],
                 [helper.make_tensor_value_info("y", T.FLOAT, [2])], opset=9)
    with pytest.raises(OnnxInputError, match="too old"):
        run_passes(old, ["cleanup"])


def test_fold_constants_counts():
    x = helper.make_tensor_value_info("x", T.FLOAT, [3])
    y = helper.make_tensor_value_info("y", T.FLOAT, [3])
    nodes = [helper.make_node("Add", ["a", "b"], ["ab"]),
             helper.make_node("Mul", ["ab", "b"], ["abb"]),
             helper.make_node("Add", ["x", "abb"], ["y"])]
    m = _model(nodes, [x], [y], [_c("a", np.ones(3, np.float32)),
                                 _c("b", np.full(3, 2, np.float32))])
    new, reps = run_passes(m, ["fold-constants"])
    assert reps[0].changes["nodes_removed"] == 2 and _ops(new) == ["Add"]
    assert verify_numerics(m, new)["max_abs"] == 0.0


def test_infer_shapes_on_weightless_skeleton():
    """The > 2 GiB path: shape inference on a skeleton gives the same types and shapes."""
    from ditperf.export.surgery import infer_shapes

    m = decomposed_ln_model(C=2048)  # 8 KiB gamma/beta: become typed graph inputs
    full = {v.name: v.type for v in infer_shapes(decomposed_ln_model(C=2048)).graph.value_info}
    skel = infer_shapes(m, skeleton_above=0)
    assert {v.name: v.type for v in skel.graph.value_info} == full and len(full) == 9
    assert len(skel.graph.initializer[3].raw_data) == 2048 * 4  # weights untouched
    from ditperf.export.surgery import skeleton

    light = skeleton(m)
    assert light.ByteSize() < 2048 * 4  # the weights' bytes are not in the skeleton
    onnx.checker.check_model(light, full_check=True)  # the > 2 GiB check_model path


def test_compare_outputs_never_accepts_mismatched_non_finite_values():
    from ditperf.export.check import compare_outputs

    nan, inf = float("nan"), float("inf")
    same = compare_outputs({"v": np.array([1.0, nan, inf])}, {"v": np.array([1.1, nan, inf])})
    assert same["max_abs"] == pytest.approx(0.1) and same["max_rel"] == pytest.approx(0.1)
    for ref, got in (([1.0, nan, 3.0], [nan, 2.0, 3.0]),  # NaNs at other places
                     ([nan, nan], [nan, nan]),            # nothing finite to compare
                     ([1.0, inf], [1.0, -inf]),           # infinities of other signs
                     ([1.0, 2.0], [1.0, nan])):
        res = compare_outputs({"v": np.array(ref)}, {"v": np.array(got)})
        assert np.isnan(res["max_rel"]) and "note" in res["outputs"]["v"], (ref, got)
    two = compare_outputs({"a": np.array([1.0]), "b": np.array([nan])}, {"a": np.array([1.0]), "b": np.array([1.0])})
    assert np.isnan(two["max_abs"])  # one bad output makes the overall result fail, whatever the order


def test_cli_refuses_bad_output_paths_before_working(tmp_path, capsys):
    from ditperf.cli.main import main

    m = _model([helper.make_node("Relu", ["x"], ["y"])],
               [helper.make_tensor_value_info("x", T.FLOAT, [2, 3])],
               [helper.make_tensor_value_info("y", T.FLOAT, [2, 3])])
    src = tmp_path / "m.onnx"
    onnx.save(m, src)
    (tmp_path / "afile").write_text("x")
    cases = [
        (["export", "onnx", "--preset", "tiny", "--out", str(tmp_path)], "is a folder"),
        (["export", "onnx", "--preset", "tiny", "--out", str(tmp_path / "afile" / "x.onnx")], "is a file, not a folder"),
        (["export", "surgery", str(src), str(src)], "is the input"),
        (["export", "surgery", str(src), str(tmp_path)], "is a folder"),
        (["export", "coverage", str(src), "--json", str(tmp_path)], "is a folder"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    assert onnx.load(src).graph.node[0].op_type == "Relu"  # the input is untouched
    with pytest.raises(SystemExit):
        main(["export", "check", str(src), "--batch", "0"])
    assert "expected a positive integer" in capsys.readouterr().err


def test_cli_surgery_fails_on_finite_differences_above_the_dtype_tolerance(tmp_path, capsys, monkeypatch):
    """The onnxruntime comparison fails the command (exit 1) when an output moves by more than
    its dtype's tolerance (fp32 1e-4), not only when non-finite values differ; --tolerance
    accepts more; the JSON records the tolerance used."""
    import json

    import ditperf.export.surgery as surgery_mod
    from ditperf.cli.main import main

    m = _model([helper.make_node("Relu", ["x"], ["y"])],
               [helper.make_tensor_value_info("x", T.FLOAT, [2, 3])],
               [helper.make_tensor_value_info("y", T.FLOAT, [2, 3])])
    src, dst, js = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "s.json"
    onnx.save(m, src)
    real = surgery_mod.verify_numerics
    assert main(["export", "surgery", str(src), str(dst), "--json", str(js)]) == 0  # a real, exact comparison
    y = json.loads(js.read_text())["verify"]["outputs"]["y"]
    assert (y["max_rel"], y["dtype"], y["tolerance"]) == (0.0, "fp32", 1e-4)

    def shifted(before, after, **kw):  # the rewritten graph's output moved by 0.3% of its range
        out = real(before, after, **kw)
        out["outputs"]["y"].update(max_abs=3e-3, max_rel=3e-3)
        out["max_rel"] = 3e-3
        return out

    monkeypatch.setattr(surgery_mod, "verify_numerics", shifted)
    capsys.readouterr()
    assert main(["export", "surgery", str(src), str(dst), "--json", str(js)]) == 1
    assert "output y of the rewritten graph differs by max rel 0.003 > 0.0001 (fp32" in capsys.readouterr().out
    assert main(["export", "surgery", str(src), str(dst), "--tolerance", "1e-2", "--json", str(js)]) == 0
    assert json.loads(js.read_text())["verify"]["outputs"]["y"]["tolerance"] == 1e-2
    for bad in ("0", "-1", "abc", "inf"):
        with pytest.raises(SystemExit):
            main(["export", "surgery", str(src), str(dst), "--tolerance", bad])
    assert "expected a positive number" in capsys.readouterr().err
