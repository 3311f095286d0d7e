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
# onnx: tests/test_onnx.py; serve: ray[serve] for tests/test_serve.py
python -m pip install -q -e ".[test,onnx,serve]"
# The oldest triton that pyproject.toml allows, beside the installed one (never imported by the
# package): tests/kernels/test_aot.py compiles every kernel with it too.
FLOOR=$(python -c "import re; print(re.search(r'\"triton>=([0-9.]+)', open('pyproject.toml').read()).group(1))")
if [ ! -d ".aot/triton-$FLOOR/triton" ]; then
    python -m pip install -q --no-deps --target ".aot/triton-$FLOOR" "triton==$FLOOR"
fi
# The official SAM-HQ (an oracle): --no-deps, it would pull torchvision and a CUDA torch.
python -m pip install -q --no-deps "segment-anything-hq==0.3"
if python -c "import torchvision" 2>/dev/null; then
    echo "torchvision is installed in .venv; it breaks transformers with the CPU torch" >&2
    exit 1
fi
python -m ruff check samhq_fast tests bench
python -m pytest -q --durations=15 "$@"
