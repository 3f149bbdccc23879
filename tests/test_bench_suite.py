"""The benchmark suite's smoke mode (what CI runs on CPU) and the ledger generator."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_smoke_suite_runs_every_part(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--suite", "smoke", "--out",
                           str(tmp_path)], check=False, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["schema_version"] == 1 and results["suite"] == "smoke"
    names = ["norms", "attention", "model", "dataloader", "train", "profile-step"]
    assert [p["name"] for p in results["parts"]] == names
    assert all(p["status"] == "ok" for p in results["parts"])
    # every part produced rows, each naming its provider and shape
    parts_with_rows = {r["part"] for r in results["rows"]}
    assert parts_with_rows == set(names)
    profile = [r for r in results["rows"] if r["part"] == "profile-step"]
    for provider in ("eager", "triton"):  # a step row and its ops by category, for training and CFG
        steps = [r for r in profile if r["provider"] == provider and r["case"] == "step"]
        assert len(steps) == 2 and all(r["ms"] > 0 for r in steps)
    assert {"attention ditperf", "norms ditperf"} <= {r["case"] for r in profile if r["provider"] == "triton"}
    assert all(r["provider"] and r["shape"] for r in results["rows"])
    assert "| norms |" in (tmp_path / "summary.md").read_text()


def test_attention_diagnosis_plumbing_dry_run(tmp_path: Path) -> None:
    """bench/diag_attention.py spawns one process per kernel config and writes the env file the
    GPU suite applies to later parts: run all of it on the CPU interpreter with tiny shapes."""
    import os

    env = {**os.environ, "DITPERF_DIAG_DEVICE": "cpu", "OPENBLAS_NUM_THREADS": "1"}
    out, env_file = tmp_path / "diag.json", tmp_path / "attention.env"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "diag_attention.py"), "--out", str(out),
                           "--env-file", str(env_file)], check=False, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["jobs"] and all(job["ok"] for job in doc["jobs"]), proc.stdout
    assert doc["conclusion"].startswith("all pass"), doc["conclusion"]
    assert "conclusion: all pass" in proc.stdout
    kernel_jobs = [job for job in doc["jobs"] if job["kind"] in ("fwd", "bwd")]
    # both kinds, both head-dim paths, curated stages and num_stages=1; plus the norms step
    assert {(j["kind"], j["path"], j["stages"]) for j in kernel_jobs} == {
        (kind, path, stages) for kind in ("fwd", "bwd") for path in ("split", "padded") for stages in (">=2", "1")}
    assert any(job["kind"] == "model-norms" for job in doc["jobs"])
    # every kernel job launched its kernel repeatedly on every shape
    n_shapes = len(doc["shapes"])
    assert all(job["launches"] == n_shapes * (1 + doc["repeats"]) > 1 for job in kernel_jobs), proc.stdout
    assert all(r["repeat_identical"] for job in kernel_jobs for r in job["results"])
    assert all(j["env"]["DITPERF_ATTN_SPLIT_D"] == ("0" if j["path"] == "padded" else "1") for j in kernel_jobs)
    lines = dict(line.split("=", 1) for line in env_file.read_text().strip().splitlines())
    assert lines["DITPERF_ATTN_SPLIT_D"] == "1"  # the split passed: later parts use it
    assert all(f"{k}=" in lines["DITPERF_ATTN_CONFIGS"] for k in ("fwd", "dq", "dkdv"))


def test_gpu_suite_refuses_without_gpu(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--suite", "gpu", "--out",
                           str(tmp_path)], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr


def test_ledger_is_generated_from_run_folders(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    import ledger

    run = tmp_path / "2026-11-27-h100-abc1234"
    run.mkdir()
    row = {"part": "norms", "case": "layer_norm fwd", "shape": "B=8 N=1024 C=1152", "provider": "ditperf",
           "ms": 0.0123, "gbps": 2712.3, "tflops": None, "pct_roof": 90.4, "roof": "copy",
           "ratio_to_baseline": 2.5, "baseline": "eager"}
    (run / "results.json").write_text(json.dumps({"date": "2026-11-27T10:00:00+00:00", "gpu": "H100",
                                                  "rows": [row]}))
    older = tmp_path / "2026-11-26-h100-0000000"
    older.mkdir()
    (older / "results.json").write_text(json.dumps({"date": "2026-11-26T10:00:00+00:00", "gpu": "H100",
                                                    "rows": [{**row, "ms": 1.0}]}))
    (tmp_path / "README.md").write_text(f"# ledger\n\n{ledger.BEGIN}\nold\n{ledger.END}\ntail\n")
    assert ledger.main(["--results", str(tmp_path), "--check"]) == 1
    assert ledger.main(["--results", str(tmp_path)]) == 0
    text = (tmp_path / "README.md").read_text()
    assert "0.0123" in text and "| 1.0000 |" not in text  # the newest run wins
    assert text.endswith("tail\n") and "old" not in text
    assert ledger.main(["--results", str(tmp_path), "--check"]) == 0
    failed = tmp_path / "2026-11-28-h100-fffffff"  # a newer run whose row failed: keeps 0.0123
    failed.mkdir()
    (failed / "results.json").write_text(json.dumps({"date": "2026-11-28T10:00:00+00:00", "gpu": "H100",
                                                     "rows": [{**row, "ms": None, "gbps": None}]}))
    assert ledger.main(["--results", str(tmp_path)]) == 0
    assert "0.0123" in (tmp_path / "README.md").read_text()


def test_a_part_out_of_time_is_killed_with_its_children(tmp_path: Path) -> None:
    """bench/run.py kills a part's whole process group at its time box: a child it started
    (a `ditperf train`, pytest workers) must not keep the GPU busy for the next parts."""
    sys.path.insert(0, str(REPO / "bench"))
    import run as bench_run

    pid_file = tmp_path / "child.pid"
    part = bench_run.Part("sleepy", ["bash", "-c", f"sleep 300 & echo $! > {pid_file}; wait"], 2.0,
                          produces_rows=False)
    (tmp_path / "parts").mkdir()
    result = bench_run.run_part(part, tmp_path, 60.0)
    assert result["status"].startswith("timed out")
    child = int(pid_file.read_text())
    import time

    def alive(pid: int) -> bool:  # a zombie (killed, not yet reaped by init) counts as gone
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        return "\nState:\tZ" not in status

    for _ in range(50):
        if not alive(child):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the part's child {child} is still running")


def test_committed_ledger_is_up_to_date() -> None:
    assert subprocess.run([sys.executable, str(REPO / "bench" / "ledger.py"), "--check"], check=False).returncode == 0


def test_model_targets_report_the_analytic_cfg_floor() -> None:
    """The CFG-step target entry carries the step's FLOPs at the measured roof (the floor no
    kernel can beat) next to the measured ms, from ditperf.model.flops, not a constant."""
    import importlib.util

    sys.path.insert(0, str(REPO / "bench"))  # bench/model.py imports benchlib
    from benchlib import Row

    # by path: a plain `import model` could find the repo's model/ folder (ditperf.model)
    spec = importlib.util.spec_from_file_location("bench_model", REPO / "bench" / "model.py")
    bench_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_model)

    from ditperf.model import PRESETS, flops

    fl = flops(PRESETS["t2i-1b"], 2)["forward"]
    ms = 50.8
    rows = [Row("model", "cfg-step t2i-1b", "", "eager", ms, tflops=fl / (ms * 1e-3) / 1e12),
            Row("model", "train dit-xl-2", "", "eager", 160.0),
            Row("model", "train dit-xl-2", "", "triton", 100.0),
            Row("model", "train dit-xl-2", "", "compile", 105.0)]
    tg = bench_model.targets(rows, roof_tflops=700.0)
    cfg = tg["cfg-step t2i-1b [eager] <= 25 ms"]
    assert cfg["met"] is False and cfg["value"] == ms
    assert cfg["floor_ms_at_roof"] == pytest.approx(fl / 700e12 * 1e3)
    assert cfg["pct_of_roof_needed_for_25ms"] == pytest.approx(100 * fl / 25e-3 / 700e12)
    assert 20 < cfg["floor_ms_at_roof"] < 25  # t2i-1b: ~15.7 TFLOP per CFG step
    assert tg["train dit-xl-2: triton / eager img/s >= 1.3"] == {"value": 1.6, "met": True}
    assert tg["train dit-xl-2: triton / compile img/s >= 1.1"] == {"value": 1.05, "met": False}
    assert tg["train dit-xl-2: triton+compile / compile img/s >= 1.1"] is None
    assert "floor_ms_at_roof" not in bench_model.targets(rows)["cfg-step t2i-1b [eager] <= 25 ms"]
    # with the copy roof: the serial floor of the backend's own kernels (meta-device ledger)
    rows.append(Row("model", "cfg-step t2i-1b", "", "triton+cudagraph", 40.0, tflops=fl / 40e-3 / 1e12))
    tg = bench_model.targets(rows, roof_tflops=700.0, roof_gbps=3000.0)
    eager, triton = (tg[f"cfg-step t2i-1b [{p}] <= 25 ms"]["serial_floor_ms"] for p in ("eager", "triton+cudagraph"))
    assert 25 < triton < eager  # norms, GELU and residuals as kernels of their own: above 25 ms
    assert triton > tg["cfg-step t2i-1b [eager] <= 25 ms"]["floor_ms_at_roof"]


def test_a_part_cut_short_keeps_the_rows_it_made(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    import run as bench_run

    code = (f"import sys, time; sys.path.insert(0, {str(REPO / 'bench')!r}); from benchlib import Row; "
            "Row('attention', 'self fwd', 'B4', 'ditperf', 0.25, tflops=300.0); time.sleep(120)")
    part = bench_run.Part("slow", [sys.executable, "-c", code], 15.0)
    (tmp_path / "parts").mkdir()
    result = bench_run.run_part(part, tmp_path, 60.0)
    assert result["status"].startswith("timed out") and "kept 1 rows" in result["status"]
    (row,) = result["json"]["rows"]
    assert (row["case"], row["provider"], row["ms"], row["tflops"]) == ("self fwd", "ditperf", 0.25, 300.0)


def test_split32_trial_and_its_provider(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """diag-split32 (DITPERF_ATTN_SPLIT_MIN=32) only tells later parts that the 64+32 split is
    safe to measure; bench/attention.py then adds a ditperf-split32 provider that computes
    what SDPA does, with 96 head-dim columns for D=72, and leaves the defaults alone."""
    import importlib.util
    import os

    import torch

    env = {**os.environ, "DITPERF_DIAG_DEVICE": "cpu", "OPENBLAS_NUM_THREADS": "1", "DITPERF_ATTN_SPLIT_MIN": "32"}
    out, env_file = tmp_path / "diag.json", tmp_path / "split32.env"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "diag_attention.py"), "--out", str(out),
                           "--env-file", str(env_file)], check=False, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert env_file.read_text().strip() == "DITPERF_ATTN_SPLIT32_OK=1"

    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("bench_attention", REPO / "bench" / "attention.py")
    bench_attention = importlib.util.module_from_spec(spec)
    sys.modules["bench_attention"] = bench_attention
    spec.loader.exec_module(bench_attention)
    shape = bench_attention.Shape(1, 2, 37, 45, 72)
    assert "ditperf-split32" not in bench_attention.providers(shape, smoke=False, quick=True)
    monkeypatch.setenv("DITPERF_ATTN_SPLIT32_OK", "1")
    provs = bench_attention.providers(shape, smoke=False, quick=True)
    mod = bench_attention._attn_module()
    before = (mod.SPLIT_HEAD_DIM, mod.SPLIT_MIN)
    q, k, v = (torch.randn(1, 2, n, 72) for n in (37, 45, 45))
    launched = []
    real_launch = mod._launch
    monkeypatch.setattr(mod, "_launch", lambda kind, grid, args, meta: (
        launched.append((meta["SPLIT"], meta["BLOCK_D0"], meta["BLOCK_D1"])), real_launch(kind, grid, args, meta))[1])
    got = provs["ditperf-split32"](q, k, v, None)
    assert launched == [(True, 64, 32)]  # the 64+32 kernels ran, not the default tiles
    assert (mod.SPLIT_HEAD_DIM, mod.SPLIT_MIN) == before
    torch.testing.assert_close(got, torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=1e-4, atol=1e-4)
    with bench_attention._split_head_dim(True, split_min=32):
        assert mod.head_dim_tiles(72) == (64, 32)
    assert "ditperf-split32" not in bench_attention.providers(bench_attention.Shape(1, 2, 8, 8, 64), False, True)
