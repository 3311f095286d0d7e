"""Fused rel-pos attention kernel vs the fp32 PyTorch reference.

Without CUDA the kernel runs in the Triton interpreter on CPU tensors (tests/conftest.py switches
it on), so the CPU cases are small; the ``gpu`` cases run the real ViT shapes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from samhq_fast.ops.attention import (
    rel_pos_attention_reference,
    triton_unsupported_reasons,
    window_partition,
    window_unpartition,
)
from samhq_fast.ops.backend import BackendUnavailableError

pytest.importorskip("triton")

from samhq_fast.kernels.rel_pos_attention import rel_pos_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# One table for the op: max |kernel - fp32 reference| <= atol + rtol * |reference|.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (4e-2, 2e-2),
}
# Low precision: kernel error <= LOWP_FACTOR * (error of the reference run in that dtype) + eps.
LOWP_FACTOR = 2.0
LOWP_EPS = {torch.float16: 1e-4, torch.bfloat16: 1e-3}


def make_inputs(
    B: int,
    H: int,
    W: int,
    heads: int,
    D: int,
    window: int,
    dtype: torch.dtype,
    *,
    layout: str = "contiguous",
    pad: bool = True,
    device: str = DEVICE,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """qkv (B, H, W, 3C) in ``layout``, perturbed rel tables and (optionally) a random pad qkv."""
    g = torch.Generator().manual_seed(seed)
    C3 = 3 * heads * D
    if layout == "contiguous":
        qkv = torch.randn(B, H, W, C3, generator=g)
    elif layout == "slice":  # a window into a bigger tensor: every stride differs from contiguous
        qkv = torch.randn(B, H + 1, W + 3, C3 + 8, generator=g)[:, 1:, 2 : W + 2, 5 : 5 + C3]
    elif layout == "permuted":  # H and W swapped in memory
        qkv = torch.randn(B, W, H, C3, generator=g).transpose(1, 2)
    else:
        raise ValueError(layout)
    S_h, S_w = (window, window) if window else (H, W)
    rel_h = 0.3 * torch.randn(2 * S_h - 1, D, generator=g)
    rel_w = 0.3 * torch.randn(2 * S_w - 1, D, generator=g)
    pad_qkv = 0.5 * torch.randn(C3, generator=g) if pad else None

    def to(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    return to(qkv), to(rel_h), to(rel_w), to(pad_qkv)


def fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def check_against_reference(
    qkv: torch.Tensor,
    heads: int,
    window: int,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    pad_qkv: torch.Tensor | None,
    **kernel_kwargs,
) -> tuple[float, float]:
    """Run the kernel, compare with the fp32 reference on the same (rounded) inputs.

    Returns (kernel error, error of the reference run in the input dtype).
    """
    dtype = qkv.dtype
    out = rel_pos_attention(qkv, heads, window, rel_h, rel_w, pad_qkv, **kernel_kwargs)
    assert out.dtype == dtype and out.shape == (*qkv.shape[:3], qkv.shape[3] // 3)
    ref = rel_pos_attention_reference(
        fp32(qkv), heads, window, fp32(rel_h), fp32(rel_w), fp32(pad_qkv)
    )
    err = (out.float() - ref).abs().max().item()
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)
    torch_err = 0.0
    if dtype != torch.float32:
        same_dtype = rel_pos_attention_reference(qkv, heads, window, rel_h, rel_w, pad_qkv)
        torch_err = (same_dtype.float() - ref).abs().max().item()
        bound = LOWP_FACTOR * torch_err + LOWP_EPS[dtype]
        assert err <= bound, f"kernel error {err:.3g} > 2 x PyTorch {dtype} error {torch_err:.3g}"
    print(f"[rel_pos_attention] {dtype}: kernel {err:.3g}, torch same dtype {torch_err:.3g}")
    return err, torch_err


# (id, B, H, W, heads, D, window). The 64/80 cases are kept tiny: the interpreter is slow.
SHAPES = [
    ("global_8x8_d32_b1", 1, 8, 8, 2, 32, 0),
    ("global_7x9_d16_b3", 3, 7, 9, 2, 16, 0),
    ("win4_10x10_d16_b3", 3, 10, 10, 2, 16, 4),  # 10 -> 12: padded windows
    ("win3_7x9_d32_b1", 1, 7, 9, 2, 32, 3),  # non-square grid, pads rows only
    ("global_5x6_d64_b1", 1, 5, 6, 1, 64, 0),
    ("win4_6x7_d64_b1", 1, 6, 7, 1, 64, 4),
    ("global_5x6_d80_b1", 1, 5, 6, 1, 80, 0),
    ("win4_6x7_d80_b3", 3, 6, 7, 1, 80, 4),
    ("win14_16x16_d64_b1", 1, 16, 16, 1, 64, 14),  # the real window: 196 tokens, 16 -> 28
    ("global_16x12_d80_b1", 1, 16, 12, 1, 80, 0),
    # Row-aligned tiles: odd widths, grids that end inside a window row/column (edge windows
    # partly outside the grid, bottom ones with fewer query blocks), batch 2, D 64 and 80.
    ("win5_12x13_d16_b2", 2, 12, 13, 2, 16, 5),  # 12 -> 15, 13 -> 15: 2 rows/cols of padding
    ("global_9x11_d64_b2", 2, 9, 11, 1, 64, 0),  # width 11 -> 16 columns, 5 masked
    ("win6_13x8_d80_b2", 2, 13, 8, 1, 80, 6),  # last window row holds 1 grid row of 6
]
LAYOUTS = ["slice", "permuted", "contiguous"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
def test_matches_reference(shape, dtype):
    name, B, H, W, heads, D, window = shape
    i = SHAPES.index(shape)
    layout = LAYOUTS[i % len(LAYOUTS)]
    pad = i % 4 != 3  # mostly a real pad_qkv (the qkv bias), sometimes None (zeros)
    inputs = make_inputs(B, H, W, heads, D, window, dtype, layout=layout, pad=pad, seed=i)
    check_against_reference(inputs[0], heads, window, *inputs[1:])


# Forced tiles: a query block is block_m // SW_PAD rows (ROWS_M), a key block block_n // SW_PAD
# rows (ROWS_N), here with SW_PAD = 16 (width 9) for the global grid and 4 for window 3, so both
# are 1 or more rows, and query blocks of several rows end past the window / the grid.
@pytest.mark.parametrize("block_m,block_n", [(16, 16), (16, 64), (64, 16), (32, 32), (64, 64)])
@pytest.mark.parametrize("window", [0, 3])
def test_any_tile_size(window, block_m, block_n):
    qkv, rel_h, rel_w, pad_qkv = make_inputs(2, 7, 9, 2, 16, window, torch.float32, seed=7)
    check_against_reference(qkv, 2, window, rel_h, rel_w, pad_qkv, block_m=block_m, block_n=block_n)


# Rows wider than the query block (SW_PAD = 32 > block_m = 16): query blocks are row segments;
# in the right-hand window (grid columns 17..19 of 17..33) the second segment lies right of the
# grid and exits before any work. bf16 and fp16 too: the half path at these tiles.
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("window", [0, 17])
def test_row_segments(window, dtype):
    qkv, rel_h, rel_w, pad_qkv = make_inputs(1, 4, 20, 1, 16, window, dtype, seed=11)
    check_against_reference(qkv, 1, window, rel_h, rel_w, pad_qkv, block_m=16, block_n=32)


# Edge windows partly outside the grid (9 = 4 + 4 + 1 rows, 6 = 4 + 2 columns), with a pad_qkv
# (padded keys take it) and without (zeros), through tiles of 1 and of several rows.
@pytest.mark.parametrize("pad", [True, False], ids=["pad_qkv", "zeros"])
@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 64)])
def test_edge_windows(pad, block_m, block_n):
    qkv, rel_h, rel_w, pad_qkv = make_inputs(
        2, 9, 6, 2, 16, 4, torch.float32, layout="permuted", pad=pad, seed=5
    )
    check_against_reference(qkv, 2, 4, rel_h, rel_w, pad_qkv, block_m=block_m, block_n=block_n)


def _query_blocks_brute_force(block_m, height, ws_h, ws_w):
    """Query blocks holding at least one grid row, per window column and head."""
    sw_pad = 1 << (ws_w - 1).bit_length()
    cols_m = min(block_m, sw_pad)
    rows_m = block_m // cols_m
    n = 0
    for row0 in range(0, height, ws_h):
        for r in range(0, ws_h, rows_m):
            if row0 + r < height:
                n += -(-ws_w // cols_m)
    return n


@pytest.mark.parametrize(
    "block_m,height,ws", [(64, 64, 14), (128, 64, 14), (16, 64, 14), (32, 9, 4), (16, 13, 6),
                          (128, 64, 64), (32, 64, 64), (16, 4, 17)]
)  # fmt: skip
def test_no_programs_for_padding_rows(block_m, height, ws):
    """The launcher's grid counts only query blocks that hold a grid row (the kernel's pid
    mapping is piecewise); at the real windowed shape that is 18 of 20 blocks of 64."""
    from samhq_fast.kernels.rel_pos_attention import _query_blocks

    sw_pad = 1 << (ws - 1).bit_length()
    num_win_h = -(-height // ws)
    got = _query_blocks(block_m, height, ws, ws, sw_pad, num_win_h)
    assert got == _query_blocks_brute_force(block_m, height, ws, ws)
    if (block_m, height, ws) == (64, 64, 14):
        assert got == 4 * 4 + 2


def test_launcher_computes_no_rel_pos_terms():
    """The rel-pos terms come from q inside the kernel: the launcher runs no einsum / matmul /
    gather over q (the old pre-pass did two einsums and a copy of q), and the kernel adds the
    bias without one-hot dots."""
    import inspect

    from torch.utils._python_dispatch import TorchDispatchMode

    import samhq_fast.kernels.rel_pos_attention as kernel_module

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    qkv, rel_h, rel_w, pad_qkv = make_inputs(1, 6, 6, 2, 16, 4, torch.bfloat16, seed=2)
    with Ops() as ops:
        rel_pos_attention(qkv, 2, 4, rel_h, rel_w, pad_qkv)
    forbidden = ("mm", "bmm", "einsum", "matmul", "baddbmm", "addmm", "mul", "index", "gather")
    bad = [n for n in ops.names if n.split(".")[0] in forbidden]
    assert not bad, f"launcher computes over q: {bad}"
    assert "onehot" not in inspect.getsource(kernel_module).lower()


def _windowed_attention_masking_padding(qkv, heads, window, rel_h, rel_w, pad_qkv):
    """The windowed op, except padded keys get -inf logits (what the official model does NOT do).

    Returns (masked output, unmasked output); the unmasked one must equal the reference, which
    shows the construction is otherwise the same op.
    """
    B, H, W, C3 = qkv.shape
    D = C3 // 3 // heads
    windows, (Hp, Wp) = window_partition(qkv, window, pad_qkv)
    inside = torch.zeros(1, Hp, Wp, 1, device=qkv.device)
    inside[:, :H, :W] = 1
    inside = window_partition(inside, window)[0].reshape(-1, 1, 1, window * window) > 0
    N, L = windows.shape[0], window * window
    q, k, v = windows.reshape(N, L, 3, heads, D).permute(2, 0, 3, 1, 4)
    idx = torch.arange(window, device=qkv.device)
    rel = idx[:, None] - idx[None, :] + window - 1
    rq = q.reshape(N, heads, window, window, D)
    rel_hq = torch.einsum("nahwc,hkc->nahwk", rq, rel_h[rel])
    rel_wq = torch.einsum("nahwc,wkc->nahwk", rq, rel_w[rel])
    bias = (rel_hq[..., :, None] + rel_wq[..., None, :]).reshape(N, heads, L, L)
    logits = (q * D**-0.5) @ k.transpose(-1, -2) + bias

    def to_grid(attn: torch.Tensor) -> torch.Tensor:
        out = attn.permute(0, 2, 1, 3).reshape(N, window, window, heads * D)
        return window_unpartition(out, window, (Hp, Wp), (H, W))

    masked = logits.masked_fill(~inside, float("-inf")).softmax(-1) @ v
    return to_grid(masked), to_grid(logits.softmax(-1) @ v)


def test_padded_keys_are_not_masked():
    """Masking padded keys changes the result, so comparing with the reference catches a kernel
    that masks them; and the kernel indeed does not match the masked variant."""
    heads, window = 2, 4
    qkv, rel_h, rel_w, pad_qkv = make_inputs(1, 6, 6, heads, 16, window, torch.float32, seed=3)
    ref = rel_pos_attention_reference(qkv, heads, window, rel_h, rel_w, pad_qkv)
    masked, unmasked = _windowed_attention_masking_padding(
        qkv, heads, window, rel_h, rel_w, pad_qkv
    )
    torch.testing.assert_close(unmasked, ref, atol=1e-5, rtol=1e-5)
    assert (masked - ref).abs().max() > 1e-2, "masking padded keys must change the result"
    out = rel_pos_attention(qkv, heads, window, rel_h, rel_w, pad_qkv)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (out - masked).abs().max() > 1e-2


def test_input_validation():
    qkv, rel_h, rel_w, pad_qkv = make_inputs(1, 4, 4, 2, 16, 0, torch.float32)
    with pytest.raises(ValueError, match=r"qkv last dim 95 must be 3 \* num_heads \* head_dim"):
        rel_pos_attention(qkv[..., :95], 2, 0, rel_h, rel_w)
    with pytest.raises(ValueError, match=r"qkv must be \(B, H, W, 3 \* C\)"):
        rel_pos_attention(qkv[0], 2, 0, rel_h, rel_w)
    with pytest.raises(ValueError, match="head_dim 8 is not a positive multiple of 16"):
        rel_pos_attention(qkv, 4, 0, rel_h[:, :8], rel_w[:, :8])
    with pytest.raises(ValueError, match="rel_pos_w must be"):
        rel_pos_attention(qkv, 2, 0, rel_h, rel_w[:, :8])
    with pytest.raises(ValueError, match="pad_qkv must be"):
        rel_pos_attention(qkv, 2, 0, rel_h, rel_w, pad_qkv[:-1])
    with pytest.raises(ValueError, match="window_size must be >= 0"):
        rel_pos_attention(qkv, 2, -1, rel_h, rel_w)
    with pytest.raises(ValueError, match="dtype torch.float64"):
        rel_pos_attention(qkv.double(), 2, 0, rel_h.double(), rel_w.double())


def test_unsupported_reasons():
    assert triton_unsupported_reasons(64, torch.bfloat16) == []
    for d in (16, 32, 48, 64, 80, 96, 128):
        assert triton_unsupported_reasons(d) == [], d
    assert triton_unsupported_reasons(112)  # 64 + 48: not two power-of-two chunks
    assert triton_unsupported_reasons(144)
    assert "float64" in " ".join(triton_unsupported_reasons(64, torch.float64))


def test_model_with_an_unsupported_head_dim_says_why():
    """The backend is chosen once, at model build (ops.fused): a head dim the kernel cannot take
    makes backend="triton" raise with the reason; "auto" never picks Triton then."""
    from samhq_fast.modeling.sam_hq import SamHQModel

    from _weights import small_config

    model = SamHQModel(small_config(64, hidden=48, depth=1, heads=2, window=2, global_idx=(0,)))
    with pytest.raises(BackendUnavailableError, match="head_dim 24"):
        model.to(DEVICE).set_backend("triton")
    assert model.set_backend("auto") != "triton"


def test_importing_the_package_does_not_import_triton():
    code = (
        "import sys, samhq_fast, samhq_fast.ops, samhq_fast.ops.attention as a\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root)


# Real shapes (one 1024x1024 image per batch item: a 64 x 64 token grid).
GPU_CASES = [
    ("vit_b_global", 12, 64, 0),
    ("vit_b_window", 12, 64, 14),
    ("vit_h_global", 16, 80, 0),
    ("vit_h_window", 16, 80, 14),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c[0])
def test_real_shapes_gpu(case, dtype):
    _, heads, D, window = case
    qkv, rel_h, rel_w, pad_qkv = make_inputs(
        2, 64, 64, heads, D, window, dtype, layout="slice", pad=bool(window), device="cuda"
    )
    check_against_reference(qkv, heads, window, rel_h, rel_w, pad_qkv)


@pytest.mark.gpu
def test_batch_one_gpu():
    """segment-anything-fast's kernel was wrong at batch 1 for head dim 64."""
    qkv, rel_h, rel_w, _ = make_inputs(1, 64, 64, 12, 64, 0, torch.bfloat16, device="cuda")
    check_against_reference(qkv, 12, 0, rel_h, rel_w, None)
