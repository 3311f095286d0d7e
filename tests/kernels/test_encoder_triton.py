"""Whole model with backend="triton" vs backend="torch" (Triton interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from samhq_fast import BackendUnavailableError, load_model
from samhq_fast.config import PRESETS
from samhq_fast.modeling.sam_hq import SamHQModel

from _compare import assert_logits_close
from _weights import build_official, perturb_, save_official_pth, small_config

pytest.importorskip("triton")

# hidden 128 / 2 heads: head dim 64 as in vit_b/l; 16x16 grid, window 6 (padded to 18x18).
CFG = small_config(hidden=128, depth=3, heads=2, window=6, global_idx=(1,))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("enc") / "m.pth"
    save_official_pth(perturb_(build_official(CFG), seed=5), path)
    return path


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@torch.no_grad()
def test_model_triton_matches_torch(ckpt, dtype):
    ref = load_model(ckpt, backend="torch")  # fp32 oracle
    fast = load_model(ckpt, backend="triton", dtype=dtype)
    assert fast.backend == "triton" and ref.backend == "torch"
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    pts = torch.tensor([[[[60.0, 100.0], [200.0, 30.0]]], [[[10.0, 250.0], [128.0, 128.0]]]])
    labels = torch.tensor([[[1, 0]], [[1, 1]]])
    a = ref(pixel_values=x, input_points=pts, input_labels=labels)
    b = fast(pixel_values=x, input_points=pts, input_labels=labels)
    if dtype == "fp32":
        emb_a, interm_a = ref.get_image_embeddings(x)
        emb_b, interm_b = fast.get_image_embeddings(x)
        assert_logits_close(emb_b, emb_a, "triton encoder fp32")
        assert_logits_close(interm_b[0], interm_a[0], "triton encoder fp32 intermediate")
        assert_logits_close(b.pred_masks, a.pred_masks, "triton model fp32 masks")
        return
    # bf16: the same run in plain PyTorch bf16 sets the error budget (2x).
    plain = load_model(ckpt, backend="torch", dtype=dtype)
    c = plain(pixel_values=x, input_points=pts, input_labels=labels)
    err_fast = (b.pred_masks.float() - a.pred_masks).abs().max().item()
    err_plain = (c.pred_masks.float() - a.pred_masks).abs().max().item()
    print(f"[parity] bf16 masks vs fp32: triton {err_fast:.3g}, plain torch {err_plain:.3g}")
    assert err_fast <= 2 * err_plain + 1e-3
    agree = ((b.pred_masks > 0) == (a.pred_masks > 0)).float().mean().item()
    assert agree > 0.98, f"bf16 triton masks agree with fp32 on {agree:.4f} of pixels"


def test_triton_backend_reasons(ckpt, monkeypatch):
    model = load_model(ckpt, backend="torch")
    # "auto" never picks the interpreter: on CPU it is the reference, interpreter on or off.
    assert model.set_backend("auto") == "torch"
    assert any("CPU" in r for r in model.backend_reasons)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert model.set_backend("auto") == "torch"
    with pytest.raises(BackendUnavailableError, match="interpreter is off"):
        model.set_backend("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with torch.device("meta"):
        tiny = SamHQModel(PRESETS["vit_tiny"])
    tiny.pixel_mean = torch.zeros(3, 1, 1)  # a CPU buffer gives the model a device
    with pytest.raises(BackendUnavailableError, match="TinyViT"):
        tiny.set_backend("triton")


@pytest.mark.gpu
def test_auto_backend_follows_the_model_to_cuda(ckpt):
    model = load_model(ckpt)  # auto, on CPU: the reference
    assert model.backend == "torch"
    model.to("cuda")  # the seed example's .to(device)
    assert model.backend == "triton"
    model.to("cpu")
    assert model.backend == "torch"
