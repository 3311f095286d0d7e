"""Prompt encoder: points, boxes and mask prompts -> sparse and dense embeddings."""

from __future__ import annotations

import math

import torch
from torch import nn

from samhq_fast.config import SamHQPromptEncoderConfig
from samhq_fast.modeling.common import LayerNorm2d

PAD_LABEL = -10  # transformers' padding label: contributes a zero token


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier positional encoding; one Gaussian matrix serves the image grid and prompts."""

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_pos_feats))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """``coords`` in [0, 1], ``(..., 2)`` as (x, y) -> ``(..., 2 * num_pos_feats)`` in fp32."""
        coords = (2 * coords.float() - 1) @ self.positional_encoding_gaussian_matrix.float()
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Dense encoding of an ``(h, w)`` grid of cell centres -> ``(C, h, w)`` fp32."""
        h, w = size
        device = self.positional_encoding_gaussian_matrix.device
        y = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        x = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack([x[None, :].expand(h, w), y[:, None].expand(h, w)], dim=-1)
        return self._pe_encoding(grid).permute(2, 0, 1)

    def forward_with_coords(
        self, coords: torch.Tensor, image_size: tuple[int, int]
    ) -> torch.Tensor:
        """Pixel coordinates ``(..., 2)`` in an ``(H, W)`` frame -> ``(..., C)`` fp32."""
        size = coords.new_tensor([image_size[1], image_size[0]], dtype=torch.float32)
        return self._pe_encoding(coords.float() / size)


class PromptEncoder(nn.Module):
    """Encodes prompts for the HQ mask decoder.

    Labels: 1 foreground, 0 background, -1 "not a point" (own learned embedding),
    -10 padding (zero vector, transformers' convention). With points but no box, one
    "not a point" token is appended, as in SAM.
    """

    def __init__(self, config: SamHQPromptEncoderConfig) -> None:
        super().__init__()
        self.embed_dim = c = config.hidden_size
        s = config.image_embedding_size
        self.input_image_size = (config.image_size, config.image_size)
        self.image_embedding_size = (s, s)
        self.pe_layer = PositionEmbeddingRandom(c // 2)
        self.point_embeddings = nn.ModuleList(
            nn.Embedding(1, c) for _ in range(config.num_point_embeddings)
        )
        self.not_a_point_embed = nn.Embedding(1, c)
        self.mask_input_size = (4 * s, 4 * s)
        m = config.mask_input_channels
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, m // 4, kernel_size=2, stride=2),
            LayerNorm2d(m // 4, config.layer_norm_eps),
            nn.GELU(),
            nn.Conv2d(m // 4, m, kernel_size=2, stride=2),
            LayerNorm2d(m, config.layer_norm_eps),
            nn.GELU(),
            nn.Conv2d(m, c, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, c)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid, ``(1, C, h, w)`` fp32."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        points = points.float() + 0.5  # centre of the pixel
        if pad:
            points = torch.cat([points, points.new_zeros(*points.shape[:-2], 1, 2)], dim=-2)
            labels = torch.cat([labels, labels.new_full((*labels.shape[:-1], 1), -1)], dim=-1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        lab = labels[..., None]
        w = self.point_embeddings
        emb = torch.where(lab == -1, self.not_a_point_embed.weight.float(), emb)
        emb = torch.where(lab == PAD_LABEL, torch.zeros_like(emb), emb)
        emb = emb + (lab == 0) * w[0].weight.float() + (lab == 1) * w[1].weight.float()
        return emb

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        corners = boxes.float().reshape(*boxes.shape[:-1], 2, 2) + 0.5
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner = torch.stack(
            [self.point_embeddings[2].weight[0], self.point_embeddings[3].weight[0]]
        )
        return emb + corner.float()

    def forward(
        self,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed prompts for ``B`` images with ``P`` prompts each.

        Arguments:
          points: ``(B, P, N, 2)`` pixel coordinates (x, y) in the model's input frame.
          labels: ``(B, P, N)`` point labels.
          boxes: ``(B, P, 4)`` as (x1, y1, x2, y2); with points, one box per point set.
          masks: ``(B, 1, 4h, 4w)`` one mask prompt per image, or ``(B, P, 1, 4h, 4w)`` one per
            prompt (logits, as the decoder's low-resolution output).

        Returns:
          sparse ``(B, P, T, C)`` (T = N [+1 padding point] [+2 box corners]; T = 0 without
          points and boxes) and dense ``(B, C, h, w)`` or ``(B, P, C, h, w)``, in the weights'
          dtype.
        """
        dtype = self.no_mask_embed.weight.dtype
        parts = []
        if points is not None:
            if labels is None:
                raise ValueError("points were given without labels")
            parts.append(self._embed_points(points, labels, pad=boxes is None))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes))
        if parts:
            sparse = torch.cat(parts, dim=2).to(dtype)
        else:
            b = masks.shape[0] if masks is not None else 1
            p = masks.shape[1] if masks is not None and masks.dim() == 5 else 1
            sparse = self.no_mask_embed.weight.new_zeros(b, p, 0, self.embed_dim)
        if masks is not None:
            lead = masks.shape[:-3]
            dense = self.mask_downscaling(masks.reshape(-1, *masks.shape[-3:]).to(dtype))
            dense = dense.reshape(*lead, *dense.shape[1:])
        else:
            h, w = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(sparse.shape[0], -1, h, w)
        return sparse, dense
