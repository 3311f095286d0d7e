"""The three implementations under one interface, holding the same weights.

Random, non-trivial weights are made once per preset in the official model (``tests/_weights.py``:
``build_official`` / ``build_official_tiny`` + ``perturb_``) and written as an official ``.pth``;
ours loads that file with ``samhq_fast.load_model``; transformers' ``SamHQModel`` gets the same
tensors renamed (``official_to_hf``), as ``tests/_weights.build_hf`` does, but built with an
explicit ``attn_implementation`` (``"sdpa"``, its fastest): ``build_hf`` builds a default config
whose sub-configs keep the eager attention layers even though the top-level config then reads
``"sdpa"``.

Every implementation exposes the same three operations, each returning tensors in one layout:

* ``encode(pixels (B, 3, S, S))`` -> ``(image_embeddings (B, 256, h, w), early ViT feature
  (B, h, w, C))``;
* ``decode(emb, interm, points | boxes, hq_token_only)`` for ``P`` prompts of one image ->
  ``(low-res mask logits (P, 1, 4h, 4w), iou (P, 1))`` with ``multimask_output=False`` (SAM mask 0
  + HQ mask, or the HQ mask alone: the same output in all three);
* ``segment(image (H, W, 3) uint8, point)`` -> ``(masks (1, H, W) bool, low-res logits
  (1, 4h, 4w))``: the predictor / processor path a user runs on a photo.

``tests/`` must be on ``sys.path`` (``bench/conftest.py`` puts it there): the official package is
always imported through ``tests/_official.import_official``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from samhq_fast import load_model
from samhq_fast.config import PRESETS, SamHQConfig
from samhq_fast.modeling.sam_hq import SamHQModel, run_image_encoder
from samhq_fast.weights import official_to_hf, parse_dtype

IMPLS = ("ours", "official", "hf")
IMPL_LABELS = {"ours": "samhq_fast", "official": "segment_anything_hq", "hf": "transformers"}
# The attention path each peer runs: the official code has only one; transformers' fastest.
PEER_BACKENDS = {"official": "eager", "hf": "sdpa"}
HF_ATTN_IMPLEMENTATION = "sdpa"


class PeerUnavailable(RuntimeError):
    """This implementation cannot run this case (the message says why)."""


@dataclass
class Weights:
    """One set of random weights: the fp32 official model (CPU) and its ``.pth`` file."""

    name: str
    config: SamHQConfig
    official: nn.Module
    pth: Path

    @property
    def is_tiny(self) -> bool:
        return self.config.vision_config.backbone == "tiny_vit"


def make_weights(
    name: str, directory: Path, seed: int = 0, config: SamHQConfig | None = None
) -> Weights:
    """Perturbed official model for preset ``name`` (or ``config``), saved to ``directory``."""
    from _weights import build_official, build_official_tiny, perturb_, save_official_pth

    config = config or PRESETS[name]
    torch.manual_seed(seed)
    if config.vision_config.backbone == "tiny_vit":
        official = build_official_tiny(config.vision_config.image_size)
    else:
        official = build_official(config)
    perturb_(official, seed=seed)
    official.eval().requires_grad_(False)  # TinyViT caches its attention biases in eval()
    path = Path(directory) / f"sam_hq_{name}.pth"
    save_official_pth(official, path)
    return Weights(name, config, official, path)


# ----------------------------------------------------------------------------- builders
def build_ours(w: Weights, device: str, dtype: str, backend: str = "torch") -> SamHQModel:
    """``backend``: ``"torch"``, ``"triton"``, ``"compile"`` (the torch path; the caller wraps
    the call in ``torch.compile``) or ``"fast"`` (the triton path, compiled, decoder graphs)."""
    load_backend = {"compile": "torch", "fast": "triton"}.get(backend, backend)
    return load_model(w.pth, device=device, dtype=dtype, backend=load_backend)


def build_official_model(w: Weights, device: str, dtype: str) -> nn.Module:
    model = copy.deepcopy(w.official).to(device=device, dtype=parse_dtype(dtype))
    return model.train(False).requires_grad_(False)  # re-cache TinyViT biases in the new dtype


def build_hf_model(w: Weights, device: str, dtype: str, attn: str = HF_ATTN_IMPLEMENTATION):
    if w.is_tiny:
        raise PeerUnavailable("transformers has no TinyViT (vit_tiny) SAM-HQ")
    from transformers import SamHQConfig as HFConfig
    from transformers import SamHQModel as HFModel

    hf = HFModel(HFConfig(**w.config.to_hf_dict(), attn_implementation=attn))
    missing, unexpected = hf.load_state_dict(official_to_hf(w.official.state_dict()), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"HF weights do not match: missing {missing}, unexpected {unexpected}")
    hf = hf.to(device=device, dtype=parse_dtype(dtype)).eval().requires_grad_(False)
    kinds = hf_attention_classes(hf)
    if attn == "sdpa" and not all("Sdpa" in k for k in kinds.values()):
        raise RuntimeError(f"transformers did not build SDPA attention layers: {kinds}")
    return hf


def hf_attention_classes(hf: nn.Module) -> dict[str, str]:
    """Class names of the vision and decoder attention layers (to record what ran)."""
    return {
        "vision": type(hf.vision_encoder.layers[0].attn).__name__,
        "decoder": type(hf.mask_decoder.transformer.layers[0].self_attn).__name__,
    }


def build(impl: str, w: Weights, device: str, dtype: str, backend: str) -> nn.Module:
    if impl == "ours":
        return build_ours(w, device, dtype, backend)
    if impl == "official":
        return build_official_model(w, device, dtype)
    if impl == "hf":
        return build_hf_model(w, device, dtype)
    raise ValueError(f"unknown implementation {impl!r}")


# --------------------------------------------------------------------------- operations
def encoder_fn(
    impl: str, model: nn.Module, compile: bool = False
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``pixels -> (image_embeddings, early ViT feature)`` under ``torch.inference_mode``."""
    if impl == "ours":
        encoder = model.image_encoder

        def run(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            emb, interm, _, _ = run_image_encoder(encoder, pixels)
            return emb, interm[0]

    elif impl == "official":
        encoder = model.image_encoder

        def run(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            emb, interm = encoder(pixels)
            return emb, interm[0]

    elif impl == "hf":

        def run(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            emb, interm = model.get_image_embeddings(pixels)
            return emb, interm[0]

    else:
        raise ValueError(impl)
    if compile:
        run = torch.compile(run)

    def call(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            return run(pixels)

    return call


@dataclass(frozen=True)
class Prompts:
    """``P`` prompts for one image in the model's input frame: one point each or one box each."""

    kind: str  # "points" or "boxes"
    coords: torch.Tensor  # points (P, 1, 2) or boxes (P, 4), float32
    labels: torch.Tensor | None  # (P, 1) for points

    @property
    def count(self) -> int:
        return self.coords.shape[0]

    @property
    def sparse_tokens(self) -> int:
        return 2  # a point + the padding point, or the two box corners

    def to(self, device: str | torch.device) -> Prompts:
        labels = None if self.labels is None else self.labels.to(device)
        return Prompts(self.kind, self.coords.to(device), labels)


def make_prompts(kind: str, count: int, image_size: int = 1024, seed: int = 0) -> Prompts:
    g = torch.Generator().manual_seed(seed)
    if kind == "points":
        coords = torch.rand(count, 1, 2, generator=g) * image_size
        return Prompts(kind, coords, torch.ones(count, 1, dtype=torch.long))
    if kind == "boxes":
        lo = torch.rand(count, 2, generator=g) * image_size * 0.6
        size = (0.1 + 0.3 * torch.rand(count, 2, generator=g)) * image_size
        return Prompts(kind, torch.cat([lo, lo + size], dim=1), None)
    raise ValueError(f"prompt kind must be 'points' or 'boxes', got {kind!r}")


def decoder_fn(
    impl: str, model: nn.Module, hq_token_only: bool, compile: bool = False, fast: bool = False
) -> Callable[[torch.Tensor, torch.Tensor, Prompts], tuple[torch.Tensor, torch.Tensor]]:
    """``(emb (1, 256, h, w), interm (1, h, w, C), prompts) -> (logits (P, 1, 4h, 4w), iou
    (P, 1))``: prompt encoder + HQ decoder, HQ features computed in the call (as the official
    decoder does), ``multimask_output=False``.

    ``fast`` (ours): the ``Predictor(compile=True)`` decoder path: HQ features computed once per
    image (cached, as ``set_image`` does), prompts padded to buckets, compiled, one CUDA graph per
    bucket."""
    if impl == "ours" and fast:
        from samhq_fast import Predictor

        predictor = Predictor(model, compile=True)
        pe, dec = model.prompt_encoder, model.mask_decoder
        cache: dict[int, torch.Tensor] = {}

        def run(emb: torch.Tensor, interm: torch.Tensor, p: Prompts):
            key = id(emb)
            if key not in cache:  # per image, at set_image time in the Predictor
                cache.clear()
                cache[key] = dec.compute_hq_features(emb, interm)
            if p.kind == "points":
                sparse, dense = pe(p.coords[None], p.labels[None], None, None)
            else:
                sparse, dense = pe(None, None, p.coords[None], None)
            masks, iou = predictor._predict_masks(
                emb, predictor._image_pe, sparse, dense, cache[key]
            )
            low, score = dec.select_masks(masks, iou, False, hq_token_only, "official")
            return low[0], score[0]

    elif impl == "ours":

        def run(emb: torch.Tensor, interm: torch.Tensor, p: Prompts):
            pe = model.prompt_encoder
            if p.kind == "points":
                sparse, dense = pe(p.coords[None], p.labels[None], None, None)
            else:
                sparse, dense = pe(None, None, p.coords[None], None)
            masks, iou = model.mask_decoder(
                emb,
                model.get_image_wide_positional_embeddings(),
                sparse,
                dense,
                False,
                hq_token_only,
                interm_embeddings=[interm],
                convention="official",
            )
            return masks[0], iou[0]

    elif impl == "official":

        def run(emb: torch.Tensor, interm: torch.Tensor, p: Prompts):
            # float32 coordinates, as the official SamPredictor passes them (its prompt encoder
            # then fails in bf16: the benchmark records that as a skip).
            sparse, dense = model.prompt_encoder(
                points=(p.coords, p.labels) if p.kind == "points" else None,
                boxes=p.coords if p.kind == "boxes" else None,
                masks=None,
            )
            return model.mask_decoder(
                image_embeddings=emb,
                image_pe=model.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
                hq_token_only=hq_token_only,
                interm_embeddings=[interm],
            )

    elif impl == "hf":

        def run(emb: torch.Tensor, interm: torch.Tensor, p: Prompts):
            kwargs: dict[str, Any] = {}
            if p.kind == "points":
                kwargs.update(input_points=p.coords[None], input_labels=p.labels[None])
            else:
                kwargs.update(input_boxes=p.coords[None])
            out = model(
                image_embeddings=emb,
                intermediate_embeddings=[interm],
                multimask_output=False,
                hq_token_only=hq_token_only,
                **kwargs,
            )
            return out.pred_masks[0], out.iou_scores[0]

    else:
        raise ValueError(impl)
    if compile:
        run = torch.compile(run, dynamic=True)

    def call(emb: torch.Tensor, interm: torch.Tensor, p: Prompts):
        with torch.inference_mode():
            return run(emb, interm, p)

    return call


def synthetic_image(height: int = 1000, width: int = 1500, seed: int = 0) -> np.ndarray:
    """A deterministic ``(H, W, 3)`` uint8 photo stand-in: gradients, discs, boxes, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin(x / 37.0 + y / 53.0)], -1) * 160
    for _ in range(12):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.03, 0.15) * min(height, width)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    for _ in range(6):
        x0, y0 = rng.uniform(0, width * 0.8), rng.uniform(0, height * 0.8)
        box = (x >= x0) & (x < x0 + rng.uniform(50, 300)) & (y >= y0) & (y < y0 + 200)
        img[box] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def segment_fn(
    impl: str, model: nn.Module, compile: bool = False
) -> Callable[[np.ndarray, tuple[float, float]], tuple[torch.Tensor, torch.Tensor]]:
    """``(image (H, W, 3) uint8, point (x, y) in image pixels) -> (masks (1, H, W) bool,
    low-res logits (1, 4h, 4w) float32)``, ``multimask_output=False``, through each library's
    own user path: our ``Predictor``, the official ``SamPredictor``, transformers'
    ``SamHQProcessor`` + ``SamHQModel`` + ``post_process_masks``."""
    if impl == "ours":
        from samhq_fast import Predictor

        predictor = Predictor(model, compile=compile)

        def run(image: np.ndarray, point: tuple[float, float]):
            predictor.set_image(image)
            masks, _, low = predictor.predict(
                point_coords=np.array([point]), point_labels=np.array([1]), multimask_output=False
            )
            return torch.from_numpy(masks), torch.from_numpy(low)

    elif impl == "official":
        from _official import import_official

        predictor = import_official().SamPredictor(model)

        def run(image: np.ndarray, point: tuple[float, float]):
            predictor.set_image(image)
            masks, _, low = predictor.predict(
                point_coords=np.array([point]), point_labels=np.array([1]), multimask_output=False
            )
            return torch.from_numpy(masks), torch.from_numpy(low).float()

    elif impl == "hf":
        from transformers import SamHQProcessor, SamImageProcessor

        processor = SamHQProcessor(SamImageProcessor())
        param = next(model.parameters())

        def run(image: np.ndarray, point: tuple[float, float]):
            inputs = processor(images=image, input_points=[[list(point)]], return_tensors="pt")
            with torch.inference_mode():
                out = model(
                    pixel_values=inputs["pixel_values"].to(param.device, param.dtype),
                    input_points=inputs["input_points"].to(param.device),
                    multimask_output=False,
                )
            low = out.pred_masks.float().cpu()
            masks = processor.image_processor.post_process_masks(
                low, inputs["original_sizes"], inputs["reshaped_input_sizes"]
            )
            return masks[0][0], low[0, 0]

    else:
        raise ValueError(impl)
    if compile and impl != "ours":
        raise ValueError("compile is benchmarked for our implementation only")
    return run
