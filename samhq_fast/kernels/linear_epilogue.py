"""The fused linear's epilogue as its own pass, behind a cuBLAS GEMM (the other GEMM candidate).

Contract: :func:`samhq_fast.ops.linear.linear_reference`. :func:`linear_cublas` computes it as

* the GEMM in cuBLAS (``torch.mm`` / ``torch.addmm`` in the input dtype; cuBLAS accumulates in
  fp32 for fp16/bf16/fp32 inputs), then
* where the GEMM alone cannot finish the job, one elementwise Triton pass
  (:func:`linear_epilogue`) over the ``M x N`` product: bias, exact (erf) GELU or ReLU, the
  residual (read in its own dtype), one cast to the output dtype, all in fp32.

What cuBLAS finishes alone (no epilogue pass): nothing to add (``mm``); bias only with the
output in the input dtype (``addmm(bias, ...)``: cuBLASLt's bias epilogue); residual only, no
bias, all in the input dtype (``addmm(residual, ...)``, ``beta * C``: added in fp32 before the
one rounding).

Error model: unlike the Triton GEMM, which keeps the fp32 accumulator through the epilogue,
cuBLAS rounds its product to the input dtype before the epilogue pass adds to it (except for
an fp32 output: the half GEMM then writes fp32, ``torch.mm(..., out_dtype=torch.float32)``).
That is what plain PyTorch does (``F.linear`` in bf16 returns bf16), plus one more rounding at
the end, so the error vs the fp32 reference stays within ~2x plain PyTorch's in the same dtype
(tested).
cuBLAS obeys PyTorch's matmul flags: fp32 inputs are only handed to it when TF32 is off
(:func:`cublas_allowed`: this backend's fp32 is ieee), and for half inputs PyTorch's default
allows split-K reductions in reduced precision, as it does for plain ``F.linear``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from samhq_fast.kernels._common import on_gpu
from samhq_fast.ops.linear import epilogue_reference as linear_epilogue_reference

__all__ = ["cublas_allowed", "linear_cublas", "linear_epilogue", "linear_epilogue_reference"]


@triton.jit
def _round_to_bf16(x):
    # CPU only: triton 3.9's interpreter casts fp32 -> bf16 by truncation (GPUs round to nearest
    # even). Round the fp32 bits to nearest even here so the truncating cast is exact. NaN kept.
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


@triton.jit
def _linear_epilogue(
    y_ptr,
    bias_ptr,
    res_ptr,
    out_ptr,
    M,
    N,
    s_ym,
    s_rm,
    s_rn,
    s_om,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # 2-D tiles so the bias is loaded once per column tile; y and out have unit column stride.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    om = offs_m.to(tl.int64)[:, None]  # M * N may pass 2**31
    z = tl.load(y_ptr + om * s_ym + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == "gelu":
        z = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACTIVATION == "relu":
        z = tl.maximum(z, 0.0)
    if HAS_RESIDUAL:
        z += tl.load(res_ptr + om * s_rm + offs_n[None, :] * s_rn, mask=mask, other=0.0).to(
            tl.float32
        )
    if ROUND_BF16:
        z = _round_to_bf16(z)
    tl.store(out_ptr + om * s_om + offs_n[None, :], z.to(out_ptr.dtype.element_ty), mask=mask)


_BLOCK_GPU = (32, 128)  # 4096 elements per program, 16-byte vector loads along N
_BLOCK_CPU = (32, 64)


def linear_epilogue(
    y: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    residual: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """One pass of :func:`linear_epilogue_reference` over a 2-D product ``y`` (M, N) with unit
    column stride (what ``torch.mm`` returns); ``residual`` (M, N) any strides; returns a fresh
    contiguous (M, N) tensor of ``out_dtype``. Inputs are not checked again (the op did)."""
    if y.dim() != 2 or (y.stride(1) != 1 and y.shape[1] > 1):
        raise ValueError(f"y must be 2-D with unit column stride, got strides {y.stride()}")
    M, N = y.shape
    out = torch.empty((M, N), dtype=out_dtype, device=y.device)
    if out.numel() == 0:
        return out
    bm, bn = _BLOCK_GPU if on_gpu(y) else _BLOCK_CPU
    res = residual if residual is not None else out  # dummy if unused
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _linear_epilogue[grid](
        y,
        bias.contiguous() if bias is not None else out,  # dummy if unused
        res,
        out,
        M,
        N,
        y.stride(0),
        *res.stride(),
        out.stride(0),
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        ACTIVATION=activation,
        ROUND_BF16=out_dtype == torch.bfloat16 and not on_gpu(y),  # see _round_to_bf16
        BLOCK_M=bm,
        BLOCK_N=bn,
        num_warps=4,
    )
    return out


def cublas_allowed(dtype: torch.dtype) -> bool:
    """Whether the cuBLAS candidate may run inputs of ``dtype``: half always; fp32 only while
    PyTorch's matmul flag has TF32 off (read per call: the backend's fp32 GEMM is ieee, and
    changing the process-global flag per call is not ours to do)."""
    return dtype != torch.float32 or not torch.backends.cuda.matmul.allow_tf32


def linear_cublas(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    residual: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The op on 2-D ``x2`` (M, K) and ``residual`` (M, N): cuBLAS GEMM, then the epilogue pass
    only where cuBLAS cannot finish (see the module docstring). Returns (M, N)."""
    dt = x2.dtype
    wt = weight.t()
    plain = activation == "none" and out_dtype == dt
    if plain and residual is None and bias is None:
        return torch.mm(x2, wt)
    if plain and residual is None and bias.dtype == dt:
        return torch.addmm(bias, x2, wt)
    if plain and bias is None and residual.dtype == dt:
        return torch.addmm(residual, x2, wt)
    if out_dtype == torch.float32 and dt != torch.float32:
        # fp32 output (the fp32 residual stream under fp16): the product stays fp32, as in the
        # Triton GEMM (cuBLAS's half GEMM with an fp32 output; on CPU the same in fp32).
        on_cpu = x2.device.type == "cpu"
        y = torch.mm(x2.float(), wt.float()) if on_cpu else torch.mm(x2, wt, out_dtype=out_dtype)
    else:
        y = torch.mm(x2, wt)
    return linear_epilogue(y, bias, activation, residual, out_dtype)
