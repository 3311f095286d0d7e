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
   its % of the GPU's peak.

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
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WHEELS = REPO / ".whl"

# Seconds per step on a GPU (9 minutes in all, with margin) and in the dry run (CPU, < 5 min).
BUDGET_GPU = {"gpu-tests": 200, "bench-encoder": 170, "bench-decoder": 70, "bench-amg": 60}
BUDGET_DRY = {"gpu-tests": 120, "bench-encoder": 150, "bench-decoder": 90, "bench-amg": 60}
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
    summary = result.get("bench_summary")
    if summary:
        lines += ["", "## Headline figures", "", *headline_table(summary["records"])]
        if summary.get("skipped"):
            lines += ["", "Skipped:"]
            lines += [f"- {s['test']}: {s['reason']}" for s in summary["skipped"]]
    else:
        lines += ["", "No benchmark produced results."]
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

    raw = merge_bench(parts)
    result: dict[str, Any] = {"env": info, "steps": steps, "gpu_tests": _gpu_test_counts(xml)}
    if raw is not None:
        (out / "bench.json").write_text(json.dumps(raw, indent=1))
        from bench.report import summarize

        result["bench_summary"] = summarize(raw, source=str(out / "bench.json"))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "summary.md").write_text(summary_markdown(result))
    print(f"[gpu_session] done in {result['seconds']} s: {out}/summary.md", flush=True)
    print((out / "summary.md").read_text(), flush=True)
    bad = [s for s in steps if s["status"] != "ok" and s["step"] != "wheels"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
