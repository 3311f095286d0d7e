"""Image-encoder attention with decomposed relative position (windowed or global).

Op contract (shared by the reference and every kernel)::

    rel_pos_attention(qkv, num_heads, window_size, rel_pos_h, rel_pos_w, pad_qkv) -> out

    qkv        (B, H, W, 3 * C)  output of the qkv linear on the *unpadded* token grid, any strides
    window_size 0 for global attention, else the window side (the grid is padded up to a multiple)
    rel_pos_h  (2 * S_h - 1, D)  relative position table for rows (S_h = window or grid height)
    rel_pos_w  (2 * S_w - 1, D)
    pad_qkv    (3 * C,) or None  qkv of a padded token: the official model zero-pads the normalised
               tokens, so a padded token's q/k/v equal the qkv bias. Padded keys are NOT masked.
    out        (B, H, W, C)      attention output before the output projection

Per window (or image) with tokens indexed by (row, col)::

    logits[q, k] = scale * q.k + q . Rh[q_row - k_row + S_h - 1] + q . Rw[q_col - k_col + S_w - 1]

with ``scale = D ** -0.5`` applied to ``q.k`` only, and softmax over every key of the window.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[..., torch.Tensor]


def _resize_table(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """The table linearly resized to ``length`` rows (as is when it has them), as officially."""
    if rel_pos.shape[0] == length:
        return rel_pos
    return (
        F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1).float(),
            size=length,
            mode="linear",
        )
        .reshape(-1, length)
        .permute(1, 0)
        .to(rel_pos.dtype)
    )


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative position embeddings ``(q_size, k_size, D)`` indexed by ``q - k``.

    A table whose length is not ``2 * max(q_size, k_size) - 1`` is linearly resized, as in the
    official code.
    """
    max_rel_dist = 2 * max(q_size, k_size) - 1
    rel_pos = _resize_table(rel_pos, max_rel_dist)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative.long()]


def window_partition(x: torch.Tensor, window: int, pad_value: torch.Tensor | None = None):
    """``(B, H, W, C)`` -> ``(B * nW, window, window, C)``, padding bottom/right.

    Padded positions are filled with ``pad_value`` (a ``(C,)`` vector) or zeros.
    Returns the windows and the padded size ``(Hp, Wp)``.
    """
    B, H, W, C = x.shape
    ph, pw = (window - H % window) % window, (window - W % window) % window
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
        if pad_value is not None:
            fill = torch.zeros(H + ph, W + pw, 1, dtype=x.dtype, device=x.device)
            fill[H:] = 1
            fill[:, W:] = 1
            x = x + fill * pad_value.to(x.dtype)
    Hp, Wp = H + ph, W + pw
    x = x.view(B, Hp // window, window, Wp // window, window, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, C), (Hp, Wp)


def window_unpartition(
    windows: torch.Tensor, window: int, pad_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * nW, w, w, C)`` -> ``(B, H, W, C)``."""
    Hp, Wp = pad_hw
    H, W = hw
    B = windows.shape[0] // (Hp * Wp // window // window)
    x = windows.view(B, Hp // window, Wp // window, window, window, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)
    return x[:, :H, :W, :]


def _attend(qkv: torch.Tensor, num_heads: int, rel_pos_h, rel_pos_w):
    """Full attention over each item of ``qkv`` ``(N, h, w, 3C)`` -> ``(N, h, w, C)`` and the
    probabilities ``(N * heads, L, L)``."""
    N, h, w, C3 = qkv.shape
    D = C3 // 3 // num_heads
    q, k, v = qkv.reshape(N, h * w, 3, num_heads, D).permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q * D**-0.5) @ k.transpose(-2, -1)  # (N, heads, L, L)
    Rh = get_rel_pos(h, h, rel_pos_h).to(q.dtype)
    Rw = get_rel_pos(w, w, rel_pos_w).to(q.dtype)
    r_q = q.reshape(N, num_heads, h, w, D)
    rel_h = torch.einsum("nahwc,hkc->nahwk", r_q, Rh)
    rel_w = torch.einsum("nahwc,wkc->nahwk", r_q, Rw)
    attn = attn.view(N, num_heads, h, w, h, w) + rel_h[..., :, None] + rel_w[..., None, :]
    attn = attn.view(N, num_heads, h * w, h * w).float().softmax(dim=-1).to(v.dtype)
    out = attn @ v  # (N, heads, L, D)
    return out.permute(0, 2, 1, 3).reshape(N, h, w, num_heads * D), attn.flatten(0, 1)


def rel_pos_attention_reference(
    qkv: torch.Tensor,
    num_heads: int,
    window_size: int,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    pad_qkv: torch.Tensor | None = None,
    return_weights: bool = False,
):
    """Plain-PyTorch attention, the oracle. See the module docstring for the contract.

    With ``return_weights`` also returns the softmax probabilities ``(B * windows * heads, L, L)``.
    """
    B, H, W, _ = qkv.shape
    if window_size <= 0:
        out, weights = _attend(qkv, num_heads, rel_pos_h, rel_pos_w)
    else:
        windows, pad_hw = window_partition(qkv, window_size, pad_qkv)
        out, weights = _attend(windows, num_heads, rel_pos_h, rel_pos_w)
        out = window_unpartition(out, window_size, pad_hw, (H, W))
    return (out, weights) if return_weights else out


# Elements of one materialised bias block in the fast path (64 MiB in fp32): windows or query
# rows are taken in chunks under it, so the bias never exists at batch x heads x L x L.
BIAS_BLOCK = 1 << 24


def _rel_table(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """The ``(2 * size - 1, D)`` table :func:`get_rel_pos` indexes for equal query and key
    sizes (row ``q - k + size - 1``)."""
    return _resize_table(rel_pos, 2 * size - 1)


def _rel_bias(
    q: torch.Tensor,
    w: int,
    row0: int,
    table_h: torch.Tensor,
    table_w: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """Decomposed relative-position bias of queries ``q (N, heads, r * w, D)`` (rows
    ``row0 .. row0 + r`` of an ``h x w`` grid, ``h = (len(table_h) + 1) / 2``), written into
    ``out`` (at least ``N * heads * r * w * h * w`` elements, reused across blocks: no fresh
    pages to fault in) and returned as ``(N, heads, r * w, h * w)``.

    ``q . Rh[qy - ky + h - 1]`` for every ``ky`` is one GEMM of ``q`` with the whole table
    (``2h - 1`` columns) and a gather, likewise for the columns."""
    from samhq_fast.ops.fast_torch import gemm_dtype

    N, a, Lq, D = q.shape
    r, h = Lq // w, (table_h.shape[0] + 1) // 2
    cd = gemm_dtype(q)
    r_q = q.reshape(N, a, r, w, D).to(cd)
    dev = q.device
    iy = torch.arange(row0, row0 + r, device=dev)[:, None] - torch.arange(h, device=dev) + h - 1
    ix = torch.arange(w, device=dev)[:, None] - torch.arange(w, device=dev) + w - 1
    full_h = torch.matmul(r_q, table_h.to(cd).t())  # (N, a, r, w, 2h - 1)
    full_w = torch.matmul(r_q, table_w.to(cd).t())  # (N, a, r, w, 2w - 1)
    rel_h = full_h.gather(-1, iy.view(1, 1, r, 1, h).expand(N, a, r, w, h)).to(q.dtype)
    rel_w = full_w.gather(-1, ix.view(1, 1, 1, w, w).expand(N, a, r, w, w)).to(q.dtype)
    bias = out.view(-1)[: N * a * Lq * h * w].view(N, a, r, w, h, w)
    torch.add(rel_h[..., :, None], rel_w[..., None, :], out=bias)
    return bias.view(N, a, Lq, h * w)


def _sdpa_heads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h: int, w: int, rel_pos_h, rel_pos_w
) -> torch.Tensor:
    """SDPA over items ``q, k, v (N, heads, h * w, D)`` (contiguous) with the decomposed bias
    as a float mask, in blocks of at most ``BIAS_BLOCK`` bias elements (whole items, or whole
    query rows of one big item). Returns ``(N, h * w, heads, D)`` (token-major)."""
    N, a, L, D = q.shape
    th, tw = _rel_table(h, rel_pos_h), _rel_table(w, rel_pos_w)
    per_item = a * L * L
    out = q.new_empty(N, L, a, D)
    if per_item <= BIAS_BLOCK:  # whole items (windows, or small global grids) per block
        step = min(N, max(1, BIAS_BLOCK // per_item))
        buf = q.new_empty(step * per_item)
        for i in range(0, N, step):
            qi = q[i : i + step]
            bias = _rel_bias(qi, w, 0, th, tw, buf)
            res = F.scaled_dot_product_attention(qi, k[i : i + step], v[i : i + step], bias)
            out[i : i + step] = res.transpose(1, 2)
    else:  # global attention: blocks of whole query rows (the row table sliced to match)
        rows = max(1, BIAS_BLOCK // (N * a * w * L))
        buf = q.new_empty(N * a * min(rows, h) * w * L)
        for r in range(0, h, rows):
            sl = slice(r * w, min(h, r + rows) * w)
            bias = _rel_bias(q[:, :, sl], w, r, th, tw, buf)
            res = F.scaled_dot_product_attention(q[:, :, sl], k, v, attn_mask=bias)
            out[:, sl] = res.transpose(1, 2)
    return out


def rel_pos_attention_sdpa(
    qkv: torch.Tensor,
    num_heads: int,
    window_size: int,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    pad_qkv: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fast pure-PyTorch attention (``backend="torch"``): ``scaled_dot_product_attention``
    with the decomposed bias as a float mask, one bias per window and head (windowed layers) or
    per block of query rows (global layers). Padded window tokens are keys whose q/k/v equal
    ``pad_qkv`` (unmasked), as in the reference. Same contract as the reference.

    ``qkv`` is copied once, into the per-head (and per-window) layout SDPA reads; the output is
    written token-major, so the caller's projection reads it without another transpose."""
    B, H, W, C3 = qkv.shape
    C = C3 // 3
    a, D = num_heads, C // num_heads
    if window_size <= 0:
        heads = qkv.reshape(B, H * W, 3, a, D).permute(2, 0, 3, 1, 4).contiguous()
        out = _sdpa_heads(*heads.unbind(0), H, W, rel_pos_h, rel_pos_w)
        return out.view(B, H, W, C)
    ws = window_size
    Hp, Wp = -(-H // ws) * ws, -(-W // ws) * ws
    if (Hp, Wp) != (H, W):
        padded = qkv.new_empty(B, Hp, Wp, C3)
        padded[:, :H, :W] = qkv
        fill = pad_qkv.to(qkv.dtype) if pad_qkv is not None else 0.0
        padded[:, H:] = fill
        padded[:, :H, W:] = fill
        qkv = padded
    nh, nw = Hp // ws, Wp // ws
    heads = (
        qkv.reshape(B, nh, ws, nw, ws, 3, a, D)
        .permute(5, 0, 1, 3, 6, 2, 4, 7)
        .reshape(3, B * nh * nw, a, ws * ws, D)
    )
    out = _sdpa_heads(*heads.unbind(0), ws, ws, rel_pos_h, rel_pos_w)  # (B*nh*nw, L, a, D)
    out = out.view(B, nh, nw, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    return out if (Hp, Wp) == (H, W) else out[:, :H, :W]


TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_unsupported_reasons(
    head_dim: int | None = None, dtype: torch.dtype | None = None
) -> list[str]:
    """Why the Triton kernel cannot take this op (empty list: it can). Device reasons live in
    :func:`samhq_fast.ops.backend.triton_unavailable_reasons`.

    The kernel splits the head dim into at most two power-of-two chunks of at least 16
    (80 = 64 + 16), so it takes 16, 32, 48, 64, 80, 96 and 128.
    """
    reasons = []
    if head_dim is not None:
        if head_dim <= 0 or head_dim % 16:
            reasons.append(f"head_dim {head_dim} is not a positive multiple of 16")
        elif head_dim > 128:
            reasons.append(f"head_dim {head_dim} > 128")
        else:
            rest = head_dim - (1 << (head_dim.bit_length() - 1))
            if rest & (rest - 1):
                reasons.append(f"head_dim {head_dim} is not a sum of two powers of two")
    if dtype is not None and dtype not in TRITON_DTYPES:
        reasons.append(f"dtype {dtype} is not one of float32, float16, bfloat16")
    return reasons


def check_rel_pos_inputs(
    qkv: torch.Tensor,
    num_heads: int,
    window_size: int,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    pad_qkv: torch.Tensor | None,
) -> None:
    """The fused kernel's argument checks (ValueError naming the problem); what it takes beyond
    shapes is :func:`triton_unsupported_reasons`."""
    if qkv.dim() != 4:
        raise ValueError(f"qkv must be (B, H, W, 3 * C), got shape {tuple(qkv.shape)}")
    c3 = qkv.shape[-1]
    if num_heads <= 0 or c3 % (3 * num_heads):
        raise ValueError(
            f"qkv last dim {c3} must be 3 * num_heads * head_dim (num_heads={num_heads})"
        )
    if window_size < 0:
        raise ValueError(f"window_size must be >= 0 (0 = global), got {window_size}")
    head_dim = c3 // (3 * num_heads)
    reasons = triton_unsupported_reasons(head_dim, qkv.dtype)
    if reasons:
        raise ValueError("rel_pos_attention kernel cannot take this input: " + "; ".join(reasons))
    for name, table in (("rel_pos_h", rel_pos_h), ("rel_pos_w", rel_pos_w)):
        if table.dim() != 2 or table.shape[1] != head_dim:
            raise ValueError(f"{name} must be (2 * S - 1, {head_dim}), got {tuple(table.shape)}")
        if table.device != qkv.device:
            raise ValueError(f"{name} is on {table.device}, qkv on {qkv.device}")
    if pad_qkv is not None and tuple(pad_qkv.shape) != (c3,):
        raise ValueError(f"pad_qkv must be ({c3},), got {tuple(pad_qkv.shape)}")
