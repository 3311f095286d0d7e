"""TinyViT image encoder of Light HQ-SAM (``vit_tiny``), inference only.

Same math and the same parameter / buffer names as the official ``TinyViT`` of
segment-anything-hq (``tiny_vit_sam.py``), so an official ``image_encoder.*`` state dict loads
strictly (the unused classifier head ``norm_head`` / ``head`` and the BatchNorm statistics
included). Unlike the official code, attention biases are gathered from the parameter on every
call, never cached by ``.eval()``, so weights loaded at any time are used.

``set_fast(True)`` (``backend="torch"`` / ``"triton"``) runs :meth:`TinyViT.forward_fast`: the
same network with every Conv-BN folded into one biased convolution (at call time, from the
current weights), channels-last convolutions, SDPA window attention whose LayerNorm, qkv and
output projection skip the window padding (a padded token is zero before the LayerNorm, so its
q/k/v are ``qkv(norm.bias)``: filled in, not computed, and still attended to as keys), and fused
linear epilogues. Half precision runs its GEMMs in fp32 on CPUs without native half support.

Shapes for an ``S x S`` input (``S = config.image_size``, 1024 for the checkpoints), dims
``(64, 128, 160, 320)``::

    patch_embed  (B, 3, S, S)        -> (B, 64, S/4, S/4)     two stride-2 3x3 Conv-BN, GELU
    stage 0      MBConv blocks        -> PatchMerging -> (B, 128, S/8, S/8)
    stage 1      attention blocks     -> PatchMerging -> (B, 160, S/16, S/16)  = interm feature
    stage 2      attention blocks     -> PatchMerging (stride 1) -> (B, 320, S/16, S/16)
    stage 3      attention blocks     -> neck -> (B, 256, S/16, S/16)

The last patch merging keeps the resolution (official: stride 1 when its output has 320, 448 or
576 channels, i.e. exactly the merge into the last stage of the published TinyViTs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samhq_fast.config import SamHQVisionConfig
from samhq_fast.ops import fast_torch as ft

# Official epsilons: nn.BatchNorm2d / nn.LayerNorm defaults inside TinyViT, 1e-6 in the neck.
BN_EPS = 1e-5
LN_EPS = 1e-5
NECK_LN_EPS = 1e-6
# The official classifier head (unused by SAM, present in the checkpoints).
NUM_CLASSES = 1000


class Conv2dBN(nn.Sequential):
    """Bias-free ``Conv2d`` (``c``) followed by ``BatchNorm2d`` (``bn``, running statistics).

    ``(B, C_in, H, W) -> (B, C_out, H', W')``.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.c = nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=BN_EPS)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of ``(B, C, H, W)``."""

    def __init__(self, num_channels: int, eps: float = NECK_LN_EPS) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class PatchEmbed(nn.Module):
    """``(B, C_in, S, S) -> (B, dim, S/4, S/4)``: Conv-BN (stride 2), GELU, Conv-BN (stride 2)."""

    def __init__(self, in_ch: int, dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            Conv2dBN(in_ch, dim // 2, 3, 2, 1), nn.GELU(), Conv2dBN(dim // 2, dim, 3, 2, 1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, + input, GELU.

    ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden)
        self.conv2 = Conv2dBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.conv3 = Conv2dBN(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        y = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return F.gelu(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """1x1 Conv-BN, GELU, 3x3 depthwise Conv-BN (``stride``), GELU, 1x1 Conv-BN.

    ``(B, C, H, W) -> (B, C_out, H / stride, W / stride)`` (ceil).
    """

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = Conv2dBN(dim, out_dim)
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2dBN(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))


class Attention(nn.Module):
    """LayerNorm + multi-head self-attention with a learned bias per (|dy|, |dx|) offset.

    ``(N, L, C) -> (N, L, C)`` with ``L = window * window`` tokens in row-major order.
    ``qkv`` is laid out per head as ``[q | k | v]`` (the official ``view(..., heads, -1)``).
    """

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # Offset (|dy|, |dx|) has bias column |dy| * window + |dx| (the official first-seen order).
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        r = torch.arange(window)
        ry, rx = torch.meshgrid(r, r, indexing="ij")
        ry, rx = ry.flatten(), rx.flatten()
        idxs = (ry[:, None] - ry[None, :]).abs() * window + (rx[:, None] - rx[None, :]).abs()
        self.register_buffer("attention_bias_idxs", idxs, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        n, L, C = x.shape
        qkv = self.qkv(self.norm(x)).view(n, L, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.transpose(1, 2).chunk(3, dim=-1)  # (N, heads, L, D) each
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)  # (heads, L, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # scale D ** -0.5
        return self.proj(out.transpose(1, 2).reshape(n, L, C))


class Mlp(nn.Module):
    """LayerNorm, Linear, exact GELU, Linear: ``(..., C) -> (..., C)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Window attention (+ residual), 3x3 depthwise Conv-BN, MLP (+ residual).

    ``(B, H, W, C) -> (B, H, W, C)``. The grid is zero-padded bottom/right to a multiple of the
    window *before* the attention's LayerNorm; padded tokens take part as keys, unmasked.
    """

    def __init__(
        self, dim: int, num_heads: int, window: int, mlp_ratio: float, local_conv_size: int
    ) -> None:
        super().__init__()
        self.window = window
        self.attn = Attention(dim, num_heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2dBN(dim, dim, local_conv_size, 1, local_conv_size // 2, groups=dim)

    def _window_attention(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        w = self.window
        pb, pr = (w - H % w) % w, (w - W % w) % w
        if pb or pr:
            x = F.pad(x, (0, 0, 0, pr, 0, pb))
        nh, nw = (H + pb) // w, (W + pr) // w
        x = x.view(B, nh, w, nw, w, C).transpose(2, 3).reshape(B * nh * nw, w * w, C)
        x = self.attn(x)
        x = x.view(B, nh, nw, w, w, C).transpose(2, 3).reshape(B, nh * w, nw * w, C)
        return x[:, :H, :W]

    def forward(self, x: Tensor) -> Tensor:
        x = x + self._window_attention(x)
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)


class ConvLayer(nn.Module):
    """Stage 0: MBConv blocks then patch merging. ``(B, C, H, W) -> (B, C', H/2, W/2)``."""

    def __init__(self, dim: int, out_dim: int, depth: int, expand_ratio: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = PatchMerging(dim, out_dim, 2)

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x)


class BasicLayer(nn.Module):
    """Attention stage: TinyViT blocks then optional patch merging.

    ``(B, C, H, W) -> (B, C', H / stride, W / stride)`` (``C' = C`` without merging).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        local_conv_size: int,
        out_dim: int | None,
        stride: int,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, num_heads, window, mlp_ratio, local_conv_size) for _ in range(depth)
        )
        self.downsample = PatchMerging(dim, out_dim, stride) if out_dim is not None else None

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        for blk in self.blocks:
            x = blk(x)
        x = x.permute(0, 3, 1, 2)
        return self.downsample(x) if self.downsample is not None else x


# ----------------------------------------------------------------------------- fast path
def _cbn(x: Tensor, m: Conv2dBN, act: bool = False) -> Tensor:
    """Conv-BN as one convolution with the BatchNorm folded in (eval statistics), channels-last
    in the GEMM dtype; optional exact GELU."""
    c, bn = m.c, m.bn
    cd = ft.gemm_dtype(x)
    scale = bn.weight.float() * torch.rsqrt(bn.running_var.float() + bn.eps)
    w = (c.weight.float() * scale[:, None, None, None]).to(cd)
    b = (bn.bias.float() - bn.running_mean.float() * scale).to(cd)
    y = F.conv2d(x.to(cd, memory_format=torch.channels_last), w, b, c.stride, c.padding, 1,
                 c.groups)  # fmt: skip
    return F.gelu(y) if act else y


def _mbconv(x: Tensor, m: MBConv) -> Tensor:
    y = _cbn(_cbn(_cbn(x, m.conv1, True), m.conv2, True), m.conv3)
    return F.gelu(y.add_(x))


def _merge(x: Tensor, m: PatchMerging) -> Tensor:
    return _cbn(_cbn(_cbn(x, m.conv1, True), m.conv2, True), m.conv3)


def _window_attention_fast(x: Tensor, a: Attention, window: int) -> Tensor:
    """``x`` ``(B, H, W, C)`` (unpadded) -> attention output ``(B, H, W, C)``, exact to the
    official pad-then-attend: padded tokens are keys/values with q/k/v ``qkv(norm.bias)``."""
    B, H, W, C = x.shape
    w, nh, D = window, a.num_heads, a.head_dim
    h = ft.layer_norm(x, a.norm.weight, a.norm.bias, a.norm.eps)
    qkv = ft.linear(h, a.qkv.weight, a.qkv.bias)  # (B, H, W, 3C), per head [q | k | v]
    pb, pr = (w - H % w) % w, (w - W % w) % w
    if pb or pr:
        pad = ft.linear(a.norm.bias.to(qkv.dtype), a.qkv.weight, a.qkv.bias).to(qkv.dtype)
        full = pad.expand(B, H + pb, W + pr, 3 * C).clone()
        full[:, :H, :W] = qkv
        qkv = full
    Hp, Wp = H + pb, W + pr
    n, L = B * (Hp // w) * (Wp // w), w * w
    win = qkv.view(B, Hp // w, w, Wp // w, w, 3 * C).transpose(2, 3).reshape(n, L, nh, 3 * D)
    q, k, v = win.transpose(1, 2).chunk(3, dim=-1)  # (n, heads, L, D)
    bias = a.attention_biases[:, a.attention_bias_idxs].to(q.dtype)  # (heads, L, L)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out = out.transpose(1, 2).reshape(B, Hp // w, Wp // w, w, w, C).transpose(2, 3)
    return out.reshape(B, Hp, Wp, C)[:, :H, :W]


def _tiny_block_fast(x: Tensor, blk: TinyViTBlock) -> Tensor:
    """``x`` ``(B, H, W, C)`` -> same; the projection runs on unpadded tokens (+ residual)."""
    a = blk.attn
    o = _window_attention_fast(x, a, blk.window)
    x = ft.linear(o, a.proj.weight, a.proj.bias, residual=x)
    x = _cbn(x.permute(0, 3, 1, 2), blk.local_conv).permute(0, 2, 3, 1).contiguous()  # NHWC
    m = blk.mlp
    return ft.mlp_residual_(x, m.norm, m.fc1, m.fc2, x.dtype)


def _basic_layer_fast(x: Tensor, layer: BasicLayer) -> Tensor:
    x = x.permute(0, 2, 3, 1)  # channels-last NCHW -> contiguous NHWC
    if not x.is_contiguous():
        x = x.contiguous()
    for blk in layer.blocks:
        x = _tiny_block_fast(x, blk)
    x = x.permute(0, 3, 1, 2)
    return _merge(x, layer.downsample) if layer.downsample is not None else x


class TinyViT(nn.Module):
    """TinyViT-5M image encoder with the SAM neck (Light HQ-SAM).

    ``forward(pixel_values (B, C, S, S))`` returns ``(image_embeddings (B, 256, S/16, S/16),
    [interm (B, S/16, S/16, 160)])``; ``interm`` is the output of the second stage (after its
    patch merging), the early feature of the HQ decoder.
    """

    def __init__(self, config: SamHQVisionConfig) -> None:
        super().__init__()
        if config.backbone != "tiny_vit":
            raise ValueError(f"TinyViT needs backbone='tiny_vit', got {config.backbone!r}")
        dims, depths = config.tiny_embed_dims, config.tiny_depths
        n = len(dims)
        if not n == len(depths) == len(config.tiny_num_heads) == len(config.tiny_window_sizes):
            raise ValueError("tiny_embed_dims/depths/num_heads/window_sizes lengths differ")
        if n < 3:
            raise ValueError(f"TinyViT needs at least 3 stages, got {n}")
        # S/4 after the patch embedding, /2 per merge except the last (stride 1).
        if config.image_size % (4 * 2 ** (n - 2)):
            raise ValueError(f"image_size {config.image_size} not a multiple of {4 * 2 ** (n - 2)}")
        for d, h in zip(dims[1:], config.tiny_num_heads[1:], strict=True):
            if d % h:
                raise ValueError(f"TinyViT dim {d} not divisible by {h} heads")
        self.patch_embed = PatchEmbed(config.num_channels, dims[0])
        layers: list[nn.Module] = [
            ConvLayer(dims[0], dims[1], depths[0], config.tiny_mbconv_expand_ratio)
        ]
        for i in range(1, n):
            last = i == n - 1
            layers.append(
                BasicLayer(
                    dims[i],
                    depths[i],
                    config.tiny_num_heads[i],
                    config.tiny_window_sizes[i],
                    config.mlp_ratio,
                    config.tiny_local_conv_size,
                    out_dim=None if last else dims[i + 1],
                    stride=1 if i == n - 2 else 2,
                )
            )
        self.layers = nn.ModuleList(layers)
        self.norm_head = nn.LayerNorm(dims[-1], eps=LN_EPS)  # unused classifier head
        self.head = nn.Linear(dims[-1], NUM_CLASSES)
        out = config.output_channels
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], out, kernel_size=1, bias=False),
            LayerNorm2d(out),
            nn.Conv2d(out, out, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out),
        )
        self.fast = False

    def set_fast(self, fast: bool) -> None:
        """Run :meth:`forward_fast` (``True``) or the reference modules (``False``)."""
        self.fast = bool(fast)

    def forward_fast(self, pixel_values: Tensor) -> tuple[Tensor, list[Tensor]]:
        """:meth:`forward` on the fast path (see the module docstring); same outputs, dtypes."""
        dt = self.neck[0].weight.dtype
        pe = self.patch_embed.seq
        x = _cbn(_cbn(pixel_values.to(dt), pe[0], True), pe[2])
        l0 = self.layers[0]
        for blk in l0.blocks:
            x = _mbconv(x, blk)
        x = _merge(x, l0.downsample)
        x = _basic_layer_fast(x, self.layers[1])
        interm = x.permute(0, 2, 3, 1).to(dt)
        for layer in self.layers[2:]:
            x = _basic_layer_fast(x, layer)
        conv1, ln1, conv2, ln2 = self.neck
        y = ft.conv2d(x, conv1.weight)
        y = ft.layer_norm_2d(y, ln1.weight, ln1.bias, ln1.eps)
        y = ft.conv2d(y, conv2.weight, None, 1, 1)
        y = ft.layer_norm_2d(y, ln2.weight, ln2.bias, ln2.eps)
        return y.to(dt).contiguous(), [interm]

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, list[Tensor]]:
        if self.fast:
            return self.forward_fast(pixel_values)
        x = self.patch_embed(pixel_values)
        x = self.layers[0](x)
        x = self.layers[1](x)  # (B, 160, S/16, S/16)
        interm = x.permute(0, 2, 3, 1)
        for layer in self.layers[2:]:
            x = layer(x)
        return self.neck(x), [interm]
