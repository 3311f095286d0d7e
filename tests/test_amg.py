"""Automatic mask generation vs the official SamAutomaticMaskGenerator, on the small trained
model (random weights give one full-image mask per grid and NMS leaves a single record)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from samhq_fast import Predictor
from samhq_fast.amg import AutomaticMaskGenerator, rle_to_mask

from _official import import_official
from _weights import build_official
from fixtures.shapes import iou, make_scene

MODEL = Path(__file__).parent / "fixtures" / "shapes_model" / "sam_hq_shapes.pth"
SETTINGS = dict(points_per_side=12, pred_iou_thresh=0.8, stability_score_thresh=0.9)


@pytest.fixture(scope="module")
def pair():
    sah = import_official()
    ours = Predictor(MODEL, backend="reference")
    official = build_official(ours.model.config)
    official.load_state_dict(
        {k: v.float() for k, v in torch.load(MODEL, weights_only=True).items()}
    )
    return sah, ours, official.eval()


@pytest.fixture(scope="module")
def scene(pair):
    size = pair[1].model.config.vision_config.image_size
    image, masks = make_scene(np.random.default_rng(2024), size=int(size * 1.25), n_shapes=4)
    return image, masks


def _match(ours: list[dict], ref: list[dict]) -> None:
    assert len(ours) == len(ref), f"{len(ours)} masks vs the official {len(ref)}"
    used: set[int] = set()
    for r in ref:
        best = max(
            (i for i in range(len(ours)) if i not in used),
            key=lambda i: iou(ours[i]["segmentation"], r["segmentation"]),
        )
        o = ours[best]
        used.add(best)
        assert iou(o["segmentation"], r["segmentation"]) >= 0.99
        assert abs(o["predicted_iou"] - r["predicted_iou"]) < 1e-3
        assert abs(o["stability_score"] - r["stability_score"]) < 1e-2
        assert o["crop_box"] == r["crop_box"]
        assert np.allclose(o["bbox"], r["bbox"], atol=1)
        assert np.allclose(o["point_coords"], r["point_coords"], atol=1e-3)
        assert o["area"] == int(o["segmentation"].sum())


@pytest.mark.parametrize("crop_n_layers", [0, 1])
def test_equals_official_generator(pair, scene, crop_n_layers):
    sah, ours, official = pair
    image, truth = scene
    kw = dict(SETTINGS, crop_n_layers=crop_n_layers)
    ref = sah.SamAutomaticMaskGenerator(official, **kw).generate(image)
    got = AutomaticMaskGenerator(ours, points_per_batch=500, **kw).generate(image)
    print(f"[amg] crop_n_layers={crop_n_layers}: {len(got)} masks (official {len(ref)})")
    assert len(got) >= 3, f"only {len(got)} masks on a scene with 4 shapes"
    _match(got, ref)
    # The masks are the scene's shapes: every true shape is found by some mask.
    found = sum(max(iou(r["segmentation"], t) for r in got) > 0.8 for t in truth)
    assert found >= 3, f"only {found} of 4 shapes found"


def test_output_modes_batching_and_generate_batch(pair, scene):
    _, ours, _ = pair
    image, _ = scene
    binary = AutomaticMaskGenerator(ours, points_per_batch=7, **SETTINGS).generate(image)
    coco = AutomaticMaskGenerator(ours, output_mode="coco_rle", **SETTINGS).generate(image)
    raw = AutomaticMaskGenerator(ours, output_mode="uncompressed_rle", **SETTINGS).generate(image)
    assert len(binary) == len(coco) == len(raw) >= 3
    for b, c, r in zip(binary, coco, raw, strict=True):
        assert isinstance(c["segmentation"]["counts"], str)
        assert np.array_equal(rle_to_mask(c["segmentation"]), b["segmentation"])
        assert np.array_equal(rle_to_mask(r["segmentation"]), b["segmentation"])
        assert b["predicted_iou"] == pytest.approx(c["predicted_iou"], abs=1e-5)
    flipped = np.ascontiguousarray(image[:, ::-1])
    gen = AutomaticMaskGenerator(ours, **SETTINGS)
    batch = gen.generate_batch([image, flipped])
    single = [gen.generate(image), gen.generate(flipped)]
    for got, want in zip(batch, single, strict=True):
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            assert np.array_equal(a["segmentation"], b["segmentation"])


def test_min_mask_region_area_removes_small_regions(pair, scene):
    pytest.importorskip("scipy")
    from scipy import ndimage

    _, ours, _ = pair
    image, _ = scene
    area = 60
    records = AutomaticMaskGenerator(ours, min_mask_region_area=area, **SETTINGS).generate(image)
    assert len(records) >= 3
    eight = np.ones((3, 3), dtype=int)
    for r in records:
        m = r["segmentation"]
        islands, n = ndimage.label(m, structure=eight)
        sizes = np.bincount(islands.ravel())[1:]
        assert n == 0 or sizes.max() >= area
        assert (sizes >= area).all() or n == 1
        holes, n_h = ndimage.label(~m, structure=eight)
        hole_sizes = np.bincount(holes.ravel())[1:]
        assert (hole_sizes >= area).all(), "a hole smaller than min_mask_region_area remains"


def test_triton_backend_finds_the_same_masks(pair, scene):
    pytest.importorskip("triton")
    _, ours, _ = pair
    image, _ = scene
    fast = Predictor(MODEL, backend="triton")
    assert fast.model.backend == "triton"
    # An 8x8 grid (one decoder batch): every kernel runs in the interpreter on CPU.
    settings = {**SETTINGS, "points_per_side": 8}
    ref = AutomaticMaskGenerator(ours, **settings).generate(image)
    got = AutomaticMaskGenerator(fast, **settings).generate(image)
    assert len(got) >= 3
    _match(got, ref)
