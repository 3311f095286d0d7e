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
