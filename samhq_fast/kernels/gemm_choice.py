"""The measured choice among GEMM implementations, per shape, cached per GPU model.

The fused linear (:mod:`samhq_fast.kernels.linear`) has several candidates for the large-M
GEMMs of the encoder (the Triton GEMM, cuBLAS + the epilogue pass, the Hopper TMA GEMM where it
applies). Which is fastest depends on the GPU, the shape and the epilogue, so it is measured,
never guessed: the first time a key (dtype, M bucket, N, K, epilogue, output dtype) is seen on a
CUDA device, every candidate is timed (``triton.testing.do_bench``, after a warm-up run that also
lets Triton autotune) and the fastest is kept. Choices are stored in
``<cache dir>/gemm-choice-<gpu model>.json`` (cache dir: ``$SAMHQ_FAST_CACHE_DIR``, read when the
cache is first needed, else ``~/.cache/samhq_fast``), tagged with the torch and triton versions
(a mismatch measures again), loaded once per process and written atomically.

Nothing is measured or cached where it would be meaningless or unsafe: without CUDA (the Triton
interpreter on CPU, meta tensors of the ahead-of-time recorder) and while a CUDA graph is being
captured, an unknown key runs the first candidate (the Triton GEMM) and is not stored.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["GemmChoice", "CHOICE", "measured_choices"]

Candidate = Callable[[], torch.Tensor]


def _versions() -> dict[str, str]:
    import triton

    return {"torch": torch.__version__, "triton": triton.__version__}


def _do_bench(fn: Candidate) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=25))


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


class GemmChoice:
    """Per-GPU-model cache of measured GEMM choices (thread-safe).

    ``timer(fn) -> ms``, ``device_name(device) -> str``, ``capturing() -> bool`` and ``versions()``
    are injectable so that the logic is testable without a GPU.
    """

    def __init__(
        self,
        timer: Callable[[Candidate], float] = _do_bench,
        device_name: Callable[[torch.device], str] | None = None,
        capturing: Callable[[], bool] | None = None,
        versions: Callable[[], dict[str, str]] = _versions,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        self._timer = timer
        self._device_name = device_name or (lambda d: torch.cuda.get_device_name(d))
        self._capturing = capturing or torch.cuda.is_current_stream_capturing
        self._versions = versions
        self._cache_dir = cache_dir
        self._lock = threading.RLock()
        self._files: dict[str, dict[str, Any]] = {}  # gpu slug -> file content

    # ------------------------------------------------------------------------- the cache
    def cache_dir(self) -> Path:
        d = self._cache_dir or os.environ.get("SAMHQ_FAST_CACHE_DIR")
        return Path(d) if d else Path.home() / ".cache" / "samhq_fast"

    def path(self, gpu: str) -> Path:
        return self.cache_dir() / f"gemm-choice-{_slug(gpu)}.json"

    def _load(self, gpu: str) -> dict[str, Any]:
        slug = _slug(gpu)
        data = self._files.get(slug)
        if data is not None:
            return data
        fresh = {"device": gpu, **self._versions(), "entries": {}}
        path = self.path(gpu)
        data = fresh
        if path.exists():
            try:
                loaded = json.loads(path.read_text())
                if not isinstance(loaded, dict) or not isinstance(loaded.get("entries"), dict):
                    raise ValueError("no 'entries' table")
                if all(loaded.get(k) == v for k, v in self._versions().items()):
                    data = loaded  # else: other torch/triton, measure again
            except (OSError, ValueError) as e:
                warnings.warn(f"ignoring the GEMM choice cache {path}: {e}", stacklevel=3)
        self._files[slug] = data
        return data

    def _save(self, gpu: str, data: dict[str, Any]) -> None:
        path = self.path(gpu)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=path.name, dir=path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)  # atomic: a reader sees the old file or the new one
        except OSError as e:
            warnings.warn(f"could not write the GEMM choice cache {path}: {e}", stacklevel=3)

    # ------------------------------------------------------------------------ the choice
    def choose(
        self,
        key: str,
        info: dict[str, Any],
        candidates: dict[str, Candidate],
        device: torch.device,
    ) -> str:
        """The name of the candidate to run for ``key`` (measured on first sight on CUDA).

        ``candidates`` maps names to zero-argument runs of the op (the first is the default);
        ``info`` (shape, dtype, epilogue) is stored beside the timings.
        """
        names = list(candidates)
        if device.type != "cuda" or len(names) == 1:
            return names[0]
        gpu = self._device_name(device)
        with self._lock:
            entry = self._load(gpu)["entries"].get(key)
            if entry is not None and entry.get("choice") in candidates:
                return entry["choice"]
            if self._capturing():  # no timing inside a graph capture; not stored
                return names[0]
            times = {name: self._timer(fn) for name, fn in candidates.items()}
            choice = min(names, key=lambda n: (times[n], names.index(n)))
            data = self._load(gpu)
            data["entries"][key] = {**info, **{f"{n}_ms": t for n, t in times.items()},
                                    "choice": choice}  # fmt: skip
            self._save(gpu, data)
            return choice

    def measured(self) -> list[dict[str, Any]]:
        """Every choice loaded or measured in this process: ``{"device", "key", ...}`` rows."""
        with self._lock:
            return [
                {"device": data["device"], "key": key, **entry}
                for data in self._files.values()
                for key, entry in sorted(data["entries"].items())
            ]


CHOICE = GemmChoice()  # the process's cache (nothing is read until a CUDA GEMM needs it)


def measured_choices() -> list[dict[str, Any]]:
    """The GEMM choices this process has loaded or measured (for reports)."""
    return CHOICE.measured()
