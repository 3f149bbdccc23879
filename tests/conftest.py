"""Test setup: Triton's CPU interpreter when there is no GPU, a `gpu` marker, seeding.

TRITON_INTERPRET must be set before any module with ``@triton.jit`` kernels is imported
(the decorator reads it), hence at import time here, before anything imports ditperf.
"""

from __future__ import annotations

import hashlib
import os
import random

# Before numpy/torch load: on 2 busy cores, OpenBLAS threads fight each other and make the
# interpreter's matmuls 3-4x slower (measured by the attention work).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A fresh base seed per session (fresh random inputs on every run), printed so that a
# failure can be replayed with DITPERF_TEST_SEED=<seed>.
BASE_SEED = int(os.environ.get("DITPERF_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config: pytest.Config) -> list[str]:
    mode = f"CUDA ({torch.cuda.get_device_name()})" if HAS_CUDA else "CPU, TRITON_INTERPRET=1"
    return [f"ditperf: kernels run on {mode}; DITPERF_TEST_SEED={BASE_SEED}"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none here); runs in the GPU suite")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def seed(request: pytest.FixtureRequest) -> int:
    """Seed torch/random per test from the session seed and the test id: fresh inputs
    on each run, reproducible with DITPERF_TEST_SEED."""
    digest = hashlib.sha256(f"{BASE_SEED}:{request.node.nodeid}".encode()).digest()
    s = int.from_bytes(digest[:4], "little")
    random.seed(s)
    torch.manual_seed(s)
    return s


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests run: the GPU when there is one, else the CPU interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def nvml_absent() -> None:
    """Skip unless the real pynvml fails to load the NVML library (a machine without an
    NVIDIA driver): for tests of the no-GPU error paths."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError_LibraryNotFound:
        return
    pynvml.nvmlShutdown()
    pytest.skip("NVML works here (GPU machine)")
