"""Data-loader throughput: samples/s per DataLoader worker reading MDS latent shards (CPU).

    python bench/dataloader.py [--smoke | --quick] [--out FILE.json] [--workers 1,2]

Writes synthetic class-conditional datasets (zstd + xxh64 MDS, as `ditperf data synth` does)
of 4x32x32 fp16 latents (DiT-XL/2 at 256px) and 16x128x128 fp16 latents (t2i-1b at 1024px,
512 KiB per sample), then times one epoch through ditperf's loader (StreamingDataset ->
StreamingDataLoader -> collate into a batch dict) after a warm-up epoch (the first read
decompresses the shards). Providers: ``streaming`` (Streaming's own per-sample reader: an
``open`` + two reads per sample) and ``ditperf-pread`` (each shard opened once per worker, one
``pread`` per sample; the
default in training). Cases: ``workers=0`` (in the main process), ``workers=1`` (one worker
process: its rate, including the hand-over to the main process, is the per-worker rate) and
``workers=2`` (rate / 2 = per worker when two share the machine).

Target: >= 3000 samples/s per worker at 4x32x32, so 8 workers per GPU feed far more than an
H100 trains (DiT-XL/2 bf16: O(1-2k) img/s). Rows: ``ms`` = ms per batch of 64, ``gbps`` =
latent bytes delivered per second, ``extra.samples_per_s_per_worker``.

Module API: ``run(smoke, quick) -> list[Row]`` (used by bench/run.py), ``main()``. Exits
non-zero when a batch is wrong (sample count, shapes, dtype, values vs Streaming's reader).
Timings are CPU and machine-load dependent (2 shared cores here).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import Row, base_parser, finish

BATCH = 64
TARGET_PER_WORKER = 3000.0  # samples/s/worker at 4x32x32

SHAPES = {  # name -> (channels, height, width)
    "4x32x32": (4, 32, 32),
    "16x128x128": (16, 128, 128),
}


def sizes(smoke: bool, quick: bool) -> dict[str, int]:
    if smoke:
        return {"4x32x32": 2048, "16x128x128": 512}
    if quick:
        return {"4x32x32": 8192, "16x128x128": 1024}
    return {"4x32x32": 32768, "16x128x128": 2048}


def write_dataset(root: Path, shape: tuple[int, int, int], num: int) -> None:
    from ditperf.model import get_config
    from ditperf.trainer import data as D

    c, h, w = shape
    cfg = get_config("dit-s-2", latent_channels=c, latent_size=(h, w))
    D.synth_dataset(root, cfg, num, seed=0, progress=False)


def one_epoch(root: Path, workers: int, provider: str) -> tuple[float, int, list[dict[str, torch.Tensor]]]:
    """(seconds, samples timed, batches) for one epoch through a fresh dataset + loader.

    The clock starts when the batch after start-up prefetch arrives: the first
    ``1 + 2 * workers`` batches (the first, and what the workers had prefetched meanwhile)
    were produced before it and are not counted, so the rate is the steady one."""
    from ditperf.trainer import data as D

    ds = D.build_dataset(root, batch_size=BATCH, shuffle=True, shuffle_seed=1, columns=["latent", "label"],
                         fast_read=provider == "ditperf-pread")
    loader = D.build_dataloader(ds, batch_size=BATCH, num_workers=workers, pin_memory=False)
    skip = 1 + 2 * workers
    batches, stamps = [], []
    for b in loader:
        batches.append(b)
        stamps.append(time.perf_counter())
    del loader, ds
    if len(batches) <= skip + 1:
        raise SystemExit(f"dataloader bench: {len(batches)} batches are too few to time past the {skip} "
                         "start-up batches; use more samples")
    timed = sum(int(b["latents"].shape[0]) for b in batches[skip + 1:])
    return stamps[-1] - stamps[skip], timed, batches


def check(batches: list[dict[str, torch.Tensor]], shape: tuple[int, int, int], reference: dict[int, np.ndarray],
          num: int) -> None:
    ids = torch.cat([b["sample_ids"] for b in batches])
    expect = num // BATCH * BATCH
    if len(ids) != expect or len(set(ids.tolist())) != expect:
        raise SystemExit(f"dataloader bench: expected {expect} distinct samples, got {len(ids)}")
    for b in batches:
        if b["latents"].shape != (BATCH, *shape) or b["latents"].dtype != torch.float16:
            raise SystemExit(f"dataloader bench: bad batch {tuple(b['latents'].shape)} {b['latents'].dtype}")
        for j, sid in enumerate(b["sample_ids"].tolist()):
            if sid in reference and not np.array_equal(b["latents"][j].numpy(), reference[sid]):
                raise SystemExit(f"dataloader bench: sample {sid} differs from Streaming's reader")


def run(smoke: bool, quick: bool, workers: tuple[int, ...] = (0, 1, 2), keep: Path | None = None) -> list[Row]:
    torch.set_num_threads(1)
    rows: list[Row] = []
    tmp = Path(tempfile.mkdtemp(prefix="ditperf-dl-")) if keep is None else keep
    try:
        for name, num in sizes(smoke, quick).items():
            shape = SHAPES[name]
            root = tmp / name
            if not (root / "ditperf_schema.json").exists():
                write_dataset(root, shape, num)
            from ditperf.trainer import data as D

            reference = {i: np.array(s["latent"]) for i, s in enumerate(D.iter_samples(root, ["latent"])) if i % 97 == 0}
            one_epoch(root, 0, "streaming")  # warm-up: decompress shards, page cache
            sample_bytes = int(np.prod(shape)) * 2
            for provider in ("streaming", "ditperf-pread"):
                for w in workers:
                    dt, n, batches = one_epoch(root, w, provider)
                    check(batches, shape, reference, num)
                    sps = n / dt
                    per_worker = sps / max(w, 1)
                    rows.append(Row(bench="dataloader", case=f"workers={w}", shape=name, provider=provider,
                                    ms=1e3 * dt / (n // BATCH), gbps=sps * sample_bytes / 1e9,
                                    extra={"samples_per_s": round(sps, 1),
                                           "samples_per_s_per_worker": round(per_worker, 1),
                                           "samples": n, "batch": BATCH, "workers": w,
                                           "target_per_worker": TARGET_PER_WORKER if name == "4x32x32" else None}))
                    print(f"{name:>10} {provider:>13} workers={w}: {sps:8.0f} samples/s "
                          f"({per_worker:.0f}/worker, {sps * sample_bytes / 1e6:.0f} MB/s)", flush=True)
    finally:
        if keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to time (comma-separated)")
    p.add_argument("--keep", type=Path, default=None, help="keep/reuse the synthetic datasets in this folder")
    args = p.parse_args()
    workers = tuple(int(w) for w in args.workers.split(","))
    rows = run(args.smoke, args.quick, workers=workers, keep=args.keep)
    finish(rows, title="MDS latent loader (CPU): samples/s per worker", baseline="streaming", out=args.out,
           extra_meta={"target_samples_per_s_per_worker_4x32x32": TARGET_PER_WORKER, "cpu_count": os.cpu_count()})
    one = [r for r in rows if r.shape == "4x32x32" and r.provider == "ditperf-pread" and r.extra["workers"] == 1]
    if one:
        got = one[0].extra["samples_per_s_per_worker"]
        verdict = "meets" if got >= TARGET_PER_WORKER else "BELOW"
        print(f"4x32x32, one worker: {got:.0f} samples/s ({verdict} the {TARGET_PER_WORKER:.0f}/worker target)")


if __name__ == "__main__":
    main()
