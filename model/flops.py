"""Analytic FLOPs of a DiT forward/training step (2 FLOPs per multiply-add).

Counted: every matmul (Linear, the patch-embedding convolution) and attention's two
matmuls (Q K^T and P V: 2 * 2 * N * M * D per head). Not counted: norms, activations,
softmax, residual adds and embeddings lookups (elementwise, < 1% here), which is also what
``torch.utils.flop_counter.FlopCounterMode`` counts, so the two agree to well under 2%.
``train`` = 3 x ``forward`` (the backward pass costs two matmuls per forward matmul).
"""

from __future__ import annotations

from ditperf.model.config import DiTConfig, get_config


def flops(config: DiTConfig | str, batch: int, height: int | None = None, width: int | None = None,
          text_len: int | None = None) -> dict[str, float]:
    """FLOPs for ``batch`` samples at latent size (height, width) (latent pixels; None =
    the config's default) and text length ``text_len`` (text configs; None = default).

    Returns ``{"forward", "train", "per_sample_forward", "tokens"}`` (FLOPs as floats).
    Classifier-free guidance doubles the batch: pass ``2 * batch`` for a guided step.
    """
    cfg = get_config(config) if isinstance(config, str) else config
    h = height or cfg.latent_size[0]
    w = width or cfg.latent_size[1]
    p = cfg.patch_size
    if h % p or w % p:
        raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {p}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    n = (h // p) * (w // p)
    d = cfg.hidden_size
    text = cfg.conditioning == "text"
    length = (text_len or cfg.text_len) if text else 0

    def mm(m: int, k: int, o: int) -> int:  # (m x k) @ (k x o)
        return 2 * m * k * o

    f = mm(n, cfg.in_channels * p * p, d)  # patch embedding
    f += mm(1, 256, d) + mm(1, d, d)  # timestep MLP
    if text:
        f += mm(length, cfg.text_dim, d) + mm(length, d, d)  # caption projection
        f += mm(1, cfg.text_dim, d) + mm(1, d, d)  # pooled-text MLP
    block = mm(1, d, 6 * d)  # adaLN modulation
    block += mm(n, d, 3 * d) + 2 * mm(n, d, n) + mm(n, d, d)  # self-attention
    if text:
        block += mm(n, d, d) + mm(length, d, 2 * d) + 2 * mm(n, d, length) + mm(n, d, d)
    block += mm(n, d, cfg.mlp_hidden) + mm(n, cfg.mlp_hidden, d)
    f += cfg.depth * block
    f += mm(1, d, 2 * d) + mm(n, d, p * p * cfg.out_channels)  # final layer
    fwd = float(batch * f)
    return {"forward": fwd, "train": 3.0 * fwd, "per_sample_forward": float(f), "tokens": float(n)}
