"""Kernel timing and the machine's measured roofs.

GPU: ``triton.testing.do_bench`` medians (CUDA events; it flushes L2 between repetitions
by writing a 256 MB buffer, so inputs are not served from cache). CPU (smoke runs under
the interpreter): a plain wall-clock median, good only to show the code runs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cache, partial

import torch


def time_ms(fn: Callable[[], object], *, warmup_ms: float = 25, rep_ms: float = 100,
            cpu_reps: int = 1, graph: bool = False) -> float:
    """Median milliseconds per call of ``fn``. ``graph`` (GPU): replay ``fn`` captured in a
    CUDA graph (``triton.testing.do_bench_cudagraph``), i.e. GPU time without the Python /
    dispatch overhead of each launch, which bounds sub-millisecond kernels called eagerly."""
    if torch.cuda.is_available():
        import triton.testing

        if graph:
            fn()  # warm: autotuning and allocations happen outside the capture
            torch.cuda.synchronize()
            return float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    samples = []
    for _ in range(max(1, cpu_reps)):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


@dataclass(frozen=True)
class Roofs:
    """Measured ceilings of this device: copy bandwidth (bytes read + written) and bf16
    dense matmul rate."""

    device: str
    copy_gbps: float
    matmul_tflops: float
    copy_bytes: int
    matmul_n: int

    def to_dict(self) -> dict:
        return asdict(self)


@cache
def measure_roofs(copy_mib: int = 2048, matmul_n: int = 8192) -> Roofs:
    """Measure the roofs once per process: a large device-to-device copy and a large bf16
    matmul on random data (never zeros: they run faster than real data)."""
    if not torch.cuda.is_available():
        raise RuntimeError("measure_roofs needs a CUDA GPU")
    dev = torch.device("cuda")
    n_elem = copy_mib * 2**20 // 2
    src = torch.randn(n_elem, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    copy_ms = time_ms(partial(dst.copy_, src), rep_ms=200)
    copy_bytes = 2 * src.numel() * src.element_size()
    del src, dst
    a = torch.randn(matmul_n, matmul_n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(matmul_n, matmul_n, device=dev, dtype=torch.bfloat16)
    mm_ms = time_ms(partial(torch.matmul, a, b), rep_ms=300)
    del a, b
    torch.cuda.empty_cache()
    return Roofs(
        device=torch.cuda.get_device_name(),
        copy_gbps=copy_bytes / (copy_ms * 1e-3) / 1e9,
        matmul_tflops=2 * matmul_n**3 / (mm_ms * 1e-3) / 1e12,
        copy_bytes=copy_bytes,
        matmul_n=matmul_n,
    )
