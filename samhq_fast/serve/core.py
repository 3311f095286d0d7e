"""Ray-free parts of the service: errors, image decoding, content hashes, the LRU cache, prompt
validation, embedding transport and mask records.

``validate_prompts`` is the ONE place that turns a request's prompts into Predictor inputs and
maps a refusal (``ValueError`` / ``TypeError``) to a 400; everything else calls it.
"""

from __future__ import annotations

import hashlib
import io
import threading
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from samhq_fast.amg import area_from_rle, coco_encode_rle, mask_to_rle
from samhq_fast.predictor import ImageEmbedding, Predictor


class ApiError(Exception):
    """A request the service refuses: HTTP ``status`` and a message for ``{"error": ...}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "error": self.message}


# ------------------------------------------------------------------------------- images
def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Image file bytes (PNG, JPEG, WebP, ...) -> ``(H, W, 3)`` uint8 RGB, EXIF-oriented.

    Raises :class:`ApiError` 400 for bytes that are not an image, an empty image, or one with
    more than ``max_pixels`` pixels (checked from the header, before decoding)."""
    from PIL import Image, ImageOps

    from samhq_fast.image import to_rgb_uint8

    if not data:
        raise ApiError(400, "empty body: send the image file's bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ApiError(
                        400, f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}"
                    )
                if w == 0 or h == 0:
                    raise ApiError(400, f"image is empty ({w}x{h})")
                im.load()
                oriented = ImageOps.exif_transpose(im)
                rgb = to_rgb_uint8(oriented if oriented is not None else im)
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ApiError(400, f"image too large: {e}") from None
    except Exception as e:  # PIL raises many types for bad files
        raise ApiError(400, f"body is not a readable image: {type(e).__name__}: {e}") from None
    if rgb.shape[0] * rgb.shape[1] > max_pixels:  # EXIF rotation does not change the count
        raise ApiError(400, f"image over the limit of {max_pixels} pixels")
    return rgb


def image_id(rgb: np.ndarray) -> str:
    """Content hash of a decoded image: sha256 over its shape and RGB bytes (32 hex digits)."""
    h = hashlib.sha256(f"{rgb.shape[0]}x{rgb.shape[1]}x{rgb.shape[2]}:".encode())
    h.update(np.ascontiguousarray(rgb).data)
    return h.hexdigest()[:32]


# -------------------------------------------------------------------------------- cache
class LRUCache:
    """A thread-safe LRU map bounded by the total ``nbytes`` of its values (``max_bytes``).

    A value larger than the whole cache is not kept. ``hits`` / ``misses`` / ``evictions``
    count :meth:`get` results and removals."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, key: str) -> Any | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: str, value: Any, nbytes: int) -> bool:
        """Insert (or refresh) ``key``; evicts least recently used entries to fit. Returns
        whether the value was kept."""
        with self._lock:
            if key in self._items:
                self.nbytes -= self._items.pop(key)[1]
            if nbytes > self.max_bytes:
                return False
            while self._items and self.nbytes + nbytes > self.max_bytes:
                _, (_, n) = self._items.popitem(last=False)
                self.nbytes -= n
                self.evictions += 1
            self._items[key] = (value, int(nbytes))
            self.nbytes += int(nbytes)
            return True

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> dict[str, Any]:
        return {
            "entries": len(self._items),
            "bytes": self.nbytes,
            "max_bytes": self.max_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
        }


# ---------------------------------------------------------------------- embeddings
_VIEW = {torch.bfloat16: torch.int16}


def pack_embedding(emb: ImageEmbedding) -> dict[str, Any]:
    """One image's :class:`ImageEmbedding` -> numpy arrays (bf16 travels as int16 bits)."""
    assert len(emb) == 1
    out: dict[str, Any] = {
        "original_size": tuple(emb.original_sizes[0]),
        "input_size": tuple(emb.input_sizes[0]),
        "dtype": str(emb.image_embeddings.dtype).removeprefix("torch."),
    }
    for k in ("image_embeddings", "hq_features"):
        t = getattr(emb, k).detach().cpu().contiguous()
        if t.dtype in _VIEW:
            t = t.view(_VIEW[t.dtype])
        out[k] = t.numpy()
    return out


def packed_nbytes(packed: dict[str, Any]) -> int:
    return int(packed["image_embeddings"].nbytes + packed["hq_features"].nbytes)


def unpack_embedding(packed: dict[str, Any], device: torch.device | str) -> ImageEmbedding:
    dtype = getattr(torch, packed["dtype"])
    ts = []
    for k in ("image_embeddings", "hq_features"):
        a = packed[k]
        t = torch.from_numpy(np.array(a, copy=True) if not a.flags.writeable else a)
        if dtype in _VIEW:
            t = t.view(dtype)
        ts.append(t.to(device))
    return ImageEmbedding(ts[0], ts[1], (tuple(packed["original_size"]),),
                          (tuple(packed["input_size"]),))  # fmt: skip


# ----------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class Prompt:
    """One validated prompt in original-image pixels: ``points (N, 2)`` float64 or ``None``,
    ``labels (N,)`` int64 or ``None``, ``box (4,)`` float64 or ``None``."""

    points: np.ndarray | None
    labels: np.ndarray | None
    box: np.ndarray | None

    @property
    def signature(self) -> tuple[int, bool]:
        """(point count, has box): prompts with one signature decode in one call."""
        return (0 if self.points is None else len(self.points), self.box is not None)


def validate_prompts(
    predictor: Predictor, original_size: tuple[int, int], prompts: Sequence[dict[str, Any]]
) -> list[Prompt]:
    """Check each prompt with the input contract (:mod:`samhq_fast.contract`, through
    :meth:`Predictor.validate_prompts`) and return them as arrays.

    ``prompts``: dicts with optional ``points`` ``[[x, y], ...]``, ``labels`` ``[1, 0, ...]``
    and ``box`` ``[x1, y1, x2, y2]`` in original-image pixels. One prompt each: several go in
    several dicts. Raises :class:`ApiError` 400 naming the prompt and the problem."""
    out = []
    for i, p in enumerate(prompts):
        where = f"prompt {i}: " if len(prompts) > 1 else ""
        try:
            pts, lab, box = p.get("points"), p.get("labels"), p.get("box")
            if pts is not None:
                pts = np.asarray(pts, dtype=np.float64) if _rectangular(pts) else pts
                if not isinstance(pts, np.ndarray) or pts.ndim != 2:
                    raise ValueError(
                        "points must be a list of [x, y] pairs, got "
                        f"{_shape_text(pts)} (use 'prompts' for several prompts)"
                    )
            if box is not None:
                box = np.asarray(box, dtype=np.float64) if _rectangular(box) else box
                if not isinstance(box, np.ndarray) or box.shape != (4,):
                    raise ValueError(
                        f"box must be [x1, y1, x2, y2], got {_shape_text(box)} "
                        "(use 'prompts' for several boxes)"
                    )
            if lab is not None:
                lab = np.asarray(lab) if _rectangular(lab) else lab
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # boxes beyond the image are clipped
                predictor.validate_prompts(original_size, pts, lab, box)  # the input contract
            if pts is not None:
                lab = np.ones(len(pts), np.int64) if lab is None else np.asarray(lab, np.int64)
            out.append(Prompt(pts, lab, box))
        except (ValueError, TypeError) as e:
            raise ApiError(400, f"{where}{e}") from None
    return out


def _rectangular(x: Any) -> bool:
    try:
        a = np.asarray(x, dtype=np.float64)
    except (ValueError, TypeError):
        return False
    return a.dtype != object


def _shape_text(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return f"shape {x.shape}"
    return f"{type(x).__name__} {str(x)[:60]}"


# ------------------------------------------------------------------------- masks
def mask_records(masks: np.ndarray | torch.Tensor, scores: np.ndarray) -> list[dict[str, Any]]:
    """``(K, H, W)`` bool masks and ``(K,)`` scores -> ``{"score", "area", "bbox" (XYWH),
    "rle" (COCO compressed)}`` records."""
    m = torch.as_tensor(masks)
    rles = mask_to_rle(m)
    out = []
    for k, rle in enumerate(rles):
        ys, xs = np.nonzero(np.asarray(m[k]))
        if len(xs):
            x0, y0 = int(xs.min()), int(ys.min())
            bbox = [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]
        else:
            bbox = [0, 0, 0, 0]
        out.append({
            "score": float(scores[k]),
            "area": area_from_rle(rle),
            "bbox": bbox,
            "rle": coco_encode_rle(rle),
        })  # fmt: skip
    return out
