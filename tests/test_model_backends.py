"""torch vs triton backend of ditperf.model.DiT (kernels under the interpreter on CPU), plus
compile/export friendliness of the forward.

Accuracy idiom: the fp64 torch backend is the reference; the triton backend (fp32) must be
within ``2 * |torch fp32 - ref| + atol`` of it, for the output and every parameter gradient.
"""

from __future__ import annotations

import copy

import pytest
import torch
from ditperf.model import DiT, get_config

CASES = {
    # text + QK-norm (the demo config), padded text, non-square latent
    "text-qknorm": ({}, {"height": 8, "width": 12, "text_len": 5}),
    # class labels + edit channels, no QK-norm; one block (the interpreter is slow)
    "class-edit": ({"conditioning": "class", "num_classes": 10, "edit": True, "qk_norm": False, "depth": 1}, {}),
}


from model_utils import one_thread, randomize  # noqa: F401 - one_thread is an autouse fixture


def run(model: DiT, inputs: tuple[torch.Tensor, ...], probe: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Output and the gradients of sum(out * probe) w.r.t. every parameter that gets one."""
    model.zero_grad(set_to_none=True)
    out = model(*inputs)
    (out * probe.to(out.dtype)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


MIXED = [("triton", "torch"), ("torch", "triton")]  # (norms, attention): per-op backends


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend,attention", [("triton", None), *MIXED],
                         ids=["triton", "triton-norms+sdpa", "torch-norms+triton-attention"])
def test_backends_agree_fwd_and_grads(case: str, backend: str, attention: str | None) -> None:
    overrides, sizes = CASES[case]
    model = randomize(DiT(get_config("tiny", **overrides)))
    inputs = model.example_inputs(2, **sizes)
    probe = torch.randn(2, model.config.latent_channels, *inputs[0].shape[2:])

    ref_model = copy.deepcopy(model).double()
    ref_inputs = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    ref_out, ref_grads = run(ref_model, ref_inputs, probe)
    torch_out, torch_grads = run(model, inputs, probe)
    tri_out, tri_grads = run(model.set_backend(backend, attention=attention), inputs, probe)

    scale = ref_out.abs().max().item()
    assert scale > 0
    assert max_err(tri_out, ref_out) <= 2 * max_err(torch_out, ref_out) + 1e-5 * scale
    assert set(tri_grads) == set(torch_grads) == set(ref_grads)
    for name, g in ref_grads.items():
        atol = 1e-5 * g.abs().max().item() + 1e-7
        assert max_err(tri_grads[name], g) <= 2 * max_err(torch_grads[name], g) + atol, name


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padded_text_is_ignored_and_every_parameter_learns(backend: str) -> None:
    """Padded text tokens (mask False) change neither the output nor any gradient (cross-
    attention key mask and masked mean pool), and every parameter, the QK-RMSNorm weights
    included, gets a non-zero gradient: a path silently skipped on both backends (which the
    agreement test cannot see) shows up here."""
    model = randomize(DiT(get_config("tiny", depth=1)), std=0.2).set_backend(backend)
    x, t, text, _ = model.example_inputs(2, height=8, width=6, text_len=7)
    mask = torch.arange(7)[None] < torch.tensor([[3], [6]])  # 4 and 1 padded tokens
    noisy = torch.where(mask[..., None], text, 50 * torch.randn_like(text))
    probe = torch.randn(2, model.config.latent_channels, 8, 6)
    out, grads = run(model, (x, t, text, mask), probe)
    out_noisy, grads_noisy = run(model, (x, t, noisy, mask), probe)
    torch.testing.assert_close(out_noisy, out, rtol=0, atol=1e-6)
    # all but the null text embedding, which only the dropped (CFG) samples use
    assert set(grads_noisy) == set(grads) == {n for n, _ in model.named_parameters()} - {"text_embedder.null_text"}
    for n, g in grads.items():
        torch.testing.assert_close(grads_noisy[n], g, rtol=1e-5, atol=1e-6, msg=n)
        assert g.abs().max() > 0, f"{n} gets no gradient on the {backend} backend"
    assert any("qk_norm" in n for n in grads)


def test_per_op_backend_switch() -> None:
    """``attention`` follows ``backend`` unless set; the choice shows in repr; bad names refused."""
    model = DiT("tiny", backend="triton", attention_backend="torch")
    assert (model.backend, model.attention_backend) == ("triton", "torch")
    assert "backend=triton, attention=torch" in repr(model)
    model.set_backend("torch")
    assert (model.backend, model.attention_backend) == ("torch", "torch")
    with pytest.raises(ValueError, match="attention must be one of torch, triton, got 'cudnn'"):
        model.set_backend("triton", attention="cudnn")


def test_triton_backend_fresh_model_is_zero() -> None:
    model = DiT(get_config("tiny", depth=1), backend="triton")
    with torch.no_grad():
        out = model(*model.example_inputs(2))
    assert out.shape == (2, 4, 8, 8) and torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("impl", ["REENTRANT", "NO_REENTRANT"])
def test_checkpointed_blocks_give_the_same_grads(impl: str) -> None:
    """Activation checkpointing as Composer's FSDP applies it (``checkpoint_wrapper`` around
    every DiT block; FSDP v1's default is the reentrant kind) changes no gradient, on either
    backend. The triton blocks hand their MLP residual to the next block: as flat tensors,
    since a nested output of a reentrant checkpoint comes back without a gradient path."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )

    model = randomize(DiT(get_config("tiny", depth=2)))
    inputs = model.example_inputs(2)
    probe = torch.randn(2, model.config.latent_channels, *inputs[0].shape[2:])
    for backend in ("torch", "triton"):
        plain = copy.deepcopy(model).set_backend(backend)
        wrapped = copy.deepcopy(plain)
        wrapped.blocks = torch.nn.ModuleList(
            checkpoint_wrapper(b, checkpoint_impl=getattr(CheckpointImpl, impl)) for b in wrapped.blocks)
        out, grads = run(plain, inputs, probe)
        out_ckpt, grads_ckpt = run(wrapped, inputs, probe)
        torch.testing.assert_close(out_ckpt, out, rtol=0, atol=0)
        names = {n.replace("._checkpoint_wrapped_module", "") for n in grads_ckpt}
        assert names == set(grads), set(grads) ^ names
        for n, g in grads_ckpt.items():
            torch.testing.assert_close(g, grads[n.replace("._checkpoint_wrapped_module", "")], rtol=1e-6, atol=1e-7,
                                       msg=f"{backend} {n}")


def test_forward_compiles_fullgraph_and_exports() -> None:
    """No graph breaks (no data-dependent control flow, no .item()) and torch.export works
    with the positional example inputs, as ONNX export (dynamo) needs."""
    model = randomize(DiT("tiny")).eval()
    inputs = model.example_inputs(2)
    with torch.no_grad():
        eager = model(*inputs)
        compiled = torch.compile(model, fullgraph=True, backend="eager")(*inputs)
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
        exported = torch.export.export(model, inputs, dynamic_shapes=model.dynamic_shapes())
        torch.testing.assert_close(exported.module()(*inputs), eager, rtol=1e-5, atol=1e-5)
        other = model.example_inputs(3, text_len=5)  # another batch and text length
        torch.testing.assert_close(exported.module()(*other), model(*other), rtol=1e-5, atol=1e-5)
    assert [s.arg.name for s in exported.graph_signature.input_specs if s.kind.name == "USER_INPUT"] == [
        "x", "t", "cond", "cond_mask"]
    assert model.input_names == ("x", "t", "text", "text_mask")


# ----------------------------------------------------------------------------- GPU


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("name,overrides", [
    ("dit-s-2", {}),
    ("t2i-1b", {"depth": 2, "hidden_size": 384, "num_heads": 6, "latent_size": (32, 48), "text_len": 77}),
])
@pytest.mark.parametrize("attention", [None, "torch"], ids=["triton", "triton-norms+sdpa"])
def test_backends_agree_bf16_autocast_cuda(name: str, overrides: dict, attention: str | None) -> None:
    """bf16 autocast on CUDA: triton error vs the fp32 torch reference at most ~2x the
    error of torch under the same autocast (output and relative L2 of every gradient)."""
    dev = torch.device("cuda")
    model = randomize(DiT(get_config(name, **overrides)).to(dev), std=0.02)
    inputs = model.example_inputs(4, device=dev)
    probe = torch.randn(4, model.config.latent_channels, *inputs[0].shape[2:], device=dev)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        ref_out, ref_grads = run(model, inputs, probe)  # fp32, no TF32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    with torch.autocast("cuda", dtype=torch.bfloat16):
        torch_out, torch_grads = run(model, inputs, probe)
        tri_out, tri_grads = run(model.set_backend("triton", attention=attention), inputs, probe)
    scale = ref_out.abs().max().item()
    assert max_err(tri_out, ref_out) <= 2 * max_err(torch_out, ref_out) + 1e-2 * scale
    assert set(tri_grads) == set(ref_grads)
    for n, g in ref_grads.items():
        assert _rel_l2(tri_grads[n], g) <= 2 * _rel_l2(torch_grads[n], g) + 1e-2, n


def test_cuda_graph_step_refuses_cpu_tensors() -> None:
    from ditperf.model import cuda_graph_step, make_step

    model = DiT("tiny")
    _, _, text, mask = model.example_inputs(1)
    step = cuda_graph_step(make_step(model, (text, mask)))
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        step(torch.randn(1, 4, 8, 8), torch.tensor(0.5), torch.tensor(0.25))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_graph_step_matches_eager_sampling(backend: str) -> None:
    """A CFG step captured as one CUDA graph (both backends: the Triton kernels autotune in
    the warm-up, outside the capture) gives the eager step's result; a shape change is refused."""
    from ditperf.model import cuda_graph_step, make_step, sample

    dev = torch.device("cuda")
    model = randomize(DiT(get_config("tiny", latent_size=(16, 24))).to(dev), std=0.1).set_backend(backend)
    _, _, text, mask = model.example_inputs(2, device=dev)
    noise = torch.randn(2, 4, 16, 24, device=dev)
    plain = sample(model, text=text, text_mask=mask, steps=4, noise=noise)
    graphed = sample(model, text=text, text_mask=mask, steps=4, noise=noise, step_fn=cuda_graph_step)
    torch.testing.assert_close(graphed, plain, rtol=1e-5, atol=1e-5)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # as the demo samples: no autocast cache in the graph
        plain = sample(model, text=text, text_mask=mask, steps=4, noise=noise)
        graphed = sample(model, text=text, text_mask=mask, steps=4, noise=noise, step_fn=cuda_graph_step)
    torch.cuda.empty_cache()
    torch.testing.assert_close(graphed, plain, rtol=2e-2, atol=2e-2)
    step = cuda_graph_step(make_step(model, (text, mask)))
    with torch.no_grad():
        step(noise, torch.tensor(0.5, device=dev), torch.tensor(0.25, device=dev))
        with pytest.raises(ValueError, match="make a new wrapper"):
            step(noise[:, :, :8], torch.tensor(0.5, device=dev), torch.tensor(0.25, device=dev))
