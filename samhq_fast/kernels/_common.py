"""What every kernel launcher shares."""

from __future__ import annotations

import torch


def on_gpu(t: torch.Tensor) -> bool:
    """Launch as on a GPU (compiled kernel, GPU tiles and autotuning) rather than in the Triton
    interpreter on CPU tensors. Meta tensors count as GPU: the ahead-of-time tier
    (:mod:`samhq_fast.kernels.aot`) runs the launchers on them to record the GPU launches."""
    return t.device.type in ("cuda", "meta")
