"""The Ray-free parts of the HTTP service (``samhq_fast.serve.core`` / ``.config``): the LRU
embedding cache, image decoding and content hashes, prompt validation, embedding transport,
COCO RLE records, and the Serve config. Runs without Ray; ``tests/test_serve.py`` runs the
service itself.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from samhq_fast.predictor import Predictor
from samhq_fast.serve.config import ServeConfig, dump_serve_config, serve_config
from samhq_fast.serve.core import (
    ApiError,
    LRUCache,
    decode_image,
    image_id,
    mask_records,
    pack_embedding,
    packed_nbytes,
    unpack_embedding,
    validate_prompts,
)

PTH = Path(__file__).parent / "fixtures" / "shapes_model" / "sam_hq_shapes.pth"


def _png(img: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt)
    return buf.getvalue()


def test_core_import_does_not_load_the_service():
    code = (
        "import sys, samhq_fast, samhq_fast.cli; samhq_fast.cli.build_parser(); "
        "print(any(m == 'ray' or m.startswith(('ray.', 'samhq_fast.serve.app', 'fastapi')) "
        "for m in sys.modules), 'samhq_fast.serve' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # the CLI's parser reads serve.config (no Ray) for its defaults; nothing else is loaded
    assert out.stdout.split() == ["False", "True"]
    code = "import sys, samhq_fast; print('samhq_fast.serve' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_lru_cache_bounded_in_bytes():
    c = LRUCache(100)
    assert c.put("a", 1, 40) and c.put("b", 2, 40)
    assert c.get("a") == 1  # a is now the most recent
    assert c.put("c", 3, 40)  # evicts b, the least recently used
    assert "b" not in c and c.get("a") == 1 and c.get("c") == 3
    assert c.nbytes == 80 and c.evictions == 1
    assert not c.put("huge", 4, 101) and "huge" not in c  # larger than the whole cache
    assert c.put("a", 5, 10) and c.get("a") == 5 and c.nbytes == 50  # replaced, resized
    assert c.get("missing") is None
    assert c.stats() == {"entries": 2, "bytes": 50, "max_bytes": 100, "hits": 4, "misses": 1,
                         "evictions": 1}  # fmt: skip


def test_decode_image_and_content_hash():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    a = decode_image(_png(img), 10_000)
    assert a.shape == (20, 30, 3) and np.array_equal(a, img)
    assert image_id(decode_image(_png(img, "BMP"), 10_000)) == image_id(img)  # same pixels
    other = img.copy()
    other[0, 0, 0] ^= 1
    assert image_id(other) != image_id(img)
    assert image_id(img.reshape(30, 20, 3)) != image_id(img)  # same bytes, other shape
    gray = decode_image(_png(img[..., 0]), 10_000)
    assert gray.shape == (20, 30, 3)
    for data, needle in ((b"", "empty"), (b"GIF89a-not-really", "not a readable image")):
        with pytest.raises(ApiError, match=needle) as e:
            decode_image(data, 10_000)
        assert e.value.status == 400
    with pytest.raises(ApiError, match="over the limit of 599"):
        decode_image(_png(img), 599)


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor(PTH, device="cpu", dtype="fp32", backend="reference")


def test_validate_prompts_maps_refusals_to_400(predictor):
    size = (200, 300)
    ok = validate_prompts(
        predictor, size, [{"points": [[1, 2], [3, 4]], "labels": [1, 0]}, {"box": [1, 2, 30, 40]}]
    )
    assert ok[0].points.shape == (2, 2) and ok[0].labels.tolist() == [1, 0]
    assert ok[0].signature == (2, False) and ok[1].signature == (0, True)
    assert validate_prompts(predictor, size, [{"points": [[5, 5]]}])[0].labels.tolist() == [1]
    # a box beyond the image is clipped by the Predictor, not refused
    assert validate_prompts(predictor, size, [{"box": [0, 0, 1000, 1000]}])[0].box is not None
    bad = [
        ({"points": [[1, float("nan")]]}, "NaN"),
        ({"points": [[1, 2]], "labels": [2]}, "point_labels"),
        ({"points": [[1, 2]], "labels": ["x"]}, "real numbers"),
        ({"points": [[1, 2, 3]]}, "point_coords"),
        ({"points": [[[1, 2]]]}, "prompts"),
        ({"box": [3, 3, 1, 1]}, "x1 <= x2"),
        ({"box": [1, 2]}, "box"),
        ({"labels": [1]}, "without point_coords"),
    ]
    for prompt, needle in bad:
        with pytest.raises(ApiError, match=needle) as e:
            validate_prompts(predictor, size, [prompt])
        assert e.value.status == 400
    with pytest.raises(ApiError, match="^prompt 1: "):
        validate_prompts(predictor, size, [{"box": [1, 1, 2, 2]}, {"box": [2, 2, 1, 1]}])


def test_embedding_roundtrip(predictor):
    img = np.random.default_rng(1).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    emb = predictor.embed(img)
    packed = pack_embedding(emb)
    assert packed_nbytes(packed) == emb.image_embeddings.nbytes + emb.hq_features.nbytes
    back = unpack_embedding(json.loads(json.dumps({k: v for k, v in packed.items()
                                                   if not isinstance(v, np.ndarray)}))
                            | {k: v for k, v in packed.items() if isinstance(v, np.ndarray)},
                            "cpu")  # fmt: skip
    assert torch.equal(back.image_embeddings, emb.image_embeddings)
    assert torch.equal(back.hq_features, emb.hq_features)
    assert back.original_sizes == emb.original_sizes and back.input_sizes == emb.input_sizes
    bf = emb.image_embeddings.to(torch.bfloat16)
    half = type(emb)(bf, emb.hq_features.to(torch.bfloat16), emb.original_sizes, emb.input_sizes)
    p = pack_embedding(half)
    assert p["image_embeddings"].dtype == np.int16  # bf16 bits
    assert torch.equal(unpack_embedding(p, "cpu").image_embeddings, bf)


def test_mask_records_are_coco_rle():
    mask_util = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(2)
    masks = rng.random((3, 17, 23)) > 0.6
    masks[2] = False
    recs = mask_records(masks, np.array([0.5, 0.25, 0.125]))
    for m, rec, score in zip(masks, recs, (0.5, 0.25, 0.125), strict=True):
        rle = {"size": rec["rle"]["size"], "counts": rec["rle"]["counts"].encode()}
        assert np.array_equal(mask_util.decode(rle).astype(bool), m)
        assert rec["rle"] == {
            "size": [17, 23],
            "counts": mask_util.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode(),
        }
        assert rec["area"] == m.sum() and rec["score"] == score
    ys, xs = np.nonzero(masks[0])
    assert recs[0]["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert recs[2]["bbox"] == [0, 0, 0, 0] and recs[2]["area"] == 0


def test_serve_config():
    cfg = ServeConfig(model="vit_b", device="cuda", encoder_replicas=3, port=9000)
    doc = serve_config(cfg)
    app = doc["applications"][0]
    assert app["import_path"] == "samhq_fast.serve.app:build_app"
    assert ServeConfig.from_dict(app["args"]) == cfg
    deps = {d["name"]: d for d in app["deployments"]}
    assert deps["Encoder"]["num_replicas"] == 3
    assert deps["Encoder"]["ray_actor_options"]["num_gpus"] == 1.0  # cuda: a GPU per replica
    assert deps["Decoder"]["max_ongoing_requests"] >= cfg.max_batch_size
    assert doc["http_options"] == {"host": "127.0.0.1", "port": 9000}
    assert "serve deploy" in dump_serve_config(cfg)
    assert serve_config(ServeConfig(device="cpu"))["applications"][0]["deployments"][1][
        "ray_actor_options"
    ]["num_gpus"] == 0.0  # fmt: skip
    for bad in ({"port": 0}, {"max_batch_size": 0}, {"dtype": "int8"}, {"cache_mb": -1},
                {"route_prefix": "x"}):  # fmt: skip
        with pytest.raises(ValueError):
            ServeConfig(**bad)
    with pytest.raises(ValueError, match="unknown serve settings"):
        ServeConfig.from_dict({"modle": "vit_b"})
