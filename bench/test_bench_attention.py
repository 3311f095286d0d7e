"""Microbenchmark of the image encoder's rel-pos attention, per layer type and preset.

Three implementations of the same op (``samhq_fast.ops.attention`` contract):

* ``triton``: the fused flash kernel (CUDA only: interpreter timings mean nothing);
* ``torch``: the plain-PyTorch reference (materialises the N x N logits);
* ``sdpa``: PyTorch SDPA with the rel-pos bias materialised as ``attn_mask`` (what transformers
  and segment-anything-fast's windowed layers do).

Reported per case in ``extra_info``: median ms, TFLOP/s (``4 * B * heads * L * L * D`` summed over
windows, padded windows counted; rel-pos work not counted), peak extra memory (CUDA) and the max
difference to the reference. On CPU the shapes are small so the file runs in well under a minute.

    pytest bench/test_bench_attention.py --benchmark-json bench/results/attention.json
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bench._env import environment, load_average
from samhq_fast.ops.attention import (
    get_rel_pos,
    rel_pos_attention_reference,
    window_partition,
    window_unpartition,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
BATCH = 8 if CUDA else 1
GRID = 64 if CUDA else 16  # 1024 x 1024 image -> 64 x 64 tokens; CPU: a small stand-in
WINDOW = 14
ROUNDS, WARMUP = (30, 3) if CUDA else (3, 1)

PRESETS = {"vit_b": (12, 64), "vit_l": (16, 64), "vit_h": (16, 80)}  # heads, head dim
LAYERS = {"windowed": WINDOW, "global": 0}


def sdpa_materialised_bias(
    qkv: torch.Tensor,
    num_heads: int,
    window_size: int,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    pad_qkv: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same op through ``F.scaled_dot_product_attention`` with an (N, heads, L, L) bias."""
    B, H, W, C3 = qkv.shape
    x, pad_hw = window_partition(qkv, window_size, pad_qkv) if window_size else (qkv, None)
    N, h, w, _ = x.shape
    C = C3 // 3
    D = C // num_heads
    q, k, v = x.reshape(N, h * w, 3, num_heads, D).permute(2, 0, 3, 1, 4).unbind(0)
    r_q = q.reshape(N, num_heads, h, w, D)
    rel_h = torch.einsum("nahwc,hkc->nahwk", r_q, get_rel_pos(h, h, rel_pos_h).to(q.dtype))
    rel_w = torch.einsum("nahwc,wkc->nahwk", r_q, get_rel_pos(w, w, rel_pos_w).to(q.dtype))
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(N, num_heads, h * w, h * w)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out = out.permute(0, 2, 1, 3).reshape(N, h, w, C)
    return window_unpartition(out, window_size, pad_hw, (H, W)) if window_size else out


def implementation(impl: str):
    if impl == "triton":
        from samhq_fast.kernels.rel_pos_attention import rel_pos_attention  # imports triton

        return rel_pos_attention
    return {"torch": rel_pos_attention_reference, "sdpa": sdpa_materialised_bias}[impl]


def attention_flops(batch: int, heads: int, head_dim: int, window: int) -> float:
    """``4 * B * heads * L * L * D`` over all windows (QK^T and PV), padded windows counted."""
    if window:
        n_win = math.ceil(GRID / window) ** 2
        tokens = window * window
    else:
        n_win, tokens = 1, GRID * GRID
    return 4.0 * batch * n_win * heads * tokens * tokens * head_dim


@pytest.mark.parametrize("impl", ["triton", "torch", "sdpa"])
@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("layer", list(LAYERS))
def test_attention(benchmark, layer: str, preset: str, impl: str) -> None:
    if impl == "triton" and not CUDA:
        pytest.skip("the Triton kernel is timed on CUDA only (interpreter timings mean nothing)")
    heads, head_dim = PRESETS[preset]
    window = LAYERS[layer]
    g = torch.Generator().manual_seed(0)
    C = heads * head_dim
    S = window or GRID
    qkv = torch.randn(BATCH, GRID, GRID, 3 * C, generator=g).to(DEVICE, DTYPE)
    rel_h = (0.3 * torch.randn(2 * S - 1, head_dim, generator=g)).to(DEVICE, DTYPE)
    rel_w = (0.3 * torch.randn(2 * S - 1, head_dim, generator=g)).to(DEVICE, DTYPE)
    pad_qkv = (0.5 * torch.randn(3 * C, generator=g)).to(DEVICE, DTYPE) if window else None
    fn = implementation(impl)

    def run() -> torch.Tensor:
        out = fn(qkv, heads, window, rel_h, rel_w, pad_qkv)
        if CUDA:
            torch.cuda.synchronize()
        return out

    # Untimed first call: autotuning / compilation, peak memory and a sanity check.
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    out = run()
    peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20 if CUDA else None
    max_diff = 0.0
    if impl != "torch":
        ref = rel_pos_attention_reference(qkv, heads, window, rel_h, rel_w, pad_qkv)
        max_diff = (out.float() - ref.float()).abs().max().item()
        del ref
    del out
    assert max_diff < 0.25, f"{impl} is far from the reference: max diff {max_diff:.3g}"

    benchmark.group = f"{layer}-{preset}"
    load_start = load_average()
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)

    ms = benchmark.stats.stats.median * 1e3
    flops = attention_flops(BATCH, heads, head_dim, window)
    benchmark.extra_info.update(environment(DEVICE))  # device, versions, commit, threads
    benchmark.extra_info.update(
        section="attention",
        loadavg_start=load_start,
        loadavg_end=load_average(),
        rounds=ROUNDS,
        warmup_rounds=WARMUP,
        impl=impl,
        layer=layer,
        preset=preset,
        shape=f"B={BATCH} grid={GRID}x{GRID} heads={heads} D={head_dim} window={window}",
        dtype=str(DTYPE).removeprefix("torch."),
        median_ms=round(ms, 4),
        tflops=round(flops / (ms * 1e-3) / 1e12, 3),
        peak_mem_mb=None if peak_mb is None else round(peak_mb, 1),
        max_diff_vs_reference=max_diff,
    )
