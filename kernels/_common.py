"""Shared launcher plumbing for ditperf's Triton kernels.

Why this exists: the same kernel source must run compiled on a GPU (triton 3.3 in CI
images, 3.6 on the lent H100) and under Triton's CPU interpreter (``TRITON_INTERPRET=1``)
in CI. Three traps are handled here once instead of in every kernel file:

* ``@triton.autotune`` fails without a GPU (triton 3.3: already at import), so
  :func:`autotune` collapses to a single fixed config under the interpreter.
* bf16 is raw bits in the interpreter: kernels upcast right after each load and use
  :func:`dot` (upcasts bf16 operands only when ``INTERPRET`` is set) for matrix products.
* Unmasked out-of-bounds loads raise nothing in the interpreter, so launchers validate
  shapes, dtypes, strides and devices up front with :func:`check_tensor`.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterable, Sequence

import torch
import triton
import triton.language as tl

#: True when kernels run under Triton's CPU interpreter (read once, at import: the
#: interpreter itself reads the variable when ``@triton.jit`` runs).
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def autotune(
    configs: Sequence[triton.Config],
    key: list[str],
    interpret_config: triton.Config | None = None,
    **kwargs,
) -> Callable:
    """``triton.autotune`` on a GPU; one fixed config under the interpreter.

    ``interpret_config`` (default: the last config, conventionally the largest tiles) is
    applied through ``triton.heuristics``, which works in the interpreter. Large tiles keep
    the interpreter fast (its cost is per program step, not per element).
    """
    if INTERPRET:
        cfg = interpret_config or configs[-1]
        return triton.heuristics({k: (lambda _args, _v=v: _v) for k, v in cfg.kwargs.items()})
    return triton.autotune(configs=list(configs), key=key, **kwargs)


@triton.jit
def dot(a, b, acc, INTERPRET_MODE: tl.constexpr):
    """``acc + a @ b``; upcasts bf16/fp16 operands to fp32 only under the interpreter."""
    if INTERPRET_MODE:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


#: ``DITPERF_EAGER_FASTPATH=0`` routes every eager call through the torch.library custom ops
#: (read at each call; the fast path and the ops run the same launchers and math).
def eager_fast_path(*tensors: torch.Tensor | None) -> bool:
    """True when a call may skip the ``torch.library`` dispatcher and run the kernels through a
    plain ``torch.autograd.Function``: about 30 us less host time per forward and more per
    backward, which bounds sub-millisecond kernels called eagerly.

    Only for plain eager execution: not while torch.compile / torch.export / TorchScript trace
    (they must see the custom op), not under a dispatch or function mode (FlopCounterMode,
    fake tensors, ``with torch.device(...)``), not under functorch transforms, and only for
    plain tensors (no subclasses)."""
    if os.environ.get("DITPERF_EAGER_FASTPATH", "1") == "0":
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    return all(t is None or type(t) is torch.Tensor or type(t) is torch.nn.Parameter for t in tensors)


def require_kernel_device(*tensors: tuple[str, torch.Tensor]) -> torch.device:
    """All tensors on one device, and that device can run Triton kernels.

    CPU tensors are accepted only under the interpreter; on a machine without a GPU the
    error says how to get there.
    """
    devices = {t.device for _, t in tensors}
    if len(devices) != 1:
        listing = ", ".join(f"{n} on {t.device}" for n, t in tensors)
        raise ValueError(f"all tensors must be on one device, got {listing}")
    (device,) = devices
    if device.type == "cuda":
        return device
    if device.type == "cpu" and INTERPRET:
        return device
    name = tensors[0][0]
    if device.type == "cpu":
        raise ValueError(
            f"{name} is a CPU tensor: ditperf's Triton kernels need a CUDA tensor "
            "(or TRITON_INTERPRET=1 set before importing ditperf, to run them slowly on CPU); "
            "use the torch reference instead"
        )
    raise ValueError(f"{name} is on {device}: ditperf's Triton kernels need a CUDA device")


def check_tensor(
    name: str,
    t: torch.Tensor | None,
    *,
    shape: Iterable[int | None] | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    dtype: torch.dtype | None = None,
    last_dim_contiguous: bool = True,
    contiguous: bool = False,
    required: bool = False,
) -> None:
    """Raise a ``TypeError``/``ValueError`` naming ``name`` and what was expected.

    ``None`` passes (an absent optional tensor) unless ``required``. ``shape`` entries of
    ``None`` match any size. ``dtype`` demands an exact dtype (e.g. the same dtype as x),
    ``dtypes`` a set of allowed ones.
    """
    if t is None and not required:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in tuple(dtypes):
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected one of {allowed}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(
            f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected "
            f"{str(dtype).replace('torch.', '')} (the same dtype as the main input)"
        )
    if shape is not None:
        expected = tuple(shape)
        ok = t.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, t.shape))
        if not ok:
            pretty = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
            raise ValueError(f"{name} has shape {tuple(t.shape)}; expected {pretty}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous()); strides {t.stride()}")
    if last_dim_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{name} must have a contiguous last dimension (stride 1), got strides {t.stride()}; "
            "call .contiguous()"
        )


def align_hint(*values: int, cap: int) -> int:
    """Largest power of two (<= ``cap``) dividing every value (zeros ignored): the ALIGN of
    ditperf's launchers. Kernels receive row/batch/head strides in units of ALIGN elements and
    multiply them back by the constexpr ALIGN, so Triton's alignment analysis knows them to
    be multiples of it (it specializes integer arguments only on % 16) and loads 16-byte
    vectors where a stride like 72 would otherwise give 2-byte loads."""
    g = math.gcd(*values) if values else 0
    return min(cap, g & -g) if g else cap


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` current around a launch: Triton launches on the *current* CUDA device,
    so tensors on cuda:1 while cuda:0 is current would otherwise run on the wrong GPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(n)


def num_sms(device: torch.device) -> int:
    """Multiprocessor count on CUDA (used for persistent grids); a small number otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
