"""Fused linear (GEMM + bias/activation/residual epilogue) kernel vs the fp32 PyTorch reference.

Without CUDA the kernel runs in the Triton interpreter on CPU tensors (tests/conftest.py switches
it on), so the CPU cases are small; the ``gpu`` cases run the real ViT encoder shapes.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from samhq_fast.ops.linear import linear_reference

pytest.importorskip("triton")

from samhq_fast.kernels.linear import linear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# One table, keyed by the output dtype: max |kernel - fp32 reference| <= atol * scale +
# rtol * |reference|, with scale = max |reference| (errors are relative to the output's size).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),  # ~1 ulp: rounding of the output (+ fp32 summation order)
    torch.bfloat16: (8e-3, 8e-3),
}
# Half inputs: kernel error <= LOWP_FACTOR * (error of plain PyTorch in that dtype) + eps * scale.
LOWP_FACTOR = 2.0
LOWP_EPS = {torch.float16: 1e-4, torch.bfloat16: 1e-3}


def _name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def make_x(
    lead: tuple[int, ...], K: int, dtype: torch.dtype, layout: str, g: torch.Generator
) -> torch.Tensor:
    """x ``(*lead, K)`` in ``layout``; every non-contiguous layout holds the same kind of data."""
    if layout == "contiguous":
        x = torch.randn(*lead, K, generator=g)
    elif layout == "slice":  # strided rows, leading dims still flatten to a view
        x = torch.randn(*lead, K + 11, generator=g)[..., 3 : 3 + K]
    elif layout == "transposed":  # K is the strided dim (2-D) / H and W swapped (4-D): a copy
        if len(lead) == 1:
            x = torch.randn(K, *lead, generator=g).T
        else:
            B, H, W = lead
            x = torch.randn(B, W, H, K, generator=g).transpose(1, 2)
    else:
        raise ValueError(layout)
    return x.to(device=DEVICE, dtype=dtype)


def make_weight(N: int, K: int, dtype: torch.dtype, layout: str, g: torch.Generator):
    """Random weight ``(N, K)`` with uneven row scales (not just unit-variance noise)."""
    w = torch.randn(N, K, generator=g) * K**-0.5 * (0.5 + torch.rand(N, 1, generator=g))
    if layout == "transposed":  # stored (K, N): column-major (N, K)
        w = w.T.contiguous().T
    elif layout == "slice":
        w = torch.cat([w, torch.randn(N, 5, generator=g)], 1)[:, :K]
    return w.to(device=DEVICE, dtype=dtype)


def make_inputs(
    lead: tuple[int, ...],
    K: int,
    N: int,
    dtype: torch.dtype,
    *,
    bias: bool = True,
    residual: str | None = None,
    x_layout: str = "contiguous",
    w_layout: str = "contiguous",
    seed: int = 0,
) -> dict:
    """Kernel arguments. ``residual``: None, "same" (x's dtype) or "fp32"."""
    g = torch.Generator().manual_seed(seed)
    x = make_x(lead, K, dtype, x_layout, g)
    w = make_weight(N, K, dtype, w_layout, g)
    b = None
    if bias:  # strided with the sliced weight (a slice of a fused parameter)
        b = 0.5 * torch.randn(2 * N, generator=g)
        b = (b[::2] if w_layout == "slice" else b[:N]).to(device=DEVICE, dtype=dtype)
    r = None
    if residual is not None:
        r_dtype = dtype if residual == "same" else torch.float32
        r = (2 * torch.randn(*lead, N, generator=g)).to(device=DEVICE, dtype=r_dtype)
    return dict(x=x, weight=w, bias=b, residual=r)


def fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def torch_same_dtype(x, weight, bias=None, activation="none", residual=None, out_dtype=None):
    """Plain PyTorch in the input dtype: ``F.linear`` (rounded to that dtype), then the epilogue."""
    y = F.linear(x, weight, bias).float()
    if activation == "gelu":
        y = F.gelu(y)
    elif activation == "relu":
        y = F.relu(y)
    if residual is not None:
        y = y + residual.float()
    if out_dtype is None:
        out_dtype = residual.dtype if residual is not None else x.dtype
    return y.to(out_dtype)


@contextlib.contextmanager
def _no_tf32():
    """The fp32 oracle must not run on TF32 tensor cores (CUDA), whatever other tests set."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def check_against_reference(
    inputs: dict, activation: str = "none", out_dtype: torch.dtype | None = None, **kernel_kwargs
) -> tuple[float, float]:
    """Run the kernel, compare with the fp32 reference on the same (rounded) inputs.

    Returns (kernel error, plain-PyTorch-in-that-dtype error), both relative to the output scale.
    """
    x, res = inputs["x"], inputs["residual"]
    out = linear(**inputs, activation=activation, out_dtype=out_dtype, **kernel_kwargs)
    want_dtype = out_dtype or (res.dtype if res is not None else x.dtype)
    N = inputs["weight"].shape[0]
    assert out.dtype == want_dtype and out.shape == (*x.shape[:-1], N)
    with _no_tf32():
        ref = linear_reference(**{k: fp32(v) for k, v in inputs.items()}, activation=activation)
    scale = ref.abs().max().item() or 1.0
    err = (out.float() - ref).abs().max().item()
    atol, rtol = TOLERANCES[want_dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol * scale, rtol=rtol)
    torch_err = 0.0
    if x.dtype != torch.float32:
        plain = torch_same_dtype(**inputs, activation=activation, out_dtype=out_dtype)
        torch_err = (plain.float() - ref).abs().max().item()
        bound = LOWP_FACTOR * torch_err + LOWP_EPS[x.dtype] * scale
        assert err <= bound, f"kernel error {err:.3g} > 2 x PyTorch {x.dtype} error {torch_err:.3g}"
    print(
        f"[linear] x {_name(x.dtype)} -> {_name(want_dtype)} {activation}: "
        f"kernel {err / scale:.3g}, plain torch {torch_err / scale:.3g} (out scale {scale:.3g})"
    )
    return err / scale, torch_err / scale


# (id, leading shape, K, N, x layout, weight layout). M in {1, 37, 130}; 4-D is (B, H, W, K).
SHAPES = [
    ("m1_k16_n24", (1,), 16, 24, "contiguous", "contiguous"),
    ("m37_k48_n64", (37,), 48, 64, "slice", "transposed"),
    ("m130_k80_n160", (130,), 80, 160, "transposed", "contiguous"),
    ("m130_k96_n24", (130,), 96, 24, "contiguous", "slice"),
    ("b1_1x1x1_k80_n64", (1, 1, 1), 80, 64, "contiguous", "contiguous"),
    ("b1_1x37x1_k96_n160", (1, 37, 1), 96, 160, "slice", "contiguous"),
    ("b2_5x13_k48_n24", (2, 5, 13), 48, 24, "transposed", "transposed"),
    ("b2_13x5_k16_n160", (2, 13, 5), 16, 160, "slice", "contiguous"),
]
# (activation, residual, bias), cycled over the shapes so each dtype sees a different mix.
EPILOGUES = [
    ("none", None, True),  # qkv
    ("gelu", None, True),  # lin1
    ("none", "fp32", True),  # proj / lin2 with the fp32 residual stream
    ("relu", "same", False),
    ("gelu", "fp32", False),
    ("none", "same", True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
def test_matches_reference(shape, dtype):
    name, lead, K, N, x_layout, w_layout = shape
    i = SHAPES.index(shape)
    act, res, bias = EPILOGUES[(i + DTYPES.index(dtype)) % len(EPILOGUES)]
    inputs = make_inputs(
        lead, K, N, dtype, bias=bias, residual=res, x_layout=x_layout, w_layout=w_layout, seed=i
    )
    check_against_reference(inputs, act)


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda e: f"{e[0]}-res_{e[1]}-bias_{e[2]}")
def test_every_epilogue(epilogue, dtype):
    act, res, bias = epilogue
    inputs = make_inputs((2, 3, 7), 48, 40, dtype, bias=bias, residual=res, seed=11)
    check_against_reference(inputs, act)


@pytest.mark.parametrize(
    "dtype,res,out_dtype",
    [
        (torch.bfloat16, "fp32", torch.bfloat16),  # fp32 residual stream, half output
        (torch.float16, None, torch.float32),
        (torch.float32, "same", torch.float16),
    ],
    ids=["bf16_res32_to_bf16", "fp16_to_fp32", "fp32_to_fp16"],
)
def test_out_dtype(dtype, res, out_dtype):
    inputs = make_inputs((37,), 48, 24, dtype, residual=res, seed=5)
    check_against_reference(inputs, "gelu", out_dtype=out_dtype)


# Tiles that do not divide M (37), N (24) or K (80), and tiles larger than the whole problem.
@pytest.mark.parametrize(
    "block_m,block_n,block_k", [(16, 16, 16), (16, 64, 32), (64, 16, 64), (32, 32, 128)]
)
def test_any_tile_size(block_m, block_n, block_k):
    inputs = make_inputs((37,), 80, 24, torch.float32, residual="same", seed=3)
    check_against_reference(inputs, "gelu", block_m=block_m, block_n=block_n, block_k=block_k)


def test_grouped_ordering_many_tiles():
    """More row tiles than one group (GROUP_M = 8) and a partial last group."""
    inputs = make_inputs((2, 10, 13), 32, 48, torch.float16, residual="fp32", seed=4)
    check_against_reference(inputs, "relu", block_m=16, block_n=16, block_k=16)


def test_large_values_fp16_fp32_residual():
    """fp16 x whose products fit fp16 (~2e4) plus an fp32 residual ~1e5: the sum overflows fp16
    (65504) but the kernel keeps it in fp32 and returns the finite reference."""
    g = torch.Generator().manual_seed(0)
    K, N = 48, 24
    x = (20 + torch.rand(37, K, generator=g)).to(device=DEVICE, dtype=torch.float16)
    w = (20 + torch.rand(N, K, generator=g)).to(device=DEVICE, dtype=torch.float16)
    b = torch.randn(N, generator=g).to(device=DEVICE, dtype=torch.float16)
    r = (1e5 + 1e3 * torch.randn(37, N, generator=g)).to(DEVICE)
    prod = F.linear(x, w, b)
    assert torch.isfinite(prod).all() and prod.abs().max() > 1.5e4
    assert not torch.isfinite(prod + r.half()).all()  # what an fp16 residual stream would do
    out = linear(x, w, b, "none", r)
    ref = linear_reference(x.float(), w.float(), b.float(), "none", r)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out.abs().max() > 65504
    torch.testing.assert_close(out, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-6)


def test_empty_and_1d():
    w = torch.randn(24, 16, device=DEVICE)
    for lead in ((0,), (2, 0, 3)):
        out = linear(torch.randn(*lead, 16, device=DEVICE), w, residual=None)
        assert out.shape == (*lead, 24) and out.dtype == torch.float32
    x = torch.randn(16, device=DEVICE)
    out, ref = linear(x, w, activation="gelu"), linear_reference(x, w, None, "gelu")
    assert out.shape == (24,)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_name)
def test_output_rounds_to_nearest(dtype):
    """Half outputs are the fp32 result rounded to nearest (not truncated: the interpreter's
    fp32 -> bf16 cast truncates, the kernel works around it). Ties apart, every element equals
    the reference cast to the output dtype."""
    inputs = make_inputs((130,), 48, 64, dtype, residual="same", seed=9)
    out = linear(**inputs, activation="gelu")
    ref = linear_reference(**{k: fp32(v) for k, v in inputs.items()}, activation="gelu")
    assert (out == ref.to(dtype)).float().mean().item() > 0.995


@pytest.mark.parametrize("fn", [linear_reference, linear], ids=["reference", "kernel"])
def test_input_validation(fn):
    x, w = torch.randn(4, 16), torch.randn(24, 16)
    with pytest.raises(ValueError, match=r"K mismatch: x last dim is 15"):
        fn(x[:, :15], w)
    with pytest.raises(ValueError, match=r"weight must be \(N, K\)"):
        fn(x, w[0])
    with pytest.raises(ValueError, match=r"bias must be \(24,\)"):
        fn(x, w, torch.randn(23))
    with pytest.raises(ValueError, match=r"residual must be \(4, 24\)"):
        fn(x, w, residual=torch.randn(4, 16))
    with pytest.raises(ValueError, match="unknown activation 'silu'"):
        fn(x, w, activation="silu")
    with pytest.raises(ValueError, match="x dtype torch.float64"):
        fn(x.double(), w.double())
    with pytest.raises(ValueError, match="weight dtype torch.float16 differs"):
        fn(x, w.half())
    with pytest.raises(ValueError, match="residual dtype torch.int32"):
        fn(x, w, residual=torch.zeros(4, 24, dtype=torch.int32))
    with pytest.raises(ValueError, match="out_dtype torch.float64"):
        fn(x, w, out_dtype=torch.float64)


def test_importing_the_op_does_not_import_triton():
    code = (
        "import sys, samhq_fast.ops.linear as m\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root)


# Real encoder shapes: 8 images of 64 x 64 tokens; (K, N, activation, residual).
GPU_CASES = [
    ("vit_b_qkv", 768, 2304, "none", None),
    ("vit_b_lin1", 768, 3072, "gelu", None),
    ("vit_b_lin2", 3072, 768, "none", "fp32"),
    ("vit_h_lin1", 1280, 5120, "gelu", None),
    ("vit_h_lin2", 5120, 1280, "none", "fp32"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_name)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c[0])
def test_real_shapes_gpu(case, dtype):
    _, K, N, act, res = case
    inputs = make_inputs((8, 64, 64), K, N, dtype, residual=res, seed=1)
    check_against_reference(inputs, act)


@pytest.mark.gpu
def test_real_shape_fp32_same_residual_gpu():
    """fp32 (ieee dots, no TF32) at a real shape, residual in the same dtype."""
    inputs = make_inputs((1, 64, 64), 768, 768, torch.float32, residual="same", seed=2)
    check_against_reference(inputs, "none")
