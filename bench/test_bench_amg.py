"""Automatic mask generation ("segment everything"), seconds per image: ours vs the official
``SamAutomaticMaskGenerator``, same weights, same image (the 1500 x 1000 synthetic photo), fp32,
the official default thresholds.

CPU default: vit_b with an 8 x 8 grid (64 prompts; a 32 x 32 grid takes minutes per image on two
cores); CUDA or ``--bench-full``: vit_b and vit_h with the default 32 x 32 grid. Error columns:
the mask count, and the worst IoU between each reference mask (ours, torch, fp32) and its best
match. Random weights give few masks; the cost is the same work either way (encoder, every grid
prompt decoded, filters, NMS, RLE).

    python -m pytest bench/test_bench_amg.py --benchmark-json bench/results/raw.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from bench._peers import IMPL_LABELS, PEER_BACKENDS, synthetic_image
from bench._timing import measure_case
from samhq_fast import AutomaticMaskGenerator, Predictor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _official import import_official  # noqa: E402

_REFERENCE: dict[str, list[np.ndarray]] = {}


def _presets(settings) -> tuple[str, ...]:
    return ("vit_b", "vit_h") if settings.full else ("vit_b",)


@pytest.mark.parametrize("preset", ["vit_b", "vit_h"])
@pytest.mark.parametrize("impl", ["ours", "official"])
def test_amg(benchmark, settings, zoo, impl: str, preset: str) -> None:
    if preset not in _presets(settings):
        pytest.skip(f"{preset} AMG runs with --bench-full or on CUDA")
    grid = 4 if settings.tiny else 32 if (settings.full or settings.headline) else 8
    model = zoo.model(impl, preset, "fp32", "torch")
    if impl == "ours":
        batch = 1024 if settings.cuda else 64
        gen = AutomaticMaskGenerator(Predictor(model), points_per_side=grid, points_per_batch=batch)
    else:
        gen = import_official().SamAutomaticMaskGenerator(model, points_per_side=grid)
    image = synthetic_image()
    rounds, warmup = (5, 1) if settings.cuda else (1, 0)
    benchmark.group = f"amg {preset} {grid}x{grid}"
    records = measure_case(
        impl,
        f"{IMPL_LABELS[impl]} AMG",
        benchmark=benchmark,
        fn=lambda: gen.generate(image),
        device=settings.device,
        rounds=rounds,
        warmup_rounds=warmup,
        flops=None,
        items=1,
        item_name="images",
        dtype="fp32",
        info=dict(
            section="amg",
            impl=impl,
            impl_label=IMPL_LABELS[impl],
            preset=preset,
            backend="torch" if impl == "ours" else PEER_BACKENDS[impl],
            batch=1,
            image="1500x1000 synthetic uint8 RGB",
            grid=f"{grid}x{grid}",
        ),
    )
    masks = [r["segmentation"] for r in records]
    if impl == "ours":
        _REFERENCE[preset] = masks
    ref = _REFERENCE.get(preset)
    worst = None
    if ref is not None and ref:
        worst = min(
            max((float((a & b).sum() / max((a | b).sum(), 1)) for b in masks), default=0.0)
            for a in ref
        )
    benchmark.extra_info.update(
        masks=len(masks),
        reference_masks=None if ref is None else len(ref),
        mask_iou=worst,
        reference="samhq_fast AutomaticMaskGenerator, torch backend, fp32, same image",
    )
