"""ONNX export of the DiT (both backends, opset 17 and 23), translations of the custom ops,
opset lowering, the CLI and its bad-input paths, and the TensorRT engine (GPU + TensorRT)."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as T
from onnx import helper, numpy_helper

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from ditperf.cli.main import main
from ditperf.export.coverage import analyze, count_decomposed_layernorms
from ditperf.export.onnx_export import (
    ExportSpec,
    build_model,
    check_against_torch,
    check_file,
    export_onnx,
    read_metadata,
)
from ditperf.export.onnx_io import OnnxInputError, load_model, ort_runs_opset23, ort_session
from ditperf.export.opset import lower_18_to_17

# (backend, opset) -> extra spec: each export also exercises one more mechanism
CASES = {
    ("torch", 17): {},
    ("triton", 17): {"batch": "dynamic"},
    ("torch", 23): {"external_data": True},
    ("triton", 23): {},
}
_CACHE: dict = {}
# onnxruntime 1.32 runs opset-23 Attention/RMSNormalization on CPU; older ones may not
needs_ort23 = pytest.mark.skipif(not ort_runs_opset23(),
                                 reason="this onnxruntime cannot run opset-23 Attention")


@pytest.fixture(scope="module")
def outdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


def exported(outdir: Path, backend: str, opset: int):
    key = (backend, opset)
    if key not in _CACHE:
        spec = ExportSpec(preset="tiny", out=str(outdir / f"tiny_{backend}_{opset}.onnx"),
                          backend=backend, opset=opset, **CASES[key])
        _CACHE[key] = export_onnx(spec, log=lambda _msg: None)
    return _CACHE[key]


@pytest.mark.parametrize("backend,opset", list(CASES))
def test_export_tiny(outdir, backend, opset):
    res = exported(outdir, backend, opset)
    model = load_model(res.path)
    onnx.checker.check_model(model, full_check=True)
    assert res.opset == opset and res.opset_requested == opset
    if opset == 17:  # the dynamo exporter's 18, lowered exactly
        assert any("lowered exactly to 17" in n for n in res.notes)
    ops = Counter(n.op_type for n in model.graph.node)
    # adaLN norms are single LayerNormalization nodes, never the ReduceMean/Pow chain
    assert ops["LayerNormalization"] >= 5
    assert count_decomposed_layernorms(model.graph) == 0
    assert "ReduceLogSumExp" not in ops  # the attention op's lse output is dead code
    if backend == "triton":
        if opset == 23:
            assert ops["Attention"] == 4 and ops["RMSNormalization"] == 8
            assert "Softmax" not in ops
        else:
            assert ops["Softmax"] == 4 and "Attention" not in ops
    if CASES[(backend, opset)].get("external_data"):
        assert res.data_path and Path(res.data_path).is_file()
        # the big weights live outside the .onnx (the exporter keeps small tensors inline)
        assert Path(res.data_path).stat().st_size > 0.6 * res.bytes
    if CASES[(backend, opset)].get("batch") == "dynamic":
        dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
        assert dim0.dim_param and not dim0.HasField("dim_value")
    # numerics: onnxruntime CPU vs the PyTorch model with the same weights, fp32 tolerance
    if opset == 23 and not ort_runs_opset23():
        assert res.check is None and any("numeric check skipped" in n for n in res.notes)
        pytest.skip("this onnxruntime cannot run opset-23 Attention: numerics not checked")
    assert res.check is not None and res.check["ok"], res.check
    assert res.check["max_rel"] < 1e-4 and res.check["ref_max"] > 1e-3  # output not ~0
    if CASES[(backend, opset)].get("batch") == "dynamic":
        assert res.check["batch"] == 3  # checked at a batch other than the traced one


def test_check_command_rebuilds_from_metadata(outdir, capsys):
    res = exported(outdir, "torch", 17)
    meta = {p.key: p.value for p in load_model(res.path, load_external_data=False).metadata_props}
    assert meta["ditperf.preset"] == "tiny" and meta["ditperf.backend"] == "torch"
    assert main(["export", "check", res.path]) == 0
    out = capsys.readouterr().out
    assert "max abs" in out and "OK" in out
    assert main(["export", "check", res.path, "--batch", "2"]) == 2  # static batch 1
    assert "static batch of 1" in capsys.readouterr().err


@needs_ort23
def test_surgery_folds_torch_sdpa_into_attention(outdir):
    from ditperf.export.surgery import SurgeryOptions, run_passes, verify_numerics

    res = exported(outdir, "torch", 17)
    model = load_model(res.path)
    new, reports = run_passes(model, ["fold-constants", "fold-attention", "cleanup"],
                              SurgeryOptions(opset=23))
    fold = next(r for r in reports if r.name == "fold-attention")
    assert fold.changes["attentions_folded"] == 4  # 2 blocks x (self + cross)
    ops = Counter(n.op_type for n in new.graph.node)
    assert ops["Attention"] == 4 and "Softmax" not in ops
    err = verify_numerics(model, new, seed=4)
    assert err["max_rel"] < 1e-5, err


def test_coverage_of_exported_model(outdir):
    model = load_model(exported(outdir, "triton", 23).path, load_external_data=False)
    r = analyze(model, trt_version="10.15")
    assert r["summary"]["fully_supported"], [o for o in r["operators"] if o["supported"] != "Y"]
    r = analyze(model, trt_version="10.1")
    assert not r["summary"]["fully_supported"]
    att = next(o for o in r["operators"] if o["op_type"] == "Attention")
    assert att["supported"] == "N" and "10.14" in att["reasons"][0]


# ---------------------------------------------------------------------------------------
# The translations on a small module: every op, optional arguments, fully masked rows, lse


class _OpsBlock(torch.nn.Module):
    def __init__(self, C: int = 32, H: int = 2) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(C))
        self.b = torch.nn.Parameter(torch.randn(C))
        self.qn = torch.nn.Parameter(torch.randn(C // H))
        self.H = H

    def forward(self, x, y, shift, scale, gate, mask, K):
        B, N, C = x.shape
        h = K.layer_norm(x, self.w, self.b, shift=shift, scale=scale)
        q = K.rms_norm(h.view(B, N, self.H, C // self.H).transpose(1, 2), self.qn)
        x2, h2 = K.gated_residual_layer_norm(x, y, gate, shift=shift, scale=scale)
        x3, h3 = K.gated_residual_layer_norm(x2, y, None)
        kv = h2.view(B, N, self.H, C // self.H).transpose(1, 2)
        out, lse = K.attention_with_lse(q, kv, kv, mask)
        r = K.rms_norm(x3 + h3, None, shift=shift, scale=scale)
        return out.transpose(1, 2).reshape(B, N, C) + r, lse


class _Kernels:
    """Calls the custom ops directly (attention returns (out, lse))."""

    def __init__(self) -> None:
        import ditperf.kernels as K

        self.layer_norm, self.rms_norm = K.layer_norm, K.rms_norm
        self.gated_residual_layer_norm = K.gated_residual_layer_norm

    @staticmethod
    def attention_with_lse(q, k, v, mask):
        return torch.ops.ditperf.attention(q, k, v, mask, q.shape[-1] ** -0.5)


class _Reference:
    """The kernels' torch references, and lse = logsumexp of the masked scores."""

    def __init__(self) -> None:
        import ditperf.kernels as K

        self.layer_norm, self.rms_norm = K.layer_norm_ref, K.rms_norm_ref
        self.gated_residual_layer_norm = K.gated_residual_layer_norm_ref
        self._att = K.attention_ref

    def attention_with_lse(self, q, k, v, mask):
        s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
        return self._att(q, k, v, key_mask=mask), torch.logsumexp(s, dim=-1)


class _Bound(torch.nn.Module):
    def __init__(self, block, K) -> None:
        super().__init__()
        self.block, self.K = block, K

    def forward(self, *args):
        return self.block(*args, self.K)


@pytest.mark.parametrize("opset", [18, pytest.param(23, marks=needs_ort23)])
def test_translations_match_references(opset):
    from ditperf.export.translations import translation_table

    B, N, C = 2, 5, 32
    block = _OpsBlock(C)
    mask = torch.tensor([[True, True, False, True, False], [False] * N])  # sample 1: no key
    args = (torch.randn(B, N, C), torch.randn(B, N, C), torch.randn(B, C), torch.randn(B, C),
            torch.randn(B, C), mask)
    with torch.no_grad():
        ref_out, ref_lse = _Bound(block, _Reference())(*args)
    prog = torch.onnx.export(_Bound(block, _Kernels()), args, dynamo=True, opset_version=opset,
                             custom_translation_table=translation_table(opset), verbose=False)
    ops = Counter(n.op_type for n in prog.model_proto.graph.node)
    assert ops["LayerNormalization"] == 3 and ops["ReduceLogSumExp"] == 1  # lse is used here
    assert (ops["Attention"], ops["RMSNormalization"]) == ((1, 2) if opset == 23 else (0, 0))
    sess = ort_session(prog.model_proto)
    feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args, strict=True)}
    out, lse = sess.run(None, feeds)
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, ref_out.numpy(), atol=2e-5, rtol=1e-5)
    # a row with no real key: output 0 (kernel semantics), lse -inf (or NaN from ORT's max
    # trick on an all -inf row; the kernel gives -inf)
    np.testing.assert_allclose(out[1] - ref_out.numpy()[1], 0, atol=2e-5)
    np.testing.assert_allclose(lse[0], ref_lse[0].numpy(), atol=1e-5)
    assert np.all(np.isneginf(lse[1]) | np.isnan(lse[1]))


# ---------------------------------------------------------------------------------------
# opset 18 -> 17


def test_lower_18_to_17_exact():
    x = helper.make_tensor_value_info("x", T.FLOAT, [2, 7, 6])
    outs = [helper.make_tensor_value_info(n, T.FLOAT, shape) for n, shape in
            (("m", [2, 7, 1]), ("a", [2, 3, 6]), ("b", [2, 3, 6]), ("c", [2, 1, 6]))]
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=1),
             helper.make_node("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3)]  # 3,3,1
    inits = [numpy_helper.from_array(np.array([-1], np.int64), "axes")]
    m18 = helper.make_model(helper.make_graph(nodes, "g", [x], outs, initializer=inits),
                            opset_imports=[helper.make_opsetid("", 18)])
    m17 = lower_18_to_17(m18)
    onnx.checker.check_model(m17)
    assert m17.opset_import[0].version == 17 and m17.graph.initializer[0].name != "axes"
    feed = {"x": np.random.default_rng(0).standard_normal((2, 7, 6)).astype(np.float32)}
    for a, b in zip(ort_session(m18).run(None, feed), ort_session(m17).run(None, feed),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    gn = helper.make_model(helper.make_graph(
        [helper.make_node("GroupNormalization", ["x", "s", "s"], ["m"], num_groups=1)], "g",
        [x], [outs[0]]), opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(OnnxInputError, match="GroupNormalization.*use --opset 18"):
        lower_18_to_17(gn)


# ---------------------------------------------------------------------------------------
# CLI: help, bad input (one line, non-zero), exit codes


def test_cli_bad_input(tmp_path, capsys):
    junk = tmp_path / "junk.onnx"
    junk.write_text("not a model\n" * 10)
    assert main(["export", "coverage", str(junk)]) == 2
    err = capsys.readouterr().err
    assert "not an ONNX file" in err and err.count("\n") == 1
    assert main(["export", "onnx", "--preset", "no-such-preset", "--out",
                 str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "no-such-preset" in err[-1] and len(err[-1]) < 400
    rc = main(["export", "engine", str(junk), "--out", str(tmp_path / "x.plan")])
    err = capsys.readouterr().err
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert rc == 3 and "pip install 'ditperf[trt]'" in err and err.count("\n") == 1
    plain = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", T.FLOAT, [2])],
        [helper.make_tensor_value_info("y", T.FLOAT, [2])]),
        opset_imports=[helper.make_opsetid("", 18)]), str(plain))
    assert main(["export", "check", str(plain)]) == 2
    assert "no ditperf metadata" in capsys.readouterr().err
    assert main(["export", "surgery", str(plain), str(tmp_path / "o.onnx"),
                 "--plugin-op", "bad spec!"]) == 2
    assert "expected OP" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "onnx", "--preset", "tiny", "--out", "x.onnx", "--batch", "0"])


def test_cli_coverage_exit_codes_and_json(tmp_path, capsys):
    import json

    x = helper.make_tensor_value_info("x", T.FLOAT, [2, 2])
    y = helper.make_tensor_value_info("y", T.FLOAT, None)
    for name, op, rc_want in (("ok", "Relu", 0), ("bad", "Det", 1)):
        p = tmp_path / f"{name}.onnx"
        onnx.save(helper.make_model(helper.make_graph([helper.make_node(op, ["x"], ["y"])],
                                                      "g", [x], [y]),
                                    opset_imports=[helper.make_opsetid("", 18)]), str(p))
        js = tmp_path / f"{name}.json"
        assert main(["export", "coverage", str(p), "--trt-version", "10.1", "--json",
                     str(js)]) == rc_want
        report = json.loads(js.read_text())
        assert report["schema"] == "ditperf.coverage/1"
        assert report["summary"]["fully_supported"] == (rc_want == 0)
    assert "Det" in capsys.readouterr().out


def test_cli_surgery_roundtrip(tmp_path, capsys):
    from test_export_surgery import decomposed_ln_model

    src = tmp_path / "ln.onnx"
    onnx.save(decomposed_ln_model(), str(src))
    dst = tmp_path / "ln_opt.onnx"
    assert main(["export", "surgery", str(src), str(dst), "--passes",
                 "fold-layernorm,cleanup"]) == 0
    out = capsys.readouterr().out
    assert "layernorms_folded=1" in out and "onnx.checker: OK" in out
    assert "onnxruntime check" in out
    assert [n.op_type for n in onnx.load(str(dst)).graph.node] == ["LayerNormalization", "Relu"]


# ---------------------------------------------------------------------------------------
# Metadata, the numeric check's verdict, eps and scale in the translations, onnx_io helpers


@pytest.fixture(scope="module")
def seeded_export(outdir: Path) -> tuple[ExportSpec, Any]:
    """tiny (torch backend, opset 18, static batch 1) with the random weights of a fresh
    non-zero seed; no numeric check at export time (the tests run their own)."""
    spec = ExportSpec(preset="tiny", out=str(outdir / "tiny_seeded.onnx"), backend="torch", opset=18,
                      seed=random.randrange(1, 2**20), check=False)
    return spec, export_onnx(spec, log=lambda _msg: None)


def test_check_rebuilds_the_seeded_weights_and_small_models_stay_inline(
        seeded_export: tuple[ExportSpec, Any]) -> None:
    """The metadata holds the seed of the random weights, so ``ditperf export check`` rebuilds
    exactly the exported model (not seed 0's); a model far below 2 GB is saved inline (no
    ``.data`` file) when external data is left to the size."""
    spec, res = seeded_export
    meta = read_metadata(load_model(res.path, load_external_data=False))
    assert meta["seed"] == str(spec.seed) and meta["preset"] == "tiny" and meta["backend"] == "torch"
    assert (meta["opset"], meta["opset_requested"], meta["batch"], meta["dtype"]) == ("18", "18", "1", "fp32")
    assert res.data_path is None and not Path(res.path + ".data").exists()
    check = check_file(res.path, log=lambda _msg: None)
    assert check["ok"] and check["max_rel"] < 1e-4 and check["ref_max"] > 1e-3, check


def test_check_fails_an_output_off_by_more_than_the_fp32_tolerance(seeded_export: tuple[ExportSpec, Any]) -> None:
    """The check's verdict uses the fp32 tolerance (1e-4 of max|output|), not a looser one:
    a reference whose final projection is scaled by 1 + f (f in [1e-3, 5e-3]) differs by f
    relative everywhere and fails, while the unchanged model passes."""
    spec, res = seeded_export
    meta = read_metadata(load_model(res.path, load_external_data=False))
    model = build_model("tiny", backend="torch", seed=spec.seed)
    assert check_against_torch(res.path, model, meta=meta, seed=spec.seed + 1)["ok"]
    f = random.uniform(1e-3, 5e-3)
    with torch.no_grad():
        model.final_layer.linear.weight.mul_(1 + f)
        model.final_layer.linear.bias.mul_(1 + f)
    check = check_against_torch(res.path, model, meta=meta, seed=spec.seed + 1)
    assert not check["ok"] and check["tolerance_rel"] == 1e-4, check
    assert check["max_rel"] == pytest.approx(f / (1 + f), rel=0.05), check


def test_check_rebuilds_checkpoint_weights(tmp_path: Path) -> None:
    """An export from ``--ckpt`` records the checkpoint path; ``ditperf export check`` loads
    those weights again (random weights of the recorded seed would not match)."""
    from ditperf.model import DiT

    src = DiT("tiny")
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ckpt = tmp_path / "w.pt"
    torch.save(src.state_dict(), ckpt)
    spec = ExportSpec(preset="tiny", out=str(tmp_path / "ck.onnx"), ckpt=str(ckpt), backend="torch", opset=18,
                      check=False)
    res = export_onnx(spec, log=lambda _msg: None)
    assert read_metadata(load_model(res.path, load_external_data=False))["ckpt"] == str(ckpt)
    check = check_file(res.path, log=lambda _msg: None)
    assert check["ok"] and check["max_rel"] < 1e-4, check


class _NormsBlock(torch.nn.Module):
    """The three norms (affine LayerNorm with modulation, gated residual + LayerNorm, RMSNorm
    with a weight), each as its own output."""

    def __init__(self, C: int) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(C))
        self.b = torch.nn.Parameter(torch.randn(C))
        self.rw = torch.nn.Parameter(torch.randn(C))

    def forward(self, x: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                gate: torch.Tensor, K: Any) -> tuple[torch.Tensor, ...]:
        h = K.layer_norm(x, self.w, self.b, shift=shift, scale=scale)
        x2, h2 = K.gated_residual_layer_norm(x, y, gate, shift=shift, scale=scale)
        return h, x2, h2, K.rms_norm(x, self.rw)


@pytest.mark.parametrize("opset", [18, pytest.param(23, marks=needs_ort23)])
def test_norm_translations_keep_eps_on_small_inputs(opset: int) -> None:
    """The norms' eps (1e-6) reaches LayerNormalization / RMSNormalization and sits inside
    the square root of the opset-18 RMS decomposition. On activations of ~1e-3 (variance
    ~1e-6, the size of eps) ONNX's default epsilon 1e-5, or sqrt(ms) + eps, changes the
    output by tens of percent; on unit-scale inputs neither would show."""
    from ditperf.export.translations import translation_table

    B, N, C = 2, 5, 32
    block = _NormsBlock(C)
    small = 10 ** random.uniform(-3.2, -2.8)
    args = (torch.randn(B, N, C) * small, torch.randn(B, N, C) * small, torch.randn(B, C), torch.randn(B, C),
            torch.rand(B, C) + 0.5)
    with torch.no_grad():
        refs = _Bound(block, _Reference())(*args)
    prog = torch.onnx.export(_Bound(block, _Kernels()), args, dynamo=True, opset_version=opset,
                             custom_translation_table=translation_table(opset), verbose=False)
    sess = ort_session(prog.model_proto)
    outs = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args, strict=True)})
    for got, ref in zip(outs, refs, strict=True):
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


class _ScaledAttention(torch.nn.Module):
    """ditperf's attention op with an explicit softmax scale."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.ops.ditperf.attention(q, k, v, mask, self.scale)[0]


@pytest.mark.parametrize("opset", [18, pytest.param(23, marks=needs_ort23)])
def test_attention_translation_keeps_a_non_default_scale(opset: int) -> None:
    """The op's ``scale`` argument reaches the ONNX graph (``Attention``'s ``scale``
    attribute at opset 23, the split sqrt(scale) factors below): a scale far from the
    default 1/sqrt(D) gives the reference's output, not the default-scaled one."""
    import ditperf.kernels as K
    from ditperf.export.translations import translation_table

    B, H, N, Nk, Dh = 2, 2, 5, 6, 16
    scale = random.uniform(0.6, 1.2)  # the default would be 0.25
    q, k, v = torch.randn(B, H, N, Dh), torch.randn(B, H, Nk, Dh), torch.randn(B, H, Nk, Dh)
    mask = torch.rand(B, Nk) < 0.7
    mask[:, 0] = True
    ref = K.attention_ref(q, k, v, key_mask=mask, scale=scale)
    prog = torch.onnx.export(_ScaledAttention(scale), (q, k, v, mask), dynamo=True, opset_version=opset,
                             custom_translation_table=translation_table(opset), verbose=False)
    sess = ort_session(prog.model_proto)
    (out,) = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), (q, k, v, mask), strict=True)})
    np.testing.assert_allclose(out, ref.numpy(), atol=2e-5, rtol=1e-5)


def test_save_model_rewrites_its_external_data(tmp_path: Path) -> None:
    """Saving again over a model with external data replaces ``<name>.data`` (onnx appends
    to an existing file: the data file would grow with every save and hold stale weights)."""
    from ditperf.export.onnx_io import save_model

    rng = np.random.default_rng(random.randrange(2**31))
    x = helper.make_tensor_value_info("x", T.FLOAT, [3, 16])
    y = helper.make_tensor_value_info("y", T.FLOAT, [3, 16])
    p = tmp_path / "m.onnx"
    sizes = []
    for _ in range(2):
        w = rng.standard_normal((16, 16)).astype(np.float32)
        m = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y],
                                                initializer=[numpy_helper.from_array(w, "w")]),
                              opset_imports=[helper.make_opsetid("", 18)])
        save_model(m, p, external_data=True, size_threshold=0)
        sizes.append((tmp_path / "m.onnx.data").stat().st_size)
        feed = rng.standard_normal((3, 16)).astype(np.float32)
        np.testing.assert_allclose(ort_session(p).run(None, {"x": feed})[0], feed @ w, rtol=1e-5, atol=1e-5)
    assert sizes[0] == sizes[1] == 16 * 16 * 4


def test_random_feeds_shapes_ranges_and_masks() -> None:
    """Random check inputs: symbolic dims from ``dims`` (else ``default_dim``), normal floats,
    integers in {0, 1}, and bool masks with at least one True per row (an all-False key mask
    row is the degenerate case, not what a check should feed); 512 rows of 3 would hold a
    blank row ~14 times without the guarantee."""
    from ditperf.export.check import random_feeds

    inputs = [helper.make_tensor_value_info("x", T.FLOAT, ["batch", 64]),
              helper.make_tensor_value_info("mask", T.BOOL, ["batch", 3]),
              helper.make_tensor_value_info("ids", T.INT64, ["batch", "n"])]
    outputs = [helper.make_tensor_value_info(f"o_{i.name}", i.type.tensor_type.elem_type, None) for i in inputs]
    m = helper.make_model(helper.make_graph([helper.make_node("Identity", [i.name], [f"o_{i.name}"]) for i in inputs],
                                            "g", inputs, outputs), opset_imports=[helper.make_opsetid("", 18)])
    feeds = random_feeds(ort_session(m), seed=random.randrange(2**31), dims={"batch": 512}, default_dim=5)
    assert feeds["x"].shape == (512, 64) and feeds["x"].dtype == np.float32
    assert abs(float(feeds["x"].std()) - 1) < 0.05
    assert feeds["mask"].shape == (512, 3) and feeds["mask"].dtype == np.bool_
    assert feeds["mask"].any(axis=-1).all() and not feeds["mask"].all()
    assert feeds["ids"].shape == (512, 5) and set(np.unique(feeds["ids"]).tolist()) == {0, 1}


def test_default_opset_reads_either_name_of_the_default_domain() -> None:
    """The default domain is imported as "" or as "ai.onnx"; other domains' versions (custom
    or com.microsoft ops) are not the model's opset."""
    from ditperf.export.onnx_io import default_opset

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", T.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", T.FLOAT, [2])])
    v = random.choice([17, 18, 20, 23])
    for domain in ("", "ai.onnx"):
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("com.microsoft", 1),
                                                    helper.make_opsetid(domain, v)])
        assert default_opset(m) == v
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("com.microsoft", 1)])
    assert default_opset(m) is None


# ---------------------------------------------------------------------------------------
# TensorRT (GPU machines with the trt extra)


@pytest.mark.gpu
@pytest.mark.trt
def test_engine_build_and_run(tmp_path):
    pytest.importorskip("tensorrt")
    from ditperf.export.engine import build_engine, time_against_torch

    res = export_onnx(ExportSpec(preset="tiny", out=str(tmp_path / "tiny.onnx"), opset=18,
                                 backend="triton", batch=2), log=lambda _m: None)
    eng = build_engine(res.path, tmp_path / "tiny.plan", log=lambda _m: None)
    assert Path(eng.plan).stat().st_size > 0
    timings, err = time_against_torch(res.path, eng.plan, compile_torch=False,
                                      log=lambda _m: None)
    assert err < 1e-2, err  # TF32 allowed in TensorRT's fp32 kernels
    assert set(timings) >= {"tensorrt"}


def test_checkpoint_loading(tmp_path):
    """Plain state_dicts and Composer checkpoints (state.model, 'model.' prefix) load; a
    checkpoint of another preset or a non-checkpoint fails with one line."""
    from ditperf.export.onnx_export import build_model, load_checkpoint
    from ditperf.model import DiT

    src = DiT("tiny")
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    sd = src.state_dict()
    plain, composer = tmp_path / "plain.pt", tmp_path / "composer.pt"
    torch.save(sd, plain)
    torch.save({"state": {"model": {f"model.{k}": v for k, v in sd.items()}}}, composer)
    for path in (plain, composer):
        m = build_model("tiny", ckpt=str(path))
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k]), k
    bad = tmp_path / "other.pt"
    torch.save({k: v for k, v in list(sd.items())[:-3]}, bad)
    with pytest.raises(OnnxInputError, match="missing"):
        load_checkpoint(DiT("tiny"), str(bad))
    junk = tmp_path / "junk.pt"
    junk.write_text("nope")
    with pytest.raises(OnnxInputError, match="cannot read it"):
        load_checkpoint(DiT("tiny"), str(junk))
