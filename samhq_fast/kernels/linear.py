"""Tiled GEMM for ``nn.Linear`` with a fused epilogue (bias, GELU/ReLU, residual add, cast).

Reference: :func:`samhq_fast.ops.linear.linear_reference` is the oracle and its module docstring
is the contract: ``y = cast(act(x @ weight.T + bias) + residual)``, all of it in fp32.

Design:

* Classic tiled GEMM, one program per ``BLOCK_M x BLOCK_N`` output tile, fp32 accumulator, a
  loop over K. Program ids are grouped ``GROUP_M`` tiles down M before moving along N, so a group
  re-reads the same weight columns and x rows while they are still in L2.
* The epilogue runs on the fp32 accumulator before anything is stored: bias, exact (erf) GELU or
  ReLU, then the residual (read in its own dtype, usually fp32: the residual stream must not
  overflow fp16), then one cast to the output dtype. Saves the separate bias/activation/add
  kernels and their full ``M x N`` round trips through memory.
* No padding, and no copies where a view will do: x is read through its strides (leading dims
  flattened with ``reshape``: a view whenever the strides allow, else a copy) and the weight
  ``(N, K)`` through its strides as ``W^T`` tiles. Rows and columns past M/N are read wrapped
  (``% M``, ``% N``: in bounds, never stored), so only the K tail needs a load mask, and only
  when ``K % BLOCK_K != 0``.
* Row offsets are int64: ``M * N`` passes 2**31 at large batch (ViT-H lin1 has 4096 x 5120
  outputs per image: past ~100 images).
* CUDA autotunes over a few Hopper/Ampere tiles per precision, keyed on ``(bucket(M), N, K)``: M
  is rounded up to a power of two, or every new batch size would retune. Small M (the decoder's
  tokens) takes one fixed tile. The Triton interpreter (CPU) uses one fixed tile: autotuning there
  is slow and measures nothing.
* The measured choice: on CUDA a GEMM of more than 128 rows (the encoder's) runs whichever of
  this kernel, cuBLAS + the epilogue pass (:mod:`samhq_fast.kernels.linear_epilogue`) and, on
  Hopper in half precision, the persistent TMA GEMM (:mod:`samhq_fast.kernels.linear_tma`) was
  measured fastest for its shape on this GPU model (:mod:`samhq_fast.kernels.gemm_choice`,
  cached on disk); the decoder's small GEMMs keep the fixed tile.
* Precision: fp32 inputs use ``input_precision="ieee"`` (no TF32) to match the fp32 reference;
  half inputs multiply on tensor cores with fp32 accumulation. Two interpreter (CPU) bugs are
  worked around: bf16 dot operands are upcast (exact, see ``_dot``) and bf16 outputs are rounded
  to nearest even by hand (``_round_to_bf16``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from samhq_fast.kernels._common import on_gpu
from samhq_fast.kernels.gemm_choice import CHOICE
from samhq_fast.kernels.linear_epilogue import _round_to_bf16, cublas_allowed, linear_cublas
from samhq_fast.ops.linear import check_linear_inputs, linear_reference

__all__ = ["linear", "linear_reference"]


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST (CPU only): triton 3.9's interpreter multiplies bf16 bit patterns as integers in
    # tl.dot, so bf16 operands go to fp32 there; exact, like bf16 tensor cores (fp32 accumulate).
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _linear_fwd(
    x_ptr,
    w_ptr,
    bias_ptr,
    res_ptr,
    out_ptr,
    M,
    N,
    K,
    M_BUCKET,  # autotune key only
    s_xm,
    s_xk,
    s_wn,
    s_wk,
    s_rm,
    s_rn,
    s_om,
    s_on,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped ordering: GROUP_M row tiles share each weight column tile while it is in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Wrapped rows/columns: in-bounds loads without masks; they are never stored.
    rm = (offs_m % M).to(tl.int64)
    rn = offs_n % N
    x_ptrs = x_ptr + rm[:, None] * s_xm + offs_k[None, :] * s_xk
    w_ptrs = w_ptr + offs_k[:, None] * s_wk + rn[None, :] * s_wn  # W^T tile (BLOCK_K, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = _dot(a, b, acc, DOT_PRECISION, DOT_UPCAST)
        x_ptrs += BLOCK_K * s_xk
        w_ptrs += BLOCK_K * s_wk

    # Epilogue, fp32 throughout.
    mask_m = offs_m < M
    mask_n = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == "gelu":
        acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
    elif ACTIVATION == "relu":
        acc = tl.maximum(acc, 0.0)
    mask = mask_m[:, None] & mask_n[None, :]
    om = offs_m.to(tl.int64)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + om[:, None] * s_rm + offs_n[None, :] * s_rn, mask=mask, other=0.0)
        acc += res.to(tl.float32)
    if ROUND_BF16:
        acc = _round_to_bf16(acc)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + om[:, None] * s_om + offs_n[None, :] * s_on, out, mask=mask)


def _cfg(bm: int, bn: int, bk: int, stages: int, warps: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
        num_stages=stages,
        num_warps=warps,
    )


# Autotune configs per input precision. Every one compiles without a register spill for sm_90
# and sm_80 with the heaviest epilogue (bias + GELU + residual), and fits both GPUs' shared
# memory: checked by the ahead-of-time tier (samhq_fast/kernels/aot.py, bench/results/
# aot-sm90.md). Half precision runs on tensor cores (wgmma on Hopper); 4-warp 128x128 tiles and
# the 128x256 / 256x128 tiles spill there (255 registers), so they are not offered. fp32 runs
# ieee FMA dots (no TF32): small tiles, or its accumulators spill.
_CONFIGS = {
    "half": [
        _cfg(128, 128, 64, 4, 8),
        _cfg(128, 128, 32, 4, 8),
        _cfg(128, 64, 64, 4, 4),
        _cfg(64, 128, 64, 4, 4),
    ],
    "fp32": [
        _cfg(64, 64, 32, 3, 4),
        _cfg(128, 64, 32, 3, 8),
    ],
}
_KEY = ["M_BUCKET", "N", "K", "HAS_BIAS", "HAS_RESIDUAL", "ACTIVATION"]
_linear_fwd_tuned = {
    kind: triton.autotune(configs=configs, key=_KEY)(
        triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_linear_fwd)
    )
    for kind, configs in _CONFIGS.items()
}
# Small M (decoder tokens, a few prompts): one fixed tile, no autotuning (a new prompt count
# would otherwise cost a benchmarking pass on its first call). fp32: K tile 32 (64 spills).
_SMALL_M = 128
_SMALL_TILE = {
    "half": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3),
    "fp32": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
}

_CPU_BLOCK = 64  # interpreter: one fixed tile (its cost is per program)
# The candidates of the measured choice (gemm_choice): this kernel, cuBLAS + the epilogue pass,
# the persistent TMA GEMM (Hopper, half precision, aligned rows: kernels/linear_tma.py).
GEMMS = ("triton", "cublas", "tma")
# Set only by the ahead-of-time recorder's context (kernels/aot.recording): meta tensors then
# launch every candidate, so that each is compiled; otherwise they run the default one.
RECORD_EVERY_CANDIDATE = False
_FORCED_BLOCK_CUDA = 64


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    gemm: str | None = None,
) -> torch.Tensor:
    """Fused linear; same contract as ``linear_reference``.

    ``block_m``/``block_n``/``block_k`` (powers of two >= 16) force a fixed tile (tests);
    otherwise CUDA autotunes and CPU (Triton interpreter) uses one fixed 64 x 64 x 64 tile.
    On CUDA, GEMMs of more than 128 rows run the candidate measured fastest for their shape
    (:mod:`samhq_fast.kernels.gemm_choice`); ``gemm`` (one of ``GEMMS``) forces one (tests).
    """
    out_dtype = check_linear_inputs(x, weight, bias, activation, residual, out_dtype)
    N, K = weight.shape
    lead = x.shape[:-1]
    M = lead.numel()
    out = torch.empty((M, N), dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out.reshape(*lead, N)

    x2 = x.reshape(M, K)  # a view when the leading dims flatten, else a copy
    res2 = residual.reshape(M, N) if residual is not None else out  # dummy if unused
    bias_arg = bias.contiguous() if bias is not None else out  # dummy if unused; N elements
    upcast = x.dtype == torch.bfloat16 and not on_gpu(x)  # see _dot
    args = (
        x2,
        weight,
        bias_arg,
        res2,
        out,
        M,
        N,
        K,
        triton.next_power_of_2(M),
        *x2.stride(),
        *weight.stride(),
        *res2.stride(),
        *out.stride(),
    )
    consts = dict(
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        ACTIVATION=activation,
        # fp32 inputs: full-precision dots (no TF32), as the fp32 reference.
        DOT_PRECISION="ieee" if x.dtype == torch.float32 or upcast else "tf32",
        DOT_UPCAST=upcast,
        ROUND_BF16=out_dtype == torch.bfloat16 and not on_gpu(x),  # see _round_to_bf16
    )
    forced = block_m is not None or block_n is not None or block_k is not None
    kind = "fp32" if x.dtype == torch.float32 else "half"
    if gemm is not None and gemm not in GEMMS:
        raise ValueError(f"gemm must be one of {GEMMS} or None, got {gemm!r}")
    if gemm is not None or (on_gpu(x) and not forced and M > _SMALL_M):

        def run_triton() -> torch.Tensor:
            if not on_gpu(x):  # forced on CPU (tests): the interpreter's fixed tile
                return linear(x2, weight, bias, activation, res, out_dtype, block_m=_CPU_BLOCK)

            def grid(meta: dict) -> tuple[int]:
                return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

            _linear_fwd_tuned[kind][grid](*args, **consts)
            return out

        res = residual.reshape(M, N) if residual is not None else None
        candidates = {"triton": run_triton}
        if cublas_allowed(x.dtype):
            candidates["cublas"] = lambda: linear_cublas(x2, weight, bias, activation, res,
                                                         out_dtype)  # fmt: skip
        from samhq_fast.kernels.linear_tma import linear_tma, tma_unsupported_reasons

        if gemm == "tma" or (on_gpu(x) and not tma_unsupported_reasons(x2, weight, res,
                                                                        out_dtype)):  # fmt: skip
            candidates["tma"] = lambda: linear_tma(x2, weight, bias, activation, res, out_dtype)
        if gemm is not None:
            if gemm not in candidates:
                raise ValueError(f"gemm={gemm!r} cannot run {x.dtype} here (TF32 is on)")
            return candidates[gemm]().reshape(*lead, N)
        if x.device.type == "meta" and RECORD_EVERY_CANDIDATE:  # aot: compile every candidate
            for run in candidates.values():
                run()
            return out.reshape(*lead, N)
        key = (f"{x.dtype}|M{triton.next_power_of_2(M)}|N{N}|K{K}|bias={bias is not None}|"
               f"{activation}|res={residual.dtype if residual is not None else None}|"
               f"out={out_dtype}")  # fmt: skip
        info = dict(M=M, N=N, K=K, dtype=str(x.dtype), out_dtype=str(out_dtype),
                    epilogue=f"bias={bias is not None} act={activation} res="
                    f"{residual.dtype if residual is not None else None}")  # fmt: skip
        return candidates[CHOICE.choose(key, info, candidates, x.device)]().reshape(*lead, N)
    elif on_gpu(x) and not forced:
        t = _SMALL_TILE[kind]
        grid = (triton.cdiv(M, t["BLOCK_M"]) * triton.cdiv(N, t["BLOCK_N"]),)
        _linear_fwd[grid](*args, **consts, EVEN_K=K % t["BLOCK_K"] == 0, **t)
    else:
        default = _FORCED_BLOCK_CUDA if on_gpu(x) else _CPU_BLOCK
        bm, bn, bk = block_m or default, block_n or default, block_k or default
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
        _linear_fwd[grid](
            *args,
            **consts,
            EVEN_K=K % bk == 0,
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            GROUP_M=8,
            num_warps=4,
            num_stages=3 if on_gpu(x) else 1,
        )
    return out.reshape(*lead, N)
