"""The ViT encoder's precision rules: the residual stream's dtype per weight dtype, and the neck's
first 1x1 conv in the weights' dtype (fp16: scaled into range, so a stream past 65504 is fine)."""

from __future__ import annotations

import pytest
import torch

from samhq_fast.modeling.image_encoder import residual_stream
from samhq_fast.modeling.sam_hq import SamHQModel, run_image_encoder
from samhq_fast.ops.fused import build

from _weights import perturb_, small_config


def _encoder(dtype: torch.dtype):
    torch.manual_seed(0)
    model = SamHQModel(small_config(128, hidden=64, depth=2, window=3, global_idx=(1,))).eval()
    perturb_(model, seed=0)
    return model.requires_grad_(False).to(dtype).image_encoder


@pytest.mark.parametrize(
    ("weights", "stream"),
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
     (torch.float16, torch.float32)],
)  # fmt: skip
@torch.no_grad()
def test_residual_stream_dtype(weights, stream):
    """bf16 has fp32's exponent range: its stream follows the weights; fp16's stays fp32."""
    assert residual_stream(torch.ones(2, dtype=torch.bfloat16), weights).dtype == stream
    enc = _encoder(weights)
    for backend in ("reference", "torch"):
        enc.set_fused(None if backend == "reference" else build(backend))
        emb, interm, _, _ = run_image_encoder(enc, torch.randn(1, 3, 128, 128))
        assert interm[0].dtype == stream, backend
        assert emb.dtype == weights and torch.isfinite(emb).all()


@pytest.mark.parametrize("backend", ["reference", "torch"])
@torch.no_grad()
def test_fp16_neck_takes_a_stream_past_fp16_range(backend):
    """A stream at 1e5 (> 65504) through the fused neck in fp16 (power-of-two scale, exact)
    matches the fp32 neck to fp16 rounding; the unscaled cast would give inf."""
    enc32, enc16 = _encoder(torch.float32), _encoder(torch.float16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 8, 64, generator=g) * 3e4
    x[..., :4] += 1e5
    assert not torch.isfinite(x.half()).all()  # what the scale guards against
    ops = build(backend)
    want = enc32._neck_fused(x, build("reference"))
    got = enc16._neck_fused(x, ops)
    assert torch.isfinite(got).all()
    err = (got.float() - want).abs().max().item()
    assert err < 0.05, err
    # ... as close as the fp32-input neck of the same fp16 weights (the module path).
    base = (enc16._neck(x).float() - want).abs().max().item()
    assert err <= 2 * base + 1e-2, (err, base)
