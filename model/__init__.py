"""ditperf.model: a latent DiT with a torch <-> triton backend switch, flow matching, edits.

Public API::

    from ditperf.model import DiT, get_config, PRESETS, flops, flow_matching_loss, sample
    model = DiT("tiny", backend="torch")          # or DiT(get_config("t2i-1b", edit=True))
    v = model(*model.example_inputs(2))           # (x, t, cond[, cond_mask]) -> velocity
    loss = flow_matching_loss(model, batch, generator=g, cond_dropout=0.1)
    latents = sample(model, text=emb, text_mask=mask, steps=20, cfg_scale=4.0)
    latents = sample(..., step_fn=cuda_graph_step)  # GPU: each step one CUDA-graph replay

See :mod:`ditperf.model.dit` for the forward contract and :mod:`ditperf.model.diffusion`
for the batch contract.
"""

from ditperf.model.config import PRESETS, DiTConfig, get_config
from ditperf.model.diffusion import (
    cuda_graph_step,
    flow_matching_loss,
    interpolate,
    logit_normal_timesteps,
    make_step,
    sample,
    shift_time,
    time_grid,
)
from ditperf.model.dit import BACKENDS, DiT, modulate, patchify, sincos_2d, unpatchify
from ditperf.model.edit import EDIT_TASKS, edit_model_input, make_edit_batch, make_edit_mask
from ditperf.model.flops import flops

__all__ = [
    "BACKENDS",
    "EDIT_TASKS",
    "PRESETS",
    "DiT",
    "DiTConfig",
    "cuda_graph_step",
    "edit_model_input",
    "flops",
    "flow_matching_loss",
    "get_config",
    "interpolate",
    "logit_normal_timesteps",
    "make_edit_batch",
    "make_edit_mask",
    "make_step",
    "modulate",
    "patchify",
    "sample",
    "shift_time",
    "sincos_2d",
    "time_grid",
    "unpatchify",
]
