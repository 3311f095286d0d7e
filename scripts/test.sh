#!/usr/bin/env bash
# Set up everything on a fresh machine and run the whole test suite (CPU; GPU tests skip).
#   bash scripts/test.sh            # all tests
#   bash scripts/test.sh -k parity  # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU build of torch first, so nothing later pulls a CUDA build; never torchvision.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,serve]"  # serve: ray[serve] for tests/test_serve.py
# The official SAM-HQ (an oracle): --no-deps, it would pull torchvision and a CUDA torch.
python -m pip install -q --no-deps "segment-anything-hq==0.3"
if python -c "import torchvision" 2>/dev/null; then
    echo "torchvision is installed in .venv; it breaks transformers with the CPU torch" >&2
    exit 1
fi
python -m ruff check samhq_fast tests bench
python -m pytest -q --durations=15 "$@"
