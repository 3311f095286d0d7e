"""Small building blocks shared by the encoder and decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dim of ``(B, C, H, W)``; statistics in fp32."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        u = xf.mean(1, keepdim=True)
        s = (xf - u).pow(2).mean(1, keepdim=True)
        xf = (xf - u) / torch.sqrt(s + self.eps)
        return (self.weight[:, None, None] * xf + self.bias[:, None, None]).to(x.dtype)


class MLPBlock(nn.Module):
    """``lin2(act(lin1(x)))``: the transformer MLP of the encoder (GELU) and decoder (ReLU)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (hypernetworks, IoU head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(
            nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim], strict=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def layer_norm_fp32(
    ln: nn.LayerNorm, x: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``ln(x)`` with statistics in fp32 whatever the dtype of ``x`` (fp16 must not overflow),
    returned in ``out_dtype`` (default ``x.dtype``; an fp32 residual stream feeds half layers)."""
    out_dtype = out_dtype or x.dtype
    if x.dtype == torch.float32 and ln.weight.dtype == torch.float32:
        return ln(x).to(out_dtype)
    w = ln.weight.float() if ln.weight is not None else None
    b = ln.bias.float() if ln.bias is not None else None
    return F.layer_norm(x.float(), ln.normalized_shape, w, b, ln.eps).to(out_dtype)
