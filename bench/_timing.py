"""Timing, memory and error measurements shared by the benchmark files.

Every timed call ends with ``torch.cuda.synchronize()`` on CUDA. Warm-up (compilation,
autotuning, allocator growth) runs in pytest-benchmark's pedantic warm-up rounds, outside the
timed rounds. Latency percentiles come from the timed rounds' raw data.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from bench._env import device_peak_tflops, environment, load_average

# What peak_mem_mb means, per device type.
MEM_KIND = {
    "cuda": "CUDA: torch.cuda.max_memory_allocated() during the warm-up and timed rounds minus "
    "memory_allocated() before them (model and inputs excluded)",
    "cpu": "CPU: peak RSS increase over the RSS before the warm-up and timed rounds (freed heap "
    "returned to the OS first with malloc_trim; sampled every 2 ms in a thread; a lower bound)",
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(data: list[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100) of ``data``."""
    return float(np.percentile(np.asarray(data, dtype=np.float64), q))


def release_free_memory() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``), so that an RSS increase
    measures this case's allocations rather than reusing pages a previous case left resident."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    """Samples the process RSS in a thread; ``peak_increase`` in bytes (``None`` off Linux)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak_increase: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RssPeak:
        try:
            self._base = _rss_bytes()
        except (OSError, ValueError):
            return self
        self._peak = self._base

        def sample() -> None:
            while not self._stop.is_set():
                self._peak = max(self._peak, _rss_bytes())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.peak_increase = self._peak - self._base


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def skip_oom(err: BaseException, what: str) -> None:
    """Free cached CUDA memory and skip the case (OOM is a result, recorded as a skip)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    pytest.skip(f"{what}: out of memory ({str(err).splitlines()[0][:200]})")


def measure_case(impl: str, label: str, **kwargs: Any) -> Any:
    """:func:`measure`, where a peer that fails to run the case (e.g. in bf16) skips it with the
    error as the reason; our own failures fail the benchmark. Out of memory skips any case."""
    try:
        return measure(**kwargs)
    except pytest.skip.Exception:
        raise
    except Exception as err:
        if is_oom(err):
            skip_oom(err, label)
        if impl == "ours":
            raise
        msg = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        pytest.skip(f"{label} fails here: {type(err).__name__}: {msg}")


def measure(
    benchmark: Any,
    fn: Callable[[], Any],
    *,
    device: torch.device,
    rounds: int,
    warmup_rounds: int,
    flops: float | None,
    items: int,
    item_name: str,
    dtype: str,
    info: dict[str, Any],
) -> Any:
    """Time ``fn`` with ``benchmark.pedantic``; fill ``benchmark.extra_info``; return the last
    round's output (for the error check).

    ``flops`` per call (``None``: unknown), ``items`` per call (images or prompts) for the
    throughput column ``<item_name>_per_s``.
    """

    def timed() -> Any:
        out = fn()
        synchronize(device)
        return out

    load_start = load_average()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        release_free_memory()
    rss = RssPeak() if device.type == "cpu" else contextlib.nullcontext()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    with rss:
        out = benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = rss.peak_increase

    record: dict[str, Any] = dict(info)
    record.update(environment(device))
    record.update(
        dtype=dtype,
        rounds=rounds,
        warmup_rounds=warmup_rounds,
        loadavg_start=load_start,
        loadavg_end=load_average(),
        peak_mem_mb=None if peak is None else round(peak / 2**20, 1),
        peak_mem_kind=MEM_KIND.get(device.type),
        flops=flops,
        item_name=item_name,
        items_per_call=items,
        # Process CPU time over wall time, warm-up included: about torch_threads when the case
        # had the CPUs to itself, less when other work took them (a per-case load indicator).
        cpu_util=round(cpu / wall, 2) if wall > 0 else None,
        cpu_ms_per_call=round(1e3 * cpu / (rounds + warmup_rounds), 3),
    )
    stats = getattr(benchmark, "stats", None)
    data = list(stats.stats.data) if stats is not None else []
    if data:  # empty with --benchmark-disable
        med = percentile(data, 50)
        tflops = None if flops is None else flops / med / 1e12
        peak_tflops = device_peak_tflops(record["device"], dtype, bool(record.get("tf32")))
        record.update(
            median_ms=round(med * 1e3, 4),
            p20_ms=round(percentile(data, 20) * 1e3, 4),
            p80_ms=round(percentile(data, 80) * 1e3, 4),
            rounds_ms=[round(t * 1e3, 3) for t in data],
            tflops=None if tflops is None else round(tflops, 4),
            peak_tflops=peak_tflops,
            pct_of_peak=(
                None
                if tflops is None or peak_tflops is None
                else round(100 * tflops / peak_tflops, 2)
            ),
        )
        record[f"{item_name}_per_s"] = round(items / med, 4)
    benchmark.extra_info.update(record)
    return out


# ------------------------------------------------------------------------------- errors
def max_abs_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.detach().float().cpu() - ref.detach().float().cpu()).abs().max())


def mask_iou(out: torch.Tensor, ref: torch.Tensor, threshold: float = 0.0) -> float:
    """Worst IoU over the leading (image / prompt) dimension of ``out > threshold`` vs
    ``ref > threshold`` (boolean masks are taken as they are); 1.0 where both are empty."""
    a = out.detach().cpu()
    b = ref.detach().cpu()
    a = a if a.dtype == torch.bool else a.float() > threshold
    b = b if b.dtype == torch.bool else b.float() > threshold
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    inter = (a & b).sum(1).double()
    union = (a | b).sum(1).double()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return float(iou.min())


def error_record(
    logits: torch.Tensor | None,
    ref_logits: torch.Tensor | None,
    masks: torch.Tensor,
    ref_masks: torch.Tensor,
    what: str,
) -> dict[str, Any]:
    """``max_abs_err`` (of ``logits`` vs ``ref_logits``), ``ref_scale`` (max |ref|), ``rel_err``
    and ``mask_iou`` (of the masks, threshold 0), with what was compared."""
    rec: dict[str, Any] = {"error_of": what}
    if logits is not None and ref_logits is not None:
        err = max_abs_error(logits, ref_logits)
        scale = float(ref_logits.detach().float().abs().max())
        rec.update(max_abs_err=err, ref_scale=scale, rel_err=err / scale if scale else None)
    rec["mask_iou"] = mask_iou(masks, ref_masks)
    return rec


def fresh_dynamo() -> None:
    """Start a compiled case from an empty Dynamo cache. The cases' closures share one code
    object per benchmark, so without a reset they pile up recompiles, and past Dynamo's
    recompile limit it silently runs them eagerly."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def compile_record() -> dict[str, Any]:
    """Did the compiled case really compile? (``compiled: False`` = it ran eagerly, and the
    report flags it: such a row is never a "compile" figure.)"""
    from torch._dynamo.utils import counters

    graphs = int(counters["stats"]["unique_graphs"])
    return {
        "compiled": graphs > 0,
        "compiled_graphs": graphs,
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }
