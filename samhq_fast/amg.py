"""Automatic mask generation ("segment everything") with SAM-HQ, batched on the device.

Same interface, record fields and meanings as the official ``SamAutomaticMaskGenerator``: a grid
of single-point prompts per crop, filtering by predicted IoU and stability score, box NMS within
each crop and across crops. Everything up to the final records stays on the model's device:
prompt batches, stability scores, thresholds, boxes, NMS and run-length encoding; only the
records come back to the host.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from itertools import product
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from samhq_fast.contract import (
    check_flag,
    check_positive_int,
    check_real,
    validate_image,
)
from samhq_fast.image import is_image_like
from samhq_fast.predictor import ImageEmbedding, Predictor

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")
_UPSAMPLE_ELEMENTS = 1 << 25  # logits upsampled at once: 128 MB in fp32
_BATCH_KEYS = ("masks", "boxes", "iou_preds", "points", "stability_score")


# ----------------------------------------------------------------------------- geometry
def build_point_grid(n_per_side: int) -> np.ndarray:
    """``(n * n, 2)`` points in [0, 1]^2 at the centres of an ``n x n`` grid, x fastest."""
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale: int) -> list[np.ndarray]:
    return [build_point_grid(int(n_per_side / (scale**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(
    im_size: tuple[int, int], n_layers: int, overlap_ratio: float
) -> tuple[list[list[int]], list[int]]:
    """The whole image, then ``(2**i)**2`` overlapping crops in layer ``i`` (XYXY, ints)."""
    im_h, im_w = im_size
    short = min(im_h, im_w)
    boxes, layers = [[0, 0, im_w, im_h]], [0]
    for i in range(n_layers):
        n = 2 ** (i + 1)
        overlap = int(overlap_ratio * short * (2 / n))
        crop_w = int(math.ceil((overlap * (n - 1) + im_w) / n))
        crop_h = int(math.ceil((overlap * (n - 1) + im_h) / n))
        x0s = [int((crop_w - overlap) * j) for j in range(n)]
        y0s = [int((crop_h - overlap) * j) for j in range(n)]
        for x0, y0 in product(x0s, y0s):
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(i + 1)
    return boxes, layers


def batched_mask_to_box(masks: torch.Tensor) -> torch.Tensor:
    """``(N, H, W)`` bool -> ``(N, 4)`` XYXY boxes (inclusive pixel indices; 0s if empty)."""
    if masks.numel() == 0:
        return torch.zeros(*masks.shape[:-2], 4, device=masks.device, dtype=torch.long)
    h, w = masks.shape[-2:]
    rows, cols = masks.any(dim=-1), masks.any(dim=-2)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    bottom = (rows * ar_h).amax(dim=-1)
    top = torch.where(rows, ar_h, h).amin(dim=-1)
    right = (cols * ar_w).amax(dim=-1)
    left = torch.where(cols, ar_w, w).amin(dim=-1)
    out = torch.stack([left, top, right, bottom], dim=-1)
    empty = (right < left) | (bottom < top)
    return out * (~empty)[..., None]


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    return inter / (box_area(a)[:, None] + box_area(b)[None, :] - inter)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression (torchvision's semantics), on the boxes' device.

    Greedy NMS keeps box ``j`` iff no kept box ranked before it overlaps it by more than the
    threshold. That recursion depends only on earlier boxes, so iterating
    ``keep[j] = not any(kept i < j suppresses j)`` from all-True reaches its unique fixed point
    after as many rounds as the longest suppression chain (a handful), each one mat-vec.
    Returns the kept indices in decreasing score order.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = torch.argsort(scores, descending=True, stable=True)
    b = boxes[order].double()
    suppress = (box_iou(b, b) > iou_threshold).triu(diagonal=1).double()
    keep = torch.ones(len(order), dtype=torch.double, device=boxes.device)
    while True:
        new = (suppress.T @ keep == 0).double()
        if torch.equal(new, keep):
            break
        keep = new
    return order[keep.bool()]


def calculate_stability_score(masks: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """IoU of the masks thresholded at ``threshold + offset`` and ``threshold - offset``."""
    inter = (masks > threshold + offset).sum((-1, -2), dtype=torch.int64)
    union = (masks > threshold - offset).sum((-1, -2), dtype=torch.int64)
    return inter / union


def is_box_near_crop_edge(
    boxes: torch.Tensor, crop_box: list[int], orig_box: list[int], atol: float = 20.0
) -> torch.Tensor:
    """Boxes (in crop coordinates) touching a crop edge that is not an image edge."""
    crop = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    orig = torch.as_tensor(orig_box, dtype=torch.float, device=boxes.device)
    boxes = (boxes + crop[[0, 1, 0, 1]]).float()
    near_crop = torch.isclose(boxes, crop[None], atol=atol, rtol=0)
    near_image = torch.isclose(boxes, orig[None], atol=atol, rtol=0)
    return (near_crop & ~near_image).any(dim=1)


# ------------------------------------------------------------------------------------ RLE
def mask_to_rle(masks: torch.Tensor) -> list[dict[str, Any]]:
    """``(N, H, W)`` bool -> uncompressed COCO RLEs (column-major run lengths, starting with
    the count of zeros). Run boundaries are found on the device; one transfer for the batch."""
    n, h, w = masks.shape
    if n == 0:
        return []
    flat = masks.transpose(1, 2).flatten(1)
    change = (flat[:, 1:] ^ flat[:, :-1]).nonzero().cpu().numpy()
    first = flat[:, 0].cpu().numpy()
    splits = np.searchsorted(change[:, 0], np.arange(n + 1))
    out = []
    for i in range(n):
        idx = change[splits[i] : splits[i + 1], 1] + 1
        bounds = np.concatenate([[0], idx, [h * w]])
        counts = np.diff(bounds).tolist()
        out.append({"size": [h, w], "counts": ([0] if first[i] else []) + counts})
    return out


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Uncompressed (or COCO string) RLE -> ``(H, W)`` bool."""
    h, w = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = coco_string_to_counts(counts)
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    if flat.size != h * w:
        raise ValueError(f"RLE counts sum to {flat.size}, expected {h} x {w} = {h * w}")
    return flat.reshape(w, h).T


def area_from_rle(rle: dict[str, Any]) -> int:
    return int(sum(rle["counts"][1::2]))


def counts_to_coco_string(counts: Sequence[int]) -> str:
    """COCO's compressed RLE string (pycocotools' ``rleToString``): delta-coded from the count
    two back, 5 bits per character with a continuation bit, offset by 48."""
    chars = []
    for i, x in enumerate(counts):
        x = int(x) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            chars.append(chr(c + 48 + (0x20 if more else 0)))
    return "".join(chars)


def coco_string_to_counts(s: str | bytes) -> list[int]:
    """Inverse of :func:`counts_to_coco_string` (pycocotools' ``rleFrString``)."""
    if isinstance(s, bytes):
        s = s.decode("ascii")
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def coco_encode_rle(rle: dict[str, Any]) -> dict[str, Any]:
    return {"size": list(rle["size"]), "counts": counts_to_coco_string(rle["counts"])}


# ----------------------------------------------------------------------- small regions
def remove_small_regions(
    mask: np.ndarray, area_thresh: float, mode: str
) -> tuple[np.ndarray, bool]:
    """Fill holes (``mode="holes"``) or drop islands (``"islands"``) smaller than
    ``area_thresh`` pixels, 8-connected as the official OpenCV version. Needs scipy
    (``pip install samhq-fast[amg]``)."""
    try:
        from scipy import ndimage
    except ImportError as e:
        raise ImportError(
            "min_mask_region_area > 0 needs scipy: pip install scipy (or samhq-fast[amg])"
        ) from e
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    holes = mode == "holes"
    work = holes ^ mask
    regions, n = ndimage.label(work, structure=np.ones((3, 3), dtype=int))
    sizes = np.bincount(regions.ravel(), minlength=n + 1)[1:]
    small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if not small:
        return mask, False
    fill = [0] + small
    if not holes:
        fill = [i for i in range(n + 1) if i not in fill]
        if not fill:
            fill = [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill), True


# ------------------------------------------------------------------------------ generator
def _check_grid(grid: Any, i: int) -> np.ndarray:
    """A point grid: ``(n, 2)`` real numbers in [0, 1] (fractions of the crop's width, height)."""
    if isinstance(grid, torch.Tensor):
        grid = grid.detach().cpu().numpy()
    try:
        g = np.asarray(grid)
    except (ValueError, TypeError) as e:
        raise ValueError(f"point_grids[{i}] is not a rectangular array: {e}") from None
    if not (np.issubdtype(g.dtype, np.integer) or np.issubdtype(g.dtype, np.floating)):
        raise TypeError(f"point_grids[{i}] must hold real numbers, got dtype {g.dtype}")
    if g.ndim != 2 or g.shape[1] != 2 or len(g) == 0:
        raise ValueError(f"point_grids[{i}] must have shape (n, 2) with n >= 1, got {g.shape}")
    g = g.astype(np.float64)
    if not (np.isfinite(g).all() and g.min() >= 0 and g.max() <= 1):
        raise ValueError(f"point_grids[{i}] must hold finite fractions in [0, 1]")
    return g


class AutomaticMaskGenerator:
    """Segment everything: masks for a grid of point prompts, filtered and de-duplicated.

    Arguments are the official ``SamAutomaticMaskGenerator``'s, plus ``hq_token_only`` and
    ``multimask_output`` (SAM-HQ's rule: one mask per point, the best of masks 1-3 + HQ mask).
    ``points_per_batch`` prompts are decoded per call; larger is faster where memory allows.
    ``output_mode``: ``"binary_mask"`` (``(H, W)`` bool arrays), ``"uncompressed_rle"`` or
    ``"coco_rle"`` (COCO's compressed strings, written here: no pycocotools needed).
    ``min_mask_region_area > 0`` removes small holes and islands (needs scipy).
    """

    def __init__(
        self,
        predictor_or_model: Predictor | Any,
        points_per_side: int | None = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: list[np.ndarray] | None = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        hq_token_only: bool = False,
        multimask_output: bool = True,
    ) -> None:
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("give exactly one of points_per_side and point_grids")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
        points_per_batch = check_positive_int(points_per_batch, "points_per_batch")
        crop_n_layers = check_positive_int(crop_n_layers, "crop_n_layers", minimum=0)
        crop_n_points_downscale_factor = check_positive_int(
            crop_n_points_downscale_factor, "crop_n_points_downscale_factor"
        )
        pred_iou_thresh = check_real(pred_iou_thresh, "pred_iou_thresh")
        stability_score_thresh = check_real(stability_score_thresh, "stability_score_thresh")
        stability_score_offset = check_real(stability_score_offset, "stability_score_offset")
        box_nms_thresh = check_real(box_nms_thresh, "box_nms_thresh", 0.0, 1.0)
        crop_nms_thresh = check_real(crop_nms_thresh, "crop_nms_thresh", 0.0, 1.0)
        crop_overlap_ratio = check_real(crop_overlap_ratio, "crop_overlap_ratio", 0.0, 1.0)
        min_mask_region_area = check_real(min_mask_region_area, "min_mask_region_area", 0.0)
        hq_token_only = check_flag(hq_token_only, "hq_token_only")
        multimask_output = check_flag(multimask_output, "multimask_output")
        if points_per_side is not None:
            points_per_side = check_positive_int(points_per_side, "points_per_side")
            point_grids = build_all_layer_point_grids(
                points_per_side, crop_n_layers, crop_n_points_downscale_factor
            )
        point_grids = [_check_grid(g, i) for i, g in enumerate(point_grids)]
        if len(point_grids) < crop_n_layers + 1:
            raise ValueError(
                f"point_grids has {len(point_grids)} grids; crop_n_layers={crop_n_layers} needs "
                f"{crop_n_layers + 1}"
            )
        if min_mask_region_area > 0:
            remove_small_regions(np.zeros((1, 1), bool), 1, "holes")  # fail now if no scipy
        self.predictor = (
            predictor_or_model
            if isinstance(predictor_or_model, Predictor)
            else Predictor(predictor_or_model)
        )
        self.point_grids = point_grids
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self.hq_token_only = hq_token_only
        self.multimask_output = multimask_output

    # ------------------------------------------------------------------ public API
    @torch.inference_mode()
    def generate(self, image: Any) -> list[dict[str, Any]]:
        """Records for one image (path, PIL image or ``HxWx3`` uint8 array), each with
        ``segmentation``, ``area``, ``bbox`` (XYWH), ``predicted_iou``, ``point_coords``,
        ``stability_score`` and ``crop_box`` (XYWH), as the official generator."""
        return self.generate_batch([image])[0]

    @torch.inference_mode()
    def generate_batch(self, images: Iterable[Any]) -> list[list[dict[str, Any]]]:
        """:meth:`generate` for several images; all crops of an image are encoded in one batch."""
        if is_image_like(images) or isinstance(images, (str, os.PathLike)):
            raise TypeError("generate_batch takes a list of images; use generate() for one image")
        return [self._generate_one(validate_image(img)) for img in images]

    # ------------------------------------------------------------------ pipeline
    def _generate_one(self, image: np.ndarray) -> list[dict[str, Any]]:
        orig_size = image.shape[:2]
        crop_boxes, layers = generate_crop_boxes(
            orig_size, self.crop_n_layers, self.crop_overlap_ratio
        )
        crops = [image[y0:y1, x0:x1] for x0, y0, x1, y1 in crop_boxes]
        embedding = self.predictor.embed(crops)
        parts = [
            self._process_crop(embedding, i, crop_boxes[i], layers[i], orig_size)
            for i in range(len(crop_boxes))
        ]
        data = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k != "rles"}
        data["rles"] = [r for p in parts for r in p["rles"]]
        if len(crop_boxes) > 1 and len(data["rles"]):
            scores = 1 / box_area(data["crop_boxes"].double())  # prefer masks of smaller crops
            keep = nms(data["boxes"].float(), scores, self.crop_nms_thresh)
            data = _filter(data, keep)
        if self.min_mask_region_area > 0:
            data = self._postprocess_small_regions(data)
        return self._records(data)

    def _process_crop(
        self,
        embedding: ImageEmbedding,
        index: int,
        crop_box: list[int],
        layer: int,
        orig_size: tuple[int, int],
    ) -> dict[str, Any]:
        x0, y0, x1, y1 = crop_box
        crop_h, crop_w = y1 - y0, x1 - x0
        points = self.point_grids[layer] * np.array([[crop_w, crop_h]], dtype=np.float64)
        in_h, in_w = embedding.input_sizes[index]
        scale = np.array([[in_w / crop_w, in_h / crop_h]])
        dev = self.predictor.device
        in_points = torch.as_tensor(points * scale, device=dev, dtype=torch.float32)
        batches = []
        for s in range(0, len(points), self.points_per_batch):
            batches.append(
                self._process_batch(
                    embedding,
                    index,
                    in_points[s : s + self.points_per_batch],
                    torch.as_tensor(points[s : s + self.points_per_batch], device=dev),
                    crop_box,
                    orig_size,
                )  # fmt: skip
            )
        data = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        keep = nms(data["boxes"].float(), data["iou_preds"], self.box_nms_thresh)
        data = _filter(data, keep)
        offset = torch.tensor([x0, y0, x0, y0], device=dev)
        data["boxes"] = data["boxes"] + offset
        data["points"] = data["points"] + offset[:2].to(data["points"].dtype)
        data["rles"] = mask_to_rle(_uncrop_masks(data.pop("masks"), crop_box, *orig_size))
        data["crop_boxes"] = torch.tensor([crop_box] * len(data["rles"]), device=dev).reshape(-1, 4)
        return data

    def _process_batch(
        self,
        embedding: ImageEmbedding,
        index: int,
        in_points: torch.Tensor,
        points: torch.Tensor,
        crop_box: list[int],
        orig_size: tuple[int, int],
    ) -> dict[str, torch.Tensor]:
        """Decode one batch of single-point prompts and keep the masks that pass the filters.

        The predicted-IoU filter runs on the low-resolution logits, before upsampling; the
        survivors are upsampled in chunks of bounded size (large images, dense grids)."""
        pred = self.predictor
        labels = torch.ones(len(in_points), 1, dtype=torch.long, device=in_points.device)
        sparse, dense = pred.model.prompt_encoder(in_points[None, :, None], labels[None])
        all_masks, iou_all = pred._predict_masks(
            embedding.image_embeddings[index : index + 1],
            pred._image_pe,
            sparse,
            dense,
            embedding.hq_features[index : index + 1],
        )
        low, iou = pred._select(
            all_masks, iou_all, self.multimask_output, self.hq_token_only, False
        )
        c = low.shape[2]
        low, iou = low[0].flatten(0, 1), iou[0].flatten(0, 1).float()
        points = points.repeat_interleave(c, dim=0)
        keep = iou > self.pred_iou_thresh if self.pred_iou_thresh > 0 else torch.ones_like(iou) > 0
        low, iou, points = low[keep], iou[keep], points[keep]
        h, w = orig_size
        crop_h, crop_w = crop_box[3] - crop_box[1], crop_box[2] - crop_box[0]
        chunk = max(1, _UPSAMPLE_ELEMENTS // (crop_h * crop_w))
        out: dict[str, list[torch.Tensor]] = {k: [] for k in _BATCH_KEYS}
        for s in range(0, len(low), chunk):
            logits = pred.postprocess_masks(
                low[s : s + chunk], embedding.input_sizes[index], embedding.original_sizes[index],
                return_logits=True,
            )  # fmt: skip
            stability = calculate_stability_score(
                logits, pred.mask_threshold, self.stability_score_offset
            )
            ok = (
                stability >= self.stability_score_thresh
                if self.stability_score_thresh > 0
                else torch.ones_like(stability) > 0
            )
            masks = logits[ok] > pred.mask_threshold
            boxes = batched_mask_to_box(masks)
            ok2 = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, w, h])
            out["masks"].append(masks[ok2])
            out["boxes"].append(boxes[ok2])
            out["iou_preds"].append(iou[s : s + chunk][ok][ok2])
            out["points"].append(points[s : s + chunk][ok][ok2])
            out["stability_score"].append(stability[ok][ok2])
        if not out["masks"]:  # nothing passed the IoU filter
            empty = torch.empty(0, crop_h, crop_w, dtype=torch.bool, device=low.device)
            return {
                "masks": empty,
                "boxes": torch.zeros(0, 4, dtype=torch.long, device=low.device),
                "iou_preds": iou[:0],
                "points": points[:0],
                "stability_score": iou[:0],
            }
        return {k: torch.cat(v) for k, v in out.items()}

    def _postprocess_small_regions(self, data: dict[str, Any]) -> dict[str, Any]:
        if not data["rles"]:
            return data
        masks, scores = [], []
        for rle in data["rles"]:
            m, changed_holes = remove_small_regions(
                rle_to_mask(rle), self.min_mask_region_area, "holes"
            )
            m, changed_islands = remove_small_regions(m, self.min_mask_region_area, "islands")
            masks.append(torch.as_tensor(m))
            scores.append(0.0 if (changed_holes or changed_islands) else 1.0)
        stacked = torch.stack(masks)
        boxes = batched_mask_to_box(stacked)
        keep = nms(
            boxes.float(), torch.tensor(scores), max(self.box_nms_thresh, self.crop_nms_thresh)
        )
        dev = data["boxes"].device
        for i in keep.tolist():
            if scores[i] == 0.0:
                data["rles"][i] = mask_to_rle(stacked[i : i + 1])[0]
                data["boxes"][i] = boxes[i].to(dev)
        return _filter(data, keep.to(dev))

    def _records(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        rles = data["rles"]
        if self.output_mode == "coco_rle":
            segs: list[Any] = [coco_encode_rle(r) for r in rles]
        elif self.output_mode == "binary_mask":
            segs = [rle_to_mask(r) for r in rles]
        else:
            segs = rles
        boxes = data["boxes"].cpu().numpy().astype(np.float64)
        crops = data["crop_boxes"].cpu().numpy().astype(np.float64)
        ious = data["iou_preds"].float().cpu().numpy()
        stab = data["stability_score"].float().cpu().numpy()
        points = data["points"].cpu().numpy().astype(np.float64)
        out = []
        for i, seg in enumerate(segs):
            out.append(
                {
                    "segmentation": seg,
                    "area": area_from_rle(rles[i]),
                    "bbox": _xyxy_to_xywh(boxes[i]),
                    "predicted_iou": float(ious[i]),
                    "point_coords": [points[i].tolist()],
                    "stability_score": float(stab[i]),
                    "crop_box": _xyxy_to_xywh(crops[i]),
                }
            )
        return out


def _xyxy_to_xywh(b: np.ndarray) -> list[float]:
    return [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]


def _filter(data: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    out = {}
    for k, v in data.items():
        if isinstance(v, list):
            idx = keep.tolist()
            out[k] = [v[i] for i in idx]
        else:
            out[k] = v[keep.to(v.device)]
    return out


def _uncrop_masks(
    masks: torch.Tensor, crop_box: list[int], orig_h: int, orig_w: int
) -> torch.Tensor:
    x0, y0, x1, y1 = crop_box
    if (x0, y0, x1, y1) == (0, 0, orig_w, orig_h):
        return masks
    pad_x, pad_y = orig_w - (x1 - x0), orig_h - (y1 - y0)
    return F.pad(masks, (x0, pad_x - x0, y0, pad_y - y0), value=0)
