"""``nn.Linear`` with a fused epilogue (ViT encoder MLP and attention projections).

Op contract (shared by the reference and every kernel)::

    linear(x, weight, bias=None, activation="none", residual=None, out_dtype=None) -> y

    x          (..., K)  float32, float16 or bfloat16, any strides
    weight     (N, K)    nn.Linear layout, same dtype as x, any strides
    bias       (N,)      or None, any supported float dtype
    activation "none", "gelu" (exact, erf) or "relu"
    residual   (..., N)  or None; may be float32 while x is half: the residual stream is kept in
               fp32 so that it does not overflow fp16
    out_dtype  default: residual.dtype if a residual is given, else x.dtype
    y          (..., N)  = cast(act(x @ weight.T + bias) + residual)

Everything after the inputs is fp32: the product is accumulated in fp32, and bias, activation
and residual are applied in fp32 before the single cast to ``out_dtype``.

Uses in the encoder: qkv (+ bias), proj (+ bias + residual), lin1 (+ bias, gelu), lin2
(+ bias + residual).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = ("none", "gelu", "relu")


def check_linear_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    residual: torch.Tensor | None,
    out_dtype: torch.dtype | None,
) -> torch.dtype:
    """Validate the op's inputs (ValueError naming the problem); returns the output dtype."""
    if x.dtype not in DTYPES:
        raise ValueError(f"x dtype {x.dtype} is not one of float32, float16, bfloat16")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., K)")
    if weight.dim() != 2:
        raise ValueError(f"weight must be (N, K), got shape {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(
            f"K mismatch: x last dim is {x.shape[-1]}, weight is (N, K) = {tuple(weight.shape)}"
        )
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x on {x.device}")
    if bias is not None:
        if tuple(bias.shape) != (N,):
            raise ValueError(f"bias must be ({N},), got shape {tuple(bias.shape)}")
        if bias.dtype not in DTYPES:
            raise ValueError(f"bias dtype {bias.dtype} is not one of float32, float16, bfloat16")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device}, x on {x.device}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}, expected one of {ACTIVATIONS}")
    if residual is not None:
        want = (*x.shape[:-1], N)
        if tuple(residual.shape) != want:
            raise ValueError(f"residual must be {want}, got shape {tuple(residual.shape)}")
        if residual.dtype not in DTYPES:
            raise ValueError(
                f"residual dtype {residual.dtype} is not one of float32, float16, bfloat16"
            )
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device}, x on {x.device}")
    if out_dtype is None:
        out_dtype = residual.dtype if residual is not None else x.dtype
    if out_dtype not in DTYPES:
        raise ValueError(f"out_dtype {out_dtype} is not one of float32, float16, bfloat16")
    return out_dtype


def linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Plain-PyTorch linear + epilogue, the oracle. See the module docstring for the contract."""
    out_dtype = check_linear_inputs(x, weight, bias, activation, residual, out_dtype)
    return epilogue_reference(F.linear(x.float(), weight.float()), bias, activation, residual,
                              out_dtype)  # fmt: skip


def epilogue_reference(
    y: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    residual: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``cast(act(y + bias) + residual)`` in fp32: the op's epilogue on a product ``y``
    (..., N) that is already computed (inputs already checked)."""
    z = y.float()
    if bias is not None:
        z = z + bias.float()
    if activation == "gelu":
        z = F.gelu(z)
    elif activation == "relu":
        z = F.relu(z)
    if residual is not None:
        z = z + residual.float()
    return z.to(out_dtype)
