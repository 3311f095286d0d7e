"""Analytic FLOP model of SAM-HQ (FLOPs = 2 x multiply-accumulates of matmuls and convolutions).

Counted: linear layers, convolutions (transposed and depthwise included), attention products and
the decomposed relative-position products. Not counted: norms, activations, softmax, additions.
This is the convention of ``torch.utils.flop_counter.FlopCounterMode``, which the tests use to
check the model on the official code.

The encoder count is the work of the *official* computation: windowed ViT layers run qkv and the
output projection on the zero-padded grid (64 -> 70 tokens a side for window 14), which our
model skips (3.5-5.4% of the encoder, ANCHORS.md section 5). Every implementation is credited
with the same count, so achieved TFLOP/s compare like throughput.
"""

from __future__ import annotations

import math

from samhq_fast.config import SamHQConfig, SamHQMaskDecoderConfig, SamHQVisionConfig


def _conv(out_hw: int, c_in: int, c_out: int, k: int = 1, groups: int = 1) -> float:
    """2 * output positions * C_out * (C_in / groups) * k * k."""
    return 2.0 * out_hw * c_out * (c_in // groups) * k * k


def _conv_t(in_hw: int, c_in: int, c_out: int, k: int = 2) -> float:
    """Transposed convolution: 2 * input positions * C_in * C_out * k * k."""
    return 2.0 * in_hw * c_in * c_out * k * k


def vit_encoder_flops(v: SamHQVisionConfig) -> dict[str, float]:
    """Per image, broken down by part, for the ViT backbones (vit_b / vit_l / vit_h)."""
    g = v.grid_size
    n = g * g
    c = v.hidden_size
    m = v.resolved_mlp_dim
    out = v.output_channels
    parts = dict.fromkeys(
        ("patch_embed", "qkv_proj", "attn_window", "attn_global", "rel_pos", "mlp", "neck"), 0.0
    )
    parts["patch_embed"] = _conv(n, v.num_channels, c, v.patch_size)
    for i in range(v.num_hidden_layers):
        if i in v.global_attn_indexes:
            tokens, seq, side = n, n, g
            parts["attn_global"] += 4.0 * tokens * seq * c
        else:
            w = v.window_size
            gp = math.ceil(g / w) * w
            tokens, seq, side = gp * gp, w * w, w
            parts["attn_window"] += 4.0 * tokens * seq * c
        parts["qkv_proj"] += 2.0 * tokens * c * 3 * c + 2.0 * tokens * c * c
        parts["rel_pos"] += 2 * 2.0 * tokens * side * c  # q . Rh and q . Rw, every head
        parts["mlp"] += 2 * 2.0 * n * c * m
    parts["neck"] = _conv(n, c, out, 1) + _conv(n, out, out, 3)
    parts["total"] = sum(parts.values())
    return parts


def tiny_vit_encoder_flops(v: SamHQVisionConfig) -> dict[str, float]:
    """Per image for the TinyViT backbone of Light HQ-SAM (vit_tiny)."""
    dims, depths = v.tiny_embed_dims, v.tiny_depths
    keys = ("patch_embed", "conv_stage", "merge", "qkv_proj", "attn", "local_conv", "mlp", "neck")
    parts = dict.fromkeys(keys, 0.0)  # attention FLOPs do not depend on the head count
    r = v.image_size // 2
    parts["patch_embed"] = _conv(r * r, v.num_channels, dims[0] // 2, 3)
    r = math.ceil(r / 2)
    parts["patch_embed"] += _conv(r * r, dims[0] // 2, dims[0], 3)

    def merge(res: int, d_in: int, d_out: int, stride: int) -> tuple[float, int]:
        new = math.ceil(res / stride)
        f = _conv(res * res, d_in, d_out) + _conv(new * new, d_out, d_out, 3, d_out)
        return f + _conv(new * new, d_out, d_out), new

    hidden = int(dims[0] * v.tiny_mbconv_expand_ratio)
    hw = r * r
    for _ in range(depths[0]):  # MBConv
        parts["conv_stage"] += _conv(hw, dims[0], hidden) + _conv(hw, hidden, hidden, 3, hidden)
        parts["conv_stage"] += _conv(hw, hidden, dims[0])
    f, r = merge(r, dims[0], dims[1], 2)
    parts["merge"] += f
    n_stages = len(dims)
    for i in range(1, n_stages):
        d, w = dims[i], v.tiny_window_sizes[i]
        rp = math.ceil(r / w) * w
        tokens, hw = rp * rp, r * r
        mlp = int(d * v.mlp_ratio)
        for _ in range(depths[i]):
            parts["qkv_proj"] += 2.0 * tokens * d * 3 * d + 2.0 * tokens * d * d
            parts["attn"] += 4.0 * tokens * w * w * d
            k = v.tiny_local_conv_size
            parts["local_conv"] += _conv(hw, d, d, k, d)
            parts["mlp"] += 2 * 2.0 * hw * d * mlp
        if i < n_stages - 1:
            f, r = merge(r, d, dims[i + 1], 1 if i == n_stages - 2 else 2)
            parts["merge"] += f
    out = v.output_channels
    parts["neck"] = _conv(r * r, dims[-1], out, 1) + _conv(r * r, out, out, 3)
    parts["total"] = sum(parts.values())
    return parts


def encoder_flops(v: SamHQVisionConfig) -> dict[str, float]:
    """Per-image FLOPs of the image encoder, by part, with ``"total"``."""
    if v.backbone == "tiny_vit":
        return tiny_vit_encoder_flops(v)
    return vit_encoder_flops(v)


def _attention(q_len: int, kv_len: int, dim: int, inner: int) -> float:
    """q/k/v/out projections and the two attention products of one SAM ``Attention``."""
    proj = 2.0 * q_len * dim * inner + 2 * 2.0 * kv_len * dim * inner + 2.0 * q_len * inner * dim
    return proj + 4.0 * q_len * kv_len * inner


def decoder_flops_per_prompt(
    d: SamHQMaskDecoderConfig, grid: int, sparse_tokens: int
) -> dict[str, float]:
    """Per prompt (every prompt runs the two-way transformer over the whole image)."""
    c = d.hidden_size
    n = grid * grid
    t = 2 + d.num_multimask_outputs + 1 + sparse_tokens  # iou, mask tokens, hq token, prompts
    cross = c // d.attention_downsample_rate
    parts = dict.fromkeys(("transformer", "upscaling", "mask_feature", "heads"), 0.0)
    for _ in range(d.num_hidden_layers):
        parts["transformer"] += _attention(t, t, c, c)  # self attention of the tokens
        parts["transformer"] += _attention(t, n, c, cross)  # tokens -> image
        parts["transformer"] += 2 * 2.0 * t * c * d.mlp_dim
        parts["transformer"] += _attention(n, t, c, cross)  # image -> tokens
    parts["transformer"] += _attention(t, n, c, cross)  # final tokens -> image
    parts["upscaling"] = _conv_t(n, c, c // 4) + _conv_t(4 * n, c // 4, c // 8)
    up = 16 * n
    parts["mask_feature"] = _conv(up, c // 8, c // 4, 3) + _conv(up, c // 4, c // 8, 3)
    n_masks = d.num_multimask_outputs + 2  # SAM masks + the HQ mask
    hyper = 2.0 * (c * c + c * c + c * (c // 8))
    iou = 2.0 * (c * d.iou_head_hidden_dim + d.iou_head_hidden_dim**2)
    iou += 2.0 * d.iou_head_hidden_dim * (d.num_multimask_outputs + 1)
    parts["heads"] = n_masks * hyper + iou + n_masks * 2.0 * (c // 8) * up
    parts["total"] = sum(parts.values())
    return parts


def decoder_flops_per_image(d: SamHQMaskDecoderConfig, grid: int) -> float:
    """HQ features, once per image and decoder call: embedding_encoder + compress_vit_feat."""
    c, n = d.hidden_size, grid * grid
    enc = _conv_t(n, c, c // 4) + _conv_t(4 * n, c // 4, c // 8)
    vit = _conv_t(n, d.vit_dim, c) + _conv_t(4 * n, c, c // 8)
    return enc + vit


def decoder_flops(config: SamHQConfig, prompts: int, sparse_tokens: int) -> float:
    """One decoder call on one image with ``prompts`` prompts of ``sparse_tokens`` tokens each
    (one point: 2 with the padding point; one box: 2), HQ features included."""
    d, g = config.mask_decoder_config, config.vision_config.grid_size
    per = decoder_flops_per_prompt(d, g, sparse_tokens)["total"]
    return decoder_flops_per_image(d, g) + prompts * per
