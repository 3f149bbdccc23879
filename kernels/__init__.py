"""ditperf.kernels: fused Triton kernels for DiT blocks, with torch references.

On a machine without a CUDA GPU, importing this package turns on Triton's CPU interpreter
(``TRITON_INTERPRET=1``) unless the variable is already set, so the kernels still run
(slowly) and can be tested; the variable must be set before ``@triton.jit`` runs.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
