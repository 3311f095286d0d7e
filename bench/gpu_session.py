"""The one command to run first whenever a GPU is lent: ``scripts/gpu_session.sh``.

Steps, each in its own process under its own time budget (a step that runs over is stopped and
recorded as such; the session goes on and always writes its results):

1. the environment: GPU, driver, torch, triton, transformers, the official package, commit;
2. peers from ``.whl/`` (the GPU image has no registry): wheels found there are installed with
   ``pip --no-index --no-deps --target`` into ``OUT/site`` and put first on the path of every
   later step (transformers 4.53.3, segment-anything-hq 0.3; see the README's "GPU session");
3. ``pytest -m gpu`` on the test suite;
4. the headline benchmarks (``pytest bench/ --bench-headline``), in three parts so that one
   running over its budget keeps the others: encoder vit_b / vit_h bf16 batch 8 (ours eager and
   fast vs transformers and the official model; peak memory), decoder 1 and 64 prompts, AMG
   vit_b 32x32 on the 1500x1000 photo. Each record has its error against our fp32 reference and
   its % of the GPU's peak;
5. ``roofline``: every fused-op call of our Triton bf16 model timed on its own (CUDA events,
   synchronised per op) for the vit_b and vit_h encoders at batch 8 and the decoder at 1 and 64
   prompts, joined with the roofline model of ``bench/roofline.py``: time, predicted time, % of
   roofline, share of the encoder / decoder, breakdown by op category;
6. ``trained-iou``: masks of the Triton bf16 path against the fp32 reference on the trained test
   model (``bench/trained_iou.py``).

``summary.md`` and ``results.json`` then hold every target of issue 13 in one table (target,
measured value or "not measured" with the reason, met / not met and the gap), the per-op
roofline tables, and the GEMM choice cache: ``SAMHQ_FAST_CACHE_DIR`` is ``OUT/cache/samhq_fast``
for every step, and its ``gemm-choice-*.json`` files are copied to ``OUT/gemm-choice/``.

Writes ``OUT/results.json`` (environment, steps, the benchmark summary of ``bench.report``),
``OUT/summary.md``, ``OUT/bench.json`` (raw pytest-benchmark JSON: ``python -m bench.report
--json OUT/bench.json --readme`` files it under bench/results/ and regenerates the README's
Performance section) and each step's log.

``--dry-run`` runs the same steps on CPU at tiny shapes (128 px stand-in models, Triton in its
interpreter), so that the script cannot break on its first real use; CI runs it.

Compile and autotune caches live in ``OUT/cache`` (shared by the steps: the GPU tests' compiles
serve the benchmarks).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WHEELS = REPO / ".whl"

# Seconds per step on a GPU (9 minutes in all, with margin) and in the dry run (CPU, < 5 min).
BUDGET_GPU = {"gpu-tests": 170, "bench-encoder": 155, "bench-decoder": 60, "bench-amg": 55,
              "roofline": 50, "trained-iou": 30}  # fmt: skip
BUDGET_DRY = {"gpu-tests": 120, "bench-encoder": 150, "bench-decoder": 90, "bench-amg": 60,
              "roofline": 60, "trained-iou": 40}  # fmt: skip
BENCH_FILES = {
    "bench-encoder": "bench/test_bench_encoder.py",
    "bench-decoder": "bench/test_bench_decoder.py",
    "bench-amg": "bench/test_bench_amg.py",
}


def _run(name: str, cmd: list[str], env: dict[str, str], budget: float, out: Path) -> dict:
    """Run one step; its output goes to ``OUT/<name>.log`` and, shortened, to our stdout."""
    log = out / f"{name}.log"
    print(f"[gpu_session] {name}: {' '.join(cmd)} (budget {budget:.0f} s)", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            rc = proc.wait(timeout=budget)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc, status = None, f"stopped at its {budget:.0f} s budget"
    seconds = round(time.perf_counter() - t0, 1)
    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
    print(f"[gpu_session] {name}: {status} in {seconds} s", flush=True)
    for line in tail:
        print(f"    {line}", flush=True)
    return {"step": name, "status": status, "returncode": rc, "seconds": seconds,
            "log": log.name, "tail": tail}  # fmt: skip


def environment(dry_run: bool) -> dict[str, Any]:
    import torch

    from bench._env import device_name, git_commit, versions

    env: dict[str, Any] = {
        "mode": "dry-run (CPU, tiny shapes, Triton interpreter)" if dry_run else "GPU",
        "python": sys.version.split()[0],
        "commit": git_commit(),
        "versions": versions(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        env["gpu"] = device_name("cuda")
        env["cuda_runtime"] = torch.version.cuda
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                 "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            )  # fmt: skip
            env["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            env["nvidia_smi"] = f"unavailable: {e}"
    else:
        env["gpu"] = None
    return env


def install_wheels(out: Path, env: dict[str, str]) -> dict:
    """Install ``.whl/*.whl`` into ``OUT/site`` (first on PYTHONPATH for the later steps)."""
    wheels = sorted(glob.glob(str(WHEELS / "*.whl")))
    if not wheels:
        return {"step": "wheels", "status": "none found in .whl/ (peers as installed, or skipped)",
                "wheels": []}  # fmt: skip
    site = out / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(site), *wheels]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
        status = "ok"
    else:
        status = f"failed: {proc.stderr.strip()[-300:]}"
    return {"step": "wheels", "status": status, "wheels": [Path(w).name for w in wheels]}


def _gpu_test_counts(xml: Path) -> dict[str, int] | None:
    if not xml.exists():
        return None
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError:
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def merge_bench(parts: list[Path]) -> dict | None:
    """One pytest-benchmark JSON from the parts that produced one."""
    merged: dict | None = None
    for path in parts:
        if not path.exists():
            continue
        raw = json.loads(path.read_text())
        if merged is None:
            merged = raw
            continue
        merged["benchmarks"] += raw.get("benchmarks", [])
        extra, more = merged.setdefault("samhq_fast", {}), raw.get("samhq_fast", {})
        extra["skipped"] = extra.get("skipped", []) + more.get("skipped", [])
        extra["session_seconds"] = (extra.get("session_seconds") or 0) + (
            more.get("session_seconds") or 0
        )
    return merged


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def headline_table(records: list[dict[str, Any]]) -> list[str]:
    """One row per benchmark record: the figures the GPU session is for."""
    from bench.report import label

    lines = [
        "| section | case | implementation | median ms | items/s | % of peak | max abs err "
        "| worst IoU | peak mem MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        case = {
            "encoder": f"{r.get('preset')} batch {r.get('batch')}",
            "decoder": f"{r.get('preset')} {r.get('prompts')} {r.get('prompt_kind')}",
            "amg": f"{r.get('preset')} {r.get('grid')}",
        }.get(r.get("section", ""), r.get("name", ""))
        per_s = r.get(f"{r.get('item_name')}_per_s")
        lines.append(
            f"| {r.get('section')} | {case} | {label(r)} | {_fmt(r.get('median_ms'))} "
            f"| {_fmt(per_s)} | {_fmt(r.get('pct_of_peak'))} | {_fmt(r.get('max_abs_err'))} "
            f"| {_fmt(r.get('mask_iou_min', r.get('mask_iou')))} | {_fmt(r.get('peak_mem_mb'))} |"
        )
    return lines


# ---------------------------------------------------------------------- issue 13 targets
_MEM = {  # what the encoder records' peak_mem_mb is (bench/_timing.py MEM_KIND)
    "cuda": "max_memory_allocated during the runs minus before: model and inputs excluded",
    "cpu": "peak RSS increase (a lower bound)",
}


def _best(records: list[dict], **want: Any) -> dict | None:
    """The fastest record matching ``want`` (a value may be a tuple of accepted values)."""
    rows = [
        r for r in records
        if r.get("median_ms") is not None
        and all(r.get(k) in (v if isinstance(v, tuple) else (v,)) for k, v in want.items())
    ]  # fmt: skip
    return min(rows, key=lambda r: r["median_ms"]) if rows else None


def _why_missing(steps: list[dict], step: str, skipped: list[dict], tokens: list[str]) -> str:
    st = next((x for x in steps if x["step"] == step), None)
    if st is None:
        return f"step {step} did not run"
    if st["status"] != "ok":
        return f"step {step} {st['status']}"
    for sk in skipped:
        if all(t in sk["test"] for t in tokens):
            return f"skipped: {sk['reason'][:160]}"
    return f"no record from step {step}"


def _row(target: str, goal: str, value: float | None, ok: Callable[[float], bool],
         fmt: str, gap: Callable[[float], str], why: str, source: str,
         dry_run: bool) -> dict[str, Any]:  # fmt: skip
    if value is None:
        return {"target": target, "goal": goal, "measured": None, "status": "not measured",
                "detail": why, "source": source}  # fmt: skip
    if dry_run:
        status, detail = "dry run", "CPU stand-in at tiny shapes: not a target figure"
    elif ok(value):
        status, detail = "met", ""
    else:
        status, detail = "not met", gap(value)
    return {"target": target, "goal": goal, "measured": fmt.format(value), "value": value,
            "status": status, "detail": detail, "source": source}  # fmt: skip


def targets(result: dict[str, Any], dry_run: bool) -> list[dict[str, Any]]:
    """Every target of issue 13, from the benchmark summary and the trained-model IoU step."""
    from bench.report import label

    summary = result.get("bench_summary") or {}
    recs, skipped, steps = summary.get("records", []), summary.get("skipped", []), result["steps"]
    batch, many, grid = (1, 4, "4x4") if dry_run else (8, 64, "32x32")
    fast = ("triton", "fast", "compile", "torch")
    out = []
    for preset, goal in (("vit_b", 400.0), ("vit_h", 65.0)):
        r = _best(recs, section="encoder", preset=preset, batch=batch, impl="ours", dtype="bf16",
                  backend=fast)  # fmt: skip
        v = r.get("images_per_s") if r else None
        out.append(_row(
            f"{preset} encoder batch {batch} throughput", f">= {goal:g} img/s", v,
            lambda x, g=goal: x >= g, "{:.1f} img/s", lambda x, g=goal: f"needs {g / x:.2f}x",
            _why_missing(steps, "bench-encoder", skipped, [preset, f"b{batch}", "ours"]),
            label(r) if r else "-", dry_run))  # fmt: skip
    for preset in ("vit_b", "vit_h"):
        r = _best(recs, section="encoder", preset=preset, batch=batch, impl="ours", dtype="bf16",
                  backend=fast)  # fmt: skip
        hf = _best(recs, section="encoder", preset=preset, batch=batch, impl="hf",
                   backend="sdpa", dtype="bf16")  # fmt: skip
        v = hf["median_ms"] / r["median_ms"] if r and hf else None
        why = _why_missing(steps, "bench-encoder", skipped, [preset, f"b{batch}", "hf"])
        if r is None:
            why = _why_missing(steps, "bench-encoder", skipped, [preset, f"b{batch}", "ours"])
        out.append(_row(
            f"{preset} batch {batch}: ours vs transformers SamHQModel (SDPA, bf16)", ">= 2.5x", v,
            lambda x: x >= 2.5, "{:.2f}x", lambda x: f"needs {2.5 / x:.2f}x more",
            why, f"{label(r)} vs {label(hf)}" if r and hf else "-", dry_run))  # fmt: skip
    for prompts, goal in ((1, 0.5), (many, 2.0)):
        r = _best(recs, section="decoder", impl="ours", prompts=prompts, prompt_kind="points",
                  dtype="bf16")  # fmt: skip
        v = r.get("median_ms") if r else None
        out.append(_row(
            f"HQ decoder, {prompts} point prompt{'s' if prompts > 1 else ''}, p50",
            f"<= {goal:g} ms", v, lambda x, g=goal: x <= g, "{:.3g} ms",
            lambda x, g=goal: f"needs {x / g:.2f}x faster",
            _why_missing(steps, "bench-decoder", skipped, [f"-{prompts}points", "ours"]),
            label(r) if r else "-", dry_run))  # fmt: skip
    r = _best(recs, section="amg", impl="ours", preset="vit_b", grid=grid)
    out.append(_row(
        f"AMG vit_b {grid} per image", "<= 60 ms", r.get("median_ms") if r else None,
        lambda x: x <= 60.0, "{:.4g} ms", lambda x: f"needs {x / 60:.2f}x faster",
        _why_missing(steps, "bench-amg", skipped, ["vit_b", "ours"]),
        label(r) if r else "-", dry_run))  # fmt: skip
    r = _best(recs, section="encoder", preset="vit_h", batch=batch, impl="ours", dtype="bf16",
              backend=fast)  # fmt: skip
    mem = r.get("peak_mem_mb") if r else None
    out.append(_row(
        f"vit_h batch {batch} peak memory (the fastest bf16 row)", "<= 4 GiB",
        None if mem is None else mem / 1024, lambda x: x <= 4.0, "{:.2f} GiB",
        lambda x: f"{x - 4:.2f} GiB over",
        _why_missing(steps, "bench-encoder", skipped, ["vit_h", f"b{batch}", "ours"]),
        f"{label(r)}, {_MEM.get(r.get('device_type'), '?')}" if r else "-", dry_run))  # fmt: skip
    iou = result.get("trained_iou")
    st = next((x for x in steps if x["step"] == "trained-iou"), None)
    why = "step trained-iou did not run" if st is None else f"step trained-iou {st['status']}"
    out.append(_row(
        "fast-path masks vs fp32 reference, trained test model (mean IoU)", ">= 0.99",
        iou.get("iou_vs_reference_mean") if iou else None, lambda x: x >= 0.99, "{:.4f}",
        lambda x: f"{0.99 - x:.4f} short", why,
        f"{iou['fast']} vs {iou['reference']} on {iou['device']}, {iou['prompts']} prompts, "
        f"min {iou['iou_vs_reference_min']:.4f}" if iou else "-", dry_run))  # fmt: skip
    return out


def targets_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| target | goal | measured | status | gap / reason | measured on |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for t in rows:
        lines.append(f"| {t['target']} | {t['goal']} | {t['measured'] or 'not measured'} "
                     f"| {t['status']} | {t['detail'] or '-'} | {t['source']} |")  # fmt: skip
    return lines


def gemm_choices(cache: Path, out: Path) -> dict[str, Any]:
    """The GEMM choice cache (``<SAMHQ_FAST_CACHE_DIR>/gemm-choice-*.json``), copied to
    ``OUT/gemm-choice/``."""
    files = sorted(cache.glob("gemm-choice-*.json")) if cache.is_dir() else []
    if not files:
        return {"status": f"absent: no gemm-choice-*.json under {cache}", "files": {}}
    dest = out / "gemm-choice"
    dest.mkdir(exist_ok=True)
    content: dict[str, Any] = {}
    for f in files:
        shutil.copy2(f, dest / f.name)
        try:
            content[f.name] = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            content[f.name] = f"unreadable: {e}"
    return {"status": f"{len(files)} file(s), copied to {dest.name}/", "files": content}


def summary_markdown(result: dict[str, Any]) -> str:
    env = result["env"]
    v = env["versions"]
    lines = [
        "# GPU session",
        "",
        f"Mode: {env['mode']}. GPU: {env.get('gpu') or 'none'}"
        + (f" ({env['nvidia_smi']})" if env.get("nvidia_smi") else "")
        + f". Commit `{env['commit']}`, python {env['python']}, "
        + ", ".join(f"{k} {val}" for k, val in v.items() if val)
        + ".",
        "",
        "| step | status | seconds |",
        "|---|---|---|",
    ]
    for s in result["steps"]:
        lines.append(f"| {s['step']} | {s['status']} | {s.get('seconds', '-')} |")
    counts = result.get("gpu_tests")
    if counts:
        lines += ["", f"GPU tests: {counts}"]
    if result.get("targets"):
        lines += ["", "## Issue 13 targets", "", *targets_table(result["targets"])]
    summary = result.get("bench_summary")
    if summary:
        lines += ["", "## Headline figures", "", *headline_table(summary["records"])]
        if summary.get("skipped"):
            lines += ["", "Skipped:"]
            lines += [f"- {s['test']}: {s['reason']}" for s in summary["skipped"]]
    else:
        lines += ["", "No benchmark produced results."]
    roof = result.get("roofline_md")
    lines += ["", roof.strip() if roof else "## Per-op times against the roofline\n\nNot measured: "
              "the roofline step produced no result (see its log)."]  # fmt: skip
    gc = result.get("gemm_choice") or {}
    lines += ["", "## GEMM choice cache", "", f"{gc.get('status', 'not looked for')}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the GPU session: GPU tests + headline benches.")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, interpreter")
    ap.add_argument("--out", type=Path, default=REPO / "gpu-session")
    a = ap.parse_args(argv)
    out = a.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.perf_counter()

    import torch

    if not a.dry_run and not torch.cuda.is_available():
        print("[gpu_session] no CUDA device here: use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    budget = BUDGET_DRY if a.dry_run else BUDGET_GPU
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TRITON_CACHE_DIR", str(out / "cache" / "triton"))
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(out / "cache" / "inductor"))
    cache = out / "cache" / "samhq_fast"  # our own caches (the GEMM choices), every step
    env["SAMHQ_FAST_CACHE_DIR"] = str(cache)
    if a.dry_run:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""  # the same CPU path even on a GPU host

    info = environment(a.dry_run)
    print(f"[gpu_session] {json.dumps(info)}", flush=True)
    steps = [install_wheels(out, env)]
    print(f"[gpu_session] wheels: {steps[0]['status']}", flush=True)

    py = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]
    xml = out / "gpu-tests.xml"
    gpu_tests = [*py, "tests", "-m", "gpu", f"--junitxml={xml}"]
    steps.append(_run("gpu-tests", gpu_tests, env, budget["gpu-tests"], out))

    bench_args = ["--bench-headline"]
    if a.dry_run:
        # 4 prompts, not 64: the decoder runs in the Triton interpreter here.
        bench_args += ["--bench-tiny", "--bench-device", "cpu", "--bench-batches", "1",
                       "--bench-prompts", "1,4"]  # fmt: skip
    parts = []
    for name, path in BENCH_FILES.items():
        part = out / f"{name}.json"
        parts.append(part)
        steps.append(_run(name, [*py, path, *bench_args, f"--benchmark-json={part}"],
                          env, budget[name], out))  # fmt: skip

    # Per-op times joined with the roofline model (eager, synchronised per op).
    roof_args = ["--presets", "vit_b", "--batch", "1", "--prompts", "1", "--dry-run"] if a.dry_run \
        else ["--presets", "vit_b,vit_h", "--batch", "8", "--prompts", "1,64"]  # fmt: skip
    roof_dir = out / "roofline"
    roof_cmd = [sys.executable, "-m", "bench.roofline", "measure", "--out", str(roof_dir)]
    steps.append(_run("roofline", [*roof_cmd, *roof_args], env, budget["roofline"], out))
    # Masks of the fast path vs the fp32 reference on the trained test model.
    iou_args = ["--device", "cpu", "--backend", "torch", "--scenes", "1"] if a.dry_run \
        else ["--device", "cuda", "--backend", "triton", "--scenes", "8"]  # fmt: skip
    steps.append(_run("trained-iou", [sys.executable, "-m", "bench.trained_iou", "--out", str(out),
                                      "--dtype", "bf16", *iou_args], env, budget["trained-iou"],
                      out))  # fmt: skip

    raw = merge_bench(parts)
    result: dict[str, Any] = {"env": info, "steps": steps, "gpu_tests": _gpu_test_counts(xml)}
    if raw is not None:
        (out / "bench.json").write_text(json.dumps(raw, indent=1))
        from bench.report import summarize

        result["bench_summary"] = summarize(raw, source=str(out / "bench.json"))
    for key, path in (("roofline", roof_dir / "roofline.json"),
                      ("trained_iou", out / "trained_iou.json")):  # fmt: skip
        if path.exists():
            result[key] = json.loads(path.read_text())
    if (roof_dir / "roofline.md").exists():
        result["roofline_md"] = (roof_dir / "roofline.md").read_text()
    result["gemm_choice"] = gemm_choices(cache, out)
    result["targets"] = targets(result, a.dry_run)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "summary.md").write_text(summary_markdown(result))
    print(f"[gpu_session] done in {result['seconds']} s: {out}/summary.md", flush=True)
    print((out / "summary.md").read_text(), flush=True)
    bad = [s for s in steps if s["status"] != "ok" and s["step"] != "wheels"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
