"""The fast pure-PyTorch path (``backend="torch"``) against the reference (the oracle).

Small perturbed-weight stand-ins for every preset (vit_b/l: head dim 64, windowed + global
layers; vit_h: head dim 80; vit_tiny: the TinyViT encoder), fp32 within 1e-4 of the reference
and bf16 no worse than the reference in bf16; the ops one by one, the attention's bias blocks
(windows and query rows) forced small; masks of the small trained model; backend names.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import samhq_fast.ops.attention as attention_ops
from samhq_fast import load_model
from samhq_fast.config import PRESETS, SamHQConfig, SamHQPromptEncoderConfig
from samhq_fast.modeling.sam_hq import SamHQModel
from samhq_fast.ops import fast_torch as ft
from samhq_fast.ops.backend import BACKENDS, resolve_backend
from samhq_fast.ops.decoder_attention import decoder_attention_reference
from samhq_fast.ops.layer_norm import (
    add_layer_norm_reference,
    layer_norm_2d_reference,
    layer_norm_reference,
)
from samhq_fast.ops.linear import linear_reference

from _compare import assert_iou_close, assert_logits_close
from _weights import build_official, perturb_, save_official_pth, small_config

S = 128  # 8x8 token grid; window 3 pads it to 9x9


def _tiny_config(image_size: int = S) -> SamHQConfig:
    p = PRESETS["vit_tiny"]
    return SamHQConfig(
        dataclasses.replace(p.vision_config, image_size=image_size),
        SamHQPromptEncoderConfig(image_size=image_size),
        p.mask_decoder_config,
    )


VARIANTS = {
    "vit_b": small_config(S, hidden=128, depth=2, heads=2, window=3, global_idx=(1,)),
    "vit_l": small_config(S, hidden=128, depth=3, heads=2, window=3, global_idx=(0, 2)),
    "vit_h": small_config(S, hidden=160, depth=2, heads=2, window=3, global_idx=(1,)),
    "vit_tiny": _tiny_config(),
}


def _model(name: str, seed: int = 3) -> SamHQModel:
    torch.manual_seed(seed)
    model = SamHQModel(VARIANTS[name]).eval()
    perturb_(model, seed=seed)
    return model.requires_grad_(False)


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """2 images x 3 prompts of 2 points (fg + bg) and a box each."""
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(2, 3, 2, 2, generator=g) * S
    return dict(
        pixel_values=torch.randn(2, 3, S, S, generator=g),
        input_points=pts,
        input_labels=torch.tensor([1, 0]).expand(2, 3, 2),
        input_boxes=torch.cat([pts.amin(2), pts.amax(2)], -1) + torch.tensor([-9, -9, 9, 9]),
    )


def _run(model: SamHQModel, inputs: dict[str, torch.Tensor]):
    out = model(**inputs, multimask_output=False)
    return out.pred_masks.float(), out.iou_scores.float()


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a > 0, b > 0
    return ((a & b).sum() / (a | b).sum().clamp(min=1)).item()


@pytest.fixture(scope="module")
def fp32_runs():
    """Per variant: the fp32 reference model's state and outputs (computed once)."""
    cache = {}

    def get(name):
        if name not in cache:
            model = _model(name)
            assert model.backend == "reference"  # a bare model is the oracle
            cache[name] = (model.state_dict(), _run(model, _inputs()))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(VARIANTS))
@torch.no_grad()
def test_fast_fp32_matches_reference(name, fp32_runs):
    state, (masks, iou) = fp32_runs(name)
    fast = SamHQModel(VARIANTS[name]).eval()
    fast.load_state_dict(state)
    assert fast.set_backend("torch") == "torch" and fast.backend_reasons == []
    m, i = _run(fast, _inputs())
    assert_logits_close(m, masks, f"{name} torch fp32 masks")
    assert_iou_close(i, iou, f"{name} torch fp32")


@pytest.mark.parametrize("name", list(VARIANTS))
@torch.no_grad()
def test_fast_bf16_close_to_reference(name, fp32_runs):
    """bf16: logit error against the fp32 oracle at most 2x that of the reference in bf16, and
    masks that agree with the oracle's as well as the reference's bf16 masks do (random weights
    leave wide near-zero logit regions; the trained model below meets IoU 0.99 outright)."""
    state, (masks, _) = fp32_runs(name)
    errs, ious = {}, {}
    for backend in ("torch", "reference"):
        model = SamHQModel(VARIANTS[name]).eval()
        model.load_state_dict(state)
        model.to(torch.bfloat16).set_backend(backend)
        m, _ = _run(model, _inputs())
        assert torch.isfinite(m).all(), f"{backend} bf16 produced non-finite logits"
        errs[backend] = (m - masks).abs().max().item()
        ious[backend] = sum(_iou(m[b, p], masks[b, p]) for b in range(2) for p in range(3)) / 6
    print(f"[parity] {name} bf16 vs fp32: error torch {errs['torch']:.3g}, reference "
          f"{errs['reference']:.3g}; mean IoU torch {ious['torch']:.4f}, reference "
          f"{ious['reference']:.4f}")  # fmt: skip
    assert errs["torch"] <= 2 * errs["reference"] + 1e-3
    assert ious["torch"] >= min(0.99, ious["reference"] - 0.01)


# ----------------------------------------------------------------------------- ops, one by one
def _qkv(B, H, W, heads, D, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    C = heads * D
    qkv = torch.randn(B, H, W, 3 * C, generator=g)
    return qkv.to(dtype), torch.randn(3 * C, generator=g).to(dtype)


@pytest.mark.parametrize("block", [None, 300, 1])
@pytest.mark.parametrize(
    ("H", "W", "window"), [(8, 8, 3), (8, 8, 0), (6, 10, 4), (6, 10, 0), (14, 14, 14)]
)
def test_rel_pos_attention_sdpa_matches_reference(H, W, window, block, monkeypatch):
    """Every blocking of the bias (all at once; several windows / query rows per block; one
    window / one row) gives the reference's result, padded windows included."""
    if block is not None:
        monkeypatch.setattr(attention_ops, "BIAS_BLOCK", block)
    heads, D = 2, 16
    qkv, pad = _qkv(2, H, W, heads, D)
    sh, sw = (window, window) if window else (H, W)
    g = torch.Generator().manual_seed(1)
    rh, rw = torch.randn(2 * sh - 1, D, generator=g), torch.randn(2 * sw - 1, D, generator=g)
    ref = attention_ops.rel_pos_attention_reference(qkv, heads, window, rh, rw, pad)
    got = attention_ops.rel_pos_attention_sdpa(qkv, heads, window, rh, rw, pad)
    assert_logits_close(got, ref, f"sdpa attention {H}x{W} window {window} block {block}")


@torch.no_grad()
def test_rel_pos_attention_sdpa_bf16():
    qkv, pad = _qkv(1, 8, 8, 2, 32)
    rh = torch.randn(15, 32)
    ref = attention_ops.rel_pos_attention_reference(qkv, 2, 0, rh, rh, pad)
    half = [t.bfloat16() for t in (qkv, rh, pad)]
    got = attention_ops.rel_pos_attention_sdpa(half[0], 2, 0, half[1], half[1], half[2])
    plain = attention_ops.rel_pos_attention_reference(half[0], 2, 0, half[1], half[1], half[2])
    assert got.dtype == torch.bfloat16
    e_fast, e_ref = ((x.float() - ref).abs().max().item() for x in (got, plain))
    assert e_fast <= 2 * e_ref + 1e-3


def test_attention_padding_rows_are_unmasked_keys():
    """Padded positions are keys with k = v = the qkv bias: changing that bias changes the
    outputs of real tokens of padded windows (so they are not masked), exactly as the
    reference's."""
    qkv, pad = _qkv(1, 8, 8, 2, 16)
    rh = torch.randn(5, 16)
    a = attention_ops.rel_pos_attention_sdpa(qkv, 2, 3, rh, rh, pad)
    b = attention_ops.rel_pos_attention_sdpa(qkv, 2, 3, rh, rh, pad + 1)
    assert (a[:, 6:, 6:] - b[:, 6:, 6:]).abs().max() > 1e-3  # last window holds padding
    assert torch.equal(a[:, :6, :6], b[:, :6, :6])  # windows without padding do not move
    ref = attention_ops.rel_pos_attention_reference(qkv, 2, 3, rh, rh, pad + 1)
    assert_logits_close(b, ref, "padded windows")


@pytest.mark.parametrize(("q_group", "kv_group"), [(1, 1), (1, 3), (3, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoder_attention_matches_reference(q_group, kv_group, dtype):
    g = torch.Generator().manual_seed(0)
    N = 6
    q = torch.randn(N // q_group, 7, 64, generator=g).to(dtype)
    k = torch.randn(N // kv_group, 50, 64, generator=g).to(dtype)
    v = torch.randn(N // kv_group, 50, 64, generator=g).to(dtype)
    ref = decoder_attention_reference(q, k, v, 4, q_group, kv_group)
    got = ft.decoder_attention(q, k, v, 4, q_group, kv_group)
    assert got.shape == ref.shape == (N, 7, 64) and got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert_logits_close(got, ref, "decoder attention") if dtype == torch.float32 else None
    assert (got.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_ops_match_references(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 5, 48, generator=g)
    w, b = torch.randn(32, 48, generator=g) / 7, torch.randn(32, generator=g)
    res = torch.randn(2, 5, 5, 32, generator=g)  # an fp32 residual stream
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    xs, ws, bs = x.to(dtype), w.to(dtype), b.to(dtype)
    for act in ("none", "gelu", "relu"):
        for r in (None, res):
            ref = linear_reference(xs, ws, bs, act, r)
            got = ft.linear(xs, ws, bs, act, r)
            assert got.dtype == ref.dtype
            assert (got.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()
    lw, lb = 1 + torch.randn(48, generator=g) / 5, torch.randn(48, generator=g)
    for out_dtype in (None, dtype):
        ref = layer_norm_reference(x, lw, lb, 1e-6, out_dtype)
        got = ft.layer_norm(x, lw.to(dtype), lb.to(dtype), 1e-6, out_dtype)
        assert got.dtype == ref.dtype
        assert (got.float() - ref.float()).abs().max() <= tol * 10
    s_ref, y_ref = add_layer_norm_reference(x, xs, lw, lb, 1e-6, dtype)
    s, y = ft.add_layer_norm(x, xs, lw, lb, 1e-6, dtype)
    assert s.dtype == s_ref.dtype and y.dtype == y_ref.dtype == dtype
    assert (s - s_ref).abs().max() <= 1e-6 and (y.float() - y_ref.float()).abs().max() <= tol * 10
    img = x.permute(0, 3, 1, 2).to(dtype)  # (B, C, H, W), channels-last in memory
    for act in ("none", "gelu"):
        for t in (img, img.contiguous()):
            ref = layer_norm_2d_reference(t, lw, lb, 1e-6, act)
            got = ft.layer_norm_2d(t, lw, lb, 1e-6, act)
            assert got.shape == ref.shape and got.dtype == ref.dtype
            assert (got.float() - ref.float()).abs().max() <= tol * 10


def test_fast_conv_ops_match_torch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 9, 9, generator=g)
    w, b = torch.randn(4, 8, 3, 3, generator=g), torch.randn(4, generator=g)
    y = ft.conv2d(x, w, b, 1, 1)
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w, b, 1, 1))
    wt = torch.randn(8, 4, 2, 2, generator=g)
    y = ft.conv_transpose2d(x, wt, b, 2)
    torch.testing.assert_close(y, torch.nn.functional.conv_transpose2d(x, wt, b, 2))
    assert ft.conv2d(x.bfloat16(), w.bfloat16()).dtype == torch.bfloat16


# ------------------------------------------------------------------------- backend selection
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("fast") / "m.pth"
    save_official_pth(perturb_(build_official(VARIANTS["vit_b"]), seed=5), path)
    return path


@torch.no_grad()
def test_backend_names_and_reasons(ckpt, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert BACKENDS == ("auto", "reference", "torch", "triton")
    assert resolve_backend("reference", "cpu") == ("reference", [])
    assert resolve_backend("torch", "cpu") == ("torch", [])
    assert resolve_backend("torch", "mps") == ("torch", [])
    assert resolve_backend("auto", "mps")[0] == "torch"
    with pytest.raises(ValueError, match="reference"):
        resolve_backend("fast", "cpu")
    model = load_model(ckpt)  # auto on CPU: the fast PyTorch path, and it says why
    assert model.backend == "torch"
    assert any("fast PyTorch" in r and "CPU" in r for r in model.backend_reasons)
    assert model.mask_decoder.fused.backend == model.image_encoder.fused.backend == "torch"
    x = torch.randn(1, 3, S, S)
    fast = model.get_image_embeddings(x)[0]
    assert model.set_backend("reference") == "reference"
    assert model.mask_decoder.fused is None and model.image_encoder.fused is None
    ref = model.get_image_embeddings(x)[0]
    bare = SamHQModel(model.config).eval()
    bare.load_state_dict(model.state_dict())
    assert torch.equal(ref, bare.get_image_embeddings(x)[0])  # the oracle is untouched
    assert_logits_close(fast, ref, "embeddings torch vs reference")
    # attention maps need the reference attention: the fast blocks fall back for that call
    model.set_backend("torch")
    emb, _, _, attn = model.image_encoder(x, output_attentions=True)
    emb_ref, _, _, attn_ref = bare.image_encoder(x, output_attentions=True)
    assert len(attn) == len(attn_ref) == len(model.image_encoder.blocks)
    for a, b in zip(attn, attn_ref, strict=True):
        assert_logits_close(a, b, "attention maps under backend=torch")
    assert_logits_close(emb, emb_ref, "embeddings with output_attentions under torch")


def test_tiny_vit_fast_flag_follows_backend():
    model = _model("vit_tiny")
    assert not model.image_encoder.fast
    model.set_backend("torch")
    assert model.image_encoder.fast
    model.set_backend("reference")
    assert not model.image_encoder.fast


# ------------------------------------------------------------------------------ trained model
def test_trained_model_masks_identical_fp32():
    """On the small trained model (prompt-dependent masks), the fast path's fp32 masks are the
    reference's, pixel for pixel, and its scores agree to 1e-5; bf16 quality and agreement
    (IoU >= 0.99) are in tests/test_trained_model.py (``backend="torch", dtype="bf16"``)."""
    from pathlib import Path

    from samhq_fast.predictor import Predictor

    from fixtures import shapes

    pth = Path(__file__).parent / "fixtures" / "shapes_model" / "sam_hq_shapes.pth"
    ref = Predictor(model=pth, device="cpu", dtype="fp32", backend="reference")
    fast = Predictor(model=pth, device="cpu", dtype="fp32", backend="torch")
    assert fast.model.backend == "torch"
    rng = np.random.default_rng(20250101)
    for _ in range(3):
        img, truth = shapes.make_scene(rng, 256)
        pts = np.stack([shapes.interior_point(m) for m in truth])[:, None]
        outs = []
        for p in (ref, fast):
            p.set_image(img)
            outs.append(p.predict(point_coords=pts, point_labels=np.ones((len(truth), 1))))
        (m_r, s_r, l_r), (m_f, s_f, l_f) = outs
        np.testing.assert_array_equal(m_f, m_r)
        np.testing.assert_allclose(s_f, s_r, atol=1e-5)
        assert np.abs(l_f - l_r).max() <= 1e-4 * np.abs(l_r).max()


# ------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("name", list(VARIANTS))
@torch.no_grad()
def test_gpu_fast_matches_reference(name, fp32_runs):
    """The same fast path on CUDA tensors (the fallback where Triton cannot run): fp32 within
    1e-4 of the CPU oracle (TF32 off), bf16 no worse than the reference in bf16 on CUDA."""
    state, (masks, _) = fp32_runs(name)
    inputs = {k: v.cuda() for k, v in _inputs().items()}
    ious = {}
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        for backend, dtype in [("torch", torch.float32), ("torch", torch.bfloat16),
                               ("reference", torch.bfloat16)]:  # fmt: skip
            model = SamHQModel(VARIANTS[name]).eval()
            model.load_state_dict(state)
            model.to("cuda", dtype).set_backend(backend)
            assert model.backend == backend
            m, _ = _run(model, inputs)
            assert m.is_cuda and torch.isfinite(m).all()
            m = m.cpu()
            if dtype == torch.float32:
                assert_logits_close(m, masks, f"{name} torch fp32 on CUDA")
            else:
                ious[backend] = (
                    sum(_iou(m[b, p], masks[b, p]) for b in range(2) for p in range(3)) / 6
                )
    print(f"[gpu] {name} bf16 mean IoU torch {ious['torch']:.4f} ref {ious['reference']:.4f}")
    assert ious["torch"] >= min(0.99, ious["reference"] - 0.01)


def test_rel_pos_attention_sdpa_resizes_tables_as_the_reference():
    """A table of another length (a checkpoint trained at another resolution) is resized
    linearly, as in the official code."""
    qkv, pad = _qkv(1, 6, 6, 2, 16)
    rh, rw = torch.randn(7, 16), torch.randn(15, 16)
    for window in (0, 4):
        ref = attention_ops.rel_pos_attention_reference(qkv, 2, window, rh, rw, pad)
        got = attention_ops.rel_pos_attention_sdpa(qkv, 2, window, rh, rw, pad)
        assert_logits_close(got, ref, f"resized tables, window {window}")
