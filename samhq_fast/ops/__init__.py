"""The seam between the model and the kernels.

One module per fused op. Each holds the plain-PyTorch reference (the oracle) and a ``select``
function that picks an implementation once, when the model is built. Nothing here imports triton
at import time.
"""

from samhq_fast.ops.backend import (
    BackendUnavailableError,
    resolve_backend,
    triton_unavailable_reasons,
)

__all__ = ["BackendUnavailableError", "resolve_backend", "triton_unavailable_reasons"]
