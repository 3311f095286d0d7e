"""HQ mask decoder of SAM-HQ (Ke et al. 2023), after the official ``MaskDecoderHQ``."""

from __future__ import annotations

import torch
from torch import nn

from samhq_fast.config import SamHQMaskDecoderConfig
from samhq_fast.modeling.common import MLP, LayerNorm2d
from samhq_fast.modeling.transformer import TwoWayTransformer

OUTPUT_CONVENTIONS = ("official", "hf")


class MaskDecoderHQ(nn.Module):
    """Predicts SAM masks, their IoU and the HQ mask from image and prompt embeddings.

    Tokens: ``[iou, 4 mask tokens, hq token] + sparse prompt tokens``. The HQ mask is the HQ
    token's hypernetwork output dotted with ``embedding_maskfeature(upscaled SAM features) +
    hq_features``, where ``hq_features`` (one per image) fuse the image embedding (before the
    dense prompt is added) with the early ViT feature.
    """

    def __init__(self, config: SamHQMaskDecoderConfig) -> None:
        super().__init__()
        c, eps = config.hidden_size, config.layer_norm_eps
        self.transformer_dim = c
        self.transformer = TwoWayTransformer(config)
        self.num_multimask_outputs = config.num_multimask_outputs
        self.num_mask_tokens = config.num_multimask_outputs + 1  # SAM tokens; +1 HQ token
        self.iou_token = nn.Embedding(1, c)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, c)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(c, c // 4, kernel_size=2, stride=2),
            LayerNorm2d(c // 4, eps),
            nn.GELU(),
            nn.ConvTranspose2d(c // 4, c // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(c, c, c // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            c, config.iou_head_hidden_dim, self.num_mask_tokens, config.iou_head_depth
        )
        self.hf_token = nn.Embedding(1, c)
        self.hf_mlp = MLP(c, c, c // 8, 3)
        self.compress_vit_feat = nn.Sequential(
            nn.ConvTranspose2d(config.vit_dim, c, kernel_size=2, stride=2),
            LayerNorm2d(c, eps),
            nn.GELU(),
            nn.ConvTranspose2d(c, c // 8, kernel_size=2, stride=2),
        )
        self.embedding_encoder = nn.Sequential(
            nn.ConvTranspose2d(c, c // 4, kernel_size=2, stride=2),
            LayerNorm2d(c // 4, eps),
            nn.GELU(),
            nn.ConvTranspose2d(c // 4, c // 8, kernel_size=2, stride=2),
        )
        self.embedding_maskfeature = nn.Sequential(
            nn.Conv2d(c // 8, c // 4, 3, 1, 1),
            LayerNorm2d(c // 4, eps),
            nn.GELU(),
            nn.Conv2d(c // 4, c // 8, 3, 1, 1),
        )

    def compute_hq_features(
        self, image_embeddings: torch.Tensor, vit_features: torch.Tensor | None
    ) -> torch.Tensor:
        """Per-image HQ features ``(B, C/8, 4h, 4w)``.

        ``image_embeddings`` ``(B, C, h, w)``; ``vit_features`` ``(B, h, w, vit_dim)``, the early
        ViT feature (``None`` drops that term, as transformers does without intermediates).
        """
        hq = self.embedding_encoder(image_embeddings)
        if vit_features is not None:
            hq = hq + self.compress_vit_feat(vit_features.permute(0, 3, 1, 2))
        return hq

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        hq_features: torch.Tensor,
        attention_similarity: torch.Tensor | None = None,
        target_embedding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All mask logits and IoU predictions, before output selection.

        Arguments:
          image_embeddings: ``(B, C, h, w)``.
          image_pe: ``(1, C, h, w)``.
          sparse_prompt_embeddings: ``(B, P, T, C)``.
          dense_prompt_embeddings: ``(B, C, h, w)`` or ``(B, P, C, h, w)``.
          hq_features: ``(B, C/8, 4h, 4w)`` from :meth:`compute_hq_features`.

        Returns:
          masks ``(B, P, 5, 4h, 4w)`` (4 SAM masks, then the HQ mask) and iou ``(B, P, 4)``.
        """
        B, P, T, C = sparse_prompt_embeddings.shape
        _, _, h, w = image_embeddings.shape
        dtype = image_embeddings.dtype
        out_tokens = torch.cat(
            [self.iou_token.weight, self.mask_tokens.weight, self.hf_token.weight]
        )
        tokens = torch.cat(
            [out_tokens.to(dtype).expand(B, P, -1, -1), sparse_prompt_embeddings.to(dtype)], dim=2
        ).flatten(0, 1)
        dense = dense_prompt_embeddings.to(dtype)
        if dense.dim() == 4:
            dense = dense[:, None]
        src = (image_embeddings[:, None] + dense).expand(B, P, C, h, w).reshape(B * P, C, h, w)

        hs, src = self.transformer(src, image_pe, tokens, attention_similarity, target_embedding)
        iou_token_out = hs[:, 0]
        mask_tokens_out = hs[:, 1 : 2 + self.num_mask_tokens]

        src = src.transpose(1, 2).reshape(B * P, C, h, w)
        up_sam = self.output_upscaling(src)
        c8, H, W = up_sam.shape[1:]
        up_hq = self.embedding_maskfeature(up_sam).view(B, P, c8, H, W) + hq_features[:, None]

        hyper = [mlp(mask_tokens_out[:, i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)]
        hyper_sam = torch.stack(hyper, dim=1)  # (N, 4, C/8)
        hyper_hq = self.hf_mlp(mask_tokens_out[:, self.num_mask_tokens])[:, None]  # (N, 1, C/8)
        masks_sam = hyper_sam @ up_sam.view(B * P, c8, H * W)
        masks_hq = hyper_hq @ up_hq.view(B * P, c8, H * W).to(hyper_hq.dtype)
        masks = torch.cat([masks_sam, masks_hq], dim=1).view(B, P, -1, H, W)
        iou_pred = self.iou_prediction_head(iou_token_out).view(B, P, -1)
        return masks, iou_pred

    def select_masks(
        self,
        masks: torch.Tensor,
        iou_pred: torch.Tensor,
        multimask_output: bool,
        hq_token_only: bool,
        convention: str = "official",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose the returned masks from ``(B, P, 5, H, W)`` logits and ``(B, P, 4)`` IoUs.

        ``"official"`` (SAM-HQ's SamPredictor): single mask = mask 0 + HQ mask; multimask = the ONE
        SAM mask with the best predicted IoU among masks 1-3, + HQ mask. ``"hf"`` (transformers):
        multimask = the three SAM masks sorted by predicted IoU, each + HQ mask.
        ``hq_token_only`` returns the HQ mask alone (its IoU as chosen above).
        """
        if convention not in OUTPUT_CONVENTIONS:
            raise ValueError(f"convention must be one of {OUTPUT_CONVENTIONS}, got {convention!r}")
        n = self.num_mask_tokens
        masks_hq = masks[:, :, n : n + 1]
        if not multimask_output:
            iou, masks_sam = iou_pred[:, :, 0:1], masks[:, :, 0:1]
        elif convention == "official":
            iou, idx = torch.max(iou_pred[:, :, 1:n], dim=2)
            iou = iou[..., None]
            index = (idx + 1)[..., None, None, None].expand(-1, -1, 1, *masks.shape[-2:])
            masks_sam = torch.gather(masks, 2, index)
        else:
            iou, order = torch.sort(iou_pred[:, :, 1:n], dim=2, descending=True)
            index = (order + 1)[..., None, None].expand(-1, -1, -1, *masks.shape[-2:])
            masks_sam = torch.gather(masks, 2, index)
        return (masks_hq if hq_token_only else masks_sam + masks_hq), iou

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        hq_token_only: bool,
        interm_embeddings: list[torch.Tensor] | torch.Tensor | None = None,
        hq_features: torch.Tensor | None = None,
        attention_similarity: torch.Tensor | None = None,
        target_embedding: torch.Tensor | None = None,
        convention: str = "official",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks ``(B, P, K, 4h, 4w)`` and IoU ``(B, P, K')`` (see :meth:`select_masks`).

        Pass either ``interm_embeddings`` (list whose first item is the early ViT feature
        ``(B, h, w, vit_dim)``, or that tensor) or precomputed ``hq_features``.
        """
        if hq_features is None:
            if isinstance(interm_embeddings, (list, tuple)):
                interm_embeddings = interm_embeddings[0] if len(interm_embeddings) else None
            hq_features = self.compute_hq_features(image_embeddings, interm_embeddings)
        masks, iou = self.predict_masks(
            image_embeddings,
            image_pe,
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
            hq_features,
            attention_similarity,
            target_embedding,
        )
        return self.select_masks(masks, iou, multimask_output, hq_token_only, convention)
