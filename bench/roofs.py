"""Measure this GPU's roofs: device-to-device copy bandwidth (bytes read + written) and
dense bf16 matmul throughput, the ceilings every other benchmark is compared with.

    python bench/roofs.py [--out roofs.json]

Anchors on an H100 SXM (this workplace, 2026-11-13): ~3.0 TB/s copy, ~790-798 TFLOP/s for an
8192^3 bf16 matmul on random data.
"""

from __future__ import annotations

import sys

import torch
from benchlib import Row, base_parser, finish


def run(smoke: bool = False, quick: bool = False) -> tuple[list[Row], object]:
    from ditperf.profiling import measure_roofs

    roofs = measure_roofs()
    rows = [
        Row("roofs", "d2d copy", f"{roofs.copy_bytes // 2**20} MiB moved", "torch.copy_",
            ms=roofs.copy_bytes / roofs.copy_gbps / 1e6, gbps=roofs.copy_gbps),
        Row("roofs", "bf16 matmul", f"{roofs.matmul_n}^3", "torch.matmul",
            ms=2 * roofs.matmul_n**3 / roofs.matmul_tflops / 1e9, tflops=roofs.matmul_tflops),
    ]
    return rows, roofs


def main() -> int:
    args = base_parser(__doc__).parse_args()
    if not torch.cuda.is_available():
        print("roofs need a CUDA GPU; nothing to measure here", file=sys.stderr)
        return 0 if args.smoke else 2
    rows, roofs = run()
    finish(rows, title="machine roofs", baseline="torch.copy_", out=args.out, roofs=roofs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
