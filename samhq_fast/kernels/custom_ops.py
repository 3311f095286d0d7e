"""The Triton kernels as ``torch.library`` custom ops (namespace ``samhq_fast``).

``torch.compile`` cannot look inside a Triton launcher that does Python work (shape checks, the
rel-pos pre-pass, autotuning), so each launcher is an opaque custom op with a fake (meta)
implementation that gives the output's shape, dtype and strides. Importing this module imports
triton; ``samhq_fast.ops.fused.build("triton")`` does it when a model is built.
"""

from __future__ import annotations

import torch

from samhq_fast.kernels import decoder_attention as _da
from samhq_fast.kernels import layer_norm as _ln
from samhq_fast.kernels import linear as _lin
from samhq_fast.kernels import rel_pos_attention as _rpa

__all__ = [
    "add_layer_norm",
    "decoder_attention",
    "layer_norm",
    "layer_norm_2d",
    "linear",
    "rel_pos_attention",
]


@torch.library.custom_op("samhq_fast::layer_norm", mutates_args=())
def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    return _ln.layer_norm(x, weight, bias, eps, out_dtype)


@layer_norm.register_fake
def _(x, weight, bias, eps, out_dtype=None):
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype)


@torch.library.custom_op("samhq_fast::add_layer_norm", mutates_args=())
def add_layer_norm(
    x: torch.Tensor,
    delta: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _ln.add_layer_norm(x, delta, weight, bias, eps, out_dtype)


@add_layer_norm.register_fake
def _(x, delta, weight, bias, eps, out_dtype=None):
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=out_dtype or x.dtype)


@torch.library.custom_op("samhq_fast::layer_norm_2d", mutates_args=())
def layer_norm_2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, activation: str = "none"
) -> torch.Tensor:
    return _ln.layer_norm_2d(x, weight, bias, eps, activation)


@layer_norm_2d.register_fake
def _(x, weight, bias, eps, activation="none"):
    return torch.empty_like(x)  # keeps the memory format, as the kernel does


@torch.library.custom_op("samhq_fast::linear", mutates_args=())
def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    return _lin.linear(x, weight, bias, activation, residual, out_dtype)


@linear.register_fake
def _(x, weight, bias=None, activation="none", residual=None, out_dtype=None):
    dtype = out_dtype or (residual.dtype if residual is not None else x.dtype)
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=dtype)


@torch.library.custom_op("samhq_fast::rel_pos_attention", mutates_args=())
def rel_pos_attention(
    qkv: torch.Tensor,
    num_heads: int,
    window_size: int,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    pad_qkv: torch.Tensor | None = None,
) -> torch.Tensor:
    return _rpa.rel_pos_attention(qkv, num_heads, window_size, rel_pos_h, rel_pos_w, pad_qkv)


@rel_pos_attention.register_fake
def _(qkv, num_heads, window_size, rel_pos_h, rel_pos_w, pad_qkv=None):
    return qkv.new_empty((*qkv.shape[:-1], qkv.shape[-1] // 3))


@torch.library.custom_op("samhq_fast::decoder_attention", mutates_args=())
def decoder_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    q_group: int = 1,
    kv_group: int = 1,
) -> torch.Tensor:
    return _da.decoder_attention(q, k, v, num_heads, q_group, kv_group)


@decoder_attention.register_fake
def _(q, k, v, num_heads, q_group=1, kv_group=1):
    return q.new_empty((q.shape[0] * q_group, q.shape[1], q.shape[2]))
