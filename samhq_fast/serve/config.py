"""Settings of the HTTP service and the equivalent Ray Serve config file (no Ray import).

One :class:`ServeConfig` describes a deployment: the model, the batching and cache limits, the
replica counts and what each replica reserves. :func:`serve_config` turns it into the document
``serve deploy`` reads (``applications[0].args`` is the same settings, read back by
:func:`samhq_fast.serve.app.build_app`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

APP_NAME = "samhq"
IMPORT_PATH = "samhq_fast.serve.app:build_app"
DEPLOYMENTS = ("Ingress", "Encoder", "Decoder")


@dataclass
class ServeConfig:
    """Everything ``samhq-fast serve`` can set.

    Attributes:
      model: preset, hub id or local path (``--model`` / ``--checkpoint``).
      device, dtype, backend: as in :class:`samhq_fast.Predictor` (device ``None``: cuda if any).
      host, port: where the HTTP proxy listens (``127.0.0.1``: this machine only).
      encoder_replicas, decoder_replicas, ingress_replicas: replica counts.
      max_batch_size: most requests the encoder (images) or the decoder (segment requests)
        takes in one call; batch_wait_ms: how long a batch waits to fill.
      max_image_pixels: larger uploads are refused (400).
      max_body_mb: larger request bodies are refused (413).
      max_prompts: most prompts in one ``/v1/segment`` request.
      cache_mb: embedding cache of the ingress (LRU, object store); decoder_cache_mb: each
        decoder replica's cache of embeddings already on its device.
      encoder_cpus, decoder_cpus, ingress_cpus, encoder_gpus, decoder_gpus: what each replica
        reserves in Ray (fractions allowed); ``None`` GPUs: 1 when the device is cuda, else 0.
      torch_threads: intra-op threads per replica (``None``: Ray's default, its CPU count).
      retry_s: how long the ingress retries a call whose replica died before answering 503.
      name, route_prefix: the Serve application's name and URL prefix.
    """

    model: str = "vit_b"
    device: str | None = None
    dtype: str = "fp32"
    backend: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    encoder_replicas: int = 1
    decoder_replicas: int = 1
    ingress_replicas: int = 1
    max_batch_size: int = 8
    batch_wait_ms: float = 10.0
    max_image_pixels: int = 4096 * 4096
    max_body_mb: float = 64.0
    max_prompts: int = 64
    cache_mb: float = 1024.0
    decoder_cache_mb: float = 256.0
    encoder_cpus: float = 1.0
    decoder_cpus: float = 0.5
    ingress_cpus: float = 0.25
    encoder_gpus: float | None = None
    decoder_gpus: float | None = None
    torch_threads: int | None = None
    retry_s: float = 30.0
    name: str = APP_NAME
    route_prefix: str = "/"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for k in ("encoder_replicas", "decoder_replicas", "ingress_replicas", "max_batch_size",
                  "max_prompts", "max_image_pixels"):  # fmt: skip
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        for k in ("batch_wait_ms", "cache_mb", "decoder_cache_mb", "max_body_mb", "retry_s",
                  "encoder_cpus", "decoder_cpus", "ingress_cpus"):  # fmt: skip
            if not float(getattr(self, k)) >= 0:
                raise ValueError(f"{k} must be >= 0, got {getattr(self, k)}")
        if not 0 < int(self.port) < 65536:
            raise ValueError(f"port must be in 1-65535, got {self.port}")
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"dtype must be fp32, bf16 or fp16, got {self.dtype!r}")
        if not self.route_prefix.startswith("/"):
            raise ValueError(f"route_prefix must start with '/', got {self.route_prefix!r}")

    @property
    def on_gpu(self) -> bool:
        if self.device is None:
            return False  # decided per replica; GPUs are reserved only when asked for
        return str(self.device).startswith("cuda")

    def gpus(self, which: str) -> float:
        value = getattr(self, f"{which}_gpus")
        if value is None:
            return 1.0 if self.on_gpu else 0.0
        return float(value)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ServeConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown serve settings: {unknown}")
        return cls(**d)

    def actor_options(self, which: str) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": float(getattr(self, f"{which}_cpus"))}
        if which != "ingress":
            opts["num_gpus"] = self.gpus(which)
        return opts

    def max_ongoing(self, which: str) -> int:
        # @serve.batch needs at least max_batch_size requests in flight per replica.
        return 256 if which == "ingress" else max(16, 2 * int(self.max_batch_size))

    def replicas(self, which: str) -> int:
        return int(getattr(self, f"{which}_replicas"))


def serve_config(cfg: ServeConfig) -> dict[str, Any]:
    """The Ray Serve config file (``serve deploy``) that deploys ``cfg``."""
    deployments = []
    for name in DEPLOYMENTS:
        which = name.lower()
        deployments.append(
            {
                "name": name,
                "num_replicas": cfg.replicas(which),
                "max_ongoing_requests": cfg.max_ongoing(which),
                "ray_actor_options": cfg.actor_options(which),
            }
        )
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.host, "port": int(cfg.port)},
        "applications": [
            {
                "name": cfg.name,
                "route_prefix": cfg.route_prefix,
                "import_path": IMPORT_PATH,
                "args": {k: v for k, v in cfg.to_dict().items() if k != "extra" or v},
                "deployments": deployments,
            }
        ],
    }


def dump_serve_config(cfg: ServeConfig) -> str:
    """:func:`serve_config` as YAML (JSON, itself valid YAML, when PyYAML is missing)."""
    doc = serve_config(cfg)
    header = (
        "# Ray Serve config for samhq_fast: `serve deploy THIS_FILE` on a running cluster\n"
        "# (`ray start --head` first). Generated by `samhq-fast serve --print-config`.\n"
    )
    try:
        import yaml
    except ImportError:
        return header + json.dumps(doc, indent=2) + "\n"
    return header + yaml.safe_dump(doc, sort_keys=False)
