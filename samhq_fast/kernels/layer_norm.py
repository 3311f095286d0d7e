"""Fused LayerNorm: last dim of ``(..., C)`` (+ residual add), and LayerNorm2d (+ GELU).

Reference: :mod:`samhq_fast.ops.layer_norm` holds the oracles and its module docstring is the
contract (fp32 statistics whatever the dtype; ``y`` of ``add_layer_norm`` from the stored sum).

Design:

* One generic kernel normalises the "rows" of a strided ``(O, P, C)`` view: row ``(o, p)``
  starts at ``o * s_o + p * s_p``, channel ``c`` sits at ``c * s_c``. Last-dim LayerNorm views
  ``(..., C)`` as ``(O, P, C)`` (``O = 1`` whenever the leading dims flatten; a copy only when no
  split into two groups of leading dims is a view); LayerNorm2d views ``(B, C, H, W)`` as
  ``(B, C, H * W)``, so the rows are pixels and NCHW (``s_p = 1``) and channels_last (``s_c = 1``)
  are both read in place. The output has the input's strides (``empty_like``).
* A program owns a ``[BLOCK_R, BLOCK_C]`` tile of rows of ONE ``o`` (``BLOCK_C = next_pow2(C)``):
  no div/mod per row, so the compiler sees the rows as contiguous when ``s_p = 1`` (Triton
  specialises stride 1) and coalesces along them for NCHW, along channels otherwise. The tile is
  kept at ~4K elements (8K when rows are contiguous: wider coalesced segments).
* Whole rows live in registers: mean, then variance of the centred values (two passes over the
  registers, masked lanes zeroed), all fp32, so fp16/bf16 never overflow and fp32 inputs with
  fp16 outputs are fine. Row offsets are int64 (NCHW batches pass 2**31 elements).
* Optional fused residual add (stores the sum ``s`` in its dtype, normalises ``s`` as stored)
  and exact erf GELU after the affine; one cast on store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from samhq_fast.kernels._common import on_gpu
from samhq_fast.ops.layer_norm import (
    add_layer_norm_reference,
    check_2d_args,
    check_args,
    layer_norm_2d_reference,
    layer_norm_reference,
)

__all__ = [
    "add_layer_norm",
    "add_layer_norm_reference",
    "layer_norm",
    "layer_norm_2d",
    "layer_norm_2d_reference",
    "layer_norm_reference",
]

MAX_C = 65536  # whole rows in registers; past this a row no longer fits one program


@triton.jit
def _round_bf16(x):
    # fp32 -> the nearest-even bf16 value, still fp32. The interpreter (triton 3.9) truncates on
    # fp32 -> bf16 casts; pre-rounded values make that truncation exact (CUDA rounds natively).
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _layer_norm_rows(
    x_ptr,
    d_ptr,
    s_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    P,
    C,
    NUM_P_BLOCKS,
    sx_o,
    sx_p,
    sx_c,
    sd_o,
    sd_p,
    sd_c,
    ss_o,
    ss_p,
    ss_c,
    sy_o,
    sy_p,
    sy_c,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    GELU: tl.constexpr,
    S_ROUND_BF16: tl.constexpr,
    Y_ROUND_BF16: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    o = (pid // NUM_P_BLOCKS).to(tl.int64)
    p = (pid % NUM_P_BLOCKS) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    mask_c = c < C
    mask = (p < P)[:, None] & mask_c[None, :]
    p = p.to(tl.int64)

    x = tl.load(x_ptr + (o * sx_o + p * sx_p)[:, None] + (c * sx_c)[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_RESIDUAL:
        d = tl.load(
            d_ptr + (o * sd_o + p * sd_p)[:, None] + (c * sd_c)[None, :], mask=mask, other=0.0
        )
        s = x + d.to(tl.float32)
        if S_ROUND_BF16:
            s = _round_bf16(s)
        s = s.to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + (o * ss_o + p * ss_p)[:, None] + (c * ss_c)[None, :], s, mask=mask)
        x = s.to(tl.float32)  # normalise the sum as stored (the unfused model's rounding)

    mean = tl.sum(x, 1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, 1) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + c, mask=mask_c, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    if GELU:
        y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
    if Y_ROUND_BF16:
        y = _round_bf16(y)
    tl.store(
        y_ptr + (o * sy_o + p * sy_p)[:, None] + (c * sy_c)[None, :],
        y.to(y_ptr.dtype.element_ty),
        mask=mask,
    )


def _view3(t: torch.Tensor, n0: int, n1: int, n2: int) -> torch.Tensor:
    """``t`` as ``(n0, n1, n2)``: a view when the strides allow it, else a copy (inputs only)."""
    try:
        return t.view(n0, n1, n2)
    except RuntimeError:
        return t.reshape(n0, n1, n2)


def _split_rows(x: torch.Tensor) -> tuple[int, int]:
    """``(O, P)`` such that ``x (..., C)`` views as ``(O, P, C)``; ``(1, rows)`` if none does."""
    lead = x.shape[:-1]
    for k in range(len(lead)):  # O = 1 first: the longest runs of rows per program
        O, P = lead[:k].numel(), lead[k:].numel()
        try:
            x.view(O, P, x.shape[-1])
            return O, P
        except RuntimeError:
            continue
    return 1, lead.numel()


def _launch(
    x: torch.Tensor,
    delta: torch.Tensor | None,
    s: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    gelu: bool,
) -> None:
    """All of x/delta/s/y are ``(O, P, C)`` views with any strides; y (and s) are written."""
    O, P, C = x.shape
    block_c = triton.next_power_of_2(C)
    if block_c > MAX_C:
        raise ValueError(f"C = {C} > {MAX_C}: rows do not fit one program; use the reference")
    rows_contiguous = x.stride(1) == 1 and C > 1
    if on_gpu(x):
        target = 8192 if rows_contiguous else 4096
    else:
        target = 16384  # interpreter: its cost is per program, so few large tiles
    block_r = min(max(1, target // block_c), triton.next_power_of_2(P))
    num_p_blocks = triton.cdiv(P, block_r)
    num_warps = max(2, min(8, block_r * block_c // 512)) if on_gpu(x) else 4  # <= 32 elem/thread
    res = delta is not None
    d = delta if res else x  # dummies when unused (never read)
    ss = s if s is not None else y
    interp = not on_gpu(x)  # see _round_bf16
    _layer_norm_rows[(O * num_p_blocks,)](
        x,
        d,
        ss,
        weight.contiguous(),
        bias.contiguous(),
        y,
        P,
        C,
        num_p_blocks,
        *x.stride(),
        *d.stride(),
        *ss.stride(),
        *y.stride(),
        float(eps),
        HAS_RESIDUAL=res,
        GELU=gelu,
        S_ROUND_BF16=interp and res and ss.dtype == torch.bfloat16,
        Y_ROUND_BF16=interp and y.dtype == torch.bfloat16,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Fused last-dim LayerNorm; same contract as ``layer_norm_reference`` (contiguous out)."""
    if x.dim() == 0:
        raise ValueError("x must have a channel (last) dim, got a 0-d tensor")
    check_args(x, weight, bias, -1, out_dtype)
    y = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    C = x.shape[-1]
    O, P = _split_rows(x)
    _launch(_view3(x, O, P, C), None, None, weight, bias, y.view(O, P, C), eps, False)
    return y


def add_layer_norm(
    x: torch.Tensor,
    delta: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``s = x + delta; y = layer_norm(s)``; same contract as ``add_layer_norm_reference``."""
    if x.dim() == 0:
        raise ValueError("x must have a channel (last) dim, got a 0-d tensor")
    check_args(x, weight, bias, -1, out_dtype, delta)
    s = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    if y.numel() == 0:
        return s, y
    C = x.shape[-1]
    O, P = _split_rows(x)
    x3, d3 = _view3(x, O, P, C), _view3(delta, O, P, C)
    _launch(x3, d3, s.view(O, P, C), weight, bias, y.view(O, P, C), eps, False)
    return s, y


def layer_norm_2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    activation: str = "none",
) -> torch.Tensor:
    """Fused LayerNorm2d (+ GELU); same contract as ``layer_norm_2d_reference``.

    The output keeps ``x``'s memory format (NCHW, channels_last, or any dense permutation whose
    H and W merge; otherwise NCHW).
    """
    check_2d_args(x, weight, bias, activation)
    B, C, H, W = x.shape
    y = torch.empty_like(x)
    if y.numel() == 0:
        return y
    try:
        y3 = y.view(B, C, H * W)
    except RuntimeError:  # H, W not mergeable in empty_like's layout: write NCHW
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        y3 = y.view(B, C, H * W)
    x3 = _view3(x, B, C, H * W)
    # (B, C, HW) -> rows (b, pixel): pass as (O, P, C) views by swapping the last two dims.
    _launch(
        x3.transpose(1, 2), None, None, weight, bias, y3.transpose(1, 2), eps, activation == "gelu"
    )
    return y
