"""ditperf.profiling.traffic: per-operator bytes and FLOPs of a model step on the meta device."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from ditperf.cli.main import main
from ditperf.model import flops
from ditperf.profiling import record_traffic, step_traffic
from ditperf.profiling.traffic import ADAMW_BYTES_PER_PARAM, compare_table


def _meta(*shape: int, dtype: torch.dtype = torch.bfloat16, grad: bool = False) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype, requires_grad=grad)


def test_bytes_count_each_tensor_once_views_free_broadcast_stored_inplace_twice() -> None:
    x, y = _meta(64, 48), _meta(1, 48)
    with record_traffic() as led:
        z = x * y  # y broadcast: its 48 stored elements, not 64 * 48
        z.view(48, 64).t()  # views: free
        x.add_(x)  # one distinct input, mutated: read + written
        w = torch.mm(x, _meta(48, 32))
    assert set(led.ops) == {"aten.mul", "aten.add_", "aten.mm"}
    assert led.ops["aten.mul"].bytes == 2 * (64 * 48 + 48 + 64 * 48)
    assert led.ops["aten.add_"].bytes == 2 * (2 * 64 * 48)
    mm = led.ops["aten.mm"]
    assert (mm.kind, mm.flops, mm.bytes) == ("matmul", 2 * 64 * 48 * 32, 2 * (64 * 48 + 48 * 32 + 64 * 32))
    assert w.shape == (64, 32)


def test_sdpa_and_rms_norm_count_as_one_fused_kernel_with_gradients() -> None:
    b, h, n, m, d = 2, 3, 40, 24, 72
    q, k, v = _meta(b, h, n, d, grad=True), _meta(b, h, m, d, grad=True), _meta(b, h, m, d, grad=True)
    x, w = _meta(5, 16, grad=True), _meta(16, grad=True)
    with record_traffic() as led:
        o = F.scaled_dot_product_attention(q, k, v)
        r = F.rms_norm(x, (16,), w)
        (o.float().sum() + r.float().sum()).backward()
    fwd, bwd = led.ops["aten.scaled_dot_product_attention (fused)"], led.ops["aten.scaled_dot_product_attention_bwd (fused)"]
    assert (fwd.kind, fwd.calls, fwd.flops) == ("attention", 1, 4 * b * h * n * m * d)
    assert bwd.flops == 2.5 * fwd.flops
    assert fwd.bytes == 2 * (2 * b * h * n * d + 2 * b * h * m * d) + 4 * b * h * n  # q, o, k, v, lse
    assert led.ops["aten.rms_norm (fused)"].bytes == 2 * (2 * 5 * 16 + 16)
    assert "aten.bmm" not in led.ops and "aten._softmax" not in led.ops  # not decomposed
    assert q.grad is not None and q.grad.shape == q.shape and v.grad.shape == v.shape
    assert w.grad is not None and w.grad.shape == w.shape


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matmul_and_attention_flops_match_the_analytic_count(backend: str) -> None:
    train = step_traffic("dit-xl-2", backend, "train", 8)
    t = train.totals()
    want = flops("dit-xl-2", 8)["train"]
    assert abs(t["matmul"]["flops"] + t["attention"]["flops"] - want) / want < 0.02
    cfg = step_traffic("t2i-1b", backend, "cfg-step", 1, height=32, width=48, text_len=40)
    assert cfg.model_batch == 2 and cfg.tokens == 16 * 24 and cfg.text_len == 40
    want = flops("t2i-1b", 2, 32, 48, 40)["forward"]
    got = cfg.totals()["all"]["flops"]
    assert abs(got - want) / want < 0.02
    opt = next(o for o in train.ops if o.op.startswith("optimizer"))
    assert opt.bytes == train.params * ADAMW_BYTES_PER_PARAM and train.params > 600e6


def test_backends_share_the_matmuls_and_triton_moves_fewer_bytes() -> None:
    torch_, triton = (step_traffic("dit-s-2", b, "train", 4) for b in ("torch", "triton"))
    a, b = torch_.totals(), triton.totals()
    assert a["matmul"] == b["matmul"]
    assert b["memory"]["bytes"] < 0.8 * a["memory"]["bytes"]
    assert b["memory"]["calls"] < a["memory"]["calls"]
    assert any(o.op == "ditperf.gated_residual_layer_norm_bwd" for o in triton.ops)
    assert not any(o.op.startswith("ditperf.") for o in torch_.ops)
    fl = triton.floors_ms(701, 3000)
    assert fl["serial_ms"] == pytest.approx(fl["matmul_ms"] + fl["attention_ms"] + fl["memory_ms"])
    assert 0 < fl["fused_ms"] <= fl["serial_ms"]
    # more bandwidth lowers the memory-bound part only
    fast = triton.floors_ms(701, 6000)
    assert fast["memory_ms"] == pytest.approx(fl["memory_ms"] / 2)


def test_forward_modes_have_no_backward_or_optimizer() -> None:
    s = step_traffic("tiny", "triton", "cfg-step", 3)
    assert s.model_batch == 6
    assert not any(o.op.endswith("_bwd") or o.op.startswith("optimizer") for o in s.ops)
    assert "ditperf.attention" in {o.op for o in s.ops}
    table = compare_table([s], 701, 3000, top=3)
    assert "| tiny B=3 | cfg-step | triton |" in table and "largest memory-bound operators" in table


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        step_traffic("tiny", "torch", "inference", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch must be >= 1"):
        step_traffic("tiny", "torch", "train", 0)
    with pytest.raises(ValueError, match="unknown model preset"):
        step_traffic("dit-q-9", "torch", "train", 1)
    with pytest.raises(ValueError, match="roofs must be positive"):
        step_traffic("tiny", "torch", "forward", 1).floors_ms(0, 3000)


def test_cli_writes_json_and_rejects_bad_input(tmp_path, capsys) -> None:
    out = tmp_path / "t.json"
    assert main(["profile", "traffic", "tiny", "--edit", "--batch", "2", "--top", "2", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["format"] == "ditperf-step-traffic" and [s["backend"] for s in doc["ledgers"]] == ["torch", "triton"]
    led = doc["ledgers"][1]
    assert led["batch"] == 2 and led["floors_ms"]["serial_ms"] > 0 and led["ops"][0]["bytes"] > 0
    assert "per_call" not in led["ops"][0]
    assert "serial floor ms" in capsys.readouterr().out
    assert main(["profile", "traffic", "nope"]) == 2
    assert "unknown model preset" in capsys.readouterr().err
    assert main(["profile", "traffic", "tiny", "--batch", "0"]) == 2
    assert main(["profile", "traffic", "tiny", "--gbps", "-1"]) == 2
    assert main(["profile", "traffic", "tiny", "--json", str(tmp_path / "no" / "t.json")]) == 2
