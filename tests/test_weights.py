"""Checkpoint loading: formats, strictness, corrupt files, hub ids through the HF cache."""

from __future__ import annotations

import json

import pytest
import torch

from samhq_fast import (
    BackendUnavailableError,
    CheckpointError,
    CheckpointNotFoundError,
    SamHQModel,
    load_model,
)
from samhq_fast.config import PRESETS, SamHQConfig
from samhq_fast.ops.backend import resolve_backend
from samhq_fast.weights import (
    HF_POS_KEYS,
    infer_config,
    official_to_hf,
    official_to_hf_key,
    save_hf_directory,
)

from _weights import build_official, perturb_, save_official_pth, small_config


@pytest.fixture(scope="module")
def small_pth(tmp_path_factory):
    cfg = small_config()
    official = perturb_(build_official(cfg), seed=3)
    path = tmp_path_factory.mktemp("w") / "small.pth"
    save_official_pth(official, path)
    return cfg, path, official.state_dict()


def test_key_mapping_matches_transformers_names():
    transformers = pytest.importorskip("transformers")
    cfg = small_config()
    hf = transformers.SamHQModel(transformers.SamHQConfig(**cfg.to_hf_dict()))
    ours = SamHQModel(cfg)
    mapped = {official_to_hf_key(k) for k in ours.state_dict()}
    expected = set(hf.state_dict()) - {HF_POS_KEYS[0]}
    assert mapped == expected


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h", "vit_tiny"])
def test_architecture_is_read_from_tensor_shapes(name):
    with torch.device("meta"):
        model = SamHQModel(PRESETS[name])
    assert infer_config(model.state_dict()) == PRESETS[name]


def test_infer_config_any_size(small_pth):
    cfg, path, _ = small_pth
    model = load_model(path)
    assert model.config == cfg
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_official_vit_b_key_and_parameter_count():
    with torch.device("meta"):
        model = SamHQModel(PRESETS["vit_b"])
    assert len(model.state_dict()) == 339
    assert sum(p.numel() for p in model.parameters()) == 94_806_576


def test_missing_unexpected_and_misshaped_keys_are_named(small_pth, tmp_path):
    _, _, sd = small_pth
    bad = dict(sd)
    del bad["mask_decoder.iou_token.weight"]
    bad["mask_decoder.extra.weight"] = torch.zeros(3)
    bad["image_encoder.pos_embed"] = torch.zeros(1, 8, 8, 192)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "bad.pth", config=small_config())
    msg = str(e.value)
    assert "missing keys: mask_decoder.iou_token.weight" in msg
    assert "unexpected keys: mask_decoder.extra.weight" in msg
    assert "mis-shaped keys: image_encoder.pos_embed" in msg


def test_plain_sam_checkpoint_is_rejected(small_pth, tmp_path):
    _, _, sd = small_pth
    sam = {k: v for k, v in sd.items() if "compress_vit" not in k and "hf_" not in k}
    torch.save(sam, tmp_path / "sam.pth")
    with pytest.raises(CheckpointError, match="plain SAM checkpoint"):
        load_model(tmp_path / "sam.pth")


def test_truncated_and_corrupt_files(small_pth, tmp_path):
    _, path, _ = small_pth
    data = path.read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(tmp_path / "trunc.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_model(tmp_path / "empty.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(tmp_path / "junk.safetensors")


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickles_with_code_are_refused(tmp_path, capsys):
    torch.save({"x": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "evil.pth")
    assert "this must never run" not in capsys.readouterr().out


def test_missing_file_and_unknown_name():
    with pytest.raises(CheckpointNotFoundError, match="neither an existing file"):
        load_model("/nonexistent/sam_hq_vit_b.pth")
    with pytest.raises(CheckpointNotFoundError, match="preset"):
        load_model("not-a-model")


def test_hf_directory_with_one_or_two_positional_keys(small_pth, tmp_path):
    _, path, _ = small_pth
    model = load_model(path)
    save_hf_directory(model, tmp_path / "both")
    again = load_model(tmp_path / "both")
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    # transformers 5.x writes only one of the two positional-embedding keys.
    from safetensors.torch import load_file, save_file

    for keep in HF_POS_KEYS:
        d = tmp_path / f"only_{keep.split('.')[0]}"
        d.mkdir()
        sd = load_file(str(tmp_path / "both" / "model.safetensors"))
        sd.pop(next(k for k in HF_POS_KEYS if k != keep))
        save_file(sd, str(d / "model.safetensors"))
        (d / "config.json").write_text((tmp_path / "both" / "config.json").read_text())
        one = load_model(d)
        assert torch.equal(
            one.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix,
            model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix,
        )
    sd = load_file(str(tmp_path / "both" / "model.safetensors"))
    sd[HF_POS_KEYS[0]] = sd[HF_POS_KEYS[0]] + 1
    d = tmp_path / "differ"
    d.mkdir()
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text((tmp_path / "both" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="differ"):
        load_model(d)


def test_hf_weights_without_config_are_refused(small_pth, tmp_path):
    from safetensors.torch import save_file

    _, path, sd = small_pth
    save_file(
        {k: v.clone() for k, v in official_to_hf(sd).items()}, str(tmp_path / "w.safetensors")
    )
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path / "w.safetensors")


def _fake_hub_cache(cache, repo_id: str, files: dict[str, bytes]) -> None:
    """The on-disk layout huggingface_hub uses for a cached snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        (snap / name).write_bytes(data)


def test_hub_id_offline_from_cache_and_error_without(small_pth, tmp_path, monkeypatch):
    import huggingface_hub.constants as hfc

    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)
    _, path, _ = small_pth
    model = load_model(path)
    save_hf_directory(model, tmp_path / "hf")
    cache = tmp_path / "cache"
    files = {n: (tmp_path / "hf" / n).read_bytes() for n in ("config.json", "model.safetensors")}
    _fake_hub_cache(cache, "syscv-community/sam-hq-vit-base", files)
    loaded = load_model("syscv-community/sam-hq-vit-base", cache_dir=str(cache))
    assert torch.equal(loaded.mask_decoder.hf_token.weight, model.mask_decoder.hf_token.weight)
    # The preset name resolves to the same hub id.
    assert load_model("vit_b", cache_dir=str(cache)).config == model.config
    with pytest.raises(CheckpointNotFoundError, match="pass a local checkpoint"):
        load_model("syscv-community/sam-hq-vit-large", cache_dir=str(cache))


def test_dtype_and_device_arguments(small_pth):
    _, path, _ = small_pth
    assert load_model(path, dtype="bf16").dtype == torch.bfloat16
    assert load_model(path, dtype=torch.float16).dtype == torch.float16
    with pytest.raises(ValueError, match="dtype must be"):
        load_model(path, dtype="int8")


def test_backend_resolution(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert resolve_backend("torch", "cpu") == ("torch", [])
    backend, reasons = resolve_backend("auto", "cpu")
    assert backend == "torch" and any("CPU" in r for r in reasons)
    with pytest.raises(BackendUnavailableError, match="Triton interpreter is off"):
        resolve_backend("triton", "cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", "cpu")


def test_hf_config_round_trip(tmp_path):
    for name in ("vit_b", "vit_l", "vit_h"):
        cfg = PRESETS[name]
        (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
        assert SamHQConfig.from_json_file(tmp_path / "config.json") == cfg
    with pytest.raises(ValueError, match="model_type"):
        SamHQConfig.from_hf_dict({"model_type": "sam"})
    with pytest.raises(ValueError, match="TinyViT"):
        PRESETS["vit_tiny"].to_hf_dict()


def test_transformers_config_json_is_read(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.SamHQConfig(
        vision_config=dict(
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            global_attn_indexes=[5, 11, 17, 23],
        ),
        mask_decoder_config=dict(vit_dim=1024),
    )
    hf_cfg.save_pretrained(tmp_path)
    assert SamHQConfig.from_json_file(tmp_path / "config.json") == PRESETS["vit_l"]
