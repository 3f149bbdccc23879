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
    with pytest.raises(ValueError, match="height must be >= 1"):
        step_traffic("tiny", "torch", "train", 1, height=0)
    with pytest.raises(ValueError, match="roofs must be positive and finite"):
        step_traffic("tiny", "torch", "forward", 1).floors_ms(701, float("inf"))
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
    for bad in (["--batch", "0"], ["--gbps", "-1"], ["--tflops", "nan"], ["--height", "0"], ["--text-len", "x"]):
        with pytest.raises(SystemExit):
            main(["profile", "traffic", "tiny", *bad])
    assert "expected a whole number >= 1" in capsys.readouterr().err
    assert main(["profile", "traffic", "dit-s-2", "--text-len", "5"]) == 2
    assert "text_len is for text presets" in capsys.readouterr().err
    assert main(["profile", "traffic", "tiny", "--json", str(tmp_path / "no" / "t.json")]) == 2


def test_sdpa_backward_and_mask_bytes() -> None:
    """The fused SDPA backward reads q, k, v, the output and its gradient (and the saved
    log-sum-exp), writes dq, dk, dv; a mask is read by both passes at its stored size."""
    import random

    b, h, n, m, d = (random.randint(1, 4), random.randint(1, 4), random.randint(8, 64), random.randint(8, 64),
                     random.choice([32, 64, 72]))
    q, k, v = _meta(b, h, n, d, grad=True), _meta(b, h, m, d, grad=True), _meta(b, h, m, d, grad=True)
    mask = torch.empty(b, 1, n, m, device="meta", dtype=torch.bool)
    qo, kv, lse = b * h * n * d, b * h * m * d, 4 * b * h * n
    for kwargs, masked in (({}, 0), ({"attn_mask": mask}, b * n * m)):
        with record_traffic() as led:
            F.scaled_dot_product_attention(q, k, v, **kwargs).backward(_meta(b, h, n, d))
        fwd = led.ops["aten.scaled_dot_product_attention (fused)"]
        bwd = led.ops["aten.scaled_dot_product_attention_bwd (fused)"]
        assert fwd.bytes == 2 * (2 * qo + 2 * kv) + masked + lse  # q, o, k, v (+ mask), lse
        assert bwd.bytes == 2 * (3 * qo + 2 * kv) + masked + 2 * (qo + 2 * kv) + lse  # and do; dq, dk, dv
    with record_traffic() as led:
        F.scaled_dot_product_attention(q, k, v, mask.expand(b, h, n, m))  # positional, broadcast over heads
    assert led.ops["aten.scaled_dot_product_attention (fused)"].bytes == 2 * (2 * qo + 2 * kv) + lse + b * n * m
    x, w = _meta(5, 16, grad=True), _meta(16, grad=True)
    with record_traffic() as led:
        F.rms_norm(x, (16,), w).backward(_meta(5, 16))
    assert led.ops["aten.rms_norm_bwd (fused)"].bytes == 2 * (3 * 5 * 16 + 2 * 16)  # x, w, dy; dx, dw


def test_floors_sum_each_calls_roofline_time() -> None:
    """Serial floor: each matmul call at max(FLOPs / T, bytes / W) (a skinny matmul is
    memory-bound, a square one compute-bound: not max over their sums); fused floor: the
    step's FLOPs or bytes, whichever takes longer."""
    import random

    from ditperf.profiling.traffic import StepTraffic

    big, skinny = random.randint(512, 1024), random.randint(2, 8)  # AI ~big / 3 and ~skinny
    h, n, d = 16, random.randint(4096, 8192), 64  # attention: compute-bound, most of the FLOPs
    with record_traffic() as led:
        _meta(big, big) * _meta(big, big)
        torch.mm(_meta(big, big), _meta(big, big))
        torch.mm(_meta(skinny, 8192), _meta(8192, 8192))
        F.scaled_dot_product_attention(_meta(1, h, n, d), _meta(1, h, n, d), _meta(1, h, n, d))
    s = StepTraffic("x", "torch", "forward", 1, 1, 0, 0, "bfloat16", 0, list(led.ops.values()))
    tflops, gbps = random.uniform(100, 300), random.uniform(2000, 4000)  # ridge 25..150 FLOP/B
    T, W = tflops * 1e12, gbps * 1e9
    calls = [(2 * big**3, 2 * 3 * big * big), (2 * skinny * 8192 * 8192, 2 * (2 * skinny * 8192 + 8192 * 8192))]
    assert calls[0][0] / T > calls[0][1] / W and calls[1][0] / T < calls[1][1] / W  # one of each
    attn = (4 * h * n * n * d, 2 * 4 * h * n * d + 4 * h * n)
    fl = s.floors_ms(tflops, gbps)
    assert fl["matmul_ms"] == pytest.approx(1e3 * sum(max(f / T, b / W) for f, b in calls))
    assert fl["attention_ms"] == pytest.approx(1e3 * attn[0] / T)
    assert fl["memory_ms"] == pytest.approx(1e3 * 2 * 3 * big * big / W)
    flops_all = sum(f for f, _ in calls) + attn[0]
    bytes_all = sum(b for _, b in calls) + attn[1] + 2 * 3 * big * big
    assert flops_all / T > bytes_all / W  # the step's FLOPs (attention's included) set the fused floor
    assert fl["fused_ms"] == pytest.approx(1e3 * flops_all / T)
    doc = s.to_dict(tflops, gbps)
    assert [o["bytes"] for o in doc["ops"]] == sorted((o.bytes for o in s.ops), reverse=True)
    assert doc["floors_ms"] == fl and doc["roofs"] == {"tflops": tflops, "gbps": gbps}


def test_train_step_counts_adamw_and_the_attention_backward() -> None:
    """AdamW with fp32 states: 16 bytes read (param, grad, two moments) and 12 written per
    parameter; ditperf's attention backward costs 2.5x its forward FLOPs."""
    assert ADAMW_BYTES_PER_PARAM == 28
    s = step_traffic("tiny", "triton", "train", 2)
    (opt,) = [o for o in s.ops if o.op.startswith("optimizer")]
    assert (opt.calls, opt.flops, opt.bytes) == (1, 0.0, 28 * s.params)
    ops = {o.op: o for o in s.ops}
    assert ops["ditperf.attention_bwd"].calls == ops["ditperf.attention"].calls > 0
    assert ops["ditperf.attention_bwd"].flops == pytest.approx(2.5 * ops["ditperf.attention"].flops)


def test_attention_ops_read_q_and_k_by_schema_position_and_sdpa_by_keyword() -> None:
    """The FLOPs of ``ditperf::attention_bwd`` come from its q and k (schema positions 2 and
    3) whether or not the optional grad_lse is given; SDPA called with keywords is recorded
    like a positional call."""
    import ditperf.kernels  # noqa: F401 - registers the ditperf ops

    b, h, n, m, d = 1, 2, 64, 16, 32
    q, k, v = _meta(b, h, n, d), _meta(b, h, m, d), _meta(b, h, m, d)
    out, lse = _meta(b, h, n, d), _meta(b, h, n, dtype=torch.float32)
    for grad_lse in (None, _meta(b, h, n, dtype=torch.float32)):
        with record_traffic() as led:
            torch.ops.ditperf.attention_bwd(_meta(b, h, n, d), grad_lse, q, k, v, out, lse, None, d**-0.5)
        assert led.ops["ditperf.attention_bwd"].flops == 2.5 * 4 * b * h * n * m * d
    with record_traffic() as led:
        F.scaled_dot_product_attention(query=q, key=k, value=v)
    assert led.ops["aten.scaled_dot_product_attention (fused)"].flops == 4 * b * h * n * m * d


def test_inputs_are_never_allocated_at_the_full_batch(monkeypatch) -> None:
    """Shapes only: the example inputs are made for one sample and the batch exists only on
    the meta device (a t2i-1b ledger at batch 256 must not allocate gigabytes on the CPU)."""
    from ditperf.model import DiT

    sizes: list[int] = []
    real = DiT.example_inputs

    def spy(self, batch, *args, **kwargs):
        sizes.append(batch)
        return real(self, batch, *args, **kwargs)

    monkeypatch.setattr(DiT, "example_inputs", spy)
    s = step_traffic("t2i-1b", "triton", "cfg-step", 128)
    assert sizes == [1] and s.model_batch == 256
    assert s.totals()["matmul"]["flops"] > 128 * 2 * 5e12  # the ledger still counts the full batch
