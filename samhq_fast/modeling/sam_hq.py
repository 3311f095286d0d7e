"""SAM-HQ: image encoder + prompt encoder + HQ mask decoder, with transformers' API.

``SamHQModel`` keeps the official module and parameter names (so an official ``.pth`` state dict
loads as is; HF checkpoints are renamed on load) and computes the official model's values, while
its ``forward`` follows transformers' ``SamHQModel`` conventions (shapes, ``-10`` padding labels,
``multimask_output=True`` giving three masks sorted by predicted IoU).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from samhq_fast.config import PRESETS, SamHQConfig, SamHQVisionConfig
from samhq_fast.modeling.image_encoder import ImageEncoderViT
from samhq_fast.modeling.mask_decoder import MaskDecoderHQ
from samhq_fast.modeling.prompt_encoder import PAD_LABEL, PromptEncoder
from samhq_fast.ops import attention as attention_ops
from samhq_fast.ops.backend import BackendUnavailableError, resolve_backend
from samhq_fast.ops.fused import build as build_fused_ops

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
VALID_LABELS = (1, 0, -1, PAD_LABEL)


class ModelOutput:
    """Dataclass output readable as attributes, by key, or by position (non-``None`` fields)."""

    def to_tuple(self) -> tuple:
        return tuple(v for v in (getattr(self, f.name) for f in fields(self)) if v is not None)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key: str | int) -> Any:
        return getattr(self, key) if isinstance(key, str) else self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())


@dataclass
class SamHQVisionEncoderOutput(ModelOutput):
    """``last_hidden_state`` ``(B, 256, h, w)``; ``intermediate_embeddings``: global-block outputs
    ``(B, h, w, C)``; ``hidden_states`` / ``attentions`` when asked."""

    image_embeds: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    intermediate_embeddings: list[torch.Tensor] | None = None


@dataclass
class SamHQImageSegmentationOutput(ModelOutput):
    """``iou_scores`` ``(B, P, K)`` and low-resolution ``pred_masks`` ``(B, P, K, 256, 256)``."""

    iou_scores: torch.Tensor | None = None
    pred_masks: torch.Tensor | None = None
    vision_hidden_states: tuple[torch.Tensor, ...] | None = None
    vision_attentions: tuple[torch.Tensor, ...] | None = None
    mask_decoder_attentions: tuple[torch.Tensor, ...] | None = None


def build_image_encoder(config: SamHQVisionConfig) -> nn.Module:
    if config.backbone == "tiny_vit":
        from samhq_fast.modeling.tiny_vit import TinyViT

        return TinyViT(config)
    return ImageEncoderViT(config)


def run_image_encoder(
    encoder: nn.Module,
    pixel_values: torch.Tensor,
    output_hidden_states: bool = False,
    output_attentions: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor], tuple | None, tuple | None]:
    """``(image_embeddings, intermediate_embeddings, hidden_states, attentions)`` for either
    backbone; TinyViT has no per-layer hidden states or attention maps to return."""
    if isinstance(encoder, ImageEncoderViT):
        return encoder(pixel_values, output_hidden_states, output_attentions)
    if output_hidden_states or output_attentions:
        raise ValueError("output_hidden_states / output_attentions are not available for vit_tiny")
    emb, interm = encoder(pixel_values)
    return emb, interm, None, None


class SamHQModel(nn.Module):
    """SAM-HQ. Build with ``SamHQModel(config)`` or load with ``SamHQModel.from_pretrained``."""

    mask_threshold: float = 0.0

    def __init__(self, config: SamHQConfig | str | None = None) -> None:
        super().__init__()
        if config is None:
            config = PRESETS["vit_h"]  # transformers' SamHQConfig() default
        elif isinstance(config, str):
            config = PRESETS[config]
        self.config = config
        self.image_encoder = build_image_encoder(config.vision_config)
        self.prompt_encoder = PromptEncoder(config.prompt_encoder_config)
        self.mask_decoder = MaskDecoderHQ(config.mask_decoder_config)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), False)
        self.backend = "reference"  # until set_backend (load_model calls it)
        self.backend_reasons: list[str] = []
        self._requested_backend = "reference"

    # ------------------------------------------------------------------ construction helpers
    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def dtype(self) -> torch.dtype:
        return self.mask_decoder.iou_token.weight.dtype

    def set_backend(self, backend: str = "auto") -> str:
        """Choose the implementation once, for the model's current device and dtype.

        ``"reference"``: the plain-PyTorch oracle (attention materialised as in the official
        code). ``"torch"``: the fast pure-PyTorch path for any device (SDPA with the decomposed
        relative-position bias, GEMMs with in-place epilogues, the fused decoder structure,
        channels-last convolutions; TinyViT with folded BatchNorm). ``"triton"``: the fused
        Triton path for the whole model (ViT blocks and neck: LayerNorm, GEMMs with
        bias/GELU/residual epilogues, rel-pos attention; decoder: two-way attention,
        LayerNorm2d+GELU, shared image keys and the folded HQ conv); raises
        ``BackendUnavailableError`` listing every reason it cannot run. ``"auto"``: Triton on a
        CUDA device where it can run, else ``"torch"``; ``self.backend_reasons`` then says why.
        Under ``"triton"`` the TinyViT encoder (vit_tiny) runs the fast PyTorch path; its
        decoder is fused, and ``backend_reasons`` says so.
        """
        resolved, reasons = resolve_backend(backend, self.device)
        self._requested_backend = backend
        enc = self.image_encoder
        vit = isinstance(enc, ImageEncoderViT)
        notes: list[str] = []
        if resolved == "triton":
            head_dim = self.config.vision_config.head_dim if vit else None
            reasons = attention_ops.triton_unsupported_reasons(head_dim, self.dtype)
            if reasons:
                if backend == "triton":
                    raise BackendUnavailableError(
                        "backend='triton' cannot run: " + "; ".join(reasons)
                    )
                resolved = "torch"
            elif not vit:
                notes = ["the TinyViT encoder (vit_tiny) runs the fast PyTorch path; decoder fused"]
        fused = build_fused_ops(resolved) if resolved != "reference" else None
        if vit:
            enc.set_attention_fn(
                fused.rel_pos_attention if fused else attention_ops.rel_pos_attention_reference
            )
            enc.set_fused(fused)
        else:
            enc.set_fast(resolved != "reference")
        self.mask_decoder.fused = fused
        self.backend, self.backend_reasons = resolved, reasons or notes
        return resolved

    def _apply(self, fn, recurse: bool = True):
        # .to() / .cuda() / .half(): with backend="auto", choose again for the new device and
        # dtype (the seed example loads on CPU, then moves the model to the GPU).
        out = super()._apply(fn, recurse)
        if self._requested_backend == "auto":
            self.set_backend("auto")
        return out

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "fp32",
        backend: str = "auto",
        **kwargs: Any,
    ) -> SamHQModel:
        """Load a preset name, hub id, HF directory or official ``.pth`` (see ``load_model``)."""
        from samhq_fast.weights import load_model

        return load_model(name_or_path, device=device, dtype=dtype, backend=backend, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write an HF-format directory: ``config.json`` + ``model.safetensors`` (HF key names)."""
        from samhq_fast.weights import save_hf_directory

        save_hf_directory(self, save_directory)

    # ------------------------------------------------------------------------- HF-style API
    def get_image_wide_positional_embeddings(self) -> torch.Tensor:
        """``(1, 256, h, w)`` positional encoding of the image embedding grid."""
        return self.prompt_encoder.get_dense_pe().to(self.dtype)

    @torch.no_grad()
    def get_image_embeddings(
        self, pixel_values: torch.Tensor, **kwargs: Any
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``pixel_values`` ``(B, 3, S, S)`` -> image embeddings ``(B, 256, h, w)`` and the
        intermediate (global-block) embeddings, as transformers returns them."""
        emb, interm, _, _ = run_image_encoder(self.image_encoder, self._check_pixels(pixel_values))
        return emb, interm

    @torch.no_grad()
    def get_prompt_embeddings(
        self,
        input_points: torch.Tensor | None = None,
        input_labels: torch.Tensor | None = None,
        input_boxes: torch.Tensor | None = None,
        input_masks: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse ``(B, P, T, 256)`` and dense ``(B, 256, h, w)`` prompt embeddings."""
        pts, lab, box, msk = self._check_prompts(
            input_points, input_labels, input_boxes, input_masks
        )
        return self.prompt_encoder(pts, lab, box, msk)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_points: torch.Tensor | None = None,
        input_labels: torch.Tensor | None = None,
        input_boxes: torch.Tensor | None = None,
        input_masks: torch.Tensor | None = None,
        image_embeddings: torch.Tensor | None = None,
        multimask_output: bool = True,
        hq_token_only: bool = False,
        attention_similarity: torch.Tensor | None = None,
        target_embedding: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        intermediate_embeddings: list[torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> SamHQImageSegmentationOutput | tuple:
        """Predict masks for ``B`` images with ``P`` prompts each (transformers' conventions).

        Arguments:
          pixel_values: ``(B, 3, S, S)`` preprocessed images (``SamHQProcessor``), or
          image_embeddings: ``(B, 256, h, w)`` from ``get_image_embeddings``, together with
            intermediate_embeddings: its list of global-block outputs ``(B, h, w, C)``.
          input_points: ``(B, P, N, 2)`` in the 1024 frame; input_labels ``(B, P, N)``
            (1 fg, 0 bg, -1 not-a-point, -10 padding; default all 1).
          input_boxes: ``(B, P, 4)``; input_masks: ``(B, 1, 256, 256)`` or ``(B, 256, 256)``.
          multimask_output: three masks sorted by predicted IoU (else mask 0), each + HQ mask.
          hq_token_only: return the HQ mask alone.

        Returns:
          ``iou_scores`` ``(B, P, K)`` and ``pred_masks`` ``(B, P, K, 256, 256)`` logits.
        """
        for key in ("original_sizes", "reshaped_input_sizes"):  # processor bookkeeping
            kwargs.pop(key, None)
        if kwargs.pop("labels", None) is not None:
            # SamHQProcessor(segmentation_maps=...) emits `labels`; transformers' SamHQModel
            # accepts and ignores them, and so do we (same outputs), but say so.
            warnings.warn(
                "`labels` (segmentation maps from the processor) are not a prompt and are "
                "ignored, as in transformers; pass input_masks=(B, 1, 256, 256) mask logits to "
                "prompt with a mask",
                stacklevel=2,
            )
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
        if (pixel_values is None) == (image_embeddings is None):
            raise ValueError("pass exactly one of pixel_values and image_embeddings")
        return_dict = True if return_dict is None else return_dict
        hidden = attentions = None
        if pixel_values is not None:
            image_embeddings, intermediate_embeddings, hidden, attentions = run_image_encoder(
                self.image_encoder,
                self._check_pixels(pixel_values),
                output_hidden_states=bool(output_hidden_states),
                output_attentions=bool(output_attentions),
            )
        elif not intermediate_embeddings:
            raise ValueError(
                "image_embeddings were given without intermediate_embeddings: SAM-HQ's HQ mask "
                "needs the early ViT feature; pass both outputs of get_image_embeddings()"
            )
        pts, lab, box, msk = self._check_prompts(
            input_points, input_labels, input_boxes, input_masks
        )
        sparse, dense = self.prompt_encoder(pts, lab, box, msk)
        n_img = image_embeddings.shape[0]
        if sparse.shape[0] not in (1, n_img) or dense.shape[0] not in (1, n_img):
            raise ValueError(
                f"prompts are given for {max(sparse.shape[0], dense.shape[0])} images but there "
                f"are {n_img} images"
            )
        sparse = sparse.expand(n_img, *sparse.shape[1:])
        masks, iou = self.mask_decoder(
            image_embeddings.to(self.dtype),
            self.get_image_wide_positional_embeddings(),
            sparse,
            dense,
            multimask_output,
            hq_token_only,
            # fp32 stays fp32 (the residual stream under fp16 weights), all else -> model dtype
            interm_embeddings=[
                e if e.dtype == torch.float32 else e.to(self.dtype) for e in intermediate_embeddings
            ],
            attention_similarity=attention_similarity,
            target_embedding=target_embedding,
            convention="hf",
        )
        out = SamHQImageSegmentationOutput(iou, masks, hidden, attentions, None)
        return out if return_dict else out.to_tuple()

    # --------------------------------------------------------------------------- validation
    def _check_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        s = self.config.vision_config.image_size
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a tensor, got {type(pixel_values).__name__}")
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, s, s):
            raise ValueError(
                f"pixel_values must have shape (B, 3, {s}, {s}) (use SamHQProcessor), "
                f"got {tuple(pixel_values.shape)}"
            )
        return pixel_values.to(self.device, self.dtype)

    def _check_prompts(self, points, labels, boxes, masks):
        dev = self.device
        if points is not None:
            points = torch.as_tensor(points, dtype=torch.float32, device=dev)
            if points.dim() != 4 or points.shape[-1] != 2:
                raise ValueError(
                    "input_points must have shape (batch, point_batch, points, 2), "
                    f"got {tuple(points.shape)}"
                )
            if not torch.isfinite(points).all():
                raise ValueError("input_points contain NaN or infinite coordinates")
            if labels is None:
                labels = torch.ones(points.shape[:-1], dtype=torch.long, device=dev)
            labels = torch.as_tensor(labels, device=dev).long()
            if labels.shape != points.shape[:-1]:
                raise ValueError(
                    f"input_labels shape {tuple(labels.shape)} does not match input_points "
                    f"{tuple(points.shape[:-1])}"
                )
            bad = torch.unique(labels[~torch.isin(labels, labels.new_tensor(VALID_LABELS))])
            if bad.numel():
                raise ValueError(f"input_labels must be in {VALID_LABELS}, got {bad.tolist()}")
        elif labels is not None:
            raise ValueError("input_labels were given without input_points")
        if boxes is not None:
            boxes = torch.as_tensor(boxes, dtype=torch.float32, device=dev)
            if boxes.dim() != 3 or boxes.shape[-1] != 4:
                raise ValueError(
                    f"input_boxes must have shape (batch, boxes, 4), got {tuple(boxes.shape)}"
                )
            if not torch.isfinite(boxes).all():
                raise ValueError("input_boxes contain NaN or infinite coordinates")
            if points is not None and boxes.shape[:2] != points.shape[:2]:
                raise ValueError(
                    "with points and boxes, give one box per point set: input_boxes "
                    f"{tuple(boxes.shape[:2])} vs input_points {tuple(points.shape[:2])}"
                )
        if masks is not None:
            masks = torch.as_tensor(masks, device=dev)
            m = self.prompt_encoder.mask_input_size
            if masks.dim() == 3:
                masks = masks[:, None]
            if masks.dim() not in (4, 5) or tuple(masks.shape[-3:]) != (1, *m):
                raise ValueError(
                    f"input_masks must have shape (B, {m[0]}, {m[1]}), (B, 1, {m[0]}, {m[1]}) "
                    f"or (B, P, 1, {m[0]}, {m[1]}), got {tuple(masks.shape)}"
                )
            masks = masks.float()
        return points, labels, boxes, masks


class SamHQVisionModel(nn.Module):
    """The image encoder alone, with transformers' ``SamHQVisionModel`` outputs."""

    def __init__(self, config: SamHQVisionConfig | SamHQConfig | None = None) -> None:
        super().__init__()
        if isinstance(config, SamHQConfig):
            config = config.vision_config
        self.config = config or PRESETS["vit_h"].vision_config
        self.vision_encoder = build_image_encoder(self.config)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> SamHQVisionModel:
        full = SamHQModel.from_pretrained(name_or_path, **kwargs)
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.config = full.config.vision_config
        model.vision_encoder = full.image_encoder
        return model

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> SamHQVisionEncoderOutput | tuple:
        """``pixel_values`` ``(B, 3, S, S)`` -> ``last_hidden_state`` ``(B, 256, h, w)``,
        ``intermediate_embeddings`` and, when asked, ``hidden_states`` / ``attentions``."""
        p = next(self.vision_encoder.parameters())
        emb, interm, hidden, attn = run_image_encoder(
            self.vision_encoder,
            pixel_values.to(p.device, p.dtype),
            output_hidden_states=bool(output_hidden_states),
            output_attentions=bool(output_attentions),
        )
        out = SamHQVisionEncoderOutput(None, emb, hidden, attn, interm)
        if return_dict is False:
            return (emb, interm) + tuple(x for x in (hidden, attn) if x is not None)
        return out
