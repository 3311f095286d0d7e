"""The fast pure-PyTorch implementations of the fused ops (``backend="torch"``).

Same contracts as the references beside each op (``samhq_fast.ops.linear``, ``layer_norm``,
``decoder_attention``; rel-pos attention lives in ``samhq_fast.ops.attention``), but built for
speed on any device PyTorch runs on: native-dtype GEMMs with in-place epilogues,
``scaled_dot_product_attention``, channels-last LayerNorm2d. Not bit-exact with the references
(different summation orders); tested against them to 1e-4 in fp32.

Half precision (bf16 / fp16) on a CPU without native half GEMMs (no AVX512-BF16 / AMX /
AVX512-FP16: oneDNN then runs bf16 GEMMs several times slower than fp32, 1.19 s vs 0.19 s for a
4096x768x3072 GEMM on an AVX2 EPYC) computes the GEMMs in fp32 and rounds their outputs to the
half dtype, so tensors between ops keep the model dtype. LayerNorm statistics are always fp32.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def cpu_has_native_half(dtype: torch.dtype) -> bool:
    """Whether this CPU runs ``dtype`` GEMMs natively (oneDNN's own check)."""
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False
    return dtype == torch.float32


def gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype GEMMs on ``x`` run in: its own, except half on a CPU without native half."""
    if x.dtype == torch.float32 or x.device.type != "cpu" or cpu_has_native_half(x.dtype):
        return x.dtype
    return torch.float32


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``cast(act(x @ weight.T + bias) + residual)`` (contract: ``samhq_fast.ops.linear``)."""
    if out_dtype is None:
        out_dtype = residual.dtype if residual is not None else x.dtype
    cd = gemm_dtype(x)
    y = F.linear(x.to(cd), weight.to(cd), None if bias is None else bias.to(cd))
    if activation == "gelu":
        y = torch.ops.aten.gelu_(y)  # exact (erf) GELU, in place on the fresh GEMM output
    elif activation == "relu":
        y = y.relu_()
    elif activation != "none":
        raise ValueError(f"unknown activation {activation!r}")
    if residual is not None:
        if y.dtype == out_dtype and residual.dtype == out_dtype:
            y = y.add_(residual)
        else:
            y = residual.to(out_dtype) + y.to(out_dtype)
    return y.to(out_dtype)


# Elements of one MLP hidden block on CPU (16 MiB in fp32): the MLP runs over rows in blocks
# whose hidden activations stay in the last-level cache and reuse the same heap memory (glibc
# serves blocks over 32 MiB with fresh mmap pages, whose page faults cost ~10% here).
MLP_BLOCK = 1 << 22


def mlp_residual_(
    x: torch.Tensor,
    norm: torch.nn.LayerNorm,
    lin1: torch.nn.Linear,
    lin2: torch.nn.Linear,
    dtype: torch.dtype,
    activation: str = "gelu",
) -> torch.Tensor:
    """``x += lin2(act(lin1(norm(x))))`` in place on a contiguous ``(..., C)`` residual stream
    (``norm`` with fp32 statistics, the MLP in ``dtype``); on CPU over blocks of rows."""
    flat = x.view(-1, x.shape[-1])
    T = flat.shape[0]
    rows = T if x.device.type != "cpu" else max(64, MLP_BLOCK // lin1.out_features)
    for s in range(0, T, rows):
        xc = flat[s : s + rows]
        h = layer_norm(xc, norm.weight, norm.bias, norm.eps, dtype)
        h = linear(h, lin1.weight, lin1.bias, activation)
        xc.add_(linear(h, lin2.weight, lin2.bias))
    return x


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """LayerNorm over the last dim, fp32 statistics, result in ``out_dtype`` (default x's)."""
    out_dtype = out_dtype or x.dtype
    if x.dtype == torch.float32:
        w, b = weight.float(), bias.float()
    else:  # half input: PyTorch's kernels accumulate the statistics in fp32
        w, b = weight.to(x.dtype), bias.to(x.dtype)
    return F.layer_norm(x, (x.shape[-1],), w, b, eps).to(out_dtype)


def add_layer_norm(
    x: torch.Tensor,
    delta: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``s = x + delta`` (stored in x.dtype) and ``layer_norm(s)``."""
    s = (x + delta).to(x.dtype)
    return s, layer_norm(s, weight, bias, eps, out_dtype)


def layer_norm_2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    activation: str = "none",
) -> torch.Tensor:
    """SAM's LayerNorm2d over dim 1 of ``(B, C, H, W)`` (+ exact GELU), returned channels-last:
    the row LayerNorm of the ``(B, H, W, C)`` view, no transpose copy for channels-last input."""
    y = layer_norm(x.permute(0, 2, 3, 1), weight, bias, eps)
    if activation == "gelu":
        y = F.gelu(y)
    elif activation != "none":
        raise ValueError(f"unknown activation {activation!r}")
    return y.permute(0, 3, 1, 2)


def decoder_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    q_group: int = 1,
    kv_group: int = 1,
) -> torch.Tensor:
    """Two-way-transformer attention with SDPA (contract: ``samhq_fast.ops.decoder_attention``).

    Keys shared by ``kv_group`` prompts: their queries are stacked into one longer query set per
    image (rows of a softmax are independent), so the shared keys are read once, never copied.
    """
    n, tq = q.shape[0] * q_group, q.shape[1]
    if kv_group > 1:
        q = q.reshape(n // kv_group, kv_group * q.shape[1], q.shape[2])
    elif q_group > 1:
        q = q[:, None].expand(-1, q_group, -1, -1).flatten(0, 1)

    def heads(t: torch.Tensor) -> torch.Tensor:
        b, L, c = t.shape
        return t.reshape(b, L, num_heads, c // num_heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
    return out.transpose(1, 2).reshape(n, tq, -1)


def _conv_input(x: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    return x.to(cd, memory_format=torch.channels_last)


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> torch.Tensor:
    """``F.conv2d`` channels-last in the GEMM dtype (:func:`gemm_dtype`), result in x.dtype."""
    cd = gemm_dtype(x)
    b = None if bias is None else bias.to(cd)
    y = F.conv2d(_conv_input(x, cd), weight.to(cd), b, stride, padding, dilation, groups)
    return y.to(x.dtype)


def conv_transpose2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
) -> torch.Tensor:
    """``F.conv_transpose2d``, as :func:`conv2d`."""
    cd = gemm_dtype(x)
    b = None if bias is None else bias.to(cd)
    return F.conv_transpose2d(_conv_input(x, cd), weight.to(cd), b, stride, padding).to(x.dtype)
