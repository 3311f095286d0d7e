"""The input contract at every entry point (issue 16): empty prompt sets, float32 overflow,
``predict_torch`` validation, flags and indices, complex / string / object arrays, very thin
images (Predictor, SamHQProcessor, automatic mask generator) and the CLI.

Public API only, so each case also runs (and fails) against the code before the contract.
The model is the small trained one (256-pixel input, 64 x 64 low-res masks): cheap to run.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from samhq_fast import AutomaticMaskGenerator, Predictor
from samhq_fast.cli import main
from samhq_fast.processing import SamHQProcessor

PTH = Path(__file__).parent / "fixtures" / "shapes_model" / "sam_hq_shapes.pth"
H, W = 50, 40  # the current image of `pred`
M = 64  # low-res mask side of the shapes model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model() -> Predictor:
    return Predictor(PTH, device="cpu", backend="reference")


@pytest.fixture
def pred(model) -> Predictor:
    model.set_image(_image(H, W))
    return model


PT = dict(point_coords=np.array([[10.0, 20.0]]), point_labels=np.array([1]))


def _assert_empty(out, c: int, h: int = H, w: int = W, logits: bool = False) -> None:
    masks, scores, low = (np.asarray(x) for x in out)
    assert masks.shape == (0, c, h, w) and masks.dtype == (np.float32 if logits else bool)
    assert scores.shape == (0, c) and low.shape == (0, c, M, M)


# ------------------------------------------------------------------------ empty prompt sets
def test_empty_box_set_gives_empty_results(pred):
    _assert_empty(pred.predict(box=np.zeros((0, 4))), 1)
    _assert_empty(pred.predict(box=np.zeros((0, 4)), multimask_output=False), 1)
    _assert_empty(pred.predict(box=np.zeros((0, 4)), return_all_masks=True), 3)
    _assert_empty(pred.predict(box=np.zeros((0, 4)), return_logits=True), 1, logits=True)


def test_empty_point_set_gives_empty_results(pred):
    out = pred.predict(point_coords=np.zeros((0, 1, 2)), point_labels=np.zeros((0, 1)))
    _assert_empty(out, 1)
    _assert_empty(pred.predict(point_coords=np.zeros((0, 3, 2))), 1)
    # points shared by every box, and no box
    _assert_empty(pred.predict(**PT, box=np.zeros((0, 4))), 1)


def test_empty_mask_input_set_gives_empty_results(pred):
    _assert_empty(pred.predict(mask_input=np.zeros((0, 1, M, M), np.float32)), 1)
    _assert_empty(pred.predict(**PT, mask_input=np.zeros((0, 1, M, M), np.float32)), 1)


def test_decode_batch_with_an_empty_box_set(model):
    emb = model.embed([_image(H, W), _image(30, 70, 1)])
    out = model.decode_batch(emb, boxes=[np.zeros((0, 4)), np.array([[2.0, 3, 20, 25]])])
    _assert_empty(out[0], 1)
    assert out[1][0].shape == (1, 1, 30, 70) and out[1][1].shape == (1, 1)
    # the same image alone: equal
    one = model.decode(emb[1], box=np.array([[2.0, 3, 20, 25]]))
    assert np.array_equal(one[0], out[1][0])
    only_empty = model.decode_batch(emb[0], boxes=[np.zeros((0, 4))])
    _assert_empty(only_empty[0], 1)


def test_predict_torch_empty_boxes(pred):
    out = pred.predict_torch(None, None, torch.zeros(0, 4))
    assert all(isinstance(x, torch.Tensor) for x in out)
    _assert_empty([x.numpy() for x in out], 1)


# ------------------------------------------------------------- float32 after the frame map
@pytest.mark.parametrize("x", [3e38, -1e39, 1e7], ids=["3e38", "-1e39", "1e7"])
def test_coordinates_must_fit_float32_in_the_model_frame(pred, x):
    """3e38 and -1e39 pass a float64 finite check; in the model frame (x 5.12 here) they are
    inf in float32 (the model returned NaN scores and an empty mask). 1e7 is finite but beyond
    the prompt encoder's range."""
    with pytest.raises(ValueError, match="point_coords"):
        pred.predict(point_coords=np.array([[x, 5.0]]), point_labels=np.array([1]))
    with pytest.raises(ValueError, match="point_coords"):
        pred.predict_torch(torch.tensor([[[5.0, x]]], dtype=torch.float64), torch.ones(1, 1))


def test_huge_boxes_are_clipped_not_nan(pred):
    with pytest.warns(UserWarning, match="clipped"):
        masks, scores, low = pred.predict(box=np.array([-1e39, 0, 3e38, 1e39]))
    assert np.isfinite(scores).all() and np.isfinite(low).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = pred.predict(box=np.array([0, 0, W, H]))
    assert np.array_equal(masks, ref[0])


# ------------------------------------------------------------------------- predict_torch
def test_predict_torch_validates(pred):
    with pytest.raises(ValueError, match="point_coords.*NaN"):
        pred.predict_torch(torch.tensor([[[float("nan"), 1.0]]]), torch.ones(1, 1))
    with pytest.raises(ValueError, match=r"point_labels.*\[7\]"):
        pred.predict_torch(torch.tensor([[[3.0, 1.0]]]), torch.tensor([[7]]))
    with pytest.raises(ValueError, match=r"box must have shape"):
        pred.predict_torch(None, None, torch.tensor([[1.0, 2.0, 3.0]]))
    with pytest.raises(ValueError, match=r"box.*x1 <= x2"):
        pred.predict_torch(None, None, torch.tensor([[9.0, 2.0, 3.0, 4.0]]))
    with pytest.raises(ValueError, match="point_coords must have shape"):
        pred.predict_torch(torch.tensor([[3.0, 1.0]]), torch.ones(1))
    with pytest.raises(ValueError, match="mask_input"):
        pred.predict_torch(None, None, None, torch.full((1, 1, M, M), float("inf")))
    with pytest.raises(ValueError, match="prompt counts differ"):
        pred.predict_torch(None, None, torch.zeros(2, 4), torch.zeros(3, 1, M, M))
    with pytest.raises(TypeError, match="complex"):
        pred.predict_torch(torch.zeros(1, 1, 2, dtype=torch.complex64), torch.ones(1, 1))


def test_predict_torch_default_labels_are_foreground(pred):
    pts = torch.tensor([[[12.0, 30.0]]])
    a = pred.predict_torch(pts, None)
    b = pred.predict_torch(pts, torch.ones(1, 1, dtype=torch.long))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


# ------------------------------------------------------------------- flags, indices, dtypes
def test_image_index_must_be_an_integer_in_range(model):
    emb = model.embed(_image(H, W))
    with pytest.raises(TypeError, match="image_index"):
        model.decode(emb, **PT, image_index=0.5)
    with pytest.raises(TypeError, match="image_index"):
        model.decode(emb, **PT, image_index=True)
    with pytest.raises(ValueError, match="image_index 1 out of range"):
        model.decode(emb, **PT, image_index=1)
    a = model.decode(emb, **PT, image_index=np.int64(-1))
    assert a[0].shape == (1, H, W)


@pytest.mark.parametrize("value", ["no", 0, 1, None, 1.0])
@pytest.mark.parametrize("flag", ["multimask_output", "hq_token_only", "return_logits"])
def test_flags_must_be_bools(pred, flag, value):
    with pytest.raises(TypeError, match=flag):
        pred.predict(**PT, **{flag: value})
    with pytest.raises(TypeError, match=flag):
        pred.predict_torch(torch.tensor([[[5.0, 5.0]]]), torch.ones(1, 1), **{flag: value})
    with pytest.raises(TypeError, match=flag):
        pred.predict_batch(point_coords=[PT["point_coords"]], **{flag: value})


def test_numpy_bools_are_bools(pred):
    a = pred.predict(**PT, multimask_output=np.bool_(False))
    b = pred.predict(**PT, multimask_output=False)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_complex_string_object_arrays_are_refused(pred):
    with pytest.raises(TypeError, match="point_coords.*complex"):
        pred.predict(point_coords=np.array([[1 + 2j, 3.0]]), point_labels=np.array([1]))
    with pytest.raises(TypeError, match="box.*complex"):
        pred.predict(box=np.array([1, 2, 3, 4], dtype=np.complex128))
    with pytest.raises(TypeError, match="point_coords"):
        pred.predict(point_coords=np.array([["1", "2"]]), point_labels=np.array([1]))
    with pytest.raises(TypeError, match="point_coords"):
        pred.predict(point_coords="10,20")
    with pytest.raises(TypeError, match="point_labels"):
        pred.predict(**{**PT, "point_labels": np.array(["1"])})
    with pytest.raises(TypeError, match="box.*object"):
        pred.predict(box=np.array([1, 2, None, 4], dtype=object))
    with pytest.raises(ValueError, match="box is not a rectangular"):
        pred.predict(box=[[1, 2, 3, 4], [1, 2]])
    with pytest.raises(TypeError, match="mask_input.*complex"):
        pred.predict(mask_input=np.zeros((1, M, M), np.complex64))
    with pytest.raises(TypeError, match="point_coords.*bool"):
        pred.predict(point_coords=np.array([[True, False]]))


def test_labels_default_to_foreground_and_accept_integral_floats(pred):
    a = pred.predict(point_coords=PT["point_coords"])
    b = pred.predict(**PT)
    c = pred.predict(point_coords=PT["point_coords"], point_labels=np.array([1.0]))
    for x, y, z in zip(a, b, c, strict=True):
        assert np.array_equal(x, y) and np.array_equal(x, z)
    with pytest.raises(ValueError, match="point_labels"):
        pred.predict(point_coords=PT["point_coords"], point_labels=np.array([0.5]))


def test_zero_points_in_a_prompt_are_refused(pred):
    with pytest.raises(ValueError, match="point_coords has no points"):
        pred.predict(point_coords=np.zeros((0, 2)))
    with pytest.raises(ValueError, match="point_coords has no points"):
        pred.predict(point_coords=np.zeros((2, 0, 2)))


def test_decode_batch_lists(model):
    emb = model.embed([_image(H, W), _image(H, W, 1)])
    with pytest.raises(ValueError, match="boxes has 1 items for 2 images"):
        model.decode_batch(emb, boxes=[np.zeros(4)])
    with pytest.raises(TypeError, match="point_coords must be a list"):
        model.decode_batch(emb, point_coords="ab")
    with pytest.raises(ValueError, match="image 1: point_coords"):
        model.decode_batch(emb, point_coords=[PT["point_coords"], np.array([[np.nan, 1.0]])])


# ------------------------------------------------------------------------- thin images
@pytest.mark.parametrize("hw", [(1, 1000), (1000, 1), (1, 257)], ids=str)
def test_thin_images_keep_one_pixel_and_masks_come_back_full_size(model, hw):
    """With a 256-pixel model, int(1 * 256 / 1000 + 0.5) = 0 rows: PIL refused the resize."""
    h, w = hw
    model.set_image(_image(h, w))
    assert model.input_size == (max(1, round(h * 256 / max(hw))), max(1, round(w * 256 / max(hw))))
    assert min(model.input_size) == 1
    masks, scores, low = model.predict(point_coords=np.array([[w / 2, h / 2]]))
    assert masks.shape == (1, h, w) and np.isfinite(scores).all()
    masks, _, _ = model.predict(box=np.array([[0, 0, w, h]]), return_logits=True)
    assert masks.shape == (1, 1, h, w) and np.isfinite(masks).all()


def test_processor_thin_images_round_trip():
    proc = SamHQProcessor()  # 1024-pixel presets: a 1 x 2049 image resized to 0 x 1024 before
    image = _image(1, 2049)
    out = proc(image, input_points=[[[1000.0, 0.5]]], input_boxes=[[[0, 0, 2049, 1]]])
    assert out["reshaped_input_sizes"].tolist() == [[1, 1024]]
    assert out["pixel_values"].shape == (1, 3, 1024, 1024)
    assert torch.isfinite(out["input_points"]).all()
    low = torch.randn(1, 1, 3, 256, 256)
    masks = proc.post_process_masks(low, out["original_sizes"], out["reshaped_input_sizes"])
    assert masks[0].shape == (1, 3, 1, 2049)
    labels = proc(image, segmentation_maps=np.ones((1, 2049), np.uint8))["labels"]
    assert labels.shape == (1, 256, 256) and labels[0, 0].sum() == 256


def test_processor_coordinates_must_fit_float32():
    proc = SamHQProcessor()
    with pytest.raises(ValueError, match="input_points"):
        proc(_image(20, 30), input_points=[[[1e39, 1.0]]])
    with pytest.raises(ValueError, match="input_boxes"):
        proc(_image(20, 30), input_boxes=[[[0, 0, 1e39, 1.0]]])


# --------------------------------------------------------------- automatic mask generator
def test_amg_checks_its_arguments(model):
    with pytest.raises(TypeError, match="multimask_output"):
        AutomaticMaskGenerator(model, multimask_output="no")
    with pytest.raises(TypeError, match="points_per_batch"):
        AutomaticMaskGenerator(model, points_per_batch=2.5)
    with pytest.raises(ValueError, match="box_nms_thresh"):
        AutomaticMaskGenerator(model, box_nms_thresh=float("nan"))
    with pytest.raises(ValueError, match=r"point_grids\[0\]"):
        AutomaticMaskGenerator(model, points_per_side=None, point_grids=[np.full((4, 2), 2.0)])
    amg = AutomaticMaskGenerator(model, points_per_side=2)
    with pytest.raises(TypeError, match="unsupported image type"):
        amg.generate(12)
    with pytest.raises(TypeError, match="list of images"):
        amg.generate_batch(_image(8, 8))


def test_amg_thin_image(model):
    amg = AutomaticMaskGenerator(
        model, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0
    )
    records = amg.generate(_image(1, 1000))
    for r in records:
        assert r["segmentation"].shape == (1, 1000)


# ------------------------------------------------------------------------------------ CLI
def test_cli_refuses_a_point_beyond_float32(tmp_path, capsys):
    Image.fromarray(_image(H, W)).save(tmp_path / "im.png")
    code = main(
        ["segment", str(tmp_path / "im.png"), "--point", "3e38,5", "--checkpoint", str(PTH),
         "--device", "cpu", "--out", str(tmp_path / "m.png")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert "point_coords" in err and "float32" in err
    assert not (tmp_path / "m.png").exists()
