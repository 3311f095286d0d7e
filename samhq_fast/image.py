"""Image conversion helpers: anything image-like -> an RGB ``uint8`` array in HWC layout.

Shared by :class:`samhq_fast.processing.SamHQProcessor` and the predictor. Only numpy, Pillow and
(optionally, for tensor inputs) torch are used.

Conversion rules of :func:`to_rgb_uint8` (where they differ from transformers' ``SamImageProcessor``
it is said so; for plain RGB ``uint8`` input both give identical results):

* Layout: PIL images as they are; numpy arrays are ``HW`` or ``HWC`` (``CHW`` accepted when the
  last axis cannot be channels); torch tensors are ``HW`` or ``CHW`` (``HWC`` accepted when the
  first axis cannot be channels). Channel counts 1 to 4 are understood.
* Grayscale (``L``, 1 channel) -> RGB by replicating the channel (same as PIL's ``convert("RGB")``).
* Alpha (``RGBA``, ``LA``, 2 or 4 channels) -> the alpha channel is **dropped**, not composited.
  This is what HF does (PIL ``convert("RGB")``); compositing onto white would give different pixels.
* Palette (``P``, ``PA``) and other PIL modes (``1``, ``CMYK``, ``YCbCr``, ...) -> PIL's
  ``convert("RGB")``, exactly as HF.
* 16-bit (numpy ``uint16``, PIL ``I;16*`` and ``I``) -> 8-bit by ``value >> 8`` (full range kept).
  HF differs: PIL images are clipped at 255 (mostly white), numpy ``uint16`` arrays raise.
* Floating point (numpy/torch float, PIL ``F``): values in ``[0, 1]`` -> ``round(value * 255)``;
  otherwise integer values in ``[0, 255]`` are taken as they are; anything else is an error.
  HF differs for ``[0, 1]`` floats: it truncates to ``uint8`` for the resize and then divides by
  255 a second time, giving a nearly black image.
* Boolean -> 0 / 255. Other integer types must hold values in ``[0, 255]``.
* Empty images, non-finite values and unsupported shapes raise ``ValueError``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image, ImageOps

__all__ = ["to_rgb_uint8", "load_image", "is_image_like"]

_CHANNELS = (1, 2, 3, 4)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _is_torch_tensor(x: Any) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency of the package
        return False
    return isinstance(x, torch.Tensor)


def is_image_like(x: Any) -> bool:
    """True for a PIL image, a numpy array or a torch tensor (the single-image types accepted)."""
    return isinstance(x, (Image.Image, np.ndarray)) or _is_torch_tensor(x)


def _tensor_to_numpy(t: Any) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.numpy()


def _to_hwc(arr: np.ndarray, channels_first: bool) -> np.ndarray:
    """(H, W) or 3-D array -> (H, W, C); ``channels_first`` says which layout to try first."""
    if arr.ndim == 2:
        return arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(
            f"an image must have 2 (H, W) or 3 (H, W, C / C, H, W) dimensions, got shape "
            f"{tuple(arr.shape)}"
        )
    first_ok, last_ok = arr.shape[0] in _CHANNELS, arr.shape[2] in _CHANNELS
    if first_ok and (channels_first or not last_ok):
        return np.moveaxis(arr, 0, -1)
    if last_ok:
        return arr
    raise ValueError(
        f"cannot tell the channel axis of an image of shape {tuple(arr.shape)}: "
        f"expected 1, 2, 3 or 4 channels first (C, H, W) or last (H, W, C)"
    )


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Apply the dtype rules of the module docstring; ``arr`` is HWC of any dtype."""
    dt = arr.dtype
    if dt == np.uint8:
        return arr
    if dt == np.bool_:
        return arr.astype(np.uint8) * np.uint8(255)
    if dt == np.uint16:
        return (arr >> 8).astype(np.uint8)
    if np.issubdtype(dt, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise ValueError(
                f"integer image of dtype {dt} has values in [{lo}, {hi}]; expected [0, 255] "
                f"(uint16 images are converted by >> 8; convert other bit depths to uint8 yourself)"
            )
        return arr.astype(np.uint8)
    if np.issubdtype(dt, np.floating):
        a = arr.astype(np.float64)
        if not np.isfinite(a).all():
            raise ValueError("floating-point image contains NaN or inf values")
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0.0 and hi <= 1.0:
            return np.rint(a * 255.0).astype(np.uint8)
        if lo >= 0.0 and hi <= 255.0 and np.array_equal(a, np.round(a)):
            return a.astype(np.uint8)
        raise ValueError(
            f"floating-point image has values in [{lo}, {hi}]; expected [0, 1] "
            f"(scaled by 255 and rounded) or whole numbers in [0, 255]"
        )
    raise ValueError(f"unsupported image dtype {dt}")


def _to_rgb_channels(arr: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 with C in 1..4 -> (H, W, 3): replicate gray, drop alpha."""
    c = arr.shape[2]
    if c == 3:
        return arr
    if c == 4:
        return arr[:, :, :3]
    if c in (1, 2):
        return np.repeat(arr[:, :, :1], 3, axis=2)
    raise ValueError(f"unsupported number of channels: {c}")  # pragma: no cover


def _pil_to_rgb_uint8(image: Image.Image) -> np.ndarray:
    if image.mode == "RGB":
        return np.asarray(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(image).astype(np.int64)
        lo, hi = int(arr.min(initial=0)), int(arr.max(initial=0))
        if lo < 0 or hi > 65535:
            raise ValueError(
                f"PIL image of mode {image.mode} has values in [{lo}, {hi}]; expected 16-bit data "
                f"in [0, 65535]"
            )
        return _to_rgb_channels((arr >> 8).astype(np.uint8)[:, :, None])
    if image.mode == "F":
        return _to_rgb_channels(_to_uint8(np.asarray(image))[:, :, None])
    # L, LA, P, PA, RGBA, 1, CMYK, YCbCr, ...: PIL's own conversion, exactly as transformers.
    return np.asarray(image.convert("RGB"))


def to_rgb_uint8(image: Any) -> np.ndarray:
    """Convert one image to an RGB ``uint8`` array.

    Args:
        image: a ``PIL.Image.Image``; a numpy array ``(H, W)``, ``(H, W, C)`` (or ``(C, H, W)``);
            or a torch tensor ``(H, W)``, ``(C, H, W)`` (or ``(H, W, C)``), with C in 1..4.
            See the module docstring for the dtype and mode rules.

    Returns:
        ``np.ndarray`` of shape ``(H, W, 3)``, dtype ``uint8``, C-contiguous.

    Raises:
        ValueError: empty image, unsupported shape, dtype or value range, non-finite values.
        TypeError: not an image type.
    """
    if isinstance(image, Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"image is empty (zero size): {image.width}x{image.height}")
        out = _pil_to_rgb_uint8(image)
    elif isinstance(image, np.ndarray) or _is_torch_tensor(image):
        is_tensor = not isinstance(image, np.ndarray)
        arr = _tensor_to_numpy(image) if is_tensor else image
        if arr.size == 0:
            raise ValueError(f"image is empty (zero size): shape {tuple(arr.shape)}")
        arr = _to_hwc(arr, channels_first=is_tensor)
        out = _to_rgb_channels(_to_uint8(arr))
    else:
        raise TypeError(
            f"unsupported image type {type(image).__name__}; expected a PIL image, a numpy array "
            f"or a torch tensor"
        )
    return np.ascontiguousarray(out)


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file, apply its EXIF orientation and convert it with :func:`to_rgb_uint8`.

    Args:
        path: file path.

    Returns:
        ``np.ndarray`` of shape ``(H, W, 3)``, dtype ``uint8`` (H, W after EXIF rotation).
    """
    with Image.open(path) as im:
        im.load()
        oriented = ImageOps.exif_transpose(im)
        return to_rgb_uint8(oriented if oriented is not None else im)
