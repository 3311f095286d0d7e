#!/usr/bin/env bash
# The one command to run first whenever a GPU is lent (see bench/gpu_session.py):
#   scripts/gpu_session.sh [--dry-run] [--out DIR]
# On a GPU: pytest -m gpu, the headline benchmarks, per-op times against the roofline model and
# the trained-model mask IoU, within 9 minutes; results in DIR (default ./gpu-session):
# results.json and summary.md (every issue 13 target in one table), bench.json, roofline/, logs.
# --dry-run: the same steps on CPU at tiny shapes (CI runs it). Peers missing on the GPU image are
# installed from .whl/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
exec "$PY" -m bench.gpu_session "$@"
