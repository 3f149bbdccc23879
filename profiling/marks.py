"""Window marks from inside a profiled process (``ditperf profile power -- CMD``).

``ditperf profile power`` sets ``DITPERF_POWER_MARKS`` to a file for the child process.
Code in the child marks the spans it wants measured::

    from ditperf.profiling import power_window

    with power_window("train_steps", items=batch_size * steps, flops=flops_per_step * steps):
        for _ in range(steps):
            train_step()

Each edge synchronizes CUDA (when torch has initialized it) and appends one JSON line
``{"name", "event": "begin"|"end", "t": time.monotonic(), "items", "flops", "pid"}``; after the
command ends the monitor summarizes each span from its samples, as a window next to the
whole-command window. ``items`` gives J/item; ``flops`` (the span's analytic FLOP count)
puts the resulting MFU next to the power-estimated one. ``time.monotonic`` is CLOCK_MONOTONIC on Linux, the same clock the
monitor stamps its samples with. Without the variable (not run under the profiler) the
marks cost nothing and write nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MARKS_ENV = "DITPERF_POWER_MARKS"


def mark(name: str, event: str, items: float | None = None, flops: float | None = None) -> None:
    """Append one mark (``event`` is "begin" or "end") when running under the profiler."""
    if event not in ("begin", "end"):
        raise ValueError(f"event must be 'begin' or 'end', got {event!r}")
    path = os.environ.get(MARKS_ENV)
    if not path:
        return
    from ditperf.profiling.power import cuda_synchronize

    cuda_synchronize()
    line = json.dumps({"name": name, "event": event, "t": time.monotonic(), "items": items, "flops": flops,
                       "pid": os.getpid()})
    with open(path, "a") as f:
        f.write(line + "\n")


@contextlib.contextmanager
def power_window(name: str, items: float | None = None, flops: float | None = None) -> Iterator[None]:
    """Mark a span to be measured by an enclosing ``ditperf profile power`` run."""
    mark(name, "begin")
    try:
        yield
    finally:
        mark(name, "end", items, flops)


def read_marks(path: str | os.PathLike[str]
               ) -> tuple[list[tuple[str, float, float, float | None, float | None]], list[str]]:
    """Pair begin/end marks (per process and name, in order). Returns
    ([(name, t0, t1, items, flops)], warnings)."""
    p = Path(path)
    if not p.exists():
        return [], []
    spans: list[tuple[str, float, float, float | None, float | None]] = []
    warnings: list[str] = []
    open_: dict[tuple[int, str], list[float]] = {}
    for n, raw in enumerate(p.read_text().splitlines(), 1):
        try:
            m: dict[str, Any] = json.loads(raw)
            key = (int(m.get("pid", 0)), str(m["name"]))
            t = float(m["t"])
            event = m["event"]
        except (ValueError, KeyError, TypeError):
            warnings.append(f"marks line {n} unreadable: {raw[:80]!r}")
            continue
        if event == "begin":
            open_.setdefault(key, []).append(t)
        elif open_.get(key):
            spans.append((key[1], open_[key].pop(), t, m.get("items"), m.get("flops")))
        else:
            warnings.append(f"window mark {key[1]!r} ended without a begin")
    for (_, name), starts in open_.items():
        if starts:
            warnings.append(f"window mark {name!r} began but never ended")
    spans.sort(key=lambda s: s[1])
    return spans, warnings


__all__ = ["MARKS_ENV", "mark", "power_window", "read_marks"]
