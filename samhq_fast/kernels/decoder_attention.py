"""Fused multi-head attention for the mask decoder's two-way transformer (after q/k/v projections).

Reference: :func:`samhq_fast.ops.decoder_attention.decoder_attention_reference` is the oracle and
its module docstring is the contract. The three attentions of the decoder are all small-head-dim,
memory/latency-bound ops: token->image (~7-12 queries over 4096 keys, D = 16), image->token (4096
queries over ~7-12 keys, D = 16) and token self-attention (~7-12 x ~7-12, D = 32).

Design:

* Flash-style: one program per (kv group, head, query block), online softmax in fp32 with exp2,
  fp32 accumulation; logits never leave registers (no Tq x Tk tensor in memory).
* Group stacking: the queries of the ``kv_group`` prompts that share one image's k/v are treated
  as ONE query sequence of ``kv_group * Tq`` rows (row ``r`` is prompt ``r // Tq``, token
  ``r % Tq``), so a program streams the 4096 image keys once for up to BLOCK_M / Tq prompts
  instead of once per prompt, and the 7-row query blocks stop wasting most of a 16-row tile. The
  per-row gather costs nothing: the q/out addresses are computed per row anyway. ``q_group``
  (shared image queries) needs no trick: programs of one image read the same q, which L2 serves.
* Any strides (slices of a fused projection, transposes, stride-0 expands) are read in place;
  the output is written straight into a fresh ``(N, Tq, Ci)`` tensor, heads interleaved.
* The head dim is padded to ``D_PAD = max(16, next_pow2(D))`` (tl.dot needs K >= 16) with
  masked zero loads, which is exact: padded channels add 0 to q.k and padded v columns are never
  stored. Tk and the stacked query rows are masked per tile: keys past Tk get -inf logits (every
  key block holds at least one real key, so the running max stays finite), padded query rows are
  computed on zeros and never stored.
* Static tiles, no autotuning: at D <= 32 the tiles are tiny, so the choice is about parallelism
  and loop length, not registers; BLOCK_M/BLOCK_N follow next_pow2(rows)/next_pow2(Tk) clamped
  to [16, 128] (64 for queries when the key loop is long, for more programs; 64 when D_PAD > 64,
  for registers). Autotuning would also cost a benchmarking pass per new token count, and the
  token count changes with the prompt type.
* Probabilities are rounded to the input dtype before P @ V, as the reference does.
* Split-KV: token->image attention of few prompts launches few programs (1 prompt: one per
  head, 8, on a 132-SM GPU), each streaming all 4096 keys. When the program count is below
  ``SPLIT_TARGET_PER_SM`` x the SM count, the keys are split across programs in runs of whole
  key blocks (every split holds a real key); each writes its unnormalised fp32 partial
  (running max, sum, accumulator), and ``_decoder_attn_combine`` merges the partials of a row
  (the log-sum-exp rescaling of the online softmax, over splits in a fixed order: deterministic).
  The number of splits is a function of the shapes and the SM count alone
  (:func:`num_kv_splits`).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from samhq_fast.kernels._common import on_gpu
from samhq_fast.ops.decoder_attention import check_inputs, decoder_attention_reference

__all__ = ["decoder_attention", "decoder_attention_reference"]

_LOG2E = 1.4426950408889634
# Split the keys when fewer programs than this many per SM would run (2: one resident, one
# queued per SM hides the tail), each split holding at least MIN_BLOCKS_PER_SPLIT key blocks
# (the q tile load and the partial store amortised over a few blocks), at most MAX_SPLITS.
SPLIT_TARGET_PER_SM = 2
MIN_BLOCKS_PER_SPLIT = 2
MAX_SPLITS = 32
META_SM_COUNT = 132  # H100 / H200: what the ahead-of-time tier records launches for


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST (CPU only): triton 3.9's interpreter multiplies bf16 bit patterns as integers in
    # tl.dot, so bf16 operands go to fp32 there; exact, like bf16 tensor cores (fp32 accumulate).
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _decoder_attn_fwd(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    s_qb,
    s_qt,
    s_qc,
    s_kb,
    s_kt,
    s_kc,
    s_vb,
    s_vt,
    s_vc,
    s_ob,
    s_ot,
    s_oc,
    part_o_ptr,  # SPLIT: (NUM_SPLITS, N * Tq, Ci) fp32 unnormalised accumulators
    part_ml_ptr,  # SPLIT: (NUM_SPLITS, N * Tq, NUM_HEADS, 2) fp32 running max (log2), sum
    qk_scale,  # D ** -0.5 * log2(e)
    Tq,
    Tk,
    M,  # stacked query rows per program group: kv_group * Tq
    NUM_M_BLOCKS,
    NUM_HEADS,
    Q_GROUP,
    KV_GROUP,
    KEYS_PER_SPLIT,  # a multiple of BLOCK_N
    NUM_SPLITS,
    R,  # output rows N * Tq (SPLIT: rows of the partials)
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
):
    dtype = q_ptr.dtype.element_ty
    # 1-D grid (no 65535 limit); query blocks of one (group, head) are adjacent: shared K/V in L2.
    pid = tl.program_id(0)
    if SPLIT:  # the splits of one query block are adjacent: they share its q tile
        split = pid % NUM_SPLITS
        pid = pid // NUM_SPLITS
        k_lo = split * KEYS_PER_SPLIT
        k_hi = tl.minimum(k_lo + KEYS_PER_SPLIT, Tk)
    else:
        split = 0
        k_lo = 0
        k_hi = Tk
    m_block = pid % NUM_M_BLOCKS
    rest = pid // NUM_M_BLOCKS
    head = rest % NUM_HEADS
    g = (rest // NUM_HEADS).to(tl.int64)  # int64: batch offsets overflow int32 at large N

    d = tl.arange(0, D_PAD)
    in_d = d < HEAD_DIM
    chan = head * HEAD_DIM + d

    # Stacked query rows -> (batch item n, token t).
    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = rows < M
    n = g * KV_GROUP + rows // Tq
    t = rows % Tq
    q = tl.load(
        q_ptr + ((n // Q_GROUP) * s_qb + t * s_qt)[:, None] + chan[None, :] * s_qc,
        mask=in_m[:, None] & in_d[None, :],
        other=0.0,
    )

    k_base = k_ptr + g * s_kb + chan[None, :] * s_kc
    v_base = v_ptr + g * s_vb + chan[None, :] * s_vc
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    for start_n in range(k_lo, k_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_n = offs_n < Tk
        kv_mask = in_n[:, None] & in_d[None, :]
        k = tl.load(k_base + offs_n[:, None] * s_kt, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), None, DOT_PRECISION, DOT_UPCAST) * qk_scale
        s = tl.where(in_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every key block has a real key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * s_vt, mask=kv_mask, other=0.0)
        # As the reference: probabilities in the input dtype for P @ V.
        acc = _dot(p.to(dtype), v, acc * alpha[:, None], DOT_PRECISION, DOT_UPCAST)
        m_i = m_new

    if SPLIT:  # partials of output row n * Tq + t, merged by _decoder_attn_combine
        r = (split * R + n * Tq + t).to(tl.int64)
        tl.store(
            part_o_ptr + (r * (NUM_HEADS * HEAD_DIM))[:, None] + chan[None, :],
            acc,
            mask=in_m[:, None] & in_d[None, :],
        )
        ml = part_ml_ptr + (r * NUM_HEADS + head) * 2
        tl.store(ml, m_i, mask=in_m)
        tl.store(ml + 1, l_i, mask=in_m)
    else:
        out = acc / l_i[:, None]
        tl.store(
            out_ptr + (n * s_ob + t * s_ot)[:, None] + chan[None, :] * s_oc,
            out.to(dtype),
            mask=in_m[:, None] & in_d[None, :],
        )


@triton.jit
def _decoder_attn_combine(
    part_o_ptr,
    part_ml_ptr,
    out_ptr,
    s_ob,
    s_ot,
    s_oc,
    Tq,
    R,
    NUM_SPLITS,
    NUM_HEADS,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # One program per (block of output rows, head): the splits' (max, sum, acc) merged in split
    # order, each rescaled to the common max, all in fp32.
    pid = tl.program_id(0)
    head = pid % NUM_HEADS
    rows = (pid // NUM_HEADS) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_r = rows < R
    d = tl.arange(0, D_PAD)
    in_d = d < HEAD_DIM
    chan = head * HEAD_DIM + d
    mask = in_r[:, None] & in_d[None, :]
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_sum = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, D_PAD), tl.float32)
    for split in range(0, NUM_SPLITS):
        r = (split * R + rows).to(tl.int64)
        ml = part_ml_ptr + (r * NUM_HEADS + head) * 2
        m_s = tl.load(ml, mask=in_r, other=0.0)  # finite: every split holds a real key
        l_s = tl.load(ml + 1, mask=in_r, other=1.0)
        o_s = tl.load(
            part_o_ptr + (r * (NUM_HEADS * HEAD_DIM))[:, None] + chan[None, :],
            mask=mask,
            other=0.0,
        )
        m_new = tl.maximum(m, m_s)
        alpha = tl.exp2(m - m_new)  # 0 on the first split (m = -inf)
        beta = tl.exp2(m_s - m_new)
        l_sum = l_sum * alpha + l_s * beta
        acc = acc * alpha[:, None] + o_s * beta[:, None]
        m = m_new
    out = acc / l_sum[:, None]
    n = rows // Tq
    t = rows % Tq
    tl.store(
        out_ptr + (n.to(tl.int64) * s_ob + t * s_ot)[:, None] + chan[None, :] * s_oc,
        out.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def _tiles(rows: int, tk: int, d_pad: int, on_cuda: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages); see the module docstring for why."""
    if not on_cuda:  # interpreter: its cost is per program, so large tiles (nothing to tune)
        return (
            min(256, max(16, triton.next_power_of_2(rows))),
            min(128, max(16, triton.next_power_of_2(tk))),
            4,
            1,
        )
    cap = 64 if d_pad > 64 else 128
    cap_m = min(cap, 64) if tk > 256 else cap  # long key loop: more, shorter-row programs
    block_m = min(cap_m, max(16, triton.next_power_of_2(rows)))
    block_n = min(cap, max(16, triton.next_power_of_2(tk)))
    num_warps = 8 if block_m * max(block_n, d_pad) >= 128 * 128 else 4
    num_stages = 3 if tk > block_n else 1
    return block_m, block_n, num_warps, num_stages


def num_kv_splits(programs: int, key_blocks: int, sm_count: int) -> int:
    """How many runs the keys are split into for ``programs`` (group, head, query block)
    programs over ``key_blocks`` key blocks on a GPU of ``sm_count`` SMs (1: no split)."""
    target = SPLIT_TARGET_PER_SM * sm_count
    if programs >= target or key_blocks < 2 * MIN_BLOCKS_PER_SPLIT:
        return 1
    return max(
        1, min(triton.cdiv(target, programs), key_blocks // MIN_BLOCKS_PER_SPLIT, MAX_SPLITS)
    )


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return META_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def _decoder_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    q_group: int = 1,
    kv_group: int = 1,
    *,
    tiles: tuple[int, int] | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """:func:`decoder_attention` with ``tiles = (BLOCK_M, BLOCK_N)`` and / or ``splits`` (the
    split-KV path with that many splits, clamped to the key blocks; 1 runs it with one split)
    forced (tests). Without ``splits``, GPUs split by :func:`num_kv_splits`, the interpreter
    never."""
    N = check_inputs(q, k, v, num_heads, q_group, kv_group)
    Tq, Ci = q.shape[1], q.shape[2]
    Tk = k.shape[1]
    D = Ci // num_heads
    out = torch.empty((N, Tq, Ci), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if Tk == 0:  # the reference's empty softmax @ empty v
        return out.zero_()

    d_pad = max(16, triton.next_power_of_2(D))
    rows = kv_group * Tq
    block_m, block_n, num_warps, num_stages = _tiles(rows, Tk, d_pad, on_gpu(q))
    if tiles is not None:
        block_m, block_n = tiles
    upcast = q.dtype == torch.bfloat16 and not on_gpu(q)  # see _dot
    num_m_blocks = triton.cdiv(rows, block_m)
    programs = (N // kv_group) * num_heads * num_m_blocks
    key_blocks = triton.cdiv(Tk, block_n)
    if splits is None:
        splits = num_kv_splits(programs, key_blocks, _sm_count(q.device)) if on_gpu(q) else 1
        split = splits > 1
    else:
        split = True
    # Whole key blocks per split, and no empty split (each must hold a real key).
    keys_per_split = triton.cdiv(key_blocks, max(1, min(splits, key_blocks))) * block_n
    splits = triton.cdiv(Tk, keys_per_split)
    R = N * Tq
    if split:
        # A split walks a few key blocks: 2 stages suffice (3 spill 8 B at 16 rows on triton 3.6).
        num_stages = min(num_stages, 2)
        part_o = torch.empty((splits, R, Ci), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((splits, R, num_heads, 2), dtype=torch.float32, device=q.device)
    else:
        part_o = part_ml = out  # not read
    _decoder_attn_fwd[(programs * (splits if split else 1),)](
        q,
        k,
        v,
        out,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        part_o,
        part_ml,
        D**-0.5 * _LOG2E,
        Tq,
        Tk,
        rows,
        num_m_blocks,
        num_heads,
        q_group,
        kv_group,
        keys_per_split,
        splits,
        R,
        HEAD_DIM=D,
        D_PAD=d_pad,
        # fp32 inputs: full-precision dots (no TF32), as the fp32 reference.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32",
        DOT_UPCAST=upcast,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        SPLIT=split,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if split:
        block_r = min(64, max(16, triton.next_power_of_2(R)))
        _decoder_attn_combine[(triton.cdiv(R, block_r) * num_heads,)](
            part_o,
            part_ml,
            out,
            *out.stride(),
            Tq,
            R,
            splits,
            num_heads,
            HEAD_DIM=D,
            D_PAD=d_pad,
            BLOCK_R=block_r,
            num_warps=4 if block_r * d_pad >= 64 * 32 else 2,
        )
    return out


def decoder_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    q_group: int = 1,
    kv_group: int = 1,
) -> torch.Tensor:
    """Fused attention; same contract as ``decoder_attention_reference``.

    ``q`` ``(N // q_group, Tq, Ci)``, ``k``/``v`` ``(N // kv_group, Tk, Ci)`` with any strides
    -> ``(N, Tq, Ci)`` in ``q.dtype``.
    """
    return _decoder_attention(q, k, v, num_heads, q_group, kv_group)
