"""Comparison helpers that also record the measured differences (``pytest -s`` prints them)."""

from __future__ import annotations

import torch

LOGIT_RTOL = 1e-4  # max |ours - oracle| <= LOGIT_RTOL * max |oracle| (fp32)
IOU_ATOL = 1e-5


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    ours, ref = ours.detach().float().cpu(), ref.detach().float().cpu()
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    print(f"[parity] {what}: max abs diff {diff:.3g} (oracle scale {scale:.3g})")
    assert scale > 0, f"{what}: oracle output is all zeros; the comparison would be empty"
    assert diff <= LOGIT_RTOL * scale, (
        f"{what}: max abs diff {diff:.3g} > {LOGIT_RTOL} x {scale:.3g}"
    )
    return diff


def assert_iou_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    diff = (ours.detach().float().cpu() - ref.detach().float().cpu()).abs().max().item()
    print(f"[parity] {what} iou: max abs diff {diff:.3g}")
    assert diff <= IOU_ATOL, f"{what}: iou max abs diff {diff:.3g} > {IOU_ATOL}"
    return diff
