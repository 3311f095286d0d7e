"""Turn a pytest-benchmark JSON of ``bench/`` into a results report, and the README section.

    python -m pytest bench/ --benchmark-json=bench/results/raw.json
    python -m bench.report --json bench/results/raw.json --readme

writes ``bench/results/<device-slug>-<YYYY-MM-DD>.md`` and ``.json`` (one table per section, each
implementation's time next to the peers measured in the same run, the ratios, and the error
columns) and, with ``--readme``, rewrites the README between ``<!-- perf:start -->`` and
``<!-- perf:end -->`` from the latest results of each device. ``python -m bench.report --readme``
alone regenerates the README section from the results already in ``bench/results/``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "bench" / "results"
README = REPO_ROOT / "README.md"
START, END = "<!-- perf:start -->", "<!-- perf:end -->"

PEERS = ("official", "hf")
IMPL_ORDER = {"ours": 0, "official": 1, "hf": 2}
IMPL_NAMES = {"ours": "samhq_fast", "official": "segment_anything_hq", "hf": "transformers"}
DTYPE_ORDER = {"fp32": 0, "bf16": 1, "fp16": 2}
BACKEND_ORDER = {"reference": 0, "torch": 1, "triton": 2, "compile": 3, "fast": 4}

# Per section: the fields that define "the same case" (rows compared with each other).
SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "encoder": ("preset", "batch"),
    "decoder": ("preset", "prompts", "prompt_kind", "hq_token_only"),
    "e2e": ("preset", "image"),
    "amg": ("preset", "grid"),
    "attention": ("layer", "preset"),
}
SECTION_TITLES = {
    "encoder": "Image encoder",
    "decoder": "Prompt encoder + HQ mask decoder (one image, P prompts)",
    "e2e": "End to end: set_image + one predict on a 1500x1000 photo",
    "amg": "Automatic mask generation (segment everything) on the 1500x1000 photo",
    "attention": "Encoder attention microbenchmark (bench/test_bench_attention.py)",
}
SECTION_ORDER = ("encoder", "decoder", "e2e", "amg", "attention")


# ------------------------------------------------------------------------------ loading
def _percentile(data: list[float], q: float) -> float:
    xs = sorted(data)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def records_from_raw(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat record per benchmark: ``extra_info`` plus name and latency fields (from
    ``extra_info`` when the benchmark computed them, else from pytest-benchmark's stats)."""
    out = []
    for b in raw.get("benchmarks", []):
        rec: dict[str, Any] = dict(b.get("extra_info", {}))
        rec["name"] = b.get("name")
        rec["group"] = b.get("group")
        rec.setdefault("section", _guess_section(b))
        stats = b.get("stats", {})
        data = stats.get("data")
        if "median_ms" not in rec and "median" in stats:
            rec["median_ms"] = stats["median"] * 1e3
        if "p20_ms" not in rec:
            if data:
                rec["p20_ms"] = _percentile(data, 20) * 1e3
                rec["p80_ms"] = _percentile(data, 80) * 1e3
            elif "q1" in stats:  # quartiles are what pytest-benchmark keeps without data
                rec["p25_ms"] = stats["q1"] * 1e3
                rec["p75_ms"] = stats["q3"] * 1e3
        rec.setdefault("rounds", stats.get("rounds"))
        out.append(rec)
    return out


def _guess_section(bench: dict[str, Any]) -> str:
    name = bench.get("name", "")
    for section in SECTION_ORDER:
        if name.startswith(f"test_{section}"):
            return section
    return "other"


def _most_common(values: Iterable[Any]) -> Any:
    values = [v for v in values if v is not None]
    return max(set(values), key=values.count) if values else None


def summarize(raw: dict[str, Any], source: str | None = None) -> dict[str, Any]:
    """Records + metadata + comparisons of a pytest-benchmark JSON."""
    records = records_from_raw(raw)
    loads = [
        la[0]
        for r in records
        for la in (r.get("loadavg_start"), r.get("loadavg_end"))
        if isinstance(la, (list, tuple)) and la
    ]
    utils = [r["cpu_util"] for r in records if r.get("cpu_util") is not None]
    first = next((r for r in records if "device" in r), {})
    extra = raw.get("samhq_fast", {})
    meta = {
        "device": _most_common(r.get("device") for r in records) or "unknown device",
        "device_type": first.get("device_type"),
        "device_slug": _most_common(r.get("device_slug") for r in records) or "unknown-device",
        "date": (raw.get("datetime") or "unknown")[:10],
        "datetime": raw.get("datetime"),
        "commits": sorted({r["commit"] for r in records if r.get("commit")}),
        "versions": {
            k.removesuffix("_version"): v for k, v in first.items() if k.endswith("_version")
        },
        "torch_threads": first.get("torch_threads"),
        "tf32": first.get("tf32"),
        "loadavg_min": min(loads) if loads else None,
        "loadavg_max": max(loads) if loads else None,
        "loadavg_median": statistics.median(loads) if loads else None,
        "cpu_util_min": min(utils) if utils else None,
        "cpu_util_max": max(utils) if utils else None,
        "cpu_count": _cpu_count(first.get("device")),
        "source": source,
        "settings": extra.get("settings"),
        "session_seconds": extra.get("session_seconds"),
    }
    return {
        "meta": meta,
        "records": records,
        "comparisons": comparisons(records),
        "skipped": extra.get("skipped", []),
    }


def _cpu_count(device: str | None) -> int | None:
    if device and device.endswith(" CPUs"):
        try:
            return int(device.rsplit(", ", 1)[1].split()[0])
        except (IndexError, ValueError):
            return None
    return None


# --------------------------------------------------------------------------- comparisons
def case_key(rec: dict[str, Any]) -> tuple:
    return (rec.get("section"),) + tuple(
        rec.get(k) for k in SECTION_KEYS.get(rec.get("section"), ())
    )


def _by_case(records: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("median_ms") is not None:
            groups.setdefault(case_key(r), []).append(r)
    return groups


def find(rows: list[dict[str, Any]], impl: str, dtype: str) -> dict[str, Any] | None:
    """The fastest row of ``impl`` in ``dtype`` among ``rows``."""
    cands = [r for r in rows if r.get("impl") == impl and r.get("dtype") == dtype]
    return min(cands, key=lambda r: r["median_ms"]) if cands else None


def speedup(row: dict[str, Any], other: dict[str, Any] | None) -> float | None:
    """How many times faster ``row`` is than ``other`` (``other``'s median / ``row``'s)."""
    if other is None or not row.get("median_ms") or other.get("median_ms") is None:
        return None
    return other["median_ms"] / row["median_ms"]


def label(rec: dict[str, Any]) -> str:
    impl = rec.get("impl", "?")
    text = f"{IMPL_NAMES.get(impl, impl)} {rec.get('backend', '')} {rec.get('dtype', '')}"
    if rec.get("compiled") is False:  # a compiled case that ran eagerly is no compile figure
        text += " (NOT compiled: Dynamo fell back to eager)"
    return text.replace("  ", " ").strip()


def comparisons(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every ``ours`` row against each peer in the same dtype and in fp32."""
    out = []
    for key, rows in _by_case(records).items():
        for r in rows:
            if r.get("impl") != "ours":
                continue
            for peer in PEERS:
                for dtype in dict.fromkeys((r.get("dtype"), "fp32")):
                    other = find(rows, peer, dtype)
                    ratio = speedup(r, other)
                    if ratio is None:
                        continue
                    out.append(
                        {
                            "case": list(key),
                            "ours": label(r),
                            "peer": label(other),
                            "speedup": round(ratio, 4),
                            "text": f"{label(r)} vs {label(other)}: {ratio:.2f}x",
                        }
                    )
    return out


# ----------------------------------------------------------------------------- formatting
def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    if ms >= 1000:
        return f"{ms / 1000:.3g} s"
    if ms >= 1:
        return f"{ms:.3g} ms"
    return f"{ms * 1000:.3g} us"


def fmt_num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 10 ** (digits + 1) or abs(x) < 10 ** -(digits - 1):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def fmt_err(x: float | None) -> str:
    if x is None:
        return "-"
    return "0" if x == 0 else f"{x:.1e}"


def fmt_mem(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.0f}" if abs(x) >= 10 else f"{x:.1f}"


def _sort_item(v: Any) -> tuple[int, float, str]:
    if v is None:
        return (0, 0.0, "")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (1, float(v), "")
    return (2, 0.0, str(v))


def natural_key(values: Iterable[Any]) -> tuple:
    """Sort numbers as numbers (1 < 16 < 64 < 256), the rest as text, ``None`` first."""
    return tuple(_sort_item(v) for v in values)


def fmt_iou(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def fmt_range(rec: dict[str, Any]) -> str:
    if rec.get("rounds") == 1:
        return "1 round"
    if rec.get("p20_ms") is not None:
        return f"{fmt_ms(rec['p20_ms'])} - {fmt_ms(rec['p80_ms'])}"
    if rec.get("p25_ms") is not None:
        return f"{fmt_ms(rec['p25_ms'])} - {fmt_ms(rec['p75_ms'])} (p25-p75)"
    return "-"


def _case_title(section: str, key: tuple) -> str:
    fields = SECTION_KEYS.get(section, ())
    vals = dict(zip(fields, key[1:], strict=False))
    if section == "encoder":
        return f"{vals['preset']}, batch {vals['batch']}"
    if section == "decoder":
        hq = ", HQ token only" if vals.get("hq_token_only") else ""
        n, kind = vals["prompts"], str(vals["prompt_kind"])
        kind = {"points": "point", "boxes": "box"}.get(kind, kind) if n == 1 else kind
        return f"{vals['preset']}, {n} {kind}{hq}"
    if section == "e2e":
        return f"{vals['preset']}, {str(vals.get('image', '')).split(' ')[0]}"
    if section == "amg":
        return f"{vals['preset']}, grid {vals.get('grid')}"
    return ", ".join(str(v) for v in vals.values())


def _sort_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(
        rows,
        key=lambda r: (
            IMPL_ORDER.get(r.get("impl"), 9),
            DTYPE_ORDER.get(r.get("dtype"), 9),
            BACKEND_ORDER.get(r.get("backend"), 9),
            str(r.get("impl")),
        ),
    )


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def section_markdown(section: str, records: list[dict[str, Any]]) -> list[str]:
    """The table (and the ratio lines) of one section."""
    groups = _by_case([r for r in records if r.get("section") == section])
    if not groups:
        return []
    lines = [f"### {SECTION_TITLES.get(section, section)}", ""]
    ratio_lines: list[str] = []
    if section == "attention":
        header = [
            "case",
            "impl",
            "dtype",
            "shape",
            "median",
            "TFLOP/s",
            "peak mem MB",
            "max diff vs torch",
            "x vs torch",
            "x vs sdpa",
        ]
        rows = []
        for key in sorted(groups, key=natural_key):
            g = groups[key]
            for r in sorted(g, key=lambda r: str(r.get("impl"))):
                torch_row = next((x for x in g if x.get("impl") == "torch"), None)
                sdpa_row = next((x for x in g if x.get("impl") == "sdpa"), None)
                rows.append(
                    [
                        _case_title(section, key),
                        str(r.get("impl")),
                        str(r.get("dtype")),
                        str(r.get("shape", "")),
                        fmt_ms(r.get("median_ms")),
                        fmt_num(r.get("tflops")),
                        fmt_mem(r.get("peak_mem_mb")),
                        fmt_err(r.get("max_diff_vs_reference")),
                        fmt_ratio(speedup(r, torch_row)),
                        fmt_ratio(speedup(r, sdpa_row)),
                    ]
                )
        return lines + _table(header, rows) + [""]
    items = "prompts/s" if section == "decoder" else "img/s"
    items_key = "prompts_per_s" if section == "decoder" else "images_per_s"
    header = [
        "case",
        "implementation",
        "backend",
        "dtype",
        "median",
        "p20 - p80",
        items,
        "TFLOP/s",
        "% peak",
        "peak mem MB",
        "CPU util",
        "max abs err",
        "rel err",
        "mask IoU",
        "x vs official (same dtype)",
        "x vs transformers (same dtype)",
    ]
    rows = []
    for key in sorted(groups, key=natural_key):
        g = groups[key]
        title = _case_title(section, key)
        for r in _sort_rows(g):
            dtype = r.get("dtype")
            rows.append(
                [
                    title,
                    IMPL_NAMES.get(r.get("impl"), str(r.get("impl"))),
                    str(r.get("backend")),
                    str(dtype),
                    fmt_ms(r.get("median_ms")),
                    fmt_range(r),
                    fmt_num(r.get(items_key)),
                    fmt_num(r.get("tflops")),
                    fmt_num(r.get("pct_of_peak")),
                    fmt_mem(r.get("peak_mem_mb")),
                    fmt_num(r.get("cpu_util")) if r.get("device_type") == "cpu" else "-",
                    fmt_err(r.get("max_abs_err")),
                    fmt_err(r.get("rel_err")),
                    fmt_iou(r.get("mask_iou")),
                    fmt_ratio(
                        None
                        if r.get("impl") == "official"
                        else speedup(r, find(g, "official", dtype))
                    ),
                    fmt_ratio(None if r.get("impl") == "hf" else speedup(r, find(g, "hf", dtype))),
                ]
            )
            if r.get("impl") == "ours":
                parts = []
                for peer in PEERS:
                    for d in dict.fromkeys((dtype, "fp32")):
                        other = find(g, peer, d)
                        if other is not None:
                            parts.append(f"vs {label(other)}: {fmt_ratio(speedup(r, other))}")
                if parts:
                    ratio_lines.append(f"- {title}: {label(r)} " + "; ".join(parts))
    lines += _table(header, rows)
    if ratio_lines:
        lines += ["", "Ratios (how many times faster the first is; > 1: ours is faster):", ""]
        lines += ratio_lines
    return lines + [""]


def shared_machine(meta: dict[str, Any]) -> bool:
    """Did other work take CPU from the run? The benchmark's own threads count in the load
    average, so: load above the CPU count (plus slack), or a case that got well under its
    threads' worth of CPU."""
    cpus, hi = meta.get("cpu_count"), meta.get("loadavg_max")
    threads, util = meta.get("torch_threads") or 1, meta.get("cpu_util_min")
    if meta.get("device_type") != "cpu" or not cpus or hi is None:
        return False
    return hi > cpus + 0.5 or (util is not None and util < 0.75 * min(threads, cpus))


def _load_note(meta: dict[str, Any]) -> str:
    lo, hi, cpus = meta.get("loadavg_min"), meta.get("loadavg_max"), meta.get("cpu_count")
    if lo is None:
        return "load average not recorded"
    text = f"1-minute load average during the run {lo:.2f} - {hi:.2f}"
    if meta.get("device_type") == "cpu" and cpus:
        text += f" on {cpus} CPUs"
        if meta.get("cpu_util_min") is not None:
            text += f", CPU util per case {meta['cpu_util_min']:.2f} - {meta['cpu_util_max']:.2f}"
        if shared_machine(meta):
            text += (
                " (the machine was shared with other work: absolute times are inflated and "
                "noisy; compare implementations within a case, which ran back to back)"
            )
        else:
            text += " (about the benchmark's own threads: no sign of other work)"
    return text


def _versions_line(meta: dict[str, Any]) -> str:
    v = meta.get("versions", {})
    parts = [f"torch {v.get('torch')}"]
    if v.get("cuda"):
        parts.append(f"CUDA {v['cuda']}")
    parts += [
        f"triton {v.get('triton')}",
        f"transformers {v.get('transformers')}",
        f"segment_anything_hq {v.get('segment_anything_hq')}",
        f"python {v.get('python')}",
    ]
    if meta.get("torch_threads"):
        parts.append(f"{meta['torch_threads']} torch threads")
    return ", ".join(parts)


def render_markdown(summary: dict[str, Any]) -> str:
    meta, records = summary["meta"], summary["records"]
    commits = ", ".join(f"`{c}`" for c in meta["commits"]) or "unknown"
    lines = [
        f"# samhq_fast benchmarks: {meta['device']}, {meta['date']}",
        "",
        f"- Device: **{meta['device']}**",
        f"- Commit: {commits}; run at {meta.get('datetime')} (UTC)",
        f"- Versions: {_versions_line(meta)}",
        f"- Machine load: {_load_note(meta)}",
        f"- Run time of `pytest bench/`: {_duration(meta.get('session_seconds'))}",
        "- Same random (perturbed) weights in all three implementations (made in the official "
        "model, loaded by ours from an official `.pth`, renamed into transformers' "
        '`SamHQModel` built with `attn_implementation="sdpa"`); same inputs; every figure '
        "measured in this run.",
        "- Errors are against our reference fp32 path on the same device and inputs: max abs "
        "error of the output (rel err: divided by the reference's max abs value) and the worst "
        "mask IoU (logits > 0). See each section for what the output is.",
        "- Median and p20 - p80 over the timed rounds (warm-up rounds excluded; rounds per case "
        "in the JSON). TFLOP/s from the analytic FLOP model in `bench/_flops.py` (the official "
        "computation's work, the same for every implementation); % peak against the device's "
        "dense peak (unknown for CPUs).",
        f"- Peak memory: {_mem_kind(records)}",
        "- CPU util (CPU runs): the process's CPU time over wall time during the case's rounds; "
        "about the number of torch threads when the case had the CPUs to itself, lower when "
        "other work took them: compare rows with similar values.",
        "",
    ]
    for section in SECTION_ORDER + tuple(
        sorted({r.get("section") for r in records} - set(SECTION_ORDER) - {None})
    ):
        lines += section_markdown(section, records)
    if summary.get("skipped"):
        lines += ["### Skipped cases", ""]
        lines += [f"- `{s['test']}`: {s['reason']}" for s in summary["skipped"]]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _duration(seconds: float | None) -> str:
    return "not recorded" if not seconds else f"{seconds / 60:.1f} min"


def _mem_kind(records: list[dict[str, Any]]) -> str:
    kinds = sorted({r["peak_mem_kind"] for r in records if r.get("peak_mem_kind")})
    return "; ".join(kinds) if kinds else "not recorded"


# ---------------------------------------------------------------------------------- README
def _headline_rows(summary: dict[str, Any]) -> list[list[str]]:
    rows = []
    groups = _by_case(summary["records"])
    for section in ("encoder", "decoder", "e2e", "amg"):
        keys = sorted((k for k in groups if k[0] == section), key=natural_key)
        for key in keys:
            g = groups[key]
            for dtype in sorted({r.get("dtype") for r in g}, key=lambda d: DTYPE_ORDER.get(d, 9)):
                ours = find(g, "ours", dtype)
                if ours is None:
                    continue
                cells = [
                    f"{section} {_case_title(section, key)}",
                    str(dtype),
                    f"{fmt_ms(ours['median_ms'])} ({ours.get('backend')}); " + _err_cell(ours),
                ]
                for peer in PEERS:
                    other = find(g, peer, dtype)
                    if other is None:
                        cells.append("-")
                        continue
                    cells.append(
                        f"{fmt_ms(other['median_ms'])} (ours {fmt_ratio(speedup(ours, other))}); "
                        + _err_cell(other)
                    )
                rows.append(cells)
    return rows


def _err_cell(rec: dict[str, Any]) -> str:
    if rec.get("section") == "amg":  # no logits: the mask count and the matched IoU
        return f"{rec.get('masks', '?')} masks, IoU {fmt_iou(rec.get('mask_iou'))}"
    if rec.get("max_abs_err") == 0 and rec.get("mask_iou") == 1.0:
        return "err 0, IoU 1"
    return f"err {fmt_err(rec.get('max_abs_err'))}, IoU {fmt_iou(rec.get('mask_iou'))}"


def render_readme_section(summaries: list[tuple[Path, dict[str, Any]]]) -> str:
    """The README "Performance" text between the markers, from the latest result per device."""
    lines = [
        "<!-- generated by `python -m bench.report --readme` from bench/results/; "
        "edit bench/report.py, not this text -->",
        "",
    ]
    if not any(s["meta"].get("device_type") == "cuda" for _, s in summaries):
        lines += [
            "**GPU figures are not measured yet.** Only CPU results are recorded below; the "
            "Triton backend and `torch.compile` have not been timed, and nothing here says how "
            "fast samhq_fast is on a GPU.",
            "",
        ]
    if not summaries:
        lines += ["No results yet: run the commands below.", ""]
    for path, s in summaries:
        meta = s["meta"]
        md = path.with_suffix(".md")
        rel = md.relative_to(REPO_ROOT).as_posix() if md.is_relative_to(REPO_ROOT) else md
        commits = ", ".join(f"`{c}`" for c in meta["commits"]) or "unknown"
        took = meta.get("session_seconds")
        took = f" The whole `pytest bench/` run took {took / 60:.1f} min." if took else ""
        lines += [
            f"Measured on **{meta['device']}** at commit {commits} on {meta['date']} "
            f"({_versions_line(meta)}); {_load_note(meta)}.{took} Full tables, ratios and "
            f"skipped cases: [{rel}]({rel}).",
            "",
        ]
        if meta.get("device_type") == "cpu" and (meta.get("cpu_count") or 99) <= 4:
            lines += [
                "On a small CPU VM like this one, repeated quiet runs of one case differ by "
                "10-20% (page faults of large tensor allocations take a large share of the time "
                "here): treat ratios within about 1.2x as ties.",
                "",
            ]
        header = ["case", "dtype", "samhq_fast", "segment_anything_hq", "transformers (sdpa)"]
        lines += _table(header, _headline_rows(s))
        lines.append("")
    lines += [
        "Each cell: median latency; for a peer, how many times faster samhq_fast is "
        '("ours 1.20x": ours takes 1/1.2 of the peer\'s time); then the max abs error of its '
        "output against our reference fp32 output and the worst mask IoU (logits > 0) against our "
        "masks. All three run the same random weights on the same inputs in the same process, "
        "back to back. encoder: image embedding of a 1024x1024 input (IoU: one point decoded by "
        "our fp32 decoder); decoder: low-res logits of P prompts on one image; e2e: "
        "`set_image` + one `predict` on a 1500x1000 photo, full-size masks; amg: automatic "
        "mask generation on that photo (mask count and worst matched IoU in its table).",
        "",
        "Reproduce (on CPU the matrices are small: vit_b and vit_tiny, batch 1, fp32 and bf16, "
        "decoder 1 and 16 prompts, fp32 end to end; with CUDA, or `--bench-full`, the full ones: "
        "vit_b/l/h/tiny x fp32/bf16/fp16 x batch 1/8/32 x reference/torch/triton/compile/fast "
        "(fast = triton + compile + decoder CUDA graphs), decoder 1/16/64/"
        "256 prompts):",
        "",
        "```bash",
        "python -m pytest bench/ --benchmark-json=bench/results/raw.json && "
        "python -m bench.report --json bench/results/raw.json --readme",
        "```",
        "",
        "Options (`python -m pytest bench/ --help`): `--bench-full`, `--bench-small`, "
        "`--bench-device`, `--bench-presets vit_b,vit_h`, `--bench-dtypes fp32,bf16`, "
        "`--bench-batches 1,8`, `--bench-backends reference,torch,triton,compile,fast`, "
        "`--bench-impls ours,official,hf`, `--bench-prompts 1,16`, `--bench-rounds N`, "
        "`--bench-warmup N`. The peers (transformers 4.53.3, segment-anything-hq 0.3 with "
        "`--no-deps`) are installed by `scripts/test.sh`. Benchmarks are not part of the test "
        "suite or CI and assert nothing about time.",
    ]
    return "\n".join(lines)


def rewrite_readme(section: str, readme: Path | None = None) -> None:
    readme = readme or README
    text = readme.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{section}\n{END}{tail}", encoding="utf-8")


# ------------------------------------------------------------------------------------ files
def output_paths(summary: dict[str, Any], results_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    meta = summary["meta"]
    stem = f"{meta['device_slug']}-{meta['date']}"
    return results_dir / f"{stem}.md", results_dir / f"{stem}.json"


def is_summary_file(path: Path) -> bool:
    """``<slug>-YYYY-MM-DD.json`` files written by this module (not raw pytest-benchmark)."""
    return path.suffix == ".json" and re.search(r".-\d{4}-\d{2}-\d{2}$", path.stem) is not None


def latest_summaries(results_dir: Path = RESULTS_DIR) -> list[tuple[Path, dict[str, Any]]]:
    """The newest summary per device, GPUs first."""
    best: dict[str, tuple[str, Path, dict[str, Any]]] = {}
    for path in sorted(results_dir.glob("*.json")):
        if not is_summary_file(path):
            continue
        try:
            s = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if "meta" not in s:
            continue
        slug = s["meta"].get("device_slug", path.stem)
        stamp = s["meta"].get("datetime") or s["meta"].get("date") or ""
        if slug not in best or stamp > best[slug][0]:
            best[slug] = (stamp, path, s)
    items = sorted(best.values(), key=lambda t: (t[2]["meta"].get("device_type") != "cuda", t[1]))
    return [(p, s) for _, p, s in items]


def default_raw_json() -> Path | None:
    cands = list((REPO_ROOT / ".benchmarks").glob("**/*.json")) + [RESULTS_DIR / "raw.json"]
    cands = [p for p in cands if p.is_file()]
    return max(cands, key=lambda p: p.stat().st_mtime) if cands else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="pytest-benchmark JSON (--benchmark-json output)")
    ap.add_argument("--readme", action="store_true", help="rewrite README's Performance section")
    ap.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where results are written")
    args = ap.parse_args(argv)
    raw_path = args.json
    if raw_path is None and not args.readme:
        raw_path = default_raw_json()
        if raw_path is None:
            ap.error("no --json given and no .benchmarks/ or bench/results/raw.json found")
    if raw_path is not None:
        raw = json.loads(raw_path.read_text(encoding="utf-8"))
        summary = summarize(raw, source=str(raw_path))
        if not summary["records"]:
            ap.error(f"{raw_path} holds no benchmark records")
        md_path, json_path = output_paths(summary, args.out_dir)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        md_path.write_text(render_markdown(summary), encoding="utf-8")
        json_path.write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
        print(f"wrote {md_path} and {json_path}")
    if args.readme:
        rewrite_readme(render_readme_section(latest_summaries(args.out_dir)))
        print(f"rewrote the Performance section of {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
