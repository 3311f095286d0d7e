"""Persistent Hopper GEMM for ``nn.Linear`` with TMA tensor descriptors and the fused epilogue.

Reference: :func:`samhq_fast.ops.linear.linear_reference` is the oracle and its module docstring
is the contract: ``y = cast(act(x @ weight.T + bias) + residual)``, all of it in fp32 (the same
epilogue as :mod:`samhq_fast.kernels.linear`).

Design:

* x ``(M, K)``, the weight ``(N, K)`` and the output ``(M, N)`` are read / written through TMA
  tensor descriptors (built on the host): the copy engine moves whole tiles into shared memory,
  zero-filling past M/N/K and clipping the store, so there are no masks and no wrapped indices.
  Bias and residual stay plain pointer loads: the residual may have any strides and dtype.
* Persistent: ``min(#SMs, #tiles)`` programs walk the tiles grid-stride, in ``GROUP_M`` grouped
  order (L2 reuse of weight columns). ``flatten=True`` lets the software pipeliner overlap one
  tile's epilogue with the next tile's first loads (``flatten=False`` spills on triton 3.6).
* The descriptors' block shapes depend on the config: each config's ``pre_hook`` sets them, as
  triton's persistent matmul tutorial does (the AOT tier applies the same hooks to copies).
* sm_90+ only (:data:`MIN_ARCH`): on sm_80 the configs spill, and TMA is Hopper hardware.
  Half inputs only (fp32 has the ieee tiled GEMM). :func:`tma_unsupported_reasons` says why a
  call cannot take this path; the caller falls back to :func:`samhq_fast.kernels.linear.linear`.
* Configs: every one compiles for sm_90 without a spill with the heaviest epilogue (bias + GELU +
  fp32 residual) and fits 227 KB of shared memory; an fp32 output tile doubles the store
  buffer, so fp32 outputs get their own (smaller) list. The CPU interpreter runs one fixed small
  tile, with the bf16 workarounds of the tiled kernel (``_dot`` upcast, ``_round_to_bf16``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from samhq_fast.kernels._common import on_gpu
from samhq_fast.kernels.linear import _dot
from samhq_fast.kernels.linear_epilogue import _round_to_bf16
from samhq_fast.ops.linear import check_linear_inputs, linear_reference

__all__ = ["MIN_ARCH", "linear_reference", "linear_tma", "tma_unsupported_reasons"]

MIN_ARCH = 90  # compute capability x 10 (read by the AOT tier: no sm_80 compiles)
_HALF = (torch.bfloat16, torch.float16)
_META_SMS = 132  # H100 / H200 SXM: what meta (AOT recording) and CPU launches assume


@triton.jit
def _linear_tma_fwd(
    x_desc,
    w_desc,
    out_desc,
    bias_ptr,
    res_ptr,
    M,
    N,
    K,
    M_BUCKET,  # autotune key only
    s_rm,
    s_rn,
    DTYPES: tl.constexpr,  # autotune key only ("bf16->fp32"): descriptors carry no dtype there
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ACTIVATION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    ROUND_BF16: tl.constexpr,
    NUM_SMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    start = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    num_pid_in_group = GROUP_M * num_pid_n
    # flatten: one software-pipelined loop over (tile, k), so the epilogue overlaps next loads.
    for tile in tl.range(start, num_tiles, NUM_SMS, flatten=True):
        group_id = tile // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + (tile % group_size_m)
        pid_n = (tile % num_pid_in_group) // group_size_m
        om = pid_m * BLOCK_M
        on = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            # TMA zero-fills past M, N and K: the K tail adds zeros, no mask needed.
            a = x_desc.load([om, ki * BLOCK_K])
            b = w_desc.load([on, ki * BLOCK_K])
            acc = _dot(a, b.T, acc, "tf32", DOT_UPCAST)  # half inputs: precision is unused
        # Epilogue, fp32 throughout.
        offs_n = on + tl.arange(0, BLOCK_N)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        if ACTIVATION == "gelu":
            acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
        elif ACTIVATION == "relu":
            acc = tl.maximum(acc, 0.0)
        if HAS_RESIDUAL:
            offs_m = om + tl.arange(0, BLOCK_M)
            mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
            rm = offs_m.to(tl.int64)[:, None] * s_rm  # M * N may pass 2**31
            res = tl.load(res_ptr + rm + offs_n[None, :] * s_rn, mask=mask, other=0.0)
            acc += res.to(tl.float32)
        if ROUND_BF16:
            acc = _round_to_bf16(acc)
        out_desc.store([om, on], acc.to(out_desc.dtype))  # clipped at M, N by the TMA unit


def _set_block_shapes(nargs: dict) -> None:
    # Config pre_hook: the descriptors' tiles follow the config's tile.
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["x_desc"].block_shape = [bm, bk]
    nargs["w_desc"].block_shape = [bn, bk]
    nargs["out_desc"].block_shape = [bm, bn]


def _cfg(bm: int, bn: int, bk: int, stages: int, warps: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
        num_stages=stages,
        num_warps=warps,
        pre_hook=_set_block_shapes,
    )


# Keyed by the output's element size. sm_90, bias + GELU + fp32 residual, triton 3.9 and 3.6:
# all spill-free (128x256, 4-warp 128x128 and 64x128 spill: not offered). The fp32 output tile
# is twice the store buffer: 128x128 with 4 stages passes 227 KB, so it gets 3.
_CONFIGS = {
    2: [_cfg(128, 128, 64, 4, 8), _cfg(128, 128, 64, 3, 8), _cfg(128, 64, 64, 4, 4)],
    4: [_cfg(128, 128, 64, 3, 8), _cfg(128, 64, 64, 4, 4)],
}
_KEY = ["M_BUCKET", "N", "K", "DTYPES", "HAS_BIAS", "HAS_RESIDUAL", "ACTIVATION"]
_linear_tma_fwd_tuned = {
    size: triton.autotune(configs=configs, key=_KEY)(_linear_tma_fwd)
    for size, configs in _CONFIGS.items()
}
_CPU_TILE = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=1)

_sm_counts: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _META_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


def _dtype_name(d: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(d, str(d))


def _tma_operand_reasons(name: str, t: torch.Tensor) -> list[str]:
    # TMA: 2-D, unit last stride, 16-byte aligned base and row stride.
    if t.dim() != 2:
        return [f"{name} must be 2-D, got {t.dim()}-D"]
    out = []
    if t.stride(1) != 1:
        out.append(f"{name} last stride is {t.stride(1)}, TMA needs 1")
    if (t.stride(0) * t.element_size()) % 16:
        out.append(f"{name} row stride {t.stride(0)} x {t.element_size()} B is not 16-byte aligned")
    if t.device.type != "meta" and t.data_ptr() % 16:
        out.append(f"{name} base pointer is not 16-byte aligned")
    return out


def tma_unsupported_reasons(
    x2: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor | None,
    out_dtype: torch.dtype,
    device_capability: tuple[int, int] | None = None,
) -> list[str]:
    """Why :func:`linear_tma` cannot run this call (empty: it can).

    ``x2`` is the flattened ``(M, K)`` input, ``weight`` ``(N, K)``. ``device_capability``
    defaults to the device's; meta tensors (AOT recording) count as ``(9, 0)``; CPU tensors with
    no capability given run in the Triton interpreter, which has no minimum.
    """
    reasons = []
    if x2.dtype not in _HALF:
        reasons.append(f"x dtype {x2.dtype} is not bfloat16/float16")
    if weight.dtype != x2.dtype:
        reasons.append(f"weight dtype {weight.dtype} differs from x dtype {x2.dtype}")
    reasons += _tma_operand_reasons("x", x2)
    reasons += _tma_operand_reasons("weight", weight)
    if x2.dim() == 2 and weight.dim() == 2:
        if x2.shape[1] != weight.shape[1]:
            reasons.append(f"K mismatch: x is {tuple(x2.shape)}, weight {tuple(weight.shape)}")
        elif x2.shape[1] == 0:
            reasons.append("K is 0 (a descriptor needs positive sizes)")
        # The output is allocated contiguous (M, N): its row stride is N elements.
        out_size = torch.empty((), dtype=out_dtype).element_size()
        if (weight.shape[0] * out_size) % 16:
            reasons.append(f"output row {weight.shape[0]} x {out_size} B is not 16-byte aligned")
    if residual is not None and residual.dim() != 2:
        reasons.append(f"residual must be 2-D (M, N), got {residual.dim()}-D")
    cap = (9, 0) if x2.device.type == "meta" else device_capability
    if cap is None and x2.device.type == "cuda":
        cap = torch.cuda.get_device_capability(x2.device)
    if cap is not None and tuple(cap) < divmod(MIN_ARCH, 10):
        reasons.append(f"compute capability {tuple(cap)} < {divmod(MIN_ARCH, 10)} (TMA, wgmma)")
    return reasons


def linear_tma(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    *,
    num_sms: int | None = None,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """Fused linear on a 2-D ``x2`` ``(M, K)``; same contract as ``linear_reference``.

    Returns ``out`` ``(M, N)`` (contiguous). ValueError (with every reason) if the call is not
    supported (:func:`tma_unsupported_reasons`). ``num_sms`` caps the persistent grid (default:
    the device's SM count); ``config`` forces one tile (default: autotuned on CUDA, a fixed
    32 x 32 x 32 tile in the CPU interpreter).
    """
    out_dtype = check_linear_inputs(x2, weight, bias, activation, residual, out_dtype)
    reasons = tma_unsupported_reasons(x2, weight, residual, out_dtype)
    if reasons:
        raise ValueError("linear_tma cannot run this call: " + "; ".join(reasons))
    M, K = x2.shape
    N = weight.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=x2.device)
    if out.numel() == 0:
        return out
    sms = num_sms if num_sms is not None else _num_sms(x2.device)
    gpu = on_gpu(x2)
    if config is not None:
        stages = config.num_stages if gpu else 1
        tile = {**config.kwargs, "num_warps": config.num_warps, "num_stages": stages}
    else:
        tile = None if gpu else dict(_CPU_TILE)  # None: autotuned
    # Placeholder block shapes: the config's pre_hook (or _set_block_shapes below) sets them.
    bm, bn, bk = 32, 32, 32
    descs = dict(
        x_desc=TensorDescriptor.from_tensor(x2, [bm, bk]),
        w_desc=TensorDescriptor.from_tensor(weight, [bn, bk]),
        out_desc=TensorDescriptor.from_tensor(out, [bm, bn]),
    )
    res = residual if residual is not None else out  # dummy if unused
    bias_arg = bias.contiguous() if bias is not None else out  # dummy if unused; N elements
    upcast = x2.dtype == torch.bfloat16 and not gpu  # see linear._dot
    args = (bias_arg, res, M, N, K, triton.next_power_of_2(M), *res.stride())
    consts = dict(
        DTYPES=f"{_dtype_name(x2.dtype)}->{_dtype_name(out_dtype)}",
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        ACTIVATION=activation,
        DOT_UPCAST=upcast,
        ROUND_BF16=out_dtype == torch.bfloat16 and not gpu,  # see linear_epilogue._round_to_bf16
        NUM_SMS=sms,
    )

    def grid(meta: dict) -> tuple[int]:
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        return (min(sms, tiles),)

    if tile is None:
        kernel = _linear_tma_fwd_tuned[out.element_size()]
        kernel[grid](descs["x_desc"], descs["w_desc"], descs["out_desc"], *args, **consts)
    else:
        _set_block_shapes({**descs, **tile})
        _linear_tma_fwd[grid(tile)](
            descs["x_desc"], descs["w_desc"], descs["out_desc"], *args, **consts, **tile
        )
    return out
