"""Fused mask-decoder attention kernel vs the fp32 PyTorch reference.

Without CUDA the kernel runs in the Triton interpreter on CPU tensors (tests/conftest.py switches
it on), so the CPU cases are small; the ``gpu`` cases run the real decoder shapes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from samhq_fast.ops.decoder_attention import decoder_attention_reference

pytest.importorskip("triton")

from samhq_fast.kernels.decoder_attention import (  # noqa: E402
    MAX_SPLITS,
    _decoder_attention,
    decoder_attention,
    num_kv_splits,
)

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
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "fused", "transposed", "expand"]


def make(
    batch: int,
    tokens: int,
    channels: int,
    dtype: torch.dtype,
    g: torch.Generator,
    layout: str = "contiguous",
    scale: float = 1.0,
) -> torch.Tensor:
    """A ``(batch, tokens, channels)`` tensor in ``layout`` (values drawn in fp32, then cast)."""
    if layout == "contiguous":
        x = torch.randn(batch, tokens, channels, generator=g)
    elif layout == "fused":  # one slice of a fused projection output: wide token stride, offset
        x = torch.randn(batch, tokens, 3 * channels + 5, generator=g)[..., 3 : 3 + channels]
    elif layout == "transposed":  # channels-major: channel stride = tokens
        x = torch.randn(batch, channels, tokens, generator=g).transpose(1, 2)
    elif layout == "expand":  # one item broadcast over the batch: batch stride 0
        x = torch.randn(1, tokens, channels, generator=g).expand(batch, tokens, channels)
    else:
        raise ValueError(layout)
    return (scale * x).to(device=DEVICE, dtype=dtype)


def check_against_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    q_group: int = 1,
    kv_group: int = 1,
    tiles: tuple[int, int] | None = None,
    splits: int | None = None,
) -> tuple[float, float]:
    """Run the kernel, compare with the fp32 reference on the same (rounded) inputs.

    Returns (kernel error, error of the reference run in the input dtype).
    """
    dtype = q.dtype
    if tiles is None and splits is None:
        out = decoder_attention(q, k, v, heads, q_group, kv_group)
    else:
        out = _decoder_attention(q, k, v, heads, q_group, kv_group, tiles=tiles, splits=splits)
    n = q.shape[0] * q_group
    assert out.dtype == dtype and out.shape == (n, q.shape[1], q.shape[2])
    ref = decoder_attention_reference(q.float(), k.float(), v.float(), heads, q_group, kv_group)
    assert torch.isfinite(out).all()
    err = (out.float() - ref).abs().max().item()
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)
    torch_err = 0.0
    if dtype != torch.float32:
        same_dtype = decoder_attention_reference(q, k, v, heads, q_group, kv_group)
        torch_err = (same_dtype.float() - ref).abs().max().item()
        bound = LOWP_FACTOR * torch_err + LOWP_EPS[dtype]
        assert err <= bound, f"kernel error {err:.3g} > 2 x PyTorch {dtype} error {torch_err:.3g}"
    print(f"[decoder_attention] {dtype}: kernel {err:.3g}, torch same dtype {torch_err:.3g}")
    return err, torch_err


# The three attentions of the two-way transformer at CPU sizes: (id, Tq, Tk).
KINDS = [("token_to_image", 7, 256), ("image_to_token", 256, 7), ("self", 9, 9)]
# (N, q_group, kv_group), cycled over the cases.
GROUPS = [(1, 1, 1), (6, 1, 3), (6, 3, 1), (6, 3, 3), (3, 1, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("head_dim", [4, 8, 16, 32])
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k[0])
def test_matches_reference(kind, head_dim, dtype):
    _, Tq, Tk = kind
    i = KINDS.index(kind) * 4 + [4, 8, 16, 32].index(head_dim)
    N, qg, kg = GROUPS[i % len(GROUPS)]
    layout = LAYOUTS[i % len(LAYOUTS)]
    heads, C = 2, 2 * head_dim
    g = torch.Generator().manual_seed(i)
    q = make(N // qg, Tq, C, dtype, g, layout)
    k = make(N // kg, Tk, C, dtype, g, LAYOUTS[(i + 1) % len(LAYOUTS)])
    v = make(N // kg, Tk, C, dtype, g, layout)
    check_against_reference(q, k, v, heads, qg, kg)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_head_dim_80_one_head(dtype):
    g = torch.Generator().manual_seed(80)
    q, k, v = (make(2, t, 80, dtype, g) for t in (5, 40, 40))
    check_against_reference(q, k, v, 1)


@pytest.mark.parametrize("q_group", [1, 3])
@pytest.mark.parametrize("kv_group", [1, 3])
def test_groups(q_group, kv_group):
    """Shared image side: each prompt's result equals the ungrouped op on repeated inputs."""
    N, Tq, Tk, heads, C = 6, 7, 40, 2, 32
    g = torch.Generator().manual_seed(q_group * 10 + kv_group)
    q = make(N // q_group, Tq, C, torch.float32, g)
    k, v = (make(N // kv_group, Tk, C, torch.float32, g) for _ in range(2))
    out = decoder_attention(q, k, v, heads, q_group, kv_group)
    flat = decoder_attention(
        q.repeat_interleave(q_group, 0),
        k.repeat_interleave(kv_group, 0),
        v.repeat_interleave(kv_group, 0),
        heads,
    )
    torch.testing.assert_close(out, flat, atol=1e-6, rtol=1e-6)
    check_against_reference(q, k, v, heads, q_group, kv_group)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous(layout):
    g = torch.Generator().manual_seed(5)
    q = make(4, 9, 32, torch.float16, g, layout)
    k, v = (make(4, 33, 32, torch.float16, g, layout) for _ in range(2))
    check_against_reference(q, k, v, 2)


def test_fused_qkv_self_attention():
    """q, k, v as three slices of one fused projection output (stride 3C per token)."""
    g = torch.Generator().manual_seed(6)
    qkv = torch.randn(3, 11, 3 * 64, generator=g).to(DEVICE, torch.bfloat16)
    q, k, v = qkv.split(64, dim=-1)
    check_against_reference(q, k, v, 2)
    check_against_reference(q[:, 2:], k, v, 4)  # token-offset slice too


# Tiles that do not divide the stacked query rows (3 x 17 = 51) or the keys (100): masking of
# both, across several key blocks and query blocks straddling prompts.
@pytest.mark.parametrize("tiles", [(16, 16), (16, 64), (64, 16), (32, 32)])
def test_any_tile_size(tiles):
    g = torch.Generator().manual_seed(7)
    q = make(6, 17, 32, torch.float32, g)
    k, v = (make(2, 100, 32, torch.float32, g) for _ in range(2))
    check_against_reference(q, k, v, 2, 1, 3, tiles=tiles)


# Split-KV (forced: the interpreter never splits on its own). 100 keys in 16-key blocks: 7 blocks,
# the last with 4 keys; 1 split (the split path's partial + combine machinery alone), 3 (runs
# of 3, 3, 1 blocks), 7 (one block each) and 50 (clamped to 7).
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("splits", [1, 3, 7, 50])
def test_split_kv_matches_reference(splits, dtype):
    g = torch.Generator().manual_seed(20 + splits)
    layout = LAYOUTS[splits % len(LAYOUTS)]
    q = make(6, 7, 32, dtype, g, "fused")  # 3 images x 2 prompts of 7 tokens, head dim 16
    k = make(3, 100, 32, dtype, g, layout)
    v = make(3, 100, 32, dtype, g, "transposed")
    check_against_reference(q, k, v, 2, 1, 2, tiles=(16, 16), splits=splits)


@pytest.mark.parametrize("q_group", [1, 2])
def test_split_kv_equals_unsplit(q_group):
    """The split path computes the same softmax: fp32 results agree to rounding, head dim 80
    padded to 128, query blocks straddling prompts (kv_group 3 x 17 rows in 16-row tiles)."""
    g = torch.Generator().manual_seed(30 + q_group)
    kv_group = 3 if q_group == 1 else 1  # 6 prompts: 2 images' keys, or 3 images' queries
    q = make(6 // q_group, 17, 160, torch.float32, g, "transposed")
    k, v = (make(6 // kv_group, 45, 160, torch.float32, g) for _ in range(2))
    one = _decoder_attention(q, k, v, 2, q_group, kv_group, tiles=(16, 16))
    for splits in (2, 3):
        got = _decoder_attention(q, k, v, 2, q_group, kv_group, tiles=(16, 16), splits=splits)
        torch.testing.assert_close(got, one, atol=2e-6, rtol=2e-6)
    check_against_reference(q, k, v, 2, q_group, kv_group, tiles=(16, 16), splits=3)


def test_split_rule():
    """Split when the programs fall short of 2 per SM, deterministically, never into runs of
    fewer than 2 key blocks, never past MAX_SPLITS."""
    sm = 132
    assert num_kv_splits(8, 32, sm) == 16  # 1 prompt: 8 heads, 4096 keys in 128-key blocks
    assert num_kv_splits(64, 32, sm) == 5  # 64 prompts sharing an image: 8 query blocks x 8
    assert num_kv_splits(512, 32, sm) == 1  # 64 prompts, one image each: enough programs
    assert num_kv_splits(264, 32, sm) == 1
    assert num_kv_splits(8, 3, sm) == 1  # too few key blocks to split
    assert num_kv_splits(1, 1000, sm) == MAX_SPLITS
    assert all(num_kv_splits(p, b, sm) * p <= max(p, 2 * sm + p) for p in (1, 7, 100)
               for b in (4, 33, 200))  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_large_logits(dtype):
    """Logits ~1e3: the online softmax must not overflow, and match the fp32 reference."""
    g = torch.Generator().manual_seed(8)
    q = make(2, 7, 32, dtype, g, scale=16.0)  # |q.k| * 16**-0.5 up to ~1e3
    k = make(2, 50, 32, dtype, g, scale=16.0)
    v = make(2, 50, 32, dtype, g)
    ref = decoder_attention_reference(q.float(), k.float(), v.float(), 2)
    logits = (q.float()[:, :, :16] @ k.float()[:, :, :16].transpose(1, 2)) * 0.25
    assert logits.abs().max() > 500
    out = decoder_attention(q, k, v, 2)
    assert torch.isfinite(out).all()
    # The kernel's fp32 logits of the rounded inputs are (nearly) exact, so even in fp16/bf16 it
    # matches the fp32 reference where the same-dtype reference (logits rounded) may not.
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)


def test_edge_sizes():
    g = torch.Generator().manual_seed(9)
    q = make(2, 1, 16, torch.float32, g)
    k, v = (make(2, 1, 16, torch.float32, g) for _ in range(2))
    check_against_reference(q, k, v, 1)  # Tq = Tk = 1: out = v
    torch.testing.assert_close(decoder_attention(q, k, v, 1), v)
    empty = decoder_attention(q, k[:, :0], v[:, :0], 1)  # no keys: zeros, like the reference
    torch.testing.assert_close(empty, decoder_attention_reference(q, k[:, :0], v[:, :0], 1))
    assert decoder_attention(q[:, :0], k, v, 1).shape == (2, 0, 16)


def test_input_validation():
    g = torch.Generator().manual_seed(10)
    q, k, v = (make(6, 5, 16, torch.float32, g) for _ in range(3))
    with pytest.raises(ValueError, match="q must be 3-D"):
        decoder_attention(q[0], k, v, 2)
    with pytest.raises(ValueError, match="dtype torch.float64"):
        decoder_attention(q.double(), k.double(), v.double(), 2)
    with pytest.raises(ValueError, match="share a dtype"):
        decoder_attention(q, k.half(), v, 2)
    with pytest.raises(ValueError, match="num_heads 3 must divide the channel dim 16"):
        decoder_attention(q, k, v, 3)
    with pytest.raises(ValueError, match="num_heads 0"):
        decoder_attention(q, k, v, 0)
    with pytest.raises(ValueError, match="q has 16 channels, k/v have 8"):
        decoder_attention(q, k[..., :8], v[..., :8], 2)
    with pytest.raises(ValueError, match="k and v shapes differ"):
        decoder_attention(q, k, v[:, :3], 2)
    with pytest.raises(ValueError, match="batch mismatch"):
        decoder_attention(q, k[:4], v[:4], 2, 1, 1)
    with pytest.raises(ValueError, match="batch mismatch"):
        decoder_attention(q, k[:3], v[:3], 2, 1, 4)  # 3 x 4 != 6
    with pytest.raises(ValueError, match="must be >= 1"):
        decoder_attention(q, k, v, 2, 0, 1)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="share a device"):
            decoder_attention(q, k.cpu(), v, 2)


def test_importing_the_op_does_not_import_triton():
    code = (
        "import sys, samhq_fast.ops.decoder_attention as a\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root)


# Real decoder shapes: (id, Tq, Tk, heads, D); internal dim 128 cross, 256 self.
GPU_CASES = [
    ("token_to_image", 7, 4096, 8, 16),
    ("image_to_token", 4096, 7, 8, 16),
    ("self", 7, 7, 8, 32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shared", [False, True], ids=["per_prompt", "shared_image"])
@pytest.mark.parametrize("N", [1, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c[0])
def test_real_shapes_gpu(case, dtype, N, shared):
    _, Tq, Tk, heads, D = case
    C = heads * D
    qg = kg = 1
    if shared:  # the image side is passed once for all N prompts
        if Tk > Tq:
            kg = N
        elif Tq > Tk:
            qg = N
        else:
            pytest.skip("self-attention has no image side")
    g = torch.Generator().manual_seed(N + Tq)
    q = make(N // qg, Tq, C, dtype, g, "fused")
    k, v = (make(N // kg, Tk, C, dtype, g, "fused") for _ in range(2))
    check_against_reference(q, k, v, heads, qg, kg)
