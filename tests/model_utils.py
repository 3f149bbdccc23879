"""Helpers shared by the model tests."""

from __future__ import annotations

import pytest
import torch
from ditperf.model import DiT


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: one intra-op thread is fastest, and it avoids OpenMP
    spin-wait slowdowns (10x measured) when other processes share the 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomize(model: DiT, std: float = 0.05) -> DiT:
    """Break the zero init so every path carries signal."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model
