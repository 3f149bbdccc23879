"""``ditperf version``: what is installed and which GPU (if any) is visible."""

from __future__ import annotations

import argparse


def versions() -> dict[str, str]:
    """ditperf, torch, triton, CUDA and GPU facts as strings (also used by bench metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    info: dict[str, str] = {}
    try:
        info["ditperf"] = version("ditperf")
    except PackageNotFoundError:
        info["ditperf"] = "not installed"
    info["torch"] = torch.__version__
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if torch.cuda.is_available():
        info["cuda"] = str(torch.version.cuda)
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_count"] = str(torch.cuda.device_count())
    else:
        info["cuda"] = "n/a"
        info["gpu"] = "no GPU"
    return info


def _run(args: argparse.Namespace) -> int:
    for key, value in versions().items():
        print(f"{key:>10}: {value}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("version", help="print ditperf, torch, triton and CUDA/GPU versions",
                       description="Print ditperf, torch, triton, CUDA and GPU (or 'no GPU').")
    p.set_defaults(func=_run)
