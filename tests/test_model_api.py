"""The transformers-compatible surface: the seed example with only the import changed, output
conventions, and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from samhq_fast import SamHQModel, SamHQProcessor, load_model

from _weights import build_official, perturb_, save_official_pth, small_config


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    official = perturb_(build_official(small_config()), seed=21)
    save_official_pth(official, tmp / "m.pth")
    load_model(tmp / "m.pth").save_pretrained(tmp / "hf")
    return tmp / "hf"


def test_seed_example_runs_with_only_the_import_changed(hf_dir):
    device = "cpu"
    model = SamHQModel.from_pretrained(hf_dir).to(device)
    processor = SamHQProcessor.from_pretrained(hf_dir)
    raw_image = Image.fromarray(
        np.random.default_rng(0).integers(0, 255, (120, 200, 3), dtype=np.uint8)
    ).convert("RGB")
    input_points = [[[45, 60]]]
    inputs = processor(raw_image, input_points=input_points, return_tensors="pt").to(model.device)
    with torch.no_grad():
        outputs = model(**inputs)
    masks = processor.image_processor.post_process_masks(
        outputs.pred_masks.cpu(),
        inputs["original_sizes"].cpu(),
        inputs["reshaped_input_sizes"].cpu(),
    )
    scores = outputs.iou_scores
    assert scores.shape == (1, 1, 3)
    assert masks[0].shape == (1, 3, 120, 200) and masks[0].dtype == torch.bool
    # multimask=True gives the three SAM masks sorted by predicted IoU (transformers' rule).
    assert torch.all(scores[0, 0, :-1] >= scores[0, 0, 1:])
    with torch.no_grad():
        hq = model(**inputs, hq_token_only=True)
    assert hq.pred_masks.shape[2] == 1

    # The second seed example passes a segmentation map; transformers ignores it, so do we.
    seg = Image.fromarray((np.arange(200)[None, :].repeat(120, 0) > 100).astype(np.uint8) * 255)
    inputs = processor(
        raw_image,
        input_points=input_points,
        segmentation_maps=seg.convert("1"),
        return_tensors="pt",
    ).to(model.device)
    with pytest.warns(UserWarning, match="ignored, as in transformers"), torch.no_grad():
        with_map = model(**inputs)
    assert torch.equal(with_map.pred_masks, outputs.pred_masks)


def test_output_access_styles(hf_dir):
    model = SamHQModel.from_pretrained(hf_dir)
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        out = model(pixel_values=x, input_points=torch.tensor([[[[10.0, 20.0]]]]))
        tup = model(
            pixel_values=x, input_points=torch.tensor([[[[10.0, 20.0]]]]), return_dict=False
        )
    assert out["iou_scores"] is out.iou_scores and out[1] is out.pred_masks
    assert torch.equal(tup[0], out.iou_scores) and torch.equal(tup[1], out.pred_masks)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            dict(pixel_values=torch.randn(1, 3, 128, 128)),
            r"pixel_values must have shape \(B, 3, 256, 256\)",
        ),
        (dict(input_points=torch.zeros(1, 1, 2)), "input_points must have shape"),
        (dict(input_points=torch.tensor([[[[float("nan"), 1.0]]]])), "NaN"),
        (
            dict(input_points=torch.zeros(1, 1, 1, 2), input_labels=torch.tensor([[[2]]])),
            r"input_labels must be in .* got \[2\]",
        ),
        (
            dict(input_points=torch.zeros(1, 1, 2, 2), input_labels=torch.tensor([[[1]]])),
            "does not match input_points",
        ),
        (dict(input_boxes=torch.zeros(1, 4)), "input_boxes must have shape"),
        (
            dict(input_points=torch.zeros(1, 2, 1, 2), input_boxes=torch.zeros(1, 3, 4)),
            "one box per point set",
        ),
        (dict(input_masks=torch.zeros(1, 1, 32, 32)), "input_masks must have shape"),
        (dict(input_points=torch.zeros(3, 1, 1, 2)), "prompts are given for 3 images"),
        (dict(input_labels=torch.ones(1, 1, 1)), "without input_points"),
    ],
)
def test_bad_input_is_named(hf_dir, kwargs, match):
    model = SamHQModel.from_pretrained(hf_dir)
    kwargs.setdefault("pixel_values", torch.randn(2 if "points" in match else 1, 3, 256, 256))
    with pytest.raises(ValueError, match=match):
        model(**kwargs)


def test_neither_or_both_inputs(hf_dir):
    model = SamHQModel.from_pretrained(hf_dir)
    with pytest.raises(ValueError, match="exactly one of pixel_values and image_embeddings"):
        model()
    with pytest.raises(TypeError, match="unexpected arguments"):
        model(pixel_values=torch.randn(1, 3, 256, 256), input_point=[1, 2])


def test_importing_samhq_fast_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, samhq_fast; samhq_fast.SamHQModel; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
