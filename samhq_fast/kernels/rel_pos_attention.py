"""Fused flash attention with decomposed relative position (SAM image encoder, windowed or global).

Reference: :func:`samhq_fast.ops.attention.rel_pos_attention_reference` is the oracle and its
module docstring is the contract. Per window of ``S_h x S_w`` tokens (the whole grid when global)::

    logits[q, k] = D ** -0.5 * q.k + rel_h[q, k_row] + rel_w[q, k_col]
    rel_h[q, j] = q . Rh[q_row - j + S_h - 1],  rel_w[q, j] = q . Rw[q_col - j + S_w - 1]

Design:

* A cheap pre-pass (two small einsums in the input dtype, as the reference does) computes
  ``rel_h`` ``(B, heads, H, W, S_h)`` and ``rel_w`` ``(B, heads, H, W, S_w)``: O(N * S) memory,
  never an N x N bias.
* One program per (batch * window, head, query block); online softmax in fp32 with exp2.
* The bias of a (query block, key block) tile is ``rel_h_tile @ onehot(k_row) +
  rel_w_tile @ onehot(k_col)``: two small tensor-core dots indexed per key, so it is right for
  any BLOCK_N whatever the grid row width, and the one-hot product selects values exactly.
* Window partition and padding live in the index math: q/k/v are read straight from the strided
  ``(B, H, W, 3C)`` tensor, keys outside the grid take ``pad_qkv`` (they are NOT masked), and the
  output is written straight into ``(B, H, W, C)``; padded query rows are never stored.
* Head dim ``D = D0 + D1`` with power-of-two chunks (80 = 64 + 16), so nothing is padded to 128.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from samhq_fast.kernels._common import on_gpu
from samhq_fast.ops.attention import (
    check_rel_pos_inputs,
    get_rel_pos,
    rel_pos_attention_reference,
)

__all__ = ["rel_pos_attention", "rel_pos_attention_reference"]


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST (CPU only): triton 3.9's interpreter multiplies bf16 bit patterns as integers in
    # tl.dot, so bf16 operands go to fp32 there; exact, like bf16 tensor cores (fp32 accumulate).
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _rel_pos_attn_fwd(
    qkv_ptr,
    pad_ptr,
    rel_h_ptr,
    rel_w_ptr,
    out_ptr,
    s_qb,
    s_qh,
    s_qw,
    s_qc,
    s_hb,
    s_hn,
    s_hh,
    s_hw,
    s_wb,
    s_wn,
    s_wh,
    s_ww,
    s_ob,
    s_oh,
    s_ow,
    s_oc,
    scale,
    H,
    W,
    NUM_HEADS,
    NUM_WIN,
    NUM_WIN_W,
    C,
    WS_H: tl.constexpr,
    WS_W: tl.constexpr,
    SH_PAD: tl.constexpr,
    SW_PAD: tl.constexpr,
    D0: tl.constexpr,
    D1: tl.constexpr,
    HAS_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    L: tl.constexpr = WS_H * WS_W
    NUM_M_BLOCKS: tl.constexpr = (L + BLOCK_M - 1) // BLOCK_M
    dtype = qkv_ptr.dtype.element_ty

    # 1-D grid (no 65535 limit on batch * windows); query blocks of one (window, head) are
    # adjacent so they share K/V in L2.
    pid = tl.program_id(0)
    m_block = pid % NUM_M_BLOCKS
    rest = pid // NUM_M_BLOCKS
    head = rest % NUM_HEADS
    bw = rest // NUM_HEADS
    b = (bw // NUM_WIN).to(tl.int64)  # int64: batch offsets overflow int32 at large batch
    win = bw % NUM_WIN
    row0 = (win // NUM_WIN_W) * WS_H
    col0 = (win % NUM_WIN_W) * WS_W

    qkv_base = qkv_ptr + b * s_qb
    q_chan = head * (D0 + D1)
    k_chan = C + q_chan
    v_chan = 2 * C + q_chan
    d0 = tl.arange(0, D0)
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)

    # Queries: window-local index -> grid (row, col). Padded query rows are computed but not
    # stored, so their q can be anything (zeros).
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    gh_m = row0 + offs_m // WS_W
    gw_m = col0 + offs_m % WS_W
    in_m = (offs_m < L) & (gh_m < H) & (gw_m < W)
    tok_m = gh_m * s_qh + gw_m * s_qw
    q0 = tl.load(
        qkv_base + tok_m[:, None] + (q_chan + d0)[None, :] * s_qc, mask=in_m[:, None], other=0.0
    )
    if D1 > 0:
        q1 = tl.load(
            qkv_base + tok_m[:, None] + (q_chan + d1)[None, :] * s_qc,
            mask=in_m[:, None],
            other=0.0,
        )

    # Per-query relative terms, loaded once per query block (padded columns read as 0).
    jh = tl.arange(0, SH_PAD)
    jw = tl.arange(0, SW_PAD)
    rel_h = tl.load(
        rel_h_ptr + b * s_hb + head * s_hn + (gh_m * s_hh + gw_m * s_hw)[:, None] + jh[None, :],
        mask=in_m[:, None] & (jh < WS_H)[None, :],
        other=0.0,
    )
    rel_w = tl.load(
        rel_w_ptr + b * s_wb + head * s_wn + (gh_m * s_wh + gw_m * s_ww)[:, None] + jw[None, :],
        mask=in_m[:, None] & (jw < WS_W)[None, :],
        other=0.0,
    )

    if HAS_PAD:
        pk0 = tl.load(pad_ptr + k_chan + d0)
        pv0 = tl.load(pad_ptr + v_chan + d0)
        if D1 > 0:
            pk1 = tl.load(pad_ptr + k_chan + d1)
            pv1 = tl.load(pad_ptr + v_chan + d1)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc0 = tl.zeros((BLOCK_M, D0), tl.float32)
    if D1 > 0:
        acc1 = tl.zeros((BLOCK_M, D1), tl.float32)

    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        r_n = offs_n // WS_W
        c_n = offs_n % WS_W
        gh_n = row0 + r_n
        gw_n = col0 + c_n
        valid_n = offs_n < L  # past the window: masked; outside the grid: padding, NOT masked
        in_n = valid_n & (gh_n < H) & (gw_n < W)
        kv_ptrs = qkv_base + (gh_n * s_qh + gw_n * s_qw)[:, None]

        k0 = tl.load(kv_ptrs + (k_chan + d0)[None, :] * s_qc, mask=in_n[:, None], other=0.0)
        if HAS_PAD:
            k0 = tl.where(in_n[:, None], k0, pk0[None, :])
        qk = _dot(q0, tl.trans(k0), None, DOT_PRECISION, DOT_UPCAST)
        if D1 > 0:
            k1 = tl.load(kv_ptrs + (k_chan + d1)[None, :] * s_qc, mask=in_n[:, None], other=0.0)
            if HAS_PAD:
                k1 = tl.where(in_n[:, None], k1, pk1[None, :])
            qk = _dot(q1, tl.trans(k1), qk, DOT_PRECISION, DOT_UPCAST)

        # bias[m, n] = rel_h[m, r_n] + rel_w[m, c_n], per key, via one-hot dots. (Through
        # fp32: the interpreter casts bool -> bf16 wrongly.)
        onehot_h = tl.where(jh[:, None] == r_n[None, :], 1.0, 0.0).to(dtype)
        onehot_w = tl.where(jw[:, None] == c_n[None, :], 1.0, 0.0).to(dtype)
        # Accumulated into the logits (no second BLOCK_M x BLOCK_N accumulator: registers).
        s = _dot(rel_h, onehot_h, qk * scale, DOT_PRECISION, DOT_UPCAST)
        s = _dot(rel_w, onehot_w, s, DOT_PRECISION, DOT_UPCAST) * 1.4426950408889634  # log2(e)
        s = tl.where(valid_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every key block has a valid key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(dtype)  # as the reference: probabilities in the input dtype for P @ V

        v0 = tl.load(kv_ptrs + (v_chan + d0)[None, :] * s_qc, mask=in_n[:, None], other=0.0)
        if HAS_PAD:
            v0 = tl.where(in_n[:, None], v0, pv0[None, :])
        acc0 = _dot(p, v0, acc0 * alpha[:, None], DOT_PRECISION, DOT_UPCAST)
        if D1 > 0:
            v1 = tl.load(kv_ptrs + (v_chan + d1)[None, :] * s_qc, mask=in_n[:, None], other=0.0)
            if HAS_PAD:
                v1 = tl.where(in_n[:, None], v1, pv1[None, :])
            acc1 = _dot(p, v1, acc1 * alpha[:, None], DOT_PRECISION, DOT_UPCAST)
        m_i = m_new

    inv_l = 1.0 / l_i
    out_base = out_ptr + b * s_ob + (gh_m * s_oh + gw_m * s_ow)[:, None]
    tl.store(
        out_base + (q_chan + d0)[None, :] * s_oc,
        (acc0 * inv_l[:, None]).to(dtype),
        mask=in_m[:, None],
    )
    if D1 > 0:
        tl.store(
            out_base + (q_chan + d1)[None, :] * s_oc,
            (acc1 * inv_l[:, None]).to(dtype),
            mask=in_m[:, None],
        )


# Few configs per input precision: windowed layers have 196 tokens per window, global ones 4096.
# Each compiles for sm_90 and sm_80 at D = 64 and 80 without a register spill (checked by the
# ahead-of-time tier, samhq_fast/kernels/aot.py; 64x64 with 4 warps spills at D = 80 on sm_80).
# fp32 runs ieee FMA dots, whose operands all sit in registers: every 4-warp tile of 32+ rows
# spills there (0.8-3 KB, up to 36 KB at 128 rows), so fp32 gets 32 rows on 8 warps or 16 on 4.
_CONFIGS = {
    "half": [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
    ],
    "fp32": [
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=8, num_stages=1),
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1),
    ],
}
_rel_pos_attn_fwd_tuned = {
    kind: triton.autotune(configs=configs, key=["WS_H", "WS_W", "D0", "D1"])(_rel_pos_attn_fwd)
    for kind, configs in _CONFIGS.items()
}


def _split_head_dim(head_dim: int) -> tuple[int, int]:
    """``D = D0 + D1`` with D0 the largest power of two <= D (80 -> 64 + 16)."""
    d0 = 1 << (head_dim.bit_length() - 1)
    return d0, head_dim - d0


def rel_pos_attention(
    qkv: torch.Tensor,
    num_heads: int,
    window_size: int,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    pad_qkv: torch.Tensor | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """Fused attention; same contract as ``rel_pos_attention_reference``.

    ``qkv`` ``(B, H, W, 3C)`` with any strides -> ``(B, H, W, C)`` in ``qkv.dtype``.
    ``block_m``/``block_n`` force a fixed tile (tests); otherwise CUDA autotunes and CPU (Triton
    interpreter) uses one fixed config, since autotuning there is slow and meaningless.
    """
    check_rel_pos_inputs(qkv, num_heads, window_size, rel_pos_h, rel_pos_w, pad_qkv)
    B, H, W, c3 = qkv.shape
    C = c3 // 3
    D = C // num_heads
    out = torch.empty((B, H, W, C), dtype=qkv.dtype, device=qkv.device)
    if out.numel() == 0:
        return out

    if window_size > 0:
        ws_h = ws_w = window_size
        num_win_h, num_win_w = triton.cdiv(H, ws_h), triton.cdiv(W, ws_w)
    else:
        ws_h, ws_w = H, W
        num_win_h = num_win_w = 1

    # Pre-pass: rel_h[b, n, h, w, j] = q . Rh[row_in_window(h) - j + S_h - 1] (same for w).
    q = qkv[..., :C].unflatten(-1, (num_heads, D))
    rh = get_rel_pos(ws_h, ws_h, rel_pos_h).to(qkv.dtype)  # (S_h, S_h, D) [q_row, k_row]
    rw = get_rel_pos(ws_w, ws_w, rel_pos_w).to(qkv.dtype)
    if window_size > 0:
        rh = rh[torch.arange(H, device=qkv.device) % ws_h]  # (H, S_h, D)
        rw = rw[torch.arange(W, device=qkv.device) % ws_w]
    rel_h = torch.einsum("bhwnd,hkd->bnhwk", q, rh)
    rel_w = torch.einsum("bhwnd,wkd->bnhwk", q, rw)
    if rel_h.stride(-1) != 1:
        rel_h = rel_h.contiguous()
    if rel_w.stride(-1) != 1:
        rel_w = rel_w.contiguous()

    pad = pad_qkv.to(qkv.dtype).contiguous() if pad_qkv is not None else qkv  # dummy if unused
    d0, d1 = _split_head_dim(D)
    upcast = qkv.dtype == torch.bfloat16 and not on_gpu(qkv)  # see _dot
    num_win = num_win_h * num_win_w
    n_programs = B * num_win * num_heads
    args = (
        qkv,
        pad,
        rel_h,
        rel_w,
        out,
        *qkv.stride(),
        *rel_h.stride()[:4],
        *rel_w.stride()[:4],
        *out.stride(),
        D**-0.5,
        H,
        W,
        num_heads,
        num_win,
        num_win_w,
        C,
    )
    consts = dict(
        WS_H=ws_h,
        WS_W=ws_w,
        SH_PAD=max(16, triton.next_power_of_2(ws_h)),  # tl.dot needs K >= 16
        SW_PAD=max(16, triton.next_power_of_2(ws_w)),
        D0=d0,
        D1=d1,
        HAS_PAD=pad_qkv is not None,
        # fp32 inputs: full-precision dots (no TF32), as the fp32 reference.
        DOT_PRECISION="ieee" if qkv.dtype == torch.float32 or upcast else "tf32",
        DOT_UPCAST=upcast,
    )
    seq = ws_h * ws_w
    if on_gpu(qkv) and block_m is None and block_n is None:

        def grid(meta: dict) -> tuple[int]:
            return (triton.cdiv(seq, meta["BLOCK_M"]) * n_programs,)

        kind = "fp32" if qkv.dtype == torch.float32 else "half"
        _rel_pos_attn_fwd_tuned[kind][grid](*args, **consts)
    else:
        tile = min(64, max(16, triton.next_power_of_2(seq)))
        bm, bn = block_m or tile, block_n or tile
        grid = (triton.cdiv(seq, bm) * n_programs,)
        _rel_pos_attn_fwd[grid](*args, **consts, BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    return out
