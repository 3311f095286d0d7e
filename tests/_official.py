"""Import the official ``segment_anything_hq`` 0.3 package on a CPU machine without timm or
torchvision (see ANCHORS.md section 4): minimal, faithful stand-ins for the few names it imports
are put into ``sys.modules`` first. Real timm/torchvision modules are never shadowed."""

from __future__ import annotations

import importlib
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image


def _trunc_normal_(t: torch.Tensor, mean=0.0, std=1.0, a=-2.0, b=2.0) -> torch.Tensor:
    return torch.nn.init.trunc_normal_(t, mean, std, a, b)


class _DropPath(torch.nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):  # inference only
        return x


def _to_2tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


def _resize(img: Image.Image, size) -> Image.Image:
    # torchvision.transforms.functional.resize on a PIL image: PIL bilinear to (h, w).
    h, w = size
    return img.resize((w, h), Image.BILINEAR)


def _to_pil_image(arr) -> Image.Image:
    return Image.fromarray(np.asarray(arr))


def _box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    order = torch.argsort(scores, descending=True, stable=True)
    boxes = boxes[order].double()
    area = _box_area(boxes)
    keep, suppressed = [], torch.zeros(len(order), dtype=torch.bool)
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(order[i].item())
        lt = torch.maximum(boxes[i, :2], boxes[:, :2])
        rb = torch.minimum(boxes[i, 2:], boxes[:, 2:])
        inter = (rb - lt).clamp(min=0).prod(dim=1)
        iou = inter / (area[i] + area - inter)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.long)


def _batched_nms(boxes, scores, idxs, iou_threshold):
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.long)
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    return _nms(boxes + offsets[:, None], scores, iou_threshold)


def _install_stubs() -> None:
    def module(name: str, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        m.__samhq_fast_stub__ = True
        sys.modules[name] = m
        return m

    for real in ("timm", "torchvision"):
        if real in sys.modules and not getattr(sys.modules[real], "__samhq_fast_stub__", False):
            return
    module("timm")
    module("timm.models")
    module(
        "timm.models.layers",
        DropPath=_DropPath,
        to_2tuple=_to_2tuple,
        trunc_normal_=_trunc_normal_,
    )
    module("timm.models.registry", register_model=lambda fn: fn)
    module("torchvision")
    module("torchvision.transforms")
    module("torchvision.transforms.functional", resize=_resize, to_pil_image=_to_pil_image)
    module("torchvision.ops")
    module("torchvision.ops.boxes", batched_nms=_batched_nms, box_area=_box_area)


def import_official():
    """The official ``segment_anything_hq`` package, or skip the test if it is not installed.

    The stand-ins live in ``sys.modules`` only while the package imports (it binds the names it
    needs), so transformers, which probes for timm/torchvision, never sees them.
    """
    if "segment_anything_hq" in sys.modules:
        return sys.modules["segment_anything_hq"]
    if importlib.util.find_spec("segment_anything_hq") is None:
        pytest.skip(
            "segment-anything-hq is not installed (pip install --no-deps segment-anything-hq)"
        )
    before = set(sys.modules)
    _install_stubs()
    try:
        return importlib.import_module("segment_anything_hq")
    finally:
        for name in set(sys.modules) - before:
            if getattr(sys.modules[name], "__samhq_fast_stub__", False):
                del sys.modules[name]


__all__ = ["import_official"]
