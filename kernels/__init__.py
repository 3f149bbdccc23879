"""ditperf.kernels: fused Triton kernels for DiT blocks, with torch references.

On a machine without a CUDA GPU, importing this package turns on Triton's CPU interpreter
(``TRITON_INTERPRET=1``) unless the variable is already set, so the kernels still run
(slowly) and can be tested; the variable must be set before ``@triton.jit`` runs.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from ditperf.kernels.attention import attention, attention_ref, joint_attention_mask
from ditperf.kernels.norms import (
    gated_residual_layer_norm,
    gated_residual_layer_norm_ref,
    layer_norm,
    layer_norm_ref,
    rms_norm,
    rms_norm_ref,
)

__all__ = [
    "attention",
    "attention_ref",
    "gated_residual_layer_norm",
    "gated_residual_layer_norm_ref",
    "joint_attention_mask",
    "layer_norm",
    "layer_norm_ref",
    "rms_norm",
    "rms_norm_ref",
]
