"""Prompt encoder + HQ mask decoder: ``P`` prompts (one point each, or one box each) on one
image, ``multimask_output=False``, HQ token only on / off. Every implementation gets the same
image embedding and early ViT feature (our fp32 encoder's) cast to its dtype, and computes the
per-image HQ features in the call, as the official decoder does (our ``Predictor`` caches them at
``set_image``; the end-to-end benchmark covers that path).

Error columns: max |low-res logits - reference| and the worst per-prompt IoU of the low-res masks
(logits > 0), reference: our reference fp32 decoder on the same inputs.

    python -m pytest bench/test_bench_decoder.py --benchmark-json bench/results/raw.json
"""

from __future__ import annotations

import pytest

from bench._cases import DecoderCase, skip_reason
from bench._flops import decoder_flops
from bench._peers import IMPL_LABELS, decoder_fn, hf_attention_classes
from bench._timing import compile_record, error_record, fresh_dynamo, max_abs_error, measure_case


def test_decoder(benchmark, dec_case: DecoderCase, settings, zoo, refs) -> None:
    c = dec_case
    reason = skip_reason(c.impl, c.backend, c.preset, settings.device)
    if reason:
        pytest.skip(reason)
    key = (c.preset, c.kind, c.prompts, c.hq_token_only)
    # Inputs and references first: computing them may load our fp32 model (the zoo holds one
    # model at a time).
    emb, interm = refs.decoder_inputs(c.preset)
    prompts = refs.prompts(c.preset, c.kind, c.prompts)
    if not c.is_reference:
        refs.decoder(*key)
    model = zoo.model(c.impl, c.preset, c.dtype, c.backend)
    cfg = zoo.weights(c.preset).config
    dtype = next(model.parameters()).dtype
    emb, interm = emb.to(dtype), interm.to(dtype)
    compiled = c.backend in ("compile", "fast")
    if compiled:
        fresh_dynamo()
    fn = decoder_fn(
        c.impl, model, c.hq_token_only, compile=c.backend == "compile", fast=c.backend == "fast"
    )
    rounds, warmup = settings.rounds_for("decoder", c.prompts)
    benchmark.group = f"decoder {c.preset} {c.prompts} {c.kind} hq_only={c.hq_token_only}"
    info = dict(
        section="decoder",
        impl=c.impl,
        impl_label=IMPL_LABELS[c.impl],
        preset=c.preset,
        backend=c.backend,
        batch=1,
        prompts=c.prompts,
        prompt_kind=c.kind,
        hq_token_only=c.hq_token_only,
    )
    if c.impl == "hf":
        info["hf_attention"] = hf_attention_classes(model)
    logits, iou = measure_case(
        c.impl,
        f"{IMPL_LABELS[c.impl]} {c.dtype}",
        benchmark=benchmark,
        fn=lambda: fn(emb, interm, prompts),
        device=settings.device,
        rounds=rounds,
        warmup_rounds=warmup,
        flops=decoder_flops(cfg, c.prompts, prompts.sparse_tokens),
        items=c.prompts,
        item_name="prompts",
        dtype=c.dtype,
        info=info,
    )
    if c.is_reference:
        refs.store_decoder(key, logits, iou)
    ref_logits, ref_iou = refs.decoder(*key)
    benchmark.extra_info.update(
        error_record(logits, ref_logits, logits, ref_logits, "low-res mask logits (P, 1, 4h, 4w)"),
        reference="samhq_fast reference fp32 decoder, same device and inputs",
        iou_pred_max_abs_err=max_abs_error(iou, ref_iou),
    )
    if compiled:
        benchmark.extra_info.update(compile_record())
