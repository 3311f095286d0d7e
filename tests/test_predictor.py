"""``Predictor`` vs the official ``SamPredictor`` on the same weights, the stateless core (threads,
batches) and the input contract."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from samhq_fast.predictor import ImageEmbedding, ImageNotSetError, Predictor

from _official import import_official
from _weights import build_official, perturb_, save_official_pth, small_config

SIZES = [(300, 200), (200, 300), (7, 5), (256, 256)]  # portrait, landscape, tiny, no resize
SCORE_ATOL = 1e-5
LOGIT_RTOL = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    sah = import_official()
    official = perturb_(build_official(small_config()), seed=0)
    path = tmp_path_factory.mktemp("ckpt") / "small.pth"
    save_official_pth(official, path)
    return sah.SamPredictor(official), Predictor(model=path, device="cpu", backend="reference")


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # smooth-ish content so the masks are not noise
    y, x = np.mgrid[0:h, 0:w]
    base = ((np.sin(x / 9.0) + np.cos(y / 7.0)) * 60 + 128)[..., None]
    noise = rng.integers(-30, 30, (h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _prompt_cases(h: int, w: int) -> dict[str, dict]:
    pt = np.array([[w * 0.3, h * 0.6]])
    box = np.array([1.0, 1.0, w * 0.7, h * 0.8])
    return {
        "point": dict(point_coords=pt, point_labels=np.array([1])),
        "fg_bg_points": dict(
            point_coords=np.array([[w * 0.3, h * 0.6], [w * 0.8, h * 0.2]]),
            point_labels=np.array([1, 0]),
        ),
        "box": dict(box=box),
        "box_and_point": dict(box=box, point_coords=pt, point_labels=np.array([0])),
        "no_prompt": dict(),
    }


def _assert_same(ours, ref, what: str) -> tuple[float, float]:
    m_ours, s_ours, l_ours = ours
    m_ref, s_ref, l_ref = (np.asarray(x) for x in ref)
    assert m_ours.shape == m_ref.shape and m_ours.dtype == m_ref.dtype, what
    assert np.array_equal(m_ours, m_ref), f"{what}: {(m_ours != m_ref).sum()} mask pixels differ"
    ds = float(np.abs(s_ours - s_ref).max())
    dl = float(np.abs(l_ours - l_ref).max())
    assert ds <= SCORE_ATOL, f"{what}: scores differ by {ds}"
    assert dl <= LOGIT_RTOL * np.abs(l_ref).max(), f"{what}: low-res logits differ by {dl}"
    return ds, dl


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_predict_matches_official(models, size):
    official, ours = models
    h, w = size
    img = _image(h, w)
    official.set_image(img)
    ours.set_image(img)
    assert ours.original_size == official.original_size
    assert ours.input_size == official.input_size
    assert torch.equal(ours.get_image_embedding(), official.get_image_embedding())
    worst = [0.0, 0.0]
    for name, kw in _prompt_cases(h, w).items():
        for multimask in (True, False):
            for hq_only in (False, True):
                a = ours.predict(**kw, multimask_output=multimask, hq_token_only=hq_only)
                b = official.predict(**kw, multimask_output=multimask, hq_token_only=hq_only)
                assert a[0].shape == (1, h, w)
                ds, dl = _assert_same(a, b, f"{size} {name} mm={multimask} hq={hq_only}")
                worst = [max(worst[0], ds), max(worst[1], dl)]
    print(f"[parity] predictor {size}: max score diff {worst[0]:.3g}, logit diff {worst[1]:.3g}")


def test_return_logits_and_mask_input_match_official(models):
    official, ours = models
    img = _image(120, 90, seed=3)
    official.set_image(img)
    ours.set_image(img)
    kw = dict(point_coords=np.array([[40.0, 70.0]]), point_labels=np.array([1]))
    a = ours.predict(**kw, return_logits=True)
    b = official.predict(**kw, return_logits=True)
    assert a[0].dtype == np.float32
    assert np.abs(a[0] - b[0]).max() <= LOGIT_RTOL * np.abs(b[0]).max()
    # feed the low-res logits back as a mask prompt
    a2 = ours.predict(**kw, mask_input=a[2], multimask_output=False)
    b2 = official.predict(**kw, mask_input=b[2], multimask_output=False)
    _assert_same(a2, b2, "mask_input round trip")


def test_batched_boxes_match_official_predict_torch(models):
    official, ours = models
    h, w = 300, 200
    img = _image(h, w, seed=1)
    official.set_image(img)
    ours.set_image(img)
    boxes = np.array([[10, 20, 150, 250], [0, 0, 199, 299], [50, 60, 80, 90]], dtype=np.float64)
    for multimask in (True, False):
        masks, scores, low = ours.predict(box=boxes, multimask_output=multimask)
        assert masks.shape == (3, 1, h, w) and scores.shape == (3, 1) and low.shape[:2] == (3, 1)
        bt = torch.as_tensor(official.transform.apply_boxes(boxes, (h, w)), dtype=torch.float)
        ref = official.predict_torch(None, None, bt, multimask_output=multimask)
        _assert_same((masks, scores, low), [x.numpy() for x in ref], f"boxes mm={multimask}")
        # our predict_torch takes the same frame-space tensors
        ours_t = ours.predict_torch(None, None, bt, multimask_output=multimask)
        for x, y in zip(ours_t, ref, strict=True):
            assert torch.equal(x, y)


def test_return_all_masks_is_three_sorted(models):
    _, ours = models
    ours.set_image(_image(64, 80))
    pt = dict(point_coords=np.array([[30.0, 30.0]]), point_labels=np.array([1]))
    masks, scores, low = ours.predict(**pt, return_all_masks=True)
    assert masks.shape == (3, 64, 80) and scores.shape == (3,) and low.shape == (3, 64, 64)
    assert np.all(np.diff(scores) <= 0)
    one = ours.predict(**pt)  # official rule: the best of the three
    assert np.array_equal(one[0][0], masks[0]) and one[1][0] == scores[0]


def test_threads_match_sequential(models):
    _, ours = models
    images = [_image(90, 70, seed=s) for s in range(4)]
    embeddings = [ours.embed(im) for im in images]
    requests = [
        dict(point_coords=np.array([[20.0 + 5 * j, 30.0]]), point_labels=np.array([1]))
        for j in range(3)
    ]
    expected = {
        (i, j): ours.decode(embeddings[i], **r) for i in range(4) for j, r in enumerate(requests)
    }
    got, errors = {}, []

    def worker(i: int) -> None:
        try:
            for j, r in enumerate(requests):
                got[(i, j)] = ours.decode(embeddings[i], **r)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for key, exp in expected.items():
        for a, b in zip(got[key], exp, strict=True):
            assert np.array_equal(a, b), key


def test_predict_batch_equals_per_image(models):
    _, ours = models
    images = [_image(300, 200, 0), _image(100, 150, 1), _image(40, 40, 2)]
    points = [
        np.array([[[50.0, 60.0]], [[100.0, 200.0]]]),  # 2 prompts of 1 point
        np.array([[70.0, 20.0]]),  # 1 prompt
        None,
    ]
    boxes = [None, None, np.array([[5.0, 5.0, 30.0, 30.0], [0, 0, 40, 40], [10, 2, 12, 39]])]
    ours.set_image_batch(images)
    assert len(ours.embedding) == 3
    for multimask in (True, False):
        results = ours.predict_batch(point_coords=points, boxes=boxes, multimask_output=multimask)
        assert len(results) == 3
        for i, img in enumerate(images):
            emb = ours.embed(img)
            single = ours.decode(
                emb, point_coords=points[i], box=boxes[i], multimask_output=multimask
            )
            if points[i] is not None and points[i].ndim == 2:
                single = tuple(x[None] for x in single)
            for a, b in zip(results[i], single, strict=True):
                assert a.shape == b.shape
            assert np.array_equal(results[i][0], single[0])
            assert np.abs(results[i][1] - single[1]).max() <= SCORE_ATOL
            assert np.abs(results[i][2] - single[2]).max() <= LOGIT_RTOL * np.abs(single[2]).max()
    # an image without prompts gets empty outputs
    empty = ours.predict_batch(point_coords=[points[0], None, None])
    assert empty[1][0].shape == (0, 1, 100, 150) and empty[2][1].shape == (0, 1)


def test_embedding_is_frozen_and_indexable(models):
    _, ours = models
    emb = ours.embed([_image(20, 30), _image(30, 20)])
    assert isinstance(emb, ImageEmbedding) and len(emb) == 2
    assert emb.hq_features.shape[:2] == (2, 32)
    assert emb[1].original_sizes == ((30, 20),)
    with pytest.raises(AttributeError):
        emb.original_sizes = ()  # type: ignore[misc]


# ------------------------------------------------------------------------- input contract
def test_predict_before_set_image(models):
    _, ours = models
    ours.reset_image()
    assert not ours.is_image_set
    with pytest.raises(ValueError, match="call set_image first"):
        ours.predict(point_coords=np.array([[1.0, 1.0]]), point_labels=np.array([1]))
    with pytest.raises(ImageNotSetError):
        ours.get_image_embedding()


@pytest.fixture
def ready(models):
    _, ours = models
    ours.set_image(_image(50, 40))
    return ours


def test_empty_image(models):
    with pytest.raises(ValueError, match="empty"):
        models[1].set_image(np.zeros((0, 10, 3), np.uint8))


def test_nan_coordinates(ready):
    with pytest.raises(ValueError, match="NaN"):
        ready.predict(point_coords=np.array([[np.nan, 1.0]]), point_labels=np.array([1]))
    with pytest.raises(ValueError, match="NaN"):
        ready.predict(box=np.array([0, 0, np.inf, 5]))


def test_bad_labels(ready):
    with pytest.raises(ValueError, match="point_labels"):
        ready.predict(point_coords=np.array([[1.0, 1.0]]), point_labels=np.array([2]))
    with pytest.raises(ValueError, match="point_labels"):
        ready.predict(point_coords=np.array([[1.0, 1.0]]), point_labels=np.array([-10]))


def test_inverted_box(ready):
    with pytest.raises(ValueError, match="x1 <= x2"):
        ready.predict(box=np.array([30, 5, 10, 20]))
    with pytest.raises(ValueError, match="y1 <= y2"):
        ready.predict(box=np.array([5, 30, 10, 20]))


def test_wrong_mask_input_shape(ready):
    with pytest.raises(ValueError, match="mask_input"):
        ready.predict(mask_input=np.zeros((1, 32, 32), np.float32))


def test_points_labels_length_mismatch(ready):
    with pytest.raises(ValueError, match="different lengths"):
        ready.predict(point_coords=np.array([[1.0, 1.0], [2, 2]]), point_labels=np.array([1]))


def test_box_beyond_image_is_clipped_with_warning(ready):
    with pytest.warns(UserWarning, match="clipped"):
        a = ready.predict(box=np.array([-5, -5, 100, 100]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = ready.predict(box=np.array([0, 0, 40, 50]))
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)


def test_no_prompt_runs(ready):
    masks, scores, low = ready.predict()
    assert masks.shape == (1, 50, 40) and scores.shape == (1,) and low.shape == (1, 64, 64)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "path"])
def test_set_image_accepts_modes(models, mode, tmp_path):
    _, ours = models
    rgb = Image.fromarray(_image(30, 20))
    if mode == "path":
        rgb.save(tmp_path / "im.png")
        image = str(tmp_path / "im.png")
    elif mode == "I;16":
        image = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
    else:
        image = rgb.convert(mode)
    ours.set_image(image)
    assert ours.original_size == (30, 20)
    assert ours.predict(point_coords=np.array([[5.0, 5.0]]))[0].shape == (1, 30, 20)


def test_bgr_equals_flipped_rgb(models):
    _, ours = models
    img = _image(40, 30)
    a = ours.embed(img)
    b = ours.embed(np.ascontiguousarray(img[..., ::-1]), image_format="BGR")
    assert torch.equal(a.image_embeddings, b.image_embeddings)


def test_model_instance_is_used_as_is(models):
    _, ours = models
    again = Predictor(ours.model)
    assert again.model is ours.model and again.device == torch.device("cpu")
    img = _image(33, 44)
    pt = dict(point_coords=np.array([[10.0, 12.0]]), point_labels=np.array([1]))
    a = again.decode(again.embed(img), **pt)
    b = ours.decode(ours.embed(img), **pt)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)


def test_trained_model_matches_official_on_real_shapes():
    """The same comparison where mask shape matters: the small trained model (random weights
    give near-identical full-image masks, which would make equality trivial)."""
    from pathlib import Path

    from fixtures.shapes import interior_point, make_scene, mask_box

    sah = import_official()
    pth = Path(__file__).parent / "fixtures" / "shapes_model" / "sam_hq_shapes.pth"
    ours = Predictor(model=pth, device="cpu", backend="reference")
    official_sam = build_official(ours.model.config)
    sd = torch.load(pth, weights_only=True)
    official_sam.load_state_dict({k: v.float() for k, v in sd.items()})
    official = sah.SamPredictor(official_sam)
    rng = np.random.default_rng(99)
    image, truth = make_scene(rng, size=300, n_shapes=3)
    image = np.ascontiguousarray(image[:, :270])  # not square
    truth = truth[:, :, :270]
    official.set_image(image)
    ours.set_image(image)
    masks = []
    for i, t in enumerate(truth):
        pt = interior_point(t, rng)[None].astype(np.float64)
        for kw in (
            dict(point_coords=pt, point_labels=np.array([1])),
            dict(box=mask_box(t).astype(np.float64)),
        ):
            for mm in (False, True):
                got = ours.predict(**kw, multimask_output=mm)
                ref = official.predict(**kw, multimask_output=mm)
                _assert_same(got, ref, f"trained shape {i} {sorted(kw)} mm={mm}")
        masks.append(got[0][0])
        frac = got[0][0].mean()
        assert 0.01 < frac < 0.6, f"shape {i}: mask covers {frac:.2f} of the image (degenerate)"
    assert not np.array_equal(masks[0], masks[1]), "different shapes gave the same mask"
