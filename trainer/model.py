"""``DiTComposerModel``: the DiT as a Composer model trained with flow matching.

Exact resume: every random draw of a training step (timesteps, noise, conditioning dropout,
edit masks when the batch has none) comes from a ``torch.Generator`` seeded by
``(seed, global batch index, rank, microbatch index)``. Composer restores the batch counter
and Streaming the data position from a checkpoint, so a resumed run draws exactly what the
uninterrupted run drew. (Composer saves the global RNG state but does not re-apply it on a
mid-epoch resume with a StreamingDataset, so nothing here uses the global RNG.) The batch
index is pushed in by :class:`BatchIndexCallback` at ``BATCH_START``.

The forward pass returns the loss (Composer calls ``forward`` through DDP/FSDP, then
``loss(outputs, batch)``, which just returns it): the noise must be drawn inside the wrapped
forward for gradient synchronisation to see the whole step.
"""

from __future__ import annotations

from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.models import ComposerModel
from composer.utils import dist
from ditperf.model import DiT, flops, flow_matching_loss
from ditperf.model.dit import DiTBlock
from ditperf.trainer.data import mix_seed

FLOAT_KEYS = ("latents", "text", "edit_source", "edit_mask")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; raised before the step is applied or saved."""

    def __init__(self, batch: int, value: float, message: str | None = None) -> None:
        super().__init__(message or f"loss became non-finite ({value}) at batch {batch}")
        self.batch, self.value = batch, value


class NonFiniteParamsError(NonFiniteLossError):
    """The parameters became NaN/inf in an optimizer step whose loss was finite (e.g. an
    infinite learning rate or an overflowing update); raised before that step is saved."""

    def __init__(self, batch: int) -> None:
        super().__init__(batch, float("nan"), f"parameters became non-finite in the optimizer step of "
                                              f"batch {batch} (its loss was finite)")


def is_dit_block(module: torch.nn.Module) -> bool:
    """Composer's ``fsdp_wrap_fn`` / ``activation_checkpointing_fn``: the DiT blocks."""
    return isinstance(module, DiTBlock)


class DiTComposerModel(ComposerModel):
    """Composer wrapper: ``forward(batch)`` -> flow-matching loss (fp32 scalar).

    ``batch`` follows the ``ditperf.model`` batch contract; float entries may arrive in fp16
    (the loader keeps them half-size) and are cast to fp32 here (autocast picks bf16 for the
    matmuls on GPU).
    """

    def __init__(self, dit: DiT, *, seed: int, cond_dropout: float = 0.1, edit_region_only: bool = False,
                 t_mean: float = 0.0, t_std: float = 1.0, nan_at_batch: int | None = None) -> None:
        super().__init__()
        self.model = dit
        self.seed = int(seed)
        self.cond_dropout = float(cond_dropout)
        self.edit_region_only = bool(edit_region_only)
        self.t_mean, self.t_std = float(t_mean), float(t_std)
        self.nan_at_batch = nan_at_batch
        self.seen_sample_ids: list[int] | None = None  # set to [] to record (debug.param_digest)
        self.batch_index = 0
        self.micro_index = 0
        # Composer FSDP (v1 and v2) asks the ComposerModel's child, the DiT, which submodules
        # are wrap units and which are recomputed in backward: each DiT block is both.
        dit.fsdp_wrap_fn = is_dit_block
        dit.activation_checkpointing_fn = is_dit_block

    # -- generator ------------------------------------------------------------------------

    def start_batch(self, batch_index: int) -> None:
        self.batch_index = int(batch_index)
        self.micro_index = 0

    def step_generator(self, device: torch.device) -> torch.Generator:
        """Generator for the current (batch, rank, microbatch)."""
        g = torch.Generator(device=device)
        g.manual_seed(mix_seed(self.seed, self.batch_index, dist.get_global_rank(), self.micro_index))
        self.micro_index += 1
        return g

    # -- Composer API ---------------------------------------------------------------------

    def prepare(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(batch)
        for k in FLOAT_KEYS:
            if k in out and out[k].is_floating_point():
                out[k] = out[k].float()
        return out

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = self.prepare(batch)
        if self.seen_sample_ids is not None and "sample_ids" in batch:
            self.seen_sample_ids.extend(int(i) for i in batch["sample_ids"].tolist())
        g = self.step_generator(batch["latents"].device)
        loss = flow_matching_loss(self.model, batch, generator=g, cond_dropout=self.cond_dropout,
                                  edit_region_only=self.edit_region_only, t_mean=self.t_mean, t_std=self.t_std)
        if self.nan_at_batch is not None and self.batch_index == int(self.nan_at_batch):
            loss = loss * float("nan")  # test hook (debug.nan_at_batch)
        return loss

    def loss(self, outputs: Any, batch: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return outputs

    def get_metrics(self, is_train: bool = False) -> dict[str, Any]:
        return {}

    def flops_per_batch(self, batch: dict[str, torch.Tensor]) -> float:
        """Training FLOPs of this device batch (forward + backward = 3x forward), analytic."""
        lat = batch["latents"]
        text_len = batch["text"].shape[1] if "text" in batch else None
        return float(flops(self.model.config, lat.shape[0], height=lat.shape[-2], width=lat.shape[-1],
                           text_len=text_len)["train"])


def unwrap(model: torch.nn.Module) -> DiTComposerModel:
    """The :class:`DiTComposerModel` inside DDP (``.module``) wrappers."""
    m = model
    while not isinstance(m, DiTComposerModel) and hasattr(m, "module"):
        m = m.module
    if not isinstance(m, DiTComposerModel):
        raise TypeError(f"expected a DiTComposerModel, got {type(m).__name__}")
    return m


class BatchIndexCallback(Callback):
    """Tell the model which global batch starts (seeds the step generators)."""

    def batch_start(self, state: State, logger: Logger) -> None:
        unwrap(state.model).start_batch(int(state.timestamp.batch.value))


def _any_flag(flag: torch.Tensor, state: State) -> bool:
    """True when ``flag`` (float (1,)) is > 0 on any rank (one all-reduce on the run's device,
    whose backend may not take CPU tensors, then one sync)."""
    flag = state.device.tensor_to_device(flag)
    if dist.get_world_size() > 1:
        dist.all_reduce(flag, reduce_operation="MAX")
    return bool(flag.item() > 0)


class ResumeGuard(Callback):
    """Keeps the global batch size in every checkpoint and refuses to resume a checkpoint
    written with another one: Streaming's resume position counts samples per global batch,
    so a different size silently replays part of the epoch and skips another part. (A
    different number of ranks with the same global batch is fine: Streaming reshards.)"""

    def __init__(self, global_batch_size: int) -> None:
        self.global_batch_size = int(global_batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {"global_train_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("global_train_batch_size")
        if saved is not None and int(saved) != self.global_batch_size:
            from ditperf.trainer.config import ConfigError

            raise ConfigError(
                f"the checkpoint was written with global_train_batch_size={saved}, this run has "
                f"{self.global_batch_size}: resuming would replay and skip samples of the epoch. Resume with "
                f"global_train_batch_size={saved}, or start a new schedule from its weights with "
                "load_weights_only=true")


class InfGradAtBatch(Callback):
    """Test hook (``debug.inf_grad_at_batch``): one gradient element becomes inf after the
    backward of that batch, as an overflow would, while the loss stays finite."""

    def __init__(self, batch: int) -> None:
        self.batch = int(batch)

    def after_backward(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch.value) == self.batch:
            p = next(p for p in state.model.parameters() if p.grad is not None)
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            g.view(-1)[0] = float("inf")


class NaNGuard(Callback):
    """Stop training when the loss is not finite, *before* backward/step/checkpoint, and
    when the parameters are not finite after a step, *before* that step is checkpointed.

    The loss check runs at ``AFTER_LOSS``; the parameter check at ``BATCH_END`` (after the
    optimizer step, before ``BATCH_CHECKPOINT``: a finite loss does not make a finite update,
    e.g. with an infinite learning rate). One fused norm over this rank's parameters (or
    shards), ~1 ms per step for 675M fp32 parameters on an H100. Every rank takes part in
    one all-reduce per check so all ranks stop together. The last checkpoint written (and the
    ``latest`` symlink) stay the last good state because the failing batch never reaches
    ``BATCH_CHECKPOINT``.
    """

    def after_loss(self, state: State, logger: Logger) -> None:
        loss = state.loss
        if isinstance(loss, dict):
            loss = loss.get("total", next(iter(loss.values())))
        if isinstance(loss, (tuple, list)):
            loss = sum(loss)
        assert isinstance(loss, torch.Tensor)
        bad = (~torch.isfinite(loss.detach())).any().to(torch.float32).reshape(1)
        if _any_flag(bad, state):
            raise NonFiniteLossError(int(state.timestamp.batch.value), float(loss.detach().float().mean().item()))

    def batch_end(self, state: State, logger: Logger) -> None:
        groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p in state.model.parameters():
            t = p.to_local() if hasattr(p, "to_local") else p  # FSDP2 DTensor: this rank's shard
            if t.numel():
                groups.setdefault((t.device, t.dtype), []).append(t.detach())
        # the sum of the norms is NaN/inf exactly when some element is; a rank without local
        # elements still joins the all-reduce
        totals = [state.device.tensor_to_device(torch.stack(torch._foreach_norm(ts)).sum().float().reshape(1))
                  for ts in groups.values()]
        bad = (~torch.isfinite(torch.cat(totals))).any().to(torch.float32).reshape(1) if totals else torch.zeros(1)
        if _any_flag(bad, state):
            # timestamp.batch already counts this batch at BATCH_END: report its index as the loss check does
            raise NonFiniteParamsError(int(state.timestamp.batch.value) - 1)
