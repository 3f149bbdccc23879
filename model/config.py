"""Model configurations and the preset registry (``ditperf.model.PRESETS``).

A :class:`DiTConfig` fixes everything that shapes the parameters: latent channels, patch
size, width/depth/heads, the conditioning (class labels or text embeddings), QK-RMSNorm and
the edit channels. The default latent size only sets defaults (example inputs, FLOPs,
sampling): the model itself runs on any H, W divisible by the patch size.

Presets:

========== ===== ===== ===== ======= ============ ============== ==========================
name       width depth heads head_dim cond        latent (C,H,W) params
========== ===== ===== ===== ======= ============ ============== ==========================
dit-s-2      384    12     6      64 1000 classes  4 x 32 x 32   33M  (DiT paper table 1)
dit-b-2      768    12    12      64 1000 classes  4 x 32 x 32   130M
dit-l-2     1024    24    16      64 1000 classes  4 x 32 x 32   458M
dit-xl-2    1152    28    16      72 1000 classes  4 x 32 x 32   675M
t2i-1b      1280    28    20      64 text 256x4096 16 x 128 x 128 ~1.03B (4096 tokens)
tiny          64     2     2      32 text 8x32     4 x 8 x 8     ~0.2M (CPU tests, demo)
========== ===== ===== ===== ======= ============ ============== ==========================

The DiT presets reproduce the paper's class-conditional models (256px images through the SD
VAE -> 32x32x4 latents, patch 2 -> 256 tokens). Their output has C channels (flow matching
predicts a velocity; DiT's learned-sigma channels are not needed), which changes the count
by hidden*p*p*C (18k for XL): the paper's rounded numbers still hold.

``t2i-1b`` is a PixArt/SD3-style text-to-image model: 16-channel latents (SD3/Flux VAE) of
1024px images (128x128, patch 2 -> 4096 tokens), conditioned on T5-XXL-like embeddings
(256 tokens of width 4096; any length L works at run time) through cross-attention after
self-attention, with QK-RMSNorm. Each block has 22*hidden^2 weights (adaLN 6, self-attn 4,
cross-attn 4, MLP 8): 28 blocks of width 1280 give 1.01B, 1.03B with the embedders.
Sampling uses SD3's time shift 3.0 at this resolution.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass
from typing import Any, Literal

Conditioning = Literal["class", "text"]


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of a latent DiT. Frozen: derive variants with :func:`get_config`."""

    name: str
    hidden_size: int
    depth: int
    num_heads: int
    patch_size: int = 2
    latent_channels: int = 4
    latent_size: tuple[int, int] = (32, 32)  # default (H, W) in latent pixels
    mlp_ratio: float = 4.0
    conditioning: Conditioning = "class"
    num_classes: int = 1000  # class configs; embedding table has one more row: the null class
    text_dim: int = 4096  # text configs: width D_text of the text-encoder embeddings
    text_len: int = 256  # text configs: default L (example inputs, FLOPs, null embedding length)
    qk_norm: bool = False  # RMSNorm (learned weight per head dim) on q and k
    edit: bool = False  # add edit channels: x = cat([x_t, edit_source, edit_mask])
    eps: float = 1e-6  # LayerNorm / RMSNorm epsilon
    sample_shift: float = 1.0  # default SD3 time shift for sampling at latent_size

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"DiTConfig {self.name!r}: {msg}")

        for field in ("hidden_size", "depth", "num_heads", "patch_size", "latent_channels", "num_classes",
                      "text_dim", "text_len"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                bad(f"{field} must be a whole number, got {value!r}")
            if field not in ("num_classes", "text_dim", "text_len") and value < 1:
                bad(f"{field} must be >= 1, got {value}")
        if isinstance(self.latent_size, list):  # e.g. from YAML / JSON
            object.__setattr__(self, "latent_size", tuple(self.latent_size))
        if not (isinstance(self.latent_size, tuple) and all(isinstance(s, int) and not isinstance(s, bool)
                                                            for s in self.latent_size)):
            bad(f"latent_size must be (H, W) whole numbers, got {self.latent_size!r}")
        if self.hidden_size % self.num_heads:
            bad(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            bad(f"hidden_size {self.hidden_size} must be a multiple of 4 (2-D sin-cos position embedding)")
        if self.conditioning not in ("class", "text"):
            bad(f"conditioning must be 'class' or 'text', got {self.conditioning!r}")
        if len(self.latent_size) != 2 or any(s % self.patch_size or s < 1 for s in self.latent_size):
            bad(f"latent_size {self.latent_size} must be (H, W), both multiples of patch_size {self.patch_size}")
        if self.conditioning == "class" and self.num_classes < 1:
            bad(f"num_classes must be >= 1, got {self.num_classes}")
        if self.conditioning == "text" and (self.text_dim < 1 or self.text_len < 1):
            bad(f"text_dim and text_len must be >= 1, got {self.text_dim}, {self.text_len}")
        for field in ("eps", "sample_shift", "mlp_ratio"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                bad(f"{field} must be a finite number, got {value!r}")
            if field != "mlp_ratio" and value <= 0:  # mlp_ratio: the MLP-width check below says more
                bad(f"{field} must be > 0, got {value!r}")
        if self.mlp_hidden < 1:
            bad(f"mlp_ratio {self.mlp_ratio} gives an MLP width of {self.mlp_hidden}; expected >= 1")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def in_channels(self) -> int:
        """Channels of the model input x: C, or C + C + 1 with edit channels."""
        return 2 * self.latent_channels + 1 if self.edit else self.latent_channels

    @property
    def out_channels(self) -> int:
        return self.latent_channels

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def num_tokens(self, height: int | None = None, width: int | None = None) -> int:
        h, w = height or self.latent_size[0], width or self.latent_size[1]
        return (h // self.patch_size) * (w // self.patch_size)

    def describe(self) -> str:
        cond = f"{self.num_classes} classes" if self.conditioning == "class" else (
            f"text L={self.text_len} D={self.text_dim}")
        extras = [e for e, on in (("qk-norm", self.qk_norm), ("edit", self.edit)) if on]
        h, w = self.latent_size
        return (f"{self.name}: width {self.hidden_size}, depth {self.depth}, heads {self.num_heads}, "
                f"patch {self.patch_size}, latent {self.latent_channels}x{h}x{w}, {cond}"
                + (", " + ", ".join(extras) if extras else ""))


def _dit(name: str, hidden: int, depth: int, heads: int) -> DiTConfig:
    return DiTConfig(name=name, hidden_size=hidden, depth=depth, num_heads=heads)


PRESETS: dict[str, DiTConfig] = {
    "dit-s-2": _dit("dit-s-2", 384, 12, 6),
    "dit-b-2": _dit("dit-b-2", 768, 12, 12),
    "dit-l-2": _dit("dit-l-2", 1024, 24, 16),
    "dit-xl-2": _dit("dit-xl-2", 1152, 28, 16),
    "t2i-1b": DiTConfig(
        name="t2i-1b", hidden_size=1280, depth=28, num_heads=20, patch_size=2, latent_channels=16,
        latent_size=(128, 128), conditioning="text", text_dim=4096, text_len=256, qk_norm=True,
        sample_shift=3.0,
    ),
    "tiny": DiTConfig(
        name="tiny", hidden_size=64, depth=2, num_heads=2, patch_size=2, latent_channels=4,
        latent_size=(8, 8), conditioning="text", text_dim=32, text_len=8, qk_norm=True,
    ),
}


def get_config(name: str | DiTConfig, **overrides: Any) -> DiTConfig:
    """The preset ``name`` (or a given config) with fields replaced by ``overrides``.

    ``get_config("tiny", edit=True, conditioning="class", num_classes=10)``. Unknown presets
    or fields raise ``ValueError`` listing the valid ones.
    """
    if isinstance(name, DiTConfig):
        base = name
    elif name in PRESETS:
        base = PRESETS[name]
    else:
        raise ValueError(f"unknown model preset {name!r}; expected one of: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(DiTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown DiTConfig field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(fields))}")
    if "latent_size" in overrides:  # an int (square) or (H, W) of whole numbers (anything with __index__)
        size = overrides["latent_size"]
        try:
            if isinstance(size, (str, bytes, bool, float)):
                raise TypeError
            items = list(size) if hasattr(size, "__len__") else [size, size]
            if any(isinstance(s, (bool, float)) for s in items):
                raise TypeError
            pair = tuple(operator.index(s) for s in items)
        except TypeError:
            raise ValueError(f"latent_size must be an int or (H, W) whole numbers, got {size!r}") from None
        overrides["latent_size"] = pair
    return dataclasses.replace(base, **overrides) if overrides else base
