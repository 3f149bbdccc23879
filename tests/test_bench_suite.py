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


def _bench_module(name: str):
    """A bench/ script imported by path (bench/ on sys.path for its own `import benchlib`)."""
    import importlib

    sys.path.insert(0, str(REPO / "bench"))
    return importlib.import_module(name)


def test_fill_ratios_pair_rows_by_shape_and_skip_failed_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """ratio_to_baseline = baseline ms / ms (> 1: faster than the baseline) for rows of the same
    (bench, case, shape); a failed row (ms None) and a shape the baseline did not run get none."""
    import random

    monkeypatch.setenv("DITPERF_PARTIAL_JSON", "")  # rows made here are not a part's partial rows
    benchlib = _bench_module("benchlib")
    Row = benchlib.Row
    ms = {(shape, prov): random.uniform(0.05, 5.0) for shape in ("S1", "S2") for prov in ("eager", "ditperf")}
    rows = [Row("norms", "ln", shape, prov, t) for (shape, prov), t in ms.items()]
    rows += [Row("norms", "ln", "S1", "compile", None),  # failed: no ratio, no crash
             Row("norms", "ln", "S3", "ditperf", 1.0),  # the baseline did not run this shape
             Row("norms", "rms", "S1", "ditperf", 1.0)]  # another case of the same shape
    benchlib.fill_ratios(rows, "eager")
    for r in rows[:4]:
        assert r.baseline == "eager"
        assert r.ratio_to_baseline == pytest.approx(ms[(r.shape, "eager")] / ms[(r.shape, r.provider)])
    assert all(r.ratio_to_baseline is None and r.baseline is None for r in rows[4:])


def test_apply_roof_reports_the_bound_closer_to_its_roof() -> None:
    import random
    import types

    benchlib = _bench_module("benchlib")
    roofs = types.SimpleNamespace(copy_gbps=random.uniform(2000, 4000), matmul_tflops=random.uniform(500, 1000))
    for _ in range(20):
        copy_pct, matmul_pct = random.uniform(1, 99), random.uniform(1, 99)
        row = benchlib.Row.__new__(benchlib.Row)  # no partial-rows side effect
        row.__dict__.update(gbps=copy_pct * roofs.copy_gbps / 100, tflops=matmul_pct * roofs.matmul_tflops / 100,
                            pct_roof=None, roof=None)
        benchlib.apply_roof(row, roofs)
        want = (copy_pct, "copy") if copy_pct > matmul_pct else (matmul_pct, "matmul")
        assert (row.pct_roof, row.roof) == (pytest.approx(want[0]), want[1])
    only_gbps = benchlib.Row.__new__(benchlib.Row)
    only_gbps.__dict__.update(gbps=roofs.copy_gbps / 2, tflops=None, pct_roof=None, roof=None)
    benchlib.apply_roof(only_gbps, roofs)
    assert (only_gbps.pct_roof, only_gbps.roof) == (pytest.approx(50.0), "copy")
    benchlib.apply_roof(only_gbps, None)  # no GPU: left alone
    assert only_gbps.roof == "copy"


def test_ratio_text_shows_the_baseline_and_the_best_sdpa_ratio() -> None:
    benchlib = _bench_module("benchlib")
    both = {"ratio_to_baseline": 2.5, "baseline": "eager", "extra": {"vs_best_sdpa": 1.234, "best_sdpa": "flash"}}
    assert benchlib.ratio_text(both) == "2.50x eager; 1.23x best SDPA (flash)"
    assert benchlib.ratio_text({"extra": {"vs_best_sdpa": 0.9, "best_sdpa": "cudnn"}}) == "0.90x best SDPA (cudnn)"
    assert benchlib.ratio_text({"ratio_to_baseline": 0.5, "baseline": "sdpa", "extra": {}}) == "0.50x sdpa"
    assert benchlib.ratio_text({"ratio_to_baseline": None, "extra": None}) == "-"


def test_finish_writes_rows_with_ratios_and_roofs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import random
    import types

    monkeypatch.setenv("DITPERF_PARTIAL_JSON", "")
    benchlib = _bench_module("benchlib")
    roofs = types.SimpleNamespace(copy_gbps=3000.0, matmul_tflops=800.0,
                                  to_dict=lambda: {"copy_gbps": 3000.0, "matmul_tflops": 800.0})
    base, ours = random.uniform(1, 2), random.uniform(0.2, 0.9)
    rows = [benchlib.Row("attention", "self fwd", "B2", "sdpa", base, tflops=200.0),
            benchlib.Row("attention", "self fwd", "B2", "ditperf", ours, gbps=2700.0, tflops=10.0)]
    doc = benchlib.finish(rows, title="t", baseline="sdpa", out=tmp_path / "sub" / "r.json", roofs=roofs,
                          extra_meta={"targets": {"x": 1}})
    back = json.loads((tmp_path / "sub" / "r.json").read_text())
    assert back == doc and back["baseline"] == "sdpa" and back["targets"] == {"x": 1}
    assert back["schema_version"] == 1 and back["roofs"] == roofs.to_dict()
    sdpa, dp = back["rows"]
    assert dp["ratio_to_baseline"] == pytest.approx(base / ours) and sdpa["ratio_to_baseline"] == pytest.approx(1.0)
    assert (dp["pct_roof"], dp["roof"]) == (pytest.approx(90.0), "copy")
    assert (sdpa["pct_roof"], sdpa["roof"]) == (pytest.approx(25.0), "matmul")
    assert "wrote" in capsys.readouterr().out


def test_partial_rows_file_holds_every_row_made_so_far(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    benchlib = _bench_module("benchlib")
    path = tmp_path / "part.partial.json"
    monkeypatch.setenv("DITPERF_PARTIAL_JSON", str(path))
    monkeypatch.setattr(benchlib, "_PARTIAL_ROWS", [])
    n = random.randint(2, 6)
    for i in range(n):
        benchlib.Row("norms", f"case{i}", "S", "ditperf", 0.1 * (i + 1))
        doc = json.loads(path.read_text())
        assert doc["partial"] is True and [r["case"] for r in doc["rows"]] == [f"case{j}" for j in range(i + 1)]
    assert not Path(str(path) + ".tmp").exists()  # written atomically


def test_ledger_keeps_every_provider_and_the_newest_run_by_date() -> None:
    """The ledger's key is (part, case, shape, provider); "newest" is the run's date, not its
    folder name (two runs of one day sort by sha in the folder name); a failed row stays in
    the ledger (as '-') until a run measures it, and never blanks an earlier measurement."""
    ledger = _bench_module("ledger")

    def row(provider, ms, case="ln"):
        return {"part": "norms", "case": case, "shape": "S", "provider": provider, "ms": ms}

    runs = [("2026-11-27-h100-fff", {"date": "2026-11-27T08:00:00+00:00", "gpu": "H100",
                                     "rows": [row("eager", 2.0), row("ditperf", 1.0)]}),
            ("2026-11-27-h100-aaa", {"date": "2026-11-27T20:00:00+00:00", "gpu": "H100",
                                     "rows": [row("ditperf", 0.5), row("ditperf", None, case="rms")]})]
    got = {(r["case"], r["provider"]): (r["ms"], r["run"]) for r in ledger.latest_rows(runs)}
    assert got == {("ln", "eager"): (2.0, "2026-11-27-h100-fff"), ("ln", "ditperf"): (0.5, "2026-11-27-h100-aaa"),
                   ("rms", "ditperf"): (None, "2026-11-27-h100-aaa")}
    newer = ("2026-11-28-h100-bbb", {"date": "2026-11-28T00:00:00+00:00", "rows": [row("ditperf", None)]})
    got = {(r["case"], r["provider"]): r["ms"] for r in ledger.latest_rows([*runs, newer])}
    assert got[("ln", "ditperf")] == 0.5
    text = ledger.render(ledger.latest_rows(runs))
    assert "| norms | rms | S | ditperf | - |" in text and "| norms | ln | S | eager | 2.0000 |" in text


def _fake_parts(bench_run, seconds: dict[str, float]):
    """Parts that each write one row (after sleeping ``seconds[name]``) to their JSON."""
    code = ("import json, sys, time; time.sleep(float(sys.argv[2])); "
            "json.dump({'rows': [{'case': sys.argv[3], 'shape': 'S', 'provider': 'p', 'ms': 1.0}]}, "
            "open(sys.argv[1], 'w'))")
    return [bench_run.Part(name, [sys.executable, "-c", code, "{out}", str(s), name], 60.0)
            for name, s in seconds.items()]


def test_only_runs_the_named_parts_in_the_order_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys) -> None:
    bench_run = _bench_module("run")
    monkeypatch.setattr(bench_run.signal, "signal", lambda *a: None)  # main's SIGTERM hook: not pytest's
    monkeypatch.setattr(bench_run, "smoke_parts", lambda: _fake_parts(bench_run, {"a": 0, "b": 0, "c": 0}))
    assert bench_run.main(["--suite", "smoke", "--out", str(tmp_path), "--only", "c", "a", "c"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [p["name"] for p in results["parts"]] == ["c", "a"]
    assert [(r["part"], r["case"]) for r in results["rows"]] == [("c", "c"), ("a", "a")]
    assert "| c | ok |" in (tmp_path / "summary.md").read_text()
    assert bench_run.main(["--suite", "smoke", "--out", str(tmp_path), "--only", "a", "zz"]) == 2
    assert "unknown parts ['zz']" in capsys.readouterr().err


def test_suite_budget_boxes_a_part_and_skips_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A part gets at most the suite's time left (not its own larger box); once under 5 s are
    left, the remaining parts are recorded as skipped, and the suite exits 1."""
    import time

    bench_run = _bench_module("run")
    monkeypatch.setattr(bench_run.signal, "signal", lambda *a: None)
    monkeypatch.setattr(bench_run, "smoke_parts", lambda: _fake_parts(bench_run, {"slow": 30, "next": 0}))
    t0 = time.perf_counter()
    assert bench_run.main(["--suite", "smoke", "--out", str(tmp_path), "--budget-s", "6"]) == 1
    assert time.perf_counter() - t0 < 25
    slow, nxt = json.loads((tmp_path / "results.json").read_text())["parts"]
    assert slow["status"].startswith("timed out after") and slow["seconds"] < 10 and slow["json"] is None
    assert nxt["status"] == "skipped (suite budget spent)" and nxt["json"] is None


def test_a_part_never_reports_an_earlier_runs_files(tmp_path: Path) -> None:
    """A part that fails without writing JSON is recorded without rows, not with the JSON (or
    partial rows) an earlier suite left in the same --out folder."""
    bench_run = _bench_module("run")
    parts = tmp_path / "parts"
    parts.mkdir()
    old = {"rows": [{"case": "old", "shape": "S", "provider": "p", "ms": 1.0}]}
    (parts / "crash.json").write_text(json.dumps(old))
    (parts / "crash.partial.json").write_text(json.dumps({"partial": True, **old}))
    result = bench_run.run_part(bench_run.Part("crash", [sys.executable, "-c", "raise SystemExit(3)"], 30.0),
                                tmp_path, 60.0)
    assert result["status"] == "failed (exit 3)" and result["json"] is None


def test_a_part_killed_by_a_signal_or_crashing_is_failed_and_keeps_its_rows(tmp_path: Path) -> None:
    bench_run = _bench_module("run")
    (tmp_path / "parts").mkdir()
    suicide = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"  # as the OOM killer would
    killed = bench_run.run_part(bench_run.Part("oom", [sys.executable, "-c", suicide], 30.0), tmp_path, 60.0)
    assert killed["status"] == "failed (exit -9)"
    code = (f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r}); from benchlib import Row; "
            "Row('norms', 'ln', 'S', 'ditperf', 0.5); Row('norms', 'ln', 'S', 'eager', 1.5); raise SystemExit(1)")
    crashed = bench_run.run_part(bench_run.Part("crash", [sys.executable, "-c", code], 30.0), tmp_path, 60.0)
    assert crashed["status"] == "failed (exit 1) (kept 2 rows it had measured)"
    assert [r["provider"] for r in crashed["json"]["rows"]] == ["ditperf", "eager"]
    full = (f"import json, sys; sys.path.insert(0, {str(REPO / 'bench')!r}); from benchlib import Row; "
            "Row('norms', 'ln', 'S', 'ditperf', 0.5); "
            "json.dump({'rows': [{'case': 'ln', 'ratio_to_baseline': 3.0}]}, open(sys.argv[1], 'w'))")
    done = bench_run.run_part(bench_run.Part("done", [sys.executable, "-c", full, "{out}"], 30.0), tmp_path, 60.0)
    assert done["status"] == "ok" and done["json"]["rows"] == [{"case": "ln", "ratio_to_baseline": 3.0}]


def test_a_parts_env_file_reaches_the_parts_after_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    bench_run = _bench_module("run")
    monkeypatch.setenv("DITPERF_TEST_FROM_PART", "before")  # restored after the test
    (tmp_path / "parts").mkdir()
    value = str(random.randint(1, 10**9))
    write = ("import sys; open(sys.argv[1], 'w').write("
             f"'# comment\\nDITPERF_TEST_FROM_PART = {value}\\n\\nnot a setting\\n')")
    writer = bench_run.Part("diag", [sys.executable, "-c", write, "{dir}/parts/diag.env"], 30.0, produces_rows=False,
                            env_file="{dir}/parts/diag.env")
    result = bench_run.run_part(writer, tmp_path, 60.0)
    assert result["status"] == "ok" and result["env"] == {"DITPERF_TEST_FROM_PART": value}
    read = ("import json, os, sys; "
            "json.dump({'rows': [], 'seen': os.environ['DITPERF_TEST_FROM_PART']}, open(sys.argv[1], 'w'))")
    reader = bench_run.Part("reader", [sys.executable, "-c", read, "{out}"], 30.0)
    assert bench_run.run_part(reader, tmp_path, 60.0)["json"]["seen"] == value


def test_ledger_matches_a_standalone_bench_row_with_the_suites_part_row() -> None:
    """A standalone benchmark's rows carry only "bench"; the suite's rows also "part": the
    table shows "part or bench", so a newer suite row replaces the older standalone one
    instead of both being listed."""
    sys.path.insert(0, str(REPO / "bench"))
    import ledger

    row = {"case": "decode", "shape": "B32", "provider": "pil"}
    runs = [("old", {"date": "2026-11-26", "rows": [{**row, "bench": "dataloader", "ms": 1.0}]}),
            ("new", {"date": "2026-11-28", "rows": [{**row, "bench": "dataloader", "part": "dataloader", "ms": 0.5}]})]
    rows = ledger.latest_rows(runs)
    assert [(r["run"], r["ms"]) for r in rows] == [("new", 0.5)]
    assert ledger.render(rows).count("| dataloader | decode | B32 | pil |") == 1
