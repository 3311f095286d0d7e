"""Running the mask decoder at a few fixed shapes: prompt-count buckets, torch.compile and CUDA
graphs.

A decoder call for ``P`` prompts is padded to the smallest bucket ``>= P`` (copies of the last
prompt, whose outputs are dropped; prompts never interact, so the kept outputs are unchanged) and
calls over the largest bucket are split into chunks of it. On CUDA each (images, bucket, tokens)
shape is captured once as a CUDA graph: the decoder is a few dozen small kernels, bound by launch
latency, and a graph replays them in one launch.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

PROMPT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)

DecoderFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def bucket_for(p: int, buckets: Sequence[int]) -> int:
    """The smallest bucket ``>= p`` (``p`` <= the largest bucket)."""
    for b in buckets:
        if b >= p:
            return b
    raise ValueError(f"{p} prompts exceed the largest bucket {buckets[-1]}")


def check_buckets(buckets: Sequence[int]) -> tuple[int, ...]:
    out = tuple(int(b) for b in buckets)
    if not out or any(b <= 0 for b in out) or list(out) != sorted(set(out)):
        raise ValueError(f"prompt_buckets must be increasing positive integers, got {buckets!r}")
    return out


class FirstUseLock:
    """Calls at shapes already seen run concurrently; the first call at a new shape runs alone.

    The first call at a shape is where Triton autotunes (its autotuner keeps per-call state on
    the kernel object, shared by every thread), ``torch.compile`` compiles and a CUDA graph is
    captured. Those must not overlap any other kernel launch of ours, so they take the lock
    exclusively; every other call takes it shared. Re-entrant for the thread that holds it
    exclusively. One lock serves the whole process (the kernels are module-level objects).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._owner: int | None = None  # thread holding it exclusively
        self._depth = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        me = threading.get_ident()
        if self._owner == me:  # inside our own exclusive section
            yield
            return
        with self._cond:
            while self._owner is not None:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            if self._owner != me:
                while self._owner is not None or self._readers:
                    self._cond.wait()
                self._owner = me
            self._depth += 1
        try:
            yield
        finally:
            with self._cond:
                self._depth -= 1
                if self._depth == 0:
                    self._owner = None
                    self._cond.notify_all()


KERNEL_LOCK = FirstUseLock()


def shape_key(args: Sequence[Any]) -> tuple:
    """What makes a call a new one for compile / autotune / capture: shapes, dtypes, devices
    (and strides: a kernel may be specialised on them) of the tensor arguments."""
    return tuple(
        (tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else a
        for a in args
    )


class FirstUseGuard:
    """``guard(fn)(*args)``: ``fn(*args)`` under :data:`KERNEL_LOCK`, exclusively on the first
    call of each :func:`shape_key`, shared after."""

    def __init__(self, fn: Callable[..., Any], lock: FirstUseLock = KERNEL_LOCK) -> None:
        self.fn, self.lock = fn, lock
        self._seen: set[tuple] = set()

    def __call__(self, *args: Any) -> Any:
        key = shape_key(args)
        if key in self._seen:
            with self.lock.shared():
                return self.fn(*args)
        with self.lock.exclusive():
            out = self.fn(*args)
            self._seen.add(key)
            return out


class _Graph:
    """One captured decoder call: static inputs, the graph, static outputs."""

    def __init__(self, fn: DecoderFn, args: tuple[torch.Tensor, ...], pool) -> None:
        self.inputs = tuple(a.clone() for a in args)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture: autotune, compile, cuBLAS
            for _ in range(2):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (e.g. an embed()) cannot abort the capture.
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.outputs = fn(*self.inputs)

    def __call__(self, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        for dst, src in zip(self.inputs, args, strict=True):
            dst.copy_(src)
        self.graph.replay()
        return tuple(o.clone() for o in self.outputs)  # the next replay overwrites them


class DecoderRunner:
    """``predict_masks(emb, pe, sparse, dense, hq)`` with bucketed prompt counts.

    Args:
      fn: the decoder's ``predict_masks`` (already wrapped in ``torch.compile`` if wanted).
      buckets: prompt-count buckets; ``None`` runs every shape as is (eager default).
      cuda_graphs: capture one CUDA graph per shape (CUDA tensors only).
    """

    def __init__(
        self, fn: DecoderFn, buckets: Sequence[int] | None, cuda_graphs: bool = False
    ) -> None:
        self.fn = FirstUseGuard(fn)
        self.buckets = check_buckets(buckets) if buckets is not None else None
        self.cuda_graphs = cuda_graphs
        self.graphs: dict[tuple, _Graph] = {}
        self._pool = None
        self._lock = threading.Lock()

    def __call__(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        hq_features: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Shapes as :meth:`MaskDecoderHQ.predict_masks`: masks ``(B, P, 5, H, W)``, iou
        ``(B, P, 4)``."""
        P = sparse.shape[1]
        if self.buckets is None or P == 0:
            return self.fn(image_embeddings, image_pe, sparse, dense, hq_features)
        top = self.buckets[-1]
        if P > top:  # chunks of the largest bucket
            parts = [
                self(
                    image_embeddings,
                    image_pe,
                    sparse[:, s : s + top],
                    dense[:, s : s + top] if dense.dim() == 5 else dense,
                    hq_features,
                )
                for s in range(0, P, top)
            ]
            return torch.cat([m for m, _ in parts], 1), torch.cat([i for _, i in parts], 1)
        Pb = bucket_for(P, self.buckets)
        if Pb != P:
            sparse = torch.cat([sparse, sparse[:, -1:].expand(-1, Pb - P, -1, -1)], 1)
            if dense.dim() == 5:
                dense = torch.cat([dense, dense[:, -1:].expand(-1, Pb - P, -1, -1, -1)], 1)
        args = (image_embeddings, image_pe, sparse, dense, hq_features)
        if self.cuda_graphs and sparse.is_cuda:
            masks, iou = self._replay(args)
        else:
            masks, iou = self.fn(*args)
        return masks[:, :P], iou[:, :P]

    def _replay(self, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        key = tuple((tuple(a.shape), a.dtype, a.device) for a in args)
        graph = self.graphs.get(key)
        if graph is None:
            # Warm-up (autotune, compile) and capture alone: no other launch of ours overlaps.
            with KERNEL_LOCK.exclusive(), self._lock:
                graph = self.graphs.get(key)  # another thread may have captured it meanwhile
                if graph is None:
                    if self._pool is None:
                        self._pool = torch.cuda.graph_pool_handle()
                    graph = self.graphs[key] = _Graph(self.fn.fn, args, self._pool)
        with KERNEL_LOCK.shared(), self._lock:  # one replay at a time: shared static buffers
            return graph(args)
