"""Test-session setup.

Without CUDA, Triton kernels run in the Triton interpreter on CPU tensors. The interpreter must be
switched on before anything imports triton, so it is done here, first, for the whole session.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/_official.py, tests/_weights.py


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
