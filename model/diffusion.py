"""Rectified flow (flow matching) training objective and an Euler CFG sampler.

Math (SD3 / rectified flow conventions):

* interpolation ``x_t = (1 - t) * x0 + t * eps`` with ``eps ~ N(0, I)``; t = 0 is data,
  t = 1 is noise. The model predicts the velocity ``v = dx_t/dt = eps - x0``.
* training times are logit-normal: ``t = sigmoid(m + s * n)``, n ~ N(0, 1) (SD3: m=0, s=1),
  which concentrates training on intermediate noise levels.
* sampling integrates dx/dt = v from t = 1 to 0 with Euler steps on a shifted grid
  ``t' = shift * t / (1 + (shift - 1) * t)`` (SD3; shift > 1 spends more steps at high
  noise, which large images need: 3.0 at 1024px). Classifier-free guidance runs the
  conditional and the null-conditioned halves in one batch: ``v = v_u + s * (v_c - v_u)``.

Batch contract (consumed by the trainer; every entry a tensor on one device)::

    batch = {
        "latents":    float (B, C, H, W)   clean latents x0 (already scaled by the VAE factor)
        "labels":     int64 (B,)           class configs only, in [0, num_classes)
        "text":       float (B, L, D_text) text configs only: text-encoder embeddings
        "text_mask":  bool  (B, L)         text configs only: True = real token (>= 1 per row)
        "edit_mask":  float (B, 1, H, W)   edit configs (optional): 1 = regenerate, 0 = keep
        "edit_source":float (B, C, H, W)   edit configs (optional): latents * (1 - edit_mask)
    }

Edit configs whose batch lacks both ``edit_mask`` and ``edit_source`` get them from
``make_edit_batch(latents, "mixed", generator)`` inside the loss; one without the other, or
either for a non-edit config, is an error. Given masks are binarized at 0.5 and the source
is masked with them (``source * (1 - mask)``), in the loss and the sampler alike, so the
model never sees content in the region it regenerates (an unmasked source, natural for
"AI Erase", is fine to pass). Randomness of the loss
is drawn from ``generator`` in a fixed order and amount (t, eps, dropout, edit masks), so
seeding it per (seed, global batch index) makes a resumed run bit-identical.

The sampler keeps shapes static, computes the time grid once as a tensor and never calls
``.item()``: the per-step function from :func:`make_step` can be wrapped in
``torch.compile`` or captured in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from ditperf.model.dit import DiT, check_conditioning
from ditperf.model.edit import edit_model_input, make_edit_batch

Cond = tuple[torch.Tensor, ...]
StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, t, t_next) -> x_next


def _gen_device(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


def logit_normal_timesteps(batch: int, *, generator: torch.Generator | None = None,
                           device: torch.device | str | None = None, mean: float = 0.0,
                           std: float = 1.0) -> torch.Tensor:
    """t = sigmoid(mean + std * n), n ~ N(0, 1): (batch,) float32 in (0, 1)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    n = torch.randn(batch, generator=generator, device=_gen_device(generator, device))
    return torch.sigmoid(mean + std * n).to(device)


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps with t (B,) broadcast over (B, ...)."""
    tt = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - tt) * x0 + tt * eps


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 time shift t' = shift t / (1 + (shift - 1) t); identity for shift = 1."""
    return shift * t / (1 + (shift - 1) * t)


def time_grid(steps: int, shift: float = 1.0, device: torch.device | str | None = None) -> torch.Tensor:
    """(steps + 1,) float32 times from exactly 1 down to exactly 0, shifted."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift_time(t, shift).to(torch.float32).to(device)


def _batch_cond(model: DiT, batch: dict[str, torch.Tensor]) -> Cond:
    cfg = model.config
    keys = ("labels",) if cfg.conditioning == "class" else ("text", "text_mask")
    missing = [k for k in ("latents", *keys) if k not in batch]
    if missing:
        expected = "latents, " + ", ".join(keys) + (" [, edit_mask, edit_source]" if cfg.edit else "")
        raise ValueError(f"batch is missing {', '.join(missing)}; config {cfg.name!r} expects keys: {expected}")
    return tuple(batch[k] for k in keys)


def edit_pair(cfg_name: str, edit: bool, source: torch.Tensor | None,
              mask: torch.Tensor | None, *, required: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Validate and normalize an (edit_source, edit_mask) pair: None when neither is given;
    else (source * (1 - m), m) with m = (mask >= 0.5) in the mask's dtype. Raises ValueError
    for half a pair, a pair for a config without edit channels, or (``required``: sampling)
    no pair for an edit config."""
    if source is None and mask is None:
        if required and edit:
            raise ValueError(f"config {cfg_name!r} has edit=True: edit_source and edit_mask must both be given")
        return None
    if not edit:
        raise ValueError(f"config {cfg_name!r} has edit=False: edit_source / edit_mask must not be given")
    if source is None or mask is None:
        raise ValueError(f"edit_source and edit_mask must be given together; got only "
                         f"{'edit_mask' if source is None else 'edit_source'}")
    m = (mask >= 0.5).to(mask.dtype if mask.is_floating_point() else source.dtype)
    return source * (1 - m), m


def flow_matching_loss(model: DiT, batch: dict[str, torch.Tensor], *,
                       generator: torch.Generator | None = None, cond_dropout: float = 0.0,
                       edit_region_only: bool = False, t_mean: float = 0.0,
                       t_std: float = 1.0) -> torch.Tensor:
    """Mean squared error between predicted and true velocity (scalar, fp32).

    ``cond_dropout``: probability of replacing a sample's labels/text by the null
    conditioning (trains the unconditional branch for CFG). ``edit_region_only`` (edit
    configs): average the error over the regenerated region only (mask = 1).
    """
    cfg = model.config
    if not 0.0 <= cond_dropout <= 1.0:
        raise ValueError(f"cond_dropout must be in [0, 1], got {cond_dropout}")
    if edit_region_only and not cfg.edit:
        raise ValueError(f"edit_region_only needs an edit config; {cfg.name!r} has edit=False")
    cond = _batch_cond(model, batch)
    x0 = batch["latents"]
    if x0.dim() != 4 or x0.shape[1] != cfg.latent_channels:
        raise ValueError(f"batch['latents'] must be (B, {cfg.latent_channels}, H, W), got {tuple(x0.shape)}")
    b, dev = x0.shape[0], x0.device
    gdev = _gen_device(generator, dev)
    # Fixed draw order and amount: t, eps, dropout, [edit masks].
    t = logit_normal_timesteps(b, generator=generator, device=dev, mean=t_mean, std=t_std)
    eps = torch.randn(x0.shape, generator=generator, device=gdev).to(dev, x0.dtype)
    drop = (torch.rand(b, generator=generator, device=gdev) < cond_dropout).to(dev)
    x_t = interpolate(x0, eps, t)
    target = eps - x0
    mask = None
    given = edit_pair(cfg.name, cfg.edit, batch.get("edit_source"), batch.get("edit_mask"))
    if cfg.edit:
        if given is not None:
            source, mask = given
        else:
            edit = make_edit_batch(x0, "mixed", generator)
            mask, source = edit["edit_mask"], edit["edit_source"]
        x_t = edit_model_input(x_t, source, mask)
    pred = model(x_t, t, *cond, drop=drop)  # null conditioning inside forward (FSDP-safe)
    err = (pred.float() - target.float()) ** 2
    if edit_region_only:
        m = mask.float()
        return (err * m).sum() / (m.sum() * err.shape[1]).clamp_min(1.0)
    return err.mean()


def make_step(model: DiT, cond: Cond, *, cfg_scale: float = 4.0, null_cond: Cond | None = None,
              edit_source: torch.Tensor | None = None, edit_mask: torch.Tensor | None = None,
              noise: torch.Tensor | None = None) -> StepFn:
    """``step(x, t, t_next) -> x_next``: one Euler step with CFG (when cfg_scale != 1) and,
    for edits, the kept region re-imposed at noise level t_next from the initial ``noise``
    (exactly ``edit_source`` at t_next = 0). t, t_next: 0-d float tensors. Static shapes,
    no host syncs: wrap in ``torch.compile`` or capture in a CUDA graph. Edit masks are
    binarized at 0.5 and the source masked with them (see the module docstring)."""
    cfg = model.config
    guided = cfg_scale != 1.0
    b = cond[0].shape[0]
    # checked here, on the caller's batch: inside the model it would be the doubled CFG batch
    check_conditioning(cfg, b, cond[0], cond[1] if len(cond) > 1 else None)
    pair = edit_pair(cfg.name, cfg.edit, edit_source, edit_mask, required=True)
    if pair is not None:
        if noise is None:
            raise ValueError("edits need noise= (the initial noise the kept region is re-noised with)")
        edit_source, edit_mask = pair
    drop = {}
    if guided and null_cond is not None:
        cond_in = tuple(torch.cat([c, u.to(c.dtype)]) for c, u in zip(cond, null_cond))
    elif guided:  # the model swaps in its null conditioning for the second half (FSDP-safe)
        cond_in = tuple(torch.cat([c, c]) for c in cond)
        flags = torch.zeros(2 * b, dtype=torch.bool, device=cond[0].device)
        flags[b:] = True
        drop = {"drop": flags}
    else:
        cond_in = cond
    edit = edit_mask is not None
    if edit:
        keep = edit_mask < 0.5

    def step(x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        inp = edit_model_input(x, edit_source, edit_mask) if edit else x
        if guided:
            v_c, v_u = model(torch.cat([inp, inp]), t, *cond_in, **drop).float().chunk(2)
            v = v_u + cfg_scale * (v_c - v_u)
        else:
            v = model(inp, t, *cond_in).float()
        x = x + (t_next - t) * v
        if edit:
            known = (1 - t_next) * edit_source + t_next * noise
            x = torch.where(keep, known, x)
        return x

    return step


def cuda_graph_step(step: StepFn, *, warmup: int = 3) -> StepFn:
    """Run a :func:`make_step` step as one captured CUDA graph (inference, no autograd).

    The first call warms ``step`` up on a side stream (Triton autotuning, cuBLAS/cuDNN
    selection, lazy allocations happen there, not in the graph), then captures it with
    static copies of (x, t, t_next); every call copies its inputs into those buffers and
    replays the graph: one launch instead of hundreds, so the step's time is the GPU's, not
    the host's. Shapes, dtypes and the device must stay those of the first call (a new
    wrapper per shape). Returns a fresh tensor each call. Use as
    ``sample(..., step_fn=cuda_graph_step)``."""
    state: dict[str, object] = {}

    def run(x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda":
            raise ValueError(f"cuda_graph_step needs CUDA tensors (CUDA graphs); x is on {x.device}")
        key = tuple((tuple(a.shape), a.dtype, a.device) for a in (x, t, t_next))
        if "graph" not in state:
            static = [a.clone() for a in (x, t, t_next)]
            # the caller's autocast, without its weight-cast cache: cached casts live outside
            # the graph's memory pool and are freed when the caller's autocast exits, so a
            # replay would read freed memory; uncached, the casts are part of the graph
            amp = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"),
                                 enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False)
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.no_grad(), amp, torch.cuda.stream(side):
                for _ in range(warmup):
                    step(*static)
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), amp, torch.cuda.graph(graph):
                out = step(*static)
            state.update(graph=graph, inputs=static, out=out, key=key)
        elif key != state["key"]:
            raise ValueError(f"cuda_graph_step captured (shape, dtype, device) of x, t, t_next = {state['key']}; "
                             f"got {key}: make a new wrapper for new shapes")
        for buf, val in zip(state["inputs"], (x, t, t_next)):  # type: ignore[arg-type]
            buf.copy_(val)
        state["graph"].replay()  # type: ignore[union-attr]
        return state["out"].clone()  # type: ignore[union-attr]

    return run


@torch.no_grad()
def sample(model: DiT, cond: Cond | None = None, *, labels: torch.Tensor | None = None,
           text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
           steps: int = 20, cfg_scale: float = 4.0, shift: float | None = None,
           generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
           height: int | None = None, width: int | None = None,
           edit_source: torch.Tensor | None = None, edit_mask: torch.Tensor | None = None,
           step_fn: Callable[[Callable], Callable] | None = None) -> torch.Tensor:
    """Generate latents (B, C, H, W) fp32 by Euler integration from t = 1 to 0.

    Conditioning: ``cond`` as the model's positional tuple, or ``labels=`` (class configs),
    or ``text=`` + ``text_mask=``. ``shift`` defaults to ``config.sample_shift``. Sizes come
    from ``noise``, ``edit_source`` or (height, width, default: the config's latent size).
    Edit configs need ``edit_source`` (B, C, H, W) and ``edit_mask`` (B, 1, H, W); the kept
    region (mask 0) of the result equals ``edit_source`` exactly. ``step_fn`` wraps the
    step function (e.g. ``torch.compile``, or :func:`cuda_graph_step` on a GPU).
    """
    cfg = model.config
    if cond is None:
        cond = (labels,) if cfg.conditioning == "class" else (text, text_mask)
    if any(c is None for c in cond):
        need = "labels=" if cfg.conditioning == "class" else "text= and text_mask="
        raise ValueError(f"config {cfg.name!r} needs conditioning: pass {need} (or cond=)")
    pair = edit_pair(cfg.name, cfg.edit, edit_source, edit_mask, required=True)
    b, dev = cond[0].shape[0], cond[0].device
    if noise is not None:
        shape = tuple(noise.shape)
    elif edit_source is not None:
        shape = tuple(edit_source.shape)
    else:
        shape = (b, cfg.latent_channels, height or cfg.latent_size[0], width or cfg.latent_size[1])
    if len(shape) != 4 or shape[0] != b or shape[1] != cfg.latent_channels:
        raise ValueError(f"latent shape {shape} does not match batch {b} / {cfg.latent_channels} channels")
    if (height or shape[2]) != shape[2] or (width or shape[3]) != shape[3]:
        raise ValueError(f"height/width {height or shape[2]}x{width or shape[3]} disagree with the latent "
                         f"size {shape[2]}x{shape[3]} "
                         "of noise / edit_source; pass one or the other")
    if edit_source is not None and tuple(edit_source.shape) != shape:
        raise ValueError(f"edit_source shape {tuple(edit_source.shape)} does not match the latent shape {shape}")
    if noise is None:
        noise = torch.randn(shape, generator=generator, device=_gen_device(generator, dev)).to(dev)
    noise = noise.float()
    if pair is not None:
        edit_source, edit_mask = pair[0].float(), pair[1].float()
    step = make_step(model, cond, cfg_scale=cfg_scale, edit_source=edit_source, edit_mask=edit_mask,
                     noise=noise)
    if step_fn is not None:
        step = step_fn(step)
    grid = time_grid(steps, cfg.sample_shift if shift is None else shift, dev)
    x = noise
    if edit_mask is not None:
        x = torch.where(edit_mask < 0.5, edit_source * (1 - grid[0]) + grid[0] * noise, x)
    for i in range(steps):
        x = step(x, grid[i], grid[i + 1])
    return x
