"""Image encoder: ours (torch / triton / torch.compile backends) vs the official model and
transformers' SamHQModel (SDPA), same weights, same random normalised images.

Error columns: max |embedding - reference| (reference: our fp32 oracle path on the same device and
input) and the worst per-image IoU of the masks that one point decodes (through our fp32 decoder)
from each implementation's embedding + early feature vs from the reference's. FLOPs: the
analytic count of ``bench._flops`` (official computation) times the batch.

    python -m pytest bench/test_bench_encoder.py --benchmark-json bench/results/raw.json
"""

from __future__ import annotations

import pytest

from bench._cases import EncoderCase, skip_reason
from bench._flops import encoder_flops
from bench._peers import IMPL_LABELS, encoder_fn, hf_attention_classes
from bench._timing import compile_record, error_record, fresh_dynamo, measure_case


def test_encoder(benchmark, enc_case: EncoderCase, settings, zoo, refs) -> None:
    c = enc_case
    reason = skip_reason(c.impl, c.backend, c.preset, settings.device)
    if reason:
        pytest.skip(reason)
    # References first: computing one may load our fp32 model (the zoo holds one at a time).
    refs.decoder_model(c.preset)
    if not c.is_reference:
        refs.encoder(c.preset, c.batch)
    model = zoo.model(c.impl, c.preset, c.dtype, c.backend)
    cfg = zoo.weights(c.preset).config
    dtype = next(model.parameters()).dtype
    pixels = refs.pixels(c.preset, c.batch).to(dtype)
    compiled = c.backend in ("compile", "fast")
    if compiled:
        fresh_dynamo()
    fn = encoder_fn(c.impl, model, compile=compiled)
    rounds, warmup = settings.rounds_for("encoder", c.batch, c.preset)
    benchmark.group = f"encoder {c.preset} batch {c.batch}"
    info = dict(
        section="encoder",
        impl=c.impl,
        impl_label=IMPL_LABELS[c.impl],
        preset=c.preset,
        backend=c.backend,
        batch=c.batch,
        image_size=cfg.vision_config.image_size,
    )
    if c.impl == "hf":
        info["hf_attention"] = hf_attention_classes(model)
    if c.impl == "ours":
        info["ours_backend_resolved"] = model.backend
    emb, interm = measure_case(
        c.impl,
        f"{IMPL_LABELS[c.impl]} {c.dtype}",
        benchmark=benchmark,
        fn=lambda: fn(pixels),
        device=settings.device,
        rounds=rounds,
        warmup_rounds=warmup,
        flops=encoder_flops(cfg.vision_config)["total"] * c.batch,
        items=c.batch,
        item_name="images",
        dtype=c.dtype,
        info=info,
    )
    if c.is_reference:
        refs.store_encoder(c.preset, c.batch, emb, interm)
    ref = refs.encoder(c.preset, c.batch)
    masks = refs.decode_point(c.preset, emb, interm)
    benchmark.extra_info.update(
        error_record(
            emb,
            ref.emb,
            masks,
            ref.masks,
            "image embedding (max abs); masks of one point per image decoded by our fp32 "
            "decoder (IoU)",
        ),
        reference="samhq_fast reference fp32, same device and input",
        interm_max_abs_err=float((interm.float() - ref.interm).abs().max()),
    )
    if compiled:
        benchmark.extra_info.update(compile_record())
