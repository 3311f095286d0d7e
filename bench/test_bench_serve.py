"""HTTP service throughput and latency (``samhq_fast.serve`` on a local Ray Serve, 127.0.0.1).

Requests/s and p50 / p99 latency of ``POST /v1/segment`` (one point prompt on an uploaded image)
at 1, 8 and 32 concurrent clients, and of ``POST /v1/images`` (new images: each one is encoded;
and re-uploads: cache hits). Each client is a thread with its own keep-alive connection; every
loop is bounded in requests and seconds. Results go to ``bench/results/serve/<device>-<date>``
(``.json`` and ``.md``), with the device, versions, commit and the batch sizes the service ran.

Model: ``SAMHQ_BENCH_SERVE_MODEL`` (a preset, hub id or path; default: the trained 256x256 test
model, ``tests/fixtures/shapes_model``, which measures the serving stack rather than the
network) on ``cuda`` when available, else ``cpu``. Skipped without ``ray[serve]``.
"""

from __future__ import annotations

import datetime as dt
import http.client
import io
import json
import os
import platform
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Nothing leaves 127.0.0.1: no usage statistics from Ray (its processes inherit this).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from bench._env import cpu_name, device_name, device_slug, environment  # noqa: E402
from samhq_fast.serve import app as serve_app  # noqa: E402
from samhq_fast.serve.config import ServeConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from fixtures import shapes  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "serve"
DEFAULT_MODEL = ROOT / "tests" / "fixtures" / "shapes_model" / "sam_hq_shapes.pth"
CONCURRENCY = (1, 8, 32)
SEGMENT_REQUESTS = {1: 100, 8: 320, 32: 640}  # per level, all clients together
UPLOADS = {1: 16, 8: 32}  # new images per level
LEVEL_SECONDS = 60.0  # a level stops early past this
WARMUP = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _config(port: int) -> ServeConfig:
    model = os.environ.get("SAMHQ_BENCH_SERVE_MODEL") or str(DEFAULT_MODEL)
    gpu = _device() == "cuda"
    ncpu = os.cpu_count() or 2
    return ServeConfig(
        model=model, device=_device(), dtype="bf16" if gpu else "fp32", port=port,
        encoder_replicas=1, decoder_replicas=1,
        encoder_cpus=1.0 if ncpu <= 4 else 2.0, decoder_cpus=0.5, ingress_cpus=0.25,
        encoder_gpus=0.5 if gpu else 0, decoder_gpus=0.5 if gpu else 0,
        torch_threads=1 if ncpu <= 4 else None, max_batch_size=8, batch_wait_ms=10,
        cache_mb=1024,
    )  # fmt: skip


class _Conn:
    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def post(self, path: str, body: bytes, ctype: str) -> tuple[int, bytes]:
        for attempt in range(2):  # one reconnect if the server closed the idle connection
            try:
                self.conn.request("POST", path, body=body, headers={"Content-Type": ctype})
                r = self.conn.getresponse()
                return r.status, r.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.conn.close()


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue()


def _load(port: int, clients: int, bodies: list[tuple[str, bytes, str]]) -> dict:
    """``clients`` threads share the list of requests (each taken once); latencies in ms."""
    lock = threading.Lock()
    todo = list(reversed(bodies))
    lat: list[float] = []
    statuses: dict[int, int] = {}
    deadline = time.monotonic() + LEVEL_SECONDS
    start_gate = threading.Barrier(clients + 1, timeout=60)

    def run():
        conn = _Conn(port)
        try:
            start_gate.wait()
            while time.monotonic() < deadline:
                with lock:
                    if not todo:
                        return
                    path, body, ctype = todo.pop()
                t0 = time.perf_counter()
                status, _ = conn.post(path, body, ctype)
                ms = (time.perf_counter() - t0) * 1000
                with lock:
                    lat.append(ms)
                    statuses[status] = statuses.get(status, 0) + 1
        finally:
            conn.close()

    threads = [threading.Thread(target=run, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    start_gate.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(timeout=LEVEL_SECONDS + 120)
    wall = time.perf_counter() - t0
    a = np.asarray(lat)
    return {
        "clients": clients,
        "requests": int(len(a)),
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(a) / wall, 2) if wall > 0 else None,
        "p50_ms": round(float(np.percentile(a, 50)), 2) if len(a) else None,
        "p99_ms": round(float(np.percentile(a, 99)), 2) if len(a) else None,
        "mean_ms": round(float(a.mean()), 2) if len(a) else None,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
    }


def _stats(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", "/v1/stats")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


@pytest.fixture(scope="module")
def service():
    cfg = _config(_free_port())
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        serve_app.start(cfg)
        yield cfg, time.perf_counter() - t0
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def test_bench_serve(service):
    cfg, startup_s = service
    port = cfg.port
    load_start = list(os.getloadavg())
    rng = np.random.default_rng(0)
    scene_size = 256 if cfg.model == str(DEFAULT_MODEL) else 1024
    scenes = [shapes.make_scene(rng, scene_size) for _ in range(4 + sum(UPLOADS.values()))]
    seg_images = scenes[:4]
    conn = _Conn(port)
    ids, prompts = [], []
    for img, masks in seg_images:
        status, body = conn.post("/v1/images", _png(img), "application/octet-stream")
        assert status == 200, body
        iid = json.loads(body)["image_id"]
        ids.append(iid)
        for m in masks:
            x, y = (float(v) for v in shapes.interior_point(m))
            prompts.append(json.dumps({"image_id": iid, "points": [[x, y]]}).encode())
    for p in prompts[:WARMUP]:
        assert conn.post("/v1/segment", p, "application/json")[0] == 200
    conn.close()

    results: dict = {"segment": [], "images_new": [], "images_cached": []}
    for c in CONCURRENCY:
        n = SEGMENT_REQUESTS[c]
        bodies = [("/v1/segment", prompts[i % len(prompts)], "application/json") for i in range(n)]
        row = _load(port, c, bodies)
        row["service"] = _stats(port)
        results["segment"].append(row)
    fresh = iter(scenes[4:])
    for c, n in UPLOADS.items():
        bodies = [("/v1/images", _png(next(fresh)[0]), "image/png") for _ in range(n)]
        row = _load(port, c, bodies)
        row["service"] = _stats(port)
        results["images_new"].append(row)
    cached = [("/v1/images", _png(img), "image/png") for img, _ in seg_images] * 16
    results["images_cached"].append(_load(port, 8, cached))
    for section in results.values():
        for row in section:
            assert set(row["statuses"]) == {"200"}, row

    summary = _write(cfg, startup_s, results, scene_size, load_start)
    print(json.dumps({k: [(r["clients"], r["requests_per_s"], r["p50_ms"], r["p99_ms"])
                          for r in v] for k, v in summary["results"].items()}))  # fmt: skip


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("ray", "fastapi", "pydantic", "starlette", "uvicorn"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _write(
    cfg: ServeConfig, startup_s: float, results: dict, scene_size: int, load_start: list
) -> dict:
    env = environment(cfg.device)
    name = device_name(cfg.device)
    now = dt.datetime.now(dt.timezone.utc)
    meta = {
        "device": name,
        "cpu": cpu_name(),
        "device_slug": device_slug(name),
        "date": now.date().isoformat(),
        "datetime": now.isoformat(),
        "commit": env["commit"],
        "versions": {
            **{k.removesuffix("_version"): v for k, v in env.items() if k.endswith("_version")},
            **_versions(),
        },
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": load_start,
        "loadavg_end": list(os.getloadavg()),
        "startup_s": round(startup_s, 1),
        "model": cfg.model.replace(str(ROOT) + os.sep, ""),
        "image_size": scene_size,
        "config": {k: v for k, v in cfg.to_dict().items() if k not in ("extra", "model")},
    }
    summary = {"meta": meta, "results": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{meta['device_slug']}-{meta['date']}"
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    stem.with_suffix(".md").write_text(_markdown(summary), encoding="utf-8")
    return summary


def _markdown(s: dict) -> str:
    m = s["meta"]
    v = m["versions"]
    c = m["config"]
    lines = [
        f"# samhq_fast HTTP service: {m['device']}, {m['date']}",
        "",
        f"- Device: **{m['device']}**" + (f" (CPU: {m['cpu']})" if m["cpu"] != m["device"] else ""),
        f"- Commit: `{m['commit']}`; run at {m['datetime']} (UTC)",
        "- Versions: " + ", ".join(f"{k} {x}" for k, x in v.items() if x),
        f"- Model: `{m['model']}` ({m['image_size']}x{m['image_size']} synthetic scenes), "
        f"{c['device']} {c['dtype']}, backend {c['backend']}",
        f"- Service: 1 ingress, {c['encoder_replicas']} encoder and {c['decoder_replicas']} "
        f"decoder replica(s) ({c['encoder_cpus']} / {c['decoder_cpus']} CPUs reserved, "
        f"torch threads {c['torch_threads'] or 'Ray default'}), max batch {c['max_batch_size']}, "
        f"batch wait {c['batch_wait_ms']} ms; local Ray on 127.0.0.1; startup "
        f"{m['startup_s']} s",
        f"- 1-minute load average: {m['loadavg_start'][0]:.2f} at the start, "
        f"{m['loadavg_end'][0]:.2f} at the end, on {m['cpu_count']} CPUs"
        + (
            " (**a shared machine: other work held the CPUs; the figures are pessimistic**)"
            if m["loadavg_start"][0] > m["cpu_count"]
            else ""
        ),
        "- Clients: threads in one Python process on the same machine, one keep-alive "
        "connection each, sharing its CPUs (and the GIL among themselves) with the service; "
        "latency is the client's wall time per request. With more clients than the service "
        "can take at once, latency grows with the queue and requests/s can drop as the "
        "client threads compete with the service for the CPUs.",
        "",
    ]

    def table(title: str, rows: list[dict], what: str) -> None:
        lines.extend([f"### {title}", "", f"| clients | {what} | requests/s | p50 | p99 | mean |"
                      " batch sizes seen (max) |", "|---|---|---|---|---|---|---|"])  # fmt: skip
        for r in rows:
            svc = r.get("service", {})
            key = "decoder_batch_requests" if "segment" in title else "encoder_batch_images"
            bmax = svc.get(key, {}).get("max", "-") if svc else "-"
            lines.append(
                f"| {r['clients']} | {r['requests']} | {r['requests_per_s']} | "
                f"{r['p50_ms']} ms | {r['p99_ms']} ms | {r['mean_ms']} ms | {bmax} |"
            )
        lines.append("")

    table("POST /v1/segment (one point prompt)", s["results"]["segment"], "requests")
    table("POST /v1/images, new images (each encoded)", s["results"]["images_new"], "uploads")
    table("POST /v1/images, re-uploads (cache hits)", s["results"]["images_cached"], "uploads")
    lines.append(
        "Batch sizes are cumulative over the run (the largest batch so far when the row ended)."
    )
    return "\n".join(lines) + "\n"
