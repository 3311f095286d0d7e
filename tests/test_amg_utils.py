"""Building blocks of the automatic mask generator vs the official utilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samhq_fast.amg import (
    AutomaticMaskGenerator,
    area_from_rle,
    batched_mask_to_box,
    build_all_layer_point_grids,
    calculate_stability_score,
    coco_encode_rle,
    coco_string_to_counts,
    counts_to_coco_string,
    generate_crop_boxes,
    mask_to_rle,
    nms,
    remove_small_regions,
    rle_to_mask,
)

from _official import _batched_nms, import_official


@pytest.fixture(scope="module")
def amg_utils():
    import_official()
    from segment_anything_hq.utils import amg

    return amg


def _random_masks(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    for i in range(n):
        y0, x0 = (
            torch.randint(0, h - 2, (1,), generator=g).item(),
            torch.randint(0, w - 2, (1,), generator=g).item(),
        )
        y1 = torch.randint(y0 + 1, h, (1,), generator=g).item()
        x1 = torch.randint(x0 + 1, w, (1,), generator=g).item()
        masks[i, y0:y1, x0:x1] = True
        masks[i] ^= torch.rand(h, w, generator=g) < 0.05
    masks[0] = False  # an empty mask
    masks[1] = True  # a full one
    return masks


def test_boxes_rle_and_stability_match_official(amg_utils):
    masks = _random_masks(12, 17, 23)
    assert torch.equal(batched_mask_to_box(masks), amg_utils.batched_mask_to_box(masks))
    ours, ref = mask_to_rle(masks), amg_utils.mask_to_rle_pytorch(masks)
    assert ours == ref
    for rle, m in zip(ours, masks, strict=True):
        assert np.array_equal(rle_to_mask(rle), m.numpy())
        assert area_from_rle(rle) == int(m.sum())
    logits = torch.randn(5, 30, 40) * 3
    assert torch.allclose(
        calculate_stability_score(logits, 0.0, 1.0),
        amg_utils.calculate_stability_score(logits, 0.0, 1.0),
    )


@pytest.mark.parametrize("size,layers", [((200, 300), 0), ((480, 640), 1), ((1000, 700), 2)])
def test_crop_boxes_and_grids_match_official(amg_utils, size, layers):
    assert generate_crop_boxes(size, layers, 512 / 1500) == amg_utils.generate_crop_boxes(
        size, layers, 512 / 1500
    )
    for a, b in zip(
        build_all_layer_point_grids(16, layers, 2),
        amg_utils.build_all_layer_point_grids(16, layers, 2),
        strict=True,
    ):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("thresh", [0.3, 0.5, 0.7])
def test_nms_matches_greedy_reference(thresh):
    g = torch.Generator().manual_seed(int(thresh * 10))
    xy = torch.rand(300, 2, generator=g) * 100
    wh = torch.rand(300, 2, generator=g) * 40 + 1
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = torch.rand(300, generator=g)
    ref = _batched_nms(boxes, scores, torch.zeros(300), thresh)
    ours = nms(boxes, scores, thresh)
    assert len(ours) < 300  # something was suppressed: the comparison is not trivial
    assert torch.equal(ours, ref)
    assert len(nms(boxes[:0], scores[:0], thresh)) == 0


def test_coco_rle_round_trip_and_known_string():
    # pycocotools encodes counts [0, 3, 2] as "03b"... build the reference by hand: each count is
    # delta-coded from the count two back (from the 4th on), 5 bits per char, +48.
    assert counts_to_coco_string([0, 3, 2]) == "032"
    rng = np.random.default_rng(0)
    for _ in range(50):
        counts = rng.integers(0, 5000, size=rng.integers(1, 30)).tolist()
        assert coco_string_to_counts(counts_to_coco_string(counts)) == counts
    masks = _random_masks(6, 33, 21, seed=4)
    for rle, m in zip(mask_to_rle(masks), masks, strict=True):
        coco = coco_encode_rle(rle)
        assert isinstance(coco["counts"], str)
        assert np.array_equal(rle_to_mask(coco), m.numpy())


def test_coco_rle_matches_pycocotools_when_installed():
    mask_utils = pytest.importorskip("pycocotools.mask")
    masks = _random_masks(6, 33, 21, seed=5)
    for rle, m in zip(mask_to_rle(masks), masks, strict=True):
        ref = mask_utils.encode(np.asfortranarray(m.numpy().astype(np.uint8)))
        assert coco_encode_rle(rle)["counts"] == ref["counts"].decode()


def test_remove_small_regions():
    pytest.importorskip("scipy")
    m = np.zeros((20, 20), bool)
    m[2:12, 2:12] = True
    m[5, 5] = False  # a 1-pixel hole
    m[16:18, 16:18] = True  # a 4-pixel island
    filled, changed = remove_small_regions(m, 5, "holes")
    assert changed and filled[5, 5] and filled.sum() == m.sum() + 1
    cleaned, changed = remove_small_regions(filled, 5, "islands")
    assert changed and not cleaned[16:18, 16:18].any() and cleaned.sum() == 100
    same, changed = remove_small_regions(cleaned, 5, "islands")
    assert not changed and np.array_equal(same, cleaned)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="exactly one of points_per_side and point_grids"):
        AutomaticMaskGenerator(object(), points_per_side=None)
    with pytest.raises(ValueError, match="output_mode"):
        AutomaticMaskGenerator(object(), output_mode="png")
    with pytest.raises(ValueError, match="crop_n_layers=1 needs 2"):
        AutomaticMaskGenerator(
            object(), points_per_side=None, point_grids=[np.zeros((1, 2))], crop_n_layers=1
        )
