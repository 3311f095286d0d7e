"""Multi-head attention of the mask decoder's two-way transformer, after the q/k/v projections.

Op contract (shared by the reference and every kernel)::

    decoder_attention(q, k, v, num_heads, q_group=1, kv_group=1) -> out

    q     (N // q_group, Tq, Ci)   any strides (slices of a fused projection, stride-0 expands)
    k, v  (N // kv_group, Tk, Ci)
    out   (N, Tq, Ci)              in q.dtype

Batch item ``n`` reads ``q[n // q_group]`` and ``k[n // kv_group]``, ``v[n // kv_group]``: a group
is the consecutive prompts of one image, so an image-side tensor that is the same for every prompt
(no per-prompt mask prompt) is passed once per image. Head ``h`` is channels
``[h * D, (h + 1) * D)`` with ``D = Ci // num_heads``, and per head::

    out_h = softmax(q_h @ k_h^T * D ** -0.5) @ v_h

with the softmax in fp32, as :class:`samhq_fast.modeling.transformer.Attention` does.
"""

from __future__ import annotations

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    q_group: int = 1,
    kv_group: int = 1,
) -> int:
    """Validate the contract; returns the output batch ``N``. Raises ``ValueError``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (batch, tokens, channels), got {tuple(t.shape)}")
    if q.dtype not in DTYPES:
        raise ValueError(f"dtype {q.dtype} is not one of float32, float16, bfloat16")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must share a device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q has {q.shape[2]} channels, k/v have {k.shape[2]}")
    if num_heads <= 0 or q.shape[2] % num_heads:
        raise ValueError(f"num_heads {num_heads} must divide the channel dim {q.shape[2]}")
    if q_group < 1 or kv_group < 1:
        raise ValueError(f"q_group and kv_group must be >= 1, got {q_group}, {kv_group}")
    n = q.shape[0] * q_group
    if k.shape[0] * kv_group != n:
        raise ValueError(
            f"batch mismatch: q batch {q.shape[0]} x q_group {q_group} = {n}, "
            f"k/v batch {k.shape[0]} x kv_group {kv_group} = {k.shape[0] * kv_group}"
        )
    return n


def decoder_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_heads: int,
    q_group: int = 1,
    kv_group: int = 1,
) -> torch.Tensor:
    """Plain-PyTorch attention, the oracle. See the module docstring for the contract."""
    check_inputs(q, k, v, num_heads, q_group, kv_group)
    if q_group > 1:
        q = q.repeat_interleave(q_group, dim=0)
    if kv_group > 1:
        k, v = k.repeat_interleave(kv_group, dim=0), v.repeat_interleave(kv_group, dim=0)

    def heads(x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        return x.reshape(n, t, num_heads, c // num_heads).transpose(1, 2)

    q, k, v = heads(q), heads(k), heads(v)
    attn = (q @ k.transpose(-2, -1)) / (q.shape[-1] ** 0.5)
    attn = attn.float().softmax(dim=-1)
    return (attn.to(v.dtype) @ v).transpose(1, 2).flatten(2)
