"""``scripts/gpu_session.sh --dry-run``: the GPU session's every step, on CPU at tiny shapes, so
that the script cannot break on its first real use (a GPU is lent for minutes at a time)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    pytest.importorskip("triton")
    pytest.importorskip("pytest_benchmark")
    out = tmp_path_factory.mktemp("gpu_session") / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHON"] = sys.executable
    proc = subprocess.run(
        ["bash", "scripts/gpu_session.sh", "--dry-run", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    print(proc.stdout[-4000:], proc.stderr[-2000:])
    return proc, out


def test_dry_run_runs_every_step(session):
    proc, out = session
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    steps = {s["step"]: s["status"] for s in result["steps"]}
    assert set(steps) == {
        "wheels", "gpu-tests", "bench-encoder", "bench-decoder", "bench-amg", "roofline",
        "trained-iou",
    }  # fmt: skip
    assert all(v == "ok" for k, v in steps.items() if k != "wheels"), steps
    assert result["env"]["versions"]["torch"]
    assert result["gpu_tests"]["tests"] > 0  # collected (and skipped: no CUDA here)


def test_dry_run_measures_the_headline_cases(session):
    _, out = session
    result = json.loads((out / "results.json").read_text())
    recs = result["bench_summary"]["records"]
    enc = {(r["preset"], r["impl"], r["backend"]) for r in recs if r["section"] == "encoder"}
    for preset in ("vit_b", "vit_h"):
        assert {(preset, "ours", "torch"), (preset, "ours", "triton")} <= enc, enc
        assert {(preset, "official", "eager"), (preset, "hf", "sdpa")} <= enc, enc
    dec = {r["prompts"] for r in recs if r["section"] == "decoder" and r["impl"] == "ours"}
    assert dec == {1, 4}  # the dry run's counts (64 on a GPU)
    assert any(r["section"] == "amg" for r in recs)
    # Error beside every figure; the raw JSON is what bench.report files under bench/results.
    assert all(r.get("max_abs_err") is not None for r in recs if r["section"] != "amg")
    raw = json.loads((out / "bench.json").read_text())
    assert len(raw["benchmarks"]) == len(recs)
    text = (out / "summary.md").read_text()
    assert "## Headline figures" in text and "dry-run" in text


def test_dry_run_reports_every_target_and_the_roofline(session):
    _, out = session
    result = json.loads((out / "results.json").read_text())
    targets = result["targets"]
    assert len(targets) == 9  # every target of issue 13, one row each
    # The dry run measures each one (CPU stand-ins, never "met"), the trained-model IoU included.
    assert {t["status"] for t in targets} == {"dry run"}, targets
    assert result["trained_iou"]["iou_vs_reference_mean"] >= 0.9
    # Per-op times joined with the model: every fused-op call has a model row.
    cases = result["roofline"]["cases"]
    assert [c["part"] for c in cases] == ["encoder", "decoder"]
    for case in cases:
        assert not [r for r in case["rows"] if r["category"] == "unmodelled"]
        assert any(r["measured_s"] and r["predicted_s"] for r in case["rows"])
        assert case["breakdown"] and case["clock"] == "CPU wall clock"
    gc = result["gemm_choice"]
    assert gc["status"].startswith("absent") or len(gc["files"]) > 0, gc
    text = (out / "summary.md").read_text()
    assert "## Issue 13 targets" in text and "## Per-op times against the roofline" in text
    assert "## GEMM choice cache" in text


def _rec(**kw):
    base = {"impl": "ours", "backend": "triton", "dtype": "bf16", "device_type": "cuda"}
    return {**base, **kw}


def test_targets_table_met_not_met_and_missing(tmp_path):
    """The targets logic on made-up records: a met, a not met with its gap, a missing row with
    the failed step as the reason, a peer skip as the reason; no figure is invented."""
    from bench.gpu_session import gemm_choices, targets, targets_table

    recs = [
        _rec(section="encoder", preset="vit_b", batch=8, median_ms=16.0, images_per_s=500.0,
             peak_mem_mb=900.0),
        _rec(section="encoder", preset="vit_b", batch=8, backend="torch", median_ms=32.0,
             images_per_s=250.0),
        _rec(section="encoder", preset="vit_b", batch=8, impl="hf", backend="sdpa",
             median_ms=32.0, images_per_s=250.0),
        _rec(section="decoder", prompts=1, prompt_kind="points", median_ms=0.8),
    ]  # fmt: skip
    steps = [{"step": "bench-encoder", "status": "ok"}, {"step": "bench-decoder", "status": "ok"},
             {"step": "bench-amg", "status": "stopped at its 55 s budget"}]  # fmt: skip
    skipped = [{"test": "test_encoder[vit_h-b8-hf-sdpa-bf16]", "reason": "transformers missing"}]
    result = {"steps": steps, "bench_summary": {"records": recs, "skipped": skipped}}
    rows = {t["target"]: t for t in targets(result, dry_run=False)}
    assert len(rows) == 9
    vb = rows["vit_b encoder batch 8 throughput"]
    assert vb["status"] == "met" and vb["measured"] == "500.0 img/s"  # the fastest ours row
    ratio = rows["vit_b batch 8: ours vs transformers SamHQModel (SDPA, bf16)"]
    assert ratio["status"] == "not met" and ratio["measured"] == "2.00x"
    assert ratio["detail"] == "needs 1.25x more"
    dec = rows["HQ decoder, 1 point prompt, p50"]
    assert dec["status"] == "not met" and dec["detail"] == "needs 1.60x faster"
    amg = rows["AMG vit_b 32x32 per image"]
    assert amg["status"] == "not measured" and "stopped at its 55 s budget" in amg["detail"]
    assert rows["vit_h batch 8: ours vs transformers SamHQModel (SDPA, bf16)"]["status"] == (
        "not measured"
    )
    assert "no record" in rows["vit_h encoder batch 8 throughput"]["detail"]
    iou = rows["fast-path masks vs fp32 reference, trained test model (mean IoU)"]
    assert iou["status"] == "not measured" and "did not run" in iou["detail"]
    assert any("not measured" in line for line in targets_table(list(rows.values())))
    # GEMM choice cache: absent, then copied
    cache = tmp_path / "cache"
    assert gemm_choices(cache, tmp_path)["status"].startswith("absent")
    cache.mkdir()
    (cache / "gemm-choice-sm90.json").write_text('{"k": 1}')
    got = gemm_choices(cache, tmp_path)
    assert got["files"] == {"gemm-choice-sm90.json": {"k": 1}}
    assert (tmp_path / "gemm-choice" / "gemm-choice-sm90.json").exists()
