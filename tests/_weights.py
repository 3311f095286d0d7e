"""Shared fixtures: small configs, official / HF models with random non-trivial weights, and
checkpoints written in each real format (official ``.pth``, HF ``save_pretrained`` directory)."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from samhq_fast.config import (
    SamHQConfig,
    SamHQMaskDecoderConfig,
    SamHQPromptEncoderConfig,
    SamHQVisionConfig,
)
from samhq_fast.weights import official_to_hf

from _official import import_official


def small_config(
    image_size: int = 256,
    hidden: int = 192,
    depth: int = 4,
    heads: int = 2,
    window: int = 6,
    global_idx: tuple[int, ...] = (1, 3),
) -> SamHQConfig:
    """A fast SAM-HQ (forward ~1 s): 16x16 tokens, windows that need padding (16 % 6 != 0)."""
    return SamHQConfig(
        SamHQVisionConfig(
            hidden_size=hidden,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            image_size=image_size,
            window_size=window,
            global_attn_indexes=global_idx,
        ),
        SamHQPromptEncoderConfig(image_size=image_size),
        SamHQMaskDecoderConfig(vit_dim=hidden),
    )


def build_official(config: SamHQConfig) -> nn.Module:
    """The official ``Sam`` with ``MaskDecoderHQ`` for a ViT config."""
    sah = import_official()
    m = sah.modeling
    v, p, d = config.vision_config, config.prompt_encoder_config, config.mask_decoder_config
    g = v.image_size // v.patch_size
    c = d.hidden_size
    sam = m.Sam(
        image_encoder=m.ImageEncoderViT(
            depth=v.num_hidden_layers,
            embed_dim=v.hidden_size,
            img_size=v.image_size,
            mlp_ratio=v.resolved_mlp_dim / v.hidden_size,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=v.num_attention_heads,
            patch_size=v.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=list(v.global_attn_indexes),
            window_size=v.window_size,
            out_chans=v.output_channels,
        ),
        prompt_encoder=m.PromptEncoder(
            embed_dim=c,
            image_embedding_size=(g, g),
            input_image_size=(v.image_size, v.image_size),
            mask_in_chans=p.mask_input_channels,
        ),
        mask_decoder=m.MaskDecoderHQ(
            num_multimask_outputs=d.num_multimask_outputs,
            transformer=m.TwoWayTransformer(
                depth=d.num_hidden_layers,
                embedding_dim=c,
                mlp_dim=d.mlp_dim,
                num_heads=d.num_attention_heads,
                attention_downsample_rate=d.attention_downsample_rate,
            ),
            transformer_dim=c,
            iou_head_depth=d.iou_head_depth,
            iou_head_hidden_dim=d.iou_head_hidden_dim,
            vit_dim=d.vit_dim,
        ),
    )
    return sam.eval()


def build_official_tiny(image_size: int = 1024) -> nn.Module:
    sah = import_official()
    m = sah.modeling
    g = image_size // 16
    sam = m.Sam(
        image_encoder=m.TinyViT(
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
        ),
        prompt_encoder=m.PromptEncoder(
            embed_dim=256,
            image_embedding_size=(g, g),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=m.MaskDecoderHQ(
            num_multimask_outputs=3,
            transformer=m.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
            vit_dim=160,
        ),
    )
    return sam.eval()


@torch.no_grad()
def perturb_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random but non-trivial weights: norms, biases, rel_pos, pos_embed and embeddings all
    moved away from their (often zero / identity) init, so no term can hide."""
    g = torch.Generator().manual_seed(seed)

    def rnd(t: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.randn(t.shape, generator=g) * scale

    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if not p.is_floating_point() or "." not in name:  # pixel_mean / pixel_std stay
            continue
        leaf = name.rsplit(".", 1)[-1]
        if "rel_pos" in leaf:
            p.copy_(rnd(p, 0.5))
        elif leaf == "pos_embed":
            p.copy_(rnd(p, 0.3))
        elif leaf == "positional_encoding_gaussian_matrix":
            p.copy_(rnd(p, 1.0))
        elif leaf in ("running_var",):
            p.copy_(1 + rnd(p, 0.2).abs())
        elif leaf in ("running_mean",):
            p.copy_(rnd(p, 0.2))
        elif p.dim() == 1 and leaf == "weight":  # norm scales
            p.copy_(1 + rnd(p, 0.2))
        elif leaf == "bias" or leaf == "attention_biases":
            p.copy_(rnd(p, 0.1))
        elif isinstance(model.get_submodule(name.rsplit(".", 1)[0]), nn.Embedding):
            p.copy_(rnd(p, 1.0))
        else:
            fan_in = p[0].numel() if p.dim() > 1 else p.numel()
            p.copy_(rnd(p, fan_in**-0.5))
    return model


def save_official_pth(official: nn.Module, path) -> None:
    """An official-layout checkpoint, written as the SAM-HQ authors' files are."""
    torch.save(official.state_dict(), path)


def build_hf(config: SamHQConfig, official: nn.Module):
    """transformers 4.53.3 ``SamHQModel`` holding the official model's weights."""
    from transformers import SamHQConfig as HFConfig
    from transformers import SamHQModel as HFModel

    hf = HFModel(HFConfig(**config.to_hf_dict())).eval()
    sd = official_to_hf(official.state_dict())
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert not missing, missing
    return hf


def set_hf_decoder_eps(hf, eps: float = 1e-5) -> None:
    """transformers uses 1e-6 in the two-way blocks; the official code (and we) use 1e-5."""
    for mod in hf.mask_decoder.transformer.modules():
        if isinstance(mod, nn.LayerNorm):
            mod.eps = eps
