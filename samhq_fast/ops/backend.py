"""Backend resolution, done once when a model is built (never at import).

Four names:

* ``"reference"``: the plain-PyTorch oracle (materialises attention exactly like the official
  code); every other path is tested against it.
* ``"torch"``: the fast pure-PyTorch path (``scaled_dot_product_attention`` with the
  decomposed relative-position bias, fused decoder structure); runs on any device PyTorch does.
* ``"triton"``: the fused Triton kernels (CUDA, or CPU in the Triton interpreter).
* ``"auto"``: Triton where it can run on a CUDA device, else ``"torch"``.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "reference", "torch", "triton")


class BackendUnavailableError(RuntimeError):
    """``backend="triton"`` was requested but cannot run; the message lists every reason."""


def triton_unavailable_reasons(device: torch.device | str) -> list[str]:
    """Why the Triton backend cannot run on ``device`` (empty list: it can).

    On CPU tensors Triton kernels run only in its interpreter, which must be switched on with
    ``TRITON_INTERPRET=1`` before triton is first imported (the kernel tests do this).
    """
    device = torch.device(device)
    reasons = []
    if importlib.util.find_spec("triton") is None:
        reasons.append("triton is not installed")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            reasons.append("CUDA is not available")
        elif getattr(torch.version, "hip", None):
            reasons.append("the Triton kernels are tuned and tested for NVIDIA GPUs, not ROCm")
    elif device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            reasons.append("device is CPU and the Triton interpreter is off (TRITON_INTERPRET=1)")
    else:
        reasons.append(f"device type {device.type!r} is not supported by the Triton kernels")
    return reasons


def resolve_backend(backend: str, device: torch.device | str) -> tuple[str, list[str]]:
    """Map ``"auto" | "reference" | "torch" | "triton"`` to a concrete backend for ``device``.

    Returns ``(backend, reasons)``: ``reasons`` says why ``"auto"`` chose ``"torch"``.
    Raises ``BackendUnavailableError`` when ``"triton"`` is asked for and cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("reference", "torch"):
        return backend, []
    if backend == "auto" and torch.device(device).type == "cpu":
        # The interpreter is a debugging/testing tool, never a default.
        return "torch", [
            "device is CPU: the fast PyTorch path (Triton runs on CPU only in its interpreter)"
        ]
    reasons = triton_unavailable_reasons(device)
    if not reasons:
        return "triton", []
    if backend == "triton":
        raise BackendUnavailableError("backend='triton' cannot run: " + "; ".join(reasons))
    return "torch", reasons
