"""What a benchmark record says about where it ran: device, versions, commit, machine load.

Nothing here imports triton, transformers or the official package: versions are read from the
installed distributions' metadata.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

# Dense (no structured sparsity) tensor-core peaks in TFLOP/s from the vendors' data sheets, per
# dtype. fp32 is the plain (non-TF32) FP32 peak, which is what PyTorch uses by default
# (torch.backends.cuda.matmul.allow_tf32 is False); "tf32" applies when TF32 is switched on.
# Keys are matched against torch.cuda.get_device_name() by `device_peak_tflops`, in order.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200 NVL": {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},  # SXM5 (HBM3)
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


def device_peak_tflops(device_name: str, dtype: str, tf32: bool = False) -> float | None:
    """Dense peak TFLOP/s of a CUDA device for ``dtype`` (``"fp32"``, ``"bf16"``, ``"fp16"``);
    ``None`` when unknown (every CPU, GPUs not in :data:`PEAK_TFLOPS`)."""
    name = device_name.upper()
    for key, peaks in PEAK_TFLOPS.items():
        if all(part.upper() in name for part in key.split()):
            if dtype == "fp32" and tf32:
                return peaks["tf32"]
            return peaks.get(dtype)
    return None


def cpu_name() -> str:
    """CPU model from /proc/cpuinfo (with family/model numbers when the name is vague) and the
    number of CPUs this process may use."""
    model = family = number = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name" and model is None:
                model = value
            elif key == "cpu family" and family is None:
                family = value
            elif key == "model" and number is None:
                number = value
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    if family is not None and number is not None and len(model.split()) <= 3:
        model = f"{model} (family {family} model {number})"
    try:
        ncpu = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        ncpu = os.cpu_count() or 0
    return f"{model}, {ncpu} CPUs"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def slugify(text: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(name: str) -> str:
    """File-name slug of a device name; CPUs get a ``cpu-`` prefix and no family numbers."""
    if name.startswith(("NVIDIA", "AMD Instinct")) or "GPU" in name:
        return slugify(name)
    model, _, cpus = name.rpartition(", ")
    model = re.sub(r"\(family.*?\)", "", model or name)
    model = re.sub(r"\b\d+-Core Processor\b|\bProcessor\b|\(R\)|\(TM\)|\bCPU\b", "", model)
    return "cpu-" + slugify(f"{model} {cpus.replace(' CPUs', 'c')}")


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def git_commit() -> str:
    """``git rev-parse --short HEAD``, plus ``-dirty`` when the work tree has any change
    (untracked files included); ``"unknown"`` outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if status else "")


@functools.cache
def versions() -> dict[str, str | None]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _dist_version("triton"),
        "transformers": _dist_version("transformers"),
        "segment_anything_hq": _dist_version("segment-anything-hq"),
        "pytest_benchmark": _dist_version("pytest-benchmark"),
        "numpy": _dist_version("numpy"),
    }


def load_average() -> tuple[float, float, float] | None:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except OSError:
        return None


def environment(device: torch.device | str) -> dict[str, Any]:
    """The fields every record carries (besides its own measurements)."""
    device = torch.device(device)
    name = device_name(device)
    env: dict[str, Any] = {
        "device": name,
        "device_type": device.type,
        "device_slug": device_slug(name),
        "commit": git_commit(),
        "torch_threads": torch.get_num_threads(),
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32) if device.type == "cuda" else None,
    }
    env.update({f"{k}_version": v for k, v in versions().items()})
    return env
