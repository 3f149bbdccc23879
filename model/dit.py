"""A latent Diffusion Transformer (DiT, Peebles & Xie 2023) with PixArt/SD3-style text
conditioning, optional edit channels, and a torch <-> triton backend switch.

Forward signature (the contract tests, the trainer and ONNX export code against)::

    v = model(x, t, cond)                # class-conditional configs
    v = model(x, t, cond, cond_mask)     # text-conditional configs

* ``x``: float (B, in_channels, H, W), H and W multiples of the patch size. ``in_channels``
  is the latent channel count C, or ``C + C + 1`` for edit configs, where
  ``x = torch.cat([x_t, edit_source, edit_mask], dim=1)`` (see :mod:`ditperf.model.edit`).
* ``t``: float (B,) or () in [0, 1] (flow-matching time; 0 = clean, 1 = noise).
* ``cond``: class configs: int64 labels (B,) in [0, num_classes] (``num_classes`` is the
  null class used for classifier-free guidance). Text configs: float text-encoder
  embeddings (B, L, text_dim), any L.
* ``cond_mask``: text configs only (required there): bool (B, L), True = real token; each
  sample needs at least one True (the learned null embedding has all True).
* returns the predicted velocity ``v = eps - x0``: (B, C, H, W), dtype of the computation
  (fp32 params: fp32, or bf16 under autocast; bf16 params: bf16, inputs are cast).

``model.example_inputs(batch)`` returns exactly these positional arguments (3 for class
configs, 4 for text configs) and ``model.input_names`` their names for ONNX export. The
forward has no data-dependent control flow and no ``.item()``; shape checks are Python
checks on static shapes only.

Backends (same parameters, same ``state_dict``):

* ``"torch"``: ``F.layer_norm`` + :func:`modulate`, ``x + gate * y`` residuals,
  ``F.scaled_dot_product_attention``, ``F.rms_norm`` for QK-norm; reads like DiT's models.py.
* ``"triton"``: every norm+modulation, gated residual and attention goes through
  :mod:`ditperf.kernels`. Each gated residual is fused with the *next* LayerNorm by
  ``gated_residual_layer_norm``: block i's MLP residual with block i+1's norm1 (the final
  layer's norm after the last block); self-attention's residual with norm2 (class configs)
  or with the cross-attention query norm (text configs, unmodulated); the ungated
  cross-attention residual with norm2. So a block costs three fused norm kernels and two
  attention kernels, and no separate residual add. The MLP residual travels into the next
  block's ``forward`` as ``(delta, gate)``, so each block touches only its own
  parameters inside its own forward: FSDP and activation checkpointing wrap blocks.

Block (adaLN-Zero; the cross-attention part only for text configs)::

    shift1, scale1, gate1, shift2, scale2, gate2 = Linear(SiLU(c)).chunk(6)   # zero-init
    x = x + gate1 * SelfAttn(modulate(LN(x), shift1, scale1))
    x = x + CrossAttn(LN(x), text, key_mask=text_mask)                        # out-proj zero-init
    x = x + gate2 * MLP(modulate(LN(x), shift2, scale2))

where ``c = t_emb + (label_emb | pooled_text_emb)``. All LayerNorms are without affine
parameters (``elementwise_affine=False``, as in DiT). A fresh model outputs exactly zero.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from ditperf.model.config import DiTConfig, get_config
from torch import nn

BACKENDS = ("torch", "triton")

# ditperf.kernels, imported on the first set_backend("triton") (importing it turns on the
# Triton interpreter on machines without a GPU; a torch-only user never pays for it).
_K: Any = None


def _kernels() -> Any:
    global _K
    if _K is None:
        from ditperf import kernels

        _K = kernels
    return _K


# ----------------------------------------------------------------------------- helpers


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of (B, N, C) by per-sample (B, C) vectors: x * (1 + scale) + shift."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), N = (H/p)*(W/p) row-major, features ordered (p, q, c)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, c: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, N, p*p*C) -> (B, C, H, W) for latent size (h, w)."""
    b = x.shape[0]
    x = x.reshape(b, h // p, w // p, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, c, h, w)


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) [sin(pos*w), cos(pos*w)], w_k = 10000^(-k/(dim/2))."""
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, device: torch.device | None = None) -> torch.Tensor:
    """2-D sin-cos position embedding (grid_h*grid_w, dim), row-major like :func:`patchify`:
    the first half of the channels encodes the row, the second half the column. Computed for
    the actual grid, so any (also non-square) size works without interpolation."""
    rows = torch.arange(grid_h, device=device).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, device=device).repeat(grid_h)
    emb = torch.cat([sincos_1d(dim // 2, rows), sincos_1d(dim // 2, cols)], dim=1)
    return emb.to(torch.float32)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of times t (B,), as in DiT (t there is 0..999)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# ----------------------------------------------------------------------------- modules


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, hidden): a stride-p convolution (= Linear on each p x p patch)."""

    def __init__(self, in_channels: int, hidden: int, p: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=p, stride=p, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()  # (B, N, hidden) row-major


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> (B, hidden): sinusoidal features of 1000*t (DiT's scale) and an MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(1000.0 * t, self.freq_dim)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> (B, hidden); row ``num_classes`` is the null class (CFG), as in DiT."""

    def __init__(self, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class TextEmbedder(nn.Module):
    """Text-encoder embeddings (B, L, D_text) + mask -> tokens (B, L, hidden) for
    cross-attention (PixArt's caption projection: Linear-GELU-Linear) and a pooled vector
    (B, hidden) from the masked mean (Linear-SiLU-Linear) added to the timestep embedding.
    ``null_text`` (text_len, D_text) is the learned unconditional input for CFG."""

    def __init__(self, text_dim: int, hidden: int, text_len: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(approximate="tanh"),
                                  nn.Linear(hidden, hidden))
        self.pool = nn.Sequential(nn.Linear(text_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.null_text = nn.Parameter(torch.randn(text_len, text_dim) / text_dim**0.5)

    def forward(self, text: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = mask.to(text.dtype).unsqueeze(-1)
        pooled = (text * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
        return self.proj(text), self.pool(pooled)


class Mlp(nn.Module):
    def __init__(self, hidden: int, mlp_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class QKNorm(nn.Module):
    """RMSNorm over the head dimension of q and k (B, N, H, D), weight (D,) each."""

    def __init__(self, head_dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.q_weight = nn.Parameter(torch.ones(head_dim))
        self.k_weight = nn.Parameter(torch.ones(head_dim))

    def forward(self, q: torch.Tensor, k: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._norm(q, self.q_weight, backend), self._norm(k, self.k_weight, backend)

    def _norm(self, x: torch.Tensor, w: torch.Tensor, backend: str) -> torch.Tensor:
        if backend == "triton":  # strided (B, N, H, D) views of the fused qkv: no copy
            return _kernels().rms_norm(x, w, eps=self.eps)
        return F.rms_norm(x, (x.shape[-1],), w, self.eps).to(x.dtype)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None,
            backend: str) -> torch.Tensor:
    """Multi-head attention of (B, N, H, D) q and (B, M, H, D) k, v -> (B, N, H*D)."""
    b, n, h, d = q.shape
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, *, D) views
    if backend == "triton":
        o = _kernels().attention(q, k, v, key_mask=key_mask, scale=d**-0.5)
    else:
        mask = None if key_mask is None else key_mask[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return o.transpose(1, 2).reshape(b, n, h * d)


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.qk_norm = QKNorm(hidden // heads, eps) if qk_norm else None

    def forward(self, x: torch.Tensor, backend: str, attn_backend: str | None = None) -> torch.Tensor:
        """``backend`` runs the QK-norm, ``attn_backend`` (default: the same) the attention."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).unbind(2)
        if self.qk_norm is not None:
            q, k = self.qk_norm(q, k, backend)
        return self.proj(_attend(q, k, v, None, attn_backend or backend))


class CrossAttention(nn.Module):
    """Image tokens (queries) attend to projected text tokens; padding keys are masked."""

    def __init__(self, hidden: int, heads: int, qk_norm: bool, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.qk_norm = QKNorm(hidden // heads, eps) if qk_norm else None

    def forward(self, x: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, backend: str,
                attn_backend: str | None = None) -> torch.Tensor:
        b, n, c = x.shape
        d = c // self.heads
        q = self.q(x).reshape(b, n, self.heads, d)
        k, v = self.kv(text).reshape(b, text.shape[1], 2, self.heads, d).unbind(2)
        if self.qk_norm is not None:
            q, k = self.qk_norm(q, k, backend)
        return self.proj(_attend(q, k, v, text_mask, attn_backend or backend))


class DiTBlock(nn.Module):
    """adaLN-Zero block. ``backend="torch"``: ``x -> x`` as in DiT's models.py. ``"triton"``:
    ``(x, delta, gate) -> (x, delta, gate)``: the previous block's MLP residual ``delta``
    (gated by ``gate``; both None for the first block) is added inside this block's first
    fused norm, and this block's own MLP residual is returned for the next one. Each block
    reads only its own parameters inside its own ``forward`` (FSDP gathers a block's shards,
    and activation checkpointing recomputes it, around that call); inputs and outputs are
    flat tensors, as reentrant checkpointing (Composer's FSDP v1 default) needs: a nested
    tuple output would come back without a gradient path."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.eps = config.eps
        self.attn = SelfAttention(h, config.num_heads, config.qk_norm, config.eps)
        self.cross_attn = (CrossAttention(h, config.num_heads, config.qk_norm, config.eps)
                           if config.conditioning == "text" else None)
        self.mlp = Mlp(h, config.mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 6 * h))

    def forward(self, x: torch.Tensor, c: torch.Tensor, text: torch.Tensor | None,
                text_mask: torch.Tensor | None, attn_backend: str = "torch", backend: str = "torch",
                delta: torch.Tensor | None = None, gate: torch.Tensor | None = None) -> Any:
        if backend == "triton":
            return self._forward_triton(x, c, text, text_mask, attn_backend, delta, gate)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        norm = (x.shape[-1],)
        h = modulate(F.layer_norm(x, norm, eps=self.eps), shift1, scale1)
        x = x + gate1.unsqueeze(1) * self.attn(h, "torch", attn_backend)
        if self.cross_attn is not None:
            x = x + self.cross_attn(F.layer_norm(x, norm, eps=self.eps), text, text_mask, "torch", attn_backend)
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(F.layer_norm(x, norm, eps=self.eps), shift2, scale2))
        return x

    def _forward_triton(self, x: torch.Tensor, c: torch.Tensor, text: torch.Tensor | None,
                        text_mask: torch.Tensor | None, attn_backend: str, delta: torch.Tensor | None,
                        gate: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        K, eps, dt = _kernels(), self.eps, x.dtype
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).to(dt).chunk(6, dim=1)
        if delta is None:  # first block: nothing to add yet
            h = K.layer_norm(x, shift=shift1, scale=scale1, eps=eps)
        else:
            x, h = K.gated_residual_layer_norm(x, delta, gate, shift=shift1, scale=scale1, eps=eps)
        a = self.attn(h, "triton", attn_backend).to(dt)
        if self.cross_attn is not None:
            x, h = K.gated_residual_layer_norm(x, a, gate1, eps=eps)
            ca = self.cross_attn(h, text, text_mask, "triton", attn_backend).to(dt)
            x, h = K.gated_residual_layer_norm(x, ca, None, shift=shift2, scale=scale2, eps=eps)
        else:
            x, h = K.gated_residual_layer_norm(x, a, gate1, shift=shift2, scale=scale2, eps=eps)
        return x, self.mlp(h).to(dt), gate2


class FinalLayer(nn.Module):
    """adaLN (shift, scale; zero-init) + LayerNorm + Linear to p*p*C (zero-init). With
    ``delta``/``gate`` (triton backend) the last block's residual is fused into the norm."""

    def __init__(self, hidden: int, p: int, out_channels: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(hidden, p * p * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor, delta: torch.Tensor | None = None,
                gate: torch.Tensor | None = None) -> torch.Tensor:
        if delta is not None:
            shift, scale = self.adaLN_modulation(c).to(x.dtype).chunk(2, dim=1)
            _, h = _kernels().gated_residual_layer_norm(x, delta, gate, shift=shift, scale=scale, eps=self.eps)
            return self.linear(h)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(F.layer_norm(x, (x.shape[-1],), eps=self.eps), shift, scale))


# ----------------------------------------------------------------------------- model


def check_conditioning(cfg: DiTConfig, b: int, cond: torch.Tensor | None,
                       cond_mask: torch.Tensor | None) -> None:
    """Raise a ValueError naming what ``cfg`` expects unless (cond, cond_mask) is valid
    conditioning for a batch of ``b``: labels (b,) int, or text (b, L, text_dim) float +
    text_mask (b, L) bool. Shape and dtype checks only (no host sync)."""
    if cfg.conditioning == "class":
        if cond is None:
            raise ValueError(f"config {cfg.name!r} is class-conditional: pass labels, int64 ({b},) "
                             f"in [0, {cfg.num_classes}] ({cfg.num_classes} = null class)")
        if cond.shape != (b,) or cond.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"labels must be int64 of shape ({b},), got {cond.dtype} {tuple(cond.shape)}")
        if cond_mask is not None:
            raise ValueError(f"config {cfg.name!r} is class-conditional: cond_mask must not be given")
        return
    if cond is None or cond_mask is None:
        raise ValueError(f"config {cfg.name!r} is text-conditional: pass text ({b}, L, {cfg.text_dim}) "
                         f"float and text_mask ({b}, L) bool (True = real token)")
    if cond.dim() != 3 or cond.shape[0] != b or cond.shape[2] != cfg.text_dim or not cond.is_floating_point():
        raise ValueError(f"text must be float ({b}, L, {cfg.text_dim}), got {cond.dtype} {tuple(cond.shape)}")
    if cond_mask.shape != cond.shape[:2] or cond_mask.dtype != torch.bool:
        raise ValueError(f"text_mask must be bool of shape {tuple(cond.shape[:2])} (matching text), "
                         f"got {cond_mask.dtype} {tuple(cond_mask.shape)}")


class DiT(nn.Module):
    """Latent DiT. ``DiT("tiny")``, ``DiT(get_config("t2i-1b"), backend="triton")``.

    See the module docstring for the forward contract. ``config`` may be a preset name.
    ``backend`` runs the norms, modulations and gated residuals; ``attention_backend`` (None:
    the same) the attention, so the fused norms can be combined with PyTorch's SDPA (which
    dispatches to cuDNN / FlashAttention) or the reverse.
    """

    def __init__(self, config: DiTConfig | str, backend: str = "torch",
                 attention_backend: str | None = None) -> None:
        super().__init__()
        config = get_config(config) if isinstance(config, str) else config
        if not isinstance(config, DiTConfig):
            raise TypeError(f"config must be a DiTConfig or a preset name, got {type(config).__name__}")
        self.config = config
        h = config.hidden_size
        self.x_embedder = PatchEmbed(config.in_channels, h, config.patch_size)
        self.t_embedder = TimestepEmbedder(h)
        self.y_embedder = LabelEmbedder(config.num_classes, h) if config.conditioning == "class" else None
        self.text_embedder = (TextEmbedder(config.text_dim, h, config.text_len)
                              if config.conditioning == "text" else None)
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.depth))
        self.final_layer = FinalLayer(h, config.patch_size, config.out_channels, config.eps)
        self._pos_cache: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        self.initialize_weights()
        self.backend = "torch"
        self.attention_backend = "torch"
        self.set_backend(backend, attention=attention_backend)

    # -- setup ---------------------------------------------------------------------------

    def initialize_weights(self) -> None:
        """DiT's init: xavier-uniform Linears with zero bias, N(0, 0.02) embeddings/MLPs,
        and zero for every adaLN modulation, the cross-attention output projections and the
        final linear, so each block starts as the identity and the output is exactly 0."""

        def basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(basic)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        if self.text_embedder is not None:
            for lin in (*self.text_embedder.proj, *self.text_embedder.pool):
                if isinstance(lin, nn.Linear):
                    nn.init.normal_(lin.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero = [blk.adaLN_modulation[-1] for blk in self.blocks]
        zero += [blk.cross_attn.proj for blk in self.blocks if blk.cross_attn is not None]
        zero += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for lin in zero:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def set_backend(self, backend: str, *, attention: str | None = None) -> DiT:
        """Switch between ``"torch"`` and ``"triton"`` (ditperf.kernels); ``attention`` sets the
        attention's backend separately (None: the same as ``backend``). Returns self."""
        attention = backend if attention is None else attention
        for name, value in (("backend", backend), ("attention", attention)):
            if value not in BACKENDS:
                raise ValueError(f"{name} must be one of {', '.join(BACKENDS)}, got {value!r}")
        if "triton" in (backend, attention):
            _kernels()
        self.backend = backend
        self.attention_backend = attention
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def input_names(self) -> tuple[str, ...]:
        """Names of the positional forward inputs (as returned by :meth:`example_inputs`)."""
        if self.config.conditioning == "class":
            return ("x", "t", "labels")
        return ("x", "t", "text", "text_mask")

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("v",)

    def dynamic_shapes(self, batch: bool = True, text_len: bool = True) -> dict[str, dict[int, Any]]:
        """``dynamic_shapes`` for ``torch.export.export(model, model.example_inputs(2), ...)``
        (keys are the forward's argument names): a dynamic batch and, for text configs, a
        dynamic text length. The latent size stays static (the position embedding is
        computed for it at trace time)."""
        from torch.export import Dim

        b = Dim("batch", min=1, max=4096) if batch else None
        shapes: dict[str, dict[int, Any]] = {"x": {0: b} if b else {}, "t": {0: b} if b else {}}
        if self.config.conditioning == "class":
            shapes["cond"] = {0: b} if b else {}
            return shapes
        length = Dim("text_len", min=2, max=4096) if text_len else None
        dims = {k: v for k, v in ((0, b), (1, length)) if v is not None}
        shapes["cond"] = dict(dims)
        shapes["cond_mask"] = dict(dims)
        return shapes

    def example_inputs(self, batch: int, device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None, *, height: int | None = None,
                       width: int | None = None, text_len: int | None = None,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
        """Random valid positional inputs for ``model(*inputs)``: x (with binary edit mask
        and masked source for edit configs), t in (0, 1), labels or text + mask (the first
        token always real, random padding after it). ``dtype`` applies to x and text
        (default float32); t stays float32. Sizes default to the config's."""
        cfg = self.config
        device = torch.device(device) if device is not None else next(self.parameters()).device
        if device.type == "meta":
            device = torch.device("cpu")
        dtype = dtype or torch.float32
        h, w = height or cfg.latent_size[0], width or cfg.latent_size[1]
        g = generator
        gdev = g.device if g is not None else torch.device("cpu")

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g, device=gdev).to(device, dtype)

        x = randn(batch, cfg.latent_channels, h, w)
        if cfg.edit:
            src = randn(batch, cfg.latent_channels, h, w)
            mask = (torch.rand(batch, 1, h, w, generator=g, device=gdev) < 0.5).to(device, dtype)
            x = torch.cat([x, src * (1 - mask), mask], dim=1)
        t = torch.rand(batch, generator=g, device=gdev).to(device)
        if cfg.conditioning == "class":
            labels = torch.randint(0, cfg.num_classes, (batch,), generator=g, device=gdev).to(device)
            return x, t, labels
        length = text_len or cfg.text_len
        text = randn(batch, length, cfg.text_dim)
        lengths = torch.randint(1, length + 1, (batch, 1), generator=g, device=gdev)
        text_mask = (torch.arange(length, device=gdev)[None] < lengths).to(device)
        return x, t, text, text_mask

    # -- conditioning for classifier-free guidance ---------------------------------------------

    def null_cond(self, batch: int, text_len: int | None = None,
                  device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
        """Unconditional inputs: (labels=num_classes,) or (null_text, mask). For a text length
        L other than ``config.text_len`` the null embedding is cut, or zero-padded with the
        padding masked out."""
        cfg = self.config
        if self.y_embedder is not None:
            dev = device or self.y_embedder.embedding_table.weight.device
            return (torch.full((batch,), cfg.num_classes, dtype=torch.long, device=dev),)
        null = self.text_embedder.null_text
        dev = device or null.device
        length = text_len or cfg.text_len
        n = min(length, cfg.text_len)
        text = torch.zeros(batch, length, cfg.text_dim, device=dev, dtype=null.dtype)
        text[:, :n] = null[:n].to(dev)
        mask = torch.zeros(batch, length, dtype=torch.bool, device=dev)
        mask[:, :n] = True
        return text, mask

    def drop_cond(self, cond: tuple[torch.Tensor, ...], drop: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Replace the conditioning of samples where ``drop`` (bool (B,)) is True by the null
        conditioning (CFG training). Differentiable w.r.t. the null text embedding. Reads
        parameters: under FSDP call it through ``forward(..., drop=)``, not directly."""
        if self.y_embedder is not None:
            (labels,) = cond
            return (torch.where(drop, torch.full_like(labels, self.config.num_classes), labels),)
        text, mask = cond
        null_text, null_mask = self.null_cond(text.shape[0], text.shape[1], text.device)
        text = torch.where(drop[:, None, None], null_text.to(text.dtype), text)
        mask = torch.where(drop[:, None], null_mask, mask)
        return text, mask

    # -- forward -------------------------------------------------------------------------

    def pos_embed(self, grid_h: int, grid_w: int, device: torch.device) -> torch.Tensor:
        """(1, grid_h*grid_w, hidden) fp32, cached per size in eager mode (not a parameter)."""
        if torch.compiler.is_compiling():
            return sincos_2d(self.config.hidden_size, grid_h, grid_w, device)[None]
        key = (grid_h, grid_w, device)
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_2d(self.config.hidden_size, grid_h, grid_w, device)[None]
        return self._pos_cache[key]

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None,
                      cond_mask: torch.Tensor | None) -> None:
        cfg = self.config
        p, c = cfg.patch_size, cfg.latent_channels
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a (B, C, H, W) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[1] != cfg.in_channels:
            want = (f"{cfg.in_channels} = {c} latent + {c} edit_source + 1 edit_mask channels "
                    "(x = cat([x_t, edit_source, edit_mask], 1))" if cfg.edit
                    else f"{c} latent channels (edit channels are off in this config)")
            raise ValueError(f"x has {x.shape[1]} channels; config {cfg.name!r} expects {want}")
        b, _, h, w = x.shape
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {p}; "
                             f"expected H and W multiples of {p}")
        if not isinstance(t, torch.Tensor) or t.shape not in ((b,), ()):
            raise ValueError(f"t must be a float tensor of shape ({b},) or (), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        check_conditioning(cfg, b, cond, cond_mask)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                cond_mask: torch.Tensor | None = None, *, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity prediction; see the module docstring for shapes and meaning.

        ``drop`` (bool (B,), optional): samples whose conditioning is replaced by the null
        conditioning (CFG dropout in training, the unconditional half of a CFG batch). It is
        applied here, inside ``forward``, because FSDP gathers the sharded ``null_text``
        parameter only while the wrapped module's forward runs."""
        self._check_inputs(x, t, cond, cond_mask)
        cfg = self.config
        b, _, h, w = x.shape
        if drop is not None:
            if not isinstance(drop, torch.Tensor) or drop.shape != (b,) or drop.dtype != torch.bool:
                raise ValueError(f"drop must be a bool tensor of shape ({b},), got "
                                 f"{drop.dtype if isinstance(drop, torch.Tensor) else type(drop).__name__} "
                                 f"{tuple(drop.shape) if isinstance(drop, torch.Tensor) else ''}")
            if cond_mask is None:
                (cond,) = self.drop_cond((cond,), drop)
            else:
                cond, cond_mask = self.drop_cond((cond, cond_mask), drop)
        p = cfg.patch_size
        if t.dim() == 0:
            t = t.expand(b)
        wdt = self.x_embedder.proj.weight.dtype  # bf16 weights (inference): cast the inputs
        x = x.to(wdt)
        if cond_mask is not None:
            cond = cond.to(wdt)
        tokens = self.x_embedder(x)
        tokens = tokens + self.pos_embed(h // p, w // p, x.device).to(tokens.dtype)
        c = self.t_embedder(t)
        text = None
        if self.y_embedder is not None:
            c = c + self.y_embedder(cond)
        else:
            text, pooled = self.text_embedder(cond, cond_mask)
            c = c + pooled
        if self.backend == "triton":  # every residual add fused with the LayerNorm after it
            delta = gate = None
            for block in self.blocks:
                tokens, delta, gate = block(tokens, c, text, cond_mask, self.attention_backend, "triton", delta, gate)
            out = self.final_layer(tokens, c, delta, gate)
        else:
            for block in self.blocks:
                tokens = block(tokens, c, text, cond_mask, self.attention_backend)
            out = self.final_layer(tokens, c)
        return unpatchify(out, p, cfg.out_channels, h, w)

    def extra_repr(self) -> str:
        attn = "" if self.attention_backend == self.backend else f", attention={self.attention_backend}"
        return f"{self.config.describe()}; backend={self.backend}{attn}"
