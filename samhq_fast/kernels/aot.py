"""Ahead-of-time compilation of every Triton kernel launch the models make, without a GPU.

Triton compiles for NVIDIA targets on any machine: ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))`` runs the whole pipeline to a cubin, with the ptxas that
ships with triton. This module

1. records the launches: the real models (vit_b/l/h/tiny at 1024, each dtype, encoder batch 1
   and 8, decoder at 1 and 64 prompts with and without a mask prompt) run on ``meta`` tensors
   with the raw launchers (not the custom ops, whose meta implementation is the fake one); the
   launchers treat meta as GPU (:func:`samhq_fast.kernels._common.on_gpu`) and the kernels are
   swapped for recorders, so each launch's arguments, constexprs and options are captured as
   the GPU would see them, and nothing runs;
2. expands each launch over its autotune configs (and heuristics), specialises the arguments
   as triton's launcher does (ints divisible by 16, ints equal to 1, pointer alignment), drops
   duplicates, and compiles every distinct kernel for each target;
3. reads back registers and spills (ptxas ``-v``, as triton runs it), shared memory, and
   whether the PTX holds ``wgmma`` (sm_90) / ``mma`` instructions, and checks them.

Run ``python -m samhq_fast.kernels.aot --arch 90 80 --report bench/results/aot-sm90.md``; the
``aot`` tests run it in a subprocess (the Triton interpreter must be off: with
``TRITON_INTERPRET=1`` the kernels are not compilable functions).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib
import io
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

# Usable shared memory per block (opt-in maximum), bytes.
SHARED_LIMIT = {90: 232448, 80: 166912}
HALF = ("bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Kernels whose half-precision configs must use tensor cores (wgmma on sm_90) when a warpgroup
# tile fits (BLOCK_M >= 64); below that, Hopper runs mma.sync, which is the right instruction.
TENSOR_CORE_KERNELS = ("_linear_fwd", "_linear_tma_fwd", "_rel_pos_attn_fwd", "_decoder_attn_fwd")


@dataclasses.dataclass
class Launch:
    """One recorded launch: the kernel, its bound arguments, and where it came from."""

    kernel: Any  # the launch object (JITFunction, Heuristics or Autotuner)
    args: tuple
    kwargs: dict
    origin: str


@dataclasses.dataclass
class Case:
    """One distinct compile: a kernel specialised for one set of arguments and one config."""

    kernel: str
    module: str  # the JITFunction is ``module.kernel`` (resolved by name: it does not pickle)
    dtype: str
    config: str
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    origins: list[str]
    variant: str = ""  # the case without its config: what the autotuner chooses among

    @property
    def fn(self) -> Any:
        return getattr(importlib.import_module(self.module), self.kernel)

    @property
    def key(self) -> str:
        return repr(
            (self.kernel, self.arch, self.signature, sorted(self.constexprs.items(), key=str),
             sorted(self.attrs.items(), key=str), sorted(self.options.items()))
        )  # fmt: skip


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records instead of launching."""

    def __init__(self, kernel: Any, sink: list[Launch], origin: list[str]) -> None:
        self.kernel, self.sink, self.origin = kernel, sink, origin

    def __getitem__(self, grid: Any):
        def launch(*args: Any, **kwargs: Any) -> None:
            self.sink.append(Launch(self.kernel, args, kwargs, self.origin[0]))

        return launch


def _launch_sites() -> list[tuple[Any, str]]:
    from samhq_fast.kernels import (
        decoder_attention,
        layer_norm,
        linear,
        linear_epilogue,
        linear_tma,
        rel_pos_attention,
    )

    return [
        (linear_epilogue, "_linear_epilogue"),
        (linear, "_linear_fwd_tuned"),
        (linear, "_linear_fwd"),
        (linear_tma, "_linear_tma_fwd_tuned"),
        (linear_tma, "_linear_tma_fwd"),
        (rel_pos_attention, "_rel_pos_attn_fwd_tuned"),
        (rel_pos_attention, "_rel_pos_attn_fwd"),
        (layer_norm, "_layer_norm_rows"),
        (decoder_attention, "_decoder_attn_fwd"),
        (decoder_attention, "_decoder_attn_combine"),
    ]


@contextlib.contextmanager
def recording(
    sink: list[Launch], origin: list[str], every_gemm_candidate: bool = True
) -> Iterator[None]:
    """Swap every launch site for a recorder (restored on exit). ``every_gemm_candidate``: the
    fused linear launches all its GEMM candidates (so that each compiles), else only the one a
    call without a measured choice runs (to count a call's launches)."""
    from samhq_fast.kernels import linear

    saved = []
    every = linear.RECORD_EVERY_CANDIDATE
    linear.RECORD_EVERY_CANDIDATE = every_gemm_candidate
    try:
        for module, name in _launch_sites():
            kernel = getattr(module, name)
            saved.append((module, name, kernel))
            if isinstance(kernel, dict):  # per-dtype autotuners
                setattr(module, name, {k: _Recorder(v, sink, origin) for k, v in kernel.items()})
            else:
                setattr(module, name, _Recorder(kernel, sink, origin))
        yield
    finally:
        linear.RECORD_EVERY_CANDIDATE = every
        for module, name, kernel in saved:
            setattr(module, name, kernel)


def _raw_fused_ops():
    """The fused ops with the plain launchers (custom ops would run their fake on meta)."""
    from samhq_fast.kernels import decoder_attention, layer_norm, linear, rel_pos_attention
    from samhq_fast.ops.fused import FusedOps

    return FusedOps(
        "triton",
        layer_norm.layer_norm,
        layer_norm.add_layer_norm,
        layer_norm.layer_norm_2d,
        linear.linear,
        rel_pos_attention.rel_pos_attention,
        decoder_attention.decoder_attention,
    )


def _meta_model(preset: str, dtype: torch.dtype):
    from samhq_fast.config import PRESETS
    from samhq_fast.modeling.image_encoder import ImageEncoderViT
    from samhq_fast.modeling.sam_hq import SamHQModel

    with torch.device("meta"):
        model = SamHQModel(PRESETS[preset]).eval()
    model.to(dtype).requires_grad_(False)
    ops = _raw_fused_ops()
    enc = model.image_encoder
    if isinstance(enc, ImageEncoderViT):  # TinyViT stays in PyTorch under backend="triton"
        enc.set_attention_fn(ops.rel_pos_attention)
        enc.set_fused(ops)
    model.mask_decoder.fused = ops
    return model


@torch.no_grad()
def record_model_launches(
    presets: Sequence[str] = ("vit_b", "vit_l", "vit_h", "vit_tiny"),
    dtypes: Sequence[str] = ("bf16", "fp16", "fp32"),
    batches: Sequence[int] = (1, 8),
    prompts: Sequence[int] = (1, 64),
) -> list[Launch]:
    """Every kernel launch of the Triton backend at the models' real shapes (nothing runs)."""
    from samhq_fast.modeling.sam_hq import run_image_encoder

    sink: list[Launch] = []
    origin = [""]
    with recording(sink, origin):
        for preset in presets:
            for dt in dtypes:
                model = _meta_model(preset, DTYPES[dt])
                size = model.config.vision_config.image_size
                dec = model.mask_decoder
                for b in batches:
                    origin[0] = f"{preset} {dt} encoder b{b}"
                    x = torch.empty(b, 3, size, size, device="meta", dtype=DTYPES[dt])
                    emb, interm, _, _ = run_image_encoder(model.image_encoder, x)
                hq = dec.compute_hq_features(emb[:1], interm[0][:1] if interm else None)
                pe = model.get_image_wide_positional_embeddings()
                h = emb.shape[-1]
                for p in prompts:
                    for dense in ("image", "prompt"):
                        origin[0] = f"{preset} {dt} decoder {p}p {dense}-dense"
                        sparse = emb.new_empty(1, p, 3, emb.shape[1])
                        shape = (1, emb.shape[1], h, h) if dense == "image" else (1, p, 256, h, h)
                        dec.predict_masks(emb[:1], pe, sparse, emb.new_empty(shape), hq)
    return sink


def _unwrap(kernel: Any) -> tuple[Any, list, dict]:
    """(JITFunction, autotune configs or [None], heuristics) of a launch object."""
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    configs: list = [None]
    heuristics: dict = {}
    while not isinstance(kernel, JITFunction):
        if isinstance(kernel, Autotuner):
            configs = list(kernel.configs)
        elif isinstance(kernel, Heuristics):
            heuristics.update(kernel.values)
        else:
            raise TypeError(f"cannot unwrap {type(kernel)}")
        kernel = kernel.fn
    return kernel, configs, heuristics


def _dtype_of(args: dict) -> str:
    for v in args.values():
        v = getattr(v, "base", v)  # a TensorDescriptor: its tensor's dtype
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[v.dtype]
    return "?"


def expand(launches: Sequence[Launch], archs: Sequence[int]) -> list[Case]:
    """Distinct compiles: each launch x its autotune configs x targets, specialised as triton's
    launcher does, duplicates merged (their origins kept)."""
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import native_specialize_impl
    from triton.tools.tensor_descriptor import TensorDescriptor

    cases: dict[str, Case] = {}
    for launch in launches:
        fn, configs, heuristics = _unwrap(launch.kernel)
        names = fn.arg_names
        # Kernels for newer GPUs only (TMA: sm_90) declare MIN_ARCH in their module.
        min_arch = getattr(sys.modules[fn.fn.__module__], "MIN_ARCH", 0)
        for cfg in configs:
            kw = dict(launch.kwargs)
            options = {"num_warps": kw.pop("num_warps", 4), "num_stages": kw.pop("num_stages", 3)}
            if cfg is not None:
                kw.update(cfg.kwargs)
                options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            bound = dict(zip(names, launch.args, strict=False)) | kw
            # Descriptor block shapes follow the config (its pre_hook sets them): on copies.
            bound = {k: copy.copy(v) if isinstance(v, TensorDescriptor) else v
                     for k, v in bound.items()}  # fmt: skip
            if cfg is not None and cfg.pre_hook is not None:
                cfg.pre_hook(bound)
            for name, heur in heuristics.items():
                bound[name] = heur(bound)
            missing = [n for n in names if n not in bound]
            if missing:
                raise ValueError(f"{fn.__name__}: launch misses arguments {missing}")
            for arch in (a for a in archs if a >= min_arch):
                backend = make_backend(GPUTarget("cuda", arch, 32))
                signature, constexprs, attrs = {}, {}, {}
                for i, p in enumerate(fn.params):
                    value = bound[p.name]
                    if p.is_constexpr:
                        signature[p.name], constexprs[(i,)] = "constexpr", value
                        continue
                    ty, attr = native_specialize_impl(
                        BaseBackend, value, False, not p.do_not_specialize,
                        not p.do_not_specialize_on_alignment,
                    )  # fmt: skip
                    signature[p.name] = ty
                    if ty == "constexpr":
                        constexprs[(i,)] = attr
                    elif isinstance(attr, str) and attr:
                        attrs[(i,)] = backend.parse_attr(attr)
                conf = {
                    k: bound[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "BLOCK_C")
                    if k in bound
                }  # fmt: skip
                config = " ".join(f"{k[6:].lower()}{v}" for k, v in conf.items())
                config += f" w{options['num_warps']} s{options['num_stages']}"
                case = Case(
                    fn.__name__, fn.fn.__module__, _dtype_of(bound), config, arch, signature,
                    constexprs,
                    attrs, options, [launch.origin],
                )  # fmt: skip
                tile = {i for i, p in enumerate(fn.params) if p.name in conf or p.name == "GROUP_M"}
                case.variant = repr(
                    (case.kernel, arch, signature, sorted(attrs.items(), key=str),
                     sorted(((k, v) for k, v in constexprs.items() if k[0] not in tile), key=str))
                )  # fmt: skip
                if case.key in cases:
                    if launch.origin not in cases[case.key].origins:
                        cases[case.key].origins.append(launch.origin)
                else:
                    cases[case.key] = case
    return list(cases.values())


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _constexpr_summary(case: Case) -> str:
    names = [p.name for p in case.fn.params]
    skip = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "BLOCK_C", "GROUP_M", "DOT_UPCAST",
            "ROUND_BF16", "S_ROUND_BF16", "Y_ROUND_BF16", "DOT_PRECISION"}  # fmt: skip
    out = []
    for (i,), v in sorted(case.constexprs.items()):
        n = names[i]
        if n in skip or case.signature[n] != "constexpr" or not case.fn.params[i].is_constexpr:
            continue
        if isinstance(v, bool):
            if v:
                out.append(n)
        elif v not in (None, "none", 0):
            out.append(f"{n}={v}")
    return " ".join(out)


def compile_case(case: Case) -> dict[str, Any]:
    """Compile one case; returns the report row (``error`` set if it failed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row: dict[str, Any] = {
        "kernel": case.kernel,
        "variant": _constexpr_summary(case),
        "dtype": case.dtype,
        "config": case.config,
        "arch": f"sm_{case.arch}",
        "origins": case.origins,
        "error": None,
    }
    src = ASTSource(fn=case.fn, signature=case.signature, constexprs=case.constexprs,
                    attrs=case.attrs)  # fmt: skip
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # triton prints ptxas -v output (stdout)
        with contextlib.redirect_stdout(log):
            k = triton.compile(src, target=GPUTarget("cuda", case.arch, 32), options=case.options)
    except Exception as e:  # noqa: BLE001 - reported per case
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        return row
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    text = log.getvalue()
    regs = _PTXAS_REGS.findall(text)
    spills = _PTXAS_SPILL.findall(text)
    row["registers"] = int(regs[-1]) if regs else None
    row["spill_bytes"] = max(int(s) + int(l) for s, l in spills) if spills else None
    row["shared_bytes"] = int(k.metadata.shared)
    ptx = k.asm["ptx"]
    row["wgmma"] = ptx.count("wgmma.mma_async")
    row["mma"] = len(re.findall(r"\bmma\.sync", ptx))
    row["cubin_bytes"] = len(k.asm["cubin"])
    return row


def check_row(row: dict[str, Any]) -> list[str]:
    """What is wrong with a compiled case (empty: nothing)."""
    where = f"{row['kernel']} {row['dtype']} [{row['config']}] {row['arch']}"
    if row["error"]:
        return [f"{where}: compile failed: {row['error']}"]
    problems = []
    arch = int(row["arch"][3:])
    if row["shared_bytes"] > SHARED_LIMIT[arch]:
        problems.append(
            f"{where}: {row['shared_bytes']} B shared memory > {SHARED_LIMIT[arch]} B limit"
        )
    if row["registers"] is None or row["spill_bytes"] is None:
        problems.append(f"{where}: no ptxas register report")
    elif row["dtype"] in HALF and row["spill_bytes"] > 0:
        problems.append(f"{where}: spills {row['spill_bytes']} B of registers")
    m = re.search(r"\bm(\d+)\b", row["config"])
    if (
        arch == 90
        and row["kernel"] in TENSOR_CORE_KERNELS
        and row["dtype"] in HALF
        and m is not None
        and int(m.group(1)) >= 64
        and row["wgmma"] == 0
    ):
        problems.append(f"{where}: no wgmma in the sm_90 PTX")
    return problems


SAMPLES = ("all", "ci", "minimal")


def sample(cases: Sequence[Case], which: str) -> list[Case]:
    """``all``; ``minimal``: one config of every kernel variant (each dtype, target and
    specialisation); ``ci``: minimal plus every config of the headline target (bf16, sm_90)."""
    if which not in SAMPLES:
        raise ValueError(f"sample must be one of {SAMPLES}, got {which!r}")
    if which == "all":
        return list(cases)
    seen: set[str] = set()
    out = []
    for c in cases:
        if c.variant not in seen or (which == "ci" and c.dtype == "bf16" and c.arch == 90):
            out.append(c)
        seen.add(c.variant)
    return out


def _compile_in_worker(case: Case) -> dict[str, Any]:
    return compile_case(case)


def run(
    archs: Sequence[int] = (90, 80),
    jobs: int = 2,
    presets: Sequence[str] = ("vit_b", "vit_l", "vit_h", "vit_tiny"),
    dtypes: Sequence[str] = ("bf16", "fp16", "fp32"),
    batches: Sequence[int] = (1, 8),
    prompts: Sequence[int] = (1, 64),
    progress: bool = False,
    which: str = "all",
) -> dict[str, Any]:
    """Record, expand and compile; returns ``{"env", "rows", "problems"}``."""
    import triton

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the AOT tier needs the Triton interpreter off (TRITON_INTERPRET=1)")
    t0 = time.perf_counter()
    launches = record_model_launches(presets, dtypes, batches, prompts)
    all_cases = expand(launches, archs)
    cases = sample(all_cases, which)
    # A fresh cache: cached kernels skip ptxas, so they would report no registers.
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        rows = []
        with ProcessPoolExecutor(jobs) if jobs > 1 else contextlib.nullcontext() as pool:
            done = pool.map(_compile_in_worker, cases) if pool else map(compile_case, cases)
            for i, row in enumerate(done, 1):
                rows.append(row)
                if progress:
                    state = row["error"] or (
                        f"{row['registers']} regs, {row['spill_bytes']} B spill, "
                        f"{row['shared_bytes'] // 1024} KB smem, {row['wgmma']} wgmma"
                    )
                    print(f"[aot] {i}/{len(cases)} {row['kernel']} {row['dtype']} "
                          f"[{row['config']}] {row['arch']}: {state}", flush=True)  # fmt: skip
    problems = [p for row in rows for p in check_row(row)]
    return {
        "env": {
            "triton": triton.__version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "archs": [f"sm_{a}" for a in archs],
            "launches_recorded": len(launches),
            "sample": which,
            "cases_total": len(all_cases),
            "cases": len(rows),
            "seconds": round(time.perf_counter() - t0, 1),
        },
        "rows": rows,
        "problems": problems,
    }


def _fmt(v: Any) -> str:
    return "-" if v is None else str(v)


def markdown(result: dict[str, Any], commit: str = "") -> str:
    """The committed report: one row per compiled case, then the problems."""
    env = result["env"]
    lines = [
        "# Ahead-of-time compile report (Triton kernels, no GPU needed)",
        "",
        "<!-- generated by `python -m samhq_fast.kernels.aot --report ...`; do not edit -->",
        "",
        f"triton {env['triton']}, torch {env['torch']}, python {env['python']}, targets "
        f"{', '.join(env['archs'])}{f', commit `{commit}`' if commit else ''}: "
        f"{env['launches_recorded']} kernel launches recorded from vit_b/l/h/tiny at 1024 px "
        f"(bf16, fp16, fp32; encoder batch 1 and 8; decoder 1 and 64 prompts, with and without "
        f"a mask prompt), expanded over every autotune config into {env['cases_total']} "
        f"distinct compiles; {env['cases']} compiled here (sample `{env['sample']}`) in "
        f"{env['seconds']} s.",
        "",
        "Registers and spills are ptxas's own report (`-v`, as triton runs it); shared memory is "
        "what the kernel asks for at launch; wgmma / mma count the tensor-core instructions in "
        "the PTX (sm_90 half-precision GEMM and attention tiles of 64 rows or more must use "
        "wgmma; smaller ones run mma.sync). Checks: no compile error, shared memory within the "
        "target's limit (sm_90 227 KB, sm_80 163 KB), no spill in a half-precision config.",
        "",
        f"**Problems: {len(result['problems'])}**",
        "",
    ]
    lines += [f"- {p}" for p in result["problems"]]
    lines += [
        "",
        "Per kernel, precision and target (the worst case over its configs and specialisations):",
        "",
        "| kernel | precision | arch | compiles | max registers | max spill (B) | max shared (KB) "
        "| with wgmma | with mma |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list] = {}
    for r in result["rows"]:
        if not r["error"]:
            prec = "fp32" if r["dtype"] == "fp32" else "bf16/fp16"
            groups.setdefault((r["kernel"], prec, r["arch"]), []).append(r)
    for (kernel, prec, arch), rs in sorted(groups.items()):
        lines.append(
            f"| {kernel} | {prec} | {arch} | {len(rs)} "
            f"| {max(r['registers'] or 0 for r in rs)} | {max(r['spill_bytes'] or 0 for r in rs)} "
            f"| {max(r['shared_bytes'] for r in rs) / 1024:.1f} "
            f"| {sum(r['wgmma'] > 0 for r in rs)} | {sum(r['mma'] > 0 for r in rs)} |"
        )
    lines += [
        "",
        "Every compile (rows that look alike differ in how triton specialises their integer "
        "arguments and strides: divisible by 16 or not, equal to 1):",
        "",
        "| kernel | variant | dtype | config | arch | registers | spills (B) | shared (KB) "
        "| wgmma | mma | used by |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    key = lambda r: (r["kernel"], r["variant"], r["dtype"], r["arch"], r["config"])  # noqa: E731
    for r in sorted(result["rows"], key=key):
        used = r["origins"][0] + (f" (+{len(r['origins']) - 1})" if len(r["origins"]) > 1 else "")
        if r["error"]:
            lines.append(
                f"| {r['kernel']} | {r['variant']} | {r['dtype']} | {r['config']} | {r['arch']} "
                f"| error: {r['error']} | | | | | {used} |"
            )
            continue
        lines.append(
            f"| {r['kernel']} | {r['variant']} | {r['dtype']} | {r['config']} | {r['arch']} "
            f"| {_fmt(r['registers'])} | {_fmt(r['spill_bytes'])} "
            f"| {r['shared_bytes'] / 1024:.1f} | {r['wgmma']} | {r['mma']} | {used} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SHARED_LIMIT))
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--presets", default="vit_b,vit_l,vit_h,vit_tiny")
    p.add_argument("--dtypes", default="bf16,fp16,fp32")
    p.add_argument("--sample", choices=SAMPLES, default="all",
                   help="all cases; ci: every variant once + every bf16 sm_90 config; minimal: "
                   "every variant once")  # fmt: skip
    p.add_argument("--json", help="write the full result here")
    p.add_argument("--report", help="write the markdown report here")
    p.add_argument("--commit", default="", help="commit named in the report")
    a = p.parse_args(argv)
    result = run(a.arch, a.jobs, a.presets.split(","), a.dtypes.split(","), progress=True,
                 which=a.sample)  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    if a.report:
        with open(a.report, "w") as f:
            f.write(markdown(result, a.commit))
    env = result["env"]
    print(f"[aot] triton {env['triton']}: {env['cases']} compiles for {env['archs']} "
          f"in {env['seconds']} s, {len(result['problems'])} problems")  # fmt: skip
    for problem in result["problems"]:
        print(f"[aot] PROBLEM {problem}")
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
