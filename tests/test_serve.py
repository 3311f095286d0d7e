"""The HTTP service (``samhq_fast.serve``) on a real Ray Serve bound to 127.0.0.1, with the trained
test model: answers equal to ``Predictor``, concurrent clients batched and answered correctly,
bad requests refused with a 4xx, a killed replica replaced, the CLI shut down by signals.

One local Ray (2 CPUs) serves the whole module; every request loop is bounded in count and
time, and Ray is shut down even when a test fails. Skipped without ``ray[serve]``.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Nothing leaves 127.0.0.1: no usage statistics from Ray (its processes inherit this).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
mask_util = pytest.importorskip("pycocotools.mask")

from samhq_fast.amg import AutomaticMaskGenerator  # noqa: E402
from samhq_fast.predictor import Predictor  # noqa: E402
from samhq_fast.serve import app as serve_app  # noqa: E402
from samhq_fast.serve.config import ServeConfig  # noqa: E402
from samhq_fast.serve.core import image_id  # noqa: E402

from fixtures import shapes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PTH = ROOT / "tests" / "fixtures" / "shapes_model" / "sam_hq_shapes.pth"
SEED = 20251202
MAX_PIXELS = 300 * 300
MAX_BODY_MB = 1
TIMEOUT = 60.0  # per HTTP request
SCORE_ATOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(port: int) -> ServeConfig:
    return ServeConfig(
        model=str(PTH), device="cpu", dtype="fp32", backend="reference", port=port,
        encoder_replicas=1, decoder_replicas=2, encoder_cpus=0.5, decoder_cpus=0.25,
        ingress_cpus=0.1, torch_threads=1, max_batch_size=8, batch_wait_ms=50,
        max_image_pixels=MAX_PIXELS, max_body_mb=MAX_BODY_MB, cache_mb=64, retry_s=90,
    )  # fmt: skip


class Client:
    def __init__(self, port: int, prefix: str = "") -> None:
        self.port, self.prefix = port, prefix

    def request(self, method: str, path: str, body=None, ctype="application/json"):
        if isinstance(body, (dict, list)):
            body = json.dumps(body)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        try:
            headers = {"Content-Type": ctype} if body is not None else {}
            conn.request(method, self.prefix + path, body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
        finally:
            conn.close()
        try:
            payload = json.loads(data)
        except ValueError:
            payload = data
        return r.status, payload

    def upload(self, img: np.ndarray, fmt: str = "PNG"):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, fmt)
        return self.request("POST", "/v1/images", buf.getvalue(), "application/octet-stream")

    def segment(self, body: dict):
        return self.request("POST", "/v1/segment", body)


def _wait_healthy(client: Client, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        try:
            last = client.request("GET", "/healthz")
            if last[0] == 200:
                return
        except OSError as e:
            last = e
        time.sleep(0.5)
    raise AssertionError(f"service not healthy after {seconds} s: {last}")


def _decode(rec: dict) -> np.ndarray:
    rle = {"size": rec["rle"]["size"], "counts": rec["rle"]["counts"].encode()}
    return mask_util.decode(rle).astype(bool)


@pytest.fixture(scope="module")
def scenes() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(SEED)
    sizes = [(256, 256), (200, 240), (256, 256), (180, 256)]
    out = []
    for h, w in sizes:
        img, masks = shapes.make_scene(rng, 256)
        out.append((np.ascontiguousarray(img[:h, :w]), masks[:, :h, :w]))
    return out


@pytest.fixture(scope="module")
def reference() -> Predictor:
    torch.set_num_threads(1)
    return Predictor(PTH, device="cpu", dtype="fp32", backend="reference")


def _expected(reference: Predictor, img: np.ndarray, prompt: dict, multimask=False, hq=False):
    reference.set_image(img)
    kw = {}
    if "points" in prompt:
        kw["point_coords"] = np.array(prompt["points"], dtype=np.float64)
        kw["point_labels"] = np.array(prompt.get("labels", [1] * len(prompt["points"])))
    if "box" in prompt:
        kw["box"] = np.array(prompt["box"], dtype=np.float64)
    masks, scores, _ = reference.predict(**kw, multimask_output=multimask, hq_token_only=hq)
    return masks[0], float(scores[0])


def _prompts(img: np.ndarray, masks: np.ndarray) -> list[dict]:
    """One interior fg point per shape, each shape's box, and a point + box + bg point."""
    out = []
    for m in masks:
        x, y = (float(v) for v in shapes.interior_point(m))
        box = [float(v) for v in shapes.mask_box(m)]
        out.append({"points": [[x, y]]})
        out.append({"box": box})
    x0, y0 = (float(v) for v in shapes.interior_point(masks[0]))
    x1, y1 = (float(v) for v in shapes.interior_point(masks[-1]))
    out.append({"points": [[x0, y0], [x1, y1]], "labels": [1, 0],
                "box": [float(v) for v in shapes.mask_box(masks[0])]})  # fmt: skip
    return out


# ---------------------------------------------------------------------------- CLI, local Ray
def test_cli_local_ray_sigint(tmp_path):
    """``samhq-fast serve`` without RAY_ADDRESS starts a local Ray, serves, and SIGINT stops
    everything: exit code 0, the port closed. (Runs before the module's service starts.)"""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "samhq_fast", "serve", "--checkpoint", str(PTH),
           "--device", "cpu", "--backend", "reference", "--port", str(port), "--num-cpus", "2",
           "--encoder-cpus", "0.5", "--decoder-cpus", "0.5", "--torch-threads", "1"]  # fmt: skip
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        client = Client(port)
        _wait_healthy(client, 150)
        status, info = client.upload(np.full((32, 48, 3), 90, np.uint8))
        assert status == 200 and (info["width"], info["height"]) == (48, 32)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.seek(0)
        text = log.read()
        log.close()
    assert "shutting down" in text, text[-3000:]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


# ---------------------------------------------------------------------------- the service
@pytest.fixture(scope="module")
def service():
    cfg = _config(_free_port())
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve_app.start(cfg)
        client = Client(cfg.port)
        _wait_healthy(client, 60)
        yield cfg, client
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def uploaded(service, scenes) -> list[str]:
    _, client = service
    ids = []
    for img, _ in scenes:
        status, info = client.upload(img)
        assert status == 200, info
        assert info["image_id"] == image_id(img)
        assert (info["height"], info["width"]) == img.shape[:2]
        ids.append(info["image_id"])
    return ids


def test_health_and_openapi(service):
    _, client = service
    assert client.request("GET", "/healthz") == (200, {"status": "ok"})
    status, schema = client.request("GET", "/openapi.json")
    assert status == 200
    for path in ("/healthz", "/v1/images", "/v1/segment", "/v1/everything", "/v1/stats"):
        assert path in schema["paths"], path
    seg = schema["paths"]["/v1/segment"]["post"]
    assert {"200", "400", "404", "413"} <= set(seg["responses"])
    assert client.request("GET", "/docs")[0] == 200


def test_upload_is_cached_by_content(service, scenes, uploaded):
    _, client = service
    img = scenes[0][0]
    status, info = client.upload(img)  # same pixels, again
    assert status == 200 and info["cached"] and info["image_id"] == uploaded[0]
    status, info = client.upload(img, "BMP")  # another file format, same decoded pixels
    assert status == 200 and info["cached"] and info["image_id"] == uploaded[0]
    other = img.copy()
    other[0, 0] ^= 1
    status, info = client.upload(other)
    assert status == 200 and not info["cached"] and info["image_id"] != uploaded[0]


def test_segment_equals_predictor(service, scenes, uploaded, reference):
    _, client = service
    n = 0
    for (img, masks), iid in zip(scenes[:2], uploaded[:2], strict=True):
        prompts = _prompts(img, masks)
        for prompt, (multimask, hq) in zip(
            prompts, [(False, False), (True, False), (False, True)] * len(prompts), strict=False
        ):
            status, out = client.segment(
                {"image_id": iid, **prompt, "multimask": multimask, "hq_token_only": hq}
            )
            assert status == 200, out
            (rec,) = out["masks"]
            want, score = _expected(reference, img, prompt, multimask, hq)
            got = _decode(rec)
            assert got.shape == img.shape[:2]
            assert np.array_equal(got, want), f"{prompt}: {(got != want).sum()} pixels differ"
            assert abs(rec["score"] - score) <= SCORE_ATOL
            assert rec["area"] == int(want.sum())
            ys, xs = np.nonzero(want)
            assert rec["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                   ys.max() - ys.min() + 1]  # fmt: skip
            n += 1
        # several prompts at once: the same masks, in order
        status, out = client.segment({"image_id": iid, "prompts": prompts})
        assert status == 200 and len(out["masks"]) == len(prompts)
        for rec, prompt in zip(out["masks"], prompts, strict=True):
            want, score = _expected(reference, img, prompt)
            assert np.array_equal(_decode(rec), want) and abs(rec["score"] - score) <= SCORE_ATOL
    # no prompt at all: the model's whole-image guess, as Predictor.predict()
    status, out = client.segment({"image_id": uploaded[0]})
    assert status == 200
    assert np.array_equal(_decode(out["masks"][0]), _expected(reference, scenes[0][0], {})[0])
    assert n >= 10


def test_everything_equals_generator(service, scenes, uploaded, reference):
    _, client = service
    img = scenes[1][0]
    status, out = client.request(
        "POST", "/v1/everything", {"image_id": uploaded[1], "points_per_side": 8}
    )
    assert status == 200, out
    want = AutomaticMaskGenerator(reference, points_per_side=8, output_mode="coco_rle").generate(
        img
    )
    assert len(out["masks"]) == len(want) > 0
    for got, w in zip(out["masks"], want, strict=True):
        assert got["rle"] == w["segmentation"]
        assert got["area"] == w["area"] and got["bbox"] == w["bbox"]
        assert abs(got["predicted_iou"] - w["predicted_iou"]) <= SCORE_ATOL
        assert mask_util.area({**got["rle"], "counts": got["rle"]["counts"].encode()}) == w["area"]


def test_concurrent_clients_batched_and_correct(service, scenes, uploaded):
    """8 clients x 20 segment requests at once: every answer equals the sequential one; the
    encoder (8 simultaneous uploads) and the decoder ran batches of more than one request."""
    _, client = service
    bodies = []
    for (img, masks), iid in zip(scenes, uploaded, strict=True):
        for prompt in _prompts(img, masks):
            bodies.append({"image_id": iid, **prompt})
    sequential = []
    for body in bodies:
        status, out = client.segment(body)
        assert status == 200, out
        sequential.append(out["masks"])
    rng = np.random.default_rng(0)
    plan = [rng.integers(0, len(bodies), 20).tolist() for _ in range(8)]

    def worker(indices):
        return [(i, *client.segment(bodies[i])) for i in indices]

    # new images uploaded at the same moment: the encoder batches them
    rng_img = np.random.default_rng(1)
    fresh = [shapes.make_scene(rng_img, 128)[0] for _ in range(8)]
    barrier = threading.Barrier(8, timeout=30)

    def upload(img):
        barrier.wait()
        return client.upload(img)

    with ThreadPoolExecutor(8) as pool:
        ups = list(pool.map(upload, fresh, timeout=180))
        results = list(pool.map(worker, plan, timeout=300))
    assert all(s == 200 for s, _ in ups), ups
    answered = 0
    for per_client in results:
        for i, status, out in per_client:
            assert status == 200, out
            for got, want in zip(out["masks"], sequential[i], strict=True):
                assert got["rle"] == want["rle"] and got["bbox"] == want["bbox"]
                assert abs(got["score"] - want["score"]) <= SCORE_ATOL
            answered += 1
    assert answered == 160
    _, stats = client.request("GET", "/v1/stats")
    print(f"[serve] batch sizes: {json.dumps(stats)}")
    assert stats["decoder_batch_requests"]["max"] > 1, stats
    assert stats["encoder_batch_images"]["max"] > 1, stats
    assert "500" not in stats["responses"]


BAD_SEGMENT = [
    ({"image_id": "ID", "points": [[10, float("nan")]]}, "NaN"),
    ({"image_id": "ID", "points": [[10, float("inf")]]}, "infinite"),
    ({"image_id": "ID", "points": [[10, 20]], "labels": [3]}, "point_labels"),
    ({"image_id": "ID", "points": [[10, 20]], "labels": [0.5]}, "point_labels"),
    ({"image_id": "ID", "points": [[10, 20]], "labels": [1, 1]}, "lengths"),
    ({"image_id": "ID", "points": [[10, 20, 30]]}, "point_coords"),
    ({"image_id": "ID", "points": [[10, 20], [30]]}, "points"),
    ({"image_id": "ID", "points": []}, "points"),
    ({"image_id": "ID", "labels": [1]}, "without point_coords"),
    ({"image_id": "ID", "box": [50, 50, 10, 10]}, "x1 <= x2"),
    ({"image_id": "ID", "box": [1, 2, 3]}, "box"),
    ({"image_id": "ID", "box": [[1, 2, 3, 4], [1, 2, 3, 4]]}, "box"),
    ({"image_id": "ID", "points": "abc"}, "points"),
    ({"image_id": "ID", "points": [[1, 2]], "prompts": [{"box": [1, 2, 3, 4]}]}, "not both"),
    ({"image_id": "ID", "prompts": []}, "empty"),
    ({"image_id": "ID", "prompts": [{"box": [1, 2, 3, 4]}] * 65}, "limit"),
    ({"image_id": "ID", "prompts": [{"box": [1, 2, 3, 4]}, {"box": [5, 5, 1, 1]}]}, "prompt 1"),
    ({"image_id": "ID", "pointz": [[1, 2]]}, "pointz"),
    ({"image_id": "ID", "multimask": "maybe"}, "multimask"),
    ({"points": [[1, 2]]}, "image_id"),
    ([1, 2, 3], "invalid"),
]


def test_bad_requests(service, uploaded):
    _, client = service
    iid = uploaded[0]
    seen = []

    def check(status, out, want_status, needle, what):
        assert status == want_status, (what, status, out)
        assert isinstance(out, dict) and isinstance(out.get("error"), str), (what, out)
        assert needle.lower() in out["error"].lower(), (what, out["error"])
        seen.append(what)

    for body, needle in BAD_SEGMENT:
        body = {**body, "image_id": iid} if isinstance(body, dict) and "image_id" in body else body
        check(*client.segment(body), 400, needle, body)
    check(*client.request("POST", "/v1/segment", '{"image_id": '), 400, "JSON", "truncated")
    check(*client.request("POST", "/v1/segment", b"\xff\xfe"), 400, "", "binary")
    check(*client.segment({"image_id": "0" * 32, "points": [[1, 2]]}), 404, "unknown", "404")
    check(*client.request("POST", "/v1/everything", {"image_id": "nope"}), 404, "unknown", "amg")
    for k, v in (("points_per_side", 0), ("points_per_side", 1000), ("crop_n_layers", -1)):
        check(*client.request("POST", "/v1/everything", {"image_id": iid, k: v}), 400, k, k)
    check(*client.request("POST", "/v1/images", b"not an image", "image/png"), 400, "image", "x")
    check(*client.request("POST", "/v1/images", b"", "image/png"), 400, "empty", "empty")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((310, 300, 3), np.uint8)).save(buf, "PNG")
    check(*client.request("POST", "/v1/images", buf.getvalue()), 400, "limit", "pixels")
    big = b"\x00" * (MAX_BODY_MB * 2**20 + 1)
    check(*client.request("POST", "/v1/images", big), 413, "limit", "413 images")
    check(*client.request("POST", "/v1/segment", big), 413, "limit", "413 segment")
    check(*client.request("GET", "/v1/nothing"), 404, "not found", "route")
    check(*client.request("GET", "/v1/segment"), 405, "not allowed", "method")
    # still serving
    status, out = client.segment({"image_id": iid, "points": [[100, 100]]})
    assert status == 200 and len(out["masks"]) == 1
    _, stats = client.request("GET", "/v1/stats")
    assert "500" not in stats["responses"]
    assert len(seen) == len(BAD_SEGMENT) + 14


def _replica(deployment: str):
    handle = serve.get_deployment_handle(deployment, app_name="samhq")
    name = handle.actor_name.remote().result(timeout_s=60)
    return ray.get_actor(name, namespace="serve")


def _running(deployment: str) -> int:
    st = serve.status().applications["samhq"].deployments[deployment]
    return st.replica_states.get("RUNNING", 0)


def test_replica_killed_mid_load(service, scenes, uploaded, reference):
    """A decoder replica killed while 4 clients send requests, and the only encoder replica
    killed during an upload: Ray Serve starts new ones, every answer is the right one (or a
    503 while none is up), and the service answers again."""
    cfg, client = service
    img, masks = scenes[2]
    prompts = _prompts(img, masks)
    want = [_expected(reference, img, p)[0] for p in prompts]
    stop_at = time.monotonic() + 120
    done = []

    def worker(k):
        out = []
        for j in range(15):
            if time.monotonic() > stop_at:
                break
            i = (k + j) % len(prompts)
            status, body = client.segment({"image_id": uploaded[2], **prompts[i]})
            out.append((i, status, body))
            done.append(1)
        return out

    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(worker, k) for k in range(4)]
        deadline = time.monotonic() + 60
        while len(done) < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        ray.kill(_replica("Decoder"), no_restart=True)
        results = [r for f in futures for r in f.result(timeout=300)]
    statuses = [s for _, s, _ in results]
    print(f"[serve] statuses around the decoder kill: {statuses}")
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= len(statuses) // 2, statuses
    for i, status, body in results:
        if status == 200:
            assert np.array_equal(_decode(body["masks"][0]), want[i]), f"prompt {i}: wrong mask"
    # the encoder: killed while an upload waits for it; the ingress retries on the new one
    fresh = shapes.make_scene(np.random.default_rng(7), 128)[0]
    victim = _replica("Encoder")
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(client.upload, fresh)
        ray.kill(victim, no_restart=True)
        status, info = fut.result(timeout=180)
    assert status in (200, 503), info
    stats = client.request("GET", "/v1/stats")[1]
    print(f"[serve] upload during the encoder kill: {status}; stats {stats}")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (_running("Decoder") < 2 or _running("Encoder") < 1):
        time.sleep(0.5)
    assert _running("Decoder") == 2 and _running("Encoder") == 1
    _wait_healthy(client, 60)
    status, info = client.upload(fresh)
    assert status == 200 and info["image_id"] == image_id(fresh)
    status, body = client.segment({"image_id": info["image_id"], "points": [[64, 64]]})
    assert status == 200
    assert np.array_equal(
        _decode(body["masks"][0]), _expected(reference, fresh, {"points": [[64, 64]]})[0]
    )


def test_print_config_is_a_serve_config(capsys):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from samhq_fast.cli import main

    argv = ["serve", "--checkpoint", str(PTH), "--device", "cpu", "--port", "8123",
            "--decoder-replicas", "3", "--encoder-gpus", "1", "--print-config"]  # fmt: skip
    assert main(argv) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    schema = ServeDeploySchema.model_validate(doc)
    (app,) = schema.applications
    assert app.import_path == "samhq_fast.serve.app:build_app"
    deps = {d.name: d for d in app.deployments}
    assert deps["Decoder"].num_replicas == 3
    assert deps["Encoder"].ray_actor_options.num_gpus == 1
    cfg = ServeConfig.from_dict(app.args)
    assert cfg.port == 8123 and cfg.model == str(PTH) and cfg.decoder_replicas == 3
    assert serve_app.build_app(app.args) is not None  # the builder accepts the args


def test_cli_without_ray_says_what_to_install(monkeypatch, capsys):
    import samhq_fast.serve
    from samhq_fast.cli import main

    monkeypatch.setitem(sys.modules, "samhq_fast.serve.app", None)  # as if ray were missing
    monkeypatch.delattr(samhq_fast.serve, "app", raising=False)
    with pytest.raises(ImportError):
        from samhq_fast.serve import app  # noqa: F401
    assert main(["serve", "--checkpoint", str(PTH), "--device", "cpu"]) == 2
    assert "pip install 'samhq-fast[serve]'" in capsys.readouterr().err


def test_cli_onto_running_cluster_sigterm(service, tmp_path):
    """With RAY_ADDRESS the CLI deploys its application onto that cluster; SIGTERM removes
    just that application (exit code 0) and the cluster's other application keeps serving."""
    cfg, client = service
    env = dict(os.environ)
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "samhq_fast", "serve", "--checkpoint", str(PTH),
           "--device", "cpu", "--backend", "reference", "--name", "samhq-cli",
           "--route-prefix", "/cli", "--encoder-cpus", "0.2", "--decoder-cpus", "0.2",
           "--torch-threads", "1"]  # fmt: skip
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        other = Client(cfg.port, "/cli")
        _wait_healthy(other, 150)
        status, info = other.upload(np.full((40, 30, 3), 200, np.uint8))
        assert status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.seek(0)
        text = log.read()
        log.close()
    assert "shutting down" in text, text[-3000:]
    assert "samhq-cli" not in serve.status().applications
    assert client.request("GET", "/healthz")[0] == 200
