"""``Predictor``: SAM-HQ's ``SamPredictor`` API, with a stateless, thread-safe core.

Two layers:

* stateless: ``embedding = predictor.embed(images)`` returns a frozen :class:`ImageEmbedding`
  (image embeddings, the per-image HQ features computed once, and the image sizes);
  ``predictor.decode(embedding, ...)`` / ``predictor.decode_batch(embedding, ...)`` read no
  predictor state, so one ``Predictor`` can serve many threads;
* the official ``SamPredictor`` calls on top: ``set_image``, ``predict``, ``predict_torch``,
  ``get_image_embedding``, ``reset_image``, ``is_image_set``, plus ``set_image_batch`` and
  ``predict_batch``.

Pre-processing (identical to the official ``SamPredictor``): the image is converted to RGB
``uint8`` (:func:`samhq_fast.image.to_rgb_uint8`; paths are read with EXIF orientation), its
longest side is resized to the model's input size with PIL bilinear *on the host* (the same
resize as ``SamHQProcessor`` and the official ``ResizeLongestSide.apply_image``), then moved to
the device where it is normalised as the official ``Sam.preprocess`` does
(``(x - 255 * mean) / (255 * std)`` in fp32) and zero-padded bottom / right.

Output selection (the SAM-HQ rule, which surprises users): with ``multimask_output=True`` the
official SAM-HQ predictor returns ONE mask, the SAM mask with the best predicted IoU among the
three multimask outputs (masks 1-3), plus the HQ mask. ``return_all_masks=True`` returns the three
SAM masks instead, each plus the HQ mask, sorted by predicted IoU (transformers' convention).
``multimask_output=False`` gives SAM mask 0 plus the HQ mask; ``hq_token_only=True`` gives the HQ
mask alone.
"""

from __future__ import annotations

import operator
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from samhq_fast.contract import (
    Prompts,
    check_flag,
    check_index,
    check_positive_int,
    preprocess_shape,
    validate_image,
    validate_prompts,
)
from samhq_fast.modeling.sam_hq import PIXEL_MEAN, PIXEL_STD, SamHQModel, run_image_encoder
from samhq_fast.runtime import (
    PROMPT_BUCKETS,
    DecoderRunner,
    FirstUseGuard,
    check_buckets,
    resolve_cuda_graphs,
)

__all__ = ["ImageEmbedding", "ImageNotSetError", "Predictor"]

ImageInput = Any  # PIL image, numpy array, torch tensor, str or os.PathLike


class ImageNotSetError(ValueError, RuntimeError):
    """``predict`` was called before ``set_image`` (a ``ValueError`` and, as in the official
    predictor, a ``RuntimeError``)."""


@dataclass(frozen=True)
class ImageEmbedding:
    """Everything the decoder needs about ``B`` images; immutable, safe to share.

    Attributes:
      image_embeddings: ``(B, 256, h, w)`` (64x64 for the released models), model dtype/device.
      hq_features: ``(B, 32, 4h, 4w)`` HQ features (image embedding + early ViT feature).
      original_sizes: per image ``(H, W)`` before resizing.
      input_sizes: per image ``(h, w)`` after resizing the longest side to the model's input.
    """

    image_embeddings: torch.Tensor
    hq_features: torch.Tensor
    original_sizes: tuple[tuple[int, int], ...]
    input_sizes: tuple[tuple[int, int], ...]

    def __len__(self) -> int:
        return len(self.original_sizes)

    def __getitem__(self, index: int) -> ImageEmbedding:
        """The embedding of image ``index`` alone (a batch of one)."""
        if isinstance(index, (bool, np.bool_)) or not hasattr(index, "__index__"):
            raise TypeError(f"image index must be an integer, got {type(index).__name__}")
        index, n = operator.index(index), len(self)
        if not -n <= index < n:
            raise IndexError(f"image index {index} out of range for {n} images")
        i = index % n
        return ImageEmbedding(
            self.image_embeddings[i : i + 1],
            self.hq_features[i : i + 1],
            (self.original_sizes[i],),
            (self.input_sizes[i],),
        )


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class Predictor:
    """SAM-HQ predictor with the official ``SamPredictor`` interface.

    Args:
      model: a preset (``"vit_b"``, ``"vit_l"``, ``"vit_h"``, ``"vit_tiny"``), a hub id, a local
        path (official ``.pth`` or HF directory), or a :class:`SamHQModel` instance (used as is).
      device: default ``"cuda"`` when available, else ``"cpu"`` (ignored for an instance).
      dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (ignored for an instance).
      backend: ``"auto"``, ``"reference"``, ``"torch"`` or ``"triton"`` (ignored for an instance).
      compile: wrap the image encoder and the mask decoder in ``torch.compile`` (``True`` for
        inductor, or a ``torch.compile`` backend name). The Triton kernels are custom ops with
        fake implementations, so compile traces around them. Decoder calls are padded to
        ``prompt_buckets`` (compile then sees a few shapes, not one per prompt count).
      cuda_graphs: capture the mask decoder as one CUDA graph per (images, prompt bucket,
        prompt tokens) shape and replay it (the decoder is ~80 small kernels, bound by
        launch latency: a replay launches them all at once). Default ``None``: on when the model
        is on CUDA, with every backend, compiled or not; off on CPU. ``False`` turns it off,
        ``True`` on a CPU model is a ``ValueError``. A replay copies the prompts into the
        graph's inputs; the image embeddings and HQ features are copied once per image (while
        calls keep passing the same embedding, nothing is copied).
      prompt_buckets: prompt counts a decoder call is padded to under ``compile`` /
        ``cuda_graphs`` (larger calls are split into chunks of the largest bucket).

    Compilation and graph capture happen on the first call of each shape; call :meth:`warmup`
    to pay that cost up front (it returns what it cost).

    Thread safety: :meth:`embed`, :meth:`decode` and :meth:`decode_batch` use no predictor
    state. ``set_image`` / ``predict`` keep one current image, like the official predictor;
    share one ``Predictor`` between threads through ``embed`` / ``decode`` instead.
    """

    def __init__(
        self,
        model: str | os.PathLike | SamHQModel = "vit_b",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "fp32",
        backend: str = "auto",
        compile: bool | str = False,
        cuda_graphs: bool | None = None,
        prompt_buckets: Sequence[int] = PROMPT_BUCKETS,
    ) -> None:
        if isinstance(model, SamHQModel):
            self.model = model.eval()
        else:
            from samhq_fast.weights import load_model

            self.model = load_model(
                model, device=device or _default_device(), dtype=dtype, backend=backend
            )
        self.model.requires_grad_(False)
        cfg = self.model.config
        self.image_size: int = cfg.vision_config.image_size
        self.mask_input_size: tuple[int, int] = tuple(self.model.prompt_encoder.mask_input_size)
        self.mask_threshold: float = float(self.model.mask_threshold)
        dev = self.model.device
        self._mean = torch.tensor(PIXEL_MEAN, device=dev).view(1, 3, 1, 1)
        self._std = torch.tensor(PIXEL_STD, device=dev).view(1, 3, 1, 1)
        self._image_pe = self.model.get_image_wide_positional_embeddings()
        encoder, decoder = self.model.image_encoder, self.model.mask_decoder

        def encode(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            emb, interm, _, _ = run_image_encoder(encoder, pixels)
            return emb, decoder.compute_hq_features(emb, interm[0] if interm else None)

        if not isinstance(compile, (bool, str)):
            raise TypeError(f"compile must be a bool or a backend name, got {compile!r}")
        if cuda_graphs is not None:
            cuda_graphs = check_flag(cuda_graphs, "cuda_graphs")
        cuda_graphs = resolve_cuda_graphs(cuda_graphs, dev)
        self.compile, self.cuda_graphs = compile, cuda_graphs
        self._encode = encode
        predict = decoder.predict_masks
        if compile:
            kw = {} if compile is True else {"backend": compile}
            # Shapes are static per encoder batch size; the decoder's prompt dimension becomes
            # dynamic after the first recompile (torch's automatic dynamic shapes), so the
            # buckets cost a compile or two, not one each.
            self._encode = torch.compile(encode, **kw)
            predict = torch.compile(decoder.predict_masks, **kw)
        # Thread safety of first use: a new batch size autotunes / compiles alone.
        self._encode = FirstUseGuard(self._encode)
        use_buckets = bool(compile) or cuda_graphs
        self._predict_masks = DecoderRunner(
            predict, prompt_buckets if use_buckets else None, cuda_graphs, decoder.prepare_fused
        )
        self.prompt_buckets = check_buckets(prompt_buckets)
        self.warmup_report: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._embedding: ImageEmbedding | None = None

    # ------------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def is_image_set(self) -> bool:
        return self._embedding is not None

    @property
    def original_size(self) -> tuple[int, int] | None:
        """``(H, W)`` of the current image (the first one after ``set_image_batch``)."""
        return None if self._embedding is None else self._embedding.original_sizes[0]

    @property
    def input_size(self) -> tuple[int, int] | None:
        """``(h, w)`` of the current image after resizing."""
        return None if self._embedding is None else self._embedding.input_sizes[0]

    @property
    def embedding(self) -> ImageEmbedding | None:
        """The current :class:`ImageEmbedding` (``None`` before ``set_image``)."""
        return self._embedding

    # ------------------------------------------------------------------- pre-processing
    def get_preprocess_shape(self, h: int, w: int) -> tuple[int, int]:
        """``(h, w)`` after resizing the longest side to the model input (``int(x * s + 0.5)``,
        at least one pixel)."""
        return preprocess_shape(h, w, self.image_size)

    def _resize(self, rgb: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        new_h, new_w = self.get_preprocess_shape(h, w)
        if (new_h, new_w) == (h, w):
            return rgb
        # np.array (not asarray): a writable copy, so torch.from_numpy does not warn.
        return np.array(Image.fromarray(rgb).resize((new_w, new_h), Image.Resampling.BILINEAR))

    def preprocess(self, images: Sequence[ImageInput], image_format: str = "RGB") -> tuple:
        """Images -> ``(pixel_values (B, 3, S, S) in the model dtype, original sizes, input
        sizes)``; PIL resize on the host, normalisation and padding on the device."""
        s = self.image_size
        pixels = torch.zeros(len(images), 3, s, s, device=self.device, dtype=torch.float32)
        originals, inputs = [], []
        for i, image in enumerate(images):
            rgb = validate_image(image, image_format)
            resized = self._resize(rgb)
            if not resized.flags.writeable:
                resized = resized.copy()
            h, w = resized.shape[:2]
            x = torch.from_numpy(resized).to(self.device).permute(2, 0, 1)[None]
            pixels[i : i + 1, :, :h, :w] = (x - self._mean) / self._std
            originals.append((int(rgb.shape[0]), int(rgb.shape[1])))
            inputs.append((int(h), int(w)))
        return pixels.to(self.dtype), tuple(originals), tuple(inputs)

    # ------------------------------------------------------------------ stateless core
    @torch.inference_mode()
    def embed(
        self,
        images: ImageInput | Sequence[ImageInput],
        image_format: str = "RGB",
        batch_size: int = 8,
    ) -> ImageEmbedding:
        """Run the image encoder.

        Args:
          images: one image or a list / tuple of images: PIL images, ``(H, W, 3)`` / ``(H, W)``
            numpy arrays (uint8, or see :func:`samhq_fast.image.to_rgb_uint8`), torch tensors,
            or file paths.
          image_format: ``"RGB"`` or ``"BGR"`` (channel order of array inputs).
          batch_size: images per encoder call.

        Returns:
          :class:`ImageEmbedding` with ``B`` images (``B = 1`` for a single image).
        """
        batch_size = check_positive_int(batch_size, "batch_size")
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("images is an empty list")
            images = list(images)
        else:
            images = [images]
        embs, hqs, originals, inputs = [], [], [], []
        for start in range(0, len(images), batch_size):
            pixels, orig, inp = self.preprocess(images[start : start + batch_size], image_format)
            emb, hq = self._encode(pixels)
            embs.append(emb)
            hqs.append(hq)
            originals += orig
            inputs += inp
        return ImageEmbedding(torch.cat(embs), torch.cat(hqs), tuple(originals), tuple(inputs))

    def validate_prompts(
        self,
        original_size: tuple[int, int],
        point_coords: Any = None,
        point_labels: Any = None,
        box: Any = None,
        mask_input: Any = None,
        **kwargs: Any,
    ) -> Prompts:
        """:func:`samhq_fast.contract.validate_prompts` with this model's input and mask sizes."""
        return validate_prompts(
            point_coords, point_labels, box, mask_input, original_size=original_size,
            image_size=self.image_size, mask_input_size=self.mask_input_size, **kwargs,
        )  # fmt: skip

    def _n_outputs(self, multimask_output: bool, hq_token_only: bool, all_masks: bool) -> int:
        if hq_token_only or not multimask_output or not all_masks:
            return 1
        return self.model.mask_decoder.num_multimask_outputs

    def _select(self, masks, iou, multimask_output, hq_token_only, return_all_masks):
        convention = "hf" if return_all_masks else "official"
        low, scores = self.model.mask_decoder.select_masks(
            masks, iou, multimask_output, hq_token_only, convention
        )
        if hq_token_only and scores.shape[-1] != low.shape[2]:
            scores = scores[..., :1]
        return low, scores

    def postprocess_masks(
        self,
        low_res: torch.Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
        return_logits: bool = False,
    ) -> torch.Tensor:
        """``(..., m, m)`` logits -> ``(..., H, W)``: bilinear to ``S x S``, crop the padding,
        bilinear to the original size, then ``> 0`` unless ``return_logits``."""
        lead = low_res.shape[:-2]
        x = low_res.reshape(-1, 1, *low_res.shape[-2:]).float()
        x = F.interpolate(x, (self.image_size,) * 2, mode="bilinear", align_corners=False)
        x = x[..., : input_size[0], : input_size[1]]
        x = F.interpolate(x, tuple(original_size), mode="bilinear", align_corners=False)
        x = x.reshape(*lead, *x.shape[-2:])
        return x if return_logits else x > self.mask_threshold

    def _flags(
        self, multimask_output: Any, hq_token_only: Any, return_logits: Any, return_all_masks: Any
    ) -> tuple[bool, bool, bool, bool]:
        return (
            check_flag(multimask_output, "multimask_output"),
            check_flag(hq_token_only, "hq_token_only"),
            check_flag(return_logits, "return_logits"),
            check_flag(return_all_masks, "return_all_masks"),
        )

    def _empty(
        self, original_size: tuple[int, int], flags: tuple[bool, bool, bool, bool]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The results of an empty prompt set: ``(0, C, H, W)``, ``(0, C)``, ``(0, C, m, m)``."""
        multimask, hq_only, logits, all_masks = flags
        c, dev = self._n_outputs(multimask, hq_only, all_masks), self.device
        return (
            torch.zeros(0, c, *original_size, device=dev, dtype=torch.float32 if logits else bool),
            torch.zeros(0, c, device=dev),
            torch.zeros(0, c, *self.mask_input_size, device=dev),
        )

    @torch.inference_mode()
    def _decode_torch(
        self,
        embedding: ImageEmbedding,
        index: int,
        prompts: Prompts,
        flags: tuple[bool, bool, bool, bool],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One image, validated prompts -> masks ``(P, C, H, W)``, scores ``(P, C)``, low-res
        logits ``(P, C, m, m)`` (tensors on the device)."""
        i = index
        if prompts.is_empty:
            return self._empty(embedding.original_sizes[i], flags)
        multimask, hq_only, logits, all_masks = flags
        points, labels, boxes, masks = prompts.to_torch(self.device)
        sparse, dense = self.model.prompt_encoder(
            None if points is None else points[None],
            None if labels is None else labels[None],
            None if boxes is None else boxes[None],
            None if masks is None else masks[None],
        )
        all_out, iou = self._predict_masks(
            embedding.image_embeddings[i : i + 1],
            self._image_pe,
            sparse,
            dense,
            embedding.hq_features[i : i + 1],
        )
        low, scores = self._select(all_out, iou, multimask, hq_only, all_masks)
        low, scores = low[0], scores[0]
        out = self.postprocess_masks(
            low, embedding.input_sizes[i], embedding.original_sizes[i], logits
        )
        return out, scores.float(), low.float()

    def _check_embedding(self, embedding: Any, image_index: Any) -> int:
        if not isinstance(embedding, ImageEmbedding):
            raise ValueError(
                f"embedding must be an ImageEmbedding from Predictor.embed(), got "
                f"{type(embedding).__name__}"
            )
        return check_index(image_index, len(embedding), "image_index")

    def decode(
        self,
        embedding: ImageEmbedding,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        hq_token_only: bool = False,
        return_logits: bool = False,
        return_all_masks: bool = False,
        image_index: int = 0,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Stateless :meth:`predict` on image ``image_index`` of ``embedding`` (thread-safe).

        See :meth:`predict` for the arguments and return values.
        """
        i = self._check_embedding(embedding, image_index)
        flags = self._flags(multimask_output, hq_token_only, return_logits, return_all_masks)
        prompts = self.validate_prompts(
            embedding.original_sizes[i], point_coords, point_labels, box, mask_input
        )
        return self.decode_prompts(embedding, prompts, *flags, image_index=i)

    def decode_prompts(
        self,
        embedding: ImageEmbedding,
        prompts: Prompts,
        multimask_output: bool = True,
        hq_token_only: bool = False,
        return_logits: bool = False,
        return_all_masks: bool = False,
        image_index: int = 0,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`decode` of prompts already checked by :func:`samhq_fast.contract.
        validate_prompts` (or :meth:`validate_prompts`) for this image and model: a service
        validates a request first (and answers a refusal with a 4xx), then decodes."""
        i = self._check_embedding(embedding, image_index)
        flags = self._flags(multimask_output, hq_token_only, return_logits, return_all_masks)
        if not isinstance(prompts, Prompts):
            raise TypeError(
                f"prompts must be a Prompts from validate_prompts(), got {type(prompts).__name__}"
            )
        if (prompts.original_size, prompts.image_size) != (
            embedding.original_sizes[i],
            self.image_size,
        ):
            raise ValueError(
                f"prompts were validated for a {prompts.original_size} image and a "
                f"{prompts.image_size}-pixel model, not for image {i} "
                f"({embedding.original_sizes[i]}) of this {self.image_size}-pixel model"
            )
        out = self._decode_torch(embedding, i, prompts, flags)
        masks, scores, low = (x.cpu().numpy() for x in out)
        if prompts.batched:
            return masks, scores, low
        return masks[0], scores[0], low[0]

    def decode_batch(
        self,
        embedding: ImageEmbedding,
        point_coords: Sequence[np.ndarray | None] | None = None,
        point_labels: Sequence[np.ndarray | None] | None = None,
        boxes: Sequence[np.ndarray | None] | None = None,
        multimask_output: bool = True,
        hq_token_only: bool = False,
        return_logits: bool = False,
        return_all_masks: bool = False,
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Decode prompts for every image of ``embedding`` in one batched decoder call.

        Args:
          embedding: ``B`` images from :meth:`embed`.
          point_coords: ``None`` or a list of ``B`` items, each ``None``, ``(N, 2)`` (one prompt)
            or ``(P_i, N, 2)`` (``P_i`` prompts of ``N`` points), in original-image pixels.
          point_labels: like ``point_coords`` without the last dimension (default all 1).
          boxes: ``None`` or a list of ``B`` items, each ``None``, ``(4,)`` or ``(P_i, 4)``; with
            points, one box per point set (or one box / point set shared by all prompts).
          multimask_output, hq_token_only, return_logits, return_all_masks: as in :meth:`predict`.

        Returns:
          a list of ``B`` tuples ``(masks (P_i, C, H_i, W_i), scores (P_i, C), logits
          (P_i, C, m, m))``; an image without prompts (``None``, or ``P_i = 0`` as ``(0, 4)``
          boxes) gets ``P_i = 0``.

        Ragged prompt counts ``P_i`` are padded to the largest (the padding prompts' outputs are
        discarded). Ragged point counts are NOT padded with ``-10`` labels (padding tokens still
        take part in attention and change the masks): images are grouped by their prompt token
        count, and each group is decoded in one call (one call when all images agree).
        """
        self._check_embedding(embedding, 0)
        flags = self._flags(multimask_output, hq_token_only, return_logits, return_all_masks)
        multimask, hq_only, logits, all_masks = flags
        n = len(embedding)
        lists = {}
        for name, v in (("point_coords", point_coords), ("point_labels", point_labels),
                        ("boxes", boxes)):  # fmt: skip
            if v is None:
                v = [None] * n
            elif not isinstance(v, (list, tuple)) and getattr(v, "ndim", 0) == 0:
                raise TypeError(
                    f"{name} must be a list of {n} per-image items (or None), got "
                    f"{type(v).__name__}"
                )
            if len(v) != n:
                raise ValueError(f"{name} has {len(v)} items for {n} images")
            lists[name] = v
        pe = self.model.prompt_encoder
        prepared: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        with torch.inference_mode():
            for i in range(n):
                prompts = self.validate_prompts(
                    embedding.original_sizes[i],
                    lists["point_coords"][i],
                    lists["point_labels"][i],
                    lists["boxes"][i],
                    where=f"image {i}",
                )
                if prompts.is_empty or not prompts.has_sparse:
                    prepared.append(None)
                    continue
                pts, lab, bxs, _ = prompts.to_torch(self.device)
                sparse, _ = pe(
                    None if pts is None else pts[None],
                    None if lab is None else lab[None],
                    None if bxs is None else bxs[None],
                )
                prepared.append(sparse[0])  # (P_i, T, C)
        groups: dict[int, list[int]] = {}
        for i, sp in enumerate(prepared):
            if sp is not None:
                groups.setdefault(sp.shape[1], []).append(i)
        results: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = [None] * n
        for idx in groups.values():
            p_max = max(prepared[i].shape[0] for i in idx)
            sparse = torch.stack(
                [torch.cat([prepared[i], prepared[i][-1:].expand(p_max - len(prepared[i]), -1, -1)])
                 for i in idx]
            )  # fmt: skip
            with torch.inference_mode():
                emb, hq = embedding.image_embeddings, embedding.hq_features
                if idx != list(range(n)):  # the whole batch as is: graphs need not recopy it
                    sel = torch.tensor(idx, device=emb.device)
                    emb, hq = emb.index_select(0, sel), hq.index_select(0, sel)
                dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                    len(idx), -1, *emb.shape[-2:]
                )
                all_out, iou = self._predict_masks(emb, self._image_pe, sparse, dense, hq)
                low, scores = self._select(all_out, iou, multimask, hq_only, all_masks)
                for j, i in enumerate(idx):
                    p = prepared[i].shape[0]
                    lo = low[j, :p]
                    out = self.postprocess_masks(
                        lo, embedding.input_sizes[i], embedding.original_sizes[i], logits
                    )
                    results[i] = (
                        out.cpu().numpy(),
                        scores[j, :p].float().cpu().numpy(),
                        lo.float().cpu().numpy(),
                    )
        for i in range(n):
            if results[i] is None:
                results[i] = tuple(
                    x.cpu().numpy() for x in self._empty(embedding.original_sizes[i], flags)
                )
        return results

    @torch.inference_mode()
    def warmup(
        self,
        batch_sizes: Sequence[int] = (1,),
        prompt_counts: Sequence[int] | None = None,
        prompt_tokens: Sequence[int] = (2,),
    ) -> dict[str, Any]:
        """Compile / autotune / capture now instead of on the first requests.

        Runs the encoder once per batch size and the decoder once per prompt count (default:
        every bucket) and prompt token count (2 = one point, or one box; a point + box is 3;
        ``N`` points are ``N + 1``), on dummy inputs.

        Returns (and keeps as ``self.warmup_report``) the cost: ``{"encoder_s": {batch: s},
        "decoder_s": {"PxT": s}, "total_s": s}``, wall-clock seconds including compilation.
        """
        counts = self.prompt_buckets if prompt_counts is None else tuple(prompt_counts)
        dev, dt = self.device, self.dtype
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        report: dict[str, Any] = {"encoder_s": {}, "decoder_s": {}}
        start = time.perf_counter()
        emb = hq = None
        for b in batch_sizes:
            t0 = time.perf_counter()
            pixels = torch.zeros(b, 3, self.image_size, self.image_size, device=dev, dtype=dt)
            emb, hq = self._encode(pixels)
            sync()
            report["encoder_s"][int(b)] = time.perf_counter() - t0
        if emb is None:
            emb, hq = self._encode(
                torch.zeros(1, 3, self.image_size, self.image_size, device=dev, dtype=dt)
            )
        emb, hq = emb[:1], hq[:1]
        pe = self.model.prompt_encoder
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(1, -1, *emb.shape[-2:])
        for p in counts:
            for t in prompt_tokens:
                t0 = time.perf_counter()
                sparse = torch.zeros(1, p, t, pe.embed_dim, device=dev, dtype=dt)
                self._predict_masks(emb, self._image_pe, sparse, dense, hq)
                sync()
                report["decoder_s"][f"{p}x{t}"] = time.perf_counter() - t0
        report["total_s"] = time.perf_counter() - start
        self.warmup_report = report
        return report

    # -------------------------------------------------------------- SamPredictor API
    def set_image(self, image: ImageInput, image_format: str = "RGB") -> None:
        """Compute and keep the embedding of one image (PIL, ``(H, W, 3)`` uint8 array, tensor,
        or path). Replaces any previous image."""
        emb = self.embed(image, image_format)
        with self._lock:
            self._embedding = emb

    def set_image_batch(self, images: Sequence[ImageInput], image_format: str = "RGB") -> None:
        """Compute and keep the embeddings of several images (for :meth:`predict_batch`)."""
        emb = self.embed(list(images), image_format)
        with self._lock:
            self._embedding = emb

    def reset_image(self) -> None:
        """Forget the current image."""
        with self._lock:
            self._embedding = None

    def _current(self) -> ImageEmbedding:
        emb = self._embedding
        if emb is None:
            raise ImageNotSetError(
                "no image is set: call set_image first (or use embed() + decode())"
            )
        return emb

    def get_image_embedding(self) -> torch.Tensor:
        """The current image embeddings ``(B, 256, h, w)`` (``B = 1`` after ``set_image``)."""
        return self._current().image_embeddings

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        hq_token_only: bool = False,
        return_logits: bool = False,
        return_all_masks: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predict masks for the current image (coordinates in original-image pixels).

        Args:
          point_coords: ``(N, 2)`` points (x, y); ``(P, N, 2)`` for ``P`` prompts at once.
          point_labels: ``(N,)`` (or ``(P, N)``): 1 foreground, 0 background, -1 not a point;
            default all 1.
          box: ``(4,)`` (x1, y1, x2, y2), or ``(K, 4)`` for ``K`` prompts decoded together (with
            points, the points are shared by every box). Boxes beyond the image are clipped to
            it with a warning.
          mask_input: ``(1, m, m)`` low-resolution logits from a previous call (``m`` = 256 for
            the released models), or ``(K, 1, m, m)``.
          multimask_output: SAM-HQ's rule: ONE mask, the best of SAM's three multimask outputs by
            predicted IoU, plus the HQ mask (not three masks). ``False``: SAM mask 0 + HQ mask.
          hq_token_only: return the HQ mask alone.
          return_logits: return the upscaled logits instead of booleans.
          return_all_masks: with ``multimask_output``, return SAM's three masks, each + HQ
            mask, sorted by predicted IoU (transformers' convention), ``C = 3``.

        With no prompt at all the model runs as SAM does (no sparse tokens, the no-mask dense
        embedding) and returns its "whole-image" guess. An empty prompt set (``(0, 4)`` boxes,
        ``(0, N, 2)`` points or ``(0, 1, m, m)`` masks) returns empty outputs ``(0, C, H, W)``,
        ``(0, C)``, ``(0, C, m, m)`` without running the model. The input contract (types,
        shapes, ranges, flags) is :mod:`samhq_fast.contract`'s; a refusal is a ``ValueError`` or
        ``TypeError`` naming the argument.

        Returns:
          masks ``(C, H, W)`` bool (float logits with ``return_logits``), scores ``(C,)``,
          low-res logits ``(C, m, m)``; with a leading prompt dimension (``(K, 4)`` boxes,
          ``(P, N, 2)`` points or ``(K, 1, m, m)`` masks) every output gains it: ``(K, C, H, W)``.
        """
        return self.decode(
            self._current(), point_coords, point_labels, box, mask_input,
            multimask_output, hq_token_only, return_logits, return_all_masks,
        )  # fmt: skip

    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        hq_token_only: bool = False,
        return_all_masks: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Official ``predict_torch``: prompts already in the model's input frame, batched.

        Args:
          point_coords: ``(B, N, 2)``; point_labels ``(B, N)`` (``None``: all 1); boxes ``(B, 4)``
            (or ``(4,)``); mask_input ``(B, 1, m, m)`` (``B`` prompts of the current image).
            Tensors (any device), arrays or lists, checked as :meth:`predict`'s prompts
            (:mod:`samhq_fast.contract`) except that they are not rescaled or clipped.

        Returns:
          masks ``(B, C, H, W)``, scores ``(B, C)``, low-res logits ``(B, C, m, m)`` (tensors on
          the model's device); ``B = 0`` gives empty tensors of those shapes.
        """
        emb = self._current()
        flags = self._flags(multimask_output, hq_token_only, return_logits, return_all_masks)
        prompts = self.validate_prompts(
            emb.original_sizes[0], point_coords, point_labels, boxes, mask_input,
            frame="model", prompt_dim=True,
        )  # fmt: skip
        return self._decode_torch(emb, 0, prompts, flags)

    def predict_batch(
        self,
        point_coords: Sequence[np.ndarray | None] | None = None,
        point_labels: Sequence[np.ndarray | None] | None = None,
        boxes: Sequence[np.ndarray | None] | None = None,
        multimask_output: bool = True,
        hq_token_only: bool = False,
        return_logits: bool = False,
        return_all_masks: bool = False,
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """:meth:`decode_batch` on the images of :meth:`set_image_batch`."""
        return self.decode_batch(
            self._current(), point_coords, point_labels, boxes,
            multimask_output, hq_token_only, return_logits, return_all_masks,
        )  # fmt: skip
