"""The benchmark suite's FLOP model, environment helpers and report (no timing here)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import report
from bench._env import device_peak_tflops, device_slug
from bench._flops import (
    decoder_flops,
    decoder_flops_per_image,
    decoder_flops_per_prompt,
    encoder_flops,
)
from bench._timing import error_record, mask_iou, percentile
from samhq_fast.config import PRESETS
from samhq_fast.modeling.tiny_vit import TinyViT

from _weights import build_official, small_config


# ------------------------------------------------------------------------------ FLOP model
@pytest.mark.parametrize(
    "preset,tflop,mlp_share,global_share",
    [("vit_b", 0.97, 0.48, 0.21), ("vit_l", 2.99, 0.55, 0.09), ("vit_h", 5.96, 0.58, 0.06)],
)
def test_encoder_flops_match_anchors_table(preset, tflop, mlp_share, global_share):
    """ANCHORS.md section 5: TFLOP per 1024x1024 image, MLP and global-attention shares."""
    f = encoder_flops(PRESETS[preset].vision_config)
    assert f["total"] / 1e12 == pytest.approx(tflop, rel=0.02)
    assert f["mlp"] / f["total"] == pytest.approx(mlp_share, abs=0.01)
    assert f["attn_global"] / f["total"] == pytest.approx(global_share, abs=0.01)
    assert sum(v for k, v in f.items() if k != "total") == pytest.approx(f["total"])


def test_decoder_flops_match_anchors():
    """~8.5 GFLOP per prompt (4.8 of it embedding_maskfeature), 8-13 GFLOP per image."""
    d = PRESETS["vit_b"].mask_decoder_config
    per = decoder_flops_per_prompt(d, 64, 2)
    assert per["total"] / 1e9 == pytest.approx(8.5, rel=0.02)
    assert per["mask_feature"] / 1e9 == pytest.approx(4.8, rel=0.02)
    for preset in ("vit_b", "vit_l", "vit_h"):
        assert 8 <= decoder_flops_per_image(PRESETS[preset].mask_decoder_config, 64) / 1e9 <= 13
    cfg = PRESETS["vit_b"]
    assert decoder_flops(cfg, 16, 2) == pytest.approx(
        decoder_flops_per_image(d, 64) + 16 * per["total"]
    )


def _counted(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_vit_flops_match_flop_counter_on_official_model():
    """The analytic count is the official computation's (padded windows included)."""
    cfg = small_config(image_size=128, hidden=64, depth=3, heads=2, window=6, global_idx=(1,))
    official = build_official(cfg).requires_grad_(False)
    x = torch.randn(1, 3, 128, 128)
    assert _counted(lambda: official.image_encoder(x)) == pytest.approx(
        encoder_flops(cfg.vision_config)["total"], rel=1e-6
    )


def test_decoder_flops_match_flop_counter_on_official_model():
    cfg = small_config(image_size=128, hidden=64, depth=3, heads=2, window=6, global_idx=(1,))
    official = build_official(cfg).requires_grad_(False)
    emb, interm = official.image_encoder(torch.randn(1, 3, 128, 128))
    pts, labels = torch.rand(3, 1, 2) * 128, torch.ones(3, 1)

    def decode():
        sparse, dense = official.prompt_encoder(points=(pts, labels), boxes=None, masks=None)
        official.mask_decoder(
            image_embeddings=emb,
            image_pe=official.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
            hq_token_only=False,
            interm_embeddings=interm,
        )

    # The prompt encoder's Fourier features (not modelled) are the only difference.
    assert _counted(decode) == pytest.approx(decoder_flops(cfg, 3, 2), rel=1e-3)


def test_tiny_vit_flops_match_flop_counter():
    vc = dataclasses.replace(PRESETS["vit_tiny"].vision_config, image_size=128)
    model = TinyViT(vc).eval().requires_grad_(False)
    x = torch.randn(1, 3, 128, 128)
    assert _counted(lambda: model(x)) == pytest.approx(encoder_flops(vc)["total"], rel=1e-6)


# ------------------------------------------------------------------------ env and metrics
def test_device_peaks_and_slugs():
    assert device_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert device_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert device_peak_tflops("NVIDIA H200", "fp16") == 989.0
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32", tf32=True) == 156.0
    assert device_peak_tflops("AMD EPYC (family 26 model 2), 2 CPUs", "fp32") is None
    assert device_slug("AMD EPYC (family 26 model 2), 2 CPUs") == "cpu-amd-epyc-2c"
    assert device_slug("Intel(R) Xeon(R) Platinum 8480+, 16 CPUs") == (
        "cpu-intel-xeon-platinum-8480-16c"
    )
    assert device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_mask_iou_and_errors():
    a = torch.tensor([[[1.0, -1.0], [1.0, -1.0]], [[-1.0, -1.0], [-1.0, -1.0]]])
    b = torch.tensor([[[1.0, 1.0], [1.0, -1.0]], [[-1.0, -1.0], [-1.0, -1.0]]])
    assert mask_iou(a, a) == 1.0
    assert mask_iou(a, b) == pytest.approx(2 / 3)  # worst item; the empty pair counts as 1
    assert mask_iou(a > 0, b > 0) == pytest.approx(2 / 3)
    rec = error_record(a, b, a, b, "x")
    assert rec["max_abs_err"] == 2.0 and rec["ref_scale"] == 1.0 and rec["rel_err"] == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 20) == pytest.approx(1.8)


# --------------------------------------------------------------------------------- report
ENV = {
    "device": "AMD EPYC (family 26 model 2), 2 CPUs",
    "device_type": "cpu",
    "device_slug": "cpu-amd-epyc-2c",
    "commit": "abc1234-dirty",
    "torch_threads": 2,
    "torch_version": "2.13.0+cpu",
    "transformers_version": "4.53.3",
    "segment_anything_hq_version": "0.3",
}


def _bench(name: str, median_ms: float, **extra) -> dict:
    data = [median_ms / 1e3 * f for f in (0.9, 1.0, 1.1)]
    info = {
        **ENV,
        "median_ms": median_ms,
        "p20_ms": median_ms * 0.94,
        "p80_ms": median_ms * 1.06,
        "loadavg_start": [1.5, 1.0, 0.5],
        "loadavg_end": [2.5, 1.0, 0.5],
        "cpu_util": 1.9,
        **extra,
    }
    return {
        "group": "g",
        "name": name,
        "fullname": f"bench/x.py::{name}",
        "params": {},
        "param": None,
        "extra_info": info,
        "options": {},
        "stats": {"median": median_ms / 1e3, "data": data, "rounds": 3},
    }


def _enc(impl: str, backend: str, dtype: str, ms: float, err: float, iou: float) -> dict:
    return _bench(
        f"test_encoder[vit_b-b1-{impl}-{backend}-{dtype}]",
        ms,
        section="encoder",
        impl=impl,
        backend=backend,
        dtype=dtype,
        preset="vit_b",
        batch=1,
        images_per_s=1e3 / ms,
        max_abs_err=err,
        rel_err=err / 5,
        mask_iou=iou,
        peak_mem_mb=1234.5,
    )


@pytest.fixture
def raw() -> dict:
    return {
        "machine_info": {},
        "commit_info": {},
        "datetime": "2030-01-02T03:04:05+00:00",
        "version": "5.2.3",
        "benchmarks": [
            _enc("ours", "torch", "fp32", 100.0, 0.0, 1.0),
            _enc("ours", "torch", "bf16", 50.0, 0.25, 0.99),
            _enc("official", "eager", "fp32", 150.0, 2e-6, 1.0),
            _enc("official", "eager", "bf16", 100.0, 0.3, 0.98),
            _enc("hf", "sdpa", "fp32", 120.0, 1e-4, 1.0),
            _bench(
                "test_decoder[vit_b-16points-ours-torch-fp32]",
                40.0,
                section="decoder",
                impl="ours",
                backend="torch",
                dtype="fp32",
                preset="vit_b",
                prompts=16,
                prompt_kind="points",
                hq_token_only=False,
                max_abs_err=0.0,
                mask_iou=1.0,
            ),
            _bench(
                "test_decoder[vit_b-16points-hf-sdpa-fp32]",
                60.0,
                section="decoder",
                impl="hf",
                backend="sdpa",
                dtype="fp32",
                preset="vit_b",
                prompts=16,
                prompt_kind="points",
                hq_token_only=False,
                max_abs_err=1e-4,
                mask_iou=1.0,
            ),
        ],
        "samhq_fast": {
            "skipped": [
                {
                    "test": "test_encoder[vit_b-b1-ours-triton-fp32]",
                    "reason": "Triton runs only in the interpreter on CPU",
                }
            ],
            "settings": {"device": "cpu"},
            "session_seconds": 600.0,
        },
    }


def test_report_ratios_and_tables(raw):
    summary = report.summarize(raw)
    texts = {c["text"] for c in summary["comparisons"]}
    assert "samhq_fast torch fp32 vs segment_anything_hq eager fp32: 1.50x" in texts
    assert "samhq_fast torch fp32 vs transformers sdpa fp32: 1.20x" in texts
    assert "samhq_fast torch bf16 vs segment_anything_hq eager bf16: 2.00x" in texts
    assert "samhq_fast torch bf16 vs segment_anything_hq eager fp32: 3.00x" in texts
    assert "samhq_fast torch fp32 vs transformers sdpa fp32: 1.50x" in texts  # decoder
    assert summary["meta"]["loadavg_min"] == 1.5 and summary["meta"]["loadavg_max"] == 2.5
    assert summary["meta"]["commits"] == ["abc1234-dirty"]

    md = report.render_markdown(summary)
    rows = [line for line in md.splitlines() if line.startswith("| vit_b, batch 1 |")]
    assert len(rows) == 5
    ours_fp32 = next(r for r in rows if "samhq_fast | torch | fp32" in r)
    cells = [c.strip() for c in ours_fp32.strip("|").split("|")]
    assert cells[4] == "100 ms"  # median
    assert cells[5] == "94 ms - 106 ms"  # p20 - p80
    assert cells[9] == "1234"  # peak memory
    assert cells[10] == "1.9"  # CPU utilisation
    assert cells[11:14] == ["0", "0", "1.0000"]  # errors of the reference itself
    assert cells[14:] == ["1.50x", "1.20x"]
    official_bf16 = next(r for r in rows if "segment_anything_hq | eager | bf16" in r)
    assert "| 3.0e-01 | 6.0e-02 | 0.9800 |" in official_bf16
    assert "- vit_b, 16 points: samhq_fast torch fp32 vs transformers sdpa fp32: 1.50x" in md
    assert "Triton runs only in the interpreter on CPU" in md
    assert "1-minute load average during the run 1.50 - 2.50 on 2 CPUs" in md
    assert "CPU util per case 1.90 - 1.90 (about the benchmark's own threads" in md
    busy = dict(summary["meta"], loadavg_max=4.2)
    assert report.shared_machine(busy) and not report.shared_machine(summary["meta"])
    assert report.shared_machine(dict(summary["meta"], cpu_util_min=1.0))


def test_report_writes_files_and_readme(raw, tmp_path, monkeypatch):
    raw_path = tmp_path / "raw.json"
    raw_path.write_text(json.dumps(raw))
    out = tmp_path / "results"
    readme = tmp_path / "README.md"
    readme.write_text(
        "# x\n\n## Performance\n\n<!-- perf:start -->\nold\n<!-- perf:end -->\n\nend\n"
    )
    monkeypatch.setattr(report, "README", readme)
    monkeypatch.setattr(report, "REPO_ROOT", tmp_path)
    assert report.main(["--json", str(raw_path), "--out-dir", str(out), "--readme"]) == 0
    md = out / "cpu-amd-epyc-2c-2030-01-02.md"
    assert md.is_file() and (out / "cpu-amd-epyc-2c-2030-01-02.json").is_file()
    assert report.is_summary_file(out / "cpu-amd-epyc-2c-2030-01-02.json")
    assert not report.is_summary_file(raw_path)
    text = readme.read_text()
    assert text.startswith("# x\n\n## Performance\n\n<!-- perf:start -->\n")
    assert text.endswith("<!-- perf:end -->\n\nend\n") and "old" not in text
    assert "**GPU figures are not measured yet.**" in text
    assert "AMD EPYC (family 26 model 2), 2 CPUs" in text and "`abc1234-dirty`" in text
    assert "100 ms (torch); err 0, IoU 1" in text  # ours, encoder fp32
    assert "150 ms (ours 1.50x); err 2.0e-06, IoU 1.0000" in text  # official, encoder fp32
    assert "python -m bench.report --json bench/results/raw.json --readme" in text
    assert "The whole `pytest bench/` run took 10.0 min." in text
    # --readme alone regenerates the same section from the stored results.
    before = readme.read_text()
    assert report.main(["--readme", "--out-dir", str(out)]) == 0
    assert readme.read_text() == before


def test_report_falls_back_to_pytest_benchmark_stats():
    raw = {
        "datetime": "2030-01-02T00:00:00",
        "benchmarks": [
            {
                "name": "test_attention[windowed-vit_b-sdpa]",
                "extra_info": {"impl": "sdpa"},
                "stats": {"median": 0.002, "q1": 0.001, "q3": 0.003, "rounds": 5},
            }
        ],
    }
    (rec,) = report.records_from_raw(raw)
    assert rec["median_ms"] == pytest.approx(2.0)
    assert rec["section"] == "attention"
    assert (rec["p25_ms"], rec["p75_ms"]) == (pytest.approx(1.0), pytest.approx(3.0))
