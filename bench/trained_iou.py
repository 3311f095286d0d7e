"""Masks of the fast path against the fp32 reference on the trained test model.

``tests/fixtures/shapes_model`` is a small SAM-HQ trained to segment synthetic shapes (see
``tests/test_trained_model.py``): its masks depend on the prompt, so agreement between two paths
means something (with random weights every prompt gives nearly the same mask). On held-out scenes
(the test's seed), one foreground point per shape, ``multimask_output=False``: the IoU of each
fast-path mask with the reference's, and each path's mIoU against the ground truth.

    python -m bench.trained_iou --out DIR [--device cuda] [--backend triton] [--dtype bf16]

writes ``DIR/trained_iou.json``. The GPU session runs it (the Triton path in bf16 on the GPU; on
its dry run, the fast PyTorch path in bf16 on CPU, one scene).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
PTH = TESTS / "fixtures" / "shapes_model" / "sam_hq_shapes.pth"
TEST_SEED = 20250101  # tests/test_trained_model.py's held-out scenes
TARGET_IOU = 0.99


def _point_masks(predictor: Any, img: Any, masks: Any, shapes: Any) -> Any:
    import numpy as np

    predictor.set_image(img)
    pts = np.stack([shapes.interior_point(m) for m in masks])[:, None]
    out, _, _ = predictor.predict(
        point_coords=pts, point_labels=np.ones((len(masks), 1)), multimask_output=False
    )
    return out[:, 0]


def measure(device: str, backend: str, dtype: str, scenes: int) -> dict[str, Any]:
    import numpy as np

    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from samhq_fast.predictor import Predictor

    from fixtures import shapes

    rng = np.random.default_rng(TEST_SEED)
    data = [shapes.make_scene(rng, 256) for _ in range(scenes)]
    t0 = time.perf_counter()
    ref = Predictor(model=PTH, device=device, dtype="fp32", backend="reference")
    fast = Predictor(model=PTH, device=device, dtype=dtype, backend=backend)
    agree, truth_ref, truth_fast = [], [], []
    for img, masks in data:
        a = _point_masks(fast, img, masks, shapes)
        b = _point_masks(ref, img, masks, shapes)
        agree += [shapes.iou(x, y) for x, y in zip(a, b, strict=True)]
        truth_fast += [shapes.iou(x, t) for x, t in zip(a, masks, strict=True)]
        truth_ref += [shapes.iou(x, t) for x, t in zip(b, masks, strict=True)]
    return {
        "model": str(PTH.relative_to(REPO)),
        "device": device,
        "fast": f"{fast.model.backend} {dtype}",
        "reference": "reference fp32",
        "scenes": scenes,
        "prompts": len(agree),
        "iou_vs_reference_mean": float(np.mean(agree)),
        "iou_vs_reference_min": float(np.min(agree)),
        "miou_fast": float(np.mean(truth_fast)),
        "miou_reference": float(np.mean(truth_ref)),
        "target": TARGET_IOU,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--scenes", type=int, default=8)
    a = ap.parse_args(argv)
    rec = measure(a.device, a.backend, a.dtype, a.scenes)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "trained_iou.json").write_text(json.dumps(rec, indent=1))
    print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
