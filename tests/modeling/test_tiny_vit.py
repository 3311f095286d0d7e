"""TinyViT (Light HQ-SAM image encoder) against the official segment-anything-hq 0.3 TinyViT."""

from __future__ import annotations

import pytest
import torch

from samhq_fast.config import SamHQVisionConfig
from samhq_fast.modeling.tiny_vit import TinyViT

from _official import import_official

TOL = 1e-4  # max abs diff relative to the output's max abs value (fp32)


def _config(image_size: int) -> SamHQVisionConfig:
    return SamHQVisionConfig(
        backbone="tiny_vit", hidden_size=320, num_attention_heads=10, image_size=image_size
    )


def _official(image_size: int) -> torch.nn.Module:
    """The official encoder with the hyper-parameters of ``build_sam_vit_t``."""
    sah = import_official()
    from segment_anything_hq.modeling.tiny_vit_sam import TinyViT as OfficialTinyViT

    assert sah is not None
    return OfficialTinyViT(
        img_size=image_size,
        in_chans=3,
        num_classes=1000,
        embed_dims=[64, 128, 160, 320],
        depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7],
        mlp_ratio=4.0,
        drop_rate=0.0,
        drop_path_rate=0.0,
        use_checkpoint=False,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        layer_lr_decay=0.8,
    )


def _official_forward(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``TinyViT.forward_features`` with the token grid derived from the input.

    The official code views its tokens as a hard-coded 64x64 grid, so it only runs at 1024; its
    sub-modules are built for ``img_size`` and run at any size. Same steps otherwise.
    """
    g = x.shape[-1] // 16
    x = model.layers[0](model.patch_embed(x))
    interm = None
    for i in range(1, len(model.layers)):
        x = model.layers[i](x)
        if i == 1:
            interm = x.view(x.shape[0], g, g, -1)
    x = x.view(x.shape[0], g, g, -1).permute(0, 3, 1, 2)
    return model.neck(x), interm


@torch.no_grad()
def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights: every parameter and BatchNorm statistic moved off its init."""
    gen = torch.Generator().manual_seed(seed)

    def randn(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen, dtype=t.dtype)

    for name, p in model.named_parameters():
        if p.ndim == 1 or "attention_biases" in name:  # norm / BN affine, biases, attn biases
            base = 1.0 if name.endswith("weight") else 0.0
            p.copy_(base + 0.2 * randn(p))
        else:  # conv / linear weights: keep the fan-in scale, move every entry
            std = 1.0 / (p[0].numel() ** 0.5)
            p.copy_(std * randn(p))
    for name, b in model.named_buffers():
        if name.endswith("running_mean"):
            b.copy_(0.2 * randn(b))
        elif name.endswith("running_var"):
            b.copy_(torch.rand(b.shape, generator=gen) * 1.5 + 0.5)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _pair(image_size: int, seed: int) -> tuple[torch.nn.Module, TinyViT]:
    official = _official(image_size)
    _perturb(official, seed)
    official.eval()  # refresh its cached attention biases after the weights changed
    ours = TinyViT(_config(image_size)).eval()
    ours.load_state_dict(official.state_dict(), strict=True)
    return official, ours


def _compare(official: torch.nn.Module, ours: TinyViT, x: torch.Tensor, full: bool = False):
    with torch.no_grad():
        if full:
            ref, (ref_interm,) = official(x)
        else:
            ref, ref_interm = _official_forward(official, x)
        emb, (interm,) = ours(x)
    g = x.shape[-1] // 16
    assert emb.shape == (x.shape[0], 256, g, g) and emb.shape == ref.shape
    assert interm.shape == (x.shape[0], g, g, 160) and interm.shape == ref_interm.shape
    return _rel_err(emb, ref), _rel_err(interm, ref_interm)


def test_state_dict_keys_match_official():
    official = _official(256)
    ours = TinyViT(_config(256))
    ref = {k: v.shape for k, v in official.state_dict().items()}
    got = {k: v.shape for k, v in ours.state_dict().items()}
    assert got == ref
    # Non-persistent official buffers (attention_bias_idxs, the eval cache ab) are not saved.
    assert not any(k.endswith(("attention_bias_idxs", ".ab")) for k in got)


def test_state_dict_keys_match_full_official_vit_tiny():
    sah = import_official()
    full = sah.sam_model_registry["vit_tiny"]().state_dict()  # build_sam_vit_t
    assert len(full) == 464
    prefix = "image_encoder."
    ref = {k[len(prefix) :]: v.shape for k, v in full.items() if k.startswith(prefix)}
    got = {k: v.shape for k, v in TinyViT(_config(1024)).state_dict().items()}
    assert got == ref


def test_attention_bias_index_matches_official():
    official, ours = _official(256), TinyViT(_config(256))
    ref = {k: v for k, v in official.named_buffers() if k.endswith("attention_bias_idxs")}
    got = {k: v for k, v in ours.named_buffers() if k.endswith("attention_bias_idxs")}
    assert got.keys() == ref.keys() and len(got) == 10
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_matches_official_256():
    official, ours = _pair(256, seed=0)
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    err_emb, err_interm = _compare(official, ours, x)
    assert err_emb <= TOL and err_interm <= TOL, (err_emb, err_interm)


def test_uses_weights_loaded_after_eval():
    official, ours = _pair(256, seed=0)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before, _ = ours(x)
        # New attention biases after .eval(): the official model keeps its stale cache ...
        gen = torch.Generator().manual_seed(3)
        for name, p in official.named_parameters():
            if "attention_biases" in name:
                p.add_(torch.randn(p.shape, generator=gen))
        stale, _ = _official_forward(official, x)
        # ... ours, loaded after its .eval(), uses them at once.
        ours.load_state_dict(official.state_dict(), strict=True)
        after, _ = ours(x)
    assert _rel_err(before, after) > 1e-2
    assert _rel_err(stale, after) > 1e-2
    official.eval()  # the official model needs another .eval() to see them
    err_emb, err_interm = _compare(official, ours, x)
    assert err_emb <= TOL and err_interm <= TOL, (err_emb, err_interm)

    # All weights replaced after .eval().
    _perturb(official, seed=4)
    ours.load_state_dict(official.state_dict(), strict=True)
    official.eval()
    err_emb, err_interm = _compare(official, ours, x)
    assert err_emb <= TOL and err_interm <= TOL, (err_emb, err_interm)


@pytest.mark.slow
def test_matches_official_1024():
    official, ours = _pair(1024, seed=5)
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(6))
    err_emb, err_interm = _compare(official, ours, x, full=True)
    assert err_emb <= TOL and err_interm <= TOL, (err_emb, err_interm)


def test_rejects_vit_backbone():
    with pytest.raises(ValueError, match="tiny_vit"):
        TinyViT(SamHQVisionConfig())
