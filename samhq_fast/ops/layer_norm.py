"""LayerNorm over the channels: last dim of ``(..., C)``, dim 1 of ``(B, C, H, W)`` (LayerNorm2d).

Op contract (shared by the references and the kernels)::

    layer_norm(x, weight, bias, eps, out_dtype=None) -> y
    add_layer_norm(x, delta, weight, bias, eps, out_dtype=None) -> (s, y)
    layer_norm_2d(x, weight, bias, eps, activation="none") -> y

* Statistics and the affine are ALWAYS computed in fp32 whatever the input dtype (fp16 squares
  overflow at |x| > 256), with the biased variance ``mean((x - mean) ** 2)``, then cast once.
* ``out_dtype`` (default ``x.dtype``): an fp32 residual stream feeds half-precision layers.
* ``add_layer_norm``: ``s = (x + delta)`` summed in fp32 and stored in ``x.dtype`` (the residual
  stream keeps its dtype, e.g. fp32 while ``delta`` is bf16); ``y`` is the norm of ``s`` AS
  STORED (rounded), which is exactly what the unfused ``x = x + delta; y = norm(x)`` computes.
* ``layer_norm_2d``: output in ``x.dtype``, same shape; ``activation="gelu"`` is the exact (erf)
  GELU applied in fp32 after the affine. The kernel also keeps ``x``'s memory format.
* Outputs are new tensors; x, delta: fp32, fp16 or bf16; weight, bias: ``(C,)``, floating.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = ("none", "gelu")


def _check_dtype(name: str, dtype: torch.dtype) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"{name} dtype {dtype} is not one of float32, float16, bfloat16")


def check_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    channel_dim: int,
    out_dtype: torch.dtype | None = None,
    delta: torch.Tensor | None = None,
) -> None:
    """Raise ``ValueError`` naming what is wrong; shared by the references and the kernels."""
    _check_dtype("x", x.dtype)
    if out_dtype is not None:
        _check_dtype("out_dtype", out_dtype)
    if delta is not None:
        _check_dtype("delta", delta.dtype)
        if delta.shape != x.shape:
            raise ValueError(f"delta shape {tuple(delta.shape)} != x shape {tuple(x.shape)}")
        if delta.device != x.device:
            raise ValueError(f"delta is on {delta.device}, x on {x.device}")
    C = x.shape[channel_dim]
    for name, t in (("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (C,):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be ({C},) for {C} channels, got {shape}")
        if not t.is_floating_point():
            raise ValueError(f"{name} dtype {t.dtype} is not floating point")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")


def check_2d_args(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, activation: str
) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    check_args(x, weight, bias, 1)


def _norm_fp32(xf: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, dim: int):
    mean = xf.mean(dim, keepdim=True)
    xc = xf - mean
    var = xc.square().mean(dim, keepdim=True)
    shape = [1] * xf.dim()
    shape[dim] = -1
    return xc * torch.rsqrt(var + eps) * weight.float().view(shape) + bias.float().view(shape)


def layer_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """LayerNorm over the last dim of ``x (..., C)``; fp32 statistics, result in ``out_dtype``."""
    if x.dim() == 0:
        raise ValueError("x must have a channel (last) dim, got a 0-d tensor")
    check_args(x, weight, bias, -1, out_dtype)
    return _norm_fp32(x.float(), weight, bias, eps, -1).to(out_dtype or x.dtype)


def add_layer_norm_reference(
    x: torch.Tensor,
    delta: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + delta`` (fp32 sum, stored in ``x.dtype``) and ``y = layer_norm(s as stored)``."""
    if x.dim() == 0:
        raise ValueError("x must have a channel (last) dim, got a 0-d tensor")
    check_args(x, weight, bias, -1, out_dtype, delta)
    s = (x.float() + delta.float()).to(x.dtype)
    return s, _norm_fp32(s.float(), weight, bias, eps, -1).to(out_dtype or x.dtype)


def layer_norm_2d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    activation: str = "none",
) -> torch.Tensor:
    """SAM's LayerNorm2d over dim 1 of ``x (B, C, H, W)``, then optional exact GELU; x.dtype."""
    check_2d_args(x, weight, bias, activation)
    y = _norm_fp32(x.float(), weight, bias, eps, 1)
    if activation == "gelu":
        y = F.gelu(y)
    return y.to(x.dtype)
