"""HF ``config.json`` fields read with transformers' meaning (issue 16).

transformers' ``mask_decoder_config.layer_norm_eps`` is the epsilon of the two-way transformer's
LayerNorms; its final-attention LayerNorm keeps 1e-5 and the upscaling / HQ LayerNorm2d layers
1e-6, whatever the config says. The hub default (1e-6) is read as the official 1e-5.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from samhq_fast import SamHQModel, load_model
from samhq_fast.config import SamHQConfig
from samhq_fast.modeling.common import LayerNorm2d

from _compare import assert_iou_close
from _weights import build_official, perturb_, small_config

# Tighter than _compare.LOGIT_RTOL (1e-4): a wrong epsilon in the decoder's LayerNorm2d layers
# (1e-5 instead of 1e-6) moves this model's logits by 3.5e-5 of their scale; with the right
# epsilons ours and transformers 4.53.3 agree to 1.5e-6.
RTOL = 1e-5


def _close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, what
    scale = ref.abs().max().item()
    diff = (ours.float() - ref.float()).abs().max().item()
    print(f"[parity] {what}: max abs diff {diff:.3g} (oracle scale {scale:.3g})")
    assert 0 < scale and diff <= RTOL * scale, f"{what}: {diff:.3g} > {RTOL} x {scale:.3g}"


def _hf_dict(eps: float | None) -> dict:
    d = small_config().to_hf_dict()
    if eps is None:
        d["mask_decoder_config"].pop("layer_norm_eps")
    else:
        d["mask_decoder_config"]["layer_norm_eps"] = eps
    return d


def _decoder_eps(model: SamHQModel) -> tuple[set[float], set[float], set[float]]:
    """(two-way block LayerNorm eps, final-attention LayerNorm eps, decoder LayerNorm2d eps)."""
    t = model.mask_decoder.transformer
    blocks = {m.eps for blk in t.layers for m in blk.modules() if isinstance(m, nn.LayerNorm)}
    ln2d = {m.eps for m in model.mask_decoder.modules() if isinstance(m, LayerNorm2d)}
    return blocks, {t.norm_final_attn.eps}, ln2d


@pytest.mark.parametrize(
    "hf_eps,blocks",
    [(None, 1e-5), (1e-6, 1e-5), (1e-5, 1e-5), (1e-3, 1e-3)],
    ids=["absent", "hub-default", "official", "custom"],
)
def test_decoder_layer_norm_eps_has_transformers_meaning(hf_eps, blocks):
    cfg = SamHQConfig.from_hf_dict(_hf_dict(hf_eps))
    assert cfg.mask_decoder_config.transformer_layer_norm_eps == blocks
    model = SamHQModel(cfg)
    assert _decoder_eps(model) == ({blocks}, {1e-5}, {1e-6})
    # the prompt encoder and the encoder keep their own fields
    assert {m.eps for m in model.prompt_encoder.modules() if isinstance(m, LayerNorm2d)} == {1e-6}


def test_to_hf_dict_writes_the_two_way_epsilon():
    cfg = small_config()
    d = cfg.to_hf_dict()
    assert d["mask_decoder_config"]["layer_norm_eps"] == 1e-5  # transformers then builds 1e-5
    assert "transformer_layer_norm_eps" not in d["mask_decoder_config"]
    assert SamHQConfig.from_hf_dict(json.loads(json.dumps(d))) == cfg.replace(
        prompt_encoder_config=SamHQConfig.from_hf_dict(d).prompt_encoder_config
    )


@pytest.mark.parametrize(
    "section,key,value,match",
    [
        ("vision_config", "hidden_act", "relu", "vision_config.hidden_act"),
        ("vision_config", "hidden_act", "gelu_new", "vision_config.hidden_act"),
        ("prompt_encoder_config", "hidden_act", "relu", "prompt_encoder_config.hidden_act"),
        ("mask_decoder_config", "hidden_act", "gelu", "mask_decoder_config.hidden_act"),
        ("vision_config", "use_rel_pos", False, "use_rel_pos"),
        ("mask_decoder_config", "layer_norm_eps", -1.0, "layer_norm_eps"),
        ("vision_config", "layer_norm_eps", "x", "layer_norm_eps"),
    ],
)
def test_fields_we_cannot_honour_are_refused(section, key, value, match):
    """transformers would build these (another activation, no relative positions); we would
    silently build SAM-HQ's, so they are refused."""
    d = _hf_dict(1e-6)
    d[section][key] = value
    with pytest.raises(ValueError, match=match):
        SamHQConfig.from_hf_dict(d)


@pytest.fixture(scope="module")
def official():
    torch.manual_seed(0)
    return perturb_(build_official(small_config()), seed=0)


@pytest.mark.parametrize("eps", [1e-5, 1e-2], ids=["official-1e-5", "custom-1e-2"])
@torch.no_grad()
def test_hf_directory_with_non_default_eps_matches_transformers(official, tmp_path, eps):
    """An HF directory whose ``layer_norm_eps`` is not the hub's: our load gives transformers'
    logits (and, at the official 1e-5, the official model's too)."""
    pytest.importorskip("transformers")
    from transformers import SamHQConfig as HFConfig
    from transformers import SamHQModel as HFModel

    from samhq_fast.weights import official_to_hf

    hf = HFModel(HFConfig(**_hf_dict(eps))).eval()
    missing, unexpected = hf.load_state_dict(official_to_hf(official.state_dict()), strict=False)
    assert not missing and not unexpected
    hf.save_pretrained(tmp_path / "hf")
    hf = HFModel.from_pretrained(tmp_path / "hf").eval()
    ours = load_model(tmp_path / "hf", backend="reference")
    assert _decoder_eps(ours)[0] == {eps}
    s = ours.config.vision_config.image_size
    g = torch.Generator().manual_seed(3)
    inputs = dict(
        pixel_values=torch.randn(1, 3, s, s, generator=g),
        input_points=torch.tensor([[[[0.3 * s, 0.6 * s], [0.7 * s, 0.2 * s]]]]),
        input_labels=torch.tensor([[[1, 0]]]),
        multimask_output=True,
    )
    ref, got = hf(**inputs), ours(**inputs)
    _close(got.pred_masks, ref.pred_masks, f"hf dir eps={eps}")
    assert_iou_close(got.iou_scores, ref.iou_scores, f"hf dir eps={eps}")
    boxes = dict(inputs, input_points=None, input_labels=None)
    boxes["input_boxes"] = torch.tensor([[[0.1 * s, 0.2 * s, 0.7 * s, 0.9 * s]]])
    _close(ours(**boxes).pred_masks, hf(**boxes).pred_masks, f"box eps={eps}")
    if eps == 1e-5:  # the official model's epsilon everywhere: the official logits too
        emb, interm = official.image_encoder(inputs["pixel_values"])
        pts = inputs["input_points"][0]
        sparse, dense = official.prompt_encoder(
            points=(pts, inputs["input_labels"][0]), boxes=None, masks=None
        )
        masks, _ = official.mask_decoder(
            image_embeddings=emb,
            image_pe=official.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
            hq_token_only=False,
            interm_embeddings=interm,
        )
        single = ours(**dict(inputs, multimask_output=False)).pred_masks[0]
        _close(single, masks, "hf dir eps=1e-5 vs official")
