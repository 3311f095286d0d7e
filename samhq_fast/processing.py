"""``SamHQProcessor``: a drop-in for transformers' ``SamHQProcessor`` / ``SamImageProcessor``.

numpy, Pillow and torch only; transformers is not imported. For RGB ``uint8`` images the outputs
are bit-identical to transformers 4.53.3 (``pixel_values``, sizes, rescaled points and boxes,
segmentation-map ``labels``, ``post_process_masks``).

Pipeline (``S`` = ``image_size``, 1024 by default):

* image -> RGB ``uint8`` (:func:`samhq_fast.image.to_rgb_uint8`: grayscale replicated, alpha
  dropped, palette expanded, 16-bit ``>> 8``, ``[0, 1]`` floats ``* 255`` rounded);
* resize the longest side to ``S`` (new side ``int(old * S / max(h, w) + 0.5)``) with PIL
  bilinear on ``uint8``; scale by ``1/255``, normalise with ``image_mean`` / ``image_std``, pad
  bottom / right with zeros to ``pad_size`` (``S x S``);
* points and boxes are scaled by ``(new_w / old_w, new_h / old_h)``;
* segmentation maps: nearest resize of the longest side to ``mask_size`` (256), zero pad to 256.

Differences from transformers 4.53.3, all where transformers raises or gives garbage:

* ragged point counts are padded in every nesting (HF pads only one missing point of the 3-deep
  form, and 4.53.3's ``SamHQProcessor`` needs ``point_pad_value=-10`` even for that). Padding is
  HF's: after rescaling, coordinates ``(-10, -10)`` and label ``-10`` (the model ignores them);
* ragged points without labels get labels (1 for given points, -10 for padding);
* ``input_points`` / ``input_boxes`` are ``float32`` (HF returns ``float64``; the values are
  HF's float64 results rounded to float32);
* the number of point / box lists must equal the number of images (HF reuses the first image's
  size when they differ), and problems are reported as ``ValueError`` naming the problem;
* very thin images keep at least one pixel per side after resizing (HF resizes a 1 x 2049 image
  to 0 x 1024 and fails); ``post_process_masks`` brings their masks back to the original size;
* rescaled coordinates must be finite in float32 and within ``COORD_LIMIT`` pixels
  (:mod:`samhq_fast.contract`; HF returns ``inf`` for a point at 1e39);
* image conversions for non-RGB-uint8 inputs follow :mod:`samhq_fast.image`.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .contract import frame_float32, preprocess_shape
from .image import is_image_like, to_rgb_uint8

__all__ = ["BatchFeature", "SamHQProcessor", "PAD_LABEL", "VALID_LABELS"]

logger = logging.getLogger(__name__)

#: Label of padding points (ignored by the prompt encoder), HF's convention.
PAD_LABEL = -10
#: Accepted point labels: 1 foreground, 0 background, -1 "not a point", -10 padding.
VALID_LABELS = (1, 0, -1, -10)

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
_CONFIG_NAME = "preprocessor_config.json"


# --------------------------------------------------------------------------------------------
# Output container
# --------------------------------------------------------------------------------------------


class BatchFeature(dict):
    """A ``dict`` with attribute access and HF ``BatchFeature.to`` semantics."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, *args: Any, **kwargs: Any) -> BatchFeature:
        """Move / cast the tensors in place, like ``transformers.BatchFeature.to``.

        ``to(device)`` moves every tensor; ``to(dtype)`` (or ``dtype=``) casts only floating-point
        tensors (integer sizes and labels keep their dtype); both may be given, as for
        ``Tensor.to``. Non-tensor values are left alone.

        Returns:
            ``self``.
        """
        device = kwargs.get("device")
        non_blocking = kwargs.get("non_blocking", False)
        if device is None and args:
            arg = args[0]
            if isinstance(arg, torch.dtype):
                pass
            elif isinstance(arg, (str, int, torch.device)):
                device = arg
            else:
                raise ValueError(
                    f"cannot move a BatchFeature to {arg!r}; expected a device or dtype"
                )
        for key, value in list(self.items()):
            if isinstance(value, torch.Tensor):
                if torch.is_floating_point(value):
                    self[key] = value.to(*args, **kwargs)
                elif device is not None:
                    self[key] = value.to(device=device, non_blocking=non_blocking)
        return self


# --------------------------------------------------------------------------------------------
# Prompt parsing helpers
# --------------------------------------------------------------------------------------------


def _listify(x: Any, name: str) -> Any:
    """Tensors / arrays / tuples -> nested python lists of python numbers."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().tolist()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (list, tuple)):
        return [_listify(e, name) for e in x]
    if isinstance(x, (bool, np.bool_)):
        return int(x)
    if isinstance(x, numbers.Number):
        return x.item() if hasattr(x, "item") else x
    raise ValueError(f"{name}: unsupported element of type {type(x).__name__}")


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_finite(values: np.ndarray, name: str) -> None:
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or infinite coordinates")


def _coords_array(pts: Any, where: str, name: str, width: int) -> np.ndarray:
    """A list of ``width``-number lists -> float64 (n, width) array, validated."""
    if not isinstance(pts, list) or not pts:
        raise ValueError(f"{name}: {where} is empty or not a list")
    for p in pts:
        if not isinstance(p, list) or not all(_is_number(v) for v in p):
            raise ValueError(
                f"{name}: {where} must be a list of [{'x, y' if width == 2 else 'x1, y1, x2, y2'}]"
                f" number lists, got an element {p!r}"
            )
        if len(p) != width:
            what = (
                "points must have 2 coordinates (x, y)"
                if width == 2
                else ("boxes must have 4 coordinates (x1, y1, x2, y2)")
            )
            raise ValueError(f"{name}: {what}; {where} has one with {len(p)}: {p!r}")
    arr = np.asarray(pts, dtype=np.float64)
    _check_finite(arr, name)
    return arr


def _label_value(v: Any, name: str, where: str) -> int:
    if not isinstance(v, numbers.Real) or (isinstance(v, float) and not float(v).is_integer()):
        raise ValueError(f"{name}: labels must be integers in {VALID_LABELS}, {where} has {v!r}")
    iv = int(v)
    if iv not in VALID_LABELS:
        raise ValueError(
            f"{name}: label {iv} at {where} is not one of {VALID_LABELS} "
            f"(1 foreground, 0 background, -1 not-a-point, -10 padding)"
        )
    return iv


def _resolve_pad(value: Any, default: int, what: str) -> tuple[int, int]:
    """int, (h, w) or {"height", "width"} (or None -> default square) -> (h, w)."""
    if value is None:
        return (default, default)
    if isinstance(value, dict):
        if "height" in value and "width" in value:
            return (int(value["height"]), int(value["width"]))
        if "longest_edge" in value:
            return (int(value["longest_edge"]),) * 2
        raise ValueError(f"{what}: expected keys 'height' and 'width', got {sorted(value)}")
    if isinstance(value, numbers.Integral):
        return (int(value), int(value))
    h, w = value
    return (int(h), int(w))


def _longest_edge(value: Any, what: str) -> int:
    if isinstance(value, dict):
        if "longest_edge" not in value:
            raise ValueError(f"{what}: expected the key 'longest_edge', got {sorted(value)}")
        return int(value["longest_edge"])
    return int(value)


def _sizes_list(sizes: Any, name: str) -> list[tuple[int, int]]:
    if isinstance(sizes, (torch.Tensor, np.ndarray)):
        sizes = sizes.tolist()
    sizes = list(sizes)
    if len(sizes) == 2 and all(isinstance(s, numbers.Integral) for s in sizes):
        sizes = [sizes]  # a single (h, w)
    out = []
    for s in sizes:
        if len(s) != 2:
            raise ValueError(f"{name}: each size must be (height, width), got {s!r}")
        out.append((int(s[0]), int(s[1])))
    return out


# --------------------------------------------------------------------------------------------
# The processor
# --------------------------------------------------------------------------------------------


class SamHQProcessor:
    """SAM-HQ pre- and post-processing, compatible with transformers' ``SamHQProcessor``.

    Args:
        image_size: longest side after resizing (HF ``size["longest_edge"]``), default 1024.
        mask_size: longest side of resized segmentation maps (HF ``mask_size``), default 256.
        image_mean: per-channel mean after scaling by ``rescale_factor``.
        image_std: per-channel standard deviation.
        patch_size: the encoder's patch size (informational: the embedding grid is
            ``image_size // patch_size``).
        pad_size: padded image size, int or (h, w) or HF dict; default ``image_size`` square.
        mask_pad_size: padded segmentation-map size; default ``mask_size`` square.
        rescale_factor: pixel scale before normalisation, default ``1/255``.

    The instance is stateless after construction, so it may be shared between threads.
    ``processor.image_processor`` is the processor itself (HF code calls
    ``processor.image_processor.post_process_masks``).
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        image_size: int = 1024,
        mask_size: int = 256,
        image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        image_std: Sequence[float] = IMAGENET_DEFAULT_STD,
        patch_size: int = 16,
        pad_size: int | tuple[int, int] | dict[str, int] | None = None,
        mask_pad_size: int | tuple[int, int] | dict[str, int] | None = None,
        rescale_factor: float = 1 / 255,
    ) -> None:
        self.image_size = int(image_size)
        self.mask_size = int(mask_size)
        self.patch_size = int(patch_size)
        self.image_mean = tuple(float(m) for m in image_mean)
        self.image_std = tuple(float(s) for s in image_std)
        self.rescale_factor = float(rescale_factor)
        self._pad_hw = _resolve_pad(pad_size, self.image_size, "pad_size")
        self._mask_pad_hw = _resolve_pad(mask_pad_size, self.mask_size, "mask_pad_size")
        if self.image_size <= 0 or self.mask_size <= 0:
            raise ValueError("image_size and mask_size must be positive")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std must have 3 values (R, G, B)")
        if any(s == 0 for s in self.image_std):
            raise ValueError("image_std must not contain zeros")
        if min(self._pad_hw) < self.image_size:
            raise ValueError(
                f"pad_size {self._pad_hw} is smaller than image_size {self.image_size}"
            )
        if min(self._mask_pad_hw) < self.mask_size:
            raise ValueError(
                f"mask_pad_size {self._mask_pad_hw} is smaller than mask_size {self.mask_size}"
            )
        # uint8 value -> normalised float32, per channel, with HF's exact operation order:
        # float64 * rescale_factor -> float32, then (x - mean) / std in float32.
        scaled = (np.arange(256, dtype=np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.asarray(self.image_mean, dtype=np.float32)
        std = np.asarray(self.image_std, dtype=np.float32)
        self._lut = (scaled[None, :] - mean[:, None]) / std[:, None]  # (3, 256) float32

    # ---- HF-compatible attributes ---------------------------------------------------------

    @property
    def image_processor(self) -> SamHQProcessor:
        """The processor itself (HF exposes a separate ``SamImageProcessor`` here)."""
        return self

    @property
    def size(self) -> dict[str, int]:
        return {"longest_edge": self.image_size}

    @property
    def target_size(self) -> int:
        return self.image_size

    @property
    def pad_size(self) -> dict[str, int]:
        return {"height": self._pad_hw[0], "width": self._pad_hw[1]}

    @property
    def mask_pad_size(self) -> dict[str, int]:
        return {"height": self._mask_pad_hw[0], "width": self._mask_pad_hw[1]}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, mask_size={self.mask_size}, "
            f"pad_size={self._pad_hw}, image_mean={self.image_mean}, image_std={self.image_std})"
        )

    # ---- loading --------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike[str], **kwargs: Any) -> SamHQProcessor:
        """Build from a ``preprocessor_config.json`` (local dir / file or hub repo), else defaults.

        A hub id is looked up in the local Hugging Face cache first, then (unless
        ``HF_HUB_OFFLINE`` is set or the hub host does not resolve) downloaded. Any failure
        falls back to the defaults silently: they are the settings of the
        ``syscv-community/sam-hq-vit-*`` repositories. ``kwargs`` override the file.
        """
        config = _read_preprocessor_config(os.fspath(name_or_path))
        params = cls._params_from_config(config) if config else {}
        params.update(kwargs)
        return cls(**params)

    @staticmethod
    def _params_from_config(cfg: dict[str, Any]) -> dict[str, Any]:
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_pad"):
            if cfg.get(flag, True) is False:
                raise ValueError(f"preprocessor config sets {flag}=False, which is not supported")
        if cfg.get("resample", 2) != 2:
            raise ValueError(
                f"preprocessor config asks for resample={cfg['resample']}; only 2 (bilinear) is "
                f"supported"
            )
        out: dict[str, Any] = {}
        if "size" in cfg:
            out["image_size"] = _longest_edge(cfg["size"], "size")
        if "mask_size" in cfg:
            out["mask_size"] = _longest_edge(cfg["mask_size"], "mask_size")
        for key in ("pad_size", "mask_pad_size", "image_mean", "image_std", "rescale_factor"):
            if cfg.get(key) is not None:
                out[key] = cfg[key]
        if "patch_size" in cfg:
            out["patch_size"] = cfg["patch_size"]
        return out

    # ---- geometry ---------------------------------------------------------------------------

    @staticmethod
    def get_preprocess_shape(old_shape: tuple[int, int], longest_edge: int) -> tuple[int, int]:
        """(h, w) -> resized (h, w) with the longest side ``longest_edge`` (HF's rounding, but at
        least one pixel per side: transformers fails on a 1 x 2049 image, we resize it to
        1 x 1024)."""
        return preprocess_shape(old_shape[0], old_shape[1], longest_edge)

    def normalize_coordinates(
        self,
        coords: np.ndarray,
        original_size: tuple[int, int],
        is_bounding_box: bool = False,
    ) -> np.ndarray:
        """Map pixel coordinates of the original image into the resized frame.

        Args:
            coords: ``(..., 2)`` points (x, y), or ``(..., 4)`` boxes when ``is_bounding_box``.
            original_size: (h, w) of the original image.

        Returns:
            float64 array of the same shape (x scaled by new_w/old_w, y by new_h/old_h).
        """
        old_h, old_w = original_size
        new_h, new_w = self.get_preprocess_shape(original_size, self.image_size)
        out = np.array(coords, dtype=np.float64, copy=True)
        shape = out.shape
        if is_bounding_box:
            out = out.reshape(-1, 2, 2)
        out[..., 0] = out[..., 0] * (new_w / old_w)
        out[..., 1] = out[..., 1] * (new_h / old_h)
        return out.reshape(shape)

    # ---- images -----------------------------------------------------------------------------

    def preprocess_image(self, image: Any) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """One image -> model input.

        Args:
            image: anything :func:`samhq_fast.image.to_rgb_uint8` accepts.

        Returns:
            ``(pixel_values, original_size, reshaped_size)``: a ``(3, pad_h, pad_w)`` float32
            array, and the (h, w) before and after resizing.
        """
        rgb = to_rgb_uint8(image)
        out = np.zeros((3, *self._pad_hw), dtype=np.float32)
        original, reshaped = self._fill_pixels(rgb, out)
        return out, original, reshaped

    def _fill_pixels(
        self, rgb: np.ndarray, out: np.ndarray
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        h, w = rgb.shape[:2]
        new_h, new_w = self.get_preprocess_shape((h, w), self.image_size)
        if (new_h, new_w) != (h, w):
            resized = np.asarray(
                Image.fromarray(rgb).resize((new_w, new_h), resample=Image.Resampling.BILINEAR)
            )
        else:
            resized = rgb
        for c in range(3):
            np.take(self._lut[c], resized[:, :, c], out=out[c, :new_h, :new_w])
        return (h, w), (new_h, new_w)

    @staticmethod
    def _image_list(images: Any) -> list[Any]:
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("images is an empty list")
            for i, im in enumerate(images):
                if not is_image_like(im):
                    raise ValueError(
                        f"images[{i}] has unsupported type {type(im).__name__}; expected a PIL "
                        f"image, a numpy array or a torch tensor"
                    )
            return list(images)
        if isinstance(images, Image.Image):
            return [images]
        if isinstance(images, (np.ndarray, torch.Tensor)):
            if images.ndim == 4:
                if images.shape[0] == 0:
                    raise ValueError("images is an empty batch")
                return list(images)
            return [images]
        raise ValueError(
            f"images has unsupported type {type(images).__name__}; expected a PIL image, a numpy "
            f"array, a torch tensor or a list of those"
        )

    # ---- segmentation maps ----------------------------------------------------------------

    @staticmethod
    def _map_list(maps: Any) -> list[Any]:
        if isinstance(maps, (list, tuple)):
            if not maps:
                raise ValueError("segmentation_maps is an empty list")
            return list(maps)
        if isinstance(maps, (np.ndarray, torch.Tensor)):
            if maps.ndim == 4 and maps.shape[1] == 1:
                return list(maps[:, 0])
            if maps.ndim == 3:  # HF: a 3-D array is a batch of 2-D maps
                return list(maps)
            return [maps]
        return [maps]

    @staticmethod
    def _map_to_uint8(m: Any, index: int) -> np.ndarray:
        name = f"segmentation_maps[{index}]"
        if isinstance(m, Image.Image):
            m = np.asarray(m)  # mode "1" -> bool (0 / 1), "L" -> uint8
        elif isinstance(m, torch.Tensor):
            m = m.detach().cpu().numpy()
        elif not isinstance(m, np.ndarray):
            raise ValueError(f"{name} has unsupported type {type(m).__name__}")
        if m.ndim == 3 and 1 in (m.shape[0], m.shape[2]):
            m = m[0] if m.shape[0] == 1 else m[:, :, 0]
        if m.ndim != 2:
            raise ValueError(f"{name} must be a single-channel (H, W) map, got shape {m.shape}")
        if m.size == 0:
            raise ValueError(f"{name} is empty (zero size)")
        if m.dtype == np.uint8:
            return m
        if m.dtype == np.bool_:
            return m.astype(np.uint8)
        a = m.astype(np.float64)
        if (
            not np.isfinite(a).all()
            or not np.array_equal(a, np.round(a))
            or a.min() < 0
            or (a.max() > 255)
        ):
            raise ValueError(f"{name} must hold whole numbers in [0, 255] (e.g. 0 / 1 labels)")
        return a.astype(np.uint8)

    def _preprocess_map(self, m: np.ndarray) -> np.ndarray:
        h, w = m.shape
        new_h, new_w = self.get_preprocess_shape((h, w), self.mask_size)
        resized = np.asarray(
            Image.fromarray(m).resize((new_w, new_h), resample=Image.Resampling.NEAREST)
        )
        out = np.zeros(self._mask_pad_hw, dtype=np.int64)
        out[:new_h, :new_w] = resized
        return out

    # ---- prompts ----------------------------------------------------------------------------

    def _parse_points(
        self, input_points: Any, input_labels: Any, original_sizes: list[tuple[int, int]]
    ) -> tuple[np.ndarray, np.ndarray | None]:
        n_images = len(original_sizes)
        points = _listify(input_points, "input_points")
        if not isinstance(points, list):
            raise ValueError("input_points must be a nested list, numpy array or torch tensor")
        if len(points) != n_images:
            raise ValueError(
                f"input_points has {len(points)} entries but there are {n_images} images; give "
                f"one list of points per image"
            )
        labels = None
        if input_labels is not None:
            labels = _listify(input_labels, "input_labels")
            if not isinstance(labels, list) or len(labels) != n_images:
                got = len(labels) if isinstance(labels, list) else type(labels).__name__
                raise ValueError(
                    f"input_labels has {got} entries but there are {n_images} images; give one "
                    f"list of labels per image"
                )

        nesting = (
            "[image][point][x, y] (3 deep) or [image][prompt][point][x, y] (4 deep), e.g. "
            "[[[450, 600]]]"
        )
        per_image: list[list[np.ndarray]] = []  # image -> prompts -> (n, 2)
        per_labels: list[list[list[int]]] = []
        deep: bool | None = None
        for i, entry in enumerate(points):
            if not isinstance(entry, list) or not entry:
                raise ValueError(f"input_points[{i}] is empty or not a list; expected {nesting}")
            if not isinstance(entry[0], list):
                raise ValueError(f"input_points is nested too shallowly; expected {nesting}")
            this_deep = bool(entry[0]) and isinstance(entry[0][0], list)
            if deep is None:
                deep = this_deep
            elif deep != this_deep:
                raise ValueError(f"input_points mixes nesting depths across images; use {nesting}")
            prompts = entry if this_deep else [entry]
            arrays = []
            for j, prompt in enumerate(prompts):
                where = f"image {i}" + (f", prompt {j}" if this_deep else "")
                arrays.append(_coords_array(prompt, where, "input_points", 2))
            per_image.append(arrays)
            if labels is not None:
                lab = labels[i]
                lab_prompts = lab if this_deep else [lab]
                if (
                    not isinstance(lab, list)
                    or len(lab_prompts) != len(arrays)
                    or not all(isinstance(lp, list) for lp in lab_prompts)
                ):
                    raise ValueError(
                        f"input_labels[{i}] does not match input_points[{i}]: expected "
                        f"{len(arrays)} list(s) of labels nested like the points"
                    )
                parsed = []
                for j, (lp, arr) in enumerate(zip(lab_prompts, arrays, strict=True)):
                    where = f"image {i}" + (f", prompt {j}" if this_deep else "")
                    if len(lp) != len(arr):
                        raise ValueError(
                            f"input_labels count does not match input_points count at {where}: "
                            f"{len(lp)} labels for {len(arr)} points"
                        )
                    parsed.append([_label_value(v, "input_labels", where) for v in lp])
                per_labels.append(parsed)

        n_prompts = {len(a) for a in per_image}
        if len(n_prompts) != 1:
            raise ValueError(
                f"every image needs the same number of point prompts to be batched; got "
                f"{[len(a) for a in per_image]}"
            )
        n_max = max(len(p) for prompts in per_image for p in prompts)
        ragged = any(len(p) != n_max for prompts in per_image for p in prompts)

        P = n_prompts.pop()
        out_pts = np.full((n_images, P, n_max, 2), float(PAD_LABEL), dtype=np.float32)
        out_lab = np.full((n_images, P, n_max), PAD_LABEL, dtype=np.int64)
        for i, (prompts, size) in enumerate(zip(per_image, original_sizes, strict=True)):
            for j, arr in enumerate(prompts):
                # Rescale first, then pad (the padding is not rescaled), as HF does.
                out_pts[i, j, : len(arr)] = frame_float32(
                    self.normalize_coordinates(arr, size), "input_points", f"image {i}: "
                )
                if labels is not None:
                    out_lab[i, j, : len(arr)] = per_labels[i][j]
                else:
                    out_lab[i, j, : len(arr)] = 1
        if labels is None and not ragged:
            return out_pts, None  # HF returns no labels; the model then uses ones
        return out_pts, out_lab

    def _parse_boxes(self, input_boxes: Any, original_sizes: list[tuple[int, int]]) -> np.ndarray:
        n_images = len(original_sizes)
        boxes = _listify(input_boxes, "input_boxes")
        nesting = "[image][box][x1, y1, x2, y2], e.g. [[[75, 275, 1725, 850]]]"
        if not isinstance(boxes, list):
            raise ValueError(f"input_boxes must be nested {nesting}")
        if len(boxes) != n_images:
            raise ValueError(
                f"input_boxes has {len(boxes)} entries but there are {n_images} images; give "
                f"one list of boxes per image"
            )
        arrays = []
        for i, entry in enumerate(boxes):
            if not isinstance(entry, list) or not entry:
                raise ValueError(f"input_boxes[{i}] is empty or not a list; expected {nesting}")
            if not isinstance(entry[0], list):
                raise ValueError(f"input_boxes is nested too shallowly; expected {nesting}")
            arr = _coords_array(entry, f"image {i}", "input_boxes", 4)
            # HF reads boxes as float32 before rescaling in float64.
            with np.errstate(over="ignore"):  # inf here is refused after rescaling
                arrays.append(arr.astype(np.float32).astype(np.float64))
        counts = [len(a) for a in arrays]
        if len(set(counts)) != 1:
            raise ValueError(
                f"every image needs the same number of boxes to be batched; got {counts}"
            )
        out = np.stack(
            [
                self.normalize_coordinates(a, size, is_bounding_box=True)
                for a, size in zip(arrays, original_sizes, strict=True)
            ]
        )
        return frame_float32(out, "input_boxes")

    # ---- main entry point -------------------------------------------------------------------

    def __call__(
        self,
        images: Any = None,
        segmentation_maps: Any = None,
        input_points: Any = None,
        input_labels: Any = None,
        input_boxes: Any = None,
        return_tensors: str | None = "pt",
        point_pad_value: int | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Prepare images and prompts for the model.

        Args:
            images: one image or a batch (list, or a 4-D array / tensor): PIL images, numpy
                ``(H, W)`` / ``(H, W, C)`` arrays, torch ``(C, H, W)`` tensors (see
                :mod:`samhq_fast.image` for the conversion rules).
            segmentation_maps: one ``(H, W)`` map per image (PIL, numpy, torch; a 3-D array is
                a batch), same size as its image; whole numbers in [0, 255].
            input_points: per image either ``[point][x, y]`` (one prompt) or
                ``[prompt][point][x, y]``, in original-image pixels; nested lists, numpy arrays
                or tensors. Ragged point counts are padded.
            input_labels: same nesting as the points without the last axis; values in
                ``{1, 0, -1, -10}``. Optional (the model then treats every point as 1).
            input_boxes: per image ``[box][x1, y1, x2, y2]``; the same number per image.
            return_tensors: ``"pt"`` (torch) or ``"np"`` / ``None`` (numpy).
            point_pad_value: accepted for HF compatibility; must be ``None`` or ``-10``.

        Returns:
            :class:`BatchFeature` with ``pixel_values`` ``(B, 3, S, S)`` float32,
            ``original_sizes`` / ``reshaped_input_sizes`` ``(B, 2)`` int64 (h, w), and when
            given ``input_points`` ``(B, P, N, 2)`` float32, ``input_labels`` ``(B, P, N)``
            int64, ``input_boxes`` ``(B, nb, 4)`` float32 (all in the resized frame) and
            ``labels`` ``(B, 256, 256)`` int64 from the segmentation maps.

        Raises:
            ValueError: on any invalid input; the message names the problem.
        """
        for key in ("do_convert_rgb", "input_data_format", "data_format"):
            kwargs.pop(key, None)  # HF knobs whose only meaningful value is what we do
        if kwargs:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(kwargs))}")
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")
        if point_pad_value is not None and point_pad_value != PAD_LABEL:
            raise ValueError(f"point_pad_value must be {PAD_LABEL} (the label the model ignores)")
        if images is None:
            given = [
                n
                for n, v in (
                    ("input_points", input_points),
                    ("input_labels", input_labels),
                    ("input_boxes", input_boxes),
                    ("segmentation_maps", segmentation_maps),
                )
                if v is not None
            ]
            if given:
                raise ValueError(f"{', '.join(given)} given without images; pass images too")
            raise ValueError("images is required")
        if input_labels is not None and input_points is None:
            raise ValueError("input_labels given without input_points")

        image_list = self._image_list(images)
        n = len(image_list)
        pixel_values = np.zeros((n, 3, *self._pad_hw), dtype=np.float32)
        original_sizes, reshaped_sizes = [], []
        for i, im in enumerate(image_list):
            try:
                rgb = to_rgb_uint8(im)
            except (ValueError, TypeError) as e:
                raise ValueError(f"images[{i}]: {e}") from e
            orig, resh = self._fill_pixels(rgb, pixel_values[i])
            original_sizes.append(orig)
            reshaped_sizes.append(resh)

        data: dict[str, np.ndarray] = {
            "pixel_values": pixel_values,
            "original_sizes": np.asarray(original_sizes, dtype=np.int64),
            "reshaped_input_sizes": np.asarray(reshaped_sizes, dtype=np.int64),
        }

        if segmentation_maps is not None:
            maps = self._map_list(segmentation_maps)
            if len(maps) != n:
                raise ValueError(f"segmentation_maps has {len(maps)} maps but there are {n} images")
            labels = []
            for i, (m, size) in enumerate(zip(maps, original_sizes, strict=True)):
                m8 = self._map_to_uint8(m, i)
                if m8.shape != size:
                    raise ValueError(
                        f"segmentation_maps[{i}] has size {m8.shape} but its image has {size}; "
                        f"segmentation maps must be the same size as their images"
                    )
                labels.append(self._preprocess_map(m8))
            data["labels"] = np.stack(labels)

        n_point_prompts = None
        if input_points is not None:
            pts, labs = self._parse_points(input_points, input_labels, original_sizes)
            data["input_points"] = pts
            if labs is not None:
                data["input_labels"] = labs
            n_point_prompts = pts.shape[1]
        if input_boxes is not None:
            boxes = self._parse_boxes(input_boxes, original_sizes)
            if n_point_prompts is not None and boxes.shape[1] != n_point_prompts:
                raise ValueError(
                    f"input_points has {n_point_prompts} prompt(s) per image but input_boxes has "
                    f"{boxes.shape[1]} box(es); with both, give one box per point prompt"
                )
            data["input_boxes"] = boxes

        if return_tensors == "pt":
            return BatchFeature({k: torch.from_numpy(v) for k, v in data.items()})
        return BatchFeature(data)

    # ---- post-processing --------------------------------------------------------------------

    def post_process_masks(
        self,
        masks: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray],
        original_sizes: torch.Tensor | np.ndarray | Sequence[Sequence[int]],
        reshaped_input_sizes: torch.Tensor | np.ndarray | Sequence[Sequence[int]],
        mask_threshold: float = 0.0,
        binarize: bool = True,
        pad_size: int | tuple[int, int] | dict[str, int] | None = None,
        return_tensors: str = "pt",
    ) -> list[torch.Tensor]:
        """Upscale low-resolution mask logits to the original image sizes (HF-identical).

        Per image: bilinear (``align_corners=False``) to ``pad_size``, crop to the reshaped size,
        bilinear to the original size, then ``> mask_threshold`` when ``binarize``.

        Args:
            masks: ``(B, P, C, h, w)`` tensor / array, or a list of ``B`` per-image
                ``(P, C, h, w)`` tensors / arrays (``(C, h, w)`` and ``(h, w)`` also accepted).
            original_sizes: ``(B, 2)`` (h, w) before resizing (tensor, array or list).
            reshaped_input_sizes: ``(B, 2)`` (h, w) after resizing.
            mask_threshold: logit threshold.
            binarize: return booleans (True) or the interpolated logits (False).
            pad_size: the padded input size; default the processor's.
            return_tensors: only ``"pt"`` is supported.

        Returns:
            list of ``B`` tensors ``(P, C, H_i, W_i)`` (bool when ``binarize``, else the input's
            floating dtype), on the input's device.
        """
        if return_tensors != "pt":
            raise ValueError("post_process_masks supports return_tensors='pt' only")
        pad_h, pad_w = self._pad_hw if pad_size is None else _resolve_pad(pad_size, 0, "pad_size")
        originals = _sizes_list(original_sizes, "original_sizes")
        reshaped = _sizes_list(reshaped_input_sizes, "reshaped_input_sizes")
        if len(masks) != len(originals) or len(reshaped) != len(originals):
            raise ValueError(
                f"post_process_masks got {len(masks)} mask sets, {len(originals)} original sizes "
                f"and {len(reshaped)} reshaped sizes; they must match (one per image)"
            )
        out = []
        for i, (orig, resh) in enumerate(zip(originals, reshaped, strict=True)):
            m = masks[i]
            if isinstance(m, np.ndarray):
                m = torch.from_numpy(m)
            elif not isinstance(m, torch.Tensor):
                raise ValueError(
                    f"masks[{i}] must be a torch tensor or numpy array, got {type(m).__name__}"
                )
            if m.ndim < 2 or m.ndim > 4:
                raise ValueError(f"masks[{i}] must be (P, C, h, w), got shape {tuple(m.shape)}")
            extra = 4 - m.ndim
            for _ in range(extra):
                m = m.unsqueeze(0)
            if not torch.is_floating_point(m):
                m = m.float()
            up = F.interpolate(m, (pad_h, pad_w), mode="bilinear", align_corners=False)
            up = up[..., : resh[0], : resh[1]]
            up = F.interpolate(up, orig, mode="bilinear", align_corners=False)
            if binarize:
                up = up > mask_threshold
            for _ in range(extra):
                up = up.squeeze(0)
            out.append(up)
        return out


# --------------------------------------------------------------------------------------------
# preprocessor_config.json lookup
# --------------------------------------------------------------------------------------------


def _read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return cfg


def _hub_reachable() -> bool:
    """Cheap offline check (HF_HUB_OFFLINE, DNS) so offline use does not wait on retries."""
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    if getattr(constants, "HF_HUB_OFFLINE", False):
        return False
    host = urlparse(getattr(constants, "ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _read_preprocessor_config(name_or_path: str) -> dict[str, Any]:
    """The preprocessor config of a local file / dir or hub repo; ``{}`` when there is none."""
    if os.path.isfile(name_or_path):
        return _read_json(name_or_path)
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, _CONFIG_NAME)
        return _read_json(path) if os.path.isfile(path) else {}
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return {}
    for local_only in (True, False):
        if not local_only and not _hub_reachable():
            break
        try:
            path = hf_hub_download(name_or_path, _CONFIG_NAME, local_files_only=local_only)
            return _read_json(path)
        except Exception as e:  # offline, not found, bad id, bad file: use the defaults
            logger.debug("no %s for %r (%s): %s", _CONFIG_NAME, name_or_path, local_only, e)
    return {}
