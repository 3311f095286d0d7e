"""Per-op roofline model of the SAM-HQ encoder and HQ decoder, and its join with measured op times.

A MODEL, not a measurement: every op (one fused-op call of the model, or one plain-PyTorch step)
gets its FLOPs (2 x multiply-accumulates, the :mod:`bench._flops` convention: norms, softmax and
additions are not counted) and the bytes it must move (each input read once and each output
written once, weights included, at the dtype the model stores them in: an ideal kernel), and the
predicted time ``max(FLOPs / peak, bytes / bandwidth)`` against the ceilings of
:data:`CEILINGS`. The encoder is modelled as *our* model runs it: no GEMM touches a window-padding
row, the rel-pos terms are ``q @ R^T`` over ``2S - 1`` table rows padded to a power of two, inside
the attention kernel. ``official=True`` counts the official computation instead (qkv/proj on the
padded grid, the exact ``S`` rel-pos products, no decoder savings): its totals equal
:mod:`bench._flops`' (``tests/test_roofline.py`` checks it).

    python -m bench.roofline report                 # writes bench/results/roofline-h200.md
    python -m bench.roofline measure --out DIR      # per-op CUDA-event times joined with the model

``measure`` (a ``gpu_session`` step) wraps the model's :class:`~samhq_fast.ops.fused.FusedOps`
with per-call timers (:mod:`bench._optimer`: eager, synchronised per op, so it measures op time,
not overlap), aggregates the calls by op and shape and joins them with the model: measured time,
predicted time, % of roofline (predicted / measured) and share of the encoder.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from samhq_fast.config import PRESETS, SamHQConfig

REPO = Path(__file__).resolve().parent.parent
REPORT = REPO / "bench" / "results" / "roofline-h200.md"

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# Ceilings per GPU kind: dense tensor-core TFLOP/s per compute dtype and device-copy bandwidth.
# Keys match torch.cuda.get_device_name() (first key whose words all occur in it, in order).
# ANCHORS.md gives no measured H100 figures, so only the H200 has a row; other GPUs (and the CPU
# of the dry run) are compared with the H200 ceilings, and the reports say so.
CEILINGS: dict[str, dict[str, Any]] = {
    "H200": {
        "tflops": {"bf16": 790.0, "fp16": 790.0, "fp32": 67.0},
        "tb_per_s": 4.3,
        "source": (
            "bf16 790 TFLOP/s dense and 4.3 TB/s device copy: measured on the H200 of this "
            "project (issue 13 / ANCHORS.md section 5); fp16 taken equal to bf16 (same tensor "
            "cores); fp32 67 TFLOP/s: data sheet (non-TF32 FP32, bench/_env.py)"
        ),
    },
}
DEFAULT_GPU = "H200"


def ceilings_for(device_name: str | None) -> tuple[str, dict[str, Any]]:
    """``(kind, ceilings)`` for a device name; unknown devices get the H200's (labelled)."""
    name = (device_name or "").upper()
    for key, c in CEILINGS.items():
        if all(part.upper() in name for part in key.split()):
            return key, c
    return DEFAULT_GPU, CEILINGS[DEFAULT_GPU]


def stream_dtype_for(dtype: str) -> str:
    """The residual stream's dtype: the weights' for bf16, fp32 for fp16 (vit_h overflows it)."""
    return "fp32" if dtype in ("fp32", "fp16") else dtype


# ------------------------------------------------------------------------ op signatures
# One string per fused-op call, from its shapes: the harness computes it from the tensors of a
# call, the model from the dimensions; the join matches on it.
def sig_linear(m: int, k: int, n: int) -> str:
    return f"linear {m}x{k}->{n}"


def sig_layer_norm(rows: int, c: int) -> str:
    return f"layer_norm {rows}x{c}"


def sig_layer_norm_2d(n: int, c: int, h: int, w: int) -> str:
    return f"layer_norm_2d {n}x{c}x{h}x{w}"


def sig_rel_pos_attention(b: int, h: int, w: int, c3: int, heads: int, window: int) -> str:
    return f"rel_pos_attention {b}x{h}x{w}x{c3} heads {heads} window {window}"


def sig_decoder_attention(nq: int, tq: int, nk: int, tk: int, c: int, heads: int) -> str:
    return f"decoder_attention q {nq}x{tq}x{c} kv {nk}x{tk} heads {heads}"


def sig_conv(kind: str, x: Iterable[int], w: Iterable[int], groups: int = 1) -> str:
    xs, ws = "x".join(map(str, x)), "x".join(map(str, w))
    return f"{kind} {xs} w {ws}" + (f" groups {groups}" if groups != 1 else "")


# --------------------------------------------------------------------------------- model
@dataclass
class Op:
    """One op of the model: ``count`` identical calls per forward (FLOPs and bytes are totals)."""

    part: str  # "encoder" or "decoder"
    name: str
    category: str
    flops: float
    bytes: float
    dtype: str  # the dtype of its arithmetic (selects the TFLOP/s ceiling)
    sig: str | None = None  # fused-op call signature; None: a plain PyTorch step
    count: int = 1
    parts: dict[str, float] = field(default_factory=dict)  # FLOP components (attention)

    def predicted_s(self, ceil: dict[str, Any]) -> float:
        peak = ceil["tflops"][self.dtype] * 1e12
        return max(self.flops / peak, self.bytes / (ceil["tb_per_s"] * 1e12))

    def bound(self, ceil: dict[str, Any]) -> str:
        peak = ceil["tflops"][self.dtype] * 1e12
        return (
            "compute" if self.flops / peak >= self.bytes / (ceil["tb_per_s"] * 1e12) else "memory"
        )


def _pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()


def gemm(
    part,
    name,
    category,
    m,
    k,
    n,
    dt,
    *,
    a_dt=None,
    out_dt=None,
    res_dt=None,
    bias=True,
    count=1,
    sig=True,
) -> Op:
    """``(m, k) @ (k, n)`` (+ bias, + residual read): 2mkn FLOPs; A, W, out (and residual)."""
    a_dt, out_dt = a_dt or dt, out_dt or dt
    b = m * k * BYTES[a_dt] + k * n * BYTES[dt] + m * n * BYTES[out_dt]
    b += n * BYTES[dt] if bias else 0
    b += m * n * BYTES[res_dt] if res_dt else 0
    return Op(
        part,
        name,
        category,
        2.0 * m * k * n * count,
        b * count,
        dt,
        sig_linear(m, k, n) if sig else None,
        count,
    )


def norm(part, name, rows, c, in_dt, out_dt, sig=None, count=1, category="layernorm") -> Op:
    b = rows * c * (BYTES[in_dt] + BYTES[out_dt]) + 2 * c * 4
    return Op(part, name, category, 0.0, b * count, out_dt, sig, count)


def conv(
    part,
    name,
    category,
    n,
    c_in,
    c_out,
    k,
    out_hw,
    in_hw,
    dt,
    *,
    groups=1,
    transposed=False,
    sig=None,
    count=1,
    in_dt=None,
    out_dt=None,
) -> Op:
    """Per call over ``n`` images: FLOPs as :mod:`bench._flops`; input, weight, output once."""
    if transposed:  # 2 * input positions * C_in * C_out * k * k
        f = 2.0 * in_hw * c_in * c_out * k * k
    else:
        f = 2.0 * out_hw * c_out * (c_in // groups) * k * k
    w = c_out * (c_in // groups) * k * k
    b = (
        n * in_hw * c_in * BYTES[in_dt or dt]
        + w * BYTES[dt]
        + n * out_hw * c_out * BYTES[out_dt or dt]
    )
    return Op(part, name, category, n * f * count, b * count, dt, sig, count)


def encoder_ops(
    config: SamHQConfig, batch: int, dtype: str, stream: str | None = None, official: bool = False
) -> list[Op]:
    """Ops of the ViT image encoder on ``batch`` images. ``stream``: the residual stream's dtype
    (default :func:`stream_dtype_for`); the neck's 1x1 conv reads it and runs in it."""
    v = config.vision_config
    if v.backbone == "tiny_vit":
        raise ValueError("the roofline model covers the ViT backbones (vit_b, vit_l, vit_h)")
    sd = stream or stream_dtype_for(dtype)
    e = "encoder"
    g, c, m, heads = v.grid_size, v.hidden_size, v.resolved_mlp_dim, v.num_attention_heads
    n = batch * g * g
    d = c // heads
    ops: list[Op] = []
    s = v.image_size
    hw = g * g
    ops.append(
        conv(
            e,
            "patch_embed",
            "patch_embed",
            batch,
            v.num_channels,
            c,
            v.patch_size,
            hw,
            s * s,
            dtype,
            sig=sig_conv(
                "conv2d",
                (batch, v.num_channels, s, s),
                (c, v.num_channels, v.patch_size, v.patch_size),
            ),
        )
    )
    # pos_embed add and the cast to the stream dtype: plain PyTorch
    ops.append(
        Op(
            e,
            "pos_embed add",
            "elementwise",
            0.0,
            n * c * (BYTES[dtype] + BYTES[sd]) + hw * c * 4,
            sd,
        )
    )
    w = v.window_size
    groups: dict[bool, int] = {}
    for i in range(v.num_hidden_layers):
        groups[i in v.global_attn_indexes] = groups.get(i in v.global_attn_indexes, 0) + 1
    for is_global, count in sorted(groups.items()):
        kind = "global" if is_global else "window"
        side = g if is_global else w
        gp = g if is_global else math.ceil(g / w) * w
        tokens = batch * gp * gp  # rows the attention computes (padded windows included)
        seq = side * side if not is_global else g * g
        rows = tokens if official else n  # GEMM rows: ours skip the padded rows
        ops.append(norm(e, "norm1", n, c, sd, dtype, sig_layer_norm(n, c), count))
        ops.append(gemm(e, f"qkv ({kind} blocks)", "gemm qkv", rows, c, 3 * c, dtype, count=count))
        table = side if official else _pow2(2 * side - 1)
        parts = {
            "QK^T": 2.0 * tokens * seq * c,
            "PV": 2.0 * tokens * seq * c,
            "rel q@Rh^T + q@Rw^T": 2 * 2.0 * tokens * table * c,
        }
        b = n * 3 * c * BYTES[dtype] + n * c * BYTES[dtype] + 2 * (2 * side - 1) * d * BYTES[dtype]
        ops.append(
            Op(
                e,
                f"attention {kind}",
                f"attention {kind}",
                sum(parts.values()) * count,
                b * count,
                dtype,
                sig_rel_pos_attention(batch, g, g, 3 * c, heads, 0 if is_global else w),
                count,
                {k: x * count for k, x in parts.items()},
            )
        )
        ops.append(
            gemm(
                e,
                f"proj ({kind} blocks)",
                "gemm proj",
                rows,
                c,
                c,
                dtype,
                out_dt=sd,
                res_dt=sd,
                count=count,
            )
        )
    blocks = v.num_hidden_layers
    ops.append(norm(e, "norm2", n, c, sd, dtype, sig_layer_norm(n, c), blocks))
    ops.append(gemm(e, "lin1 (+GELU)", "gemm mlp", n, c, m, dtype, count=blocks))
    ops.append(
        gemm(e, "lin2 (+residual)", "gemm mlp", n, m, c, dtype, out_dt=sd, res_dt=sd, count=blocks)
    )
    out = v.output_channels
    ops.append(gemm(e, "neck conv1 1x1", "neck", n, c, out, sd, bias=False))
    ops.append(norm(e, "neck LN2d 1", n, out, sd, dtype, sig_layer_norm(n, out), category="neck"))
    ops.append(
        conv(
            e,
            "neck conv2 3x3",
            "neck",
            batch,
            out,
            out,
            3,
            hw,
            hw,
            dtype,
            sig=sig_conv("conv2d", (batch, out, g, g), (out, out, 3, 3)),
        )
    )
    ops.append(
        norm(
            e,
            "neck LN2d 2",
            n,
            out,
            dtype,
            dtype,
            sig_layer_norm_2d(batch, out, g, g),
            category="neck",
        )
    )
    # The same-layer norms merge: one row per (name, sig) is what the join needs.
    return _merge(ops)


def _merge(ops: list[Op]) -> list[Op]:
    merged: dict[tuple, Op] = {}
    for op in ops:
        key = (op.part, op.name, op.sig)
        if key in merged:
            o = merged[key]
            o.flops += op.flops
            o.bytes += op.bytes
            o.count += op.count
            for k, x in op.parts.items():
                o.parts[k] = o.parts.get(k, 0.0) + x
        else:
            merged[key] = op
    return list(merged.values())


def _dec_attention(
    ops,
    name,
    nq,
    tq,
    nk,
    tk,
    c,
    inner,
    heads,
    dt,
    *,
    q_rows,
    kv_rows,
    out_rows,
    res_dt=None,
    q_group=1,
    kv_group=1,
    official=False,
):
    """One decoder ``Attention.fused``: q/k/v projections, the attention op, out projection."""
    d = "decoder"
    ops.append(gemm(d, f"{name} q proj", "decoder proj", q_rows, c, inner, dt))
    ops.append(gemm(d, f"{name} k proj", "decoder proj", kv_rows, c, inner, dt))
    ops.append(gemm(d, f"{name} v proj", "decoder proj", kv_rows, c, inner, dt))
    n_out = nq * q_group
    f = 4.0 * n_out * tq * tk * inner
    b = (nq * tq + 2 * nk * tk + n_out * tq) * inner * BYTES[dt]
    sig = sig_decoder_attention(nq, tq, nk, tk, inner, heads)
    ops.append(Op(d, f"{name} attention", "decoder attention", f, b, dt, sig))
    ops.append(gemm(d, f"{name} out proj", "decoder proj", out_rows, inner, c, dt, res_dt=res_dt))


def _ours_decoder_blocks(ops, dm, P, t, n, c, cross, heads, dt) -> None:
    """Our fused two-way blocks (``TwoWayAttentionBlock.forward_fused``): projections that read
    one input are one GEMM (block 0's self-attention q/k/v, later blocks' q/k, and each block's
    ``keys + key_pe`` for the token->image keys and the image->token queries); LayerNorms and the
    MLP (ReLU, residual fused) are fused-op calls; block 0's image side is projected once per
    image (dense prompt per image)."""
    d = "decoder"
    for layer in range(dm.num_hidden_layers):
        grp = P if layer == 0 else 1
        L, rows, img = f"block{layer}", P * t, P // grp * n
        if layer == 0:
            ops.append(gemm(d, f"{L} self-attn qkv proj", "decoder proj", rows, c, 3 * c, dt))
        else:
            ops.append(gemm(d, f"{L} self-attn qk proj", "decoder proj", rows, c, 2 * c, dt))
            ops.append(gemm(d, f"{L} self-attn v proj", "decoder proj", rows, c, c, dt))
        _attn_op(ops, f"{L} self-attn", P, t, P, t, c, heads, dt)
        res = dt if layer else None
        ops.append(gemm(d, f"{L} self-attn out proj", "decoder proj", rows, c, c, dt, res_dt=res))
        ops.append(norm(d, f"{L} norm1", rows, c, dt, dt, sig_layer_norm(rows, c)))
        ops.append(gemm(d, f"{L} image k + i2t q proj", "decoder proj", img, c, 2 * cross, dt))
        ops.append(gemm(d, f"{L} token->image q proj", "decoder proj", rows, c, cross, dt))
        ops.append(gemm(d, f"{L} token->image v proj", "decoder proj", img, c, cross, dt))
        _attn_op(ops, f"{L} token->image", P, t, P // grp, n, cross, heads, dt)
        ops.append(
            gemm(d, f"{L} token->image out proj", "decoder proj", rows, cross, c, dt, res_dt=dt)
        )
        ops.append(norm(d, f"{L} norm2", rows, c, dt, dt, sig_layer_norm(rows, c)))
        ops.append(gemm(d, f"{L} MLP lin1", "decoder mlp", rows, c, dm.mlp_dim, dt))
        ops.append(gemm(d, f"{L} MLP lin2", "decoder mlp", rows, dm.mlp_dim, c, dt, res_dt=dt))
        ops.append(norm(d, f"{L} norm3", rows, c, dt, dt, sig_layer_norm(rows, c)))
        ops.append(gemm(d, f"{L} image->token k proj", "decoder proj", rows, c, cross, dt))
        ops.append(gemm(d, f"{L} image->token v proj", "decoder proj", rows, c, cross, dt))
        _attn_op(ops, f"{L} image->token", P // grp, n, P, t, cross, heads, dt, q_group=grp)
        ops.append(
            gemm(d, f"{L} image->token out proj", "decoder proj", P * n, cross, c, dt, res_dt=dt)
        )
        ops.append(norm(d, f"{L} norm4", P * n, c, dt, dt, sig_layer_norm(P * n, c)))


def _attn_op(ops, name, nq, tq, nk, tk, inner, heads, dt, q_group=1) -> None:
    """The attention op alone: QK^T and PV FLOPs; q, k, v read and the output written once."""
    n_out = nq * q_group
    f = 4.0 * n_out * tq * tk * inner
    b = (nq * tq + 2 * nk * tk + n_out * tq) * inner * BYTES[dt]
    sig = sig_decoder_attention(nq, tq, nk, tk, inner, heads)
    ops.append(Op("decoder", f"{name} attention", "decoder attention", f, b, dt, sig))


def decoder_ops(
    config: SamHQConfig,
    prompts: int,
    sparse_tokens: int = 2,
    dtype: str = "bf16",
    official: bool = False,
    hq_features: bool = True,
) -> list[Op]:
    """Ops of one decoder call on one image with ``prompts`` prompts (HQ features included when
    ``hq_features``). Ours: the first block projects the image side once per image, and the HQ
    mask is a per-prompt 64->1 conv (ANCHORS.md section 5); ``official``: neither saving."""
    dm, v = config.mask_decoder_config, config.vision_config
    dt, P, dd = dtype, prompts, "decoder"
    c, g = dm.hidden_size, v.grid_size
    n = g * g
    t = 2 + dm.num_multimask_outputs + 1 + sparse_tokens
    cross = c // dm.attention_downsample_rate
    heads = dm.num_attention_heads
    ops: list[Op] = []
    if hq_features:  # once per image: fused ops in the torch path, plain modules in Triton's
        vd, s2, sd = dm.vit_dim, 2 * g, stream_dtype_for(dt)
        for what, cin, cout, side, cdt in (
            ("encoder convT1", c, c // 4, g, dt),
            ("encoder convT2", c // 4, c // 8, s2, dt),
            ("vit convT1", vd, c, g, sd),  # reads the residual stream, runs in its dtype
            ("vit convT2", c, c // 8, s2, dt),
        ):
            sig = sig_conv("conv_transpose2d", (1, cin, side, side), (cin, cout, 2, 2))
            hw_in = side * side
            op = conv(dd, f"hq features: {what}", "hq features", 1, cin, cout, 2, 4 * hw_in,
                      hw_in, cdt, transposed=True, sig=sig)  # fmt: skip
            ops.append(op)
        for what, ch in (("encoder LN2d+GELU", c // 4), ("vit LN2d+GELU", c)):
            sig = sig_layer_norm_2d(1, ch, s2, s2)
            ops.append(norm(dd, f"hq features: {what}", 4 * n, ch, dt, dt, sig, 1, "hq features"))
    if official:
        for layer in range(dm.num_hidden_layers):
            grp = P if (layer == 0 and not official) else 1
            L = f"block{layer}"
            _dec_attention(
                ops,
                f"{L} self-attn",
                P,
                t,
                P,
                t,
                c,
                c,
                heads,
                dt,
                q_rows=P * t,
                kv_rows=P * t,
                out_rows=P * t,
                res_dt=dt if layer else None,
            )
            ops.append(norm(dd, f"{L} norm1", P * t, c, dt, dt))
            _dec_attention(
                ops,
                f"{L} token->image",
                P,
                t,
                P // grp,
                n,
                c,
                cross,
                heads,
                dt,
                q_rows=P * t,
                kv_rows=P // grp * n,
                out_rows=P * t,
                res_dt=dt,
                kv_group=grp,
            )
            ops.append(norm(dd, f"{L} norm2", P * t, c, dt, dt))
            ops.append(
                gemm(dd, f"{L} MLP lin1", "decoder mlp", P * t, c, dm.mlp_dim, dt, sig=False)
            )
            ops.append(
                gemm(dd, f"{L} MLP lin2", "decoder mlp", P * t, dm.mlp_dim, c, dt, sig=False)
            )
            ops.append(norm(dd, f"{L} norm3", P * t, c, dt, dt))
            _dec_attention(
                ops,
                f"{L} image->token",
                P // grp,
                n,
                P,
                t,
                c,
                cross,
                heads,
                dt,
                q_rows=P // grp * n,
                kv_rows=P * t,
                out_rows=P * n,
                res_dt=dt,
                q_group=grp,
            )
            ops.append(norm(dd, f"{L} norm4", P * n, c, dt, dt, sig_layer_norm(P * n, c)))
    else:
        _ours_decoder_blocks(ops, dm, P, t, n, c, cross, heads, dt)
    _dec_attention(
        ops,
        "final token->image",
        P,
        t,
        P,
        n,
        c,
        cross,
        heads,
        dt,
        q_rows=P * t,
        kv_rows=P * n,
        out_rows=P * t,
        res_dt=dt,
    )
    ops.append(norm(dd, "final norm", P * t, c, dt, dt, sig_layer_norm(P * t, c)))
    up = 16 * n
    s4, s16 = 2 * g, 4 * g
    ops.append(
        conv(
            dd,
            "upscale convT1",
            "upscaling",
            P,
            c,
            c // 4,
            2,
            4 * n,
            n,
            dt,
            transposed=True,
            sig=sig_conv("conv_transpose2d", (P, c, g, g), (c, c // 4, 2, 2)),
        )
    )
    ops.append(
        norm(
            dd,
            "upscale LN2d+GELU",
            P * 4 * n,
            c // 4,
            dt,
            dt,
            sig_layer_norm_2d(P, c // 4, s4, s4),
            category="upscaling",
        )
    )
    ops.append(
        conv(
            dd,
            "upscale convT2",
            "upscaling",
            P,
            c // 4,
            c // 8,
            2,
            up,
            4 * n,
            dt,
            transposed=True,
            sig=sig_conv("conv_transpose2d", (P, c // 4, s4, s4), (c // 4, c // 8, 2, 2)),
        )
    )
    ops.append(
        conv(
            dd,
            "maskfeature conv1 3x3",
            "mask feature",
            P,
            c // 8,
            c // 4,
            3,
            up,
            up,
            dt,
            sig=sig_conv("conv2d", (P, c // 8, s16, s16), (c // 4, c // 8, 3, 3)),
        )
    )
    ops.append(
        norm(
            dd,
            "maskfeature LN2d+GELU",
            P * up,
            c // 4,
            dt,
            dt,
            sig_layer_norm_2d(P, c // 4, s16, s16),
            category="mask feature",
        )
    )
    n_sam = dm.num_multimask_outputs + 1
    hyper = 2.0 * (c * c + c * c + c * (c // 8))
    ops.append(
        Op(
            dd,
            "hypernetwork MLPs",
            "heads",
            (n_sam + 1) * P * hyper,
            (n_sam + 1) * (2 * c * c + c * c // 8) * BYTES[dt],
            dt,
        )
    )
    ih = dm.iou_head_hidden_dim
    iou = 2.0 * (c * ih + ih * ih) + 2.0 * ih * (dm.num_multimask_outputs + 1)
    ops.append(Op(dd, "iou head", "heads", P * iou, (c * ih + ih * ih) * BYTES[dt], dt))
    if official:
        ops.append(
            conv(dd, "maskfeature conv2 3x3", "mask feature", P, c // 4, c // 8, 3, up, up, dt)
        )
        ops.append(
            gemm(
                dd,
                "mask products (5 masks)",
                "mask products",
                P * 5,
                c // 8,
                up,
                dt,
                bias=False,
                sig=False,
            )
        )
    else:
        ops.append(
            gemm(
                dd,
                "SAM mask bmm (4 masks)",
                "mask products",
                P * n_sam,
                c // 8,
                up,
                dt,
                bias=False,
                sig=False,
            )
        )
        ops.append(
            conv(
                dd,
                "HQ mask conv 64->1 per prompt",
                "mask products",
                1,
                P * c // 4,
                P,
                3,
                up,
                up,
                dt,
                groups=P,
                sig=sig_conv("conv2d", (1, P * c // 4, s16, s16), (P, c // 4, 3, 3), P),
            )
        )
        ops.append(
            gemm(
                dd, "HQ feature product", "mask products", P, c // 8, up, dt, bias=False, sig=False
            )
        )
        ops.append(
            Op(
                dd,
                "conv2 fold (hyper_hq @ W2)",
                "heads",
                2.0 * P * (c // 8) * (c // 4) * 9,
                (c // 8) * (c // 4) * 9 * 4,
                "fp32",
            )
        )
    return _merge(ops)


def totals(ops: list[Op], ceil: dict[str, Any]) -> dict[str, float]:
    return {
        "flops": sum(o.flops for o in ops),
        "bytes": sum(o.bytes for o in ops),
        "predicted_s": sum(o.predicted_s(ceil) for o in ops),
    }


def by_category(ops: list[Op], ceil: dict[str, Any]) -> list[dict[str, Any]]:
    tot = sum(o.predicted_s(ceil) for o in ops) or 1.0
    cats: dict[str, dict[str, float]] = {}
    for o in ops:
        r = cats.setdefault(o.category, {"flops": 0.0, "bytes": 0.0, "predicted_s": 0.0})
        r["flops"] += o.flops
        r["bytes"] += o.bytes
        r["predicted_s"] += o.predicted_s(ceil)
    return [
        {"category": k, **r, "share": r["predicted_s"] / tot}
        for k, r in sorted(cats.items(), key=lambda kv: -kv[1]["predicted_s"])
    ]


# ---------------------------------------------------------------------------------- join
def join(
    ops: list[Op],
    calls: list[dict[str, Any]],
    ceil: dict[str, Any],
    part_total_s: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Measured calls (``{"op", "sig", "seconds", "part"}``, one per call of one forward) joined
    with the model by ``(part, sig)``: model rows sharing a signature and the calls with it form
    one row. Returns rows with ``measured_s`` (None: not a fused-op call, so not timed),
    ``predicted_s``, ``pct_of_roofline`` (predicted / measured), ``calls`` vs ``expected_calls``
    and ``share`` of the part's measured time (its forward's total when given, else the sum of
    its timed calls). Calls no model op has a signature for come back as ``unmodelled`` rows."""
    rows: dict[tuple, dict[str, Any]] = {}
    for o in ops:
        key = (o.part, o.sig) if o.sig else (o.part, None, o.name)
        r = rows.setdefault(
            key,
            {
                "part": o.part,
                "sig": o.sig,
                "names": [],
                "categories": [],
                "flops": 0.0,
                "bytes": 0.0,
                "predicted_s": 0.0,
                "expected_calls": 0,
                "calls": 0,
                "measured_s": None,
            },
        )
        r["names"].append(o.name)
        if o.category not in r["categories"]:
            r["categories"].append(o.category)
        r["flops"] += o.flops
        r["bytes"] += o.bytes
        r["predicted_s"] += o.predicted_s(ceil)
        r["expected_calls"] += o.count
    for call in calls:
        key = (call["part"], call["sig"])
        r = rows.get(key)
        if r is None:
            r = rows.setdefault(
                key,
                {
                    "part": call["part"],
                    "sig": call["sig"],
                    "names": [f"unmodelled {call['op']}"],
                    "categories": ["unmodelled"],
                    "flops": None,
                    "bytes": None,
                    "predicted_s": None,
                    "expected_calls": 0,
                    "calls": 0,
                    "measured_s": None,
                },
            )
        r["calls"] += 1
        r["measured_s"] = (r["measured_s"] or 0.0) + call["seconds"]
    timed: dict[str, float] = {}
    for r in rows.values():
        if r["measured_s"] is not None:
            timed[r["part"]] = timed.get(r["part"], 0.0) + r["measured_s"]
    denom = dict(timed)
    denom.update(part_total_s or {})
    out = []
    for r in rows.values():
        m, p = r["measured_s"], r["predicted_s"]
        r["pct_of_roofline"] = 100.0 * p / m if m and p is not None else None
        r["share"] = m / denom[r["part"]] if m is not None and denom.get(r["part"]) else None
        r["name"] = " / ".join(r["names"])
        r["category"] = " / ".join(r["categories"])
        out.append(r)
    return out


def category_breakdown(
    rows: list[dict[str, Any]], part: str, total_s: float | None = None
) -> list[dict[str, Any]]:
    """Measured time of a part by op category (and its share); ``total_s`` adds an "other (not
    a fused-op call)" row for the rest of the forward."""
    cats: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["part"] != part or r["measured_s"] is None:
            continue
        c = cats.setdefault(r["category"], {"measured_s": 0.0, "predicted_s": 0.0})
        c["measured_s"] += r["measured_s"]
        c["predicted_s"] += r["predicted_s"] or 0.0
    timed = sum(c["measured_s"] for c in cats.values())
    if total_s is not None and total_s > timed:
        cats["other (not a fused-op call)"] = {"measured_s": total_s - timed, "predicted_s": 0.0}
    denom = total_s if total_s else timed
    return [
        {"category": k, **c, "share": c["measured_s"] / denom if denom else None}
        for k, c in sorted(cats.items(), key=lambda kv: -kv[1]["measured_s"])
    ]


# -------------------------------------------------------------------------------- report
def _us(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.3g} ms"


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 1000 else f"{x:.4g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def ops_table(ops: list[Op], ceil: dict[str, Any]) -> list[str]:
    tot = sum(o.predicted_s(ceil) for o in ops) or 1.0
    rows = []
    for o in ops:
        p = o.predicted_s(ceil)
        detail = ", ".join(f"{k} {v / 1e9:.3g}" for k, v in o.parts.items())
        rows.append(
            [
                o.name,
                o.category,
                str(o.count),
                o.dtype,
                _num(o.flops / 1e9),
                _num(o.bytes / 1e6),
                o.bound(ceil),
                _us(p),
                f"{100 * p / tot:.1f}%",
                detail or "-",
            ]
        )
    return _table(
        [
            "op",
            "category",
            "calls",
            "dtype",
            "GFLOP",
            "MB moved",
            "bound",
            "predicted",
            "% of part",
            "GFLOP by product",
        ],
        rows,
    )


def category_table(ops: list[Op], ceil: dict[str, Any]) -> list[str]:
    rows = [
        [
            c["category"],
            _num(c["flops"] / 1e9),
            _num(c["bytes"] / 1e6),
            _us(c["predicted_s"]),
            f"{100 * c['share']:.1f}%",
        ]
        for c in by_category(ops, ceil)
    ]
    return _table(["category", "GFLOP", "MB moved", "predicted", "% of total"], rows)


def report_markdown(gpu: str = DEFAULT_GPU) -> str:
    ceil = CEILINGS[gpu]
    lines = [
        f"# Roofline model: {gpu}",
        "",
        "**A MODEL, NOT A MEASUREMENT.** Generated by `python -m bench.roofline report` "
        "(bench/roofline.py). Predicted time per op = max(FLOPs / peak, bytes / bandwidth): "
        "FLOPs as bench/_flops.py counts them (matmuls and convolutions), bytes = every input "
        "read once and every output written once, weights included, at the stored dtype (an "
        "ideal kernel: no re-reads, no launch cost). Measured per-op times against this model "
        "come from the `roofline` step of scripts/gpu_session.sh.",
        "",
        f"Ceilings: {ceil['tflops']['bf16']:g} TFLOP/s bf16, {ceil['tb_per_s']:g} TB/s. "
        f"Source: {ceil['source']}.",
        "",
        "Encoder as our model runs it: no GEMM on window-padding rows; attention over the padded "
        "windows; rel-pos terms as q @ R^T over 2S-1 table rows padded to a power of two (32 for "
        "windows, 128 global), in the kernel. Residual stream: bf16 under bf16 weights (fp32 "
        "under fp16); the neck's 1x1 conv runs in the stream dtype.",
        "",
    ]
    for preset in ("vit_b", "vit_h"):
        cfg = PRESETS[preset]
        ops = encoder_ops(cfg, 8, "bf16")
        t = totals(ops, ceil)
        lines += [
            f"## Encoder {preset}, batch 8, bf16",
            "",
            f"Total {t['flops'] / 1e12:.3g} TFLOP, {t['bytes'] / 1e9:.3g} GB moved; predicted "
            f"{t['predicted_s'] * 1e3:.3g} ms = {8 / t['predicted_s']:.0f} img/s at the "
            "roofline (sum of per-op times; no overlap between ops).",
            "",
            "By op category:",
            "",
            *category_table(ops, ceil),
            "",
            "Per op (calls = per forward):",
            "",
            *ops_table(ops, ceil),
            "",
        ]
    cfg = PRESETS["vit_b"]
    for p in (1, 64):
        ops = decoder_ops(cfg, p, 2, "bf16")
        t = totals(ops, ceil)
        lines += [
            f"## HQ decoder, {p} point prompt{'s' if p > 1 else ''}, bf16 (one image)",
            "",
            f"Total {t['flops'] / 1e9:.4g} GFLOP, {t['bytes'] / 1e6:.4g} MB moved; predicted "
            f"{_us(t['predicted_s'])} (HQ features included: "
            f"{_us(sum(o.predicted_s(ceil) for o in ops if o.category == 'hq features'))}). "
            "Launch overheads (several us per kernel) are not modelled and dominate at 1 prompt.",
            "",
            *category_table(ops, ceil),
            "",
            *ops_table(ops, ceil),
            "",
        ]
    return "\n".join(lines)


def measured_markdown(result: dict[str, Any]) -> list[str]:
    """The measured per-op tables of a ``measure`` result (one per case)."""
    lines = []
    for case in result["cases"]:
        clock = case["clock"]
        lines += [
            f"### {case['title']} ({clock})",
            "",
            f"Forward {_us(case.get('forward_s'))} ({case.get('forward_clock', clock)}); timed "
            f"op calls {_us(case['timed_s'])}; roofline of the model's ops "
            f"{_us(case['predicted_s'])}.",
            "",
        ]
        if case.get("breakdown"):
            lines += _table(
                ["category", "measured", "share", "predicted"],
                [
                    [
                        b["category"],
                        _us(b["measured_s"]),
                        "-" if b["share"] is None else f"{100 * b['share']:.1f}%",
                        _us(b["predicted_s"]),
                    ]
                    for b in case["breakdown"]
                ],
            ) + [""]
        rows = sorted(case["rows"], key=lambda r: -(r["measured_s"] or 0))
        lines += _table(
            [
                "op",
                "signature",
                "calls (expected)",
                "measured",
                "predicted",
                "% of roofline",
                "share",
            ],
            [
                [
                    r["name"],
                    r["sig"] or "(plain PyTorch)",
                    f"{r['calls']:g} ({r['expected_calls']})",
                    _us(r["measured_s"]) if r["measured_s"] is not None else "not a fused-op call",
                    _us(r["predicted_s"]),
                    "-" if r["pct_of_roofline"] is None else f"{r['pct_of_roofline']:.1f}%",
                    "-" if r["share"] is None else f"{100 * r['share']:.1f}%",
                ]
                for r in rows
            ],
        ) + [""]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rp = sub.add_parser("report", help="write the model's report (bench/results/roofline-h200.md)")
    rp.add_argument("--out", type=Path, default=REPORT)
    mp = sub.add_parser("measure", help="time every fused-op call and join with the model")
    mp.add_argument("--out", type=Path, required=True)
    mp.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (CPU wall clock)")
    mp.add_argument("--presets", default="vit_b,vit_h")
    mp.add_argument("--batch", type=int, default=8)
    mp.add_argument("--prompts", default="1,64")
    mp.add_argument("--dtype", default="bf16")
    mp.add_argument("--backend", default="triton")
    a = ap.parse_args(argv)
    if a.cmd == "report":
        a.out.write_text(report_markdown())
        print(f"wrote {a.out}")
        return 0
    from bench._optimer import measure_all

    result = measure_all(
        presets=a.presets.split(","),
        batch=a.batch,
        prompts=[int(p) for p in a.prompts.split(",")],
        dtype=a.dtype,
        backend=a.backend,
        dry_run=a.dry_run,
        out=a.out,
    )
    text = write_measured(a.out, result)
    print(text, flush=True)
    return 0


def write_measured(out: Path, result: dict[str, Any]) -> str:
    """``OUT/roofline.json`` and ``OUT/roofline.md`` of a (possibly partial) ``measure`` result;
    written after every case, so a step stopped at its budget keeps what it measured."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "roofline.json").write_text(json.dumps(result, indent=1, default=str))
    head = ["## Per-op times against the roofline", "", result["note"], ""]
    text = "\n".join(head + measured_markdown(result))
    (out / "roofline.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    sys.exit(main())
