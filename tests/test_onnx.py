"""ONNX export (``samhq_fast.onnx_export``, ``samhq-fast export-onnx``) run in onnxruntime (CPU).

* The decoder is a drop-in for the official SAM-HQ ONNX model: the official ``SamOnnxModel``'s
  example inputs, run through the official module (PyTorch) and through our ``decoder.onnx``,
  give the same outputs, for each of its options.
* Encoder, decoder and the two chained match our fp32 reference within 1e-4 of the scale on
  small random stand-ins of vit_b / vit_l / vit_h / vit_tiny and on a full-size vit_tiny, with
  dynamic batch, point and prompt counts.
* On the trained test model the ONNX masks are identical to ``Predictor.predict``'s (the README's
  onnxruntime example, executed as written, included), and an fp16 export's masks have IoU >= 0.99
  with the fp32 reference's.
* The command: files, one-line errors, the missing-extra message, nothing half-written.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from _pbtxt import parse

import samhq_fast
from samhq_fast import Predictor, SamHQModel, load_model
from samhq_fast.cli import main
from samhq_fast.config import PRESETS, SamHQConfig, SamHQPromptEncoderConfig
from samhq_fast.modeling.sam_hq import run_image_encoder

from _compare import assert_logits_close
from _official import import_official
from _weights import build_official, perturb_, save_official_pth, small_config
from fixtures import shapes

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
onnx_export = pytest.importorskip("samhq_fast.onnx_export")

ROOT = Path(__file__).resolve().parent.parent
PTH = ROOT / "tests" / "fixtures" / "shapes_model" / "sam_hq_shapes.pth"
S = 128  # stand-ins: 8x8 token grid; window 3 pads it to 9x9


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Small models on a shared 2-core machine: one intra-op thread (see test_trained_model)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _session(path: Path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _np(d: dict) -> dict:
    return {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}


# ------------------------------------------------------------------- official interface
def _official_onnx_module():
    import_official()
    import importlib

    return importlib.import_module("segment_anything_hq.utils.onnx")


@pytest.fixture(scope="module")
def official_pair(tmp_path_factory):
    """The official Sam (random non-trivial weights) and ours loaded from its ``.pth``."""
    cfg = small_config()  # 256 px, 16x16 tokens, hidden 192, global layers 1 and 3
    torch.manual_seed(0)
    official = perturb_(build_official(cfg), seed=0)
    path = tmp_path_factory.mktemp("official") / "sam_hq_small.pth"
    save_official_pth(official, path)
    return official, load_model(path, backend="reference")


def _official_example_inputs(official) -> dict[str, torch.Tensor]:
    """The dummy inputs of the official ``scripts/export_onnx_model.py``, at this model's size:
    4 intermediate embeddings, 5 points labelled 0-3, a mask prompt, a 1500 x 2250 image."""
    pe = official.prompt_encoder
    g = pe.image_embedding_size
    s = official.image_encoder.img_size
    vit_dim = official.mask_decoder.compress_vit_feat[0].in_channels
    gen = torch.Generator().manual_seed(0)
    return {
        "image_embeddings": torch.randn(1, pe.embed_dim, *g, generator=gen),
        "interm_embeddings": torch.randn(4, 1, *g, vit_dim, generator=gen),
        "point_coords": torch.randint(0, s, (1, 5, 2), generator=gen).float(),
        "point_labels": torch.randint(0, 4, (1, 5), generator=gen).float(),
        "mask_input": torch.randn(1, 1, *pe.mask_input_size, generator=gen),
        "has_mask_input": torch.tensor([1.0]),
        "orig_im_size": torch.tensor([1500.0, 2250.0]),
    }


OFFICIAL_OPTIONS = [
    dict(),
    dict(multimask_output=True),
    dict(hq_token_only=True),
    dict(use_stability_score=True, return_extra_metrics=True),
]


@pytest.mark.parametrize("options", OFFICIAL_OPTIONS, ids=lambda o: "+".join(o) or "default")
def test_decoder_is_a_drop_in_for_the_official_onnx_model(official_pair, options, tmp_path):
    official, ours = official_pair
    SamOnnxModel = _official_onnx_module().SamOnnxModel
    ref_module = SamOnnxModel(official, **options).eval()
    out = onnx_export.export_onnx(ours, tmp_path / "x", encoder=False, verify=False, **options)
    sess = _session(out.decoder)
    names = ("masks", "iou_predictions", "stability_scores", "areas", "low_res_masks")
    expected_names = list(names if options.get("return_extra_metrics") else names[:2] + names[4:])
    assert [i.name for i in sess.get_inputs()] == list(onnx_export.DECODER_INPUTS)
    assert [o.name for o in sess.get_outputs()] == expected_names
    assert all(i.type == "tensor(float)" for i in sess.get_inputs())

    base = _official_example_inputs(official)
    g = torch.Generator().manual_seed(5)
    s = official.image_encoder.img_size
    cases = {
        "official example": base,
        # no mask prompt, 3 prompt sets of fg/bg points + the padding point, a small image
        "padding point, no mask, 3 prompt sets": base
        | {
            "point_coords": torch.cat(
                [torch.rand(3, 2, 2, generator=g) * s, torch.zeros(3, 1, 2)], dim=1
            ),
            "point_labels": torch.tensor([[1.0, 0.0, -1.0]]).repeat(3, 1),
            "has_mask_input": torch.tensor([0.0]),
            "orig_im_size": torch.tensor([300.0, 170.0]),
        },
        # a box (two corners) alone, one intermediate embedding (as the vit_tiny encoder gives)
        "box, k = 1": base
        | {
            "interm_embeddings": base["interm_embeddings"][:1],
            "point_coords": torch.tensor([[[20.0, 30.0], [200.0, 170.0]]]),
            "point_labels": torch.tensor([[2.0, 3.0]]),
        },
    }
    for what, inputs in cases.items():
        with torch.no_grad():
            ref = ref_module(**inputs)
        got = sess.run(None, _np(inputs))
        assert len(got) == len(ref)
        for name, a, b in zip(expected_names, got, ref, strict=True):
            b = b.detach()
            assert a.shape == tuple(b.shape), f"{what} {name}: {a.shape} vs {tuple(b.shape)}"
            if name == "areas":
                # pixel counts of thresholded logits: a logit within rounding of 0 may flip
                assert np.abs(a - b.numpy()).max() <= 2, f"{what}: areas {a} vs {b}"
            else:
                assert_logits_close(torch.from_numpy(a), b, f"official {what} {name}")


def test_full_size_decoder_on_the_official_example(tmp_path):
    """The official export script's dummy inputs exactly (vit_b sizes: 64x64 embeddings, four
    (1, 64, 64, 768) intermediate embeddings, 1500 x 2250 output), through the official
    ``SamOnnxModel`` and our ``decoder.onnx`` (the encoder is not run: a 2-block stand-in)."""
    cfg = small_config(1024, hidden=768, depth=2, heads=12, window=14, global_idx=(1,))
    torch.manual_seed(0)
    official = perturb_(build_official(cfg), seed=1)
    save_official_pth(official, tmp_path / "full.pth")
    ours = load_model(tmp_path / "full.pth", backend="reference")
    inputs = _official_example_inputs(official)
    assert tuple(inputs["interm_embeddings"].shape) == (4, 1, 64, 64, 768)
    with torch.no_grad():
        ref = _official_onnx_module().SamOnnxModel(official).eval()(**inputs)
    out = onnx_export.export_onnx(ours, tmp_path / "x", encoder=False, verify=False)
    got = _session(out.decoder).run(None, _np(inputs))
    assert got[0].shape == (1, 1, 1500, 2250)
    for name, a, b in zip(onnx_export.DECODER_OUTPUTS, got, ref, strict=True):
        assert_logits_close(torch.from_numpy(a), b, f"official full-size {name}")


# ----------------------------------------------------------------- stand-ins of each preset
def _tiny_config(image_size: int) -> SamHQConfig:
    p = PRESETS["vit_tiny"]
    return SamHQConfig(
        dataclasses.replace(p.vision_config, image_size=image_size),
        SamHQPromptEncoderConfig(image_size=image_size),
        p.mask_decoder_config,
    )


VARIANTS = {
    # vit_b / vit_l: head dim 64, windowed layers that pad 8x8 to 9x9 and global layers
    "vit_b": lambda: small_config(S, hidden=128, depth=2, heads=2, window=3, global_idx=(1,)),
    "vit_l": lambda: small_config(S, hidden=128, depth=3, heads=2, window=3, global_idx=(0, 2)),
    # vit_h: head dim 80
    "vit_h": lambda: small_config(S, hidden=160, depth=2, heads=2, window=3, global_idx=(1,)),
    # vit_tiny: the TinyViT encoder (released architecture) at 128 px: every stage pads
    "vit_tiny": lambda: _tiny_config(S),
}


def _stand_in(name: str, seed: int = 3) -> SamHQModel:
    torch.manual_seed(seed)
    model = SamHQModel(VARIANTS[name]()).eval()
    perturb_(model, seed=seed)
    model.set_backend("reference")
    return model.requires_grad_(False)


def _image(size: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (*size, 3), dtype=np.uint8)


def _prompt(h: int, w: int, scale: float, points: np.ndarray):
    """Points ``(N, 2)`` in image pixels -> the decoder's ``point_coords`` / ``point_labels``
    with the padding point, labels 1 then 0 for the rest (as the README)."""
    pts = np.concatenate([points * scale, [[0, 0]]])[None].astype(np.float32)
    labels = np.array([[1] + [0] * (len(points) - 1) + [-1]], np.float32)
    return pts, labels


@pytest.mark.parametrize("name", list(VARIANTS))
def test_encoder_decoder_and_chain_match_the_reference(name, tmp_path):
    model = _stand_in(name)
    s = model.config.vision_config.image_size
    out = onnx_export.export_onnx(model, tmp_path / name, verify=False)
    enc, dec = _session(out.encoder), _session(out.decoder)
    k = 1 if name.startswith("vit_tiny") else len(model.config.vision_config.global_attn_indexes)

    # Encoder: dynamic batch (traced at 2), 1 and 3 images; every intermediate embedding.
    g = torch.Generator().manual_seed(1)
    for batch in (1, 3):
        pixels = torch.randn(batch, 3, s, s, generator=g)
        emb, interm = enc.run(None, {"pixel_values": pixels.numpy()})
        with torch.no_grad():
            ref_emb, ref_interm, _, _ = run_image_encoder(model.image_encoder, pixels)
        assert interm.shape[:2] == (k, batch)
        assert_logits_close(torch.from_numpy(emb), ref_emb, f"{name} B={batch} image_embeddings")
        assert_logits_close(
            torch.from_numpy(interm), torch.stack(ref_interm), f"{name} B={batch} interm"
        )

    # Decoder fed with the reference's embeddings, and the chain, vs Predictor (logits).
    predictor = Predictor(model)
    h, w = s * 3 // 4, s
    image = _image((h, w), seed=2)
    emb_ref = predictor.embed(image)
    pixels, _, _ = predictor.preprocess([image])
    emb, interm = enc.run(None, {"pixel_values": pixels.float().numpy()})
    with torch.no_grad():
        _, ref_interm, _, _ = run_image_encoder(model.image_encoder, pixels)
    scale = s / max(h, w)
    pts = np.array([[w * 0.4, h * 0.5], [w * 0.8, h * 0.2]])
    coords, labels = _prompt(h, w, scale, pts)
    # The decoder is the same code for every preset (only vit_dim differs): multimask once.
    for multimask in (False, True) if name == "vit_b" else (False,):
        ref_masks, ref_scores, ref_low = predictor.decode(
            emb_ref, pts, np.array([1, 0]), multimask_output=multimask, return_logits=True
        )
        if multimask:
            dec = _session(
                onnx_export.export_onnx(
                    model,
                    tmp_path / f"{name}_mm",
                    multimask_output=True,
                    encoder=False,
                    verify=False,
                ).decoder
            )
        common = {
            "point_coords": coords,
            "point_labels": labels,
            "mask_input": np.zeros((1, 1, *model.prompt_encoder.mask_input_size), np.float32),
            "has_mask_input": np.zeros(1, np.float32),
            "orig_im_size": np.array([h, w], np.float32),
        }
        for what, (e, i) in {
            "decoder": (emb_ref.image_embeddings.numpy(), torch.stack(ref_interm).numpy()),
            "chain": (emb, interm),
        }.items():
            masks, scores, low = dec.run(
                None, {"image_embeddings": e, "interm_embeddings": i, **common}
            )
            tag = f"{name} {what} multimask={multimask}"
            assert masks.shape == (1, 1, h, w)
            assert_logits_close(torch.from_numpy(masks[0]), torch.from_numpy(ref_masks), tag)
            assert_logits_close(torch.from_numpy(low[0]), torch.from_numpy(ref_low), tag + " low")
            np.testing.assert_allclose(scores[0], ref_scores, atol=1e-5, err_msg=tag)


# --------------------------------------------------------------------- the trained model
@pytest.fixture(scope="module")
def trained_export(tmp_path_factory):
    """``samhq-fast export-onnx`` on the trained model's official ``.pth``, fp32 and fp16."""
    root = tmp_path_factory.mktemp("trained")
    for dtype in ("fp32", "fp16"):
        assert main(["export-onnx", str(PTH), "--out", str(root / dtype), "--dtype", dtype]) == 0
    return root


@pytest.fixture(scope="module")
def reference():
    return Predictor(model=PTH, device="cpu", dtype="fp32", backend="reference")


def _scenes(n: int = 4):
    rng = np.random.default_rng(20250101)  # the held-out scenes of test_trained_model
    out = []
    for i in range(n):
        img, masks = shapes.make_scene(rng, 256)
        if i % 2:  # non-square images: the decoder's crop and resize to orig_im_size
            img, masks = img[:, :200], masks[:, :, :200]
        out.append((img, masks))
    return out


class OnnxSegmenter:
    """The two exported models used as the README does (same preprocessing)."""

    def __init__(self, folder: Path) -> None:
        from PIL import Image

        self.Image = Image
        self.enc = _session(folder / "encoder.onnx")
        self.dec = _session(folder / "decoder.onnx")
        self.size = self.enc.get_inputs()[0].shape[-1]

    def set_image(self, image: np.ndarray) -> None:
        Image, size = self.Image, self.size
        h, w = image.shape[:2]
        scale = size / max(h, w)
        new_h, new_w = int(h * scale + 0.5), int(w * scale + 0.5)
        resized = np.asarray(
            Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR), np.float32
        )
        mean = np.array([123.675, 116.28, 103.53], np.float32)
        std = np.array([58.395, 57.12, 57.375], np.float32)
        pixels = np.zeros((1, 3, size, size), np.float32)
        pixels[0, :, :new_h, :new_w] = ((resized - mean) / std).transpose(2, 0, 1)
        self.emb, self.interm = self.enc.run(None, {"pixel_values": pixels})
        self.hw, self.factor = (h, w), np.array([new_w / w, new_h / h])

    def predict(self, points=None, box=None) -> tuple[np.ndarray, np.ndarray]:
        """Masks ``(P, H, W)`` bool and scores ``(P,)``: ``points`` ``(P, 1, 2)`` fg points or
        ``box`` ``(P, 4)``."""
        if box is not None:
            coords = np.asarray(box, np.float64).reshape(-1, 2, 2) * self.factor
            labels = np.tile([[2.0, 3.0]], (len(coords), 1))
        else:
            coords = np.asarray(points, np.float64) * self.factor
            coords = np.concatenate([coords, np.zeros((len(coords), 1, 2))], axis=1)
            labels = np.tile([[1.0, -1.0]], (len(coords), 1))
        masks, scores, _ = self.dec.run(None, {
            "image_embeddings": self.emb,
            "interm_embeddings": self.interm,
            "point_coords": coords.astype(np.float32),
            "point_labels": labels.astype(np.float32),
            "mask_input": np.zeros(self.dec.get_inputs()[4].shape, np.float32),
            "has_mask_input": np.zeros(1, np.float32),
            "orig_im_size": np.array(self.hw, np.float32),
        })  # fmt: skip
        return masks[:, 0] > 0, scores[:, 0]


def _assert_same_masks(got: np.ndarray, ref: np.ndarray, ref_logits: np.ndarray, what: str):
    """Identical masks; a pixel whose reference logit is within float rounding of the
    threshold (|logit| < 1e-4 x scale) may flip, and none does in practice (counted)."""
    diff = got != ref
    near = np.abs(ref_logits) < 1e-4 * np.abs(ref_logits).max()
    assert not (diff & ~near).any(), f"{what}: {int((diff & ~near).sum())} pixels differ"
    print(f"[onnx] {what}: {int(diff.sum())} of {diff.size} pixels differ (all at |logit|~0)")
    return int(diff.sum())


def test_trained_model_masks_equal_predictor(trained_export, reference):
    seg = OnnxSegmenter(trained_export / "fp32")
    flipped = 0
    for i, (img, masks) in enumerate(_scenes()):
        reference.set_image(img)
        seg.set_image(img)
        pts = np.stack([shapes.interior_point(m) for m in masks])[:, None]  # (n, 1, 2)
        boxes = np.stack([shapes.mask_box(m) for m in masks])
        for what, kw in (("points", dict(point_coords=pts)), ("boxes", dict(box=boxes))):
            if what == "points":
                kw["point_labels"] = np.ones((len(masks), 1))
            ref, ref_scores, _ = reference.predict(**kw, multimask_output=False)
            logits, _, _ = reference.predict(**kw, multimask_output=False, return_logits=True)
            got, scores = seg.predict(points=pts) if what == "points" else seg.predict(box=boxes)
            flipped += _assert_same_masks(got, ref[:, 0], logits[:, 0], f"scene {i} {what}")
            np.testing.assert_allclose(scores, ref_scores[:, 0], atol=1e-5)
            # and the masks are good ones (the model was trained to segment the shapes)
            assert np.mean([shapes.iou(a, b) for a, b in zip(got, masks, strict=True)]) > 0.6
    assert flipped == 0


def test_fp16_export_masks(trained_export, reference):
    """fp16 weights and compute (onnxruntime CPU runs the whole graph; no op falls back):
    masks IoU >= 0.99 with the fp32 reference's."""
    import onnx

    m = onnx.load(str(trained_export / "fp16" / "encoder.onnx"))
    half = sum(t.data_type == onnx.TensorProto.FLOAT16 for t in m.graph.initializer)
    assert half >= len(m.graph.initializer) // 2, "the fp16 export does not hold fp16 weights"
    seg = OnnxSegmenter(trained_export / "fp16")
    ious = []
    for img, masks in _scenes():
        reference.set_image(img)
        seg.set_image(img)
        pts = np.stack([shapes.interior_point(m) for m in masks])[:, None]
        ref, _, _ = reference.predict(
            point_coords=pts, point_labels=np.ones((len(masks), 1)), multimask_output=False
        )
        got, _ = seg.predict(points=pts)
        ious += [shapes.iou(a, b) for a, b in zip(got, ref[:, 0], strict=True)]
    print(f"[onnx] fp16 vs fp32 reference masks: mean IoU {np.mean(ious):.4f}, min {min(ious):.4f}")
    assert np.mean(ious) >= 0.99 and min(ious) >= 0.97


def test_hf_directory_exports_the_same_model(trained_export, tmp_path):
    """``export-onnx`` on the HF directory of the same weights gives the same masks."""
    hf_dir = PTH.parent / "hf"
    assert main(["export-onnx", str(hf_dir), "--out", str(tmp_path / "hf"), "--no-verify"]) == 0
    a, b = OnnxSegmenter(trained_export / "fp32"), OnnxSegmenter(tmp_path / "hf")
    img, masks = _scenes(1)[0]
    pts = np.stack([shapes.interior_point(m) for m in masks])[:, None]
    for seg in (a, b):
        seg.set_image(img)
    (ma, sa), (mb, sb) = a.predict(points=pts), b.predict(points=pts)
    np.testing.assert_array_equal(ma, mb)
    np.testing.assert_array_equal(sa, sb)


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## ONNX export\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "no python example in the README's ONNX section"
    return blocks[0]


def test_readme_example_runs_and_gives_the_segment_mask(trained_export, tmp_path, reference):
    """The README's onnxruntime example, as written (only the file names and the point are
    changed), on the trained model's export; its mask is ``samhq-fast segment``'s."""
    from PIL import Image

    img, masks = _scenes(2)[1]  # non-square
    photo = tmp_path / "photo.png"
    Image.fromarray(img).save(photo)
    x, y = (int(v) for v in shapes.interior_point(masks[0]))
    code = _readme_example()
    assert 'Image.open("photo.jpg")' in code and "x, y = 320, 240" in code
    code = code.replace('"photo.jpg"', repr(str(photo)))
    code = code.replace("x, y = 320, 240", f"x, y = {x}, {y}")
    code = code.replace('"sam_hq_onnx/', '"' + str(trained_export / "fp32") + "/")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    mask = scope["mask"]
    argv = ["segment", str(photo), "--point", f"{x},{y}", "--checkpoint", str(PTH)]
    argv += ["--device", "cpu", "--backend", "reference", "--out", str(tmp_path / "m.png")]
    assert main(argv) == 0
    segment = np.asarray(Image.open(tmp_path / "m.png")) > 0
    assert mask.shape == segment.shape == img.shape[:2]
    np.testing.assert_array_equal(mask, segment)
    assert shapes.iou(mask, masks[0]) > 0.6


# ------------------------------------------------------------------------ files and CLI
def test_output_folder_readme_and_triton_configs(trained_export):
    folder = trained_export / "fp32"
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.txt", "decoder.onnx", "encoder.onnx", "triton"
    ]  # fmt: skip
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "temp left over"
    readme = (folder / "README.txt").read_text()
    for needle in ("pixel_values", "interm_embeddings", "padding point", "orig_im_size"):
        assert needle in readme
    type_map = {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64"}
    for model, file in (("samhq_encoder", "encoder.onnx"), ("samhq_decoder", "decoder.onnx")):
        cfg = parse((folder / "triton" / model / "config.pbtxt").read_text())
        assert cfg["name"] == [model] and cfg["platform"] == ["onnxruntime_onnx"]
        assert cfg["max_batch_size"] == [0]
        target = folder / "triton" / model / "1" / "model.onnx"
        assert target.resolve() == (folder / file).resolve()
        sess = _session(target)  # Triton loads exactly this file
        for key, io in (("input", sess.get_inputs()), ("output", sess.get_outputs())):
            assert [t["name"][0] for t in cfg[key]] == [t.name for t in io]
            for t, o in zip(cfg[key], io, strict=True):
                assert t["data_type"] == [type_map[o.type]]
                assert t["dims"] == [d if isinstance(d, int) else -1 for d in o.shape], o.name
        declared = {n: d for n, _, d in sum(model_io_lists(folder / file), [])}
        for t in cfg["input"] + cfg["output"]:
            assert t["dims"] == [d if isinstance(d, int) else -1 for d in declared[t["name"][0]]]


def model_io_lists(path: Path) -> list[list]:
    return list(onnx_export.model_io(path))


def test_external_data_for_large_models(tmp_path):
    """Models over protobuf's 2 GiB (vit_h's encoder) keep their weights in one ``.data`` file;
    forced here on a small model. The Triton repository links it under its own name."""
    model = load_model(PTH, backend="reference")
    out = samhq_fast.export_onnx(model, tmp_path / "ext", external_data=True, verify=False)
    names = sorted(p.name for p in out.out_dir.iterdir())
    assert names == [
        "README.txt", "decoder.onnx", "decoder.onnx.data", "encoder.onnx", "encoder.onnx.data",
        "triton",
    ]  # fmt: skip
    assert (out.out_dir / "encoder.onnx").stat().st_size < 1_000_000
    pixels = np.zeros((1, 3, 256, 256), np.float32)
    a = _session(out.out_dir / "triton" / "samhq_encoder" / "1" / "model.onnx").run(
        None, {"pixel_values": pixels}
    )
    with torch.no_grad():
        ref, _, _, _ = run_image_encoder(model.image_encoder, torch.from_numpy(pixels))
    assert_logits_close(torch.from_numpy(a[0]), ref, "external data encoder")
    # Re-exporting the decoder alone, inline, into the same folder drops its stale weights file.
    samhq_fast.export_onnx(model, out.out_dir, encoder=False, verify=False)
    assert not (out.out_dir / "decoder.onnx.data").exists()
    assert (out.out_dir / "encoder.onnx.data").exists()
    _session(out.out_dir / "decoder.onnx")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_output_names_the_interface(tmp_path, capsys):
    code, out, _ = _run(
        capsys, "export-onnx", str(PTH), "--out", str(tmp_path / "d"), "--decoder-only",
        "--multimask", "--hq-token-only", "--opset", "18",
    )  # fmt: skip
    assert code == 0
    assert "point_coords" in out and "(num_prompts, num_points, 2)" in out
    assert "onnxruntime vs PyTorch decoder.masks" in out
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [
        "README.txt", "decoder.onnx", "triton"
    ]  # fmt: skip
    import onnx

    proto = onnx.load(str(tmp_path / "d" / "decoder.onnx"))
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18
    assert "hq_token_only=True" in (tmp_path / "d" / "README.txt").read_text()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["export-onnx", "missing.pth", "--out", "{tmp}/o"], "no weights for 'missing.pth'"),
        (["export-onnx", "{tmp}/bad.pth", "--out", "{tmp}/o"], "cannot load"),
        (["export-onnx", str(PTH), "--out", "{tmp}/o", "--bogus"], "unrecognized arguments"),
        (["export-onnx", str(PTH), "--out", "{tmp}/o", "--dtype", "bf16"], "invalid choice"),
        (["export-onnx", str(PTH), "--out", "{tmp}/o", "--opset", "11"], "--opset must be"),
        (["export-onnx", str(PTH), "--out", "{tmp}/no/such/o"], "parent does not exist"),
        (["export-onnx", str(PTH)], "required: --out"),
    ],
)
def test_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys, argv, needle):
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    code, out, err = _run(capsys, *(a.replace("{tmp}", str(tmp_path)) for a in argv))
    assert code != 0
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("samhq-fast: error: ") and needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth"]


def test_cli_without_the_onnx_extra(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "onnxruntime" else real(n, *a)
    )
    code, _, err = _run(capsys, "export-onnx", str(PTH), "--out", str(tmp_path / "o"))
    assert code == 1
    assert err == (
        "samhq-fast: error: ONNX export needs onnxruntime, which is not installed: "
        'pip install "samhq-fast[onnx]"  (or: pip install onnx onnxruntime)\n'
    )
    assert not (tmp_path / "o").exists()


def test_failure_midway_leaves_nothing_half_written(tmp_path, capsys, monkeypatch):
    """An export that fails after the decoder was written (here: the encoder's export raises)
    leaves a new DIR absent, an existing DIR as it was, and no temporary folder behind."""
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "decoder.onnx").write_bytes(b"old")
    real = torch.onnx.export

    def export(module, *args, **kwargs):
        if isinstance(module, onnx_export.EncoderOnnxModel):
            raise RuntimeError("simulated exporter failure")
        return real(module, *args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)
    for target in (tmp_path / "new", existing):
        code, _, err = _run(capsys, "export-onnx", str(PTH), "--out", str(target))
        assert code == 1 and "simulated exporter failure" in err
        assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
    assert [p.name for p in existing.iterdir()] == ["decoder.onnx"]
    assert (existing / "decoder.onnx").read_bytes() == b"old"


def test_export_leaves_the_model_untouched():
    model = load_model(PTH, backend="reference")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="dtype must be one of"):
        onnx_export.export_onnx(model, "unused", dtype="bf16")
    with pytest.raises(TypeError, match="SamHQModel"):
        onnx_export.export_onnx(torch.nn.Linear(2, 2), "unused")
    assert model.dtype == torch.float32 and model.backend == "reference"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not os.path.exists("unused")
