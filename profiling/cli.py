"""``ditperf profile``: power/energy of any command, power->MFU calibration, kernel rooflines.

Module-level imports are stdlib only (``ditperf --help`` stays fast); the work happens in
the handlers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ditperf.cli.argtypes import positive_float, positive_int

PROFILE_HELP = """\
Measure what the GPU does, from NVML power telemetry.

  ditperf profile power -- CMD ARGS...   run a command under the power monitor
  ditperf profile calibrate              fit a power -> MFU map for this GPU (bf16 GEMM sweep)
  ditperf profile kernels                roofline of ditperf's Triton kernels vs torch
  ditperf profile traffic PRESET         bytes and FLOPs per operator of a model step (no GPU)

Power-proxy utilization = mean power / enforced power limit (and net of idle power): a
cheap, always-available signal of how busy the GPU is. With a calibration, each window
also gets an estimated MFU."""

POWER_HELP = """\
Run CMD under a background NVML sampler and report, for the whole command and for any
spans the command marks with `ditperf.profiling.power_window(name, items=..., flops=...)`:
energy (J, from the driver's energy counter), mean / p50 / peak power, power-proxy
utilization (mean power / enforced limit, and net of idle power), J/item, the counters'
real update period, clock-throttle share, and an estimated MFU when this GPU has a
calibration (`ditperf profile calibrate`), next to the MFU from the span's analytic FLOPs
when the command passes them.

Writes <out>/power.json (schema: ditperf.profiling.report), power_samples.csv and
power_timeline.png, prints a summary, and exits with CMD's exit code.

examples:
  ditperf profile power -- python bench/model.py --quick
  ditperf profile power --interval 0.01 --out runs/p1 -- ./train.sh --steps 100

Idle power is measured for --idle-seconds before CMD starts (keep the GPU idle then) or
given with --idle-power. Test hook: DITPERF_POWER_REPLAY=<replay.json> replays a recorded
trace instead of reading NVML (see ditperf.profiling.readers)."""

CALIBRATE_HELP = """\
Fit a power -> MFU map for this GPU: runs bf16 GEMMs of several sizes and duty cycles
(plus a memory-bound copy) under the power monitor, records (achieved TFLOP/s, mean
power) pairs, and fits a monotone map from power to MFU (fraction of the measured bf16
matmul roof). Stores it keyed by GPU name, driver and power limit in the user cache
(DITPERF_POWER_CALIBRATION / DITPERF_CACHE_DIR override it) and in --out. Keep the GPU
otherwise idle while it runs. Needs a CUDA GPU."""

KERNELS_HELP = """\
Time ditperf's Triton kernels (layer_norm, gated_residual_layer_norm, attention) and their
torch baselines (eager, SDPA) with triton.testing.do_bench (median, L2 flushed), measure
this GPU's roofs once (device copy GB/s, bf16 matmul TFLOP/s), and report achieved TFLOP/s
and GB/s, % of the attainable roof at each kernel's arithmetic intensity, and whether it is
memory- or compute-bound; writes kernels.json and kernels_roofline.png. Needs a CUDA GPU."""


TRAFFIC_HELP = """\
Count what one step of a DiT preset must move and compute, operator by operator, without a
GPU: the model runs on the meta device (shapes only, seconds on a CPU) under a dispatch mode
that records each ATen / ditperf operator's bytes (every input and output tensor once) and
FLOPs (matmuls; attention 4*B*H*Nq*Nk*D forward, 2.5x backward; SDPA and F.rms_norm counted
as one fused kernel each). Prints, per backend, the matmul / attention / memory-bound totals
and two floors at the given roofs: 'serial' (each call's roofline time, max(FLOPs / matmul
roof, bytes / copy roof), summed: kernels one after another on one stream) and 'fused' (every
memory-bound op hidden in a matmul), then the largest memory-bound operators.

Lower bounds: bf16 weights and activations without autocast (amp adds casts and fp32 norm
outputs), no launch gaps. The default roofs are this workplace's H100 as measured
(bench/results: 701 TFLOP/s bf16 matmul on a power-capped card, 3000 GB/s copy).

examples:
  ditperf profile traffic t2i-1b --mode cfg-step          # one guided denoising step, 1 image
  ditperf profile traffic dit-xl-2 --batch 64 --json xl.json
  ditperf profile traffic t2i-1b --edit --batch 4 --tflops 790"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="power/energy of a command, MFU calibration, kernel rooflines",
                       description=PROFILE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=lambda a: _no_sub(p))
    ps = p.add_subparsers(dest="profile_command", metavar="SUBCOMMAND")

    pw = ps.add_parser("power", help="run a command under the power monitor", description=POWER_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       usage="ditperf profile power [options] -- CMD [ARGS...]")
    pw.add_argument("--interval", type=float, default=0.02, metavar="S",
                    help="sampling interval in seconds (default 0.02; NVML refreshes at ~10-50 Hz)")
    pw.add_argument("--out", type=Path, default=None, metavar="DIR",
                    help="report directory (default ./ditperf-power-<date>-<time>)")
    pw.add_argument("--devices", default=None, metavar="I,J",
                    help="NVML device indices to read, as nvidia-smi numbers them (CUDA_VISIBLE_DEVICES "
                         "does not apply; default: all GPUs)")
    idle = pw.add_mutually_exclusive_group()
    idle.add_argument("--idle-power", type=float, default=None, metavar="W",
                      help="idle power per GPU in watts (default: measured before CMD starts)")
    idle.add_argument("--idle-seconds", type=float, default=1.0, metavar="S",
                      help="how long to measure idle power before CMD starts (default 1.0)")
    pw.add_argument("--calibration", type=Path, default=None, metavar="FILE",
                    help="power->MFU calibration file (default: the user cache, see `profile calibrate`)")
    pw.add_argument("--no-png", action="store_true", help="skip the PNG timeline")
    pw.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS", help="the command to run")
    pw.set_defaults(func=_power)

    pc = ps.add_parser("calibrate", help="fit a power -> MFU map for this GPU (needs a GPU)",
                       description=CALIBRATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    pc.add_argument("--out", type=Path, default=None, metavar="FILE",
                    help="also write the calibration to this JSON file (plus a PNG of the fit next to it)")
    pc.add_argument("--seconds", type=float, default=60.0, metavar="S",
                    help="total sweep time (default 60; ~9 points, each gets S/9 seconds, at least 1)")
    pc.add_argument("--device", type=int, default=0, metavar="N", help="CUDA device index (default 0)")
    pc.add_argument("--interval", type=float, default=0.02, metavar="S", help="sampling interval (default 0.02)")
    pc.add_argument("--no-save", action="store_true", help="do not write the user cache (only --out)")
    pc.set_defaults(func=_calibrate)

    pk = ps.add_parser("kernels", help="roofline of ditperf kernels vs torch baselines (needs a GPU)",
                       description=KERNELS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    pk.add_argument("--out", type=Path, default=Path("kernels-roofline"), metavar="DIR",
                    help="output directory (default ./kernels-roofline)")
    pk.add_argument("--power", action="store_true",
                    help="also record power around each kernel's timing loop (longer loops, ~2 s each)")
    pk.add_argument("--quick", action="store_true", help="one shape per kernel")
    pk.set_defaults(func=_kernels)

    pt = ps.add_parser("traffic", help="bytes and FLOPs per operator of a model step, floors at roofs (no GPU)",
                       description=TRAFFIC_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    pt.add_argument("preset", help="model preset (dit-s-2 ... dit-xl-2, t2i-1b, tiny)")
    pt.add_argument("--mode", choices=("train", "forward", "cfg-step"), default="train",
                    help="train: fwd + bwd + AdamW; forward; cfg-step: the model at 2x batch (default train)")
    pt.add_argument("--batch", type=positive_int, default=None, metavar="N",
                    help="samples (images for cfg-step; default 64 for class presets, 4 for text ones, "
                         "1 for cfg-step)")
    pt.add_argument("--backend", choices=("torch", "triton", "both"), default="both",
                    help="which backend's operators to count (default both)")
    pt.add_argument("--edit", action="store_true", help="the preset's edit variant (source + mask channels)")
    pt.add_argument("--height", type=positive_int, default=None, help="latent height (default: the preset's)")
    pt.add_argument("--width", type=positive_int, default=None, help="latent width (default: the preset's)")
    pt.add_argument("--text-len", type=positive_int, default=None, help="text tokens (text presets; default: the preset's)")
    pt.add_argument("--tflops", type=positive_float, default=701.0, help="matmul roof in TFLOP/s (default 701)")
    pt.add_argument("--gbps", type=positive_float, default=3000.0, help="copy roof in GB/s (default 3000)")
    pt.add_argument("--top", type=int, default=12, help="memory-bound operators listed per backend (default 12)")
    pt.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the ledgers as JSON")
    pt.set_defaults(func=_traffic)


def _no_sub(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return 2


def _user_error(msg: str, code: int = 2) -> Exception:
    from ditperf.cli.errors import UserError

    return UserError(msg, exit_code=code)


@contextlib.contextmanager
def _quiet_library_warnings() -> Iterator[None]:
    """The CLI prints warnings itself (in the summary): keep the library logger from echoing
    them while a handler runs (restored afterwards: main() may run in-process, in tests)."""
    import logging

    lg = logging.getLogger("ditperf.profiling")
    before = lg.propagate
    handler = logging.NullHandler()
    lg.addHandler(handler)
    lg.propagate = False
    try:
        yield
    finally:
        lg.removeHandler(handler)
        lg.propagate = before


def _parse_devices(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise _user_error(f"--devices must be comma-separated integers like 0,1, got {text!r}") from None


def _resolve_command(cmd: list[str]) -> list[str]:
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise _user_error("no command given: put it after --, e.g. `ditperf profile power -- python train.py`")
    exe = cmd[0]
    if os.sep in exe:
        if not os.path.exists(exe):
            raise _user_error(f"command not found: {exe}", 127)
        if os.path.isdir(exe) or not os.access(exe, os.X_OK):
            raise _user_error(f"command is not executable: {exe}", 126)
    elif shutil.which(exe) is None:
        raise _user_error(f"command not found: {exe}", 127)
    return cmd


def _power(args: argparse.Namespace) -> int:
    cmd = _resolve_command(list(args.cmd))
    if not 0.001 <= args.interval <= 10:
        raise _user_error(f"--interval must be between 0.001 and 10 seconds, got {args.interval}")
    if args.idle_seconds < 0:
        raise _user_error(f"--idle-seconds must be >= 0, got {args.idle_seconds}")
    with _quiet_library_warnings():
        return _run_power(args, cmd)


# Run CMD through a tiny exec wrapper that asks Linux to SIGTERM it if this process dies
# (prctl PR_SET_PDEATHSIG survives exec): a runner that SIGKILLs `ditperf profile power` on
# a timeout must not leave the profiled job running on the GPU. (Popen's preexec_fn would
# do the same but is unsafe with the sampling thread running.)
_PDEATHSIG_WRAPPER = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)\n"
    "except Exception:\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(143)\n"
    "try:\n"
    "    os.execvp(sys.argv[2], sys.argv[2:])\n"
    "except OSError as e:\n"
    "    print(f'ditperf profile power: cannot run {sys.argv[2]}: {e.strerror}', file=sys.stderr)\n"
    "    sys.exit(126)\n"
)


def _with_parent_death_signal(cmd: list[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return cmd
    return [sys.executable, "-S", "-c", _PDEATHSIG_WRAPPER, str(os.getpid()), *cmd]


def _run_power(args: argparse.Namespace, cmd: list[str]) -> int:
    import subprocess

    from ditperf.profiling.marks import MARKS_ENV, read_marks
    from ditperf.profiling.power import PowerMonitor
    from ditperf.profiling.readers import PowerUnavailable
    from ditperf.profiling.report import print_summary, write_report

    devices = _parse_devices(args.devices)
    try:  # the monitor opens (and later closes) NVML, or the replay test hook
        mon = PowerMonitor(devices=devices, interval_s=args.interval, idle_power_w=args.idle_power,
                           idle_s=args.idle_seconds,
                           calibration=str(args.calibration) if args.calibration else "auto")
    except PowerUnavailable as exc:
        raise _user_error(str(exc)) from None
    out = args.out or Path(f"ditperf-power-{_dt.datetime.now():%Y%m%d-%H%M%S}")
    try:  # fail before running the command, not after
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".ditperf-write-test"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        mon.reader.close()
        raise _user_error(f"cannot write the report to {out}: {exc.strerror or exc}") from None
    marks_fd, marks_path = tempfile.mkstemp(prefix="ditperf-power-marks-", suffix=".jsonl")
    os.close(marks_fd)
    env = {**os.environ, MARKS_ENV: marks_path}
    interrupted = False
    try:
        mon.start()
        print(f"ditperf profile power: sampling {len(mon.infos)} GPU(s) every {args.interval * 1e3:.0f} ms; "
              f"running: {' '.join(cmd)}", file=sys.stderr, flush=True)
        mon.begin_window("command")
        try:
            proc = subprocess.Popen(_with_parent_death_signal(cmd), env=env)
        except OSError as exc:  # found by which() but cannot run (bad interpreter line...)
            mon.stop()
            raise _user_error(f"cannot run {cmd[0]}: {exc.strerror or exc}", 126) from None
        # SIGTERM to us (a time-boxed runner) goes to the command too; we still write the report
        previous = signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
        try:
            while True:
                try:
                    rc = proc.wait()
                    break
                except KeyboardInterrupt:  # the child got the same SIGINT; wait for it to finish
                    interrupted = True
        finally:
            signal.signal(signal.SIGTERM, previous)
        mon.end_window("command")
        spans, mark_warnings = read_marks(marks_path)
        for name, t0, t1, items, flops in spans:
            try:
                mon.add_window(name, t0, t1, items=items, flops=flops, depth=1)
            except ValueError as exc:  # a bad mark from the child: say so, keep the rest
                mon.warnings.append(f"window mark {name!r} ignored: {exc}")
        for w in mark_warnings:
            mon.warnings.append(w)
    finally:
        mon.stop()
        Path(marks_path).unlink(missing_ok=True)
    exit_code = 128 - rc if rc < 0 else rc  # killed by signal N -> 128 + N, like a shell
    paths = write_report(mon, out, png=not args.no_png, command=cmd, exit_code=exit_code)
    print_summary(mon.report(command=cmd, exit_code=exit_code))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    if exit_code:
        print(f"ditperf profile power: command exited with {exit_code}"
              + (f" ({signal.Signals(-rc).name})" if rc < 0 and -rc in signal.Signals._value2member_map_ else ""),
              file=sys.stderr)
    return 130 if interrupted and exit_code == 0 else exit_code


def _need_gpu(what: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise _user_error(f"{what} needs a CUDA GPU: none is visible here (torch.cuda.is_available() is False)")


def _calibrate(args: argparse.Namespace) -> int:
    if args.seconds <= 0:
        raise _user_error(f"--seconds must be > 0, got {args.seconds}")
    _need_gpu("ditperf profile calibrate")
    with _quiet_library_warnings():
        return _run_calibrate(args)


def _run_calibrate(args: argparse.Namespace) -> int:
    import torch
    from ditperf.profiling.readers import PowerUnavailable
    from ditperf.profiling.sweep import print_calibration, run_calibration

    if not 0 <= args.device < torch.cuda.device_count():
        raise _user_error(f"--device {args.device} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    try:
        cal, paths = run_calibration(seconds=args.seconds, device=args.device, interval_s=args.interval,
                                     out=args.out, save=not args.no_save)
    except PowerUnavailable as exc:
        raise _user_error(str(exc)) from None
    print_calibration(cal)
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0


def _traffic(args: argparse.Namespace) -> int:
    """``ditperf profile traffic``: the ledgers of each backend, a table, optional JSON."""
    import json

    from ditperf.model import get_config
    from ditperf.profiling.traffic import compare_table, step_traffic

    if args.top < 0:
        raise _user_error(f"--top must be >= 0, got {args.top}")
    if args.json is not None and not args.json.parent.is_dir():
        raise _user_error(f"--json: folder {args.json.parent} does not exist")
    try:
        cfg = get_config(args.preset, edit=True) if args.edit else get_config(args.preset)
        batch = args.batch if args.batch is not None else (1 if args.mode == "cfg-step" else 64 if cfg.conditioning == "class" else 4)
        backends = ("torch", "triton") if args.backend == "both" else (args.backend,)
        ledgers = [step_traffic(cfg, b, args.mode, batch, height=args.height, width=args.width,
                                text_len=args.text_len) for b in backends]
    except ValueError as exc:
        raise _user_error(str(exc)) from None
    print(compare_table(ledgers, args.tflops, args.gbps, top=args.top))
    if args.json is not None:
        doc = {"format": "ditperf-step-traffic", "schema_version": 1,
               "ledgers": [s.to_dict(args.tflops, args.gbps) for s in ledgers]}
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def _kernels(args: argparse.Namespace) -> int:
    _need_gpu("ditperf profile kernels")
    from ditperf.profiling.roofline import print_kernel_rows, run_kernels

    with _quiet_library_warnings():
        doc, paths = run_kernels(args.out, power=args.power, quick=args.quick)
    print_kernel_rows(doc)
    print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0
