"""``samhq_fast.contract`` on its own (what a service calls before the model), and the
validate-then-decode split of ``Predictor``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from samhq_fast import Predictor, Prompts, validate_prompts
from samhq_fast.contract import (
    check_flag,
    check_index,
    check_positive_int,
    check_real,
    preprocess_shape,
    validate_image,
)

PTH = Path(__file__).parent / "fixtures" / "shapes_model" / "sam_hq_shapes.pth"


def test_frame_transform_and_defaults():
    p = validate_prompts(
        point_coords=[[10, 20], [30, 5]], box=[0, 0, 40, 25], original_size=(50, 40)
    )
    assert isinstance(p, Prompts) and len(p) == 1 and not p.batched
    assert p.input_size == (1024, 819)  # int(40 * 1024 / 50 + 0.5)
    sx, sy = 819 / 40, 1024 / 50
    assert p.points.dtype == np.float32 and p.points.shape == (1, 2, 2)
    assert np.array_equal(p.points[0], np.array([[10 * sx, 20 * sy], [30 * sx, 5 * sy]], "f4"))
    assert p.labels.tolist() == [[1, 1]]  # default: foreground
    assert np.array_equal(p.boxes, np.array([[0, 0, 40 * sx, 25 * sy]], np.float32))
    assert p.masks is None and p.has_sparse


def test_prompt_dimension_and_broadcast():
    p = validate_prompts(
        point_coords=np.zeros((1, 2)), box=np.array([[0, 0, 5, 5]] * 3), original_size=(10, 10),
        image_size=256, mask_input_size=(64, 64),
    )  # fmt: skip
    assert p.batched and len(p) == 3 and p.points.shape == (3, 1, 2)
    e = validate_prompts(box=np.zeros((0, 4)), original_size=(10, 10))
    assert e.is_empty and e.batched and e.boxes.shape == (0, 4)
    none = validate_prompts(original_size=(10, 10))
    assert len(none) == 1 and not none.has_sparse  # SAM's whole-image guess
    with pytest.raises(ValueError, match="prompt counts differ: points 2, boxes 3"):
        validate_prompts(
            point_coords=np.zeros((2, 1, 2)), box=np.zeros((3, 4)), original_size=(10, 10)
        )


def test_model_frame_is_not_rescaled_or_clipped():
    p = validate_prompts(
        point_coords=[[[500.0, 2000.0]]], box=[[0, 0, 2000, 10]], original_size=(10, 20),
        frame="model", prompt_dim=True,
    )  # fmt: skip
    assert p.points.tolist() == [[[500.0, 2000.0]]] and p.boxes.tolist() == [[0, 0, 2000, 10]]
    with pytest.raises(ValueError, match=r"\(B, N, 2\)"):
        validate_prompts(point_coords=[[1.0, 2.0]], original_size=(10, 20), prompt_dim=True)


def test_messages_name_the_argument_and_where():
    with pytest.raises(ValueError, match="image 2: point_labels must be 1"):
        validate_prompts([[1, 2]], [3], original_size=(9, 9), where="image 2")
    with pytest.raises(ValueError, match="point_labels were given without point_coords"):
        validate_prompts(point_labels=[1], original_size=(9, 9))
    with pytest.raises(ValueError, match="mask_input values must lie in"):
        validate_prompts(mask_input=np.full((1, 256, 256), 1e6), original_size=(9, 9))
    with pytest.raises(ValueError, match="original_size must be positive"):
        validate_prompts(original_size=(0, 9))
    with pytest.raises(ValueError, match="frame must be"):
        validate_prompts(original_size=(9, 9), frame="pixels")


def test_scalar_checks():
    assert check_flag(np.True_, "f") is True
    for bad in (1, "yes", None, torch.tensor(True)):
        with pytest.raises(TypeError, match="f must be True or False"):
            check_flag(bad, "f")
    assert check_index(-1, 3, "i") == 2 and check_index(np.int32(1), 3, "i") == 1
    with pytest.raises(TypeError):
        check_index(1.0, 3, "i")
    with pytest.raises(ValueError, match="i 3 out of range for 3 items"):
        check_index(3, 3, "i")
    with pytest.raises(ValueError, match="n must be >= 1"):
        check_positive_int(0, "n")
    assert check_real(np.float32(0.5), "t", 0, 1) == 0.5
    with pytest.raises(ValueError, match="t must be a finite number"):
        check_real(float("inf"), "t")
    with pytest.raises(TypeError):
        check_real(True, "t")


def test_preprocess_shape_keeps_one_pixel():
    assert preprocess_shape(1, 2049, 1024) == (1, 1024)  # int(0.4998 + 0.5) = 0 before
    assert preprocess_shape(2049, 1, 1024) == (1024, 1)
    assert preprocess_shape(600, 800, 1024) == (768, 1024)


def test_validate_image():
    rgb = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    assert np.array_equal(validate_image(rgb, "BGR"), rgb[..., ::-1])
    with pytest.raises(ValueError, match="image_format"):
        validate_image(rgb, "rgb")
    with pytest.raises(TypeError, match="unsupported image type"):
        validate_image([1, 2, 3])
    with pytest.raises(FileNotFoundError):
        validate_image("/nonexistent/image.png")


@pytest.fixture(scope="module")
def pred() -> Predictor:
    return Predictor(PTH, device="cpu", backend="reference")


def test_validate_then_decode_equals_decode(pred):
    img = np.random.default_rng(1).integers(0, 256, (30, 45, 3), dtype=np.uint8)
    emb = pred.embed(img)
    kw = dict(point_coords=np.array([[[5.0, 6.0]], [[20.0, 10.0]]]), box=np.array([1, 1, 30, 20]))
    prompts = pred.validate_prompts((30, 45), **kw)
    a = pred.decode_prompts(emb, prompts, multimask_output=False)
    b = pred.decode(emb, **kw, multimask_output=False)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)
    assert a[0].shape == (2, 1, 30, 45)
    with pytest.raises(ValueError, match="validated for a"):
        pred.decode_prompts(emb, pred.validate_prompts((31, 45), **kw))
    with pytest.raises(ValueError, match="validated for a"):
        pred.decode_prompts(emb, validate_prompts(**kw, original_size=(30, 45)))  # 1024 model
    with pytest.raises(TypeError, match="prompts must be a Prompts"):
        pred.decode_prompts(emb, kw)


def test_embedding_index_and_embed_arguments(pred):
    emb = pred.embed(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(TypeError, match="image index must be an integer"):
        emb[0.0]
    with pytest.raises(IndexError):
        emb[1]
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        pred.embed(np.zeros((8, 8, 3), np.uint8), batch_size=0)
    with pytest.raises(TypeError, match="compile"):
        Predictor(pred.model, compile=None)
