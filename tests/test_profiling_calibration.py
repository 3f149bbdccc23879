"""Power -> MFU calibration fit and lookup, kernel roofline math and plot (CPU)."""

from __future__ import annotations

import json
import random
from itertools import pairwise

import numpy as np
import pytest
from ditperf.profiling.calibration import (
    Calibration,
    default_calibration_path,
    find_calibration,
    fit_monotone,
    isotonic_increasing,
    load_calibrations,
    save_calibration,
)
from ditperf.profiling.readers import DeviceInfo
from ditperf.profiling.roofline import plot_roofline, roofline_point


def test_isotonic_pools_violators_and_keeps_weighted_mean():
    y = [1.0, 3.0, 2.0, 2.0, 5.0, 4.0]
    w = [1.0, 1.0, 2.0, 1.0, 1.0, 3.0]
    fit = isotonic_increasing(y, w)
    assert np.all(np.diff(fit) >= 0)
    np.testing.assert_allclose(fit, [1.0, 2.25, 2.25, 2.25, 4.25, 4.25])
    assert np.dot(fit, w) == pytest.approx(np.dot(y, w))
    np.testing.assert_allclose(isotonic_increasing([1, 2, 3]), [1, 2, 3])


def test_fit_monotone_recovers_a_noisy_monotone_curve():
    rng = np.random.default_rng(random.randrange(2**31))
    true = lambda p: np.clip((p - 80.0) / 600.0, 0, 1) ** 1.3 * 0.8
    power = rng.uniform(80, 700, size=60)
    mfu = true(power) + rng.normal(0, 0.02, size=60)
    kp, km = fit_monotone(power, mfu)
    assert all(b > a for a, b in pairwise(kp)) and all(b >= a for a, b in pairwise(km))
    cal = Calibration(gpu_name="g", driver="d", power_limit_w=700.0, roof_tflops=800.0, knots_power_w=kp,
                      knots_mfu=km)
    grid = np.linspace(120, 660, 50)
    est = np.array([cal.mfu_at(p) for p in grid])
    assert np.all(np.diff(est) >= -1e-12)
    assert np.max(np.abs(est - true(grid))) < 0.08
    assert cal.mfu_at(10.0) == pytest.approx(km[0]) and cal.mfu_at(5000.0) == pytest.approx(km[-1])
    assert cal.in_range(kp[0]) and not cal.in_range(kp[-1] + 1)


def test_fit_monotone_pools_a_non_monotone_sweep():
    # a launch-bound small GEMM at high power but low MFU pulls its neighbours down
    kp, km = fit_monotone([70, 200, 300, 400, 500], [0.0, 0.2, 0.1, 0.5, 0.7])
    assert kp == pytest.approx([70.0, 250.0, 400.0, 500.0])
    assert km == pytest.approx([0.0, 0.15, 0.5, 0.7])


def test_fit_monotone_input_checks():
    with pytest.raises(ValueError, match="two or more distinct power"):
        fit_monotone([300, 300], [0.1, 0.2])
    with pytest.raises(ValueError, match="same length"):
        fit_monotone([1, 2, 3], [0.1, 0.2])
    with pytest.raises(ValueError, match="finite"):
        fit_monotone([1, float("nan")], [0.1, 0.2])
    with pytest.raises(ValueError, match="non-decreasing"):
        Calibration(gpu_name="g", driver="d", power_limit_w=1.0, roof_tflops=1.0, knots_power_w=[1, 2],
                    knots_mfu=[0.5, 0.1])


def _cal(name="NVIDIA H100 80GB HBM3", driver="550.54.15", limit=700.0):
    pts = [{"label": "idle", "power_w": 75.0, "mfu": 0.0}, {"label": "a", "power_w": 400.0, "mfu": 0.4},
           {"label": "b", "power_w": 690.0, "mfu": 0.75}]
    return Calibration.fit(pts, gpu_name=name, driver=driver, power_limit_w=limit, roof_tflops=760.0,
                           idle_power_w=75.0, memory_bound={"label": "copy", "gbps": 2900.0, "power_w": 420.0})


def test_save_load_and_find(tmp_path):
    path = tmp_path / "cal.json"
    cal = _cal()
    save_calibration(cal, path)
    save_calibration(_cal(name="NVIDIA A100-SXM4-40GB", limit=400.0), path)
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == 1 and len(doc["calibrations"]) == 2
    back = load_calibrations(path)[cal.key]
    assert back.knots_power_w == cal.knots_power_w and back.memory_bound["gbps"] == 2900.0
    assert cal.key == "NVIDIA H100 80GB HBM3|driver 550.54.15|limit 700 W"

    info = DeviceInfo(index=0, name="NVIDIA H100 80GB HBM3", driver="550.54.15", power_limit_w=700.0)
    got, note = find_calibration(info, path)
    assert got is not None and got.key == cal.key and "cal.json" in note
    other_driver = DeviceInfo(index=0, name="NVIDIA H100 80GB HBM3", driver="560.1", power_limit_w=700.0)
    got, note = find_calibration(other_driver, path)
    assert got is not None and "driver 550.54.15" in note
    capped = DeviceInfo(index=0, name="NVIDIA H100 80GB HBM3", driver="550.54.15", power_limit_w=500.0)
    got, note = find_calibration(capped, path)
    assert got is None and "profile calibrate" in note


def test_default_path_honours_env(tmp_path, monkeypatch):
    monkeypatch.delenv("DITPERF_POWER_CALIBRATION", raising=False)
    monkeypatch.setenv("DITPERF_CACHE_DIR", str(tmp_path))
    assert default_calibration_path() == tmp_path / "power_calibration.json"
    monkeypatch.setenv("DITPERF_POWER_CALIBRATION", str(tmp_path / "x.json"))
    assert default_calibration_path() == tmp_path / "x.json"
    p = save_calibration(_cal())
    assert p == tmp_path / "x.json" and load_calibrations(p)


def test_corrupt_calibration_file_is_reported(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read"):
        load_calibrations(bad)
    cal, note = find_calibration(DeviceInfo(index=0, name="x"), bad)
    assert cal is None and "cannot be read" in note
    import json

    from ditperf.profiling.calibration import FORMAT

    for doc, match in (({"format": FORMAT, "calibrations": []}, "must be an object"),
                       ({"format": FORMAT, "calibrations": {"h100": {"gpu_name": "H100"}}},
                        "calibration 'h100' is malformed")):
        bad.write_text(json.dumps(doc))
        with pytest.raises(ValueError, match=match):
            load_calibrations(bad)
        cal, note = find_calibration(DeviceInfo(index=0, name="x"), bad)  # a note, not a traceback
        assert cal is None and match.split("'")[0] in note


def test_roofline_point_bounds():
    # H100-like roofs: 3000 GB/s, 750 TFLOP/s -> ridge 250 FLOP/B
    mem = roofline_point(ms=0.1, flops=1e9, nbytes=2.4e8, matmul_tflops=750.0, copy_gbps=3000.0)
    assert mem["bound"] == "memory" and mem["gbps"] == pytest.approx(2400.0)
    assert mem["pct_roof"] == pytest.approx(80.0)  # 2400 of 3000 GB/s
    comp = roofline_point(ms=1.0, flops=5e11, nbytes=1e9, matmul_tflops=750.0, copy_gbps=3000.0)
    assert comp["bound"] == "compute" and comp["tflops"] == pytest.approx(500.0)
    assert comp["pct_roof"] == pytest.approx(100 * 500 / 750)
    with pytest.raises(ValueError):
        roofline_point(ms=0.0, flops=1.0, nbytes=1.0, matmul_tflops=1.0, copy_gbps=1.0)


def test_roofline_plot(tmp_path):
    roofs = {"device": "fake", "copy_gbps": 3000.0, "matmul_tflops": 750.0}
    rows = []
    for kernel, provider, ms, flops, nbytes in [("layer_norm", "ditperf", 0.05, 1e9, 1.5e8),
                                                ("layer_norm", "torch", 0.09, 1e9, 1.5e8),
                                                ("attention", "ditperf", 0.5, 2e14, 3e7),
                                                ("attention", "torch_sdpa", 0.45, 2e14, 3e7)]:
        rows.append({"kernel": kernel, "shape": "s", "provider": provider, "ms": ms,
                     **roofline_point(ms, flops, nbytes, 750.0, 3000.0)})
    rows.append({"kernel": "attention", "shape": "s", "provider": "ditperf", "ms": None, "tflops": None, "ai": None,
                 "error": "NotImplementedError"})
    p = plot_roofline({"roofs": roofs, "rows": rows, "versions": {"gpu": "fake"}}, tmp_path / "r.png")
    assert p.read_bytes()[:4] == b"\x89PNG" and p.stat().st_size > 10_000


def test_kernel_cases_run_and_match_baselines_on_cpu():
    """The roofline's kernel/baseline calls (signatures, outputs) on tiny fp32 shapes under
    the Triton interpreter; timing and roofs need the GPU."""
    from ditperf.profiling.roofline import _cases, _max_err

    cases = _cases(quick=True, device="cpu", tiny=True)
    assert {c[0] for c in cases} == {"layer_norm", "gated_residual_layer_norm", "attention"}
    for kernel, shape, flops, nbytes, providers in cases:
        assert flops > 0 and nbytes > 0
        outs = {name: fn() for name, fn in providers.items()}
        (base,) = [v for k, v in outs.items() if k != "ditperf"]
        assert _max_err(outs["ditperf"], base) < 1e-4, (kernel, shape)


def test_fit_monotone_weights_repeated_powers_and_ignores_input_order():
    # three points at 100 W (0.3 each) pool with one at 200 W (0.1): the block's MFU is the
    # point-weighted mean 0.25, its knot the point-weighted mean power 125 W
    power, mfu = [100, 200, 100, 300, 100], [0.3, 0.1, 0.3, 0.5, 0.3]
    kp, km = fit_monotone(power, mfu)
    assert kp == pytest.approx([125.0, 300.0]) and km == pytest.approx([0.25, 0.5])
    order = list(range(len(power)))
    random.shuffle(order)
    assert fit_monotone([power[i] for i in order], [mfu[i] for i in order]) == (kp, km)


def test_fit_monotone_clips_negative_mfu_to_zero():
    """Noise around an idle point can pool to a negative mean: the map never says < 0 MFU."""
    rng = np.random.default_rng(random.randrange(2**31))
    power = np.concatenate([[50.0], rng.uniform(60, 600, size=30)])
    mfu = np.concatenate([[-0.5], np.clip((power[1:] - 60) / 700, 0, None) + rng.normal(0, 0.05, size=30)])
    kp, km = fit_monotone(power, mfu)
    assert km[0] == 0.0 and min(km) >= 0.0 and all(b >= a for a, b in pairwise(km))
    cal = Calibration(gpu_name="g", driver="d", power_limit_w=700.0, roof_tflops=800.0, knots_power_w=kp,
                      knots_mfu=km)
    assert cal.mfu_at(0.0) == 0.0


def test_find_calibration_never_borrows_another_gpus_map(tmp_path, monkeypatch):
    """A near match is the same GPU name at the same limit (within 1 W) with another driver;
    an exact match in a later file (the shipped ones) beats a near match in an earlier one."""
    from ditperf.profiling import calibration as calmod

    user, shipped = tmp_path / "user.json", tmp_path / "shipped.json"
    save_calibration(_cal(driver="550.54.15"), user)
    a100 = DeviceInfo(index=0, name="NVIDIA A100-SXM4-80GB", driver="550.54.15", power_limit_w=700.0)
    got, note = find_calibration(a100, user)
    assert got is None and "NVIDIA A100-SXM4-80GB" in note
    within = DeviceInfo(index=0, name="NVIDIA H100 80GB HBM3", driver="550.54.15", power_limit_w=699.2)
    got, note = find_calibration(within, user)
    assert got is not None and got.power_limit_w == 700.0 and "made with driver" in note
    save_calibration(_cal(driver="560.1"), shipped)
    monkeypatch.setattr(calmod, "_search_paths", lambda path: [user, shipped])
    got, note = find_calibration(DeviceInfo(index=0, name="NVIDIA H100 80GB HBM3", driver="560.1",
                                            power_limit_w=700.0))
    assert got is not None and got.driver == "560.1" and "shipped.json" in note


def test_roofline_point_on_both_sides_of_the_ridge():
    matmul, copy = random.uniform(200, 1000), random.uniform(1000, 5000)
    ridge = matmul * 1e12 / (copy * 1e9)
    nbytes, ms = random.uniform(1e6, 1e9), random.uniform(0.01, 10)
    for ai, bound in ((ridge * 0.9, "memory"), (ridge * 1.1, "compute"), (ridge * 0.01, "memory")):
        pt = roofline_point(ms, ai * nbytes, nbytes, matmul, copy)
        attainable = min(matmul, ai * copy / 1e3)
        assert pt["bound"] == bound and pt["ai"] == pytest.approx(ai)
        assert pt["attainable_tflops"] == pytest.approx(attainable)
        assert pt["pct_roof"] == pytest.approx(100 * ai * nbytes / (ms * 1e-3) / 1e12 / attainable)
        assert pt["gbps"] == pytest.approx(nbytes / (ms * 1e-3) / 1e9)
    # exactly at the ridge: "compute" only above it (both roofs meet there)
    at = roofline_point(1.0, 2.5e11, 1e9, 750.0, 3000.0)
    assert at["bound"] == "memory" and at["attainable_tflops"] == pytest.approx(750.0)
