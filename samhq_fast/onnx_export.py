"""ONNX export: the image encoder and an HQ mask decoder that is a drop-in for the official
SAM-HQ ONNX model (``segment_anything_hq/utils/onnx.py``, ``SamOnnxModel``).

``export_onnx(model, out_dir)`` writes::

    encoder.onnx   pixel_values (B, 3, S, S) float32, normalised and zero-padded as the processor
                   gives it -> image_embeddings (B, 256, S/16, S/16) float32,
                   interm_embeddings (k, B, S/16, S/16, vit_dim) float32 (the official layout:
                   every global-block output for vit_b/l/h, k = 4; the stage-2 feature for
                   vit_tiny, k = 1). Dynamic batch.
    decoder.onnx   the official interface (float32 in and out; N points, P prompt sets):
                   image_embeddings (1, 256, g, g), interm_embeddings (k, 1, g, g, vit_dim)
                   (only index 0 is used), point_coords (P, N, 2) in the S x S frame,
                   point_labels (P, N) float (1 fg, 0 bg, -1 padding point, 2 / 3 box corners),
                   mask_input (1, 1, 4g, 4g), has_mask_input (1,), orig_im_size (2,) as (H, W)
                   -> masks (P, 1, H, W) logits at the original size, iou_predictions (P, 1),
                   low_res_masks (P, 1, 4g, 4g).
    README.txt     the above, for this export, and how to call it.
    triton/        a Triton Inference Server model repository (config.pbtxt per model).

The export runs the plain-PyTorch reference path of the model (never the Triton kernels) through
``torch.onnx.export(..., dynamo=False)`` (the TorchScript exporter). It needs the ``onnx`` extra:
``pip install "samhq-fast[onnx]"``. Everything is written into a temporary folder beside
``out_dir`` and moved into place only once every file is complete.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from samhq_fast.modeling.sam_hq import SamHQModel, run_image_encoder
from samhq_fast.ops.attention import rel_pos_attention_reference

# The TorchScript exporter (dynamo=False) needs no onnxscript; onnx checks and rewrites the files.
ONNX_PACKAGES = ("onnx", "onnxruntime")
INSTALL_HINT = 'pip install "samhq-fast[onnx]"  (or: pip install onnx onnxruntime)'
DEFAULT_OPSET = 17
MIN_OPSET = 14  # scaled_dot_product_attention (TinyViT), LayerNorm decompositions
ENCODER_INPUTS = ("pixel_values",)
ENCODER_OUTPUTS = ("image_embeddings", "interm_embeddings")
DECODER_INPUTS = (
    "image_embeddings",
    "interm_embeddings",
    "point_coords",
    "point_labels",
    "mask_input",
    "has_mask_input",
    "orig_im_size",
)
DECODER_OUTPUTS = ("masks", "iou_predictions", "low_res_masks")
EXTRA_OUTPUTS = ("masks", "iou_predictions", "stability_scores", "areas", "low_res_masks")
# protobuf cannot hold a model over 2 GiB: beyond this, weights go to one external data file.
EXTERNAL_DATA_BYTES = 1_800_000_000
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class OnnxDependencyError(ImportError):
    """The ``onnx`` extra is not installed; the message says what to install."""


def missing_onnx_packages() -> list[str]:
    """The packages of the ``onnx`` extra that are not importable."""
    return [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]


def require_onnx() -> None:
    """Raise :class:`OnnxDependencyError` naming what to install if the extra is missing."""
    missing = missing_onnx_packages()
    if missing:
        raise OnnxDependencyError(
            f"ONNX export needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'}"
            f" not installed: {INSTALL_HINT}"
        )


# ------------------------------------------------------------------------------ wrappers
class EncoderOnnxModel(nn.Module):
    """``pixel_values (B, 3, S, S)`` -> ``image_embeddings (B, C, g, g)``,
    ``interm_embeddings (k, B, g, g, vit_dim)``; float32 in and out whatever the weights."""

    def __init__(self, model: SamHQModel) -> None:
        super().__init__()
        self.image_encoder = model.image_encoder
        self.dtype = model.dtype

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb, interm, _, _ = run_image_encoder(self.image_encoder, pixel_values.to(self.dtype))
        return emb.float(), torch.stack([e.float() for e in interm])


class DecoderOnnxModel(nn.Module):
    """Prompt encoder + HQ mask decoder + mask post-processing with the official
    ``SamOnnxModel``'s inputs, outputs and options (see the module docstring).

    ``point_labels``: 1 fg, 0 bg, -1 the padding point (its embedding alone, no positional
    encoding), 2 / 3 the top-left / bottom-right box corners; callers append a padding point
    ``(0, 0)`` labelled -1 when there is no box, as for the official model.
    ``has_mask_input`` 1 uses ``mask_input`` (logits from an earlier ``low_res_masks``), 0 the
    learned no-mask embedding. ``orig_im_size`` ``(H, W)``: masks are resized to the S x S frame,
    cropped to the resized image (longest side S, ``floor(x * S / max + 0.5)``) and resized to
    ``(H, W)``.

    Options (as the official ones): ``multimask_output`` returns ONE mask, the best of SAM's three
    multimask outputs by predicted IoU, plus the HQ mask (else SAM mask 0 + HQ mask);
    ``hq_token_only`` the HQ mask alone; ``use_stability_score`` replaces the predicted IoU by the
    stability score of the low-resolution SAM mask (offset 1.0); ``return_extra_metrics`` adds
    ``stability_scores`` and ``areas`` of the upscaled masks (five outputs, as officially).
    """

    def __init__(
        self,
        model: SamHQModel,
        hq_token_only: bool = False,
        multimask_output: bool = False,
        use_stability_score: bool = False,
        return_extra_metrics: bool = False,
    ) -> None:
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        self.img_size = model.config.vision_config.image_size
        self.dtype = model.dtype
        self.mask_threshold = float(model.mask_threshold)
        self.hq_token_only = hq_token_only
        self.multimask_output = multimask_output
        self.use_stability_score = use_stability_score
        self.return_extra_metrics = return_extra_metrics
        self.stability_score_offset = 1.0

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pe = self.prompt_encoder
        emb = pe.pe_layer._pe_encoding((coords + 0.5) / self.img_size)  # (P, N, C) fp32
        lab = labels[..., None]
        emb = emb * (lab != -1) + pe.not_a_point_embed.weight.float() * (lab == -1)
        for i, w in enumerate(pe.point_embeddings):
            emb = emb + w.weight.float() * (lab == i)
        return emb

    def _embed_masks(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor):
        pe = self.prompt_encoder
        down = pe.mask_downscaling(mask_input.to(self.dtype)).float()
        no_mask = pe.no_mask_embed.weight.float().reshape(1, -1, 1, 1)
        return has_mask_input * down + (1 - has_mask_input) * no_mask

    def _stability(self, masks: torch.Tensor) -> torch.Tensor:
        t, o = self.mask_threshold, self.stability_score_offset
        inter = (masks > t + o).sum(-1, dtype=torch.int32).sum(-1, dtype=torch.int32)
        union = (masks > t - o).sum(-1, dtype=torch.int32).sum(-1, dtype=torch.int32)
        return inter.float() / union.float()

    def _postprocess(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        s = self.img_size
        masks = F.interpolate(masks, size=(s, s), mode="bilinear", align_corners=False)
        size = orig_im_size.to(torch.float32)
        pre = torch.floor(size * (s / torch.max(size)) + 0.5).to(torch.int64)
        masks = masks[..., : pre[0], : pre[1]]
        hw = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(hw[0], hw[1]), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def forward(
        self,
        image_embeddings: torch.Tensor,
        interm_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ):
        dec, dt = self.mask_decoder, self.dtype
        sparse = self._embed_points(point_coords, point_labels).to(dt)[None]  # (1, P, N, C)
        dense = self._embed_masks(mask_input, has_mask_input).to(dt)  # (1, C, g, g)
        emb = image_embeddings.to(dt)
        # The early ViT feature is the residual stream (fp32 under fp16 weights).
        hq_features = dec.compute_hq_features(emb, interm_embeddings[0])
        masks, iou = dec.predict_masks(
            emb, self.prompt_encoder.get_dense_pe().to(dt), sparse, dense, hq_features
        )
        masks, iou = masks[0].float(), iou[0].float()  # (P, 5, m, m), (P, 4)
        n = dec.num_mask_tokens
        if self.use_stability_score:
            iou = self._stability(masks[:, :n])
        low, scores = dec.select_masks(
            masks[None], iou[None], self.multimask_output, self.hq_token_only, "official"
        )
        low, scores = low[0], scores[0]
        upscaled = self._postprocess(low, orig_im_size)
        if self.return_extra_metrics:
            stability = self._stability(upscaled)
            areas = (upscaled > self.mask_threshold).sum(-1).sum(-1)
            return upscaled, scores, stability, areas, low
        return upscaled, scores, low


# ------------------------------------------------------------------------------ export
@dataclass
class OnnxExport:
    """What :func:`export_onnx` wrote: paths, the interface and the self-check figures."""

    out_dir: Path
    encoder: Path
    decoder: Path
    readme: Path
    triton_configs: list[Path]
    dtype: str
    opset: int
    options: dict[str, bool]
    interface: dict[str, list[tuple[str, str, list]]]
    # max |onnxruntime - torch| / max |torch| on the trace inputs, per output ("verify").
    verification: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return _interface_text(self)


def _reference_copy(model: SamHQModel, dtype: torch.dtype) -> SamHQModel:
    """A CPU copy of ``model`` on the plain-PyTorch path in ``dtype`` (the model is untouched)."""
    m = copy.deepcopy(model).cpu()
    m._requested_backend = "reference"  # do not re-resolve on .to()
    m = m.to(dtype)
    m.set_backend("reference")
    enc = m.image_encoder
    if hasattr(enc, "set_attention_fn"):
        enc.set_attention_fn(rel_pos_attention_reference)
    return m.eval().requires_grad_(False)


def _encoder_example(model: SamHQModel, batch: int = 2) -> torch.Tensor:
    s = model.config.vision_config.image_size
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, s, s, generator=g)


def decoder_example_inputs(model: SamHQModel, num_points: int = 5) -> dict[str, torch.Tensor]:
    """Inputs like the official export script's dummy inputs (one prompt set of ``num_points``
    points, labels 0-3, a mask prompt, a 1500 x 2250 original image), scaled to the model."""
    v = model.config.vision_config
    g, s = v.grid_size, v.image_size
    c = model.config.mask_decoder_config.hidden_size
    k = 1 if v.backbone == "tiny_vit" else len(v.global_attn_indexes)
    gen = torch.Generator().manual_seed(0)
    m = model.prompt_encoder.mask_input_size
    return {
        "image_embeddings": torch.randn(1, c, g, g, generator=gen),
        "interm_embeddings": torch.randn(k, 1, g, g, v.intermediate_dim, generator=gen),
        "point_coords": torch.randint(0, s, (1, num_points, 2), generator=gen).float(),
        "point_labels": torch.randint(0, 4, (1, num_points), generator=gen).float(),
        "mask_input": torch.randn(1, 1, *m, generator=gen),
        "has_mask_input": torch.tensor([1.0]),
        "orig_im_size": torch.tensor([1500.0, 2250.0]),
    }


def _torch_export(module: nn.Module, args: tuple, path: Path, opset: int, names, dynamic) -> None:
    inputs, outputs = names
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings on static sizes; deprecation notices
        torch.onnx.export(
            module,
            args,
            str(path),
            export_params=True,
            opset_version=opset,
            do_constant_folding=True,
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_axes=dynamic,
            dynamo=False,
        )


def _finalise(path: Path, external_data: bool | None, io: list[tuple[str, str, list]]) -> bool:
    """Declare the inputs' and outputs' shapes exactly (``io``: static sizes as numbers, dynamic
    ones by name; the exporter leaves some as anonymous symbols), check the file with
    ``onnx.checker``, and move the weights into one ``<name>.data`` file when the model is too
    large for protobuf (or ``external_data=True``). Returns whether it did the latter."""
    import onnx

    size = sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file())
    external = size > EXTERNAL_DATA_BYTES if external_data is None else external_data
    proto = onnx.load(str(path), load_external_data=True)
    values = list(proto.graph.input) + list(proto.graph.output)
    if [v.name for v in values] != [n for n, _, _ in io]:
        raise RuntimeError(f"exported names {[v.name for v in values]} != {[n for n, _, _ in io]}")
    for v, (name, _, dims) in zip(values, io, strict=True):
        shape = v.type.tensor_type.shape
        if len(shape.dim) != len(dims):
            raise RuntimeError(f"{name}: exported rank {len(shape.dim)}, expected {len(dims)}")
        for d, want in zip(shape.dim, dims, strict=True):
            if isinstance(want, int):
                d.dim_value = want
            else:
                d.dim_param = want
    if external:
        # The TorchScript exporter may have written one file per tensor: gather them into one.
        before = set(path.parent.iterdir())
        onnx.save_model(
            proto,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )
        for f in before - {path, path.parent / (path.name + ".data")}:
            if f.is_file():
                f.unlink()  # the exporter's per-tensor files
    else:
        onnx.save_model(proto, str(path))
    del proto
    onnx.checker.check_model(str(path))
    return external


def _ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _rel_err(got, ref) -> float:
    ref_t = torch.as_tensor(ref).double()
    got_t = torch.as_tensor(got).double()
    scale = ref_t.abs().max().item() or 1.0
    return (got_t - ref_t).abs().max().item() / scale


def export_onnx(
    model: SamHQModel,
    out_dir: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    hq_token_only: bool = False,
    multimask_output: bool = False,
    dtype: str = "fp32",
    use_stability_score: bool = False,
    return_extra_metrics: bool = False,
    encoder: bool = True,
    verify: bool = True,
    external_data: bool | None = None,
    source: str | None = None,
) -> OnnxExport:
    """Export ``model`` to ``out_dir/encoder.onnx`` and ``out_dir/decoder.onnx``.

    Arguments:
      model: a :class:`SamHQModel` (any device, dtype or backend: a CPU copy on the reference
        path is exported; the model itself is not changed).
      out_dir: folder to write (created; existing files of the same names are replaced).
      opset: ONNX opset (>= 14; default 17).
      hq_token_only, multimask_output, use_stability_score, return_extra_metrics: the decoder's
        options, as the official ``SamOnnxModel``'s (see :class:`DecoderOnnxModel`).
      dtype: ``"fp32"`` or ``"fp16"`` weights and compute; inputs and outputs stay float32 (the
        official interface). Norm statistics, softmax and the encoder's residual stream run in
        fp32 (as in PyTorch), so fp16 does not overflow.
      encoder: also write ``encoder.onnx`` (``False``: the decoder only, as officially).
      verify: run both files in onnxruntime (CPU) on the trace inputs and record the relative
        error against PyTorch in ``OnnxExport.verification`` (raises ``RuntimeError`` beyond
        1e-3 for fp32; fp16 is recorded, or a note says why onnxruntime could not run it).
      external_data: store the weights in ``<name>.onnx.data`` (default: only when over ~1.8 GB,
        protobuf's limit being 2 GiB; vit_h's encoder).
      source: what the model was loaded from, for README.txt.

    Returns:
      :class:`OnnxExport` with the paths, the interface and the verification figures.
    """
    require_onnx()
    if not isinstance(model, SamHQModel):
        raise TypeError(f"model must be a samhq_fast.SamHQModel, got {type(model).__name__}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an integer >= {MIN_OPSET}, got {opset!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path exists and is not a directory: {out}")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise ValueError(f"parent directory does not exist: {parent}")

    m = _reference_copy(model, DTYPES[dtype])
    options = dict(
        hq_token_only=hq_token_only,
        multimask_output=multimask_output,
        use_stability_score=use_stability_score,
        return_extra_metrics=return_extra_metrics,
    )
    dec = DecoderOnnxModel(m, **options).eval()
    dec_args = decoder_example_inputs(m)
    # Trace with 2 prompt sets so nothing specialises on 1.
    dec_args["point_coords"] = dec_args["point_coords"].repeat(2, 1, 1)
    dec_args["point_labels"] = dec_args["point_labels"].repeat(2, 1)
    dec_outputs = EXTRA_OUTPUTS if return_extra_metrics else DECODER_OUTPUTS
    dec_dynamic: dict[str, dict[int, str]] = {
        "interm_embeddings": {0: "num_interm"},
        "point_coords": {0: "num_prompts", 1: "num_points"},
        "point_labels": {0: "num_prompts", 1: "num_points"},
        "masks": {0: "num_prompts", 2: "height", 3: "width"},
        "iou_predictions": {0: "num_prompts"},
        "low_res_masks": {0: "num_prompts"},
    }
    if return_extra_metrics:
        dec_dynamic |= {"stability_scores": {0: "num_prompts"}, "areas": {0: "num_prompts"}}
    enc = EncoderOnnxModel(m).eval()
    pixels = _encoder_example(m)
    iface = _interface(m, encoder, return_extra_metrics)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        notes: list[str] = []
        verification: dict[str, float] = {}
        written: list[Path] = []
        enc_dir, dec_dir = tmp / "enc", tmp / "dec"
        enc_dir.mkdir()
        dec_dir.mkdir()
        with torch.no_grad():
            dec_ref = dec(**dec_args) if verify else None
            _torch_export(
                dec, tuple(dec_args.values()), dec_dir / "decoder.onnx", opset,
                (DECODER_INPUTS, dec_outputs), dec_dynamic,
            )  # fmt: skip
            ext = _finalise(
                dec_dir / "decoder.onnx", external_data,
                iface["decoder_inputs"] + iface["decoder_outputs"],
            )  # fmt: skip
            written += [dec_dir / "decoder.onnx"] + ([dec_dir / "decoder.onnx.data"] if ext else [])
            if encoder:
                enc_ref = enc(pixels) if verify else None
                _torch_export(
                    enc, (pixels,), enc_dir / "encoder.onnx", opset,
                    (ENCODER_INPUTS, ENCODER_OUTPUTS),
                    {"pixel_values": {0: "batch"}, "image_embeddings": {0: "batch"},
                     "interm_embeddings": {1: "batch"}},
                )  # fmt: skip
                ext = _finalise(
                    enc_dir / "encoder.onnx", external_data,
                    iface["encoder_inputs"] + iface["encoder_outputs"],
                )  # fmt: skip
                written += [enc_dir / "encoder.onnx"]
                written += [enc_dir / "encoder.onnx.data"] if ext else []
        if verify:
            checks = [("decoder", dec_dir / "decoder.onnx", dec_args, dec_outputs, dec_ref)]
            if encoder:
                checks.append(
                    ("encoder", enc_dir / "encoder.onnx", {"pixel_values": pixels},
                     ENCODER_OUTPUTS, enc_ref)
                )  # fmt: skip
            for what, path, args, names, ref in checks:
                try:
                    sess = _ort_session(path)
                except Exception as e:  # e.g. no fp16 CPU kernel for an op
                    notes.append(
                        f"{what}: onnxruntime (CPU) cannot load the {dtype} model, not verified: "
                        + f"{type(e).__name__}: {e}".splitlines()[0][:300]
                    )
                    continue
                got = sess.run(None, {k: v.numpy() for k, v in args.items()})
                for name, g_, r in zip(names, got, ref, strict=True):
                    if g_.shape != tuple(r.shape):
                        raise RuntimeError(
                            f"{what} {name}: onnxruntime gives shape {g_.shape}, "
                            f"PyTorch {tuple(r.shape)}"
                        )
                    if name in ("areas",):
                        continue
                    err = _rel_err(g_, r)
                    verification[f"{what}.{name}"] = err
                    if dtype == "fp32" and name != "stability_scores" and not err <= 1e-3:
                        raise RuntimeError(
                            f"{what} {name}: onnxruntime differs from PyTorch by {err:.3g} "
                            "(relative to scale) on the trace inputs"
                        )
        # Move the two models' files to the top of tmp, then write README and Triton configs.
        final: list[Path] = []
        for f in written:
            target = tmp / f.name
            os.replace(f, target)
            final.append(target)
        shutil.rmtree(enc_dir)
        shutil.rmtree(dec_dir)
        result = OnnxExport(
            out_dir=out,
            encoder=out / "encoder.onnx",
            decoder=out / "decoder.onnx",
            readme=out / "README.txt",
            triton_configs=[],
            dtype=dtype,
            opset=opset,
            options=options,
            interface=iface,
            verification=verification,
            notes=notes,
        )
        (tmp / "README.txt").write_text(_readme_text(result, m, source), encoding="utf-8")
        result.triton_configs = [
            out / p.relative_to(tmp) for p in write_triton_repository(result, tmp / "triton", tmp)
        ]
        _move_into(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _move_into(tmp: Path, out: Path) -> None:
    """Move the finished export from ``tmp`` to ``out`` (a rename when ``out`` does not exist)."""
    if not out.exists():
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp made it private
        os.replace(tmp, out)
        return
    for src in sorted(tmp.iterdir()):
        stale = out / (src.name + ".data")  # weights of an earlier export of a larger model
        if src.suffix == ".onnx" and not (tmp / stale.name).exists() and stale.is_file():
            stale.unlink()
        dst = out / src.name
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        elif dst.exists() or dst.is_symlink():
            dst.unlink()
        os.replace(src, dst)
    tmp.rmdir()


# ------------------------------------------------------------------------------ interface
def _interface(model: SamHQModel, encoder: bool, extra: bool) -> dict:
    v = model.config.vision_config
    s, g = v.image_size, v.grid_size
    c = model.config.mask_decoder_config.hidden_size
    k = 1 if v.backbone == "tiny_vit" else len(v.global_attn_indexes)
    m = 4 * g
    f32 = "float32"
    iface: dict[str, list[tuple[str, str, list]]] = {}
    if encoder:
        iface["encoder_inputs"] = [("pixel_values", f32, ["batch", 3, s, s])]
        iface["encoder_outputs"] = [
            ("image_embeddings", f32, ["batch", c, g, g]),
            ("interm_embeddings", f32, [k, "batch", g, g, v.intermediate_dim]),
        ]
    iface["decoder_inputs"] = [
        ("image_embeddings", f32, [1, c, g, g]),
        ("interm_embeddings", f32, ["num_interm", 1, g, g, v.intermediate_dim]),
        ("point_coords", f32, ["num_prompts", "num_points", 2]),
        ("point_labels", f32, ["num_prompts", "num_points"]),
        ("mask_input", f32, [1, 1, m, m]),
        ("has_mask_input", f32, [1]),
        ("orig_im_size", f32, [2]),
    ]
    outs = [
        ("masks", f32, ["num_prompts", 1, "height", "width"]),
        ("iou_predictions", f32, ["num_prompts", 1]),
    ]
    if extra:
        outs += [
            ("stability_scores", f32, ["num_prompts", 1]),
            ("areas", "int64", ["num_prompts", 1]),
        ]
    iface["decoder_outputs"] = outs + [("low_res_masks", f32, ["num_prompts", 1, m, m])]
    return iface


def _shape(dims: list) -> str:
    return "(" + ", ".join(str(d) for d in dims) + ")"


def _interface_text(result: OnnxExport) -> str:
    lines = []
    for key, title in (
        ("encoder_inputs", "encoder.onnx inputs"),
        ("encoder_outputs", "encoder.onnx outputs"),
        ("decoder_inputs", "decoder.onnx inputs"),
        ("decoder_outputs", "decoder.onnx outputs"),
    ):
        if key not in result.interface:
            continue
        lines.append(f"{title}:")
        for name, dt, dims in result.interface[key]:
            lines.append(f"  {name:<18} {dt:<8} {_shape(dims)}")
    return "\n".join(lines)


def _readme_text(result: OnnxExport, model: SamHQModel, source: str | None) -> str:
    v = model.config.vision_config
    s = v.image_size
    opts = ", ".join(f"{k}={v_}" for k, v_ in result.options.items())
    ver = "\n".join(f"  {k}: {e:.2e}" for k, e in result.verification.items()) or "  (not run)"
    notes = "\n".join(f"  {n}" for n in result.notes)
    backbone = "TinyViT (vit_tiny)" if v.backbone == "tiny_vit" else f"ViT {v.hidden_size}"
    k = 1 if v.backbone == "tiny_vit" else len(v.global_attn_indexes)
    m = 4 * v.grid_size
    return f"""SAM-HQ ONNX export (samhq_fast)
================================

model:   {source or "(a SamHQModel instance)"}; {backbone} encoder, input {s} x {s}
dtype:   {result.dtype} weights and compute (inputs and outputs are float32)
opset:   {result.opset}
decoder: {opts}

{_interface_text(result)}

Dimensions named by a word are dynamic. interm_embeddings holds k = {k} intermediate
embeddings; the decoder uses only index 0 and accepts any k >= 1.

How to call
-----------
1. Preprocess (as SamHQProcessor / the official SamPredictor): RGB uint8 image of H x W;
   resize the longest side to {s} (new size int(x * {s} / max(H, W) + 0.5), bilinear), scale
   to [0, 1], normalise with mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225), zero-pad
   bottom/right to {s} x {s}, channels first: pixel_values (B, 3, {s}, {s}) float32.
2. encoder.onnx: pixel_values -> image_embeddings, interm_embeddings (once per image).
3. decoder.onnx, per image (take image i as image_embeddings[i:i+1], interm_embeddings[:, i:i+1]):
   point_coords (P, N, 2): x, y in pixels of the original image times (new_w / W, new_h / H)
   (the resized frame, new_w x new_h as in step 1); point_labels (P, N): 1 foreground,
   0 background, 2 / 3 box top-left / bottom-right corner. Without a box append one
   padding point (0, 0) with label -1.
   mask_input (1, 1, {m}, {m}): zeros and has_mask_input [0], or a previous low_res_masks
   with has_mask_input [1]. orig_im_size [H, W] (float32).
   masks > 0 are the masks at H x W; iou_predictions their predicted IoU.

The decoder is a drop-in for the official SAM-HQ ONNX model (segment_anything_hq.utils.onnx
SamOnnxModel): same names, shapes, dtypes and options; P prompt sets at once is an addition.

onnxruntime (CPU) vs PyTorch on the trace inputs, max abs error / max abs value:
{ver}
{notes}
"""


# ------------------------------------------------------------------------------ Triton
_TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64"}


def model_io(path: Path) -> tuple[list, list]:
    """``(inputs, outputs)`` of an ONNX file as ``(name, dtype, dims)``; a dynamic dimension is
    its name (or ``-1``), as the file declares it."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)

    def io(values) -> list:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or -1)
                    for d in t.shape.dim]  # fmt: skip
            out.append((v.name, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, dims))
        return out

    return io(proto.graph.input), io(proto.graph.output)


def _pbtxt(name: str, inputs: list, outputs: list) -> str:
    def dims(d: list) -> str:
        return "[ " + ", ".join(str(x) if isinstance(x, int) and x >= 0 else "-1" for x in d) + " ]"

    def block(items: list) -> str:
        return ",\n".join(
            f'  {{\n    name: "{n}"\n    data_type: {_TRITON_TYPES[t]}\n    dims: {dims(d)}\n  }}'
            for n, t, d in items
        )

    return (
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
        f"input [\n{block(inputs)}\n]\noutput [\n{block(outputs)}\n]\n"
    )


def write_triton_repository(result: OnnxExport, repo: Path, models_dir: Path) -> list[Path]:
    """A Triton Inference Server model repository: ``repo/samhq_encoder`` and
    ``repo/samhq_decoder``, each ``config.pbtxt`` + ``1/model.onnx`` (a relative symlink to the
    exported file in ``models_dir``; copy it where symlinks are not possible). ``max_batch_size``
    is 0 (the batch is an explicit dimension: ``interm_embeddings`` holds it in dim 1)."""
    written = []
    pairs = [("samhq_decoder", "decoder.onnx")]
    if "encoder_inputs" in result.interface:
        pairs.insert(0, ("samhq_encoder", "encoder.onnx"))
    for name, file in pairs:
        d = repo / name
        (d / "1").mkdir(parents=True)
        cfg = d / "config.pbtxt"
        # Dims exactly as the model declares them (Triton checks the config against the model).
        cfg.write_text(_pbtxt(name, *model_io(models_dir / file)), encoding="utf-8")
        written.append(cfg)
        for f in (file, file + ".data"):
            if (models_dir / f).exists():
                # The weights file keeps its name: the model refers to it by name.
                link = d / "1" / ("model.onnx" if f == file else f)
                try:
                    link.symlink_to(Path("..", "..", "..", f))
                except OSError:
                    shutil.copyfile(models_dir / f, link)
    return written


def run_onnx(session_or_path: Any, **inputs: Any) -> dict[str, Any]:
    """Run an exported model in onnxruntime (CPU) with numpy inputs; outputs by name."""
    sess = session_or_path
    if isinstance(sess, (str, os.PathLike)):
        sess = _ort_session(Path(sess))
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, inputs), strict=True))


__all__ = [
    "DecoderOnnxModel",
    "EncoderOnnxModel",
    "OnnxDependencyError",
    "OnnxExport",
    "decoder_example_inputs",
    "export_onnx",
    "missing_onnx_packages",
    "require_onnx",
    "run_onnx",
    "write_triton_repository",
]
