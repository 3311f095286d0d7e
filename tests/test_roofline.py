"""The roofline model (bench/roofline.py): hand-computed cases, totals against bench/_flops.py,
the join of measured op calls with the model, and the op timer on a small model (CPU)."""

from __future__ import annotations

import pytest
import torch

from bench import roofline as rl
from bench._flops import decoder_flops, vit_encoder_flops
from samhq_fast.config import PRESETS

from _weights import small_config

H200 = rl.CEILINGS["H200"]


def test_gemm_by_hand():
    # (1024 x 512) @ (512 x 256) + bias in bf16: 2*1024*512*256 FLOPs; A, W, out and bias read or
    # written once at 2 bytes: (524288 + 131072 + 262144 + 256) * 2 bytes.
    op = rl.gemm("encoder", "g", "gemm", 1024, 512, 256, "bf16")
    assert op.flops == 268_435_456
    assert op.bytes == 1_835_520
    assert op.sig == "linear 1024x512->256"
    # memory bound on the H200: 1835520 B / 4.3 TB/s = 0.4269 us > 268435456 / 790e12 = 0.3398 us
    assert op.predicted_s(H200) == pytest.approx(1_835_520 / 4.3e12)
    assert op.bound(H200) == "memory"
    # an fp32 residual read and fp32 output: + 1024*256*4 read, output 4 bytes instead of 2
    res = rl.gemm("encoder", "g", "gemm", 1024, 512, 256, "bf16", out_dt="fp32", res_dt="fp32")
    assert res.bytes == 1_835_520 + 1024 * 256 * 4 + 1024 * 256 * 2
    big = rl.gemm("encoder", "g", "gemm", 8192, 8192, 8192, "bf16")
    assert big.bound(H200) == "compute"
    assert big.predicted_s(H200) == pytest.approx(2 * 8192**3 / 790e12)


def test_attention_by_hand():
    # small_config(128): 8x8 grid, hidden 128, 2 heads, window 3 (grid padded to 9x9), global 1.
    cfg = small_config(128, hidden=128, depth=2, heads=2, window=3, global_idx=(1,))
    ops = {o.name: o for o in rl.encoder_ops(cfg, 1, "bf16")}
    g = ops["attention global"]
    # QK^T and PV: 2 * 64 * 64 * 128 each; rel: 2 tables * 2 * 64 queries * 16 rows (2*8-1 -> 16)
    assert g.parts == {"QK^T": 1_048_576, "PV": 1_048_576, "rel q@Rh^T + q@Rw^T": 524_288}
    assert g.flops == 2_621_440
    # bytes: qkv read (64 x 384), out written (64 x 128), two 15 x 64 tables, all bf16
    assert g.bytes == (64 * 384 + 64 * 128 + 2 * 15 * 64) * 2
    w = ops["attention window"]
    # 81 padded tokens, 9 keys per window; rel over 2*3-1 = 5 -> 8 rows
    assert w.parts == {"QK^T": 186_624, "PV": 186_624, "rel q@Rh^T + q@Rw^T": 331_776}
    assert w.sig == "rel_pos_attention 1x8x8x384 heads 2 window 3"


@pytest.mark.parametrize("preset", ["vit_b", "vit_l", "vit_h"])
def test_official_totals_equal_bench_flops(preset):
    cfg = PRESETS[preset]
    ref = vit_encoder_flops(cfg.vision_config)["total"]
    official = sum(o.flops for o in rl.encoder_ops(cfg, 8, "bf16", official=True))
    assert official == pytest.approx(8 * ref, rel=1e-12)
    ours = sum(o.flops for o in rl.encoder_ops(cfg, 8, "bf16"))
    assert 0.9 * official < ours < official  # padding rows skipped, rel tables to a power of 2
    for p in (1, 64):
        dec = sum(o.flops for o in rl.decoder_ops(cfg, p, 2, official=True))
        assert dec == pytest.approx(decoder_flops(cfg, p, 2), rel=1e-12)
        assert sum(o.flops for o in rl.decoder_ops(cfg, p, 2)) < dec


def test_dtypes_and_stream():
    cfg = PRESETS["vit_b"]
    bf = {o.name: o for o in rl.encoder_ops(cfg, 1, "bf16")}
    fp16 = {o.name: o for o in rl.encoder_ops(cfg, 1, "fp16")}
    assert bf["neck conv1 1x1"].dtype == "bf16" and fp16["neck conv1 1x1"].dtype == "fp32"
    # the fp32 stream of fp16 moves more bytes in norms and residual GEMMs, same FLOPs
    assert fp16["norm1"].bytes > bf["norm1"].bytes
    assert fp16["lin2 (+residual)"].flops == bf["lin2 (+residual)"].flops
    bf32 = {o.name: o for o in rl.encoder_ops(cfg, 1, "bf16", stream="fp32")}
    assert bf32["lin2 (+residual)"].bytes > bf["lin2 (+residual)"].bytes
    assert rl.ceilings_for("NVIDIA H200")[0] == "H200"
    assert rl.ceilings_for(None)[0] == rl.DEFAULT_GPU


def _op(name, sig, flops, nbytes, category="gemm", count=1):
    return rl.Op("encoder", name, category, flops, nbytes, "bf16", sig, count)


def test_join_aggregates_by_signature():
    ops = [
        _op("qkv", "linear 8x4->12", 2 * 790e6, 0.0, count=2),  # totals: 2 us
        _op("proj", "linear 8x4->12", 790e6, 0.0),  # same signature: one row with qkv
        _op("norm", "layer_norm 8x4", 0.0, 4.3e6, "layernorm"),  # 1 us
        _op("pos add", None, 0.0, 4.3e6, "elementwise"),  # plain PyTorch: never timed
    ]
    calls = [
        {"part": "encoder", "op": "linear", "sig": "linear 8x4->12", "seconds": 2e-6},
        {"part": "encoder", "op": "linear", "sig": "linear 8x4->12", "seconds": 2e-6},
        {"part": "encoder", "op": "linear", "sig": "linear 8x4->12", "seconds": 2e-6},
        {"part": "encoder", "op": "layer_norm", "sig": "layer_norm 8x4", "seconds": 4e-6},
        {"part": "encoder", "op": "conv2d", "sig": "conv2d 1x1 w 1x1", "seconds": 2e-6},
        {"part": "decoder", "op": "linear", "sig": "linear 8x4->12", "seconds": 9.0},
    ]
    rows = {r["name"]: r for r in rl.join(ops, calls, H200, {"encoder": 20e-6})}
    gemm = rows["qkv / proj"]
    assert gemm["calls"] == 3 and gemm["expected_calls"] == 3
    assert gemm["measured_s"] == pytest.approx(6e-6)
    assert gemm["predicted_s"] == pytest.approx(3e-6)
    assert gemm["pct_of_roofline"] == pytest.approx(50.0)
    assert gemm["share"] == pytest.approx(6 / 20)
    assert rows["norm"]["pct_of_roofline"] == pytest.approx(25.0)
    assert rows["pos add"]["measured_s"] is None and rows["pos add"]["pct_of_roofline"] is None
    assert rows["unmodelled conv2d"]["predicted_s"] is None
    assert rows["unmodelled conv2d"]["measured_s"] == pytest.approx(2e-6)
    dec = [r for r in rows.values() if r["part"] == "decoder"]
    assert len(dec) == 1 and dec[0]["share"] == 1.0  # parts never mix
    cats = {c["category"]: c for c in rl.category_breakdown(list(rows.values()), "encoder", 20e-6)}
    assert cats["gemm"]["share"] == pytest.approx(0.3)
    assert cats["other (not a fused-op call)"]["measured_s"] == pytest.approx(8e-6)
    assert sum(c["share"] for c in cats.values()) == pytest.approx(1.0)


def test_op_timer_joins_every_call_of_a_real_model():
    """Every fused-op call of a small model (torch backend, CPU) has a model row with its
    signature, and the call counts are the model's."""
    from bench._optimer import OpTimer
    from samhq_fast import SamHQModel

    cfg = small_config(128, hidden=128, depth=2, heads=2, window=3, global_idx=(1,))
    torch.manual_seed(0)
    model = SamHQModel(cfg).eval()
    model.set_backend("torch")
    timer = OpTimer(torch.device("cpu"))
    timer.instrument(model)
    with torch.inference_mode():
        (emb, interm, _, _), total = timer.timed_forward(
            lambda: model.image_encoder(torch.randn(1, 3, 128, 128)), "encoder"
        )
        coords = torch.rand(1, 3, 1, 2) * 128
        sparse, dense = model.prompt_encoder(coords, torch.ones(1, 3, 1), None, None)
        pe = model.get_image_wide_positional_embeddings()
        timer.timed_forward(
            lambda: model.mask_decoder(emb, pe, sparse, dense, False, False, [interm[0]]),
            "decoder",
        )
    assert {c["part"] for c in timer.calls} == {"encoder", "decoder"}
    ops = rl.encoder_ops(cfg, 1, "fp32") + rl.decoder_ops(cfg, 3, 2, "fp32")
    rows = rl.join(ops, timer.calls, H200, {"encoder": total})
    assert not [r["name"] for r in rows if r["category"] == "unmodelled"]
    by = {r["name"]: r for r in rows}
    assert by["attention window"]["calls"] == 1 and by["attention global"]["calls"] == 1
    assert by["qkv (window blocks) / qkv (global blocks)"]["calls"] == 2
    assert by["block0 token->image attention"]["calls"] == 1
    assert all(r["calls"] <= r["expected_calls"] for r in rows)
