"""Checkpoint loading: presets, Hugging Face hub ids and directories, official ``.pth`` files.

Our parameter names are the official SAM-HQ ones. HF checkpoints are renamed on load with the
ordered rules below (ANCHORS.md section 2). Loading is strict: any missing, unexpected or
mis-shaped key is an error that names the keys. Pickles are never unpickled beyond
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from samhq_fast.config import PRESETS, SamHQConfig, SamHQMaskDecoderConfig, SamHQPromptEncoderConfig
from samhq_fast.config import SamHQVisionConfig as _VisionConfig

HUB_IDS = {
    "vit_b": "syscv-community/sam-hq-vit-base",
    "vit_l": "syscv-community/sam-hq-vit-large",
    "vit_h": "syscv-community/sam-hq-vit-huge",
}
# Light HQ-SAM has no HF port: the official file from the authors' hub repo.
OFFICIAL_HUB_FILES = {"vit_tiny": ("lkeab/hq-sam", "sam_hq_vit_tiny.pth")}

HF_POS_KEYS = (
    "shared_image_embedding.positional_embedding",
    "prompt_encoder.shared_embedding.positional_embedding",
)
OUR_POS_KEY = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}

# Ordered (pattern, replacement) rules: official name -> transformers name.
_MLP = r"(iou_prediction_head|output_hypernetworks_mlps\.\d+|hf_mlp)"
_OFFICIAL_TO_HF_RULES: list[tuple[str, str]] = [
    (r"^image_encoder\.", "vision_encoder."),
    (r"\.blocks\.", ".layers."),
    (r"\.norm(\d|_final_attn)", r".layer_norm\1"),
    (r"patch_embed\.proj\.", "patch_embed.projection."),
    (r"neck\.0\.", "neck.conv1."),
    (r"neck\.1\.", "neck.layer_norm1."),
    (r"neck\.2\.", "neck.conv2."),
    (r"neck\.3\.", "neck.layer_norm2."),
    (r"mask_downscaling\.0\.", "mask_embed.conv1."),
    (r"mask_downscaling\.1\.", "mask_embed.layer_norm1."),
    (r"mask_downscaling\.3\.", "mask_embed.conv2."),
    (r"mask_downscaling\.4\.", "mask_embed.layer_norm2."),
    (r"mask_downscaling\.6\.", "mask_embed.conv3."),
    (r"point_embeddings\.", "point_embed."),
    (r"pe_layer\.positional_encoding_gaussian_matrix", "shared_embedding.positional_embedding"),
    (r"output_upscaling\.0\.", "upscale_conv1."),
    (r"output_upscaling\.1\.", "upscale_layer_norm."),
    (r"output_upscaling\.3\.", "upscale_conv2."),
    (_MLP + r"\.layers\.0\.", r"\1.proj_in."),
    (_MLP + r"\.layers\.2\.", r"\1.proj_out."),
    (_MLP + r"\.layers\.1\.", r"\1.layers.0."),
    (r"\.hf_token\.", ".hq_token."),
    (r"\.hf_mlp\.", ".hq_mask_mlp."),
    (r"compress_vit_feat\.0\.", "compress_vit_conv1."),
    (r"compress_vit_feat\.1\.", "compress_vit_norm."),
    (r"compress_vit_feat\.3\.", "compress_vit_conv2."),
    (r"embedding_encoder\.0\.", "encoder_conv1."),
    (r"embedding_encoder\.1\.", "encoder_norm."),
    (r"embedding_encoder\.3\.", "encoder_conv2."),
    (r"embedding_maskfeature\.0\.", "mask_conv1."),
    (r"embedding_maskfeature\.1\.", "mask_norm."),
    (r"embedding_maskfeature\.3\.", "mask_conv2."),
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: corrupt, truncated, or not matching the model."""


class CheckpointNotFoundError(FileNotFoundError):
    """No local file and no cached / downloadable hub file."""


# ----------------------------------------------------------------------------- key mapping
def official_to_hf_key(key: str) -> str:
    """Rename one official SAM-HQ state-dict key to transformers' name."""
    for pattern, repl in _OFFICIAL_TO_HF_RULES:
        key = re.sub(pattern, repl, key)
    return key


def hf_to_official(state_dict: dict[str, torch.Tensor], official_keys) -> dict[str, torch.Tensor]:
    """Rename an HF state dict to official names, given the model's official key set.

    Accepts either or both positional-embedding keys (transformers 4.x writes both, 5.x one).
    Keys with no official counterpart are kept as they are so the strict check reports them.
    """
    state_dict = dict(state_dict)
    pos = [state_dict.pop(k) for k in HF_POS_KEYS if k in state_dict]
    if len(pos) == 2 and not torch.equal(pos[0], pos[1]):
        raise CheckpointError(f"the two positional-embedding keys {HF_POS_KEYS} differ")
    inverse = {official_to_hf_key(k): k for k in official_keys if k != OUR_POS_KEY}
    out = {inverse.get(k, k): v for k, v in state_dict.items()}
    if pos:
        out[OUR_POS_KEY] = pos[0]
    return out


def official_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state_dict.items():
        if k == OUR_POS_KEY:
            for hk in HF_POS_KEYS:
                out[hk] = v
        else:
            out[official_to_hf_key(k)] = v
    return out


# ---------------------------------------------------------------------- config inference
def infer_config(state_dict: dict[str, torch.Tensor]) -> SamHQConfig:
    """Read the architecture of an official-layout state dict from its tensor shapes."""
    sd = state_dict
    try:
        dec = _infer_decoder(sd)
        prompt_ch = sd["prompt_encoder.mask_downscaling.3.weight"].shape[0]
        if "image_encoder.patch_embed.proj.weight" not in sd:
            if "image_encoder.patch_embed.seq.0.c.weight" in sd:
                base = PRESETS["vit_tiny"]
                return SamHQConfig(
                    base.vision_config,
                    SamHQPromptEncoderConfig(mask_input_channels=prompt_ch),
                    SamHQMaskDecoderConfig(
                        **{**dec, "vit_dim": base.vision_config.intermediate_dim}
                    ),
                )
            raise KeyError("image_encoder.patch_embed.proj.weight")
        patch = sd["image_encoder.patch_embed.proj.weight"]
        hidden, in_ch, p = patch.shape[0], patch.shape[1], patch.shape[2]
        depth = 1 + max(
            int(m.group(1)) for k in sd if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))
        )
        pos = sd.get("image_encoder.pos_embed")
        mlp = sd["image_encoder.blocks.0.mlp.lin1.weight"].shape[0]
        rel = [sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape for i in range(depth)]
        head_dim = rel[0][1]
        sizes = [(n + 1) // 2 for n, _ in rel]
        grid = pos.shape[1] if pos is not None else max(sizes)
        global_idx = tuple(i for i, s in enumerate(sizes) if s == grid)
        windows = {s for s in sizes if s != grid}
        if len(windows) > 1:
            raise CheckpointError(f"windowed layers disagree on the window size: {sorted(windows)}")
        vision = _VisionConfig(
            hidden_size=hidden,
            output_channels=sd["image_encoder.neck.0.weight"].shape[0],
            num_hidden_layers=depth,
            num_attention_heads=hidden // head_dim,
            num_channels=in_ch,
            image_size=grid * p,
            patch_size=p,
            qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in sd,
            use_abs_pos=pos is not None,
            window_size=windows.pop() if windows else 14,
            global_attn_indexes=global_idx,
            num_pos_feats=sd[OUR_POS_KEY].shape[1],
            mlp_dim=None if mlp == 4 * hidden else mlp,
        )
    except KeyError as e:
        raise CheckpointError(
            f"not a SAM-HQ state dict: key {e.args[0]!r} is missing (a plain SAM checkpoint "
            "has no HQ decoder)"
        ) from None
    prompt = SamHQPromptEncoderConfig(
        hidden_size=vision.output_channels,
        image_size=vision.image_size,
        patch_size=p,
        mask_input_channels=prompt_ch,
    )
    return SamHQConfig(vision, prompt, SamHQMaskDecoderConfig(**dec))


def _infer_decoder(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    def count(prefix: str) -> int:
        idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
        return len(idx)

    return dict(
        hidden_size=sd["mask_decoder.iou_token.weight"].shape[1],
        mlp_dim=sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
        num_hidden_layers=count("mask_decoder.transformer.layers."),
        num_multimask_outputs=sd["mask_decoder.mask_tokens.weight"].shape[0] - 1,
        iou_head_depth=count("mask_decoder.iou_prediction_head.layers."),
        iou_head_hidden_dim=sd["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
        vit_dim=sd["mask_decoder.compress_vit_feat.0.weight"].shape[0],
        attention_downsample_rate=(
            sd["mask_decoder.iou_token.weight"].shape[1]
            // sd[
                "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight"
            ].shape[0]
        ),
    )


# ------------------------------------------------------------------------------ file I/O
def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth`` / ``.pt`` / ``.bin`` (``weights_only=True``) or ``.safetensors``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint file {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint file {str(path)!r} is empty")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(
                f"{str(path)!r} is not a readable safetensors file (truncated or corrupt?): {e}"
            ) from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(
            f"{str(path)!r} is not a readable PyTorch checkpoint (truncated, corrupt, or not a "
            f"plain state dict of tensors; only weights_only=True loading is allowed): {e}"
        ) from None
    except Exception as e:  # pickle.UnpicklingError etc.
        raise CheckpointError(f"{str(path)!r} could not be loaded safely: {e}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict) and len(obj) <= 3:
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{str(path)!r} does not hold a state dict of tensors")
    return obj


def load_state_dict_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict`` that fails with every missing / unexpected / mis-shaped key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict)
        if state_dict[k].shape != own[k].shape
    )
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if items:
            shown = ", ".join(items[:12]) + (
                f", ... ({len(items)} in all)" if len(items) > 12 else ""
            )
            problems.append(f"{label} keys: {shown}")
    if problems:
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in (torch.float32, torch.bfloat16, torch.float16):
            return dtype
    elif dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype must be 'fp32', 'bf16', 'fp16' or a float torch dtype, got {dtype!r}")


# ------------------------------------------------------------------------------ sources
def _hub_download(repo_id: str, filename: str, cache_dir: str | None) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename, cache_dir=cache_dir)
    except Exception as e:
        raise CheckpointNotFoundError(
            f"could not get {filename!r} of {repo_id!r} from the Hugging Face hub or its cache "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Offline, pass a "
            "local checkpoint instead: load_model('/path/to/sam_hq_vit_b.pth') (official file) "
            "or load_model('/path/to/hf_dir') (config.json + model.safetensors)"
        ) from None


def _load_hf_dir(directory: Path) -> tuple[SamHQConfig, dict[str, torch.Tensor]]:
    cfg_path = directory / "config.json"
    weights = directory / "model.safetensors"
    if not cfg_path.is_file():
        raise CheckpointNotFoundError(f"{str(directory)!r} has no config.json")
    if not weights.is_file():
        bins = sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin"))
        if not bins:
            raise CheckpointNotFoundError(f"{str(directory)!r} has no model.safetensors")
        weights = bins[0]
    return SamHQConfig.from_json_file(cfg_path), read_state_dict(weights)


def _is_hf_layout(state_dict: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith(("vision_encoder.", "shared_image_embedding.")) for k in state_dict)


def load_model(
    name_or_path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    backend: str = "auto",
    config: SamHQConfig | None = None,
    cache_dir: str | None = None,
):
    """Load SAM-HQ weights into a :class:`samhq_fast.SamHQModel` in eval mode.

    Arguments:
      name_or_path: a preset (``"vit_b"``, ``"vit_l"``, ``"vit_h"``, ``"vit_tiny"``), a hub id
        (``"syscv-community/sam-hq-vit-base"``; downloaded through huggingface_hub and its cache,
        ``HF_HUB_OFFLINE=1`` honoured), a local HF directory (``config.json`` +
        ``model.safetensors``), or an official ``.pth`` file of any size (architecture read from
        the tensor shapes).
      device, dtype: where and in which precision (``"fp32"``, ``"bf16"``, ``"fp16"``) to run.
      backend: ``"auto"``, ``"reference"``, ``"torch"``, ``"triton"`` (``SamHQModel.set_backend``).
      config: override the architecture instead of reading it from the checkpoint.
    """
    from samhq_fast.modeling.sam_hq import SamHQModel

    torch_dtype = parse_dtype(dtype)
    source = str(name_or_path)
    path = Path(source).expanduser()
    if not path.exists() and source in HUB_IDS:
        source = HUB_IDS[source]
    if not path.exists() and source in OFFICIAL_HUB_FILES:
        path = Path(_hub_download(*OFFICIAL_HUB_FILES[source], cache_dir))
    if path.is_dir():
        cfg, sd = _load_hf_dir(path)
    elif path.is_file():
        cfg, sd = None, read_state_dict(path)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.endswith((".pth", ".pt")):
        cfg_file = _hub_download(source, "config.json", cache_dir)
        weights = _hub_download(source, "model.safetensors", cache_dir)
        cfg, sd = SamHQConfig.from_json_file(cfg_file), read_state_dict(weights)
    else:
        raise CheckpointNotFoundError(
            f"{source!r} is neither an existing file or directory, a preset "
            f"({sorted(PRESETS)}), nor a hub id like 'syscv-community/sam-hq-vit-base'"
        )
    if config is not None:
        cfg = config
    if _is_hf_layout(sd):
        if cfg is None:
            raise CheckpointError(
                f"{str(name_or_path)!r} holds transformers-layout weights without a config.json: "
                "pass the directory holding both, or config=SamHQConfig(...)"
            )
        model = SamHQModel(cfg)
        sd = hf_to_official(sd, model.state_dict().keys())
    else:
        cfg = cfg or infer_config(sd)
        model = SamHQModel(cfg)
    load_state_dict_strict(model, sd)
    model.eval().requires_grad_(False)
    model.to(device=device, dtype=torch_dtype)
    model.set_backend(backend)
    return model


def save_hf_directory(model, directory: str | os.PathLike) -> None:
    """Write ``config.json`` and ``model.safetensors`` in transformers' layout."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = {
        k: v.detach().cpu().contiguous().clone()
        for k, v in official_to_hf(model.state_dict()).items()
    }
    save_file(sd, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with open(directory / "config.json", "w", encoding="utf-8") as f:
        json.dump(model.config.to_hf_dict(), f, indent=2)
    size = model.config.vision_config.image_size
    mask = 4 * model.config.vision_config.grid_size  # the mask prompt / low-res mask side
    preprocessor = {
        "image_processor_type": "SamImageProcessor",
        "processor_class": "SamHQProcessor",
        "do_resize": True,
        "size": {"longest_edge": size},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "do_pad": True,
        "pad_size": {"height": size, "width": size},
        "mask_size": {"longest_edge": mask},
        "mask_pad_size": {"height": mask, "width": mask},
        "do_convert_rgb": True,
    }
    with open(directory / "preprocessor_config.json", "w", encoding="utf-8") as f:
        json.dump(preprocessor, f, indent=2)
