"""SamHQProcessor and the image helpers, against transformers 4.53.3's SamHQProcessor.

Measured parity for RGB uint8 images: pixel_values max abs diff 0.0 (bit-identical), sizes,
labels and binarized masks identical, points / boxes equal to HF's float64 values rounded to
float32, non-binarized post-processed masks max abs diff 0.0 (bound asserted: 1e-5).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from samhq_fast.image import load_image, to_rgb_uint8
from samhq_fast.processing import BatchFeature, SamHQProcessor

# HF's SamHQProcessor passes point_pad_value on to the image processor, which warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:The following named arguments:UserWarning")

SIZES = [(480, 640), (640, 480), (3, 5), (1024, 1024), (1, 1), (1500, 700), (333, 1999)]


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    from transformers import SamHQProcessor as HFSamHQProcessor
    from transformers import SamImageProcessor

    transformers.logging.set_verbosity_error()
    return HFSamHQProcessor(image_processor=SamImageProcessor())


@pytest.fixture(scope="module")
def proc() -> SamHQProcessor:
    return SamHQProcessor()


def _rand_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + 7 * h + w).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _hf_call(hf, images, **kw):
    """HF with numpy HWC input (told the layout: it would misread e.g. a 3x5x3 image as CHW)."""
    return hf(images, input_data_format="channels_last", return_tensors="pt", **kw)


def _assert_same(ours: BatchFeature, ref) -> None:
    assert set(ours) == set(ref)
    for key in ref:
        a, b = ours[key], ref[key]
        if key in ("input_points", "input_boxes"):
            assert a.dtype == torch.float32
            b = b.float()  # HF returns float64; ours is its value rounded to float32
        assert a.dtype == b.dtype, key
        assert a.shape == b.shape, key
        assert torch.equal(a, b), f"{key}: max diff {(a.double() - b.double()).abs().max()}"


# ---------------------------------------------------------------------------------------------
# Parity with transformers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_pixels_sizes_points_boxes_match_hf(hf, proc, hw):
    h, w = hw
    img = _rand_image(h, w)
    prompts = dict(
        input_points=[[[0, 0], [w - 1, h - 1]]],
        input_labels=[[1, 0]],
        input_boxes=[[[0.3, 0.7, w - 0.5, h]]],
    )
    ref = _hf_call(hf, img, **prompts)
    ours = proc(img, **prompts)
    assert (ours["pixel_values"] - ref["pixel_values"]).abs().max().item() == 0.0
    _assert_same(ours, ref)
    assert ours["pixel_values"].shape == (1, 3, 1024, 1024)
    assert ours["input_points"].shape == (1, 1, 2, 2)


def test_pil_and_tensor_inputs_match_hf(hf, proc):
    img = _rand_image(300, 451)
    ref = _hf_call(hf, img)
    _assert_same(proc(Image.fromarray(img)), ref)
    _assert_same(proc(torch.from_numpy(img).permute(2, 0, 1)), ref)
    _assert_same(proc([img]), ref)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "1", "CMYK"])
def test_pil_modes_match_hf(hf, proc, mode):
    img = Image.fromarray(_rand_image(37, 53))
    if mode == "RGBA":
        im = img.copy()
        im.putalpha(Image.fromarray(_rand_image(37, 53, seed=3)[:, :, 0]))
    else:
        im = img.convert(mode)
    ref = hf(im, return_tensors="pt")
    _assert_same(proc(im), ref)


def test_batch_of_two_sizes_match_hf(hf, proc):
    imgs = [_rand_image(480, 640), _rand_image(700, 300, seed=1)]
    prompts = dict(
        input_points=[
            [[[10, 20], [30, 40]], [[5, 5], [6, 6]]],
            [[[1, 2], [3, 4]], [[7, 8], [9, 9]]],
        ],
        input_labels=[[[1, 0], [1, 1]], [[0, 1], [-1, 1]]],
        input_boxes=[[[1, 2, 300, 400], [5, 6, 7, 8]], [[0, 0, 299, 699], [10, 10, 20, 20]]],
    )
    ref = _hf_call(hf, imgs, **prompts)
    ours = proc(imgs, **prompts)
    _assert_same(ours, ref)
    assert ours["input_points"].shape == (2, 2, 2, 2)
    assert ours["input_boxes"].shape == (2, 2, 4)


def test_tensor_prompts_match_hf(hf, proc):
    img = _rand_image(200, 100)
    pts = torch.tensor([[[[10.5, 20.25]], [[99.0, 199.0]]]])
    labels = torch.tensor([[[1], [0]]])
    boxes = torch.tensor([[[1.0, 2.0, 50.0, 60.0], [0.0, 0.0, 100.0, 200.0]]])
    kw = dict(input_points=pts, input_labels=labels, input_boxes=boxes)
    _assert_same(proc(img, **kw), _hf_call(hf, img, **kw))
    kw = dict(input_points=pts.numpy(), input_labels=labels.numpy(), input_boxes=boxes.numpy())
    _assert_same(
        proc(img, **kw), _hf_call(hf, img, **{k: torch.from_numpy(v) for k, v in kw.items()})
    )


def test_points_without_labels_match_hf(hf, proc):
    img = _rand_image(64, 48)
    ref = _hf_call(hf, img, input_points=[[[3, 4], [5, 6]]])
    ours = proc(img, input_points=[[[3, 4], [5, 6]]])
    _assert_same(ours, ref)
    assert "input_labels" not in ours


def test_ragged_points_padded_like_hf(hf, proc):
    """HF pads (3-deep, one missing point) after rescaling with coords (-10, -10), label -10."""
    imgs = [_rand_image(30, 50), _rand_image(60, 40, seed=1)]
    kw = dict(input_points=[[[10, 20]], [[1, 2], [3, 4]]], input_labels=[[1], [1, 0]])
    ref = _hf_call(hf, imgs, point_pad_value=-10, **kw)
    ours = proc(imgs, **kw)
    _assert_same(ours, ref)
    assert ours["input_points"][0, 0, 1].tolist() == [-10.0, -10.0]
    assert ours["input_labels"][0, 0].tolist() == [1, -10]


def test_ragged_points_padded_where_hf_fails(proc):
    # HF 4.53.3 raises for these; we pad every prompt to the longest one.
    img = _rand_image(100, 200)
    out = proc(
        [img, img],
        input_points=[[[[10, 20]], [[1, 2], [3, 4], [5, 6]]], [[[7, 8]], [[9, 9]]]],
        input_labels=[[[1], [1, 0, 1]], [[0], [1]]],
    )
    pts, lab = out["input_points"], out["input_labels"]
    assert pts.shape == (2, 2, 3, 2) and lab.shape == (2, 2, 3)
    scale_x, scale_y = 1024 / 200, 512 / 100
    expect = torch.tensor(
        [[1 * scale_x, 2 * scale_y], [3 * scale_x, 4 * scale_y], [5 * scale_x, 6 * scale_y]]
    )
    assert torch.equal(pts[0, 1], expect)
    assert pts[0, 0, 1:].tolist() == [[-10.0, -10.0]] * 2
    assert lab.tolist() == [[[1, -10, -10], [1, 0, 1]], [[0, -10, -10], [1, -10, -10]]]
    # Without labels, ragged points get 1 for real points and -10 for padding.
    out = proc([img, img], input_points=[[[1, 1]], [[2, 2], [3, 3]]])
    assert out["input_labels"].tolist() == [[[1, -10]], [[1, 1]]]


def test_segmentation_maps_match_hf(hf, proc):
    imgs = [_rand_image(480, 640), _rand_image(700, 300, seed=1)]
    rng = np.random.default_rng(5)
    maps = [rng.integers(0, 2, (480, 640), dtype=np.uint8), rng.integers(0, 2, (700, 300))]
    ref = _hf_call(hf, imgs, segmentation_maps=maps)
    ours = proc(imgs, segmentation_maps=maps)
    _assert_same(ours, ref)
    assert ours["labels"].shape == (2, 256, 256) and ours["labels"].dtype == torch.int64
    # PIL mode "1" (as in the HF docs example) and a single bool map.
    pil_map = Image.fromarray(maps[0].astype(bool))
    assert pil_map.mode == "1"
    ref = hf(imgs[0], segmentation_maps=pil_map, return_tensors="pt")
    assert ref["labels"].max() == 1
    _assert_same(proc(imgs[0], segmentation_maps=pil_map), ref)
    _assert_same(proc(imgs[0], segmentation_maps=torch.from_numpy(maps[0]).bool()), ref)


def test_post_process_masks_match_hf(hf, proc):
    imgs = [_rand_image(480, 640), _rand_image(37, 1000, seed=1)]
    enc = proc(imgs)
    logits = torch.randn(2, 3, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 4
    args = (enc["original_sizes"], enc["reshaped_input_sizes"])
    ref_bin = hf.image_processor.post_process_masks(list(logits.clone()), *args)
    ref_raw = hf.image_processor.post_process_masks(list(logits.clone()), *args, binarize=False)
    for masks in (logits, list(logits), [m.numpy() for m in logits]):
        ours_bin = proc.image_processor.post_process_masks(masks, *args)
        ours_raw = proc.post_process_masks(masks, *args, binarize=False)
        for i in range(2):
            assert ours_bin[i].dtype == torch.bool
            assert ours_bin[i].shape == (3, 3, *imgs[i].shape[:2])
            assert torch.equal(ours_bin[i], ref_bin[i])
            assert (ours_raw[i] - ref_raw[i]).abs().max().item() <= 1e-5
    # Sizes as python lists, and a threshold.
    o = proc.post_process_masks(logits, [[480, 640], [37, 1000]], [[768, 1024], [38, 1024]], 1.0)
    r = hf.image_processor.post_process_masks(list(logits.clone()), *args, mask_threshold=1.0)
    assert all(torch.equal(a, b) for a, b in zip(o, r, strict=True))


def test_doc_example_flow(proc):
    """The HF docs example: ``processor(...).to(device)``, then ``post_process_masks``."""
    raw = Image.fromarray(_rand_image(900, 1200))
    inputs = proc(raw, input_points=[[[450, 600]]], return_tensors="pt").to("cpu")
    low_res = torch.randn(1, 1, 3, 256, 256)
    masks = proc.image_processor.post_process_masks(
        low_res, inputs["original_sizes"], inputs["reshaped_input_sizes"]
    )
    assert masks[0].shape == (1, 3, 900, 1200)
    assert inputs.input_points.shape == (1, 1, 1, 2)


# ---------------------------------------------------------------------------------------------
# BatchFeature.to, return types, from_pretrained
# ---------------------------------------------------------------------------------------------


def test_batch_feature_to(proc):
    out = proc(
        _rand_image(20, 30),
        input_points=[[[1, 2]]],
        input_labels=[[1]],
        input_boxes=[[[1, 2, 3, 4]]],
    )
    assert isinstance(out, dict) and out.pixel_values is out["pixel_values"]
    with pytest.raises(AttributeError):
        _ = out.not_a_key
    assert out.to(torch.float16) is out
    assert out.pixel_values.dtype == torch.float16
    assert out.input_points.dtype == torch.float16 and out.input_boxes.dtype == torch.float16
    assert out.original_sizes.dtype == torch.int64 and out.input_labels.dtype == torch.int64
    out.to(dtype=torch.float32)
    assert out.pixel_values.dtype == torch.float32 and out.input_labels.dtype == torch.int64
    out.to(torch.device("cpu"), torch.bfloat16)
    assert out.pixel_values.dtype == torch.bfloat16 and out.pixel_values.device.type == "cpu"
    assert out.input_labels.device.type == "cpu" and out.input_labels.dtype == torch.int64
    with pytest.raises(ValueError, match="device or dtype"):
        out.to(3.5)
    out = proc(_rand_image(5, 6), input_points=[[[1, 2]]], input_labels=[[1]])
    out.to("meta")
    assert all(v.device.type == "meta" for v in out.values())
    assert out.original_sizes.dtype == torch.int64


def test_return_tensors_np(proc):
    out = proc(_rand_image(20, 30), input_points=[[[1, 2]]], return_tensors="np")
    assert isinstance(out["pixel_values"], np.ndarray) and out["pixel_values"].dtype == np.float32
    assert out["original_sizes"].tolist() == [[20, 30]]
    assert out["reshaped_input_sizes"].tolist() == [[683, 1024]]


def test_from_pretrained_local_dir(tmp_path):
    cfg = {
        "size": {"longest_edge": 512},
        "pad_size": {"height": 512, "width": 512},
        "mask_size": {"longest_edge": 128},
        "mask_pad_size": {"height": 128, "width": 128},
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.25, 0.25, 0.25],
        "rescale_factor": 0.00392156862745098,
        "resample": 2,
        "do_resize": True,
        "image_processor_type": "SamImageProcessor",
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    p = SamHQProcessor.from_pretrained(tmp_path)
    assert (p.image_size, p.mask_size, p.pad_size) == (512, 128, {"height": 512, "width": 512})
    assert p.image_mean == (0.5, 0.5, 0.5) and p.image_std == (0.25, 0.25, 0.25)
    out = p(_rand_image(100, 50), segmentation_maps=np.ones((100, 50), np.uint8))
    assert out["pixel_values"].shape == (1, 3, 512, 512) and out["labels"].shape == (1, 128, 128)
    assert out["pixel_values"][0, 0, 0, 300].item() == 0.0  # padding
    assert SamHQProcessor.from_pretrained(tmp_path, image_size=256).image_size == 256
    empty = tmp_path / "empty"
    empty.mkdir()
    assert SamHQProcessor.from_pretrained(empty).image_size == 1024
    (tmp_path / "bad.json").write_text(json.dumps({"do_pad": False}))
    with pytest.raises(ValueError, match="do_pad"):
        SamHQProcessor.from_pretrained(tmp_path / "bad.json")


def test_from_pretrained_hub_id_offline_defaults(monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def fail(repo_id, filename, **kw):
        calls.append((repo_id, filename, kw.get("local_files_only")))
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    monkeypatch.setattr("samhq_fast.processing._hub_reachable", lambda: True)
    p = SamHQProcessor.from_pretrained("syscv-community/sam-hq-vit-base")
    assert (p.image_size, p.mask_size, p.image_mean) == (1024, 256, (0.485, 0.456, 0.406))
    assert calls == [
        ("syscv-community/sam-hq-vit-base", "preprocessor_config.json", True),
        ("syscv-community/sam-hq-vit-base", "preprocessor_config.json", False),
    ]
    # Unreachable hub: only the cache is tried.
    calls.clear()
    monkeypatch.setattr("samhq_fast.processing._hub_reachable", lambda: False)
    SamHQProcessor.from_pretrained("syscv-community/sam-hq-vit-large")
    assert [c[2] for c in calls] == [True]
    # A cached file is used.
    path = tmp_path / "preprocessor_config.json"
    path.write_text(
        json.dumps({"size": {"longest_edge": 768}, "pad_size": {"height": 768, "width": 768}})
    )
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: str(path))
    assert SamHQProcessor.from_pretrained("some/repo").image_size == 768


def test_hf_offline_construction_equivalent(hf, proc):
    ip = hf.image_processor
    assert proc.size == ip.size and proc.pad_size == ip.pad_size
    assert proc.mask_pad_size == ip.mask_pad_size and proc.mask_size == ip.mask_size["longest_edge"]
    assert list(proc.image_mean) == list(ip.image_mean) and list(proc.image_std) == list(
        ip.image_std
    )


# ---------------------------------------------------------------------------------------------
# Validation errors
# ---------------------------------------------------------------------------------------------

IMG = np.zeros((40, 60, 3), np.uint8)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(images=None, input_points=[[[1, 2]]]), "input_points given without images"),
        (dict(images=None), "images is required"),
        (dict(images=IMG, input_labels=[[1]]), "input_labels given without input_points"),
        (dict(input_points=[[[1, 2], [3, 4]]], input_labels=[[1]]), "count does not match"),
        (
            dict(input_points=[[[[1, 2]], [[3, 4]]]], input_labels=[[[1]]]),
            "does not match input_points",
        ),
        (dict(input_points=[[[1, 2, 3]]]), "2 coordinates"),
        (dict(input_points=[[1, 2]]), "nested too shallowly"),
        (dict(input_points=[[]]), "empty"),
        (dict(input_boxes=[[[1, 2, 3]]]), "4 coordinates"),
        (dict(input_boxes=[[1, 2, 3, 4]]), "nested too shallowly"),
        (dict(input_points=[[[float("nan"), 2]]]), "NaN or infinite"),
        (dict(input_points=[[[1, float("inf")]]]), "NaN or infinite"),
        (dict(input_boxes=[[[0, 0, float("nan"), 4]]]), "NaN or infinite"),
        (dict(input_points=[[[1, 2]]], input_labels=[[2]]), "label 2"),
        (dict(input_points=[[[1, 2]]], input_labels=[[0.5]]), "integers"),
        (
            dict(input_points=[[[1, 2]], [[3, 4]]]),
            "input_points has 2 entries but there are 1 images",
        ),
        (
            dict(input_boxes=[[[1, 2, 3, 4]], [[1, 2, 3, 4]]]),
            "input_boxes has 2 entries but there are 1",
        ),
        (dict(input_points=[[[1, 2]]], input_labels=[[1], [1]]), "input_labels has 2 entries"),
        (
            dict(input_points=[[[[1, 2]], [[3, 4]]]], input_boxes=[[[1, 2, 3, 4]]]),
            "one box per point",
        ),
        (dict(point_pad_value=0, input_points=[[[1, 2]]]), "point_pad_value"),
        (dict(return_tensors="tf"), "return_tensors"),
        (dict(segmentation_maps=np.zeros((41, 60), np.uint8)), "same size as their images"),
        (dict(segmentation_maps=np.full((40, 60), 0.5)), "whole numbers"),
        (dict(segmentation_maps=[np.zeros((40, 60))] * 2), "2 maps but there are 1 images"),
    ],
)
def test_validation_errors(proc, kwargs, match):
    kwargs = {"images": IMG, **kwargs}
    with pytest.raises(ValueError, match=match):
        proc(**kwargs)


def test_validation_errors_batches(proc):
    imgs = [IMG, IMG]
    with pytest.raises(ValueError, match="same number of point prompts"):
        proc(imgs, input_points=[[[[1, 2]]], [[[1, 2]], [[3, 4]]]])
    with pytest.raises(ValueError, match="same number of boxes"):
        proc(imgs, input_boxes=[[[1, 2, 3, 4]], [[1, 2, 3, 4], [1, 2, 3, 4]]])
    with pytest.raises(ValueError, match="mixes nesting depths"):
        proc(imgs, input_points=[[[1, 2]], [[[1, 2]]]])
    with pytest.raises(ValueError, match="empty list"):
        proc([])


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((0, 5, 3), np.uint8),
        np.zeros((4, 0), np.uint8),
        Image.new("RGB", (0, 3)),
        torch.zeros(3, 0, 4),
    ],  # fmt: skip
    ids=["np-0xW", "np-Hx0", "pil", "torch"],
)
def test_empty_image_rejected(proc, image):
    with pytest.raises(ValueError, match="empty"):
        proc(image)


def test_post_process_validation(proc):
    with pytest.raises(ValueError, match="must match"):
        proc.post_process_masks(torch.zeros(2, 1, 1, 8, 8), [[4, 4]], [[1024, 1024]])
    with pytest.raises(ValueError, match="tensor or numpy"):
        proc.post_process_masks([[0.0]], [[4, 4]], [[1024, 1024]])


# ---------------------------------------------------------------------------------------------
# Image conversion rules (samhq_fast.image)
# ---------------------------------------------------------------------------------------------


def test_grayscale_replicated():
    g = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for x in (g, g[:, :, None], torch.from_numpy(g), torch.from_numpy(g)[None], Image.fromarray(g)):
        out = to_rgb_uint8(x)
        assert out.shape == (3, 4, 3) and out.dtype == np.uint8
        assert (out == g[:, :, None]).all()


def test_alpha_dropped_not_composited():
    rgba = np.random.default_rng(0).integers(0, 256, (5, 6, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent: compositing on white would give 255s
    assert (to_rgb_uint8(rgba) == rgba[..., :3]).all()
    assert (to_rgb_uint8(Image.fromarray(rgba)) == rgba[..., :3]).all()
    la = np.stack([rgba[..., 0], rgba[..., 3]], axis=-1)
    assert (to_rgb_uint8(la) == rgba[..., :1]).all()


def test_palette_to_rgb():
    rgb = _rand_image(9, 11)
    pal = Image.fromarray(rgb).quantize(16)
    assert pal.mode == "P"
    assert (to_rgb_uint8(pal) == np.asarray(pal.convert("RGB"))).all()


def test_sixteen_bit_shifted():
    a = np.array([[0, 255, 256, 1000, 65535]], dtype=np.uint16)
    expect = (a >> 8).astype(np.uint8)
    assert (to_rgb_uint8(a)[..., 0] == expect).all()
    im = Image.fromarray(a)
    assert im.mode == "I;16"
    assert (to_rgb_uint8(im) == expect[:, :, None]).all()
    assert (to_rgb_uint8(Image.fromarray(a.astype(np.int32))) == expect[:, :, None]).all()


def test_float_rules():
    f = np.array([[0.0, 0.5, 1.0, 0.002]], dtype=np.float32)
    assert to_rgb_uint8(f)[0, :, 0].tolist() == [0, 128, 255, 1]  # round(x * 255)
    t = torch.tensor(f)[None].expand(3, -1, -1)  # CHW float tensor (ToTensor style)
    assert to_rgb_uint8(t)[0, :, 1].tolist() == [0, 128, 255, 1]
    assert to_rgb_uint8(np.array([[0.0, 7.0, 255.0]]))[0, :, 0].tolist() == [0, 7, 255]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_rgb_uint8(np.array([[0.5, 3.0]]))
    with pytest.raises(ValueError, match="NaN"):
        to_rgb_uint8(np.array([[np.nan, 0.0]]))
    assert to_rgb_uint8(Image.fromarray(f))[0, :, 0].tolist() == [0, 128, 255, 1]


def test_bool_and_int_rules():
    b = np.array([[True, False]])
    assert to_rgb_uint8(b)[0, :, 0].tolist() == [255, 0]
    assert to_rgb_uint8(np.array([[3, 200]], dtype=np.int64))[0, :, 0].tolist() == [3, 200]
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        to_rgb_uint8(np.array([[3, 300]], dtype=np.int32))


def test_layouts():
    rgb = _rand_image(7, 9)
    chw = np.ascontiguousarray(rgb.transpose(2, 0, 1))
    assert (to_rgb_uint8(chw) == rgb).all()  # numpy CHW when the last axis cannot be channels
    assert (to_rgb_uint8(torch.from_numpy(chw)) == rgb).all()
    assert (to_rgb_uint8(torch.from_numpy(rgb)) == rgb).all()  # torch HWC when unambiguous
    square = _rand_image(3, 3)
    assert (to_rgb_uint8(square) == square).all()  # numpy: HWC first
    assert (to_rgb_uint8(torch.from_numpy(square)) == square.transpose(1, 2, 0)).all()  # torch: CHW
    with pytest.raises(ValueError, match="channel axis"):
        to_rgb_uint8(np.zeros((5, 6, 7), np.uint8))
    with pytest.raises(TypeError):
        to_rgb_uint8("not an image")


def test_load_image_exif(tmp_path):
    rgb = _rand_image(6, 10)
    im = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    path = tmp_path / "rot.png"
    im.save(path, exif=exif)
    out = load_image(path)
    assert out.shape == (10, 6, 3)
    assert (out == np.rot90(rgb, k=-1)).all()
    plain = tmp_path / "plain.png"
    im.save(plain)
    assert (load_image(str(plain)) == rgb).all()


def test_batched_array_input(proc):
    batch = np.stack([_rand_image(20, 30), _rand_image(20, 30, seed=9)])
    out = proc(batch)
    ref = proc(list(batch))
    assert out["pixel_values"].shape == (2, 3, 1024, 1024)
    assert torch.equal(out["pixel_values"], ref["pixel_values"])
