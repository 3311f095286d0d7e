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


def resolve_cuda_graphs(cuda_graphs: bool | None, device: torch.device | str) -> bool:
    """The ``cuda_graphs`` a :class:`~samhq_fast.predictor.Predictor` runs with: ``None`` (the
    default) means on for a CUDA model, whatever the backend and whether or not it is compiled
    (the decoder is launch-bound: a graph replays its ~80 kernels in one launch), and off
    elsewhere; ``True`` needs CUDA (``ValueError``); ``False`` is off."""
    device = torch.device(device)
    if cuda_graphs is None:
        return device.type == "cuda"
    if not isinstance(cuda_graphs, bool):
        raise TypeError(f"cuda_graphs must be a bool or None, got {cuda_graphs!r}")
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs a CUDA model, this one is on {device}")
    return cuda_graphs


def _source_key(t: torch.Tensor) -> tuple:
    """Where ``t``'s data starts, its layout, and the version counter that every in-place write
    bumps (inference tensors have none: they cannot be written outside inference mode, and
    :class:`~samhq_fast.predictor.ImageEmbedding` never writes them)."""
    try:
        version = t._version
    except RuntimeError:  # an inference tensor
        version = None
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device, version)


class StaticInputs:
    """Static input tensors of captured graphs, refilled from a call's arguments only when they
    come from a different source than the last fill.

    The decoder's image-side inputs (image embeddings, positional encoding, a per-image dense
    prompt, HQ features: several MB per image) are the same tensors for every prompt of an image,
    so a graph replay copies them once per image, not once per call. ``bind(srcs)`` copies
    ``srcs[i]`` into ``self.tensors[i]`` unless it views the same memory, at the same offset and
    layout, as the source copied last, which has not been written since (version counter). The
    last source is held (a strong reference: its memory cannot be freed and reused by another
    tensor meanwhile; one image's inputs per image shape stay alive until another is bound, or
    :meth:`invalidate`). Not thread-safe by itself: the caller serialises bind + replay.
    """

    def __init__(self, like: Sequence[torch.Tensor]) -> None:
        # Dense buffers (an expanded, stride-0 source too): a graph is captured on them once.
        self.tensors = tuple(torch.empty(a.shape, dtype=a.dtype, device=a.device) for a in like)
        self._bound: list[tuple[torch.Tensor, tuple] | None] = [None] * len(self.tensors)
        self.copies = 0  # number of tensors copied so far (tests, diagnostics)

    def bind(self, srcs: Sequence[torch.Tensor]) -> int:
        """Make the static tensors hold ``srcs``; returns how many had to be copied."""
        copied = 0
        for i, (dst, src) in enumerate(zip(self.tensors, srcs, strict=True)):
            key = _source_key(src)
            bound = self._bound[i]
            if bound is not None and bound[1] == key:
                continue
            dst.copy_(src)
            self._bound[i] = (src, key)
            copied += 1
        self.copies += copied
        return copied

    def invalidate(self) -> None:
        """Forget (and release) the sources: the next :meth:`bind` copies everything."""
        self._bound = [None] * len(self.tensors)


class CudaGraph:
    """One captured decoder call on its static inputs: ``replay()`` returns fresh outputs."""

    def __init__(self, fn: DecoderFn, inputs: tuple[torch.Tensor, ...], pool: Any) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture: autotune, compile, cuBLAS
            for _ in range(2):
                fn(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (e.g. an embed()) cannot abort the capture.
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.outputs = fn(*inputs)

    @staticmethod
    def new_pool() -> Any:
        return torch.cuda.graph_pool_handle()

    def replay(self) -> tuple[torch.Tensor, ...]:
        self.graph.replay()
        return tuple(o.clone() for o in self.outputs)  # the next replay overwrites them


class DecoderRunner:
    """``predict_masks(emb, pe, sparse, dense, hq)`` with bucketed prompt counts.

    Args:
      fn: the decoder's ``predict_masks`` (already wrapped in ``torch.compile`` if wanted).
      buckets: prompt-count buckets; ``None`` runs every shape as is (eager default).
      cuda_graphs: capture one CUDA graph per shape (CUDA tensors only).
      prepare: called before every call, outside any capture or compiled region (the decoder's
        :meth:`~samhq_fast.modeling.mask_decoder.MaskDecoderHQ.prepare_fused`: it refreshes,
        in place, derived weights that a graph reads).
      graph_cls: the graph implementation (default :class:`CudaGraph`; tests pass an eager
        stand-in, which then runs on any device).

    Under graphs the image side of a call (embeddings, positional encoding, a per-image dense
    prompt, HQ features) lives in :class:`StaticInputs` shared by every bucket of one image
    shape, copied only when a call brings another image; the prompts are copied per call.
    """

    def __init__(
        self,
        fn: DecoderFn,
        buckets: Sequence[int] | None,
        cuda_graphs: bool = False,
        prepare: Callable[[], None] | None = None,
        graph_cls: type | None = None,
    ) -> None:
        self.fn = FirstUseGuard(fn)
        self.buckets = check_buckets(buckets) if buckets is not None else None
        self.cuda_graphs = cuda_graphs
        self.prepare = prepare
        self.graph_cls = graph_cls or CudaGraph
        self.graphs: dict[tuple, Any] = {}
        self.image_inputs: dict[tuple, StaticInputs] = {}
        self.prompt_inputs: dict[tuple, StaticInputs] = {}
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
        if self.prepare is not None:
            self.prepare()
        return self._call(image_embeddings, image_pe, sparse, dense, hq_features)

    def _call(self, image_embeddings, image_pe, sparse, dense, hq_features):
        P = sparse.shape[1]
        if self.buckets is None or P == 0:
            return self.fn(image_embeddings, image_pe, sparse, dense, hq_features)
        top = self.buckets[-1]
        if P > top:  # chunks of the largest bucket
            parts = [
                self._call(
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
        if self.cuda_graphs and (sparse.is_cuda or self.graph_cls is not CudaGraph):
            masks, iou = self._replay(args)
        else:
            masks, iou = self.fn(*args)
        return masks[:, :P], iou[:, :P]

    def _replay(self, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        emb, pe, sparse, dense, hq = args
        per_image_dense = dense.dim() == 4
        image = (emb, pe, dense, hq) if per_image_dense else (emb, pe, hq)
        prompt = (sparse,) if per_image_dense else (sparse, dense)
        image_key = tuple((tuple(a.shape), a.dtype, a.device) for a in image)
        key = (image_key, tuple((tuple(a.shape), a.dtype, a.device) for a in prompt))
        graph = self.graphs.get(key)
        if graph is None:
            # Warm-up (autotune, compile) and capture alone: no other launch of ours overlaps.
            with KERNEL_LOCK.exclusive(), self._lock:
                graph = self.graphs.get(key)  # another thread may have captured it meanwhile
                if graph is None:
                    statics = self._statics(image_key, key, image, prompt)
                    statics[0].bind(image)
                    statics[1].bind(prompt)
                    if self._pool is None and self.graph_cls is CudaGraph:
                        self._pool = CudaGraph.new_pool()
                    graph = self.graphs[key] = self.graph_cls(
                        self.fn.fn, self._order(statics, per_image_dense), self._pool
                    )
        with KERNEL_LOCK.shared(), self._lock:  # one replay at a time: shared static buffers
            self.image_inputs[image_key].bind(image)
            self.prompt_inputs[key].bind(prompt)
            return graph.replay()

    def _statics(self, image_key, key, image, prompt) -> tuple[StaticInputs, StaticInputs]:
        if image_key not in self.image_inputs:
            self.image_inputs[image_key] = StaticInputs(image)
        if key not in self.prompt_inputs:
            self.prompt_inputs[key] = StaticInputs(prompt)
        return self.image_inputs[image_key], self.prompt_inputs[key]

    @staticmethod
    def _order(statics: tuple[StaticInputs, StaticInputs], per_image_dense: bool) -> tuple:
        """The static tensors in ``predict_masks`` argument order."""
        image, prompt = statics[0].tensors, statics[1].tensors
        if per_image_dense:
            emb, pe, dense, hq = image
            return emb, pe, prompt[0], dense, hq
        emb, pe, hq = image
        return emb, pe, prompt[0], prompt[1], hq
