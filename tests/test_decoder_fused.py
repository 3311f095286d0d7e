"""The fused decoder's derived weights (merged projections, batched token heads): exact against
the per-module path, built once, and never stale after a weight change."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from samhq_fast.config import PRESETS
from samhq_fast.modeling.mask_decoder import MaskDecoderHQ
from samhq_fast.modeling.sam_hq import SamHQModel
from samhq_fast.modeling.transformer import DerivedWeights
from samhq_fast.ops.fused import build

from _compare import assert_iou_close, assert_logits_close
from _weights import perturb_, small_config

CFG = small_config(128, hidden=64, depth=2, heads=2, window=3, global_idx=(1,))
# Batched token heads vs the per-MLP path, against the fp32 per-MLP oracle:
# max |err| <= atol + rtol * max |oracle|, and in half precision at most LOWP_FACTOR x the
# per-MLP path's own error in that dtype (+ eps).
HEAD_TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (0.1, 0.05),
                   torch.float16: (0.02, 0.01)}  # fmt: skip
LOWP_FACTOR = 2.0


def _model(seed: int = 1) -> SamHQModel:
    torch.manual_seed(seed)
    return perturb_(SamHQModel(CFG).eval(), seed=seed).requires_grad_(False)


def _decoder_inputs(model: SamHQModel, P: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = 128 // 16
    emb = torch.randn(2, 256, h, h, generator=g)
    hq = torch.randn(2, 32, 4 * h, 4 * h, generator=g)
    sparse = torch.randn(2, P, 3, 256, generator=g)
    dense = torch.randn(2, 256, h, h, generator=g)
    return emb, model.get_image_wide_positional_embeddings(), sparse, dense, hq


def _per_mlp_heads(dec: MaskDecoderHQ, hs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mlps = [*dec.output_hypernetworks_mlps, dec.hf_mlp]
    hyper = torch.stack([m(hs[:, 1 + i]) for i, m in enumerate(mlps)], dim=1)
    return hyper, dec.iou_prediction_head(hs[:, 0])


@pytest.mark.parametrize("dtype", list(HEAD_TOLERANCES), ids=str)
@torch.no_grad()
def test_batched_heads_match_per_mlp(dtype):
    dec = _model().mask_decoder
    _, shared = dec._head_mlps()
    assert shared == 2  # the IoU head joins the hypernetworks for its first two layers
    hs = torch.randn(7, 10, 256, generator=torch.Generator().manual_seed(2))
    ref_h, ref_i = _per_mlp_heads(dec, hs)
    dec = dec.to(dtype)
    got_h, got_i = dec._heads_batched(hs.to(dtype))
    plain_h, plain_i = _per_mlp_heads(dec, hs.to(dtype))
    atol, rtol = HEAD_TOLERANCES[dtype]
    for got, plain, ref, what in ((got_h, plain_h, ref_h, "hyper"), (got_i, plain_i, ref_i, "iou")):
        assert got.shape == ref.shape and got.dtype == dtype
        err = (got.float() - ref).abs().max().item()
        plain_err = (plain.float() - ref).abs().max().item()
        print(f"[heads] {dtype} {what}: batched {err:.3g}, per-MLP {plain_err:.3g}")
        assert err <= atol + rtol * ref.abs().max().item()
        if dtype != torch.float32:
            assert err <= LOWP_FACTOR * plain_err + 1e-3


@torch.no_grad()
def test_merged_projections_read_one_gemm_output():
    """Self-attention q/k (block 0: q/k/v) and the image side's t2i keys / i2t queries are
    column slices of one GEMM output, read in place; the result is the per-module decoder's."""
    model = _model()
    dec = model.mask_decoder
    args = _decoder_inputs(model)
    ref = dec.predict_masks(*args)
    ops = build("reference")
    seen = []

    def spy(q, k, v, heads, q_group=1, kv_group=1):
        seen.append((q, k, v))
        return ops.decoder_attention(q, k, v, heads, q_group, kv_group)

    dec.fused = dataclasses.replace(ops, decoder_attention=spy)
    got = dec.predict_masks(*args)
    assert_logits_close(got[0], ref[0], "merged projections masks")
    assert_iou_close(got[1], ref[1], "merged projections")

    def base(t):
        return t._base if t._base is not None else t

    # per block: self, token->image, image->token; then the final token->image
    (s0, t0, i0), (s1, t1, i1) = seen[0:3], seen[3:6]
    assert base(s0[0]) is base(s0[1]) is base(s0[2])  # block 0: one qkv GEMM
    assert base(s1[0]) is base(s1[1]) and base(s1[2]) is not base(s1[0])  # q+k, then v
    for t2i, i2t in ((t0, i0), (t1, i1)):
        assert base(t2i[1]) is base(i2t[0])  # keys + key_pe, projected once for both
        assert not t2i[1].is_contiguous()  # a strided slice, not a copy


def test_derived_weights_are_built_once_and_refreshed_in_place():
    d = DerivedWeights()
    a, b = torch.randn(3, 4), torch.randn(2, 4)
    w = d.get("w", [a, b], torch.cat)
    assert d.get("w", [a, b], torch.cat) is w  # cached
    with torch.no_grad():
        a.add_(1)  # in-place write: version bump -> rebuilt into the same memory
    w2 = d.get("w", [a, b], torch.cat)
    assert w2 is w and torch.equal(w2, torch.cat([a, b]))
    w3 = d.get("w", [a.double(), b.double()], torch.cat)  # other dtype: a new tensor
    assert w3.dtype == torch.float64 and torch.equal(w3, torch.cat([a, b]).double())


@torch.no_grad()
def test_fused_decoder_never_uses_stale_weights():
    """load_state_dict after set_backend (in-place copies), an in-place write under inference
    mode, and a dtype change: the fused decoder follows the weights each time."""
    model = _model(1)
    model.set_backend("torch")
    dec = model.mask_decoder
    args = _decoder_inputs(model)
    dec.prepare_fused()
    first = dec.predict_masks(*args)[0]
    other = _model(7)
    model.load_state_dict(other.state_dict())
    other.set_backend("torch")
    torch.testing.assert_close(
        dec.predict_masks(*args)[0], other.mask_decoder.predict_masks(*args)[0]
    )
    assert not torch.allclose(first, other.mask_decoder.predict_masks(*args)[0])
    with torch.inference_mode():
        for m in (model, other):
            sa = m.mask_decoder.transformer.layers[1].self_attn
            sa.k_proj.weight.mul_(1.5)
            m.mask_decoder.hf_mlp.layers[0].bias.add_(0.3)
        torch.testing.assert_close(
            dec.predict_masks(*args)[0], other.mask_decoder.predict_masks(*args)[0]
        )
    ref = SamHQModel(CFG).eval()
    ref.load_state_dict(model.state_dict())  # reference backend: the per-module oracle
    assert_logits_close(dec.predict_masks(*args)[0], ref.mask_decoder.predict_masks(*args)[0],
                        "fused decoder after weight changes")  # fmt: skip
    model.to(torch.bfloat16)
    half = [a.to(torch.bfloat16) for a in args]
    m = dec.predict_masks(*half)[0]
    assert m.dtype == torch.bfloat16 and torch.isfinite(m).all()
    w = dec.transformer.layers[0].fused_weights()["self"][0]
    assert w.dtype == torch.bfloat16


def test_weights_made_under_inference_mode():
    """Inference tensors have no version counter: a model built under inference_mode still
    runs the fused decoder (cached by memory) and matches the per-module decoder."""
    with torch.inference_mode():
        model = _model(2)
        ref = SamHQModel(CFG).eval()
        ref.load_state_dict(model.state_dict())
        model.set_backend("torch")
        args = _decoder_inputs(model)
        got = model.mask_decoder.predict_masks(*args)[0]
        assert_logits_close(got, ref.mask_decoder.predict_masks(*args)[0], "inference weights")


def test_real_preset_shapes_batch_the_iou_head():
    with torch.device("meta"):
        dec = MaskDecoderHQ(PRESETS["vit_b"].mask_decoder_config)
    assert dec._head_mlps()[1] == 2


@torch.no_grad()
def test_prepare_fused_builds_every_derived_weight():
    """A call after prepare_fused builds nothing: a CUDA graph replay (which runs no Python)
    reads only tensors that prepare_fused refreshes."""
    model = _model()
    model.set_backend("torch")
    dec = model.mask_decoder

    def caches():
        return {
            (name, key): id(t)
            for name, m in dec.named_modules()
            if "_derived_weights" in m.__dict__
            for key, (_, t) in m.__dict__["_derived_weights"]._cache.items()
        }

    dec.prepare_fused()
    before = caches()
    assert len(before) >= 2 * 2 * 2 + 3 * 2 + 3  # merged projections, heads, tokens, HQ conv
    dec.predict_masks(*_decoder_inputs(model))
    assert caches() == before
