"""Running the mask decoder at a few fixed shapes: prompt-count buckets, torch.compile and CUDA
graphs.

A decoder call for ``P`` prompts is padded to the smallest bucket ``>= P`` (copies of the last
prompt, whose outputs are dropped; prompts never interact, so the kept outputs are unchanged) and
calls over the largest bucket are split into chunks of it. On CUDA each (images, bucket, tokens)
shape is captured once as a CUDA graph: the decoder is a few dozen small kernels, bound by launch
latency, and a graph replays them in one launch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

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
        with torch.cuda.graph(self.graph, pool=pool):
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
        self.fn = fn
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
        with self._lock:  # one replay at a time: the static buffers are shared
            graph = self.graphs.get(key)
            if graph is None:
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                graph = self.graphs[key] = _Graph(self.fn, args, self._pool)
            return graph(args)
