"""Fused LayerNorm kernels vs the fp32 PyTorch references.

Without CUDA the kernels run in the Triton interpreter on CPU tensors (tests/conftest.py switches
it on), so the CPU cases are small; the ``gpu`` cases run the real SAM shapes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from samhq_fast.ops.layer_norm import (
    add_layer_norm_reference,
    layer_norm_2d_reference,
    layer_norm_reference,
)

pytest.importorskip("triton")

from samhq_fast.kernels.layer_norm import (  # noqa: E402
    add_layer_norm,
    layer_norm,
    layer_norm_2d,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# One table per op: max |kernel - fp32 reference| <= atol + rtol * |reference| (output dtype).
LN_TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (2e-5, 1e-5),
    torch.float16: (4e-3, 2e-3),
    torch.bfloat16: (3e-2, 1e-2),
}
ADD_LN_TOL: dict[torch.dtype, tuple[float, float]] = {  # y is normalised from the rounded sum
    torch.float32: (2e-5, 1e-5),
    torch.float16: (8e-3, 4e-3),
    torch.bfloat16: (6e-2, 2e-2),
}
LN2D_TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (2e-5, 1e-5),
    torch.float16: (4e-3, 2e-3),
    torch.bfloat16: (3e-2, 1e-2),
}
# Low precision: kernel error <= LOWP_FACTOR * (error of the reference run in that dtype) + eps.
LOWP_FACTOR = 2.0
LOWP_EPS = {torch.float16: 1e-4, torch.bfloat16: 1e-3}

MAX_ERR: dict[tuple[str, torch.dtype], float] = {}  # printed at the end (-s) for the report


def dtype_id(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def check(
    op: str,
    out: torch.Tensor,
    ref32: torch.Tensor,
    same_dtype: torch.Tensor,
    table: dict[torch.dtype, tuple[float, float]],
) -> float:
    """``out`` vs the fp32 reference (tolerance table) and vs the reference rounded to
    ``out.dtype`` (the 2x rule). Returns the kernel's max error."""
    assert out.shape == ref32.shape and out.dtype == same_dtype.dtype
    assert torch.isfinite(out).all(), f"{op}: non-finite output"
    atol, rtol = table[out.dtype]
    torch.testing.assert_close(out.float(), ref32, atol=atol, rtol=rtol)
    err = (out.float() - ref32).abs().max().item() if out.numel() else 0.0
    if out.dtype != torch.float32:
        torch_err = (same_dtype.float() - ref32).abs().max().item()
        bound = LOWP_FACTOR * torch_err + LOWP_EPS[out.dtype]
        assert err <= bound, f"{op}: kernel error {err:.3g} > 2 x reference error {torch_err:.3g}"
    key = (op, out.dtype)
    MAX_ERR[key] = max(MAX_ERR.get(key, 0.0), err)
    return err


def make(
    shape: tuple[int, ...], dtype: torch.dtype, layout: str = "contiguous", seed: int = 0
) -> torch.Tensor:
    """``(..., C)`` random tensor in ``layout``; every layout but contiguous has odd strides."""
    g = torch.Generator().manual_seed(seed)
    *lead, C = shape

    def rand(*size: int) -> torch.Tensor:  # scaled BEFORE slicing: arithmetic makes it dense
        return (1.5 * torch.randn(*size, generator=g) + 0.3).to(device=DEVICE, dtype=dtype)

    if layout == "contiguous":
        t = rand(*shape)
    elif layout == "row_slice":  # rows of dim 1 sliced: views as (O, P, C) with O > 1
        t = rand(lead[0], lead[1] + 3, *lead[2:], C)[:, 2 : 2 + lead[1]]
    elif layout == "slice":  # every dim sliced: no (O, P) view, the launcher copies
        t = rand(*[n + 1 for n in lead], C + 5)[(*[slice(1, None)] * len(lead), slice(3, 3 + C))]
    elif layout == "channel_strided":  # channel stride = #rows, rows contiguous
        t = rand(C, *lead).movedim(0, -1)
    elif layout == "permuted":  # the two middle dims swapped in memory
        t = rand(lead[0], lead[2], lead[1], C).transpose(1, 2)
    else:
        raise ValueError(layout)
    assert t.shape == shape and (layout == "contiguous") == t.is_contiguous(), layout
    return t


def affine(C: int, dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-trivial weight and bias (as the model: in the model's dtype)."""
    g = torch.Generator().manual_seed(seed)
    w = 1.0 + 0.5 * torch.randn(C, generator=g)
    b = 0.5 * torch.randn(C, generator=g)
    return w.to(DEVICE, dtype), b.to(DEVICE, dtype)


# ---------------------------------------------------------------- last-dim LayerNorm

# (id, shape, layout); kept tiny: the interpreter is slow.
LN_CASES = [
    ("b1_c16", (1, 9, 16), "contiguous"),
    ("b3_c48_slice", (3, 4, 5, 48), "slice"),
    ("b2_c80_channel_strided", (2, 11, 80), "channel_strided"),
    ("b2_c256_row_slice", (2, 5, 256), "row_slice"),
    ("b2_c48_permuted", (2, 3, 4, 48), "permuted"),
    ("b1_c768", (1, 3, 768), "contiguous"),
    ("vector_c48", (48,), "contiguous"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", LN_CASES, ids=lambda c: c[0])
def test_layer_norm(case, dtype):
    _, shape, layout = case
    x = make(shape, dtype, layout, seed=LN_CASES.index(case))
    w, b = affine(shape[-1], dtype)
    x_before = x.clone()
    y = layer_norm(x, w, b, 1e-6)
    assert y.dtype == dtype and y.is_contiguous()
    assert y.data_ptr() != x.data_ptr()
    assert torch.equal(x, x_before), "input modified"
    ref32 = layer_norm_reference(x.float(), w.float(), b.float(), 1e-6)
    check("layer_norm", y, ref32, layer_norm_reference(x, w, b, 1e-6), LN_TOL)


@pytest.mark.parametrize("out_dtype", DTYPES, ids=dtype_id)
def test_layer_norm_fp32_in_out_dtype(out_dtype):
    """An fp32 residual stream normalised straight into a half-precision layer's input."""
    x = make((2, 7, 80), torch.float32, "row_slice", seed=3)
    w, b = affine(80, torch.float32)
    y = layer_norm(x, w, b, 1e-5, out_dtype)
    assert y.dtype == out_dtype
    ref32 = layer_norm_reference(x, w, b, 1e-5)
    check("layer_norm", y, ref32, layer_norm_reference(x, w, b, 1e-5, out_dtype), LN_TOL)


# ---------------------------------------------------------------- residual add + LayerNorm

# (id, shape, x layout, delta layout)
ADD_CASES = [
    ("b1_c16", (1, 9, 16), "contiguous", "contiguous"),
    ("b2_c48_mixed_layouts", (2, 5, 48), "row_slice", "channel_strided"),
    ("b3_c80_slice", (3, 2, 3, 80), "slice", "permuted"),
]


def check_add(x, delta, w, b, eps, out_dtype=None) -> None:
    s, y = add_layer_norm(x, delta, w, b, eps, out_dtype)
    assert s.dtype == x.dtype and y.dtype == (out_dtype or x.dtype)
    assert s.data_ptr() not in (x.data_ptr(), delta.data_ptr(), y.data_ptr())
    s_same, y_same = add_layer_norm_reference(x, delta, w, b, eps, out_dtype)
    # The sum: fp32 add then one round-to-nearest-even to x.dtype, exactly as the reference.
    assert torch.equal(s, s_same)
    s32, y32 = add_layer_norm_reference(x.float(), delta.float(), w.float(), b.float(), eps)
    check("add_layer_norm.s", s, s32, s_same, ADD_LN_TOL)
    check("add_layer_norm", y, y32, y_same, ADD_LN_TOL)
    # y is the norm of s as stored (not of the unrounded sum).
    atol, rtol = LN_TOL[y.dtype]
    y_from_s = layer_norm_reference(s, w, b, eps, y.dtype)
    torch.testing.assert_close(y, y_from_s, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", ADD_CASES, ids=lambda c: c[0])
def test_add_layer_norm(case, dtype):
    _, shape, x_layout, d_layout = case
    i = ADD_CASES.index(case)
    x = make(shape, dtype, x_layout, seed=10 + i)
    delta = make(shape, dtype, d_layout, seed=20 + i)
    w, b = affine(shape[-1], dtype, seed=i)
    check_add(x, delta, w, b, 1e-6)


def test_add_layer_norm_mixed_dtypes():
    """fp32 residual stream + bf16 block output, normalised into fp16."""
    x = make((2, 6, 48), torch.float32, "row_slice", seed=5)
    delta = make((2, 6, 48), torch.bfloat16, "channel_strided", seed=6)
    w, b = affine(48, torch.bfloat16)
    check_add(x, delta, w, b, 1e-6, torch.float16)


def test_add_layer_norm_rounds_the_sum_before_normalising():
    """bf16 sum: y must come from the rounded s, which differs from normalising the fp32 sum."""
    x = make((1, 4, 16), torch.bfloat16, seed=7)
    delta = (make((1, 4, 16), torch.float32, seed=8) * 1e-2).to(torch.bfloat16)
    w, b = affine(16, torch.float32)
    s, y = add_layer_norm(x, delta, w, b, 1e-6, torch.float32)
    from_s = layer_norm_reference(s, w, b, 1e-6, torch.float32)
    unrounded = layer_norm_reference(x.float() + delta.float(), w, b, 1e-6)
    assert (unrounded - from_s).abs().max() > 1e-4
    torch.testing.assert_close(y, from_s, atol=2e-6, rtol=1e-6)


# ---------------------------------------------------------------- LayerNorm2d (+ GELU)


def make_2d(B: int, C: int, H: int, W: int, dtype: torch.dtype, layout: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def rand(*size: int) -> torch.Tensor:  # scaled BEFORE slicing: arithmetic makes it dense
        return (1.5 * torch.randn(*size, generator=g) - 0.2).to(device=DEVICE, dtype=dtype)

    if layout == "nchw":
        return rand(B, C, H, W)
    if layout == "channels_last":
        return rand(B, C, H, W).to(memory_format=torch.channels_last)
    if layout == "slice":  # not dense: the output falls back to NCHW
        t = rand(B, C + 2, H + 1, W + 2)[:, 1 : C + 1, 1:, 2:]
        assert t.stride()[1:] == ((H + 1) * (W + 2), W + 2, 1)
        return t
    if layout == "hcw":  # dense, but H and W do not merge: NCHW output
        return rand(B, H, C, W).permute(0, 2, 1, 3)
    raise ValueError(layout)


# (id, B, C, H, W, layout, activation)
LN2D_CASES = [
    ("b1_c16_nchw", 1, 16, 5, 7, "nchw", "none"),
    ("b2_c48_cl_gelu", 2, 48, 4, 6, "channels_last", "gelu"),
    ("b3_c80_nchw_gelu", 3, 80, 3, 5, "nchw", "gelu"),
    ("b2_c256_cl", 2, 256, 3, 3, "channels_last", "none"),
    ("b2_c32_slice_gelu", 2, 32, 4, 5, "slice", "gelu"),
    ("b1_c16_hcw", 1, 16, 3, 6, "hcw", "none"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", LN2D_CASES, ids=lambda c: c[0])
def test_layer_norm_2d(case, dtype):
    _, B, C, H, W, layout, act = case
    x = make_2d(B, C, H, W, dtype, layout, seed=LN2D_CASES.index(case))
    w, b = affine(C, dtype, seed=2)
    y = layer_norm_2d(x, w, b, 1e-6, act)
    assert y.dtype == dtype and y.shape == x.shape and y.data_ptr() != x.data_ptr()
    if layout in ("nchw", "channels_last"):
        assert y.stride() == x.stride(), "memory format not kept"
    else:
        assert y.is_contiguous()
    ref32 = layer_norm_2d_reference(x.float(), w.float(), b.float(), 1e-6, act)
    check("layer_norm_2d", y, ref32, layer_norm_2d_reference(x, w, b, 1e-6, act), LN2D_TOL)


def test_gelu_is_exact_erf():
    """Catch a tanh-approximation GELU: the two differ by ~1e-4 near |x| ~ 2."""
    x = make_2d(1, 16, 4, 4, torch.float32, "nchw", seed=9) * 2
    w, b = affine(16, torch.float32)
    y = layer_norm_2d(x, w, b, 1e-6, "gelu")
    pre = layer_norm_2d_reference(x, w, b, 1e-6)
    tanh = torch.nn.functional.gelu(pre, approximate="tanh")
    assert (tanh - layer_norm_2d_reference(x, w, b, 1e-6, "gelu")).abs().max() > 1e-4
    torch.testing.assert_close(y, torch.nn.functional.gelu(pre), atol=2e-6, rtol=1e-6)


# ---------------------------------------------------------------- numerics and edge cases


def test_large_magnitude_fp32_to_fp16():
    """|x| ~ 1e5: squares would overflow fp16 (and an fp16 sum of x too); fp32 statistics give
    finite fp16 outputs equal to the reference."""
    g = torch.Generator().manual_seed(11)
    x = (1e5 * torch.randn(2, 5, 80, generator=g) + 3e4).to(DEVICE)
    delta = (1e5 * torch.randn(2, 5, 80, generator=g)).to(DEVICE)
    w, b = affine(80, torch.float32)
    y = layer_norm(x, w, b, 1e-6, torch.float16)
    ref32 = layer_norm_reference(x, w, b, 1e-6)
    check("layer_norm", y, ref32, layer_norm_reference(x, w, b, 1e-6, torch.float16), LN_TOL)
    check_add(x, delta, w, b, 1e-6, torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_large_magnitude_half_inputs(dtype):
    """Half inputs near the fp16 range: sum of squares ~1e10 only fits fp32."""
    x = make_2d(2, 48, 3, 4, torch.float32, "channels_last", seed=12)
    x = (2e4 * x).clamp(-6e4, 6e4).to(dtype)
    w, b = affine(48, dtype)
    y = layer_norm_2d(x, w, b, 1e-6, "gelu")
    ref32 = layer_norm_2d_reference(x.float(), w.float(), b.float(), 1e-6, "gelu")
    check("layer_norm_2d", y, ref32, layer_norm_2d_reference(x, w, b, 1e-6, "gelu"), LN2D_TOL)
    x2 = x.permute(0, 2, 3, 1)  # (B, H, W, C), channels contiguous
    y2 = layer_norm(x2, w, b, 1e-6)
    ref2 = layer_norm_reference(x2.float(), w.float(), b.float(), 1e-6)
    check("layer_norm", y2, ref2, layer_norm_reference(x2, w, b, 1e-6), LN_TOL)


def test_constant_rows_and_eps():
    """Zero variance gives exactly the bias; a large eps is really added to the variance."""
    x = torch.full((3, 48), 7.25, device=DEVICE)
    w, b = affine(48, torch.float32)
    torch.testing.assert_close(layer_norm(x, w, b, 1e-6), b.expand(3, 48), atol=0, rtol=0)
    x = make((4, 48), torch.float32, seed=13)
    y = layer_norm(x, w, b, 0.5)
    torch.testing.assert_close(y, layer_norm_reference(x, w, b, 0.5), atol=2e-6, rtol=1e-6)
    assert (y - layer_norm_reference(x, w, b, 1e-6)).abs().max() > 1e-2
    x4 = make_2d(1, 16, 2, 3, torch.float32, "nchw", seed=14)
    y4 = layer_norm_2d(x4, w[:16], b[:16], 0.5)
    torch.testing.assert_close(y4, layer_norm_2d_reference(x4, w[:16], b[:16], 0.5))


def test_empty_inputs():
    w, b = affine(16, torch.float32)
    for shape in [(0, 16), (2, 0, 16)]:
        x = torch.empty(shape, device=DEVICE)
        y = layer_norm(x, w, b, 1e-6, torch.float16)
        assert y.shape == shape and y.dtype == torch.float16
        s, y = add_layer_norm(x, x, w, b, 1e-6)
        assert s.shape == y.shape == shape
    for shape in [(0, 16, 4, 4), (2, 16, 0, 3)]:
        x = torch.empty(shape, device=DEVICE)
        assert layer_norm_2d(x, w, b, 1e-6, "gelu").shape == shape


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_input_validation(impl):
    ln, add_ln, ln2d = (
        (layer_norm, add_layer_norm, layer_norm_2d)
        if impl == "kernel"
        else (layer_norm_reference, add_layer_norm_reference, layer_norm_2d_reference)
    )
    x = make((2, 3, 16), torch.float32)
    x4 = make_2d(1, 16, 2, 2, torch.float32, "nchw")
    w, b = affine(16, torch.float32)
    with pytest.raises(ValueError, match=r"weight must be \(16,\) for 16 channels, got \(17,\)"):
        ln(x, torch.ones(17), b, 1e-6)
    with pytest.raises(ValueError, match=r"bias must be \(16,\)"):
        ln2d(x4, w, torch.zeros(4, 4), 1e-6)
    with pytest.raises(ValueError, match=r"weight must be \(16,\).*got NoneType"):
        ln(x, None, b, 1e-6)
    with pytest.raises(ValueError, match="x dtype torch.int32 is not one of float32"):
        ln(x.to(torch.int32), w, b, 1e-6)
    with pytest.raises(ValueError, match="x dtype torch.float64"):
        ln2d(x4.double(), w, b, 1e-6)
    with pytest.raises(ValueError, match="out_dtype dtype torch.int8"):
        ln(x, w, b, 1e-6, torch.int8)
    with pytest.raises(ValueError, match="weight dtype torch.int64 is not floating point"):
        ln(x, torch.ones(16, dtype=torch.long), b, 1e-6)
    with pytest.raises(
        ValueError, match=r"activation must be one of \('none', 'gelu'\), got 'relu'"
    ):
        ln2d(x4, w, b, 1e-6, "relu")
    with pytest.raises(ValueError, match=r"x must be \(B, C, H, W\), got shape \(2, 3, 16\)"):
        ln2d(x, w, b, 1e-6)
    with pytest.raises(ValueError, match=r"delta shape \(2, 3, 8\) != x shape \(2, 3, 16\)"):
        add_ln(x, x[..., :8], w, b, 1e-6)
    with pytest.raises(ValueError, match="delta dtype torch.int32"):
        add_ln(x, x.to(torch.int32), w, b, 1e-6)
    with pytest.raises(ValueError, match="0-d tensor"):
        ln(torch.tensor(1.0), w[:1], b[:1], 1e-6)


def test_importing_the_op_does_not_import_triton():
    code = (
        "import sys, samhq_fast.ops.layer_norm as ln\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root)


def test_report_max_errors():
    """Runs last (file order): prints the max errors seen (pytest -s) and checks some ran."""
    for (op, dtype), err in sorted(MAX_ERR.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        print(f"[{op}] {dtype_id(dtype)}: max |kernel - fp32 reference| = {err:.3g}")
    if not any(k[0] == "layer_norm" for k in MAX_ERR):
        pytest.skip("run with the other tests of this file to get the error report")


# ---------------------------------------------------------------- real sizes (CUDA only)

LN_GPU_SHAPES = [(8, 64, 64, 768), (8, 64, 64, 1280), (1, 64, 64, 1024)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", LN_GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layer_norm_gpu(shape, dtype):
    x = make(shape, dtype, seed=1)
    w, b = affine(shape[-1], dtype)
    ref32 = layer_norm_reference(x.float(), w.float(), b.float(), 1e-6)
    check(
        "layer_norm", layer_norm(x, w, b, 1e-6), ref32, layer_norm_reference(x, w, b, 1e-6), LN_TOL
    )


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("shape", LN_GPU_SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_add_layer_norm_gpu(shape, out_dtype):
    """The ViT block: fp32 residual stream, half-precision block output and next-layer input."""
    x = make(shape, torch.float32, seed=2)
    delta = make(shape, out_dtype, seed=3)
    w, b = affine(shape[-1], out_dtype)
    check_add(x, delta, w, b, 1e-6, out_dtype)


LN2D_GPU_CASES = [
    ("neck_8x256x64x64_cl", (8, 256, 64, 64), "channels_last", "none", DTYPES),
    ("neck_8x256x64x64_nchw", (8, 256, 64, 64), "nchw", "gelu", DTYPES),
    ("upscale_64x64x256x256_nchw", (64, 64, 256, 256), "nchw", "gelu", [torch.bfloat16]),
    ("hq_4x32x256x256_cl", (4, 32, 256, 256), "channels_last", "gelu", [torch.float16]),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", LN2D_GPU_CASES, ids=lambda c: c[0])
def test_layer_norm_2d_gpu(case):
    _, (B, C, H, W), layout, act, dtypes = case
    for dtype in dtypes:
        x = make_2d(B, C, H, W, dtype, layout, seed=4)
        w, b = affine(C, dtype)
        y = layer_norm_2d(x, w, b, 1e-6, act)
        assert y.stride() == x.stride()
        ref32 = layer_norm_2d_reference(x.float(), w.float(), b.float(), 1e-6, act)
        same = layer_norm_2d_reference(x, w, b, 1e-6, act)
        check("layer_norm_2d", y, ref32, same, LN2D_TOL)
        del x, y, ref32, same
        torch.cuda.empty_cache()
