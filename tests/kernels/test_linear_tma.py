"""Persistent TMA GEMM (sm_90+) vs the fp32 reference, and when it refuses a call.

Without CUDA the kernel runs in the Triton interpreter (tensor descriptors included) at small
shapes with a fixed 32 x 32 x 32 tile; ``num_sms=2`` makes each program walk several tiles.
The tolerance table is the tiled linear kernel's (tests/kernels/test_linear.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import triton  # noqa: E402

from samhq_fast.kernels.linear_tma import (  # noqa: E402
    linear_reference,
    linear_tma,
    tma_unsupported_reasons,
)

REPO = str(Path(__file__).resolve().parents[2])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HALF = [torch.float16, torch.bfloat16]
# max |kernel - fp32 reference| <= atol * scale + rtol * |reference|, keyed by output dtype.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
}
LOWP_FACTOR = 2.0  # kernel error <= 2 x plain PyTorch's in the input dtype + eps * scale
LOWP_EPS = {torch.float16: 1e-4, torch.bfloat16: 1e-3}
# (activation, residual, bias, out_dtype): residual None, "same" (x's dtype) or "fp32".
EPILOGUES = [
    ("none", None, False, None),
    ("none", None, True, None),  # qkv
    ("gelu", None, True, None),  # lin1
    ("relu", None, True, None),
    ("none", "fp32", True, None),  # proj / lin2 with the fp32 residual stream
    ("gelu", "same", False, None),
    ("none", None, True, torch.float32),
]


def _name(d: torch.dtype | None) -> str:
    return str(d).removeprefix("torch.")


def _inputs(lead, K, N, dtype, bias, res, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g).to(DEVICE, dtype)
    w = (torch.randn(N, K, generator=g) * K**-0.5).to(DEVICE, dtype)
    b = (0.5 * torch.randn(2 * N, generator=g))[::2].to(DEVICE, dtype) if bias else None
    r = None
    if res is not None:  # strided: the kernel reads the residual through its strides
        r = (2 * torch.randn(*lead, N + 3, generator=g))[..., :N]
        r = r.to(DEVICE, dtype if res == "same" else torch.float32)
    return x, w, b, r


def _plain_torch(x, w, b, act, r, out_dtype):
    y = F.linear(x, w, b).float()
    y = F.gelu(y) if act == "gelu" else F.relu(y) if act == "relu" else y
    return (y + r.float() if r is not None else y).to(out_dtype)


def _check(x, w, b, act, r, out_dtype=None, **kw) -> None:
    N, K = w.shape
    x2 = x.reshape(-1, K)
    r2 = r.reshape(-1, N) if r is not None else None
    out = linear_tma(x2, w, b, act, r2, out_dtype, **kw)
    want = out_dtype or (r.dtype if r is not None else x.dtype)
    assert out.dtype == want and out.shape == (x2.shape[0], N)
    f = lambda t: None if t is None else t.float()  # noqa: E731
    ref = linear_reference(x2.float(), w.float(), f(b), act, f(r2))
    scale = ref.abs().max().item() or 1.0
    atol, rtol = TOLERANCES[want]
    torch.testing.assert_close(out.float(), ref, atol=atol * scale, rtol=rtol)
    err = (out.float() - ref).abs().max().item()
    plain = _plain_torch(x2, w, b, act, r2, want)
    bound = LOWP_FACTOR * (plain.float() - ref).abs().max().item() + LOWP_EPS[x.dtype] * scale
    assert err <= bound, f"kernel error {err:.3g} > 2 x PyTorch {x.dtype} error"


@pytest.mark.parametrize("dtype", HALF, ids=_name)
@pytest.mark.parametrize(
    "epilogue", EPILOGUES, ids=lambda e: f"{e[0]}-res_{e[1]}-bias_{e[2]}-{_name(e[3])}"
)
def test_matches_reference(epilogue, dtype):
    # M = 70, N = 40, K = 72: tails in all three (32-wide CPU tile); 3 x 2 tiles over 2 programs.
    act, res, bias, out_dtype = epilogue
    x, w, b, r = _inputs((70,), 72, 40, dtype, bias, res, seed=EPILOGUES.index(epilogue))
    _check(x, w, b, act, r, out_dtype, num_sms=2)


@pytest.mark.parametrize("dtype", HALF, ids=_name)
def test_batch_dims_flattened_and_strided_rows(dtype):
    # (2, 5, 7, K) flattened to 70 rows; x rows strided (a slice, row stride still 16 B aligned).
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 7, 72, generator=g).to(DEVICE, dtype)[..., :40]
    _, w, b, r = _inputs((2, 5, 7), 40, 24, dtype, True, "fp32", seed=3)
    assert x.reshape(-1, 40).stride(0) == 72  # a view, not a copy
    _check(x, w, b, "gelu", r, num_sms=3)


def test_one_program_walks_every_tile_forced_config():
    x, w, b, r = _inputs((50,), 48, 56, torch.bfloat16, True, "same", seed=5)
    cfg = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=4)
    _check(x, w, b, "relu", r, num_sms=1, config=cfg)  # 4 x 4 tiles, one program


def test_reasons_accept_aligned_half_inputs():
    x = torch.empty(64, 128, dtype=torch.bfloat16)
    w = torch.empty(96, 128, dtype=torch.bfloat16)
    r = torch.empty(64, 200, dtype=torch.float32)[:, :96]  # residual: any strides
    assert tma_unsupported_reasons(x, w, r, torch.float32, (9, 0)) == []
    assert tma_unsupported_reasons(x, w, None, torch.bfloat16, (10, 0)) == []
    # Meta (AOT recording) counts as sm_90 whatever capability is passed.
    xm, wm = x.to("meta"), w.to("meta")
    assert tma_unsupported_reasons(xm, wm, None, torch.bfloat16, (8, 0)) == []


def test_reasons_refuse():
    def reasons(x, w, out_dtype=torch.bfloat16, cap=(9, 0)):
        return " ".join(tma_unsupported_reasons(x, w, None, out_dtype, cap))

    x = torch.empty(64, 128, dtype=torch.bfloat16)
    w = torch.empty(96, 128, dtype=torch.bfloat16)
    assert "float32" in reasons(x.float(), w.float())
    assert "differs" in reasons(x, w.half())
    assert "capability (8, 0)" in reasons(x, w, cap=(8, 0))
    assert "row stride" in reasons(torch.empty(64, 133, dtype=torch.bfloat16)[:, :128], w)
    assert "last stride" in reasons(x, torch.empty(128, 96, dtype=torch.bfloat16).T)
    shifted = torch.empty(64 * 128 + 1, dtype=torch.bfloat16)[1:].view(64, 128)  # base + 2 B
    assert "base pointer" in reasons(shifted, w)
    assert "2-D" in reasons(x.view(8, 8, 128), w)
    n_odd = torch.empty(92, 128, dtype=torch.bfloat16)  # output row 92 x 2 B = 184 B
    assert "output row" in reasons(x, n_odd) and reasons(x, n_odd, torch.float32) == ""


def test_launcher_raises_with_the_reasons():
    x = torch.randn(16, 24, device=DEVICE)
    w = torch.randn(32, 24, device=DEVICE)
    with pytest.raises(ValueError, match="linear_tma cannot run.*float32"):
        linear_tma(x, w, None, "none", None, None)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 2304, 768), (4096, 768, 3072)], ids=str)
def test_vit_shapes_gpu(shape):
    M, N, K = shape
    if tma_unsupported_reasons(
        torch.empty(1, 8, device=DEVICE, dtype=torch.bfloat16),
        torch.empty(8, 8, device=DEVICE, dtype=torch.bfloat16),
        None,
        torch.bfloat16,
    ):
        pytest.skip("needs sm_90+")
    x, w, b, r = _inputs((M,), K, N, torch.bfloat16, True, "fp32" if N == 768 else None)
    _check(x, w, b, "none" if N == 768 else "gelu", r)


_AOT_SCRIPT = """
import json, os, sys, tempfile
import torch
from samhq_fast.kernels import aot, linear_tma as lt
sink = []
with aot.recording(sink, ["lin2"]):
    m = lambda *s, dtype=torch.bfloat16: torch.empty(*s, device="meta", dtype=dtype)
    lt.linear_tma(m(4096, 3072), m(768, 3072), m(768), "gelu", m(4096, 768, dtype=torch.float32),
                  None)
cases = aot.expand(sink, [90, 80])
with tempfile.TemporaryDirectory() as cache:
    os.environ["TRITON_CACHE_DIR"] = cache
    rows = [aot.compile_case(c) | {"signature": c.signature} for c in cases]
print(json.dumps([dict(r, problems=aot.check_row(r)) for r in rows], default=str))
"""


@pytest.mark.aot
def test_aot_compiles_for_sm90_only():
    # The AOT tier needs the interpreter off: a subprocess. bias + GELU + fp32 residual, fp32 out.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.splitlines()[-1])
    assert {r["arch"] for r in rows} == {"sm_90"}  # MIN_ARCH: no sm_80 compile
    assert {r["config"] for r in rows} == {"m128 n128 k64 w8 s3", "m128 n64 k64 w4 s4"}
    for r in rows:
        assert r["problems"] == [] and r["wgmma"] > 0 and r["spill_bytes"] == 0, r
        bm, bn = (int(v) for v in re.findall(r"[mn](\d+)", r["config"])[:2])
        assert r["signature"]["out_desc"] == f"tensordesc<fp32[{bm}, {bn}]>"  # the pre_hook's
        assert r["signature"]["w_desc"] == f"tensordesc<bf16[{bn}, 64]>"
