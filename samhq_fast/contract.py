"""The input contract: every prompt, image, flag and index a user hands us is checked here, once.

:class:`~samhq_fast.predictor.Predictor` (``predict``, ``decode``, ``decode_batch``,
``predict_torch``), the :class:`~samhq_fast.amg.AutomaticMaskGenerator` and the CLI call these
functions before anything reaches the model; a service calls :func:`validate_prompts` itself and
answers a refusal with a 4xx. Every refusal is a ``ValueError`` or ``TypeError`` whose message
names the argument and the problem.

Prompts of one image (:func:`validate_prompts`), in original-image pixels (``frame="original"``)
or already in the model's input frame (``frame="model"``, as ``predict_torch`` takes them):

* ``point_coords`` ``(N, 2)`` or ``(P, N, 2)``, ``N >= 1``; ``point_labels`` the same without the
  last axis, integers in ``{1, 0, -1}`` (foreground, background, not a point; bools read as 1 / 0),
  **all 1 when not given**; ``box`` ``(4,)`` or ``(K, 4)`` as ``x1 <= x2, y1 <= y2``;
  ``mask_input`` ``(1, m, m)`` or ``(K, 1, m, m)`` low-resolution logits.
* Arrays of real numbers only (numpy, torch, lists): complex, string, object, ragged arrays and
  bool coordinates are refused (``TypeError`` for the kind, ``ValueError`` for the shape).
* Coordinates must be finite in float64, and still finite in float32 after the frame transform,
  with ``|x| <= COORD_LIMIT`` model-frame pixels (larger ones overflow the positional encoding to
  NaN); ``mask_input`` values must be finite with ``|v| <= MASK_LIMIT``.
* Boxes beyond the image are clipped to it with a ``UserWarning`` (original frame only).
* Prompt counts: the leading dimensions of points, boxes and masks must agree; a single prompt
  (2-D points, 1-D box, 3-D mask) is shared by all the others.
* **An empty prompt set** (``P = 0``: points ``(0, N, 2)``, boxes ``(0, 4)``, masks
  ``(0, 1, m, m)``) is valid and gives empty results: masks ``(0, C, H, W)``, scores ``(0, C)``,
  low-res logits ``(0, C, m, m)``; the model is not run. No prompt at all (everything ``None``) is
  one prompt: the model's whole-image guess, as in SAM.

Flags (``multimask_output``, ``hq_token_only``, ...) must be ``bool`` or ``numpy.bool_``
(:func:`check_flag`: ``"no"`` or ``0`` are refused, never read as truthy); indices must be
integers (:func:`check_index`, ``bool`` and ``0.5`` refused) in range. Images
(:func:`validate_image`): see :func:`samhq_fast.image.to_rgb_uint8`; resized sides are at least
one pixel (:func:`preprocess_shape`), so very thin images work and their masks come back at the
original size.
"""

from __future__ import annotations

import numbers
import operator
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from samhq_fast.image import load_image, to_rgb_uint8

__all__ = [
    "COORD_LIMIT",
    "MASK_LIMIT",
    "POINT_LABELS",
    "Prompts",
    "check_flag",
    "check_index",
    "check_positive_int",
    "check_real",
    "frame_float32",
    "preprocess_shape",
    "validate_image",
    "validate_prompts",
]

#: Accepted point labels: foreground, background, "not a point".
POINT_LABELS = (1, 0, -1)
#: Largest accepted |coordinate| in the model's input frame (pixels; the frame is 1024 wide for
#: the released models). Beyond it the Fourier features of the prompt encoder lose all meaning
#: and, a few orders further, overflow float32 to NaN.
COORD_LIMIT = float(2**20)
#: Largest accepted |value| of a ``mask_input`` (the model's logits are O(10)).
MASK_LIMIT = 1e4

_COORDS = "coordinates"
_LABELS = "labels"
_VALUES = "values"


# ------------------------------------------------------------------------------ scalars
def check_flag(value: Any, name: str) -> bool:
    """``value`` as a ``bool``; only ``bool`` and ``numpy.bool_`` are accepted (TypeError)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def _integer(value: Any, name: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be an integer, got {type(value).__name__} {value!r}"
        ) from None


def check_index(value: Any, n: int, name: str) -> int:
    """``value`` as an index into ``n`` items, negative from the end; returns ``0 <= i < n``."""
    i = _integer(value, name)
    if not -n <= i < n:
        raise ValueError(f"{name} {i} out of range for {n} item{'s' if n != 1 else ''}")
    return i % n


def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """An integer ``>= minimum``."""
    i = _integer(value, name)
    if i < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {i}")
    return i


def check_real(value: Any, name: str, lo: float | None = None, hi: float | None = None) -> float:
    """A finite real number (not a bool) in ``[lo, hi]``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not np.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f" in [{lo}, {hi}]" if lo is not None or hi is not None else ""
        raise ValueError(f"{name} must be a finite number{rng}, got {value!r}")
    return v


# ------------------------------------------------------------------------------- images
def preprocess_shape(h: int, w: int, longest: int) -> tuple[int, int]:
    """``(h, w)`` after resizing the longest side to ``longest``: ``int(x * s + 0.5)`` as SAM and
    transformers round, but never below one pixel (a 1 x 2049 image is 1 x 1024, not 0 x 1024)."""
    scale = longest * 1.0 / max(h, w)
    return max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))


def validate_image(image: Any, image_format: str = "RGB") -> np.ndarray:
    """One image (PIL, numpy, torch, or a file path) -> ``(H, W, 3)`` RGB ``uint8``.

    Conversion rules: :func:`samhq_fast.image.to_rgb_uint8`; files get their EXIF orientation.
    ``image_format`` ``"BGR"`` flips the channels of array inputs.
    """
    if image_format not in ("RGB", "BGR"):
        raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise FileNotFoundError(f"image file not found: {os.fspath(image)!r}")
        rgb = load_image(image)
    else:
        rgb = to_rgb_uint8(image)
    if image_format == "BGR":
        rgb = np.ascontiguousarray(rgb[..., ::-1])
    return rgb


# ------------------------------------------------------------------------------ prompts
@dataclass(frozen=True)
class Prompts:
    """The prompts of one image, validated and in the model's input frame.

    Attributes:
      points: ``(P, N, 2)`` float32 (x, y) or ``None``.
      labels: ``(P, N)`` int64 in ``{1, 0, -1}`` (with ``points``) or ``None``.
      boxes: ``(P, 4)`` float32 (x1, y1, x2, y2) or ``None``.
      masks: ``(P, 1, m, m)`` float32 low-resolution logits or ``None``.
      num_prompts: ``P``; ``0`` for an empty prompt set, ``1`` when no prompt was given.
      batched: the input had a leading prompt dimension (the outputs keep it).
      original_size: ``(H, W)`` of the image the prompts were given for.
      input_size: ``(h, w)`` of that image in the model's frame.
      image_size: the model's input side ``S``.
    """

    points: np.ndarray | None
    labels: np.ndarray | None
    boxes: np.ndarray | None
    masks: np.ndarray | None
    num_prompts: int
    batched: bool
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    image_size: int

    def __len__(self) -> int:
        return self.num_prompts

    @property
    def is_empty(self) -> bool:
        return self.num_prompts == 0

    @property
    def has_sparse(self) -> bool:
        """Points or boxes were given (the decoder gets sparse tokens)."""
        return self.points is not None or self.boxes is not None

    def to_torch(self, device: torch.device | str) -> tuple[torch.Tensor | None, ...]:
        """``(points, labels, boxes, masks)`` as tensors on ``device`` (``None`` where absent)."""

        def t(a: np.ndarray | None) -> torch.Tensor | None:
            return None if a is None else torch.from_numpy(a).to(device)

        return t(self.points), t(self.labels), t(self.boxes), t(self.masks)


def _array(x: Any, name: str, kind: str) -> np.ndarray:
    """Anything array-like -> a numpy array of real numbers (or bools for labels)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_complex():
            raise TypeError(f"{name} must hold real numbers, got a complex tensor ({x.dtype})")
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        x = x.numpy()
    elif isinstance(x, (str, bytes, dict, set)):
        raise TypeError(f"{name} must be an array of numbers, got {type(x).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = np.asarray(x)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{name} is not a rectangular array of numbers: {e}") from None
    dt = arr.dtype
    if np.issubdtype(dt, np.complexfloating):
        raise TypeError(f"{name} must hold real numbers, got complex dtype {dt}")
    if np.issubdtype(dt, np.bool_):
        if kind != _LABELS:
            raise TypeError(f"{name} must hold numbers, got bool {kind}")
    elif not (np.issubdtype(dt, np.integer) or np.issubdtype(dt, np.floating)):
        what = f"dtype {dt}"
        if dt.kind == "O":
            what = "an object array (ragged, mixed or non-numeric elements?)"
        raise TypeError(f"{name} must be an array of real numbers, got {what}")
    return arr


def _float64(arr: np.ndarray, name: str, pre: str) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        a = arr.astype(np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{pre}{name} contains NaN or infinite values")
    return a


def frame_float32(a: np.ndarray, name: str, pre: str = "") -> np.ndarray:
    """float64 model-frame coordinates -> float32, refusing what float32 or the model cannot
    hold."""
    with np.errstate(over="ignore", invalid="ignore"):
        a32 = a.astype(np.float32)
    if not np.isfinite(a32).all():
        raise ValueError(
            f"{pre}{name} overflow float32 in the model's input frame (|value| up to "
            f"{np.abs(a).max():.3g}); coordinates must be finite in float32"
        )
    if a.size and np.abs(a).max() > COORD_LIMIT:
        raise ValueError(
            f"{pre}{name} are out of range: {np.abs(a).max():.3g} pixels from the origin in the "
            f"model's input frame, more than {COORD_LIMIT:.0f}"
        )
    return a32


def _labels(point_labels: Any, shape: tuple[int, ...], pre: str) -> np.ndarray:
    lab = _array(point_labels, "point_labels", _LABELS)
    if lab.shape != shape:
        raise ValueError(
            f"{pre}point_coords and point_labels have different lengths: {shape} points vs "
            f"{lab.shape} labels"
        )
    if np.issubdtype(lab.dtype, np.bool_):
        return lab.astype(np.int64)
    if np.issubdtype(lab.dtype, np.floating):
        lf = lab.astype(np.float64)
        if not np.isfinite(lf).all() or np.any(lf != np.round(lf)):
            raise ValueError(f"{pre}point_labels must be integers in {POINT_LABELS}")
        lab = lf
    bad = sorted({int(v) for v in np.unique(lab)} - set(POINT_LABELS))
    if bad:
        raise ValueError(
            f"{pre}point_labels must be 1 (foreground), 0 (background) or -1 (not a point), got "
            f"{bad[:8]}"
        )
    return lab.astype(np.int64)


def validate_prompts(
    point_coords: Any = None,
    point_labels: Any = None,
    box: Any = None,
    mask_input: Any = None,
    *,
    original_size: tuple[int, int],
    image_size: int = 1024,
    mask_input_size: tuple[int, int] = (256, 256),
    frame: str = "original",
    prompt_dim: bool = False,
    where: str = "",
) -> Prompts:
    """Validate the prompts of one image and map them into the model's input frame.

    Args:
      point_coords: ``(N, 2)`` or ``(P, N, 2)`` points (x, y).
      point_labels: ``(N,)`` / ``(P, N)``; 1 foreground, 0 background, -1 not a point; default 1.
      box: ``(4,)`` or ``(K, 4)`` boxes (x1, y1, x2, y2).
      mask_input: ``(1, m, m)`` or ``(K, 1, m, m)`` low-resolution logits.
      original_size: ``(H, W)`` of the image.
      image_size: the model's input side ``S`` (1024 for the released models).
      mask_input_size: ``(m, m)``, four times the embedding grid (256 for the released models).
      frame: ``"original"`` (pixels of the image: scaled into the model frame, boxes clipped to
        the image) or ``"model"`` (already in the model frame, as ``predict_torch`` takes them).
      prompt_dim: require the leading prompt dimension (``predict_torch``'s ``(B, N, 2)``,
        ``(B, 4)`` also ``(4,)``, ``(B, 1, m, m)``).
      where: prefix for messages (``"image 3"``).

    Returns:
      :class:`Prompts` (the contract is in this module's docstring).

    Raises:
      TypeError: an argument of the wrong kind (complex, strings, objects, bool coordinates).
      ValueError: wrong shapes, non-finite or out-of-range values, bad labels, inverted boxes,
        disagreeing prompt counts.
    """
    pre = f"{where}: " if where else ""
    if frame not in ("original", "model"):
        raise ValueError(f"frame must be 'original' or 'model', got {frame!r}")
    old_h, old_w = (_integer(v, "original_size") for v in original_size)
    if old_h < 1 or old_w < 1:
        raise ValueError(f"original_size must be positive, got {(old_h, old_w)}")
    new_h, new_w = preprocess_shape(old_h, old_w, image_size)
    if frame == "original":
        scale = np.array([new_w / old_w, new_h / old_h], dtype=np.float64)
    else:
        scale = np.ones(2, dtype=np.float64)
    batched = False
    pts = lab = bxs = msk = None
    if point_coords is not None:
        raw = _array(point_coords, "point_coords", _COORDS)
        ok_ndim = (3,) if prompt_dim else (2, 3)
        if raw.ndim not in ok_ndim or raw.shape[-1] != 2:
            want = "(B, N, 2)" if prompt_dim else "(N, 2) or (P, N, 2)"
            raise ValueError(f"{pre}point_coords must have shape {want}, got {raw.shape}")
        if raw.shape[-2] == 0 and not (raw.ndim == 3 and raw.shape[0] == 0):
            raise ValueError(
                f"{pre}point_coords has no points (shape {raw.shape}); pass None for no points, "
                f"or shape (0, N, 2) for no prompts"
            )
        p64 = _float64(raw, "point_coords", pre)
        if point_labels is None:
            lab = np.ones(p64.shape[:-1], dtype=np.int64)
        else:
            lab = _labels(point_labels, p64.shape[:-1], pre)
        batched |= p64.ndim == 3
        if p64.ndim == 2:
            p64, lab = p64[None], lab[None]
        pts = frame_float32(p64 * scale, "point_coords", pre)
    elif point_labels is not None:
        raise ValueError(f"{pre}point_labels were given without point_coords")
    if box is not None:
        raw = _array(box, "box", _COORDS)
        if raw.ndim not in (1, 2) or raw.shape[-1] != 4:
            want = "(B, 4) or (4,)" if prompt_dim else "(4,) or (K, 4)"
            raise ValueError(f"{pre}box must have shape {want}, got {raw.shape}")
        b64 = _float64(raw, "box", pre)
        batched |= b64.ndim == 2
        b64 = b64.reshape(-1, 4)
        inverted = (b64[:, 0] > b64[:, 2]) | (b64[:, 1] > b64[:, 3])
        if inverted.any():
            raise ValueError(
                f"{pre}box must be (x1, y1, x2, y2) with x1 <= x2 and y1 <= y2, got "
                f"{b64[inverted][:4].tolist()}"
            )
        if frame == "original":
            limit = np.array([old_w, old_h, old_w, old_h], dtype=np.float64)
            clipped = np.clip(b64, 0, limit)
            if not np.array_equal(clipped, b64):
                warnings.warn(
                    f"{pre}box extends beyond the {old_w}x{old_h} image; clipped to the image",
                    UserWarning,
                    stacklevel=3,
                )
            b64 = (clipped.reshape(-1, 2, 2) * scale).reshape(-1, 4)
        bxs = frame_float32(b64, "box", pre)
    if mask_input is not None:
        raw = _array(mask_input, "mask_input", _VALUES)
        m = tuple(mask_input_size)
        ok_ndim = (4,) if prompt_dim else (3, 4)
        if raw.ndim not in ok_ndim or raw.shape[-3:] != (1, *m):
            want = (
                f"(B, 1, {m[0]}, {m[1]})"
                if prompt_dim
                else f"(1, {m[0]}, {m[1]}) or (K, 1, {m[0]}, {m[1]})"
            )
            raise ValueError(
                f"{pre}mask_input must have shape {want} (low-resolution logits from a previous "
                f"predict), got {raw.shape}"
            )
        m64 = _float64(raw, "mask_input", pre)
        if m64.size and np.abs(m64).max() > MASK_LIMIT:
            raise ValueError(
                f"{pre}mask_input values must lie in [-{MASK_LIMIT:g}, {MASK_LIMIT:g}] (logits), "
                f"got {np.abs(m64).max():.3g}"
            )
        batched |= m64.ndim == 4
        msk = (m64 if m64.ndim == 4 else m64[None]).astype(np.float32)
    counts = {len(a) for a in (pts, bxs, msk) if a is not None}
    if len(counts - {1}) > 1:
        raise ValueError(
            f"{pre}prompt counts differ: points {None if pts is None else len(pts)}, boxes "
            f"{None if bxs is None else len(bxs)}, masks {None if msk is None else len(msk)}"
        )
    rest = counts - {1}
    p = rest.pop() if rest else 1

    def bc(a: np.ndarray | None) -> np.ndarray | None:
        if a is None:
            return None
        if len(a) != p:
            a = np.broadcast_to(a, (p, *a.shape[1:]))
        return np.ascontiguousarray(a)

    return Prompts(
        bc(pts), bc(lab), bc(bxs), bc(msk), p, batched, (old_h, old_w), (new_h, new_w),
        int(image_size),
    )  # fmt: skip
