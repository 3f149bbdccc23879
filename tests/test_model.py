"""ditperf.model on the torch backend (CPU): structure, presets, FLOPs, loss, sampler, edits,
bad input. Backend agreement (triton kernels) is in test_model_backends.py."""

from __future__ import annotations

import math

import pytest
import torch
from ditperf.model import (
    EDIT_TASKS,
    PRESETS,
    DiT,
    edit_model_input,
    flops,
    flow_matching_loss,
    get_config,
    logit_normal_timesteps,
    make_edit_batch,
    make_edit_mask,
    make_step,
    patchify,
    sample,
    sincos_2d,
    time_grid,
    unpatchify,
)
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

TINY_CLASS = {"conditioning": "class", "num_classes": 10}


from model_utils import one_thread, randomize  # noqa: F401 - one_thread is an autouse fixture


def text_batch(model: DiT, b: int = 4) -> dict[str, torch.Tensor]:
    x, _, *cond = model.example_inputs(b)
    c = model.config.latent_channels
    batch = {"latents": x[:, :c]}
    if model.config.conditioning == "class":
        batch["labels"] = cond[0]
    else:
        batch["text"], batch["text_mask"] = cond
    return batch


# ----------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name,millions", [("dit-s-2", 33), ("dit-b-2", 130), ("dit-l-2", 458), ("dit-xl-2", 675)])
def test_dit_paper_param_counts(name: str, millions: int) -> None:
    with torch.device("meta"):
        model = DiT(name)
    assert round(model.num_params() / 1e6) == millions
    cfg = model.config
    assert cfg.conditioning == "class" and cfg.num_classes == 1000 and cfg.latent_size == (32, 32)
    assert cfg.latent_channels == 4 and cfg.patch_size == 2 and cfg.num_tokens() == 256


def test_t2i_1b_is_about_1b_with_4096_tokens() -> None:
    with torch.device("meta"):
        model = DiT("t2i-1b")
    assert 0.95e9 < model.num_params() < 1.1e9
    cfg = model.config
    assert cfg.latent_channels == 16 and cfg.latent_size == (128, 128) and cfg.num_tokens() == 4096
    assert cfg.conditioning == "text" and cfg.head_dim % 8 == 0 and cfg.head_dim >= 32


def test_tiny_preset_fits_kernels() -> None:
    cfg = PRESETS["tiny"]
    assert cfg.conditioning == "text" and cfg.head_dim % 8 == 0 and cfg.head_dim >= 32
    assert DiT(cfg).num_params() < 1_000_000


def test_get_config_overrides_and_errors() -> None:
    cfg = get_config("tiny", edit=True, latent_size=16)
    assert cfg.in_channels == 9 and cfg.latent_size == (16, 16)
    with pytest.raises(ValueError, match="unknown model preset 'nope'.*dit-xl-2.*tiny"):
        get_config("nope")
    with pytest.raises(ValueError, match="unknown DiTConfig field.*hidden"):
        get_config("tiny", hiden_size=3)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        get_config("tiny", num_heads=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        DiT("dit-xxl-2")


CONFIG_ERRORS = [
    ({"depth": 0}, "depth must be >= 1, got 0"),
    ({"latent_channels": 0}, "latent_channels must be >= 1"),
    ({"hidden_size": 66}, "hidden_size 66 must be a multiple of 4"),
    ({"latent_size": 7}, r"latent_size \(7, 7\) must be \(H, W\), both multiples of patch_size 2"),
    ({"latent_size": (8, 8, 8)}, r"latent_size \(8, 8, 8\) must be \(H, W\)"),
    ({"eps": 0.0}, "eps must be > 0, got 0.0"),
    ({"conditioning": "Text"}, "conditioning must be 'class' or 'text', got 'Text'"),
    ({"conditioning": "class", "num_classes": 0}, "num_classes must be >= 1, got 0"),
    ({"text_len": 0}, "text_dim and text_len must be >= 1"),
    ({"sample_shift": 0.0}, "sample_shift must be > 0, got 0.0"),
]


@pytest.mark.parametrize("overrides,match", CONFIG_ERRORS,
                         ids=[",".join(f"{k}={v}" for k, v in o.items()) for o, _ in CONFIG_ERRORS])
def test_config_validation(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=f"DiTConfig 'tiny': {match}"):
        get_config("tiny", **overrides)


def test_get_config_from_a_config_and_latent_size_forms() -> None:
    """A DiTConfig is the base for further overrides (not the preset of its name); latent_size
    may be an int or any sequence of int-likes and is stored as a tuple of Python ints."""
    cfg = get_config("tiny", depth=3)
    assert get_config(cfg) is cfg
    derived = get_config(cfg, edit=True)
    assert derived.depth == 3 and derived.edit and derived.name == "tiny"
    for size in ([16, 12], (torch.tensor(16), 12)):
        got = get_config("tiny", latent_size=size).latent_size
        assert got == (16, 12) and all(type(s) is int for s in got), got


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize("overrides", [{}, TINY_CLASS, {"edit": True}, {**TINY_CLASS, "edit": True}])
def test_fresh_model_outputs_exact_zero(overrides: dict) -> None:
    model = DiT(get_config("tiny", **overrides))
    inputs = model.example_inputs(3, height=8, width=12)
    out = model(*inputs)
    assert out.shape == (3, 4, 8, 12)
    assert torch.equal(out, torch.zeros_like(out))
    assert len(inputs) == len(model.input_names)


def test_blocks_start_as_identity() -> None:
    model = DiT("tiny")
    x = torch.randn(2, 16, 64)
    c = torch.randn(2, 64)
    text = torch.randn(2, 8, 64)
    mask = torch.ones(2, 8, dtype=torch.bool)
    for block in model.blocks:
        assert torch.equal(block(x, c, text, mask), x)


@pytest.mark.parametrize("overrides", [{}, TINY_CLASS])
def test_adaln_zero_init(overrides: dict) -> None:
    """adaLN-Zero: every block's and the final layer's modulation Linear starts at exactly
    zero (weight and bias). The zero-output test cannot see the final layer's modulation
    (the final linear is zero too), so also check the consequence: with only the final
    linear made non-zero, a fresh model ignores t and the conditioning (all blocks are the
    identity and the final LayerNorm is unmodulated)."""
    model = DiT(get_config("tiny", **overrides))
    mods = [blk.adaLN_modulation[-1] for blk in model.blocks] + [model.final_layer.adaLN_modulation[-1]]
    assert len(mods) == model.config.depth + 1
    for lin in mods:
        assert isinstance(lin, torch.nn.Linear)
        assert torch.equal(lin.weight, torch.zeros_like(lin.weight))
        assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
    with torch.no_grad():
        model.final_layer.linear.weight.normal_(std=0.5)
        model.final_layer.linear.bias.normal_(std=0.5)
    x, t, *cond = model.example_inputs(2, height=8, width=12)
    _, _, *other = model.example_inputs(2, height=8, width=12)
    with torch.no_grad():
        out = model(x, t, *cond)
        tokens = model.x_embedder(x) + sincos_2d(64, 4, 6)[None]
        ref = unpatchify(model.final_layer.linear(torch.nn.functional.layer_norm(tokens, (64,), eps=1e-6)),
                         2, 4, 8, 12)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert out.abs().amax() > 0.1
        torch.testing.assert_close(model(x, 1 - t, *other), out, rtol=1e-5, atol=1e-5)


def test_forward_adds_row_major_pos_embed_non_square() -> None:
    """The position embedding added to the patch tokens of a non-square latent (8 x 12,
    patch 2: a 4 x 6 grid) is ``sincos_2d(hidden, H/p, W/p)``, rows first; the transposed
    6 x 4 grid has the same token count, so only the values tell them apart."""
    model = randomize(DiT("tiny"))
    x, t, text, mask = model.example_inputs(2, height=8, width=12)
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.x_embedder.register_forward_hook(lambda m, a, out: seen.update(patches=out)),
             model.blocks[0].register_forward_pre_hook(lambda m, a: seen.update(tokens=a[0]))]
    try:
        with torch.no_grad():
            model(x, t, text, mask)
    finally:
        for h in hooks:
            h.remove()
    added = seen["tokens"] - seen["patches"]
    assert added.shape == (2, 24, 64)
    torch.testing.assert_close(added, sincos_2d(64, 4, 6)[None].expand_as(added), rtol=0, atol=1e-5)
    assert not torch.allclose(sincos_2d(64, 4, 6), sincos_2d(64, 6, 4), atol=1e-2)


def test_timestep_embedding_of_1000_t() -> None:
    """The timestep embedder is its MLP on the sinusoidal features [cos, sin] of 1000 * t
    (DiT's 0..999 scale, max period 10^4), recomputed here independently; on that scale
    nearby times (0.3 vs 0.301) get clearly different embeddings."""
    model = randomize(DiT("tiny"))
    emb = model.t_embedder
    t = torch.rand(5)
    half = emb.freq_dim // 2
    freqs = torch.tensor([math.exp(-math.log(10000.0) * k / half) for k in range(half)])
    args = 1000.0 * t[:, None].double() * freqs[None].double()
    feats = torch.cat([torch.cos(args), torch.sin(args)], dim=1).float()
    with torch.no_grad():
        torch.testing.assert_close(emb(t), emb.mlp(feats), rtol=1e-4, atol=1e-5)
        a, b = emb(torch.tensor([0.3])), emb(torch.tensor([0.301]))
    assert (a - b).norm() > 0.05 * a.norm()


def test_patchify_unpatchify_round_trip() -> None:
    x = torch.randn(2, 3, 6, 10)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 15, 12)
    assert torch.equal(unpatchify(tokens, 2, 3, 6, 10), x)
    # token 1 is the patch at row 0, column 1, features ordered (p, q, c)
    assert torch.equal(tokens[0, 1], x[0, :, 0:2, 2:4].permute(1, 2, 0).reshape(-1))


def test_patch_embedding_is_linear_on_patches() -> None:
    model = DiT("tiny")
    x = torch.randn(2, 4, 8, 12)
    w = model.x_embedder.proj.weight  # (hidden, C, p, p) -> (hidden, p*p*C) in (p, q, c) order
    ref = patchify(x, 2) @ w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).T + model.x_embedder.proj.bias
    torch.testing.assert_close(model.x_embedder(x), ref, rtol=1e-5, atol=1e-5)


def test_pos_embed_any_size_cached() -> None:
    model = DiT("tiny")
    pe = model.pos_embed(3, 5, torch.device("cpu"))
    assert pe.shape == (1, 15, 64)
    assert model.pos_embed(3, 5, torch.device("cpu")) is pe  # cached per size
    assert not torch.equal(sincos_2d(64, 3, 5), sincos_2d(64, 5, 3)[:15])
    # row-major: token (r, c) = r * W + c; first half encodes the row
    e = sincos_2d(64, 3, 5)
    assert torch.equal(e[1, :32], e[0, :32]) and not torch.equal(e[5, :32], e[0, :32])
    assert "pos" not in " ".join(model.state_dict())


def test_backend_switch_keeps_state_dict() -> None:
    model = DiT("tiny")
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.set_backend("triton") is model and model.backend == "triton"
    assert set(model.state_dict()) == set(keys)
    assert all(torch.equal(v, keys[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="torch, triton"):
        model.set_backend("cuda")


# ----------------------------------------------------------------------------- flops


@pytest.mark.parametrize("name,overrides,size,text_len", [
    ("tiny", {}, (8, 8), None),
    ("tiny", {**TINY_CLASS, "edit": True}, (8, 12), None),
    ("tiny", {"qk_norm": False}, (12, 8), 5),
    ("dit-s-2", {"depth": 2}, (16, 16), None),
    ("t2i-1b", {"depth": 1, "hidden_size": 128, "num_heads": 2, "text_dim": 64}, (16, 24), 24),
])
def test_flops_match_flop_counter(name: str, overrides: dict, size: tuple[int, int], text_len: int | None) -> None:
    cfg = get_config(name, **overrides)
    model = DiT(cfg)
    inputs = model.example_inputs(2, height=size[0], width=size[1], text_len=text_len)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*inputs)
    analytic = flops(cfg, 2, height=size[0], width=size[1], text_len=text_len)
    assert abs(analytic["forward"] / counter.get_total_flops() - 1) < 0.02
    assert analytic["train"] == 3 * analytic["forward"]


def test_flops_defaults_and_errors() -> None:
    f = flops("dit-xl-2", 1)
    # the DiT paper's 118.6 "Gflops" for XL/2 count multiply-adds (fvcore): x2 here
    assert f["tokens"] == 256 and f["forward"] == pytest.approx(2 * 118.6e9, rel=0.01)
    assert flops("t2i-1b", 2)["forward"] == 2 * flops("t2i-1b", 1)["forward"]
    with pytest.raises(ValueError, match="not divisible by the patch size 2"):
        flops("tiny", 1, height=7)


# ----------------------------------------------------------------------------- loss


def test_loss_is_deterministic_given_generator() -> None:
    model = randomize(DiT(get_config("tiny", edit=True)))
    batch = text_batch(model)

    def loss(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return flow_matching_loss(model, batch, generator=g, cond_dropout=0.5)

    assert torch.equal(loss(7), loss(7))
    assert not torch.equal(loss(7), loss(8))


def test_full_cond_dropout_uses_null_conditioning() -> None:
    model = randomize(DiT("tiny"))
    batch = text_batch(model, 3)
    dropped = flow_matching_loss(model, batch, generator=torch.Generator().manual_seed(1), cond_dropout=1.0)
    null_text, null_mask = model.null_cond(3, batch["text"].shape[1])
    manual = flow_matching_loss(model, {**batch, "text": null_text, "text_mask": null_mask},
                                generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(dropped, manual)
    dropped.backward()
    assert model.text_embedder.null_text.grad.abs().sum() > 0


def test_null_cond_other_lengths_and_class() -> None:
    model = DiT("tiny")
    text, mask = model.null_cond(2, 12)
    assert text.shape == (2, 12, 32) and mask[:, :8].all() and not mask[:, 8:].any()
    text, mask = model.null_cond(2, 5)
    assert torch.equal(text[0], model.text_embedder.null_text[:5].detach()) and mask.all()
    (labels,) = DiT(get_config("tiny", **TINY_CLASS)).null_cond(3)
    assert labels.tolist() == [10, 10, 10]


def test_forward_drop_swaps_in_null_conditioning_per_sample() -> None:
    """``forward(..., drop=)`` (the FSDP-safe CFG dropout: it reads the null embedding inside
    forward) equals passing the null conditioning by hand, per sample; bad ``drop`` is a
    clear error."""
    for model in (randomize(DiT("tiny")), randomize(DiT(get_config("tiny", **TINY_CLASS)))):
        x, t, *cond = model.example_inputs(3)
        drop = torch.tensor([True, False, True])
        null = model.null_cond(3, *((cond[0].shape[1],) if len(cond) == 2 else ()))
        manual = tuple(torch.where(drop.view(-1, *[1] * (c.dim() - 1)), u.to(c.dtype), c) for c, u in zip(cond, null))
        torch.testing.assert_close(model(x, t, *cond, drop=drop), model(x, t, *manual))
        with pytest.raises(ValueError, match=r"drop must be a bool tensor of shape \(3,\)"):
            model(x, t, *cond, drop=torch.ones(3))


def test_logit_normal_timesteps_moments(seed: int) -> None:
    """t = sigmoid(mean + std * n): logit(t) has the requested mean and std (a large seeded
    sample: standard errors 0.0016 and 0.0011, tolerances 0.01), and t lies in (0, 1)."""
    t = logit_normal_timesteps(100_000, generator=torch.Generator().manual_seed(seed), mean=1.0, std=0.5)
    assert t.shape == (100_000,) and t.dtype == torch.float32
    assert (t > 0).all() and (t < 1).all()
    z = torch.logit(t.double())
    assert z.mean().item() == pytest.approx(1.0, abs=0.01)
    assert z.std().item() == pytest.approx(0.5, abs=0.01)


def test_edit_region_only_loss_ignores_kept_region() -> None:
    model = randomize(DiT(get_config("tiny", edit=True)))
    batch = text_batch(model, 2)
    batch.update(make_edit_batch(batch["latents"], "expand", torch.Generator().manual_seed(0)))
    g = lambda: torch.Generator().manual_seed(3)
    base = flow_matching_loss(model, batch, generator=g(), edit_region_only=True)
    # Replay the loss's draws (t, eps) and compute the masked MSE by hand.
    t = torch.sigmoid(torch.randn(2, generator=g()))
    gen = g()
    torch.randn(2, generator=gen)
    eps = torch.randn(batch["latents"].shape, generator=gen)
    x0 = batch["latents"]
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    pred = model(edit_model_input(x_t, batch["edit_source"], batch["edit_mask"]), t, batch["text"], batch["text_mask"])
    m = batch["edit_mask"]
    manual = (((pred - (eps - x0)) ** 2) * m).sum() / (m.sum() * 4)
    torch.testing.assert_close(base, manual)
    with pytest.raises(ValueError, match="edit_region_only needs an edit config"):
        flow_matching_loss(DiT("tiny"), text_batch(DiT("tiny")), edit_region_only=True)


def test_overfit_tiny_30_steps_lowers_loss() -> None:
    model = DiT(get_config("tiny", **TINY_CLASS))
    batch = text_batch(model, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(30):
        loss = flow_matching_loss(model, batch, generator=torch.Generator().manual_seed(0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.4 * losses[0], losses


# ----------------------------------------------------------------------------- sampler


def test_time_grid_shift() -> None:
    grid = time_grid(4, 3.0)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and grid.shape == (5,)
    assert (grid[:-1] > grid[1:]).all()
    assert grid[2] == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))
    torch.testing.assert_close(time_grid(4, 1.0), torch.linspace(1, 0, 5))


@pytest.mark.parametrize("overrides", [{}, TINY_CLASS])
def test_sample_shapes_and_determinism(overrides: dict) -> None:
    model = randomize(DiT(get_config("tiny", **overrides)))
    _, _, *cond = model.example_inputs(2)
    out = sample(model, tuple(cond), steps=3, cfg_scale=2.0, generator=torch.Generator().manual_seed(0),
                 height=8, width=12)
    assert out.shape == (2, 4, 8, 12) and out.dtype == torch.float32 and torch.isfinite(out).all()
    again = sample(model, tuple(cond), steps=3, cfg_scale=2.0, generator=torch.Generator().manual_seed(0),
                   height=8, width=12)
    assert torch.equal(out, again)


def test_cfg_step_combines_cond_and_uncond() -> None:
    model = randomize(DiT("tiny")).eval()
    x, _, text, mask = model.example_inputs(2)
    t, t_next = torch.tensor(0.8), torch.tensor(0.5)
    with torch.no_grad():
        got = make_step(model, (text, mask), cfg_scale=3.0)(x, t, t_next)
        v_c = model(x, t, text, mask)
        v_u = model(x, t, *model.null_cond(2, text.shape[1]))
    torch.testing.assert_close(got, x + (t_next - t) * (v_u + 3.0 * (v_c - v_u)), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        plain = make_step(model, (text, mask), cfg_scale=1.0)(x, t, t_next)
    torch.testing.assert_close(plain, x - 0.3 * v_c, rtol=1e-5, atol=1e-5)


def test_cfg_step_compiles_once_fullgraph() -> None:
    """The CFG step is one ``torch.compile(fullgraph=True)`` graph (no graph breaks, no host
    syncs) that new timesteps reuse without recompiling (the static-shape serving path)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = randomize(DiT("tiny")).eval()
    x, _, text, mask = model.example_inputs(2)
    step = make_step(model, (text, mask), cfg_scale=4.0)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    with torch.no_grad():
        for t, t_next in ((0.9, 0.6), (0.6, 0.3), (0.3, 0.0)):
            t, t_next = torch.tensor(t), torch.tensor(t_next)
            torch.testing.assert_close(compiled(x, t, t_next), step(x, t, t_next), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


@pytest.mark.parametrize("overrides", [{}, TINY_CLASS])
def test_cfg_step_with_explicit_null_cond(overrides: dict) -> None:
    """``make_step(null_cond=<the model's null conditioning>)`` (conditional half first,
    null half second) equals the default CFG step, which swaps the null conditioning in
    inside forward; cfg_scale 3 makes the order of the halves matter."""
    model = randomize(DiT(get_config("tiny", **overrides))).eval()
    x, _, *cond = model.example_inputs(2)
    null = model.null_cond(2, *((cond[0].shape[1],) if len(cond) == 2 else ()))
    t, t_next = torch.tensor(0.8), torch.tensor(0.5)
    with torch.no_grad():
        default = make_step(model, tuple(cond), cfg_scale=3.0)(x, t, t_next)
        explicit = make_step(model, tuple(cond), cfg_scale=3.0, null_cond=null)(x, t, t_next)
        v_c, v_u = model(x, t, *cond), model(x, t, *null)
    torch.testing.assert_close(explicit, default, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(v_c, v_u, atol=1e-3)  # the halves differ: a swap would show


def _edit_euler_reference(model: DiT, cond: tuple[torch.Tensor, ...], noise: torch.Tensor, source: torch.Tensor,
                          mask: torch.Tensor, grid: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Euler CFG sampling of an edit written out: the model sees the masked source, and
    after each step the kept region is reset to the source re-noised at t_next."""
    null = model.null_cond(noise.shape[0], *((cond[0].shape[1],) if len(cond) == 2 else ()))
    keep = mask < 0.5
    x = noise
    for i in range(len(grid) - 1):
        t, t_next = grid[i], grid[i + 1]
        inp = edit_model_input(x, source, mask)
        v_c, v_u = model(inp, t, *cond), model(inp, t, *null)
        x = x + (t_next - t) * (v_u + cfg_scale * (v_c - v_u))
        x = torch.where(keep, (1 - t_next) * source + t_next * noise, x)
    return x


def test_edit_step_renoises_kept_region_at_t_next() -> None:
    """One edit step from t = 0.8 to 0.5: the kept region (mask 0) becomes exactly
    0.5 * source + 0.5 * noise (the source re-noised with the initial noise at t_next), the
    regenerated region the Euler step of the model on [x, masked source, mask]."""
    model = randomize(DiT(get_config("tiny", edit=True)), std=0.2).eval()
    x, _, text, tmask = model.example_inputs(2)
    x = x[:, :4]
    src, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    m = make_edit_batch(src, "inpaint", torch.Generator().manual_seed(2))["edit_mask"]
    keep = (m < 0.5).expand_as(x)
    t, t_next = torch.tensor(0.8), torch.tensor(0.5)
    with torch.no_grad():
        got = make_step(model, (text, tmask), cfg_scale=1.0, edit_source=src, edit_mask=m, noise=noise)(x, t, t_next)
        v = model(edit_model_input(x, src * (1 - m), m), t, text, tmask)
    assert keep.any() and (~keep).any()
    assert torch.equal(got[keep], (0.5 * src + 0.5 * noise)[keep])
    torch.testing.assert_close(got[~keep], (x - 0.3 * v)[~keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("task", EDIT_TASKS)
def test_sample_keeps_edit_region_exactly(task: str) -> None:
    model = randomize(DiT(get_config("tiny", edit=True)), std=0.2)
    x0 = torch.randn(2, 4, 8, 8)
    edit = make_edit_batch(x0, task, torch.Generator().manual_seed(5))
    _, _, text, mask = model.example_inputs(2)
    noise = torch.randn(2, 4, 8, 8)
    out = sample(model, text=text, text_mask=mask, steps=3, cfg_scale=2.0, noise=noise, **edit)
    keep = (edit["edit_mask"] < 0.5).expand_as(out)
    assert torch.equal(out[keep], x0[keep])
    # the regenerated region is the written-out Euler CFG integration (intermediate kept
    # regions re-noised with the initial noise), not merely "something other than x0"
    with torch.no_grad():
        ref = _edit_euler_reference(model, (text, mask), noise, edit["edit_source"], edit["edit_mask"],
                                    time_grid(3), 2.0)
    torch.testing.assert_close(out[~keep], ref[~keep], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out[~keep], x0[~keep])
    # an unmasked source ("AI Erase": the whole image) and a soft mask mean the same edit:
    # the sampler masks the source and binarizes the mask itself
    soft = edit["edit_mask"] * 0.6 + 0.2  # 0 -> 0.2 (keep), 1 -> 0.8 (regenerate)
    again = sample(model, text=text, text_mask=mask, steps=3, cfg_scale=2.0, noise=noise,
                   edit_source=x0, edit_mask=soft)
    assert torch.equal(again, out)


# ----------------------------------------------------------------------------- edit masks


def test_edit_masks_per_task() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, 16, 16)
    rows = torch.arange(16).view(1, 16, 1)
    for task in EDIT_TASKS:
        e = make_edit_batch(x, task, g)
        m = e["edit_mask"]
        assert m.shape == (64, 1, 16, 16) and m.dtype == x.dtype
        assert set(m.unique().tolist()) <= {0.0, 1.0}
        regen = m.flatten(1).mean(1)
        assert (regen > 0).all() and (regen < 1).all(), task  # something to keep and to generate
        assert torch.equal(e["edit_source"], x * (1 - m))
        keep = m[:, 0] < 0.5
        if task == "expand":  # a centered rectangle
            r = keep.any(2)
            c = keep.any(1)
            assert torch.equal(keep, r[:, :, None] & c[:, None, :])
            top, bottom = r.int().argmax(1), 15 - r.flip(1).int().argmax(1)
            assert ((top - (15 - bottom)).abs() <= 1).all()
            frac = r.float().mean(1)
            assert (frac >= 0.45).all() and (frac <= 0.85).all()
        if task == "outpaint":  # kept subject away from the border, border regenerated
            assert (m[:, 0, 0, :] == 1).all() and (m[:, 0, -1, :] == 1).all()
            assert ((keep & (rows >= 2) & (rows < 14)).sum((1, 2)) == keep.sum((1, 2))).all()
        if task == "inpaint":
            assert (regen < 0.9).all()
    mixed = make_edit_batch(x, "mixed", torch.Generator().manual_seed(1))["edit_mask"]
    again = make_edit_batch(x, "mixed", torch.Generator().manual_seed(1))["edit_mask"]
    assert torch.equal(mixed, again)
    with pytest.raises(ValueError, match="unknown edit task 'erase'.*inpaint, outpaint, expand"):
        make_edit_batch(x, "erase", g)


def test_edit_mask_geometry() -> None:
    """Outpaint keeps an ellipse inside [0.1, 0.9] of each side (left/right borders too);
    on a 2x2 latent every outpaint/expand mask still keeps a pixel and regenerates one; the
    device argument places the mask."""
    g = torch.Generator().manual_seed(0)
    m = make_edit_mask(256, 20, 20, "outpaint", g)[:, 0]
    keep = m < 0.5
    cols = torch.arange(20).view(1, 1, 20)
    assert (m[:, :, 0] == 1).all() and (m[:, :, -1] == 1).all()
    assert (keep & ((cols < 2) | (cols >= 18))).sum() == 0
    for task in ("outpaint", "expand"):
        m = make_edit_mask(256, 2, 2, task, g).flatten(1)
        assert ((m == 0).any(1) & (m == 1).any(1)).all(), task
    assert make_edit_mask(2, 4, 4, "mixed", g, device="meta").device.type == "meta"


def test_edit_boxes_and_strokes_exact() -> None:
    """Inpaint's pieces on hand-made uniforms: box k spans [top, top + size) with top in
    [0, 1 - size] (never past the border), u[:, 0, 4] sets 1-3 boxes, a box smaller than a
    pixel still covers the pixel of its center; strokes are drawn only where u[:, 0, 12] < 0.5."""
    from ditperf.model import edit as edit_mod

    yy, xx = edit_mod._grid(10, 10, torch.device("cpu"))
    u = torch.zeros(3, 3, 5)  # sizes 0.1 (one pixel of 10)
    u[:, 1, 2:4] = 1.0  # box 1 at the bottom-right corner
    u[:, 2, 3] = 1.0  # box 2 at the top-right corner
    u[:, 0, 4] = torch.tensor([0.0, 0.5, 0.9])  # 1, 2, 3 boxes
    boxes = edit_mod._boxes(u, yy, xx)
    assert boxes.sum((1, 2)).tolist() == [1, 2, 3]
    assert boxes[2, 0, 0] and boxes[2, 9, 9] and boxes[2, 0, 9]
    u = torch.zeros(1, 3, 5)
    u[0, 0, :4] = torch.tensor([0.5, 0.5, 1.0, 0.0])  # 3x3 pixels at the bottom-left corner
    assert torch.nonzero(edit_mod._boxes(u, yy, xx)[0]).tolist() == [[r, c] for r in (7, 8, 9) for c in (0, 1, 2)]
    yy2, xx2 = edit_mod._grid(2, 2, torch.device("cpu"))
    u = torch.full((1, 3, 5), 0.5)
    u[0, :, :2] = 0.0  # a 0.1 box between the 2x2 pixel centers: still covers one pixel
    u[0, 0, 4] = 0.0
    assert edit_mod._boxes(u, yy2, xx2).sum() == 1
    u = torch.rand(2, 2, 13, generator=torch.Generator().manual_seed(0))
    u[:, 0, 12] = torch.tensor([0.7, 0.2])
    strokes = edit_mod._strokes(u, yy, xx)
    assert not strokes[0].any() and strokes[1].any()


def test_loss_builds_edit_masks_when_missing(seed: int) -> None:
    """Without edit_mask / edit_source the loss makes "mixed" edit masks from its generator,
    drawn after (t, eps, dropout): the same loss as passing the masks that
    ``make_edit_batch(latents, "mixed", g)`` gives after replaying those draws (the batch
    contract's fixed draw order, which resumable training relies on)."""
    model = randomize(DiT(get_config("tiny", edit=True)))
    batch = text_batch(model, 2)
    g = lambda: torch.Generator().manual_seed(seed)
    loss = flow_matching_loss(model, batch, generator=g(), edit_region_only=True, cond_dropout=0.5)
    assert torch.isfinite(loss)
    gen = g()
    torch.randn(2, generator=gen)  # t
    torch.randn(batch["latents"].shape, generator=gen)  # eps
    torch.rand(2, generator=gen)  # dropout
    edit = make_edit_batch(batch["latents"], "mixed", gen)
    given = flow_matching_loss(model, {**batch, **edit}, generator=g(), edit_region_only=True, cond_dropout=0.5)
    torch.testing.assert_close(loss, given)
    ones = torch.ones_like(edit["edit_mask"])  # regenerate everything: a different loss
    other = flow_matching_loss(model, {**batch, "edit_mask": ones, "edit_source": batch["latents"]},
                               generator=g(), edit_region_only=True, cond_dropout=0.5)
    assert not torch.allclose(loss, other)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors() -> None:
    model = DiT("tiny")
    x, t, text, mask = model.example_inputs(2)
    with pytest.raises(ValueError, match="x has 9 channels.*expects 4 latent channels"):
        model(torch.randn(2, 9, 8, 8), t, text, mask)
    with pytest.raises(ValueError, match="not divisible by the patch size 2"):
        model(torch.randn(2, 4, 8, 7), t, text, mask)
    with pytest.raises(ValueError, match=r"text_mask must be bool of shape \(2, 8\)"):
        model(x, t, text, mask[:, :5])
    with pytest.raises(ValueError, match="text_mask must be bool"):
        model(x, t, text, mask.float())
    with pytest.raises(ValueError, match="text-conditional: pass text"):
        model(x, t)
    with pytest.raises(ValueError, match=r"text must be float \(2, L, 32\)"):
        model(x, t, torch.randn(2, 8, 31), mask)
    with pytest.raises(ValueError, match="t must be"):
        model(x, torch.rand(3), text, mask)
    edit = DiT(get_config("tiny", edit=True))
    with pytest.raises(ValueError, match="x has 4 channels.*9 = 4 latent \\+ 4 edit_source \\+ 1 edit_mask"):
        edit(x, t, text, mask)
    cls = DiT(get_config("tiny", **TINY_CLASS))
    with pytest.raises(ValueError, match="class-conditional: pass labels"):
        cls(x, t)
    with pytest.raises(ValueError, match="labels must be int64"):
        cls(x, t, torch.rand(2))
    with pytest.raises(ValueError, match="batch is missing text_mask.*expects keys: latents, text, text_mask"):
        flow_matching_loss(model, {"latents": x, "text": text})
    with pytest.raises(ValueError, match="needs conditioning"):
        sample(model, steps=2)
    with pytest.raises(ValueError, match="edit_source and edit_mask must both be given"):
        sample(edit, text=text, text_mask=mask, steps=2)
    src, m = torch.randn(2, 4, 8, 8), (torch.rand(2, 1, 8, 8) < 0.5).float()
    with pytest.raises(ValueError, match="must be given together; got only edit_mask"):
        sample(edit, text=text, text_mask=mask, steps=2, edit_mask=m)
    with pytest.raises(ValueError, match="edit=False: edit_source / edit_mask must not be given"):
        sample(model, text=text, text_mask=mask, steps=2, edit_source=src)
    with pytest.raises(ValueError, match="must be given together; got only edit_source"):
        flow_matching_loss(edit, {"latents": x, "text": text, "text_mask": mask, "edit_source": src})
    with pytest.raises(ValueError, match="edit=False"):
        flow_matching_loss(model, {"latents": x, "text": text, "text_mask": mask, "edit_source": src, "edit_mask": m})
    with pytest.raises(ValueError, match="edits need noise="):
        make_step(edit, (text, mask), edit_source=src, edit_mask=m)
    with pytest.raises(ValueError, match="height/width 16x8 disagree with the latent size 8x8"):
        sample(model, text=text, text_mask=mask, steps=1, noise=torch.randn(2, 4, 8, 8), height=16)
    # conditioning is checked on the caller's batch, not the doubled CFG batch inside the step
    with pytest.raises(ValueError, match=r"text_mask must be bool of shape \(2, 8\)"):
        sample(model, text=text, text_mask=mask[:1], steps=1)
    with pytest.raises(ValueError, match=r"labels must be int64 of shape \(2,\)"):
        sample(cls, labels=torch.rand(2), steps=1)
    with pytest.raises(ValueError, match="mlp_ratio 0 gives an MLP width of 0"):
        get_config("tiny", mlp_ratio=0)


def test_forward_bad_shapes_raise_clear_errors() -> None:
    """Shape errors of x, t, labels, text and drop are ValueErrors naming the expectation
    (not a broadcast into a wrong shape, or an error deep inside the model)."""
    model = DiT("tiny")
    x, t, text, mask = model.example_inputs(2)
    with pytest.raises(ValueError, match=r"x must be a \(B, C, H, W\) tensor, got \(4, 8, 8\)"):
        model(x[0], t, text, mask)
    with pytest.raises(ValueError, match=r"x must be a \(B, C, H, W\) tensor, got list"):
        model([1.0], t, text, mask)
    with pytest.raises(ValueError, match="latent size 7x8 is not divisible by the patch size 2"):
        model(torch.randn(2, 4, 7, 8), t, text, mask)
    with pytest.raises(ValueError, match=r"t must be a float tensor of shape \(2,\) or \(\), got \(2, 1\)"):
        model(x, t[:, None], text, mask)
    with pytest.raises(ValueError, match=r"text must be float \(2, L, 32\), got torch.float32 \(3, 8, 32\)"):
        model(x, t, torch.randn(3, 8, 32), torch.ones(3, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"text must be float \(2, L, 32\), got torch.int64"):
        model(x, t, text.long(), mask)
    with pytest.raises(ValueError, match=r"drop must be a bool tensor of shape \(2,\)"):
        model(x, t, text, mask, drop=torch.ones(3, dtype=torch.bool))
    cls = DiT(get_config("tiny", **TINY_CLASS))
    labels = torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"labels must be int64 of shape \(2,\), got torch.int64 \(2, 1\)"):
        cls(x, t, labels[:, None])
    with pytest.raises(ValueError, match="class-conditional: cond_mask must not be given"):
        cls(x, t, labels, mask)
    assert cls(x, t, labels.int()).shape == x.shape  # int32 labels are accepted too


def test_edit_model_input_checks_shapes() -> None:
    x = torch.randn(2, 4, 8, 8)
    src, m = torch.randn(2, 4, 8, 8), torch.ones(2, 1, 8, 8)
    assert edit_model_input(x, src, m).shape == (2, 9, 8, 8)
    for bad_src, bad_m in ((src[:, :3], m), (src, m[:, :, :4]), (src, m.expand(2, 4, 8, 8))):
        with pytest.raises(ValueError, match=r"edit_source must have shape \(2, 4, 8, 8\) and edit_mask \(2, 1, 8, 8\)"):
            edit_model_input(x, bad_src, bad_m)


@pytest.mark.parametrize("overrides,message", [
    ({"sample_shift": float("nan")}, "sample_shift must be a finite number"),
    ({"eps": float("inf")}, "eps must be a finite number"),
    ({"mlp_ratio": float("inf")}, "mlp_ratio must be a finite number"),
    ({"depth": 2.5}, "depth must be a whole number"),
    ({"num_heads": True}, "num_heads must be a whole number"),
    ({"latent_size": 16.5}, "latent_size must be an int or"),
    ({"latent_size": (16.7, 16)}, "latent_size must be an int or"),
    ({"latent_size": "16"}, "latent_size must be an int or"),
])
def test_config_refuses_non_finite_and_non_integer_values(overrides: dict, message: str) -> None:
    """nan / inf passed the '> 0' checks, a fractional depth failed later in range(), and
    latent sizes were truncated (16.7 -> 16) or read digit by digit ("16" -> (1, 6))."""
    with pytest.raises(ValueError, match=message):
        get_config("tiny", **overrides)
