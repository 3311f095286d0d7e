"""Fused flash attention with decomposed relative position (SAM image encoder, windowed or global).

Reference: :func:`samhq_fast.ops.attention.rel_pos_attention_reference` is the oracle and its
module docstring is the contract. Per window of ``S_h x S_w`` tokens (the whole grid when global)::

    logits[q, k] = D ** -0.5 * q.k + rel_h[q, k_row] + rel_w[q, k_col]
    rel_h[q, j] = q . Rh[q_row - j + S_h - 1],  rel_w[q, j] = q . Rw[q_col - j + S_w - 1]

Design (why: the bias must cost next to nothing beside ``QK^T`` and ``PV``):

* Tiles are aligned to grid rows. A key block is ``ROWS_N`` window rows x ``SW_PAD`` columns
  (``SW_PAD = next_pow2(S_w)``: 64 for the global 64 x 64 grid, 16 for 14 x 14 windows; columns
  ``>= S_w`` get ``-inf``). So the ``rel_w`` term of key ``(r, c)`` is ``rel_w[q, c]`` whatever
  ``r``: one loop-invariant ``(BLOCK_M, SW_PAD)`` tile (broadcast over the ``ROWS_N`` rows), and
  the ``rel_h`` term is one column ``rel_h[q, r]`` per key row, picked out of a loop-invariant
  ``(BLOCK_M, SH_PAD)`` tile with a masked row sum (``SH_PAD / SW_PAD`` operations per logit, on
  the CUDA cores). No one-hot GEMMs: the old kernel added the bias through two one-hot dots of
  width 64 in global layers, as much tensor-core work as ``QK^T`` and ``PV`` together.
* The rel-pos terms are computed from the query tile inside the kernel, before the key loop:
  ``Pw = q @ Rw^T`` against the whole ``(2 S_w - 1, D)`` table (one small dot, ``RW_PAD =
  next_pow2(2 S_w - 1)`` columns), then a per-row shift ``rel_w[m, j] = Pw[m, col_m - j + S_w -
  1]`` with ``tl.gather``; the same for rows, except that a one-row query block (global layers:
  64 queries = one grid row) has one row position, so its ``rel_h`` is a plain dot with the
  table rows ``row - j + S_h - 1`` (no gather, half the work). The dots run over 16-channel
  chunks of q re-read from L1/L2 (fp32 FMA dots hold their operands in registers). No pre-pass:
  rel_h/rel_w never go to memory (the old einsum pre-pass copied q and wrote ~300 MB per global
  layer at batch 8); the launcher only resizes the two tables (O(S * D)). The tiles are kept in
  the input dtype (the reference rounds them so too; half the registers of fp32).
* Query blocks are ``ROWS_M`` rows x ``COLS_M`` columns (``COLS_M = min(BLOCK_M, SW_PAD)``, a
  row segment only when a block is narrower than a row, e.g. fp32 global tiles). Only query
  blocks holding a grid row are launched: the bottom windows of a padded grid (the 64 grid
  padded to 70 leaves them 8 valid rows of 14) get fewer programs (the 1-D grid maps program ids
  piecewise), and a column block past the grid (right-hand windows) exits before any work.
* One program per (batch * window, head, query block), blocks of one (window, head) adjacent so
  they share K/V in L2; online softmax in fp32 with exp2 (``log2 e`` folded into the scale and
  the bias); probabilities rounded to the input dtype before ``P @ V``, as the reference.
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
    _rel_table,
    check_rel_pos_inputs,
    rel_pos_attention_reference,
)

__all__ = ["rel_pos_attention", "rel_pos_attention_reference"]

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # exp2 units


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST (CPU only): triton 3.9's interpreter multiplies bf16 bit patterns as integers in
    # tl.dot, so bf16 operands go to fp32 there; exact, like bf16 tensor cores (fp32 accumulate).
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _rel_terms(
    q_ptrs,
    s_qc,
    in_m,
    table_ptr,
    pos,
    S: tl.constexpr,
    R_PAD: tl.constexpr,
    OUT_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``out[m, j] = q_m . T[pos_m - j + S - 1]`` (fp32, ``(BLOCK_M, OUT_PAD)``) for the
    contiguous ``(2 S - 1, D)`` table ``T``: one dot of the query block (``q_ptrs`` points at
    channel 0 of each query's q) against the whole table, then a per-row shift gather. Columns
    ``j >= S`` and rows with ``pos_m >= S`` hold junk.

    The dot runs over 16-channel chunks re-read from memory (L1/L2: the block was just
    loaded): the fp32 FMA dot keeps its operands in registers and spills on the whole width."""
    r = tl.arange(0, R_PAD)
    in_t = (r < 2 * S - 1)[None, :]
    dc = tl.arange(0, 16)
    full = tl.zeros((BLOCK_M, R_PAD), tl.float32)  # q_m . T[i] for every i
    for c in tl.static_range(0, D, 16):
        qc = tl.load(q_ptrs[:, None] + (c + dc)[None, :] * s_qc, mask=in_m[:, None], other=0.0)
        tc = tl.load(table_ptr + r[None, :] * D + (c + dc)[:, None], mask=in_t, other=0.0)
        full = _dot(qc, tc, full, PRECISION, UPCAST)
    j = tl.arange(0, OUT_PAD)
    idx = pos[:, None] - j[None, :] + (S - 1)
    idx = tl.minimum(tl.maximum(idx, 0), R_PAD - 1)  # junk entries stay in range
    return tl.gather(full, idx, 1)


@triton.jit
def _rel_terms_one_row(
    q_ptrs,
    s_qc,
    in_m,
    table_ptr,
    pos,
    S: tl.constexpr,
    OUT_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """:func:`_rel_terms` for a block whose queries all have position ``pos`` (a scalar; the
    rows of a one-row query block): a dot with the ``OUT_PAD`` table rows ``pos - j + S - 1``
    themselves, no gather (half the work, no wide gather: fewer registers)."""
    j = tl.arange(0, OUT_PAD)
    rows = pos - j + (S - 1)
    in_t = (j < S)[None, :]
    dc = tl.arange(0, 16)
    out = tl.zeros((BLOCK_M, OUT_PAD), tl.float32)
    for c in tl.static_range(0, D, 16):
        qc = tl.load(q_ptrs[:, None] + (c + dc)[None, :] * s_qc, mask=in_m[:, None], other=0.0)
        tc = tl.load(table_ptr + rows[None, :] * D + (c + dc)[:, None], mask=in_t, other=0.0)
        out = _dot(qc, tc, out, PRECISION, UPCAST)
    return out


@triton.jit
def _rel_pos_attn_fwd(
    qkv_ptr,
    pad_ptr,
    table_h_ptr,
    table_w_ptr,
    out_ptr,
    s_qb,
    s_qh,
    s_qw,
    s_qc,
    s_ob,
    s_oh,
    s_ow,
    s_oc,
    scale,
    H,
    W,
    NUM_HEADS,
    NUM_WIN_H,
    NUM_WIN_W,
    C,
    WS_H: tl.constexpr,
    WS_W: tl.constexpr,
    SH_PAD: tl.constexpr,
    SW_PAD: tl.constexpr,
    RH_PAD: tl.constexpr,
    RW_PAD: tl.constexpr,
    D0: tl.constexpr,
    D1: tl.constexpr,
    HAS_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Query block = ROWS_M rows x COLS_M columns (COLS_M = min(BLOCK_M, SW_PAD), powers of two);
    # key block = ROWS_N whole rows of SW_PAD columns (at least one row: BLOCK_N < SW_PAD reads
    # as one row).
    COLS_M: tl.constexpr = SW_PAD // ((SW_PAD + BLOCK_M - 1) // BLOCK_M)
    ROWS_M: tl.constexpr = BLOCK_M // COLS_M
    NUM_COL_BLOCKS: tl.constexpr = (WS_W + COLS_M - 1) // COLS_M
    ROWS_N: tl.constexpr = (BLOCK_N + SW_PAD - 1) // SW_PAD
    TILE_N: tl.constexpr = ROWS_N * SW_PAD
    FULL_BLOCKS: tl.constexpr = (WS_H + ROWS_M - 1) // ROWS_M * NUM_COL_BLOCKS
    dtype = qkv_ptr.dtype.element_ty

    # 1-D grid (no 65535 limit on batch * windows), piecewise: windows of the last window row
    # hold only H - (NUM_WIN_H - 1) * WS_H grid rows, so they get fewer query blocks (no program
    # for a block of padding rows). Per batch item: the full windows, then the last row's.
    last_rows = H - (NUM_WIN_H - 1) * WS_H
    last_blocks = (last_rows + ROWS_M - 1) // ROWS_M * NUM_COL_BLOCKS
    full_progs = (NUM_WIN_H - 1) * NUM_WIN_W * NUM_HEADS * FULL_BLOCKS
    per_batch = full_progs + NUM_WIN_W * NUM_HEADS * last_blocks
    pid = tl.program_id(0)
    b = (pid // per_batch).to(tl.int64)  # int64: batch offsets overflow int32 at large batch
    rest = pid % per_batch
    in_last = rest >= full_progs
    nb = tl.where(in_last, last_blocks, FULL_BLOCKS)
    rest = tl.where(in_last, rest - full_progs, rest)
    m_block = rest % nb
    rest = rest // nb
    head = rest % NUM_HEADS
    win = rest // NUM_HEADS + tl.where(in_last, (NUM_WIN_H - 1) * NUM_WIN_W, 0)
    row0 = (win // NUM_WIN_W) * WS_H
    col0 = (win % NUM_WIN_W) * WS_W
    q_row0 = (m_block // NUM_COL_BLOCKS) * ROWS_M  # window-local
    q_col0 = (m_block % NUM_COL_BLOCKS) * COLS_M
    if col0 + q_col0 >= W:  # a column block right of the grid: nothing to store
        return

    qkv_base = qkv_ptr + b * s_qb
    q_chan = head * (D0 + D1)
    k_chan = C + q_chan
    v_chan = 2 * C + q_chan
    d0 = tl.arange(0, D0)
    if D1 > 0:
        d1 = D0 + tl.arange(0, D1)

    # Queries: block index -> window-local (row, col) -> grid. Padded query rows are computed
    # but not stored, so their q can be anything (zeros).
    offs_m = tl.arange(0, BLOCK_M)
    r_m = q_row0 + offs_m // COLS_M
    c_m = q_col0 + offs_m % COLS_M
    gh_m = row0 + r_m
    gw_m = col0 + c_m
    in_m = (r_m < WS_H) & (c_m < WS_W) & (gh_m < H) & (gw_m < W)
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

    # Loop-invariant rel-pos terms of the query block, in log2 units (exp2 below).
    q_ptrs = qkv_base + tok_m + q_chan * s_qc
    rel_w = _rel_terms(
        q_ptrs, s_qc, in_m, table_w_ptr, c_m, WS_W, RW_PAD, SW_PAD, D0 + D1, BLOCK_M,
        DOT_PRECISION, DOT_UPCAST,
    )  # fmt: skip
    if ROWS_M == 1:  # one query row (global layers): the rows' table slice, no gather
        rel_h = _rel_terms_one_row(
            q_ptrs, s_qc, in_m, table_h_ptr, q_row0, WS_H, SH_PAD, D0 + D1, BLOCK_M,
            DOT_PRECISION, DOT_UPCAST,
        )  # fmt: skip
    else:
        rel_h = _rel_terms(
            q_ptrs, s_qc, in_m, table_h_ptr, r_m, WS_H, RH_PAD, SH_PAD, D0 + D1, BLOCK_M,
            DOT_PRECISION, DOT_UPCAST,
        )  # fmt: skip
    # Kept in the input dtype, as the reference rounds them (half the registers of fp32).
    rel_w = (rel_w * LOG2E).to(dtype)
    rel_h = (rel_h * LOG2E).to(dtype)
    jh = tl.arange(0, SH_PAD)
    if ROWS_N > 1:  # key column c of every key row in the block: the same rel_w column
        rel_w = tl.reshape(
            tl.broadcast_to(rel_w[:, None, :], (BLOCK_M, ROWS_N, SW_PAD)), (BLOCK_M, TILE_N)
        )
        row_ids = tl.arange(0, ROWS_N)
    qk_scale = scale * LOG2E

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

    offs_n = tl.arange(0, TILE_N)
    c_n = offs_n % SW_PAD
    gw_n = col0 + c_n
    col_ok_n = c_n < WS_W  # columns past the window: masked
    for kr0 in range(0, WS_H, ROWS_N):
        r_n = kr0 + offs_n // SW_PAD
        gh_n = row0 + r_n
        valid_n = col_ok_n & (r_n < WS_H)  # past the window: masked
        in_n = valid_n & (gh_n < H) & (gw_n < W)  # outside the grid: padding, NOT masked
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

        # rel_h[m, r] of this block's key rows: a masked row sum over the invariant tile.
        if ROWS_N == 1:
            h = tl.sum(tl.where(jh[None, :] == kr0, rel_h, 0.0), 1).to(tl.float32)  # exact
            s = qk * qk_scale + rel_w.to(tl.float32) + h[:, None]
        else:
            sel = jh[None, None, :] == (kr0 + row_ids)[None, :, None]
            h = tl.sum(tl.where(sel, rel_h[:, None, :], 0.0), 2).to(tl.float32)  # exact
            h = tl.reshape(
                tl.broadcast_to(h[:, :, None], (BLOCK_M, ROWS_N, SW_PAD)), (BLOCK_M, TILE_N)
            )
            s = qk * qk_scale + rel_w.to(tl.float32) + h
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


# Few configs per input precision. BLOCK_M / BLOCK_N count tokens: a key block is
# BLOCK_N // SW_PAD grid rows, at least one (64 = one row of the global 64 grid, 4 rows of a
# 14 x 14 window; 32 = 2 window rows, and in global layers one row, like 64). Each compiles for
# sm_90 (wgmma) and sm_80 at D = 64 and 80, windowed and global, without a register spill
# (checked by the ahead-of-time tier, samhq_fast/kernels/aot.py). 64 query rows on 8 warps: the
# loop holds the accumulator, the logits and two loop-invariant rel-pos tiles; 128 rows (8 warps),
# 4-warp tiles and 64-key window blocks at D = 80 spill. fp32 runs ieee FMA dots, whose operands
# all sit in registers: 16 rows on 8 warps (sm_90 still spills 8-64 B; the AOT gate is half only).
_CONFIGS = {
    "half": [
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=1),
    ],
    "fp32": [
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=8, num_stages=1),
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=8, num_stages=1),
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


def _query_blocks(
    block_m: int, height: int, ws_h: int, ws_w: int, sw_pad: int, num_win_h: int
) -> int:
    """Query blocks of one window column and head, summed over the window rows (the kernel's
    pid mapping): ``ROWS_M`` rows x ``COLS_M`` columns each, fewer in the last window row when
    the grid ends inside it (no program for a block of padding rows)."""
    cols_m = min(block_m, sw_pad)
    rows_m = block_m // cols_m
    col_blocks = triton.cdiv(ws_w, cols_m)
    last_rows = height - (num_win_h - 1) * ws_h
    full = triton.cdiv(ws_h, rows_m) * col_blocks
    return (num_win_h - 1) * full + triton.cdiv(last_rows, rows_m) * col_blocks


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
    ``block_m``/``block_n`` (powers of two >= 16, in tokens) force a fixed tile (tests): a query
    block is ``block_m`` tokens of whole rows of ``next_pow2(window width)`` columns (a row
    segment if narrower), a key block ``block_n // width_pad`` rows (at least one). Otherwise
    CUDA autotunes and CPU (Triton interpreter) uses one fixed config, since autotuning there is
    slow and meaningless. No einsum or copy of q: the kernel computes the rel-pos terms itself;
    only the two ``(2 S - 1, D)`` tables are resized and cast here.
    """
    check_rel_pos_inputs(qkv, num_heads, window_size, rel_pos_h, rel_pos_w, pad_qkv)
    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        if blk is not None and (blk < 16 or blk & (blk - 1)):
            raise ValueError(f"{name} must be a power of two >= 16, got {blk}")
    B, H, W, c3 = qkv.shape
    C = c3 // 3
    D = C // num_heads
    out = torch.empty((B, H, W, C), dtype=qkv.dtype, device=qkv.device)
    if out.numel() == 0:
        return out

    if window_size > 0:
        ws_h = ws_w = window_size
    else:
        ws_h, ws_w = H, W
    num_win_h, num_win_w = triton.cdiv(H, ws_h), triton.cdiv(W, ws_w)
    # The (2 S - 1, D) tables get_rel_pos indexes (row q - k + S - 1), resized as officially.
    table_h = _rel_table(ws_h, rel_pos_h).to(qkv.dtype).contiguous()
    table_w = _rel_table(ws_w, rel_pos_w).to(qkv.dtype).contiguous()

    pad = pad_qkv.to(qkv.dtype).contiguous() if pad_qkv is not None else qkv  # dummy if unused
    d0, d1 = _split_head_dim(D)
    upcast = qkv.dtype == torch.bfloat16 and not on_gpu(qkv)  # see _dot
    sh_pad, sw_pad = triton.next_power_of_2(ws_h), triton.next_power_of_2(ws_w)
    args = (
        qkv,
        pad,
        table_h,
        table_w,
        out,
        *qkv.stride(),
        *out.stride(),
        D**-0.5,
        H,
        W,
        num_heads,
        num_win_h,
        num_win_w,
        C,
    )
    consts = dict(
        WS_H=ws_h,
        WS_W=ws_w,
        SH_PAD=sh_pad,
        SW_PAD=sw_pad,
        RH_PAD=max(16, triton.next_power_of_2(2 * ws_h - 1)),  # tl.dot needs N >= 16
        RW_PAD=max(16, triton.next_power_of_2(2 * ws_w - 1)),
        D0=d0,
        D1=d1,
        HAS_PAD=pad_qkv is not None,
        # fp32 inputs: full-precision dots (no TF32), as the fp32 reference.
        DOT_PRECISION="ieee" if qkv.dtype == torch.float32 or upcast else "tf32",
        DOT_UPCAST=upcast,
    )

    def n_programs(bm: int) -> int:
        return B * num_heads * num_win_w * _query_blocks(bm, H, ws_h, ws_w, sw_pad, num_win_h)

    if on_gpu(qkv) and block_m is None and block_n is None:

        def grid(meta: dict) -> tuple[int]:
            return (n_programs(meta["BLOCK_M"]),)

        kind = "fp32" if qkv.dtype == torch.float32 else "half"
        _rel_pos_attn_fwd_tuned[kind][grid](*args, **consts)
    else:
        tile = min(64, max(16, triton.next_power_of_2(ws_h * sw_pad)))
        bm, bn = block_m or tile, block_n or tile
        _rel_pos_attn_fwd[(n_programs(bm),)](*args, **consts, BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    return out
