"""The cuBLAS candidate (torch GEMM + the fused epilogue pass) vs the fp32 reference.

Error model: cuBLAS rounds its product to the input dtype before the epilogue, so the bound is
the linear test's: at most ~2x plain PyTorch's error in the same dtype.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from samhq_fast.kernels.linear_epilogue import (  # noqa: E402
    linear_cublas,
    linear_epilogue,
    linear_epilogue_reference,
)
from samhq_fast.ops.linear import linear_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPILOGUES = [
    ("none", None, True),
    ("gelu", None, True),
    ("none", "fp32", True),
    ("relu", "same", False),
    ("gelu", "fp32", False),
    ("none", "same", False),
    ("none", None, False),
]


def _inputs(M, K, N, dtype, bias, res, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(DEVICE, dtype)
    w = (torch.randn(N, K, generator=g) * K**-0.5).to(DEVICE, dtype)
    b = (0.5 * torch.randn(2 * N, generator=g))[::2].to(DEVICE, dtype) if bias else None
    r = None
    if res is not None:
        r = (2 * torch.randn(M, N + 3, generator=g))[:, :N]  # strided residual
        r = r.to(DEVICE, dtype if res == "same" else torch.float32)
    return x, w, b, r


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=str)
def test_cublas_candidate_matches_reference(epilogue, dtype):
    act, res, bias = epilogue
    x, w, b, r = _inputs(37, 48, 40, dtype, bias, res)
    out_dtype = r.dtype if r is not None else dtype
    out = linear_cublas(x, w, b, act, r, out_dtype)
    f = lambda t: None if t is None else t.float()  # noqa: E731
    ref = linear_reference(x.float(), w.float(), f(b), act, f(r))
    assert out.dtype == out_dtype and out.shape == (37, 40)
    scale = ref.abs().max().item()
    err = (out.float() - ref).abs().max().item()
    if dtype == torch.float32:
        assert err <= 1e-5 * scale
    else:
        y = torch.nn.functional.linear(x, w, b).float()
        y = torch.nn.functional.gelu(y) if act == "gelu" else y.relu() if act == "relu" else y
        plain = (y + (r.float() if r is not None else 0)).to(out_dtype)
        torch_err = (plain.float() - ref).abs().max().item()
        assert err <= 2 * torch_err + {torch.float16: 1e-4, torch.bfloat16: 1e-3}[dtype] * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_epilogue_kernel_alone(dtype):
    g = torch.Generator().manual_seed(1)
    y = torch.randn(70, 96, generator=g).to(DEVICE, dtype)
    b = torch.randn(96, generator=g).to(DEVICE, dtype)
    r = torch.randn(96, 70, generator=g).to(DEVICE).T  # column-major residual
    out = linear_epilogue(y, b, "gelu", r, dtype)
    ref = linear_epilogue_reference(y, b, "gelu", r, dtype)
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_epilogue_rejects_strided_columns():
    with pytest.raises(ValueError, match="unit column stride"):
        linear_epilogue(torch.randn(8, 4).T, None, "none", None, torch.float32)
