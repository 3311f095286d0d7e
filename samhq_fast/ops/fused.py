"""The set of fused ops a model runs with, chosen once when the model is built.

``build("reference")`` gives the plain-PyTorch references (the oracle, and a way to test the fused
model structure itself on CPU); ``build("torch")`` the fast pure-PyTorch ops (SDPA attention,
native-dtype GEMMs, ``samhq_fast.ops.fast_torch``), for any device; ``build("triton")`` the Triton
kernels, registered as ``torch.library`` custom ops with fake implementations so that
``torch.compile`` can trace them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Op = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class FusedOps:
    """One implementation of every fused op (see the ``samhq_fast.ops`` module of each)."""

    backend: str
    layer_norm: Op
    add_layer_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    layer_norm_2d: Op
    linear: Op
    rel_pos_attention: Op
    decoder_attention: Op
    # Convolutions of the neck and the decoder: cuDNN / oneDNN for every backend, but the fast
    # PyTorch path runs them in its GEMM dtype and channels-last (samhq_fast.ops.fast_torch).
    conv2d: Op = F.conv2d
    conv_transpose2d: Op = F.conv_transpose2d


def build(backend: str) -> FusedOps:
    """``"reference"``: references; ``"torch"``: fast PyTorch; ``"triton"``: kernels (imports
    triton)."""
    if backend == "torch":
        from samhq_fast.ops import fast_torch as f
        from samhq_fast.ops.attention import rel_pos_attention_sdpa

        return FusedOps(
            "torch",
            f.layer_norm,
            f.add_layer_norm,
            f.layer_norm_2d,
            f.linear,
            rel_pos_attention_sdpa,
            f.decoder_attention,
            f.conv2d,
            f.conv_transpose2d,
        )
    if backend == "reference":
        from samhq_fast.ops.attention import rel_pos_attention_reference
        from samhq_fast.ops.decoder_attention import decoder_attention_reference
        from samhq_fast.ops.layer_norm import (
            add_layer_norm_reference,
            layer_norm_2d_reference,
            layer_norm_reference,
        )
        from samhq_fast.ops.linear import linear_reference

        return FusedOps(
            "reference",
            layer_norm_reference,
            add_layer_norm_reference,
            layer_norm_2d_reference,
            linear_reference,
            rel_pos_attention_reference,
            decoder_attention_reference,
        )
    if backend != "triton":
        raise ValueError(f"backend must be 'reference', 'torch' or 'triton', got {backend!r}")
    from samhq_fast.kernels import custom_ops as k  # lazy: imports triton

    return FusedOps(
        "triton",
        k.layer_norm,
        k.add_layer_norm,
        k.layer_norm_2d,
        k.linear,
        k.rel_pos_attention,
        k.decoder_attention,
    )
