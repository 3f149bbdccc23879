"""Which attention kernel configs run correctly on this GPU + Triton (diagnosis, GPU only).

    python bench/diag_attention.py --out diag.json [--env-file attn.env] [--model-full]

Why: on an H100 with triton 3.6 the attention kernels hit "CUDA error: an illegal memory
access" probabilistically (at (4, 16, 4096, 4096, D=72) and in the DiT-XL/2 step, always inside
the autotuner's repeated launches), while a bounds-checked CPU-interpreter run of every
curated config finds no out-of-bounds access. Upstream reports (triton-lang/triton #10573,
#10486, #11366: triton >= 3.6 on sm_90, several ``tl.dot`` per kernel) point at two suspects:
(a) software pipelining, ``num_stages >= 2`` (``num_stages=1`` passed there), and (b) small
16/32-wide dot tiles, here the second head-dim tile of the split path (D=72 -> 64+16).

Design. Every job runs in its own process (a fault poisons the CUDA context) with
``CUDA_LAUNCH_BLOCKING=1`` (the error is raised at the launch that caused it), pinned to one
config per kernel with ``DITPERF_ATTN_CONFIGS``. Per shape it checks the result against SDPA
(``|ditperf - ref| <= 2 |sdpa_bf16 - ref| + 2^-8 max|ref|``, ref = fp32), then launches the
same kernel :data:`REPEATS` more times with a synchronize after each (the fault is
probabilistic) and requires the last result to be bit-identical to the first (the kernels are
deterministic: a difference means a race). Jobs, per kind (fwd; bwd = the dq + dkdv pair):

* every curated config as-is, split head-dim path (the default);
* the same configs with ``num_stages=1`` (deduplicated);
* the first curated config and its ``num_stages=1`` variant on the padded head-dim path
  (``DITPERF_ATTN_SPLIT_D=0``: D=72 -> one 128-wide tile);
* "model-norms": one DiT-XL/2-shaped bf16 training step with ditperf's norms and SDPA
  attention (isolates the norm kernels); ``--model-full`` adds one fully fused step with
  only the passing configs, after the decision.

Shapes: contiguous (4, 16, 4096, 4096, 72) (failed), q/k/v sliced from a fused qkv
projection (32, 16, 256, 256, 72) (the model's layout, failed at B=64), a masked
cross-attention (2, 16, 1024, 120, 72), and (1, 16, 4096, 4096, 128) (passed).

Decision, written to ``--env-file`` (KEY=VALUE lines; ``bench/run.py`` applies them to the
later parts): ``DITPERF_ATTN_CONFIGS=<passing split-path configs>`` when every kernel kind
(fwd, dq, dkdv) has one; else, when the padded path passes for every kind,
``DITPERF_ATTN_SPLIT_D=0`` plus ``DITPERF_ATTN_CONFIGS=<passing padded configs>``; else
nothing (exit 1). Of a path's passing configs it writes the curated (stages>=2) ones, or only
the num_stages=1 ones when any stages>=2 job of that path failed (the fault is
probabilistic: a pass is no proof). A verdict table and a one-line conclusion ("stages>=2 fail, stages=1 pass",
"split fails, padded passes", "all pass", ...) are printed and stored in ``--out``.

GPU time (H100, 16 cores; 8 jobs at a time). With the current curated lists: 9 fwd jobs
(5 curated + 4 distinct stage-1 variants), 8 bwd jobs (4 pairs + 4 stage-1 pairs), 2 + 2
padded jobs and model-norms: 22 processes. Each pays ~4 s of torch import, ~2-4 s of
compilation per kernel per head-dim variant (fwd: 2 compilations, D=72 tiles and D=128;
bwd: 4) and ~1-3 s of references and launches (4 shapes x (1 + 40) launches of at most
~3 ms each): ~12 s per fwd job, ~20 s per bwd job, ~25 s for model-norms, ~370 s of job
time in all, so ~50-70 s of wall time in 3 waves of 8 (~100 s if compiles take 2x longer
on triton 3.6). ``--total-timeout`` (default 100 s, inside bench/run.py's 110 s box) bounds
the whole diagnosis: a job not started in time is reported "skipped" (a running one gets
only the time left) and the decision uses the jobs that finished. The most decisive jobs
(the first config of each kind on both paths, as-is and with num_stages=1) run first,
right after model-norms.

CPU dry run (``DITPERF_DIAG_DEVICE=cpu``, tests/test_bench_suite.py): the same plumbing under
the interpreter with tiny shapes, only the first curated config of each kind, 2 repeats and
2 jobs at a time.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

HERE = Path(__file__).resolve()
DEVICE = os.environ.get("DITPERF_DIAG_DEVICE", "cuda")  # "cpu": a dry run under the interpreter
#: extra launches per shape after the correctness check (the fault is probabilistic)
REPEATS = 40 if DEVICE == "cuda" else 2
PARALLEL = 8 if DEVICE == "cuda" else 2  # jobs at a time (16 CPU cores compile; GPU memory is ample)
KERNELS = ("fwd", "dq", "dkdv")


def _sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


SHAPES = [  # (B, H, Nq, Nk, D, layout, mask)
    (4, 16, 4096, 4096, 72, "contig", False),
    (32, 16, 256, 256, 72, "qkv", False),
    (2, 16, 1024, 120, 72, "contig", True),
    (1, 16, 4096, 4096, 128, "contig", False),
]
if DEVICE == "cpu":  # dry run of the plumbing under the interpreter (tests/test_bench_suite.py)
    SHAPES = [(1, 2, 40, 33, 72, "contig", False), (2, 2, 24, 24, 72, "qkv", False),
              (1, 2, 30, 20, 32, "contig", True)]


def _inputs(shape: tuple, device: str = DEVICE) -> tuple:
    import torch

    b, h, nq, nk, d, layout, masked = shape
    g = torch.Generator(device=device).manual_seed(0)
    if layout == "qkv":  # the model's layout: q, k, v views of a (B, N, 3, H, D) projection
        qkv = torch.randn(b, nq, 3, h, d, device=device, generator=g, dtype=torch.bfloat16)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    else:
        q = torch.randn(b, h, nq, d, device=device, generator=g, dtype=torch.bfloat16)
        k = torch.randn(b, h, nk, d, device=device, generator=g, dtype=torch.bfloat16)
        v = torch.randn(b, h, nk, d, device=device, generator=g, dtype=torch.bfloat16)
    mask = None
    if masked:
        lengths = torch.randint(nk // 2, nk + 1, (b, 1), device=device, generator=g)
        mask = torch.arange(nk, device=device)[None] < lengths
    return q, k, v, mask


def _sdpa(q, k, v, mask):
    import torch.nn.functional as F

    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])


def _close(got, ref, base) -> tuple[bool, float]:
    err = (got.float() - ref).abs().max().item()
    atol = 2**-8 if DEVICE == "cuda" else 2**-6  # the interpreter's fp32->bf16 casts truncate
    bound = 2 * (base.float() - ref).abs().max().item() + atol * max(1.0, ref.abs().max().item())
    return err <= bound, err


def _status_of(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    if any(w in text for w in ("illegal", "CUDA error", "Triton Error [CUDA]", "misaligned", "launch failure")):
        return "fault"
    if "OutOfResources" in text or "out of resource" in text:
        return "compile"
    return "error"


def _reference_lse(q, k, mask, scale):
    import torch

    qf, kf = q.float(), k.float()
    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    for i in range(q.shape[0]):  # one sample at a time: the scores are Nq x Nk fp32
        s = (qf[i] @ kf[i].transpose(-1, -2)) * scale
        if mask is not None:
            s = s.masked_fill(~mask[i][None, None, :], float("-inf"))
        lse[i] = torch.logsumexp(s, -1)
        del s
    return lse


def worker(kind: str) -> dict:
    """Run ``kind`` (fwd | bwd) on every shape: a checked launch, then :data:`REPEATS` more with
    a synchronize each, the last compared bit for bit with the first. DITPERF_ATTN_CONFIGS pins
    the config, DITPERF_ATTN_SPLIT_D the head-dim path. Prints a PROGRESS line per shape, so a
    process that dies hard still reports how far it got."""
    import importlib

    import torch

    attn = importlib.import_module("ditperf.kernels.attention")
    last = {"kind": None}
    launch = attn._launch

    def tracking_launch(k, grid, args, meta):  # remember which kernel was launched last
        last["kind"] = k
        return launch(k, grid, args, meta)

    attn._launch = tracking_launch
    results: list[dict] = []
    for shape in SHAPES:
        q, k, v, mask = _inputs(shape)
        scale = shape[4] ** -0.5
        row: dict = {"shape": shape, "launches": 0}
        results.append(row)
        try:
            if kind == "fwd":  # (out, lse)
                run = functools.partial(torch.ops.ditperf.attention, q, k, v, mask, scale)
                first = run()
                _sync()
                row["launches"] = 1
                ref = _sdpa(q.float(), k.float(), v.float(), mask)
                ok, err = _close(first[0], ref, _sdpa(q, k, v, mask))
            else:  # backward from a torch forward (out, lse), so a bad fwd config can't interfere
                lse = _reference_lse(q, k, mask, scale)
                out = _sdpa(q, k, v, mask)
                g = torch.randn_like(out)
                run = functools.partial(torch.ops.ditperf.attention_bwd, g, None, q, k, v, out, lse, mask, scale)
                first = run()  # (dq, dk, dv)
                _sync()
                row["launches"] = 1
                leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
                ref = torch.autograd.grad(_sdpa(*leaves, mask), leaves, g.float())
                leaves16 = [t.detach().requires_grad_() for t in (q, k, v)]
                base = torch.autograd.grad(_sdpa(*leaves16, mask), leaves16, g)
                checks = [_close(a, r, b) for a, r, b in zip(first, ref, base)]
                ok, err = all(c[0] for c in checks), max(c[1] for c in checks)
            row.update(ok=ok, max_err=err, status="ok" if ok else "wrong")
            latest = first
            for _ in range(REPEATS):
                latest = run()
                _sync()
                row["launches"] += 1
            identical = all(torch.equal(a, b) for a, b in zip(first, latest))
            row["repeat_identical"] = identical
            if not identical:
                row.update(ok=False, status="nondeterministic")
        except Exception as exc:  # noqa: BLE001 - report and stop: the context may be dead
            row.update(ok=False, status=_status_of(exc), error=f"{type(exc).__name__}: {exc}"[:400],
                       last_kernel=last["kind"])
            break
        finally:
            print("PROGRESS " + json.dumps({"results": results}, default=str), flush=True)
    return {"results": results}


def model_worker(mode: str) -> dict:
    """One DiT-XL/2-shaped bf16 training step (B=16) with the triton backend; ``norms`` swaps
    attention for SDPA to test the norm kernels alone."""
    import torch
    from ditperf.model import DiT, dit, flow_matching_loss

    if mode == "norms":
        original = dit._attend

        def sdpa_attend(q, k, v, key_mask, backend):
            return original(q, k, v, key_mask, "torch")

        dit._attend = sdpa_attend
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = DiT(os.environ.get("DITPERF_DIAG_PRESET", "dit-xl-2" if DEVICE == "cuda" else "tiny"),
                    backend="torch")
    for p in model.parameters():  # leave zero-init: the fused paths see non-trivial values
        p.data.add_(torch.randn_like(p) * 0.02)
    x, _, *cond = model.example_inputs(16 if DEVICE == "cuda" else 2)
    batch = {"latents": x[:, : model.config.latent_channels].contiguous()}
    if model.config.conditioning == "class":
        batch["labels"] = cond[0]
    else:
        batch["text"], batch["text_mask"] = cond
    losses, grads = {}, {}
    for backend in ("torch", "triton"):
        model.set_backend(backend)
        model.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = flow_matching_loss(model, batch, generator=torch.Generator(DEVICE).manual_seed(1))
        loss.backward()
        _sync()
        losses[backend] = loss.item()
        grads[backend] = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    rel = ((grads["triton"] - grads["torch"]).norm() / grads["torch"].norm()).item()
    return {"losses": losses, "grad_rel_diff": rel, "ok": rel < 0.05 and abs(losses["triton"] - losses["torch"]) < 0.05}


def _spawn(args: list[str], env: dict[str, str], timeout: float) -> dict:
    if timeout <= 0:
        return {"ok": False, "status": "skipped", "error": "skipped: --total-timeout reached", "seconds": 0.0}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(HERE), *args], env=env, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        partial = _last_json(out, "PROGRESS ")
        return {**partial, "ok": False, "status": "timeout", "error": f"timed out after {timeout:.0f} s",
                "seconds": timeout}
    seconds = time.perf_counter() - t0
    result = _last_json(proc.stdout, "RESULT ")
    if result:
        return {**result, "seconds": seconds, "rc": proc.returncode}
    # died without a result (e.g. a hard crash): keep the shapes it reported
    return {**_last_json(proc.stdout, "PROGRESS "), "ok": False, "status": "crash",
            "error": f"exit {proc.returncode}: {proc.stderr[-600:]}", "seconds": seconds}


def _last_json(text: str, prefix: str) -> dict:
    for line in reversed(text.splitlines()):
        if line.startswith(prefix):
            try:
                return json.loads(line[len(prefix):])
            except json.JSONDecodeError:
                continue
    return {}


def _fmt(cfg: tuple) -> str:
    return "x".join(map(str, cfg))


def _spec(configs: dict[str, list[tuple]] | dict[str, tuple]) -> str:
    """``DITPERF_ATTN_CONFIGS`` syntax: ``fwd=128x64x3x8,64x64x4x4;dq=...``."""
    parts = []
    for kernel, cfgs in configs.items():
        cfgs = [cfgs] if isinstance(cfgs, tuple) else list(dict.fromkeys(cfgs))
        if cfgs:
            parts.append(f"{kernel}=" + ",".join(_fmt(c) for c in cfgs))
    return ";".join(parts)


def build_jobs(curated: dict[str, list[tuple]]) -> list[dict]:
    """The job list in display order, each with a run ``priority`` (lower first)."""
    fwd_sets = [{"fwd": c} for c in curated["fwd"]]
    n_bwd = max(len(curated["dq"]), len(curated["dkdv"]))  # dq config i with dkdv config i
    bwd_sets = [{"dq": curated["dq"][min(i, len(curated["dq"]) - 1)],
                 "dkdv": curated["dkdv"][min(i, len(curated["dkdv"]) - 1)]} for i in range(n_bwd)]
    if DEVICE == "cpu":  # the interpreter ignores configs: the plumbing needs one per kind
        fwd_sets, bwd_sets = fwd_sets[:1], bwd_sets[:1]

    def with_stage1(sets: list[dict]) -> list[dict]:
        out: list[dict] = []
        for cfgs in sets + [{k: (c[0], c[1], 1, c[3]) for k, c in s.items()} for s in sets]:
            if cfgs not in out:
                out.append(cfgs)
        return out

    jobs = []
    for kind, sets, rank in (("fwd", fwd_sets, 3), ("bwd", bwd_sets, 2)):
        for path in ("split", "padded"):
            variants = with_stage1(sets if path == "split" else sets[:1])
            for cfgs in variants:
                stages = "1" if all(c[2] == 1 for c in cfgs.values()) else ">=2"
                decisive = cfgs in with_stage1(sets[:1])  # the first config and its stage-1 variant
                spec = _spec(cfgs)
                jobs.append({"label": f"{kind} {spec} [{path}]", "kind": kind, "configs": cfgs,
                             "stages": stages, "path": path, "priority": 1 if decisive else rank,
                             "args": ["--worker", kind],
                             "env": {"DITPERF_ATTN_CONFIGS": spec,
                                     "DITPERF_ATTN_SPLIT_D": "1" if path == "split" else "0"}})
    jobs.append({"label": "model-norms (ditperf norms + SDPA)", "kind": "model-norms", "configs": None,
                 "stages": "-", "path": "-", "priority": 0, "args": ["--worker", "model:norms"], "env": {}})
    return jobs


def _judge(job: dict, res: dict) -> dict:
    """One report row: ok, status (first failing one), launches done, where it failed."""
    if job["kind"] == "model-norms":
        ok = bool(res.get("ok"))
        return {"ok": ok, "status": "ok" if ok else res.get("status", "wrong" if "losses" in res else "error"),
                "launches": None, "failed_shape": None, "failed_kernel": None, "error": res.get("error")}
    results = res.get("results", [])
    ok = bool(results) and len(results) == len(SHAPES) and all(r.get("ok") for r in results) and \
        res.get("status") in (None, "ok")
    bad = next((r for r in results if not r.get("ok")), None)
    status = "ok" if ok else (bad or {}).get("status") or res.get("status") or "error"
    if res.get("status") in ("timeout", "crash", "skipped"):
        status = res["status"]
    return {"ok": ok, "status": status, "launches": sum(r.get("launches", 0) for r in results),
            "failed_shape": (bad or {}).get("shape"), "failed_kernel": (bad or {}).get("last_kernel"),
            "error": res.get("error") or (bad or {}).get("error")}


def decide(report: list[dict]) -> tuple[dict[str, str], dict[str, dict[str, list]], str]:
    """(env lines, passing configs per path and kernel, one-line conclusion).

    A path's configs for the env file: its passing stages>=2 (curated) configs when none of
    its stages>=2 jobs failed, else only its passing num_stages=1 configs (the fault is
    probabilistic: a stages>=2 config that passed here may still fail later), falling back to
    every passing config when that leaves a kernel kind without one."""
    attn = [r for r in report if r["kind"] in ("fwd", "bwd")]
    passing: dict[str, dict[str, list]] = {p: {k: [] for k in KERNELS} for p in ("split", "padded")}
    for row in attn:
        if row["ok"]:
            for kernel, cfg in row["configs"].items():
                passing[row["path"]][kernel].append(tuple(cfg))

    def pick(path: str) -> dict[str, list]:
        rows = [r for r in attn if r["path"] == path]
        staged_fail = any(not r["ok"] and r["status"] not in ("skipped", "compile")
                          for r in rows if r["stages"] == ">=2")
        chosen: dict[str, list] = {k: [] for k in KERNELS}
        for r in rows:
            if r["ok"] and r["stages"] == ("1" if staged_fail else ">=2"):
                for kernel, cfg in r["configs"].items():
                    chosen[kernel].append(tuple(cfg))
        return chosen if all(chosen.values()) else passing[path]

    env: dict[str, str] = {}
    if all(passing["split"].values()):  # applied: on a GPU the default is the padded path
        env = {"DITPERF_ATTN_SPLIT_D": "1", "DITPERF_ATTN_CONFIGS": _spec(pick("split"))}
    elif all(passing["padded"].values()):
        env = {"DITPERF_ATTN_SPLIT_D": "0", "DITPERF_ATTN_CONFIGS": _spec(pick("padded"))}
    return env, passing, _conclusion(report)


def _conclusion(report: list[dict]) -> str:
    # a config out of shared memory / registers on this Triton is no evidence either way
    ran = [r for r in report if r["kind"] in ("fwd", "bwd") and r["status"] not in ("skipped", "compile")]
    n_compile = sum(r["kind"] in ("fwd", "bwd") and r["status"] == "compile" for r in report)
    groups: dict[tuple[str, str], list[bool]] = {}
    for r in ran:
        groups.setdefault((r["path"], r["stages"]), []).append(r["ok"])
    fails = {g for g, oks in groups.items() if not all(oks)}
    order = [("split", ">=2"), ("split", "1"), ("padded", ">=2"), ("padded", "1")]
    counts = ", ".join(f"{p} stages{s if s == '>=2' else '=1'}: {groups[p, s].count(False)}/{len(groups[p, s])} fail"
                       for p, s in order if (p, s) in groups)
    if n_compile:
        counts += f"; {n_compile} out of resources, not counted"
    some = "some " if any(any(groups[g]) for g in fails) else ""  # not every job of a failing group
    A, B, C = ("split", ">=2"), ("split", "1"), ("padded", ">=2")  # and ("padded", "1")
    if not ran:
        verdict = "inconclusive (no attention job ran)"
    elif not fails:
        verdict = "all pass"
    elif all(not any(oks) for oks in groups.values()) and len(groups) == 4:
        verdict = "all fail"
    elif fails == {A, C}:
        verdict = f"{some}stages>=2 fail, stages=1 pass"
    elif fails == {A, B}:
        verdict = f"{some}split fails, padded passes"
    elif fails == {A}:
        verdict = f"{some}split with stages>=2 fails; split stages=1 and padded pass"
    else:
        verdict = "inconclusive"
    norms = next((r for r in report if r["kind"] == "model-norms"), None)
    tail = "" if norms is None or norms["ok"] else f"; model-norms step {norms['status'].upper()}"
    return f"{verdict} ({counts}){tail}"


def _print_table(report: list[dict]) -> None:
    print(f"\n{'job':58s} {'stages':6s} {'path':6s} {'status':16s} {'launches':>8s} {'sec':>5s}  detail")
    for r in report:
        detail = ""
        if not r["ok"]:
            where = f"shape {tuple(r['failed_shape'])} " if r.get("failed_shape") else ""
            kern = f"kernel {r['failed_kernel']} " if r.get("failed_kernel") else ""
            detail = (where + kern + str(r.get("error") or ""))[:200].replace("\n", " ")
        launches = "-" if r["launches"] is None else str(r["launches"])
        print(f"{r['label']:58s} {r['stages']:6s} {r['path']:6s} {('ok' if r['ok'] else r['status'].upper()):16s} "
              f"{launches:>8s} {r.get('seconds', 0):5.1f}  {detail}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="results JSON (required)")
    p.add_argument("--env-file", type=Path, default=None,
                   help="where to write the decided DITPERF_ATTN_* settings (KEY=VALUE lines)")
    p.add_argument("--timeout", type=float, default=100, help="per job, seconds")
    p.add_argument("--total-timeout", type=float, default=100,
                   help="whole diagnosis, seconds: jobs not started by then are skipped")
    p.add_argument("--model-full", action="store_true", help="also a fully fused model step with the passing configs")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        try:
            res = model_worker(args.worker[6:]) if args.worker.startswith("model:") else worker(args.worker)
        except Exception as exc:  # noqa: BLE001
            res = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:600], "trace": traceback.format_exc()[-1500:]}
        print("RESULT " + json.dumps(res, default=str), flush=True)
        return 0

    if args.out is None:
        p.error("--out is required")
    import torch

    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("diag_attention needs a CUDA GPU (DITPERF_DIAG_DEVICE=cpu: a dry run of the plumbing)", file=sys.stderr)
        return 2
    from ditperf.kernels.attention import _CURATED

    base_env = {**os.environ, "CUDA_LAUNCH_BLOCKING": "1", "DITPERF_ATTN_AUTOTUNE": "curated"}
    if DEVICE == "cpu":
        base_env["TRITON_INTERPRET"] = "1"
    jobs = build_jobs(_CURATED)
    print(f"diag_attention: {len(jobs)} jobs, {PARALLEL} at a time, {len(SHAPES)} shapes x (1 + {REPEATS}) "
          f"launches each", flush=True)
    t0 = time.perf_counter()
    deadline = t0 + args.total_timeout

    def run_job(job: dict) -> dict:
        budget = min(args.timeout, deadline - time.perf_counter())
        return _spawn(job["args"], {**base_env, **job["env"]}, budget)

    outcomes: dict[int, dict] = {}
    order = sorted(range(len(jobs)), key=lambda i: (jobs[i]["priority"], i))
    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        futures = {pool.submit(run_job, jobs[i]): i for i in order}
        for fut in as_completed(futures):
            i = futures[fut]
            outcomes[i] = fut.result()
            verdict = _judge(jobs[i], outcomes[i])
            print(f"[{len(outcomes)}/{len(jobs)} {time.perf_counter() - t0:5.1f}s] {jobs[i]['label']}: "
                  f"{'ok' if verdict['ok'] else verdict['status']}", flush=True)
    report = []
    for i, job in enumerate(jobs):
        res = outcomes[i]
        report.append({**{k: v for k, v in job.items() if k not in ("args", "priority")}, **_judge(job, res),
                       "seconds": res.get("seconds", 0.0),
                       "results": res.get("results"), **{k: v for k, v in res.items()
                                                          if k in ("losses", "grad_rel_diff", "trace")}})
    env_lines, good, conclusion = decide(report)
    split_min = os.environ.get("DITPERF_ATTN_SPLIT_MIN", "16")
    conclusion = f"{conclusion} [split = a power of two + a tile of >= {split_min} columns]"
    if split_min != "16":
        # a trial of a wider split: later parts keep their defaults and only learn that it is
        # safe to measure (bench/attention.py's ditperf-split32 provider)
        passed = env_lines.get("DITPERF_ATTN_SPLIT_D") == "1"
        env_lines = {f"DITPERF_ATTN_SPLIT{split_min}_OK": "1"} if passed else {}
        conclusion += f"; {'safe' if passed else 'not safe'} to measure (later parts keep their defaults)"
    _print_table(report)
    full: dict = {"ok": None, "note": "not run (use --model-full)"}
    if args.model_full:  # the fully fused model step with only the passing configs
        full = _spawn(["--worker", "model:full"], {**base_env, "DITPERF_ATTN_SPLIT_D": "1", **env_lines},
                      args.timeout) if env_lines else \
            {"ok": False, "error": "skipped: some kernel kind has no passing config"}
        print(f"model-full   {'ok' if full.get('ok') else 'FAIL'} {json.dumps(full, default=str)[:400]}", flush=True)
    doc = {"seconds": time.perf_counter() - t0, "conclusion": conclusion, "repeats": REPEATS,
           "jobs": report, "passing": good, "env": env_lines, "model_full": full, "shapes": SHAPES}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2, default=str))
    if args.env_file is not None and env_lines:
        args.env_file.write_text("".join(f"{k}={v}\n" for k, v in env_lines.items()))
    print(f"\nconclusion: {conclusion}")
    print("env: " + (" ".join(f"{k}={v}" for k, v in env_lines.items()) or "none (no path passes for every kernel)"))
    if split_min != "16":
        return 0  # a trial: the diagnosis itself is the result, passing or not
    return 0 if env_lines and full.get("ok") is not False else 1


if __name__ == "__main__":
    sys.exit(main())
