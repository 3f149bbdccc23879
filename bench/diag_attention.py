"""Which attention kernel configs run correctly on this GPU + Triton (diagnosis, GPU only).

    python bench/diag_attention.py --out diag.json [--env-file attn.env]

Why: the first H100 run (triton 3.6, 2026-11-27) hit "an illegal memory access" inside the
attention autotuner at (4, 16, 4096, 4096, D=72), while the same kernels pass a bounds-checked
CPU-interpreter run with every curated config. This script isolates each curated config of
each kernel (fwd, dq, dkdv) in its own process (a faulting kernel poisons the CUDA context)
with ``CUDA_LAUNCH_BLOCKING=1`` (the error is reported at the launch that caused it) on the
shapes that failed plus DiT shapes: contiguous (B, H, N, D), q/k/v sliced from a fused qkv
projection (the model's layout), a masked cross-attention, D = 72 and 128. Each result is
checked against SDPA (``|ditperf - ref| <= 2 |sdpa_bf16 - ref| + 2^-8 max|ref|``, ref = fp32).

It also runs one DiT-XL/2-shaped training step with ditperf's norms and SDPA attention
(isolates the norm kernels) and, with ``--model-full``, one fully fused with only the configs
that passed. It writes ``DITPERF_ATTN_CONFIGS=<passing configs>`` to ``--env-file`` so the
rest of a suite run autotunes over configs known to work (``bench/run.py`` reads it), and
all results to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve()
DEVICE = os.environ.get("DITPERF_DIAG_DEVICE", "cuda")  # "cpu": a dry run under the interpreter


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


def worker(kind: str) -> dict:
    """Run ``kind`` (fwd | bwd) on every shape; DITPERF_ATTN_CONFIGS pins the config."""
    import importlib

    import torch

    attn = importlib.import_module("ditperf.kernels.attention")
    last = {"kind": None}
    launch = attn._launch

    def tracking_launch(k, grid, args, meta):  # remember which kernel was launched last
        last["kind"] = k
        return launch(k, grid, args, meta)

    attn._launch = tracking_launch
    results = []
    for shape in SHAPES:
        q, k, v, mask = _inputs(shape)
        scale = shape[4] ** -0.5
        try:
            if kind == "fwd":
                out, lse = torch.ops.ditperf.attention(q, k, v, mask, scale)
                _sync()
                ref = _sdpa(q.float(), k.float(), v.float(), mask)
                ok, err = _close(out, ref, _sdpa(q, k, v, mask))
            else:  # backward from a torch forward (out, lse), so a bad fwd config can't interfere
                qf, kf = q.float(), k.float()
                lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
                for i in range(q.shape[0]):  # one sample at a time: the scores are Nq x Nk fp32
                    s = (qf[i] @ kf[i].transpose(-1, -2)) * scale
                    if mask is not None:
                        s = s.masked_fill(~mask[i][None, None, :], float("-inf"))
                    lse[i] = torch.logsumexp(s, -1)
                    del s
                out = _sdpa(q, k, v, mask)
                g = torch.randn_like(out)
                dq, dk, dv = torch.ops.ditperf.attention_bwd(g, None, q, k, v, out, lse, mask, scale)
                _sync()
                leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
                ref = torch.autograd.grad(_sdpa(*leaves, mask), leaves, g.float())
                leaves16 = [t.detach().requires_grad_() for t in (q, k, v)]
                base = torch.autograd.grad(_sdpa(*leaves16, mask), leaves16, g)
                checks = [_close(a, r, b) for a, r, b in zip((dq, dk, dv), ref, base)]
                ok, err = all(c[0] for c in checks), max(c[1] for c in checks)
            results.append({"shape": shape, "ok": ok, "max_err": err})
        except Exception as exc:  # noqa: BLE001 - report and stop: the context may be dead
            results.append({"shape": shape, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:400],
                            "last_kernel": last["kind"]})
            break
    return {"results": results}


def model_worker(mode: str) -> dict:
    """One DiT-XL/2-shaped bf16 training step (B=16) with the triton backend; ``norms`` swaps
    attention for SDPA to test the norm kernels alone."""
    import torch

    import ditperf.model.dit as dit
    from ditperf.model import DiT, flow_matching_loss

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
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(HERE), *args], env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "seconds": timeout}
    seconds = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return {**json.loads(line[7:]), "seconds": seconds, "rc": proc.returncode}
    return {"ok": False, "error": f"exit {proc.returncode}: {proc.stderr[-600:]}", "seconds": seconds}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="results JSON (required)")
    p.add_argument("--env-file", type=Path, default=None)
    p.add_argument("--timeout", type=float, default=100, help="per job, seconds")
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
    jobs = []
    for i, cfg in enumerate(_CURATED["fwd"]):
        spec = "fwd=" + "x".join(map(str, cfg))
        jobs.append(("fwd", cfg, ["--worker", "fwd"], {**base_env, "DITPERF_ATTN_CONFIGS": spec}))
    n_bwd = max(len(_CURATED["dq"]), len(_CURATED["dkdv"]))
    for i in range(n_bwd):  # dq config i with dkdv config i; LAUNCH_BLOCKING names the kernel
        dq = _CURATED["dq"][min(i, len(_CURATED["dq"]) - 1)]
        dkdv = _CURATED["dkdv"][min(i, len(_CURATED["dkdv"]) - 1)]
        spec = f"dq={'x'.join(map(str, dq))};dkdv={'x'.join(map(str, dkdv))}"
        jobs.append(("bwd", (dq, dkdv), ["--worker", "bwd"], {**base_env, "DITPERF_ATTN_CONFIGS": spec}))
    jobs.append(("model-norms", None, ["--worker", "model:norms"], {**base_env}))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=5 if DEVICE == "cuda" else 2) as pool:  # GPU memory: a few GB each
        outcomes = list(pool.map(lambda j: _spawn(j[2], j[3], args.timeout), jobs))
    good: dict[str, list[tuple]] = {"fwd": [], "dq": [], "dkdv": []}
    report = []
    for (kind, cfg, _, env), res in zip(jobs, outcomes):
        results = res.get("results", [])
        ok = bool(results) and all(r.get("ok") for r in results) if kind in ("fwd", "bwd") else bool(res.get("ok"))
        failed_kernel = next((r.get("last_kernel") for r in results if not r.get("ok")), None)
        if kind == "fwd" and ok:
            good["fwd"].append(cfg)
        if kind == "bwd":
            dq, dkdv = cfg
            if ok:
                good["dq"].append(dq)
                good["dkdv"].append(dkdv)
        report.append({"job": kind, "config": cfg, "env": env.get("DITPERF_ATTN_CONFIGS"), "ok": ok,
                       "failed_kernel": failed_kernel, **res})
        print(f"{kind:12s} {str(cfg):40s} {'ok' if ok else 'FAIL'} "
              f"{res.get('seconds', 0):5.1f}s {'' if ok else str(res.get('error') or results)[:300]}", flush=True)
    spec = ";".join(f"{k}=" + ",".join("x".join(map(str, c)) for c in dict.fromkeys(v)) for k, v in good.items() if v)
    env_lines = {"DITPERF_ATTN_CONFIGS": spec} if all(good.values()) else {}
    full: dict = {"ok": None, "note": "not run (use --model-full)"}
    if args.model_full:  # the fully fused model step with only the passing configs
        full = _spawn(["--worker", "model:full"], {**base_env, **env_lines}, args.timeout) if env_lines else \
            {"ok": False, "error": "skipped: some kernel kind has no passing config"}
        print(f"model-full   {'ok' if full.get('ok') else 'FAIL'} {json.dumps(full, default=str)[:400]}", flush=True)
    doc = {"seconds": time.perf_counter() - t0, "jobs": report, "passing": good, "env": env_lines,
           "model_full": full, "shapes": SHAPES}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2, default=str))
    if args.env_file is not None and env_lines:
        args.env_file.write_text("".join(f"{k}={v}\n" for k, v in env_lines.items()))
    print(f"passing configs: {spec or 'none'}")
    return 0 if env_lines and full.get("ok") is not False else 1


if __name__ == "__main__":
    sys.exit(main())
