"""Shared plumbing for the benchmark scripts in bench/ (not installed with ditperf).

Every benchmark produces :class:`Row` objects, one per (case, shape, provider), and calls
:func:`finish` which fills ratios against the baseline provider, prints a table and writes
JSON. ``--smoke`` runs tiny shapes on CPU under the Triton interpreter: it proves the code
runs and checks results against the reference; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

SCHEMA_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parent.parent


def setup_interpreter_if_needed(smoke: bool) -> None:
    """Under --smoke without a GPU, turn on Triton's interpreter before ditperf's kernels
    are imported (the @triton.jit decorator reads the variable)."""
    if not torch.cuda.is_available():
        if not smoke:
            raise SystemExit("no CUDA GPU here: run with --smoke (tiny shapes on the CPU interpreter)")
        os.environ.setdefault("TRITON_INTERPRET", "1")


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on CPU (Triton interpreter): correctness only, timings meaningless")
    p.add_argument("--out", type=Path, default=None, help="write rows as JSON to this file")
    p.add_argument("--quick", action="store_true", help="fewer shapes (used by the time-boxed suite)")
    return p


@dataclass
class Row:
    bench: str
    case: str
    shape: str
    provider: str
    ms: float | None
    tflops: float | None = None
    gbps: float | None = None
    pct_roof: float | None = None
    roof: str | None = None
    baseline: str | None = None
    ratio_to_baseline: float | None = None  # baseline_ms / ms: > 1 means faster than baseline
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _record_partial(self)


#: Rows made so far in this process, written to $DITPERF_PARTIAL_JSON (set by bench/run.py)
#: as each one is made: a part killed at its time box keeps the rows it had measured.
_PARTIAL_ROWS: list[Row] = []


def _record_partial(row: Row) -> None:
    path = os.environ.get("DITPERF_PARTIAL_JSON")
    if not path:
        return
    _PARTIAL_ROWS.append(row)
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps({"partial": True, "rows": [asdict(r) for r in _PARTIAL_ROWS]}, default=str))
    os.replace(tmp, path)


def git_sha() -> str:
    """The sha that ``bench/device.sh``'s caller wrote to ``.ditperf-sha`` (a device machine's
    copy of the tree may carry a stale .git: on 2026-11-27 it reported the session's start
    commit for code two commits newer), else HEAD's short sha."""
    stamp = REPO_ROOT / ".ditperf-sha"
    if stamp.exists():
        return stamp.read_text().strip() + " (from .ditperf-sha)"
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def metadata() -> dict[str, Any]:
    """Machine and software facts recorded with every result file."""
    from ditperf.cli.version import versions

    meta: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "git_sha": git_sha(),
        "python": platform.python_version(),
        **versions(),
    }
    if torch.cuda.is_available():
        try:
            import pynvml

            pynvml.nvmlInit()
            meta["driver"] = pynvml.nvmlSystemGetDriverVersion()
            pynvml.nvmlShutdown()
        except Exception as exc:  # noqa: BLE001 - metadata must never fail a benchmark
            meta["driver"] = f"unknown ({type(exc).__name__})"
    return meta


def apply_roof(row: Row, roofs: Any | None) -> None:
    """Fill pct_roof from measured roofs: GB/s against copy bandwidth, TFLOP/s against bf16
    matmul. Whichever bound is closer to its roof is the one reported."""
    if roofs is None:
        return
    options = []
    if row.gbps is not None:
        options.append((100 * row.gbps / roofs.copy_gbps, "copy"))
    if row.tflops is not None:
        options.append((100 * row.tflops / roofs.matmul_tflops, "matmul"))
    if options:
        row.pct_roof, row.roof = max(options)


def ratio_text(row: dict[str, Any]) -> str:
    """A row's "vs baseline" cell (summary and ledger tables): the ratio to the suite's
    baseline and, for attention, to the best SDPA backend of the same shape (what issue 3's
    targets compare with)."""
    parts = []
    if row.get("ratio_to_baseline") is not None:
        parts.append(f"{row['ratio_to_baseline']:.2f}x {row.get('baseline')}")
    extra = row.get("extra") or {}
    if extra.get("vs_best_sdpa") is not None:
        parts.append(f"{extra['vs_best_sdpa']:.2f}x best SDPA ({extra.get('best_sdpa')})")
    return "; ".join(parts) or "-"


def fill_ratios(rows: list[Row], baseline: str) -> None:
    """ratio_to_baseline = baseline_ms / ms for rows sharing (bench, case, shape)."""
    base = {(r.bench, r.case, r.shape): r.ms for r in rows if r.provider == baseline and r.ms}
    for r in rows:
        b = base.get((r.bench, r.case, r.shape))
        if b and r.ms:
            r.baseline = baseline
            r.ratio_to_baseline = b / r.ms


def print_table(rows: list[Row], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    def f(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    table = Table(title=title)
    for col in ("case", "shape", "provider", "ms", "TFLOP/s", "GB/s", "% roof", "vs base"):
        table.add_column(col, justify="right" if col not in ("case", "shape", "provider") else "left")
    for r in rows:
        table.add_row(r.case, r.shape, r.provider, f(r.ms, ".4f"), f(r.tflops, ".1f"), f(r.gbps, ".0f"),
                      "-" if r.pct_roof is None else f"{r.pct_roof:.0f}% {r.roof}",
                      "-" if r.ratio_to_baseline is None else f"{r.ratio_to_baseline:.2f}x")
    Console(width=160).print(table)


def finish(rows: list[Row], *, title: str, baseline: str, out: Path | None, roofs: Any | None = None,
           extra_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fill ratios and % of roof, print the table, write JSON (when ``out``); return the doc."""
    for r in rows:
        apply_roof(r, roofs)
    fill_ratios(rows, baseline)
    print_table(rows, title)
    doc = {**metadata(), "title": title, "baseline": baseline,
           "roofs": roofs.to_dict() if roofs is not None else None,
           "rows": [asdict(r) for r in rows], **(extra_meta or {})}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2))
        print(f"wrote {out}")
    return doc


def report_correctness(rows: list[Row], bad: list[str], seconds: float) -> int:
    """Print the wrong results (one line each, to stderr) and a one-line verdict; the exit
    code a benchmark returns: 1 when anything was wrong."""
    for line in bad:
        print(f"WRONG: {line}", file=sys.stderr)
    print(f"{len(rows)} rows in {seconds:.1f} s; "
          f"{'all ditperf results correct' if not bad else f'{len(bad)} WRONG'}")
    return 1 if bad else 0


def roofs_or_none() -> Any | None:
    """This GPU's measured roofs: the suite's ``roofs`` part's (``DITPERF_ROOFS_JSON``, set by
    bench/run.py: one measurement for every part, ~5 s each saved, and the same denominator in
    every part's % of roof on a power-capped card), else measured now; None without a GPU."""
    if not torch.cuda.is_available():
        return None
    from ditperf.profiling import measure_roofs
    from ditperf.profiling.timing import Roofs

    shared = os.environ.get("DITPERF_ROOFS_JSON")
    if shared:
        try:
            doc = json.loads(shared)
            if doc.get("device") == torch.cuda.get_device_name():
                return Roofs(**doc)
        except (ValueError, TypeError):
            pass  # unreadable: measure
    return measure_roofs()
