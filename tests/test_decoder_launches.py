"""How many kernels one decoder call launches (``backend="triton"``, real vit_b shapes).

The decoder is launch-bound on a GPU (a few us of work per kernel), so the count is its cost
model. Counted without a GPU on meta tensors: Triton launches through the ahead-of-time
recorder (:mod:`samhq_fast.kernels.aot`), PyTorch kernels as the aten ops that are not views or
allocations (each is one kernel on CUDA, near enough). The bounds guard against regressions.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

from samhq_fast.kernels import aot  # noqa: E402

# Ops that launch no kernel: allocations, and views whose schema has no alias annotation.
_NO_KERNEL = {
    "empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "_unsafe_view",
    "detach", "lift_fresh", "alias",
}  # fmt: skip


class _AtenCounter(TorchDispatchMode):
    """Counts aten ops that launch a kernel: not views (outputs alias an input), not
    allocations."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = func._schema
        view = any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)
        if not view and func.__name__.split(".")[0] not in _NO_KERNEL:
            name = func.__name__
            self.ops[name] = self.ops.get(name, 0) + 1
        return out


def count_decoder_launches(prompts: int, dense: str = "image") -> dict[str, int]:
    """``{"triton": n, "aten": m, "total": n + m, "combine": c}`` for one vit_b bf16 decoder
    call on one image (``c``: split-KV combine launches, among the Triton ones)."""
    model = aot._meta_model("vit_b", torch.bfloat16)
    dec = model.mask_decoder
    h = 64
    emb = torch.empty(1, 256, h, h, device="meta", dtype=torch.bfloat16)
    hq = torch.empty(1, 32, 4 * h, 4 * h, device="meta", dtype=torch.bfloat16)
    pe = model.get_image_wide_positional_embeddings()
    sparse = emb.new_empty(1, prompts, 2, 256)
    dn = emb.new_empty((1, 256, h, h) if dense == "image" else (1, prompts, 256, h, h))
    dec.prepare_fused()  # derived weights are built once, not per call
    sink: list = []
    counter = _AtenCounter()
    # The GEMMs as a call without a measured choice runs them (the Triton GEMM): 1 launch each.
    with torch.no_grad(), aot.recording(sink, ["decoder"], every_gemm_candidate=False), counter:
        dec.predict_masks(emb, pe, sparse, dn, hq)
    n_aten = sum(counter.ops.values())
    combine = sum(1 for launch in sink if "combine" in str(getattr(launch.kernel, "fn", "")))
    return {"triton": len(sink), "aten": n_aten, "total": len(sink) + n_aten, "combine": combine}


# (prompts, dense) -> (most launches, split-KV combines). Before issue 13: 145-149 launches.
# Token->image attention splits its keys where it has few programs: at 1 prompt in all three
# of its calls, at 64 prompts sharing one image only in the first block (group stacking).
EXPECTED = {(1, "image"): (90, 3), (64, "image"): (90, 1), (64, "prompt"): (90, 0)}


@pytest.mark.parametrize(("prompts", "dense"), list(EXPECTED))
def test_decoder_launch_count(prompts, dense):
    got = count_decoder_launches(prompts, dense)
    print(f"[launches] vit_b bf16 decoder, {prompts} prompt(s) of 2 tokens, {dense} dense: {got}")
    most, combines = EXPECTED[prompts, dense]
    assert got["total"] <= most
    assert got["combine"] == combines
