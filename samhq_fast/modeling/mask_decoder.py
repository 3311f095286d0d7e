"""HQ mask decoder of SAM-HQ (Ke et al. 2023), after the official ``MaskDecoderHQ``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from samhq_fast.config import SamHQMaskDecoderConfig
from samhq_fast.modeling.common import MLP, LayerNorm2d
from samhq_fast.modeling.transformer import TwoWayTransformer, derived_weights
from samhq_fast.ops.fused import FusedOps

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
        self.fused: FusedOps | None = None  # set by SamHQModel.set_backend

    def compute_hq_features(
        self, image_embeddings: torch.Tensor, vit_features: torch.Tensor | None
    ) -> torch.Tensor:
        """Per-image HQ features ``(B, C/8, 4h, 4w)``.

        ``image_embeddings`` ``(B, C, h, w)``; ``vit_features`` ``(B, h, w, vit_dim)``, the early
        ViT feature (``None`` drops that term, as transformers does without intermediates), in
        the model dtype or fp32 (the encoder's residual stream under half weights).
        """
        if self.fused is not None and self.fused.backend == "torch":
            return self._compute_hq_features_fused(self.fused, image_embeddings, vit_features)
        hq = self.embedding_encoder(image_embeddings)
        if vit_features is not None:
            up1, ln, act, up2 = self.compress_vit_feat
            v = vit_features.permute(0, 3, 1, 2)
            if v.dtype != up1.weight.dtype:
                # An fp32 residual stream under half weights (it may exceed fp16's range): the
                # first transposed conv runs in fp32, its LayerNorm brings values back to O(1).
                b = up1.bias.float() if up1.bias is not None else None
                y = F.conv_transpose2d(v.float(), up1.weight.float(), b, stride=up1.stride)
            else:
                y = up1(v)
            hq = hq + up2(act(ln(y).to(hq.dtype)))
        return hq

    def _compute_hq_features_fused(
        self, ops: FusedOps, image_embeddings: torch.Tensor, vit_features: torch.Tensor | None
    ) -> torch.Tensor:
        """:meth:`compute_hq_features` through ``ops`` (its convolutions and LayerNorm2d+GELU)."""
        ct1, ln, _, ct2 = self.embedding_encoder
        y = ops.conv_transpose2d(image_embeddings, ct1.weight, ct1.bias, ct1.stride)
        y = ops.layer_norm_2d(y, ln.weight, ln.bias, ln.eps, "gelu")
        hq = ops.conv_transpose2d(y, ct2.weight, ct2.bias, ct2.stride)
        if vit_features is not None:
            up1, ln, _, up2 = self.compress_vit_feat
            v = vit_features.permute(0, 3, 1, 2)
            if v.dtype != up1.weight.dtype:  # fp32 residual stream under half weights: fp32
                b = up1.bias.float() if up1.bias is not None else None
                y = ops.conv_transpose2d(v.float(), up1.weight.float(), b, up1.stride)
            else:
                y = ops.conv_transpose2d(v, up1.weight, up1.bias, up1.stride)
            y = ops.layer_norm_2d(y, ln.weight, ln.bias, ln.eps, "gelu").to(hq.dtype)
            hq = hq + ops.conv_transpose2d(y, up2.weight, up2.bias, up2.stride)
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
        if self.fused is not None and attention_similarity is None and target_embedding is None:
            return self._predict_masks_fused(
                self.fused,
                image_embeddings,
                image_pe,
                sparse_prompt_embeddings,
                dense_prompt_embeddings,
                hq_features,
            )
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

    def _predict_masks_fused(
        self,
        ops: FusedOps,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        hq_features: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`predict_masks` through fused ops, with two exact savings (ANCHORS.md 5):

        * a dense prompt per image (no mask prompt, or one per image) makes the first block's
          image side identical for the image's ``P`` prompts: it is projected once per image;
        * the HQ mask ``hyper_hq . (conv2(g) + b2 + hq_features)`` is computed as a per-prompt
          64->1 convolution of ``g`` with ``sum_o hyper_hq[o] * conv2.weight[o]``, plus
          ``hyper_hq . b2`` and ``hyper_hq . hq_features``: conv2's 64->32 channels are never
          materialised.
        """
        B, P, T, C = sparse_prompt_embeddings.shape
        _, _, h, w = image_embeddings.shape
        dtype = image_embeddings.dtype
        N = B * P
        out_tokens = self._output_tokens()
        tokens = torch.cat(
            [out_tokens.to(dtype).expand(B, P, -1, -1), sparse_prompt_embeddings.to(dtype)], dim=2
        ).flatten(0, 1)
        dense = dense_prompt_embeddings.to(dtype)
        if dense.dim() == 4:  # shared by the image's prompts
            src, group = image_embeddings + dense, P
        else:
            src, group = (image_embeddings[:, None] + dense).flatten(0, 1), 1
        hs, keys = self.transformer.forward_fused(ops, src, image_pe, tokens, group)
        src = keys.transpose(1, 2).reshape(N, C, h, w)
        ct1, ln, _, ct2, _ = self.output_upscaling
        up = ops.conv_transpose2d(src, ct1.weight, ct1.bias, ct1.stride)
        up = ops.layer_norm_2d(up, ln.weight, ln.bias, ln.eps, "gelu")
        up_sam = F.gelu(ops.conv_transpose2d(up, ct2.weight, ct2.bias, ct2.stride))  # (N,C/8,H,W)
        c8, H, W = up_sam.shape[1:]

        conv1, ln, _, conv2 = self.embedding_maskfeature
        g = ops.conv2d(up_sam, conv1.weight, conv1.bias, 1, conv1.padding)
        g = ops.layer_norm_2d(g, ln.weight, ln.bias, ln.eps, "gelu")  # (N, C/4, H, W)

        hyper, iou_pred = self._heads_batched(hs)  # (N, 5, C/8), (N, 4)
        hyper_sam, hyper_hq = hyper[:, : self.num_mask_tokens], hyper[:, self.num_mask_tokens]
        masks_sam = hyper_sam @ up_sam.reshape(N, c8, H * W)
        w_fp32, b_fp32 = self._hq_conv_fp32()
        hyper_hq32 = hyper_hq.float()
        w2 = (hyper_hq32 @ w_fp32).view(N, *conv2.weight.shape[1:])
        hq = ops.conv2d(g.reshape(1, -1, H, W), w2.to(g.dtype), None, 1, 1, 1, N)  # (1, N, H, W)
        hq_bias = hyper_hq32 @ b_fp32  # (N,)
        hq_feat = hyper_hq.view(B, P, c8) @ hq_features.to(dtype).flatten(2)  # (B, P, H*W)
        masks_hq = (hq.reshape(B, P, H * W).float() + hq_bias.view(B, P, 1) + hq_feat.float()).to(
            masks_sam.dtype
        )
        masks = torch.cat([masks_sam.view(B, P, -1, H * W), masks_hq[:, :, None]], dim=2)
        return masks.view(B, P, -1, H, W), iou_pred.view(B, P, -1)

    def _output_tokens(self) -> torch.Tensor:
        """``[iou token, mask tokens, HQ token]`` weights, concatenated once."""
        return derived_weights(self).get(
            "output_tokens",
            [self.iou_token.weight, self.mask_tokens.weight, self.hf_token.weight],
            torch.cat,
        )

    def _hq_conv_fp32(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``embedding_maskfeature``'s last conv as fp32 ``(C/8, C/4 * 9)`` weight and bias, for
        the folded HQ conv."""
        conv2 = self.embedding_maskfeature[3]
        d = derived_weights(self)
        w = d.get("hq_conv.weight", [conv2.weight], lambda w: w[0].flatten(1).float())
        return w, d.get("hq_conv.bias", [conv2.bias], lambda b: b[0].float())

    def _head_mlps(self) -> tuple[list[MLP], int]:
        """The MLPs on the output tokens, in token order (IoU token, 4 SAM mask tokens, HQ
        token), and how many leading layers they share shapes in: the IoU head joins the
        hypernetworks for its layers whose shapes match theirs (all but the last in the released
        models), the hypernetworks are batched for all their layers."""
        hyper = [*self.output_hypernetworks_mlps, self.hf_mlp]
        shapes = [lin.weight.shape for lin in self.hf_mlp.layers]
        iou = [lin.weight.shape for lin in self.iou_prediction_head.layers]
        shared = 0
        while shared < min(len(iou), len(shapes)) - 1 and iou[shared] == shapes[shared]:
            shared += 1
        return [self.iou_prediction_head, *hyper], shared

    def head_weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer of the hypernetworks, the weights ``(G, in, out)`` and biases
        ``(G, 1, out)`` of the token MLPs batched there stacked (see :meth:`_head_mlps`; built
        once, see ``DerivedWeights``)."""
        mlps, shared = self._head_mlps()
        d = derived_weights(self)
        out = []
        for i in range(len(self.hf_mlp.layers)):
            layers = [m.layers[i] for m in (mlps if i < shared else mlps[1:])]
            w = d.get(
                f"heads{i}.weight",
                [lin.weight for lin in layers],
                lambda ws: torch.stack(ws).transpose(1, 2).contiguous(),
            )
            b = d.get(
                f"heads{i}.bias", [lin.bias for lin in layers], lambda bs: torch.stack(bs)[:, None]
            )
            out.append((w, b))
        return out

    def _heads_batched(self, hs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The 5 hypernetwork MLPs and the IoU head on the output tokens ``hs[:, :6]`` ->
        hypernetwork outputs ``(N, 5, C/8)`` and IoU ``(N, 4)``.

        One batched GEMM (``baddbmm``, the bias in its epilogue) per layer instead of one per
        MLP, ReLU in place between layers; the IoU head shares the batched layers whose shapes
        match and runs its others alone. Same products as the per-MLP path, another summation
        order (fp32 rounding level)."""
        mlps, shared = self._head_mlps()
        x = hs[:, : len(mlps)].transpose(0, 1)  # (6, N, C)
        layers = self.head_weights()
        iou_x = None
        for i, (w, b) in enumerate(layers):
            if i == shared:  # the IoU token leaves the batch
                iou_x, x = x[0], x[1:]
            x = torch.baddbmm(b.to(x.dtype), x, w.to(x.dtype))
            if i < len(layers) - 1:
                x = x.relu_()
        iou_layers = self.iou_prediction_head.layers
        for i in range(shared, len(iou_layers)):
            iou_x = F.linear(iou_x, iou_layers[i].weight, iou_layers[i].bias)
            if i < len(iou_layers) - 1:
                iou_x = iou_x.relu_()
        return x.transpose(0, 1), iou_x

    def prepare_fused(self) -> None:
        """Build, or refresh after a weight change, the derived weights of the fused path (merged
        projections, stacked hypernetworks). Cheap when nothing changed; the decoder runner calls
        it before every call (a CUDA graph replay runs no Python that could do it)."""
        if self.fused is None:
            return
        self.transformer.prepare_fused()
        self.head_weights()
        self._output_tokens()
        self._hq_conv_fp32()

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
