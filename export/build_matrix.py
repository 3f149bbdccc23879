"""Build the shipped TensorRT support matrix (``export/data/trt_support.json``).

Source: the onnx-tensorrt operator table (``onnx-tensorrt-10.1-operators.md``, one Markdown
row per ONNX operator: ``| Operator | Supported (Y/N) | Supported Types | Restrictions |``)
plus the operator additions documented in TensorRT release notes after 10.1, which the
table does not contain. The JSON is what ``ditperf export coverage`` reads at runtime; this
script is only run by maintainers when the source table changes::

    python -m ditperf.export.build_matrix /path/to/onnx-tensorrt-10.1-operators.md

JSON schema ``ditperf.trt_support_matrix/1``::

    {"schema": "ditperf.trt_support_matrix/1",
     "source": str, "trt_version": "10.1", "opset_min": 9, "opset_max": 20,
     "data_types": [str],                      # TensorRT's ONNX type names (FP32, BF16, ...)
     "operators": {op_type: {"supported": bool, "types": [str], "restrictions": str,
                             "since": "10.1"}},
     "additions": [{"op_type": str, "since": "10.14", "opset": 23, "types": [str],
                    "note": str}],
     "pitfalls": {op_type: {"types": [str], "message": str}}}
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

SCHEMA = "ditperf.trt_support_matrix/1"
DATA_PATH = Path(__file__).resolve().parent / "data" / "trt_support.json"

# Typos in the published table, corrected so that type checks work.
_TYPE_FIXES = {"INF64": "INT64"}
_KNOWN_TYPES = {"FP32", "FP16", "BF16", "INT32", "INT64", "UINT8", "BOOL", "INT8", "INT4", "FP8",
                "DOUBLE"}

# From TensorRT release notes (see shared/trt/README.md); not in the 10.1 table.
ADDITIONS = [
    {"op_type": "Attention", "since": "10.14", "opset": 23, "types": ["FP32", "FP16", "BF16"],
     "note": "ONNX opset-23 Attention (TensorRT 10.14 release notes)"},
    {"op_type": "RMSNormalization", "since": "10.15", "opset": 23,
     "types": ["FP32", "FP16", "BF16"],
     "note": "ONNX opset-23 RMSNormalization (TensorRT 10.15 release notes)"},
    {"op_type": "RotaryEmbedding", "since": "10.15", "opset": 23,
     "types": ["FP32", "FP16", "BF16"],
     "note": "ONNX opset-23 RotaryEmbedding (TensorRT 10.15 release notes)"},
    {"op_type": "Swish", "since": "11.0", "opset": 24, "types": ["FP32", "FP16", "BF16"],
     "note": "ONNX Swish (TensorRT 11.0 release notes)"},
]

# Problems users report that the table does not state (shared/trt/README.md).
PITFALLS = {
    "Resize": {"types": ["BF16"],
               "message": "BF16 Resize is unsupported in practice: cast around it "
                          "(ditperf export surgery --passes cast-around)"},
}

_HEADER_RE = re.compile(r"opset\s+(\d+)\s+to\s+opset\s+(\d+)", re.IGNORECASE)
_TRT_RE = re.compile(r"TensorRT\s+(\d+\.\d+)")


def _parse_types(cell: str) -> list[str]:
    out = []
    for raw in cell.replace(";", ",").split(","):
        t = raw.strip().upper()
        if not t:
            continue
        t = _TYPE_FIXES.get(t, t)
        if t in _KNOWN_TYPES and t not in out:
            out.append(t)
    return out


def parse_table(text: str) -> dict[str, dict]:
    """Parse the Markdown rows into ``{op_type: {supported, types, restrictions}}``.

    Rows may have fewer than four cells (the table omits empty trailing cells) and may lack
    the closing ``|``.
    """
    ops: dict[str, dict] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) < 2 or cells[0] in ("Operator", "") or set(cells[0]) <= {"-", ":"}:
            continue
        name, flag = cells[0], cells[1].upper()
        if flag not in ("Y", "N"):
            continue
        types = _parse_types(cells[2]) if len(cells) > 2 else []
        restr = cells[3] if len(cells) > 3 else ""
        restr = re.sub(r"<br\s*/?>", " ", restr).strip()
        ops[name] = {"supported": flag == "Y", "types": types, "restrictions": restr,
                     "since": "10.1"}
    return ops


def build(md_path: Path) -> dict:
    """Build the matrix dict from the Markdown table."""
    text = md_path.read_text(encoding="utf-8")
    ops = parse_table(text)
    if len(ops) < 100:
        raise ValueError(f"{md_path}: parsed only {len(ops)} operator rows; is this the "
                         "onnx-tensorrt operators table?")
    m = _HEADER_RE.search(text)
    trt = _TRT_RE.search(text)
    return {
        "schema": SCHEMA,
        "source": f"onnx-tensorrt operators table, branch 10.1-GA ({md_path.name}); header: "
                  f"TensorRT {trt.group(1) if trt else '?'}; Apache-2.0",
        "trt_version": "10.1",
        "opset_min": int(m.group(1)) if m else 9,
        "opset_max": int(m.group(2)) if m else 20,
        "data_types": ["DOUBLE", "FP32", "FP16", "BF16", "INT32", "INT64", "FP8", "INT8", "INT4",
                       "UINT8", "BOOL"],
        "operators": dict(sorted(ops.items())),
        "additions": ADDITIONS,
        "pitfalls": PITFALLS,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("table", type=Path, help="onnx-tensorrt-10.1-operators.md")
    p.add_argument("--out", type=Path, default=DATA_PATH, help=f"default: {DATA_PATH}")
    args = p.parse_args(argv)
    data = build(args.table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    n_y = sum(o["supported"] for o in data["operators"].values())
    print(f"wrote {args.out}: {len(data['operators'])} operators ({n_y} supported), "
          f"{len(data['additions'])} documented additions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
