"""Test-session setup.

Without CUDA, Triton kernels run in the Triton interpreter on CPU tensors. The interpreter must be
switched on before anything imports triton, so it is done here, first, for the whole session.
With CUDA the kernels compile for the GPU instead, and the interpreter is off: tests that build
``backend="triton"`` models put them on ``TRITON_DEVICE`` (the GPU, else the CPU interpreter),
and the few that check the interpreter itself are marked ``interpreter`` and skip there.

TF32 is off inside every test (restored after): on CUDA the fp32 reference is the oracle, and
cuBLAS / cuDNN would otherwise run its matmuls and convolutions in TF32.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/_official.py, tests/_weights.py

from _device import CUDA, interpreter_on  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "interpreter: needs the Triton interpreter (CPU hosts)")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_interp = pytest.mark.skip(reason="needs the Triton interpreter, which is off with CUDA")
    for item in items:
        if "gpu" in item.keywords and not CUDA:
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and not interpreter_on():
            item.add_marker(skip_interp)


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 means fp32 in every test (never changed at import)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
