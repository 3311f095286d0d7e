"""End to end on a real-size photo (synthetic, 1500 x 1000): set the image, predict one point
(``multimask_output=False``), masks at the photo's size, through each library's user path:

* ours: ``Predictor.set_image`` + ``Predictor.predict``;
* official: ``SamPredictor.set_image`` + ``SamPredictor.predict``;
* transformers: ``SamHQProcessor`` + ``SamHQModel`` (SDPA) + ``post_process_masks``.

Error columns: IoU of the full-size masks and max |low-res logits - reference|, reference: our
``Predictor`` in fp32 with the reference backend. FLOPs: encoder + one-prompt decoder.

    python -m pytest bench/test_bench_e2e.py --benchmark-json bench/results/raw.json
"""

from __future__ import annotations

import pytest

from bench._cases import E2E_POINT, E2E_SIZE, E2ECase, skip_reason
from bench._flops import decoder_flops, encoder_flops
from bench._peers import IMPL_LABELS, hf_attention_classes, segment_fn
from bench._timing import compile_record, error_record, fresh_dynamo, measure_case

# transformers' SamHQProcessor passes its own default `point_pad_value` to the image processor.
pytestmark = pytest.mark.filterwarnings("ignore:The following named arguments are not valid")


def test_e2e(benchmark, e2e_case: E2ECase, settings, zoo, refs) -> None:
    c = e2e_case
    reason = skip_reason(c.impl, c.backend, c.preset, settings.device)
    if reason:
        pytest.skip(reason)
    if not c.is_reference:  # first: it may load our fp32 model (the zoo holds one at a time)
        refs.e2e(c.preset)
    model = zoo.model(c.impl, c.preset, c.dtype, c.backend)
    cfg = zoo.weights(c.preset).config
    image = refs.e2e_image()
    compiled = c.backend in ("compile", "fast")
    if compiled:
        fresh_dynamo()
    fn = segment_fn(c.impl, model, compile=compiled)
    rounds, warmup = settings.rounds_for("e2e")
    benchmark.group = f"e2e {c.preset} {E2E_SIZE[1]}x{E2E_SIZE[0]}"
    info = dict(
        section="e2e",
        impl=c.impl,
        impl_label=IMPL_LABELS[c.impl],
        preset=c.preset,
        backend=c.backend,
        batch=1,
        image=f"{E2E_SIZE[1]}x{E2E_SIZE[0]} synthetic uint8 RGB, one point",
    )
    if c.impl == "hf":
        info["hf_attention"] = hf_attention_classes(model)
    flops = encoder_flops(cfg.vision_config)["total"] + decoder_flops(cfg, 1, 2)
    masks, low = measure_case(
        c.impl,
        f"{IMPL_LABELS[c.impl]} {c.dtype}",
        benchmark=benchmark,
        fn=lambda: fn(image, E2E_POINT),
        device=settings.device,
        rounds=rounds,
        warmup_rounds=warmup,
        flops=flops,
        items=1,
        item_name="images",
        dtype=c.dtype,
        info=info,
    )
    if c.is_reference:
        refs.store_e2e(c.preset, masks, low)
    ref_masks, ref_low = refs.e2e(c.preset)
    benchmark.extra_info.update(
        error_record(
            low, ref_low, masks, ref_masks, "full-size masks (IoU); low-res logits (max abs)"
        ),
        reference="samhq_fast Predictor, reference backend, fp32, same device and image",
    )
    if compiled:
        benchmark.extra_info.update(compile_record())
