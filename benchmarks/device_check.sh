#!/usr/bin/env bash
# The device check on a GPU or TPU host, as one command, with what is
# installed there (Python 3.11 or 3.12 with jax, flax, optax, numpy and
# scikit-learn; no install step, no network):
#
#   bash benchmarks/device_check.sh OUT_DIR [BUDGET_S] [EARLIER_JSON]
#
# Writes OUT_DIR/machine.txt (the accelerator, the packages), and
# OUT_DIR/accelerator.json (rewritten after every row) and
# OUT_DIR/accelerator.log (everything printed) from
# `python -m benchmarks.accelerator` (benchmarks/accelerator.py). BUDGET_S
# (default 400) is its --budget_s: no row starts that would end after it.
# EARLIER_JSON, an earlier run's accelerator.json, keeps that run's rows
# instead of measuring them again (--resume). A run stopped by a time limit
# leaves every row measured before it in OUT_DIR.
set -uo pipefail
usage='usage: bash benchmarks/device_check.sh OUT_DIR [BUDGET_S] [EARLIER_JSON]'
mkdir -p "${1:?$usage}"
out=$(cd "$1" && pwd)  # Paths from the caller's directory, before the cd.
budget=${2:-400}
resume=()
if [[ -n "${3:-}" ]]; then
  resume=(--resume "$(cd "$(dirname "$3")" && pwd)/$(basename "$3")")
fi
cd "$(dirname "$0")/.."
# The host's interpreter, whichever name it has.
python=$(command -v python || command -v python3)
export PYTHONUNBUFFERED=1
{
  date -u
  git rev-parse HEAD 2>/dev/null || true
  nvidia-smi 2>/dev/null || true
  "$python" --version
  "$python" -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda|flax|optax|numpy|scikit-learn|nvidia-cudnn)' || true
} 2>&1 | tee "$out/machine.txt"
"$python" -m benchmarks.accelerator --json "$out/accelerator.json" \
  --budget_s "$budget" ${resume[@]+"${resume[@]}"} 2>&1 | tee "$out/accelerator.log"
exit "${PIPESTATUS[0]}"
