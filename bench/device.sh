#!/usr/bin/env bash
# The exact command to run ditperf's GPU suite on a lent GPU machine (device tool).
#
# On the CPU machine, once per checkout:   bash ../shared/device/fetch-wheels.sh
# and before each run (the device copy has no .git; results record this sha):
#   git describe --always --dirty > .ditperf-sha       (a "-dirty" suffix: uncommitted changes ran)
# Then call the device tool's `run` with carry [".whl", ".ditperf-sha"] and the command:
#   bash bench/device.sh [BUDGET_S [PART ...]]     (parts: see bench/run.py; default all)
# It installs the carried wheels (Composer, Streaming, onnx-graphsurgeon: the GPU image
# lacks them) and ditperf itself offline, runs `bench/run.py --suite gpu` within the budget,
# and leaves in $OUT: summary.md, results.json, run.log and one results.tar.gz with all
# part logs, JSONs and PNGs (the device tool returns at most 8 files).
# Commit what comes back under bench/results/YYYY-MM-DD-<gpu>-<sha>/ (see that README).
set -uo pipefail
BUDGET=${1:-420}
case "$BUDGET" in ''|*[!0-9]*) echo "device.sh: the first argument is the budget in seconds, got '$BUDGET'"; exit 2;; esac
shift || true
ONLY=()
[ $# -gt 0 ] && ONLY=(--only "$@")
OUT=${OUT:-$(mktemp -d)}
S=$(mktemp -d) && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$S" .whl/*.whl && export PYTHONPATH="$S" || { echo "wheel install failed"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || { echo "ditperf install failed"; exit 1; }
export PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv | tee "$OUT/run.log"
D=$(mktemp -d)/suite
# a hard stop a little after the budget, so the copy and tar below always run (run.py also
# rewrites results.json after every part)
timeout --kill-after=10 $((BUDGET + 45)) \
  python3 bench/run.py --suite gpu --out "$D" --budget-s "$BUDGET" ${ONLY[@]+"${ONLY[@]}"} 2>&1 | tee -a "$OUT/run.log"
rc=${PIPESTATUS[0]}
cp "$D/summary.md" "$D/results.json" "$OUT/" 2>/dev/null
# checkpoints, ONNX files and datasets stay behind (size); logs, JSON, CSV, PNG come back
tar -czf "$OUT/results.tar.gz" --exclude='*.pt' --exclude='*.onnx' --exclude='*.onnx.data' \
  --exclude='*.mds*' --exclude='checkpoints' --exclude='data' -C "$(dirname "$D")" suite
exit "$rc"
