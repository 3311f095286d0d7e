"""Three-way parity: ours vs the official segment_anything_hq 0.3 and vs transformers 4.53.3.

Random, non-trivial weights are made in the official model, written as an official ``.pth``, and
loaded by us; the transformers model gets the same weights and writes a ``save_pretrained``
directory, which we load too. Both of our loads must hold identical tensors.
"""

from __future__ import annotations

import pytest
import torch

from samhq_fast import load_model
from samhq_fast.config import PRESETS
from samhq_fast.modeling.sam_hq import run_image_encoder

from _compare import assert_iou_close, assert_logits_close
from _weights import (
    build_hf,
    build_official,
    build_official_tiny,
    perturb_,
    save_official_pth,
    set_hf_decoder_eps,
    small_config,
)

pytest.importorskip("transformers")


class Trio:
    def __init__(self, config, official, ours, hf, ours_from_hf):
        self.config, self.official, self.ours, self.hf = config, official, ours, hf
        self.ours_from_hf = ours_from_hf
        s = config.vision_config.image_size
        g = torch.Generator().manual_seed(1)
        self.pixels = torch.randn(2, 3, s, s, generator=g)
        with torch.no_grad():
            self.off_enc = [official.image_encoder(self.pixels[i : i + 1]) for i in range(2)]
            self.our_enc = [
                run_image_encoder(ours.image_encoder, self.pixels[i : i + 1]) for i in range(2)
            ]


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    torch.manual_seed(0)
    cfg = small_config()
    official = perturb_(build_official(cfg), seed=0)
    tmp = tmp_path_factory.mktemp("ckpt")
    save_official_pth(official, tmp / "sam_hq_small.pth")
    ours = load_model(tmp / "sam_hq_small.pth", backend="reference")
    hf = build_hf(cfg, official)
    hf.save_pretrained(tmp / "hf")
    set_hf_decoder_eps(hf)
    ours_from_hf = load_model(tmp / "hf", backend="reference")
    return Trio(cfg, official, ours, hf, ours_from_hf)


def test_both_formats_load_the_same_tensors(trio):
    a, b = trio.ours.state_dict(), trio.ours_from_hf.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert trio.ours.config == trio.ours_from_hf.config.replace(
        prompt_encoder_config=trio.ours.config.prompt_encoder_config
    )


def test_image_encoder_matches_official(trio):
    for i in range(2):
        (e_off, i_off), (e_our, i_our, _, _) = trio.off_enc[i], trio.our_enc[i]
        assert_logits_close(e_our, e_off, f"image embedding {i}")
        assert len(i_our) == len(i_off) == len(trio.config.vision_config.global_attn_indexes)
        for j, (a, b) in enumerate(zip(i_our, i_off, strict=True)):
            assert_logits_close(a, b, f"intermediate embedding {i}.{j}")


# ------------------------------------------------------------------- vs the official decoder
def _prompts(kind: str, s: int):
    """Official-layout prompts for one image: (points, labels, boxes, masks)."""
    g = torch.Generator().manual_seed(hash(kind) % 1000)
    pts = lambda n, b=1: torch.rand(b, n, 2, generator=g) * s  # noqa: E731
    if kind == "one_point":
        return pts(1), torch.ones(1, 1), None, None
    if kind == "fg_bg_points":
        return pts(3), torch.tensor([[1.0, 0.0, 1.0]]), None, None
    if kind == "box":
        return None, None, torch.tensor([[0.1, 0.2, 0.7, 0.9]]) * s, None
    if kind == "box_and_point":
        return pts(1), torch.ones(1, 1), torch.tensor([[0.1, 0.2, 0.7, 0.9]]) * s, None
    if kind == "mask_and_point":
        m = torch.randn(1, 1, s // 4, s // 4, generator=g) * 3
        return pts(2), torch.tensor([[1.0, 0.0]]), None, m
    if kind == "three_boxes":
        lo = torch.rand(3, 2, generator=g) * s / 2
        return None, None, torch.cat([lo, lo + s / 3], dim=1), None
    if kind == "not_a_point_label":
        return pts(2), torch.tensor([[1.0, -1.0]]), None, None
    if kind == "no_prompt":
        return None, None, None, None
    raise KeyError(kind)


PROMPT_KINDS = [
    "one_point",
    "fg_bg_points",
    "box",
    "box_and_point",
    "mask_and_point",
    "three_boxes",
    "not_a_point_label",
    "no_prompt",
]


def _official_decode(off, enc, prompts, multimask, hq_only):
    emb, interm = enc
    points, labels, boxes, masks = prompts
    sparse, dense = off.prompt_encoder(
        points=(points, labels) if points is not None else None, boxes=boxes, masks=masks
    )
    return off.mask_decoder(
        image_embeddings=emb,
        image_pe=off.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
        hq_token_only=hq_only,
        interm_embeddings=interm,
    )


def _our_decode(model, enc, prompts, multimask, hq_only):
    emb, interm, _, _ = enc
    points, labels, boxes, masks = prompts
    sparse, dense = model.prompt_encoder(
        None if points is None else points[None],
        None if labels is None else labels[None].long(),
        None if boxes is None else boxes[None],
        None if masks is None else masks[None],
    )
    m, iou = model.mask_decoder(
        emb,
        model.prompt_encoder.get_dense_pe(),
        sparse,
        dense,
        multimask,
        hq_only,
        interm_embeddings=interm,
        convention="official",
    )
    return m[0], iou[0]


@pytest.mark.parametrize("kind", PROMPT_KINDS)
@pytest.mark.parametrize(
    "multimask,hq_only", [(False, False), (True, False), (False, True), (True, True)]
)
@torch.no_grad()
def test_decoder_matches_official(trio, kind, multimask, hq_only):
    s = trio.config.vision_config.image_size
    prompts = _prompts(kind, s)
    m_off, iou_off = _official_decode(trio.official, trio.off_enc[0], prompts, multimask, hq_only)
    m_our, iou_our = _our_decode(trio.ours, trio.our_enc[0], prompts, multimask, hq_only)
    what = f"official {kind} mm={multimask} hq={hq_only}"
    assert_logits_close(m_our, m_off, what)
    assert_iou_close(iou_our, iou_off, what)


# ----------------------------------------------------------------------- vs transformers
def _hf_and_ours(trio, **inputs):
    with torch.no_grad():
        ref = trio.hf(**inputs)
        ours = trio.ours(**inputs)
    return ours, ref


@pytest.mark.parametrize("multimask", [False, True])
@pytest.mark.parametrize("hq_only", [False, True])
def test_forward_matches_transformers_point(trio, multimask, hq_only):
    s = trio.config.vision_config.image_size
    ours, ref = _hf_and_ours(
        trio,
        pixel_values=trio.pixels[:1],
        input_points=torch.tensor([[[[0.3 * s, 0.6 * s], [0.7 * s, 0.2 * s]]]]),
        input_labels=torch.tensor([[[1, 0]]]),
        multimask_output=multimask,
        hq_token_only=hq_only,
    )
    what = f"hf points mm={multimask} hq={hq_only}"
    assert_logits_close(ours.pred_masks, ref.pred_masks, what)
    assert_iou_close(ours.iou_scores, ref.iou_scores, what)


def test_forward_matches_transformers_two_images_three_boxes(trio):
    s = trio.config.vision_config.image_size
    boxes = torch.tensor([[[10, 20, 120, 200], [50, 50, 250, 100], [0, 0, 255, 255]]]).float()
    boxes = torch.cat([boxes, boxes.flip(1) * 0.8]) * s / 256
    ours, ref = _hf_and_ours(trio, pixel_values=trio.pixels, input_boxes=boxes)
    assert ours.pred_masks.shape == (2, 3, 3, s // 4, s // 4)
    assert_logits_close(ours.pred_masks, ref.pred_masks, "hf 2 images x 3 boxes")
    assert_iou_close(ours.iou_scores, ref.iou_scores, "hf 2 images x 3 boxes")
    # ...and each image's boxes equal the official decoder's single best mask + HQ mask.
    for i in range(2):
        m_off, iou_off = _official_decode(
            trio.official, trio.off_enc[i], (None, None, boxes[i], None), True, False
        )
        order = torch.argsort(ref.iou_scores[i], dim=1, descending=True)
        assert torch.equal(order[:, 0], torch.zeros(3, dtype=torch.long))  # sorted already
        assert_iou_close(ours.iou_scores[i, :, :1], iou_off, f"official image {i} best box mask")
        assert_logits_close(ours.pred_masks[i, :, :1], m_off, f"official image {i} best box mask")


def test_forward_matches_transformers_ragged_points_padded(trio):
    s = trio.config.vision_config.image_size
    pts = (
        torch.tensor(
            [
                [[[0.2, 0.3], [0.5, 0.5], [0.0, 0.0]], [[0.8, 0.1], [0.0, 0.0], [0.0, 0.0]]],
                [[[0.4, 0.4], [0.6, 0.9], [0.1, 0.7]], [[0.3, 0.3], [0.9, 0.9], [0.0, 0.0]]],
            ]
        )
        * s
    )
    labels = torch.tensor([[[1, 0, -10], [1, -10, -10]], [[1, 1, 0], [0, 1, -10]]])
    ours, ref = _hf_and_ours(trio, pixel_values=trio.pixels, input_points=pts, input_labels=labels)
    assert_logits_close(ours.pred_masks, ref.pred_masks, "hf ragged points (-10 padding)")
    assert_iou_close(ours.iou_scores, ref.iou_scores, "hf ragged points (-10 padding)")


def test_forward_matches_transformers_box_and_points_and_mask(trio):
    s = trio.config.vision_config.image_size
    g = torch.Generator().manual_seed(3)
    ours, ref = _hf_and_ours(
        trio,
        pixel_values=trio.pixels[:1],
        input_points=torch.tensor([[[[0.5 * s, 0.5 * s]]]]),
        input_labels=torch.tensor([[[1]]]),
        input_boxes=torch.tensor([[[0.2 * s, 0.2 * s, 0.8 * s, 0.9 * s]]]),
        input_masks=torch.randn(1, 1, s // 4, s // 4, generator=g),
    )
    assert_logits_close(ours.pred_masks, ref.pred_masks, "hf box + point + mask")
    assert_iou_close(ours.iou_scores, ref.iou_scores, "hf box + point + mask")


def test_precomputed_embeddings_match_transformers(trio):
    s = trio.config.vision_config.image_size
    with torch.no_grad():
        emb, interm = trio.ours.get_image_embeddings(trio.pixels[:1])
        emb_hf, interm_hf = trio.hf.get_image_embeddings(trio.pixels[:1])
        assert_logits_close(emb, emb_hf, "get_image_embeddings")
        assert_logits_close(interm[0], interm_hf[0], "get_image_embeddings intermediate[0]")
        pts = torch.tensor([[[[0.4 * s, 0.6 * s]]]])
        ours = trio.ours(image_embeddings=emb, intermediate_embeddings=interm, input_points=pts)
        ref = trio.hf(image_embeddings=emb_hf, intermediate_embeddings=interm_hf, input_points=pts)
    assert_logits_close(ours.pred_masks, ref.pred_masks, "hf from precomputed embeddings")
    with pytest.raises(ValueError, match="intermediate_embeddings"):
        trio.ours(image_embeddings=emb, input_points=pts)


def test_persam_inputs_match_transformers(trio):
    s = trio.config.vision_config.image_size
    g = torch.Generator().manual_seed(5)
    h = trio.config.vision_config.grid_size
    inputs = dict(
        pixel_values=trio.pixels[:1],
        input_points=torch.tensor([[[[0.4 * s, 0.6 * s]]]]),
        target_embedding=torch.randn(1, 1, 1, 256, generator=g) * 0.5,
        attention_similarity=torch.randn(1, 8, 1, h * h, generator=g) * 0.1,
    )
    with torch.no_grad():
        ref = trio.hf(**inputs)
        ours = trio.ours(**{**inputs, "target_embedding": inputs["target_embedding"][0]})
    assert_logits_close(
        ours.pred_masks, ref.pred_masks, "hf target_embedding + attention_similarity"
    )


def test_vision_model_outputs(trio):
    from samhq_fast import SamHQVisionModel

    vm = SamHQVisionModel(trio.config)
    vm.vision_encoder.load_state_dict(trio.ours.image_encoder.state_dict())
    with torch.no_grad():
        out = vm(trio.pixels[:1], output_hidden_states=True, output_attentions=True)
        ref = trio.hf.vision_encoder(
            trio.pixels[:1], output_hidden_states=True, output_attentions=True
        )
    n = trio.config.vision_config.num_hidden_layers
    assert len(out.hidden_states) == len(ref.hidden_states) == n + 1
    assert len(out.attentions) == len(ref.attentions) == n
    for a, b in zip(out.attentions, ref.attentions, strict=True):
        assert_logits_close(a, b, "vision attentions")
    assert_logits_close(out.hidden_states[-1], ref.hidden_states[-1], "vision last hidden state")
    assert_logits_close(out.last_hidden_state, ref.last_hidden_state, "vision last_hidden_state")


# ------------------------------------------------------------------------------ vit_tiny
@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    official = perturb_(build_official_tiny(), seed=7)
    official.eval()  # the official TinyViT caches attention biases in eval(): refresh them
    path = tmp_path_factory.mktemp("tiny") / "sam_hq_vit_tiny.pth"
    save_official_pth(official, path)
    ours = load_model(path, backend="reference")
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        enc_off = official.image_encoder(x)
        enc_our = run_image_encoder(ours.image_encoder, x)
    return official, ours, enc_off, enc_our


@pytest.mark.parametrize("multimask,hq_only", [(False, False), (True, False), (True, True)])
@torch.no_grad()
def test_vit_tiny_matches_official(tiny_pair, multimask, hq_only):
    official, ours, enc_off, enc_our = tiny_pair
    assert ours.config.vision_config.backbone == "tiny_vit"
    assert_logits_close(enc_our[0], enc_off[0], "vit_tiny image embedding")
    for kind in ("fg_bg_points", "box_and_point"):
        p = _prompts(kind, 1024)
        m_off, iou_off = _official_decode(official, enc_off, p, multimask, hq_only)
        m_our, iou_our = _our_decode(ours, enc_our, p, multimask, hq_only)
        assert_logits_close(m_our, m_off, f"vit_tiny {kind} mm={multimask} hq={hq_only}")
        assert_iou_close(iou_our, iou_off, f"vit_tiny {kind} mm={multimask} hq={hq_only}")


def test_vit_tiny_decoder_matches_transformers(tiny_pair):
    """transformers has no TinyViT, but its decoder with vit_dim 160 takes our embeddings."""
    from transformers import SamHQConfig as HFConfig
    from transformers import SamHQModel as HFModel

    from samhq_fast.weights import official_to_hf

    official, ours, _, (emb, interm, _, _) = tiny_pair
    cfg = small_config(image_size=1024).to_hf_dict()
    cfg["mask_decoder_config"]["vit_dim"] = 160
    hf = HFModel(HFConfig(**cfg)).eval()
    sd = {
        k: v for k, v in official_to_hf(official.state_dict()).items() if not k.startswith("vision")
    }
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("vision_encoder.") for k in missing)
    set_hf_decoder_eps(hf)
    with torch.no_grad():
        pts = torch.tensor([[[[300.0, 500.0], [700.0, 200.0]]]])
        labels = torch.tensor([[[1, 0]]])
        a = ours(
            image_embeddings=emb,
            intermediate_embeddings=interm,
            input_points=pts,
            input_labels=labels,
        )
        b = hf(
            image_embeddings=emb,
            intermediate_embeddings=interm,
            input_points=pts,
            input_labels=labels,
        )
    assert_logits_close(a.pred_masks, b.pred_masks, "vit_tiny decoder vs transformers")
    assert_iou_close(a.iou_scores, b.iou_scores, "vit_tiny decoder vs transformers")


# ------------------------------------------------------------------- full vit_b, 1024x1024
@pytest.mark.slow
@torch.no_grad()
def test_full_vit_b_matches_official_and_transformers(tmp_path):
    cfg = PRESETS["vit_b"]
    official = perturb_(build_official(cfg), seed=11)
    save_official_pth(official, tmp_path / "sam_hq_vit_b.pth")
    ours = load_model(tmp_path / "sam_hq_vit_b.pth", backend="reference")
    assert len(ours.state_dict()) == 339
    assert sum(p.numel() for p in ours.parameters()) == 94_806_576
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(12))
    enc_off = official.image_encoder(x)
    enc_our = run_image_encoder(ours.image_encoder, x)
    assert_logits_close(enc_our[0], enc_off[0], "vit_b 1024 image embedding")
    p = (torch.tensor([[[400.0, 650.0]]]), torch.ones(1, 1), None, None)
    m_off, iou_off = _official_decode(official, enc_off, p, True, False)
    m_our, iou_our = _our_decode(ours, enc_our, p, True, False)
    assert_logits_close(m_our, m_off, "vit_b 1024 one point vs official")
    assert_iou_close(iou_our, iou_off, "vit_b 1024 one point vs official")
    hf = build_hf(cfg, official)
    set_hf_decoder_eps(hf)
    emb_hf, interm_hf = hf.get_image_embeddings(x)
    assert_logits_close(enc_our[0], emb_hf, "vit_b 1024 image embedding vs transformers")
    pts = torch.tensor([[[[400.0, 650.0]]]])
    ref = hf(image_embeddings=emb_hf, intermediate_embeddings=interm_hf, input_points=pts)
    ours_out = ours(
        image_embeddings=enc_our[0], intermediate_embeddings=enc_our[1], input_points=pts
    )
    assert_logits_close(ours_out.pred_masks, ref.pred_masks, "vit_b 1024 one point vs transformers")
    assert_iou_close(ours_out.iou_scores, ref.iou_scores, "vit_b 1024 one point vs transformers")
