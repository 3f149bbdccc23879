"""Composer training throughput: ``ditperf train`` of a preset with backend=torch, then
backend=triton, img/s and MFU as Composer's SpeedMonitor reports them.

    python bench/train.py [--preset dit-xl-2] [--batches 50] [--out FILE.json]
    python bench/train.py --smoke          # tiny preset on CPU, 4 batches each (plumbing only)
    python bench/train.py --preset t2i-1b --batches 12 --num-samples 128 \
        --set global_train_batch_size=8     # t2i-1b.yaml: FSDP (v1 on GPUs), one GPU or more

Each backend runs in its own process (``ditperf train <config> ...``) on the same synthetic
MDS dataset (``ditperf data synth``), so one run's compiled kernels or memory don't leak into
the other. Rows: ms per global batch (= global batch / img/s over SpeedMonitor's last window),
TFLOP/s per device from SpeedMonitor (analytic FLOPs from ``ditperf.model.flops``), and in
``extra``: img/s, MFU (Composer's, vs the datasheet bf16 peak: 989 TFLOP/s for H100 SXM),
final loss, and the power summary when ditperf's PowerCallback ran (on a GPU).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import Row, base_parser, finish, roofs_or_none

BENCH = "train"


#: Backend names of this benchmark -> ``ditperf train`` overrides.
BACKENDS = {"torch": ["model.backend=torch"], "triton": ["model.backend=triton"],
            "triton-norms+sdpa": ["model.backend=triton", "model.attention_backend=torch"]}


def _train(config: str, data: Path, backend: str, batches: int, out_json: Path, extra: list[str],
           timeout_s: float = 600) -> dict:
    window = min(20, max(1, batches // 2))  # SpeedMonitor's window: the steady state, not the first steps
    argv = ["ditperf", "train", config, f"data.local={data}", *BACKENDS[backend],
            f"max_duration={batches}ba", f"callbacks.speed_monitor.window_size={window}", "console_log_interval=10ba",
            f"summary_file={out_json}", *extra]
    print("$ " + " ".join(argv), flush=True)
    try:
        proc = subprocess.run(argv, check=False, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"ditperf train ({backend}) did not finish in {timeout_s:.0f} s") from exc
    if proc.returncode != 0:
        raise RuntimeError(f"ditperf train ({backend}) exited {proc.returncode}")
    return json.loads(out_json.read_text())


def _dump_partial(rows: list[Row], out: Path | None) -> None:
    """Write the rows so far: a later backend that hangs or kills its CUDA context (and the
    suite's time box with it) must not take the finished backend's numbers along."""
    if out is not None:
        from dataclasses import asdict

        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"partial": True, "rows": [asdict(r) for r in rows]}, indent=2, default=str))


def run(smoke: bool = False, quick: bool = False, *, preset: str = "dit-xl-2", batches: int = 50,
        out: Path | None = None, backend_timeout_s: float = 600,
        backends: tuple[str, ...] = ("torch", "triton"), overrides: tuple[str, ...] = (),
        num_samples: int = 8192) -> list[Row]:
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
    config, extra = (preset, list(overrides))
    if smoke:
        config, preset, batches = "tiny-cpu", "tiny", 4
        extra = ["global_train_batch_size=8", "data.num_workers=0", "data.persistent_workers=false"]
    work = Path(tempfile.mkdtemp(prefix="ditperf-train-bench-"))
    data = work / "data"
    num = 512 if smoke else num_samples
    subprocess.run(["ditperf", "data", "synth", "--out", str(data), "--preset", preset, "--num", str(num),
                    "--quiet"], check=True)
    rows = []
    for backend in backends:
        try:
            s = _train(config, data, backend, batches, work / f"summary-{backend}.json",
                       [f"model.preset={preset}", *extra], timeout_s=backend_timeout_s)
        except Exception as exc:  # noqa: BLE001 - record and go on with the other backend
            rows.append(Row(BENCH, f"train {preset}", "-", backend, None, extra={"error": str(exc)}))
            _dump_partial(rows, out)
            continue
        gbs = s["device_batch_size"] * s["world_size"]
        img_s = s.get("img_per_s_last")
        ms = 1e3 * gbs / img_s if img_s else None
        shape = f"global batch {gbs}, {s['batches']} batches, {s['precision']}"
        rows.append(Row(BENCH, f"train {preset}", shape, backend, ms, tflops=s.get("tflops_per_device_last"),
                        extra={"img_per_s": img_s, "mfu_composer": s.get("mfu_last"), "loss_last": s.get("loss_last"),
                               "gpu": s.get("gpu"), "power": s.get("power")}))
        _dump_partial(rows, out)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__)
    p.add_argument("--preset", default="dit-xl-2")
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--backend-timeout", type=float, default=600, help="seconds per backend run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra `ditperf train` override, repeatable (e.g. global_train_batch_size=8)")
    p.add_argument("--num-samples", type=int, default=8192,
                   help="synthetic samples to write (t2i-1b: ~2.5 MB each, so keep it small there)")
    p.add_argument("--backends", default="torch,triton",
                   help=f"comma-separated, in order (default torch,triton; choices: {', '.join(BACKENDS)})")
    args = p.parse_args(argv)
    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    if unknown := [b for b in backends if b not in BACKENDS]:
        p.error(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
    if not torch.cuda.is_available() and not args.smoke:
        print("bench/train.py needs a GPU (or --smoke)", file=sys.stderr)
        return 2
    rows = run(args.smoke, args.quick, preset=args.preset, batches=args.batches, out=args.out,
               backend_timeout_s=args.backend_timeout, backends=backends, overrides=tuple(args.overrides),
               num_samples=args.num_samples)
    finish(rows, title="Composer training: " + (rows[0].case if rows else args.preset), baseline="torch", out=args.out,
           roofs=roofs_or_none() if not args.smoke else None)
    ok = all(r.ms and r.extra.get("loss_last") is not None for r in rows)
    if not ok:
        print("a training run failed or logged no throughput (see rows)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
