"""ViT image encoder of SAM-HQ (vit_b / vit_l / vit_h), after Meta's segment-anything."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from samhq_fast.config import SamHQVisionConfig
from samhq_fast.modeling.common import LayerNorm2d, MLPBlock, layer_norm_fp32
from samhq_fast.ops import attention as attention_ops
from samhq_fast.ops.fused import FusedOps


def residual_stream(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The encoder's residual stream for weights of ``dtype``: fp32 under fp16 weights (SAM's
    vit_h stream passes 65504, fp16's max), else the weights' dtype. bf16 has fp32's exponent
    range, so a bf16 stream cannot overflow; on the trained test model it segments as well as
    an fp32 stream (README, "Precision"). Every block computes in the weights' dtype."""
    return x.float() if dtype == torch.float16 else x.to(dtype)


class Attention(nn.Module):
    """Multi-head attention with decomposed relative position, windowed or global.

    Takes the normalised, *unpadded* token grid; window partition and padding happen inside the
    attention op (``samhq_fast.ops.attention``), whose implementation is chosen at build time.
    """

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool, window_size: int, rel_size: int
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_size - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_size - 1, head_dim))
        self.attention_fn: attention_ops.AttentionFn = attention_ops.rel_pos_attention_reference

    def forward(
        self, x: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` ``(B, H, W, C)`` -> ``(B, H, W, C)`` and, if asked, the attention probabilities
        ``(B * windows * heads, L, L)`` (transformers' layout)."""
        qkv = self.qkv(x)
        args = (
            qkv,
            self.num_heads,
            self.window_size,
            self.rel_pos_h,
            self.rel_pos_w,
            self.qkv.bias,
        )
        if output_attentions:
            out, weights = attention_ops.rel_pos_attention_reference(*args, return_weights=True)
        else:
            out, weights = self.attention_fn(*args), None
        return self.proj(out), weights


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, config: SamHQVisionConfig, window_size: int) -> None:
        super().__init__()
        dim = config.hidden_size
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = Attention(
            dim,
            config.num_attention_heads,
            config.qkv_bias,
            window_size,
            window_size if window_size > 0 else config.grid_size,
        )
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = MLPBlock(dim, config.resolved_mlp_dim, nn.GELU)
        self.window_size = window_size

        self.fused: FusedOps | None = None  # set by SamHQModel.set_backend

    def forward(
        self, x: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` ``(B, H, W, C)`` residual stream (see :func:`residual_stream`)."""
        if self.fused is not None and not output_attentions:
            return self._forward_fused(x, self.fused), None
        dt = self.norm1.weight.dtype
        a, weights = self.attn(layer_norm_fp32(self.norm1, x, dt), output_attentions)
        x = x + a
        x = x + self.mlp(layer_norm_fp32(self.norm2, x, dt))
        return x, weights

    def _forward_fused(self, x: torch.Tensor, ops: FusedOps) -> torch.Tensor:
        # Five kernels a block: LN, qkv GEMM, attention, proj GEMM (+bias +residual), LN, lin1
        # GEMM (+bias +GELU), lin2 GEMM (+bias +residual). Window padding lives in the attention
        # kernel, so no GEMM touches a padded row.
        dt, attn, mlp = self.norm1.weight.dtype, self.attn, self.mlp
        h = ops.layer_norm(x, self.norm1.weight, self.norm1.bias, self.norm1.eps, dt)
        qkv = ops.linear(h, attn.qkv.weight, attn.qkv.bias)
        a = attn.attention_fn(
            qkv, attn.num_heads, attn.window_size, attn.rel_pos_h, attn.rel_pos_w, attn.qkv.bias
        )
        x = ops.linear(a, attn.proj.weight, attn.proj.bias, residual=x)
        if ops.backend == "torch":  # the MLP over blocks of rows, in place on the new stream
            from samhq_fast.ops.fast_torch import mlp_residual_

            return mlp_residual_(x, self.norm2, mlp.lin1, mlp.lin2, dt)
        h = ops.layer_norm(x, self.norm2.weight, self.norm2.bias, self.norm2.eps, dt)
        h = ops.linear(h, mlp.lin1.weight, mlp.lin1.bias, activation="gelu")
        return ops.linear(h, mlp.lin2.weight, mlp.lin2.bias, residual=x)


class PatchEmbed(nn.Module):
    """``(B, 3, S, S)`` -> ``(B, S/p, S/p, C)`` with a stride-``p`` convolution."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class ImageEncoderViT(nn.Module):
    """SAM's ViT backbone plus neck.

    ``forward(pixel_values (B, 3, S, S))`` returns the image embedding ``(B, 256, S/16, S/16)``
    and the list of global-block outputs ``(B, S/16, S/16, C)`` (SAM-HQ uses the first).
    """

    def __init__(self, config: SamHQVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.img_size = config.image_size
        g, c = config.grid_size, config.hidden_size
        self.patch_embed = PatchEmbed(config.patch_size, config.num_channels, c)
        self.pos_embed = nn.Parameter(torch.zeros(1, g, g, c)) if config.use_abs_pos else None
        self.blocks = nn.ModuleList(
            Block(config, 0 if i in config.global_attn_indexes else config.window_size)
            for i in range(config.num_hidden_layers)
        )
        out = config.output_channels
        self.fused: FusedOps | None = None
        self.neck = nn.Sequential(
            nn.Conv2d(c, out, kernel_size=1, bias=False),
            LayerNorm2d(out),
            nn.Conv2d(out, out, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out),
        )

    def set_attention_fn(self, fn: attention_ops.AttentionFn) -> None:
        for blk in self.blocks:
            blk.attn.attention_fn = fn

    def set_fused(self, ops: FusedOps | None) -> None:
        """Run blocks and neck through ``ops`` (fused kernels), or the plain modules (``None``)."""
        self.fused = ops
        for blk in self.blocks:
            blk.fused = ops

    def _neck(self, x: torch.Tensor) -> torch.Tensor:
        # The first 1x1 conv reads the residual stream: an fp32 one (fp16 weights) may exceed
        # fp16's range, so that conv runs in fp32 there; its LayerNorm brings the values back to
        # O(1). (The fused path scales instead, see _neck_fused.)
        conv1, ln1, conv2, ln2 = self.neck
        dt = conv1.weight.dtype
        x = x.permute(0, 3, 1, 2)
        if x.dtype != dt:
            y = F.conv2d(x.float(), conv1.weight.float())
        else:
            y = conv1(x)
        return ln2(conv2(ln1(y).to(dt)))

    def _neck_fused(self, x: torch.Tensor, ops: FusedOps) -> torch.Tensor:
        # 1x1 conv = GEMM on the channels-last grid, in the weights' dtype; LayerNorm2d of a
        # channels-last tensor is a row LayerNorm; the 3x3 conv runs channels-last (cuDNN's and
        # oneDNN's fast layout), no permute copy.
        conv1, ln1, conv2, ln2 = self.neck
        dt = conv1.weight.dtype
        w1 = conv1.weight.view(conv1.out_channels, -1)
        if x.dtype != dt:
            # fp16 weights, fp32 stream (may pass 65504): the conv has no bias, so it commutes
            # with a power-of-two scale (exact) that brings the stream into fp16's range; the
            # GEMM runs in fp16 with an fp32 output, scaled back before the LayerNorm.
            s = torch.exp2(torch.ceil(torch.log2(x.abs().amax().clamp_min(1.0) / 2.0**14)))
            y = ops.linear((x / s).to(dt), w1, out_dtype=torch.float32) * s
        else:
            y = ops.linear(x, w1)
        y = ops.layer_norm(y, ln1.weight, ln1.bias, ln1.eps, dt)
        y = ops.conv2d(y.permute(0, 3, 1, 2), conv2.weight, None, 1, 1)
        return ops.layer_norm_2d(y, ln2.weight, ln2.bias, ln2.eps).contiguous()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor], tuple | None, tuple | None]:
        """Returns ``(image_embeddings, intermediate_embeddings, hidden_states, attentions)``;
        the last two are ``None`` unless asked for. The intermediate embeddings and hidden states
        are the residual stream, in :func:`residual_stream`'s dtype."""
        dt = self.patch_embed.proj.weight.dtype
        fused = self.fused
        if fused is not None:
            p = self.patch_embed.proj
            x = fused.conv2d(pixel_values.to(dt), p.weight, p.bias, p.stride).permute(0, 2, 3, 1)
        else:
            x = self.patch_embed(pixel_values.to(dt))
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = residual_stream(x, dt)
        interm: list[torch.Tensor] = []
        hidden: list[torch.Tensor] = []
        attentions: list[torch.Tensor] = []
        for blk in self.blocks:
            if output_hidden_states:
                hidden.append(x)
            x, weights = blk(x, output_attentions)
            if blk.window_size == 0:
                interm.append(x)
            if output_attentions:
                attentions.append(weights)
        if output_hidden_states:
            hidden.append(x)
        x = self._neck_fused(x, fused) if fused is not None else self._neck(x)
        return (
            x,
            interm,
            tuple(hidden) if output_hidden_states else None,
            tuple(attentions) if output_attentions else None,
        )
