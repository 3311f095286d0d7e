"""Frozen configuration dataclasses and named presets.

Field names mirror transformers' ``SamHQVisionConfig`` / ``SamHQPromptEncoderConfig`` /
``SamHQMaskDecoderConfig`` / ``SamHQConfig``, and :meth:`SamHQConfig.from_hf_dict` reads an HF
``config.json`` with transformers' meaning of every field. Extra fields (prefixed ``tiny_`` and
``transformer_layer_norm_eps``) cover what HF does not model: the TinyViT backbone of Light
HQ-SAM and the official decoder's LayerNorm epsilon.

LayerNorm epsilons, as the two peers build them:

* image encoder blocks: ``vision_config.layer_norm_eps`` (1e-6); the neck's LayerNorm2d: 1e-6;
* prompt encoder mask downscaling LayerNorm2d: ``prompt_encoder_config.layer_norm_eps`` (1e-6);
* two-way transformer blocks: the official code (which trained the checkpoints) uses PyTorch's
  1e-5; transformers uses ``mask_decoder_config.layer_norm_eps`` (hub default 1e-6). Ours is
  ``transformer_layer_norm_eps`` (default 1e-5); an HF config's ``layer_norm_eps`` is read into
  it, except the hub default 1e-6, which is read as the official 1e-5. ``to_hf_dict`` writes it
  back as ``layer_norm_eps`` (so transformers then builds the official epsilon);
* the transformer's final-attention LayerNorm: 1e-5 in both peers (fixed);
* decoder upscaling / HQ LayerNorm2d (``output_upscaling``, ``compress_vit_feat``,
  ``embedding_encoder``, ``embedding_maskfeature``): 1e-6 in both peers, whatever the HF config
  says; ours is ``SamHQMaskDecoderConfig.layer_norm_eps`` (default 1e-6), which is NOT HF's field
  of that name and is neither read from nor written to HF configs.

Activations are fixed by the architecture (exact GELU in the encoder and the prompt encoder's mask
path, ReLU in the decoder MLPs); a config asking for another ``hidden_act`` is refused, as is
``use_rel_pos=False`` (transformers would build a different model than ours).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

#: transformers' default ``layer_norm_eps`` of the mask decoder (what the hub configs carry).
HF_DECODER_LAYER_NORM_EPS = 1e-6
#: The official SAM-HQ two-way transformer LayerNorm epsilon (PyTorch's default).
OFFICIAL_TRANSFORMER_LAYER_NORM_EPS = 1e-5


def _check_act(value: str, expected: str, where: str) -> None:
    if value != expected:
        raise ValueError(
            f"{where}.hidden_act must be {expected!r} (SAM-HQ's architecture), got {value!r}"
        )


def _check_eps(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")


@dataclass(frozen=True)
class SamHQVisionConfig:
    hidden_size: int = 768
    output_channels: int = 256
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 1024
    patch_size: int = 16
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    initializer_range: float = 1e-10
    qkv_bias: bool = True
    mlp_ratio: float = 4.0
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    num_pos_feats: int = 128
    mlp_dim: int | None = None
    # "vit" (SAM-HQ vit_b/l/h) or "tiny_vit" (Light HQ-SAM).
    backbone: str = "vit"
    tiny_embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    tiny_depths: tuple[int, ...] = (2, 2, 6, 2)
    tiny_num_heads: tuple[int, ...] = (2, 4, 5, 10)
    tiny_window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    tiny_mbconv_expand_ratio: float = 4.0
    tiny_local_conv_size: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "global_attn_indexes", tuple(self.global_attn_indexes))
        for name in ("tiny_embed_dims", "tiny_depths", "tiny_num_heads", "tiny_window_sizes"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.mlp_dim == int(self.hidden_size * self.mlp_ratio):
            object.__setattr__(self, "mlp_dim", None)  # transformers writes the derived value
        if self.backbone not in ("vit", "tiny_vit"):
            raise ValueError(f"backbone must be 'vit' or 'tiny_vit', got {self.backbone!r}")
        _check_act(self.hidden_act, "gelu", "vision_config")
        _check_eps(self.layer_norm_eps, "vision_config.layer_norm_eps")
        if not self.use_rel_pos:
            raise ValueError(
                "vision_config.use_rel_pos=False is not supported (every SAM-HQ encoder uses "
                "relative positions)"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.backbone == "vit":
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by "
                    f"num_attention_heads {self.num_attention_heads}"
                )
            bad = [i for i in self.global_attn_indexes if not 0 <= i < self.num_hidden_layers]
            if bad:
                raise ValueError(
                    f"global_attn_indexes {bad} out of range for {self.num_hidden_layers} layers"
                )
            if not self.global_attn_indexes:
                raise ValueError("SAM-HQ needs at least one global attention layer")

    @property
    def grid_size(self) -> int:
        """Side of the token grid (64 for 1024-pixel images with 16-pixel patches)."""
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def intermediate_dim(self) -> int:
        """Channels of the early feature fed to the HQ decoder (vit_dim)."""
        return self.tiny_embed_dims[2] if self.backbone == "tiny_vit" else self.hidden_size

    @property
    def resolved_mlp_dim(self) -> int:
        return self.mlp_dim if self.mlp_dim is not None else int(self.hidden_size * self.mlp_ratio)


@dataclass(frozen=True)
class SamHQPromptEncoderConfig:
    hidden_size: int = 256
    image_size: int = 1024
    patch_size: int = 16
    mask_input_channels: int = 16
    num_point_embeddings: int = 4
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        _check_act(self.hidden_act, "gelu", "prompt_encoder_config")
        _check_eps(self.layer_norm_eps, "prompt_encoder_config.layer_norm_eps")

    @property
    def image_embedding_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class SamHQMaskDecoderConfig:
    hidden_size: int = 256
    hidden_act: str = "relu"
    mlp_dim: int = 2048
    num_hidden_layers: int = 2
    num_attention_heads: int = 8
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    # LayerNorm2d epsilon of the upscaling / HQ convolutions (both peers: fixed 1e-6). NOT the
    # HF field of this name (see the module docstring): never read from an HF config.
    layer_norm_eps: float = 1e-6
    vit_dim: int = 768
    # LayerNorm epsilon of the two-way transformer blocks. The official code (which trained the
    # checkpoints) uses PyTorch's default 1e-5; transformers uses its config's layer_norm_eps.
    transformer_layer_norm_eps: float = OFFICIAL_TRANSFORMER_LAYER_NORM_EPS

    def __post_init__(self) -> None:
        _check_act(self.hidden_act, "relu", "mask_decoder_config")
        _check_eps(self.layer_norm_eps, "mask_decoder_config.layer_norm_eps")
        _check_eps(
            self.transformer_layer_norm_eps, "mask_decoder_config.transformer_layer_norm_eps"
        )


@dataclass(frozen=True)
class SamHQConfig:
    vision_config: SamHQVisionConfig = field(default_factory=SamHQVisionConfig)
    prompt_encoder_config: SamHQPromptEncoderConfig = field(
        default_factory=SamHQPromptEncoderConfig
    )
    mask_decoder_config: SamHQMaskDecoderConfig = field(default_factory=SamHQMaskDecoderConfig)
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        for name, cls in (
            ("vision_config", SamHQVisionConfig),
            ("prompt_encoder_config", SamHQPromptEncoderConfig),
            ("mask_decoder_config", SamHQMaskDecoderConfig),
        ):
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, _from_dict(cls, value))
        v, p, d = self.vision_config, self.prompt_encoder_config, self.mask_decoder_config
        if (p.image_size, p.patch_size) != (v.image_size, v.patch_size):
            raise ValueError(
                f"prompt encoder image/patch size {(p.image_size, p.patch_size)} != "
                f"vision {(v.image_size, v.patch_size)}"
            )
        if d.vit_dim != v.intermediate_dim:
            raise ValueError(
                f"mask decoder vit_dim {d.vit_dim} != vision intermediate dim {v.intermediate_dim}"
            )
        if v.num_pos_feats != p.hidden_size // 2:
            raise ValueError(
                f"vision num_pos_feats {v.num_pos_feats} must be half the prompt encoder "
                f"hidden_size {p.hidden_size} (one Gaussian matrix encodes grid and prompts)"
            )
        if v.output_channels != p.hidden_size or p.hidden_size != d.hidden_size:
            raise ValueError(
                "vision output_channels, prompt encoder and mask decoder hidden_size must agree, "
                f"got {v.output_channels}, {p.hidden_size}, {d.hidden_size}"
            )

    def replace(self, **changes: Any) -> SamHQConfig:
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------- HF config.json I/O
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> SamHQConfig:
        """Build from a transformers ``SamHQConfig`` dictionary (``config.json``)."""
        if d.get("model_type") not in (None, "sam_hq"):
            raise ValueError(f"config.json has model_type {d.get('model_type')!r}, not 'sam_hq'")
        vision = _from_dict(SamHQVisionConfig, d.get("vision_config", {}))
        prompt = _from_dict(SamHQPromptEncoderConfig, d.get("prompt_encoder_config", {}))
        dec = dict(d.get("mask_decoder_config", {}))
        # transformers' layer_norm_eps is the two-way transformer's; the LayerNorm2d layers keep
        # 1e-6 (module docstring). The hub default means "the official model": 1e-5.
        hf_eps = dec.pop("layer_norm_eps", HF_DECODER_LAYER_NORM_EPS)
        _check_eps(hf_eps, "mask_decoder_config.layer_norm_eps")
        if "transformer_layer_norm_eps" not in dec:
            dec["transformer_layer_norm_eps"] = (
                OFFICIAL_TRANSFORMER_LAYER_NORM_EPS
                if hf_eps == HF_DECODER_LAYER_NORM_EPS
                else float(hf_eps)
            )
        decoder = _from_dict(SamHQMaskDecoderConfig, dec)
        # HF's prompt encoder config defaults to 1024/16 even for other image sizes; follow vision.
        prompt = dataclasses.replace(
            prompt, image_size=vision.image_size, patch_size=vision.patch_size
        )
        return cls(vision, prompt, decoder, d.get("initializer_range", 0.02))

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers-compatible ``config.json`` dictionary (ViT backbones only)."""
        if self.vision_config.backbone != "vit":
            raise ValueError("transformers has no TinyViT SAM-HQ; vit_tiny has no HF config")
        vision = {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(self.vision_config).items()
            if k != "backbone" and not k.startswith("tiny_")
        }
        decoder = dataclasses.asdict(self.mask_decoder_config)
        decoder["layer_norm_eps"] = decoder.pop("transformer_layer_norm_eps")
        return {
            "model_type": "sam_hq",
            "architectures": ["SamHQModel"],
            "initializer_range": self.initializer_range,
            "vision_config": vision,
            "prompt_encoder_config": dataclasses.asdict(self.prompt_encoder_config),
            "mask_decoder_config": decoder,
        }

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> SamHQConfig:
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf_dict(d)


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names})


def _vit(hidden: int, depth: int, heads: int, global_idx: tuple[int, ...]) -> SamHQConfig:
    return SamHQConfig(
        SamHQVisionConfig(
            hidden_size=hidden,
            num_hidden_layers=depth,
            num_attention_heads=heads,
            global_attn_indexes=global_idx,
        ),
        SamHQPromptEncoderConfig(),
        SamHQMaskDecoderConfig(vit_dim=hidden),
    )


PRESETS: dict[str, SamHQConfig] = {
    "vit_b": _vit(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": _vit(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": _vit(1280, 32, 16, (7, 15, 23, 31)),
    "vit_tiny": SamHQConfig(
        SamHQVisionConfig(backbone="tiny_vit", hidden_size=320, num_attention_heads=10),
        SamHQPromptEncoderConfig(),
        SamHQMaskDecoderConfig(vit_dim=160),
    ),
}


def get_preset(name: str) -> SamHQConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
