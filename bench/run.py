"""Run the benchmark suite and write one versioned JSON + a markdown summary + PNGs.

    python bench/run.py --suite gpu   --out DIR [--budget-s 420]
    python bench/run.py --suite smoke --out DIR          # tiny, CPU, correctness only (CI)

Parts run in priority order, each in its own subprocess with a time box (a hang or crash in
one part leaves the others' results): an attention-config diagnosis (bench/diag_attention.py:
the configs that pass are the only ones later parts autotune over), machine roofs,
attention, norms, power-profiled model benchmarks, Composer training torch vs triton
(bench/train.py; ``train-fsdp``: t2i-1b with FSDP), a per-category profile of one training
step (bench/profile_step.py), GPU-marked kernel tests, kernel rooflines, the power
calibration, the other GPU-marked tests, the model benchmark (training + inference, and with
torch.compile), the GPU demo. ``--only`` picks parts and runs them in the order given. Each part writes its own JSON
under DIR/parts/; this script merges them into DIR/results.json (schema below) and
DIR/summary.md. A part that runs out of time or fails is recorded with its status and the
tail of its log, never dropped.

results.json (schema_version 1): {schema_version, suite, date, command, git_sha, gpu,
driver, cuda, torch, triton, ditperf, roofs, budget_s, parts: [{name, status, seconds,
log_tail, json}], rows: [benchlib.Row as dict + "part"]}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


@dataclass
class Part:
    name: str
    argv: list[str]  # {out} is replaced by this part's JSON path, {dir} by DIR
    budget_s: float  # the most this part may take
    produces_rows: bool = True
    env_file: str | None = None  # KEY=VALUE lines this part may write for the parts after it


def py(*args: str) -> list[str]:
    return [sys.executable, *args]


def _pytest(name: str, files: list[str], budget_s: float) -> Part:
    tests = HERE.parent / "tests"
    return Part(name, py("-m", "pytest", "-m", "gpu", "-v", "--durations=0", "-p", "no:cacheprovider", "-rfEs",
                         f"--junitxml={{dir}}/parts/{name}.xml", *[str(tests / f) for f in files]),
                budget_s, produces_rows=False)


def gpu_parts() -> list[Part]:
    return [
        Part("diag-attention", py(str(HERE / "diag_attention.py"), "--timeout", "60", "--total-timeout", "110",
                                  "--out", "{out}", "--env-file", "{dir}/parts/attention.env"), 140,
             produces_rows=False, env_file="{dir}/parts/attention.env"),
        Part("diag-split32", ["env", "DITPERF_ATTN_SPLIT_MIN=32", *py(str(HERE / "diag_attention.py"),
                                  "--timeout", "60", "--total-timeout", "100", "--out", "{out}",
                                  "--env-file", "{dir}/parts/split32.env")], 130,
             produces_rows=False, env_file="{dir}/parts/split32.env"),
        Part("roofs", py(str(HERE / "roofs.py"), "--out", "{out}"), 40),
        # each part's own time budget sits ~25 s inside its box (start-up, compiles, JSON)
        Part("attention", py(str(HERE / "attention.py"), "--quick", "--budget-s", "60", "--out", "{out}"), 90),
        Part("norms", py(str(HERE / "norms.py"), "--quick", "--sweep-bwd", "35", "--budget-s", "55",
                         "--out", "{out}"), 120),
        Part("power-model", ["ditperf", "profile", "power", "--out", "{dir}/power-model", "--",
                             sys.executable, str(HERE / "model.py"), "--quick", "--out", "{out}"], 150),
        Part("power-train", ["ditperf", "profile", "power", "--out", "{dir}/power-train", "--",
                             sys.executable, str(HERE / "model.py"), "--quick", "--train-only",
                             "--out", "{out}"], 110),
        # 16384 samples = 64 batches of 256: SpeedMonitor's last window of the 50 stays inside epoch 0
        Part("train", py(str(HERE / "train.py"), "--preset", "dit-xl-2", "--batches", "50", "--backend-timeout", "115",
                          "--num-samples", "16384", "--backends", "torch,triton", "--out", "{out}"), 270),
        Part("train-fsdp", py(str(HERE / "train.py"), "--preset", "t2i-1b", "--batches", "12", "--num-samples", "128",
                               "--set", "global_train_batch_size=8", "--backend-timeout", "110",
                               "--backends", "torch,triton", "--out", "{out}"), 240),
        Part("profile-step", py(str(HERE / "profile_step.py"), "--out", "{out}"), 180),
        _pytest("gpu-tests-kernels", ["test_norms.py", "test_attention.py"], 280),
        Part("profile-kernels", ["ditperf", "profile", "kernels", "--quick", "--power", "--out", "{dir}/profile-kernels"], 90,
             produces_rows=False),
        Part("calibrate", ["ditperf", "profile", "calibrate", "--seconds", "30", "--out", "{out}"], 80,
             produces_rows=False),
        _pytest("gpu-tests-rest", ["test_model_backends.py", "test_profiling_gpu.py", "test_trainer.py",
                                   "test_export_onnx.py"], 270),
        Part("model", py(str(HERE / "model.py"), "--quick", "--out", "{out}"), 150),
        Part("model-compile", py(str(HERE / "model.py"), "--quick", "--train-only", "--providers", "eager",
                                 "compile", "triton", "triton+compile", "--out", "{out}"), 300),
        Part("demo", ["ditperf", "demo", "--device", "gpu", "--out", "{dir}/demo"], 200, produces_rows=False),
    ]


def smoke_parts() -> list[Part]:
    return [
        Part("norms", py(str(HERE / "norms.py"), "--smoke", "--out", "{out}"), 120),
        Part("attention", py(str(HERE / "attention.py"), "--smoke", "--out", "{out}"), 180),
        Part("model", py(str(HERE / "model.py"), "--smoke", "--out", "{out}"), 180),
        Part("dataloader", py(str(HERE / "dataloader.py"), "--smoke", "--out", "{out}"), 120),
        Part("train", py(str(HERE / "train.py"), "--smoke", "--out", "{out}"), 180),
        Part("profile-step", py(str(HERE / "profile_step.py"), "--smoke", "--out", "{out}"), 120),
    ]


def run_part(part: Part, out_dir: Path, time_left: float) -> dict:
    parts_dir = out_dir / "parts"
    json_path = parts_dir / f"{part.name}.json"
    log_path = parts_dir / f"{part.name}.log"
    argv = [a.replace("{out}", str(json_path)).replace("{dir}", str(out_dir)) for a in part.argv]
    timeout = max(1.0, min(part.budget_s, time_left))
    t0 = time.perf_counter()
    status = "ok"
    partial_path = parts_dir / f"{part.name}.partial.json"
    for stale in (json_path, partial_path):  # an earlier run's files in the same --out are not this run's
        stale.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DITPERF_PARTIAL_JSON": str(partial_path)}
    with log_path.open("w") as log:
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        try:
            # its own process group: a part that runs out of time is killed with everything it
            # started (a `ditperf train` child, pytest or diag workers would otherwise keep the
            # GPU busy while the next parts are measured)
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
                if rc != 0:
                    status = f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                status = f"timed out after {timeout:.0f} s"
            finally:
                _kill_group(proc)
        except FileNotFoundError as exc:
            status = f"could not start: {exc}"
    seconds = time.perf_counter() - t0
    tail = log_path.read_text(errors="replace")[-3000:]
    doc = None
    if json_path.exists():
        try:
            doc = json.loads(json_path.read_text())
        except json.JSONDecodeError:
            status += " (unreadable JSON)"
    if doc is None and partial_path.exists():  # cut short: the rows it made before (no ratios)
        try:
            doc = json.loads(partial_path.read_text())
            status += f" (kept {len(doc.get('rows', []))} rows it had measured)"
        except json.JSONDecodeError:
            pass
    env: dict[str, str] = {}
    if part.env_file:  # settings measured by this part, applied to the parts after it
        env_path = Path(part.env_file.replace("{dir}", str(out_dir)))
        if env_path.exists():
            for line in env_path.read_text().splitlines():
                key, sep, value = line.partition("=")
                if sep and key.strip():
                    env[key.strip()] = value.strip()
            os.environ.update(env)
    print(f"[{part.name}] {status} in {seconds:.0f} s" + (f"; env for later parts: {env}" if env else ""), flush=True)
    return {"name": part.name, "status": status, "seconds": round(seconds, 1), "log_tail": tail, "json": doc,
            "env": env}


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the part's process group (children included), SIGKILL what is left after 5 s."""
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; children may not be: one more look at the group
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return


def collect(done: list[dict], meta: dict, suite: str, budget_s: float) -> dict:
    results = {**meta, "suite": suite, "budget_s": budget_s, "parts": done, "rows": []}
    for part in done:
        doc = part["json"] or {}
        if doc.get("roofs") and not results.get("roofs"):
            results["roofs"] = doc["roofs"]
        for row in doc.get("rows", []):
            results["rows"].append({**row, "part": part["name"]})
    return results


def summarize(results: dict) -> str:
    from benchlib import ratio_text
    lines = [f"# ditperf benchmark suite: {results['suite']}", ""]
    meta_keys = ("date", "command", "git_sha", "gpu", "driver", "cuda", "torch", "triton", "ditperf")
    lines += [f"- **{k}**: {results.get(k)}" for k in meta_keys]
    roofs = results.get("roofs")
    if roofs:
        lines.append(f"- **roofs (measured)**: copy {roofs['copy_gbps']:.0f} GB/s, "
                     f"bf16 matmul {roofs['matmul_tflops']:.0f} TFLOP/s")
    lines += ["", "| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {p['name']} | {p['status']} | {p['seconds']} |" for p in results["parts"]]
    rows = results["rows"]
    if rows:
        lines += ["", "| part | case | shape | provider | ms | TFLOP/s | GB/s | % roof | vs baseline |",
                  "|---|---|---|---|---|---|---|---|---|"]

        def f(v, fmt):
            return "-" if v is None else format(v, fmt)

        for r in rows:
            roof = "-" if r.get("pct_roof") is None else f"{r['pct_roof']:.0f}% {r.get('roof')}"
            ratio = ratio_text(r)
            lines.append(f"| {r['part']} | {r['case']} | {r['shape']} | {r['provider']} | {f(r.get('ms'), '.4f')} | "
                         f"{f(r.get('tflops'), '.1f')} | {f(r.get('gbps'), '.0f')} | {roof} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=("gpu", "smoke"), required=True)
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--budget-s", type=float, default=420, help="total time budget in seconds")
    p.add_argument("--only", nargs="*", default=None, help="run only these parts (by name)")
    args = p.parse_args(argv)
    # SIGTERM (device.sh's `timeout`) as an exception: the running part's `finally` then kills
    # its process group, which lives in its own session, out of the signal's reach
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    import torch

    if args.suite == "gpu" and not torch.cuda.is_available():
        print("bench/run.py: --suite gpu needs a CUDA GPU; use --suite smoke on CPU", file=sys.stderr)
        return 2
    from benchlib import metadata

    parts = gpu_parts() if args.suite == "gpu" else smoke_parts()
    if args.only:
        unknown = set(args.only) - {pt.name for pt in parts}
        if unknown:
            print(f"unknown parts {sorted(unknown)}; known: {[pt.name for pt in parts]}", file=sys.stderr)
            return 2
        by_name = {pt.name: pt for pt in parts}
        parts = [by_name[name] for name in dict.fromkeys(args.only)]  # in the order given
    (args.out / "parts").mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + args.budget_s
    meta = metadata()
    done: list[dict] = []
    for part in parts:
        left = deadline - time.perf_counter()
        if left < 5:
            done.append({"name": part.name, "status": "skipped (suite budget spent)", "seconds": 0,
                         "log_tail": "", "json": None})
            continue
        done.append(run_part(part, args.out, left))
        results = collect(done, meta, args.suite, args.budget_s)
        if results.get("roofs") and "DITPERF_ROOFS_JSON" not in os.environ:  # later parts reuse them
            os.environ["DITPERF_ROOFS_JSON"] = json.dumps(results["roofs"])
        # rewritten after every part: a suite killed from outside keeps what it measured
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        (args.out / "summary.md").write_text(summarize(results))

    results = collect(done, meta, args.suite, args.budget_s)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "summary.md").write_text(summarize(results))
    print(summarize(results))
    failed = [pt["name"] for pt in done if pt["status"] != "ok"]
    if failed:
        print(f"parts not ok: {failed}", file=sys.stderr)
    if shutil.which("ditperf") is None:
        print("note: the `ditperf` command is not on PATH (install the package)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
