"""Where the tests run kernels (see tests/conftest.py)."""

import os

import torch

CUDA = torch.cuda.is_available()
#: Where ``backend="triton"`` tests run: the GPU, else CPU tensors in the Triton interpreter.
TRITON_DEVICE = "cuda" if CUDA else "cpu"


def interpreter_on() -> bool:
    """The Triton interpreter is on (CPU-only hosts; tests/conftest.py switches it on)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
