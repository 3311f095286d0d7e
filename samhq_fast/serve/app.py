"""The Ray Serve application: an HTTP ingress (FastAPI), an image encoder and a mask decoder.

::

    client --HTTP--> Ingress --handle--> Encoder   (@serve.batch: images of concurrent uploads)
                        |  \\--handle--> Decoder   (@serve.batch: prompts of concurrent requests)
                        \\-- embedding cache: image_id -> object-store refs (LRU, MB-bounded)

``POST /v1/images`` decodes the upload, hashes the decoded pixels (the ``image_id``) and, unless
the cache has it, has the encoder embed it; the embedding goes into Ray's object store, owned by
the ingress, so any decoder replica on any node can read it. ``POST /v1/segment`` sends the
image's object ref and the prompts to a decoder, which validates them (400 on refusal) and then
joins a batch with the other requests in flight; each answer carries only its own prompts'
masks, as COCO compressed RLE. A call whose replica died is retried (Ray Serve starts a new
replica) for up to ``retry_s`` before the client gets 503.

``build_app(args)`` is the builder ``serve deploy`` imports (see
:func:`samhq_fast.serve.config.serve_config`); :func:`start` deploys it from Python.
"""

import asyncio
import collections
import json
import logging
import os
import time
from typing import Any

import numpy as np
import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from samhq_fast import __version__
from samhq_fast.serve.config import ServeConfig
from samhq_fast.serve.core import (
    ApiError,
    LRUCache,
    Prompt,
    decode_image,
    image_id,
    mask_records,
    pack_embedding,
    packed_nbytes,
    unpack_embedding,
    validate_prompts,
)

logger = logging.getLogger("ray.serve")

MB = 2**20
AMG_LIMITS = {  # (min, max) of the mask generator's integer settings over HTTP
    "points_per_side": (1, 64),
    "points_per_batch": (1, 1024),
    "crop_n_layers": (0, 2),
    "crop_n_points_downscale_factor": (1, 8),
    "min_mask_region_area": (0, 2**31),
}


# ------------------------------------------------------------------------------ schema
class PromptBody(BaseModel):
    """One prompt, in original-image pixels (as ``Predictor.predict``)."""

    model_config = ConfigDict(extra="forbid")
    points: list[list[float]] | None = Field(None, description="[[x, y], ...]")
    labels: list[float] | None = Field(
        None, description="one per point: 1 foreground, 0 background, -1 not a point; default 1"
    )
    box: list[float] | None = Field(None, description="[x1, y1, x2, y2]")


class SegmentBody(PromptBody):
    """``points`` / ``labels`` / ``box`` for one prompt, or ``prompts`` for several."""

    image_id: str
    prompts: list[PromptBody] | None = Field(None, description="several prompts at once")
    multimask: bool = Field(
        False, description="SAM-HQ rule: the best of SAM's 3 masks by predicted IoU, + HQ mask"
    )
    hq_token_only: bool = Field(False, description="the HQ mask alone")


class EverythingBody(BaseModel):
    """The automatic mask generator's settings (as ``AutomaticMaskGenerator``)."""

    model_config = ConfigDict(extra="forbid")
    image_id: str
    points_per_side: int = 32
    points_per_batch: int = 256
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
    multimask: bool = True
    hq_token_only: bool = False


class RLE(BaseModel):
    size: list[int] = Field(description="[H, W]")
    counts: str = Field(description="COCO compressed RLE (pycocotools.mask.decode reads it)")


class MaskRecord(BaseModel):
    score: float
    area: int
    bbox: list[int] = Field(description="[x, y, w, h]")
    rle: RLE


class SegmentResponse(BaseModel):
    masks: list[MaskRecord] = Field(description="one per prompt, in order")


class EverythingRecord(BaseModel):
    rle: RLE
    area: int
    bbox: list[float]
    predicted_iou: float
    stability_score: float
    point_coords: list[list[float]]
    crop_box: list[float]


class EverythingResponse(BaseModel):
    masks: list[EverythingRecord]


class ImageResponse(BaseModel):
    image_id: str
    width: int
    height: int
    cached: bool = Field(description="the embedding was already in the cache")


class ErrorResponse(BaseModel):
    error: str


ERRORS = {
    400: {"model": ErrorResponse, "description": "bad request"},
    404: {"model": ErrorResponse, "description": "unknown image_id"},
    413: {"model": ErrorResponse, "description": "body over the limit"},
    503: {"model": ErrorResponse, "description": "a replica is restarting; retry"},
}


# ----------------------------------------------------------------------------- helpers
def _make_predictor(cfg: ServeConfig):
    import torch

    from samhq_fast.predictor import Predictor

    if cfg.torch_threads:
        torch.set_num_threads(int(cfg.torch_threads))
    return Predictor(cfg.model, device=cfg.device, dtype=cfg.dtype, backend=cfg.backend)


class _BatchLog:
    """How many answers came from a batch of each size (each replica reports the size of the
    batch an answer was computed in; the ingress counts them, so every replica is seen)."""

    def __init__(self) -> None:
        self.sizes: collections.Counter[int] = collections.Counter()

    def add(self, n: int) -> None:
        self.sizes[int(n)] += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "max": max(self.sizes, default=0),
            "answers_by_batch_size": {str(k): v for k, v in sorted(self.sizes.items())},
        }


def _run(fn, *args):
    return asyncio.get_running_loop().run_in_executor(None, fn, *args)


# ----------------------------------------------------------------------------- encoder
@serve.deployment(name="Encoder")
class Encoder:
    """Holds a Predictor; embeds the images of concurrent uploads in one encoder call."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.cfg = ServeConfig.from_dict(config)
        self.predictor = _make_predictor(self.cfg)
        self._embed.set_max_batch_size(self.cfg.max_batch_size)
        self._embed.set_batch_wait_timeout_s(self.cfg.batch_wait_ms / 1000)

    async def embed(self, rgb: np.ndarray) -> dict[str, Any]:
        """``(H, W, 3)`` uint8 -> packed embedding (see ``core.pack_embedding``) + batch size."""
        return await self._embed(rgb)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _embed(self, images: list[np.ndarray]) -> list[dict[str, Any]]:
        emb = await _run(self.predictor.embed, list(images), "RGB", len(images))
        return [{**pack_embedding(emb[i]), "batch": len(images)} for i in range(len(images))]

    def ping(self) -> str:
        return "ok"

    def actor_name(self) -> str:
        return ray.get_runtime_context().get_actor_name()


# ----------------------------------------------------------------------------- decoder
class _Job:
    __slots__ = ("image_id", "embedding", "prompts", "multimask", "hq_token_only")

    def __init__(self, image_id, embedding, prompts, multimask, hq_token_only) -> None:
        self.image_id = image_id
        self.embedding = embedding
        self.prompts: list[Prompt] = prompts
        self.multimask = multimask
        self.hq_token_only = hq_token_only


@serve.deployment(name="Decoder")
class Decoder:
    """Holds a Predictor; decodes the prompts of concurrent requests in one decoder call."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.cfg = ServeConfig.from_dict(config)
        self.predictor = _make_predictor(self.cfg)
        self.local = LRUCache(int(self.cfg.decoder_cache_mb * MB))
        self._decode.set_max_batch_size(self.cfg.max_batch_size)
        self._decode.set_batch_wait_timeout_s(self.cfg.batch_wait_ms / 1000)

    async def _embedding(self, iid: str, entry: dict[str, Any]):
        emb = self.local.get(iid)
        if emb is None:
            packed = await entry["embedding"][0]
            emb = unpack_embedding(packed, self.predictor.device)
            self.local.put(iid, emb, packed_nbytes(packed))
        return emb

    async def segment(
        self,
        iid: str,
        entry: dict[str, Any],
        prompts: list[dict[str, Any]],
        multimask: bool,
        hq_token_only: bool,
    ) -> dict[str, Any]:
        """Validate, then decode in a batch with the other requests in flight.

        Returns ``{"masks": [...], "batch": {...}}`` or ``{"status": 400, "error": ...}``."""
        try:
            checked = validate_prompts(self.predictor, tuple(entry["original_size"]), prompts)
        except ApiError as e:
            return e.to_dict()
        emb = await self._embedding(iid, entry)
        return await self._decode(_Job(iid, emb, checked, multimask, hq_token_only))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _decode(self, jobs: list[_Job]) -> list[dict[str, Any]]:
        return await _run(self._decode_isolated, list(jobs))

    def _decode_isolated(self, jobs: list[_Job]) -> list[dict[str, Any]]:
        """One failing job must not fail the others of its batch: on an error, decode each job
        alone and answer the failing ones with an error."""
        try:
            return self._decode_sync(jobs)
        except Exception:
            if len(jobs) == 1:
                logger.exception("decoder failed")
                return [{"status": 500, "error": "internal error in the decoder"}]
        return [self._decode_isolated([job])[0] for job in jobs]

    def _decode_sync(self, jobs: list[_Job]) -> list[dict[str, Any]]:
        """All prompts of all jobs, grouped by output options; within a group one
        ``decode_batch`` call (one entry per image and prompt signature)."""
        import torch

        from samhq_fast.predictor import ImageEmbedding

        n_prompts = sum(len(j.prompts) for j in jobs)
        info = {"requests": len(jobs), "prompts": n_prompts}
        results: list[list[Any]] = [[None] * len(j.prompts) for j in jobs]
        groups: dict[tuple, dict[tuple, list[tuple[int, int]]]] = {}
        pred = self.predictor
        for ji, job in enumerate(jobs):
            for pi, p in enumerate(job.prompts):
                if p.points is None and p.box is None:  # no prompt: the whole-image guess
                    masks, scores, _ = pred.decode(
                        job.embedding, multimask_output=job.multimask,
                        hq_token_only=job.hq_token_only,
                    )  # fmt: skip
                    results[ji][pi] = (masks[0], scores[0])
                    continue
                key = (job.image_id, *p.signature)
                opts = (job.multimask, job.hq_token_only)
                groups.setdefault(opts, {}).setdefault(key, []).append((ji, pi))
        for (multimask, hq), entries in groups.items():
            members = list(entries.values())
            embs = [jobs[m[0][0]].embedding for m in members]
            embedding = ImageEmbedding(
                torch.cat([e.image_embeddings for e in embs]),
                torch.cat([e.hq_features for e in embs]),
                tuple(e.original_sizes[0] for e in embs),
                tuple(e.input_sizes[0] for e in embs),
            )
            points, labels, boxes = [], [], []
            for m in members:
                ps = [jobs[ji].prompts[pi] for ji, pi in m]
                has_pts, has_box = ps[0].points is not None, ps[0].box is not None
                points.append(np.stack([p.points for p in ps]) if has_pts else None)
                labels.append(np.stack([p.labels for p in ps]) if has_pts else None)
                boxes.append(np.stack([p.box for p in ps]) if has_box else None)
            out = pred.decode_batch(
                embedding, points, labels, boxes, multimask_output=multimask, hq_token_only=hq
            )
            for m, (masks, scores, _) in zip(members, out, strict=True):
                for k, (ji, pi) in enumerate(m):
                    results[ji][pi] = (masks[k, 0], scores[k, 0])
        answers = []
        for ji in range(len(jobs)):
            masks = np.stack([r[0] for r in results[ji]])
            scores = np.array([r[1] for r in results[ji]], dtype=np.float64)
            answers.append({"masks": mask_records(masks, scores), "batch": info})
        return answers

    async def everything(
        self, iid: str, entry: dict[str, Any], params: dict[str, Any]
    ) -> dict[str, Any]:
        """The automatic mask generator on the cached embedding (crops, if any, are embedded
        here). Returns ``{"masks": [...]}`` or ``{"status": 400, "error": ...}``."""
        from samhq_fast.amg import AutomaticMaskGenerator

        for k, (lo, hi) in AMG_LIMITS.items():
            if not lo <= params[k] <= hi:
                return ApiError(400, f"{k} must be in {lo}-{hi}, got {params[k]}").to_dict()
        params = dict(params)
        multimask = params.pop("multimask", True)
        try:
            amg = AutomaticMaskGenerator(
                self.predictor, output_mode="coco_rle", multimask_output=multimask, **params
            )
        except (ValueError, TypeError, ImportError) as e:
            return ApiError(400, str(e)).to_dict()
        emb = await self._embedding(iid, entry)
        rgb = await entry["image"][0]
        amg.predictor = _CachedFirst(self.predictor, emb)
        records = await _run(amg.generate, rgb)
        for r in records:
            r["rle"] = r.pop("segmentation")
        return {"masks": records}

    def ping(self) -> str:
        return "ok"

    def actor_name(self) -> str:
        return ray.get_runtime_context().get_actor_name()


class _CachedFirst:
    """A Predictor whose ``embed`` returns the cached embedding for the first image (the whole
    image, crop 0 of the mask generator) and embeds only the other crops."""

    def __init__(self, predictor, embedding) -> None:
        self._p, self._emb = predictor, embedding

    def __getattr__(self, name: str):
        return getattr(self._p, name)

    def embed(self, images, image_format: str = "RGB", batch_size: int = 8):
        import torch

        from samhq_fast.predictor import ImageEmbedding

        if len(images) == 1:
            return self._emb
        rest = self._p.embed(list(images[1:]), image_format, batch_size)
        e = self._emb
        return ImageEmbedding(
            torch.cat([e.image_embeddings, rest.image_embeddings]),
            torch.cat([e.hq_features, rest.hq_features]),
            e.original_sizes + rest.original_sizes,
            e.input_sizes + rest.input_sizes,
        )


# ----------------------------------------------------------------------------- ingress
class _BodyLimit:
    """Reads the whole body (at most ``limit`` bytes; 413 beyond) before the app sees it."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, int(limit)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                return await _send_json(send, 400, {"error": "bad Content-Length header"})
            if too_big:
                return await _send_json(send, 413, {"error": _too_large(int(length), limit)})
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > limit:
                return await _send_json(send, 413, {"error": _too_large(size, limit)})
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        data, done = b"".join(chunks), False

        async def replay():
            nonlocal done
            if not done:
                done = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def _too_large(size: int, limit: int) -> str:
    return f"request body is over the limit of {limit} bytes (at least {size} bytes)"


async def _send_json(send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


IMAGE_BODY = {
    "required": True,
    "description": "the image file's bytes (PNG, JPEG, WebP, ...)",
    "content": {
        t: {"schema": {"type": "string", "format": "binary"}}
        for t in ("application/octet-stream", "image/*")
    },
}


def make_api(ing: "Ingress") -> FastAPI:
    """The FastAPI app of one ingress replica (routes call ``ing``; limits from its config)."""
    api = FastAPI(
        title="samhq_fast",
        version=__version__,
        description=(
            "SAM-HQ segmentation over HTTP: upload an image once (POST /v1/images), then "
            "segment it with point / box prompts (POST /v1/segment) or everything "
            "(POST /v1/everything). Masks are COCO compressed RLE."
        ),
    )
    api.add_middleware(_BodyLimit, limit=int(ing.cfg.max_body_mb * MB))

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:5]:
            if err.get("type") == "json_invalid":
                where = err.get("loc", ("body", "?"))[-1]
                ing._count(400)
                return _error(400, f"malformed JSON body (at character {where})")
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
        ing._count(400)
        return _error(400, "invalid request: " + "; ".join(parts))

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        ing._count(exc.status_code)
        return _error(exc.status_code, str(exc.detail))

    @api.get("/healthz", responses={503: {"model": ErrorResponse}})
    async def healthz() -> dict[str, str]:
        """200 ``{"status": "ok"}`` when the encoder and the decoder answer."""
        return await ing.healthz()

    @api.post("/v1/images", response_model=ImageResponse, responses=ERRORS,
              openapi_extra={"requestBody": IMAGE_BODY})  # fmt: skip
    async def images(request: Request):
        """Upload an image; its embedding is computed (unless cached) and kept in the cache.
        The ``image_id`` is a hash of the decoded pixels: the same picture in another file
        format gets the same id."""
        return await ing.guard(ing.images(await request.body()))

    @api.post("/v1/segment", response_model=SegmentResponse, responses=ERRORS)
    async def segment(body: SegmentBody):
        """Masks for point / box prompts on an uploaded image: ``Predictor.predict``'s, one
        per prompt, as COCO compressed RLE."""
        return await ing.guard(ing.segment(body))

    @api.post("/v1/everything", response_model=EverythingResponse, responses=ERRORS)
    async def everything(body: EverythingBody):
        """Segment everything: the automatic mask generator's records, COCO RLE masks."""
        return await ing.guard(ing.everything(body))

    @api.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        """Counters: responses by status, the cache, and the batch sizes the encoder and the
        decoder ran (reported with each answer, so from every replica)."""
        return ing.stats()

    return api


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """HTTP API; keeps the embedding cache (object-store refs it owns, LRU by MB)."""

    def __init__(
        self, encoder: DeploymentHandle, decoder: DeploymentHandle, config: dict[str, Any]
    ) -> None:
        self.cfg = ServeConfig.from_dict(config)
        self.encoder, self.decoder = encoder, decoder
        self.cache = LRUCache(int(self.cfg.cache_mb * MB))
        self._pending: dict[str, asyncio.Future] = {}
        self.status_counts: collections.Counter[str] = collections.Counter()
        self.encoder_batches, self.decoder_batches = _BatchLog(), _BatchLog()
        self.decoder_prompts = _BatchLog()
        self.retries = 0

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self)

    async def _call(self, method, *args):
        """``await handle.method.remote(*args)``, retried while a replica restarts."""
        deadline = time.monotonic() + self.cfg.retry_s
        delay = 0.2
        while True:
            try:
                return await method.remote(*args)
            except RayActorError as e:
                if time.monotonic() + delay > deadline:
                    raise ApiError(
                        503,
                        f"a replica died and none answered within {self.cfg.retry_s} s; "
                        f"retry later ({type(e).__name__})",
                    ) from None
                self.retries += 1
                logger.warning("replica died (%s); retrying in %.1f s", type(e).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 2.0)

    def _entry(self, iid: str) -> dict[str, Any]:
        entry = self.cache.get(iid)
        if entry is None:
            raise ApiError(404, f"unknown image_id {iid!r}: upload the image to /v1/images "
                           "(it may have been evicted from the cache)")  # fmt: skip
        return entry

    async def _embed(self, iid: str, rgb: np.ndarray) -> dict[str, Any]:
        packed = await self._call(self.encoder.embed, rgb)
        self.encoder_batches.add(packed.pop("batch"))
        nbytes = packed_nbytes(packed) + rgb.nbytes
        entry = {
            # Refs inside lists so Ray hands them to the decoder unresolved.
            "embedding": [ray.put(packed)],
            "image": [ray.put(rgb)],
            "original_size": list(packed["original_size"]),
        }
        self.cache.put(iid, entry, nbytes)
        return entry

    def _count(self, status: int) -> None:
        self.status_counts[str(status)] += 1

    async def guard(self, coro) -> Any:
        """Await ``coro`` and count it; a failure becomes ``{"error": ...}``: the client's
        error (ApiError, or a ValueError / TypeError a replica raised on its input) as its
        4xx, anything else logged and answered 500 with its type."""
        try:
            out = await coro
        except Exception as e:
            if isinstance(e, ApiError):
                status, message = e.status, e.message
            elif isinstance(e, (ValueError, TypeError)):
                cause = getattr(e, "cause", None) or e
                status, message = 400, str(cause).strip().splitlines()[-1]
            else:
                logger.exception("internal error")
                status, message = 500, f"internal error: {type(e).__name__}"
            self._count(status)
            return _error(status, message)
        self._count(200)
        return out

    async def healthz(self):
        try:
            await asyncio.wait_for(
                asyncio.gather(self.encoder.ping.remote(), self.decoder.ping.remote()), 10
            )
        except (RayActorError, asyncio.TimeoutError) as e:
            return _error(503, f"not ready: {type(e).__name__}")
        return {"status": "ok"}

    async def images(self, body: bytes) -> dict[str, Any]:
        rgb = await _run(decode_image, body, self.cfg.max_image_pixels)
        iid = image_id(rgb)
        cached = iid in self.cache
        if cached:
            self.cache.get(iid)  # refresh its LRU position
        else:
            fut = self._pending.get(iid)
            if fut is None:  # the first upload of this image embeds it; others wait for it
                fut = asyncio.ensure_future(self._embed(iid, rgb))
                self._pending[iid] = fut
                fut.add_done_callback(lambda _: self._pending.pop(iid, None))
            await asyncio.shield(fut)
        h, w = rgb.shape[:2]
        return {"image_id": iid, "width": int(w), "height": int(h), "cached": cached}

    async def segment(self, body: SegmentBody) -> dict[str, Any]:
        entry = self._entry(body.image_id)
        single = body.model_dump(include={"points", "labels", "box"}, exclude_none=True)
        if body.prompts is not None:
            if single:
                raise ApiError(400, "give either points / labels / box or prompts, not both")
            if not body.prompts:
                raise ApiError(400, "prompts is empty")
            prompts = [p.model_dump(exclude_none=True) for p in body.prompts]
        else:
            prompts = [single]
        if len(prompts) > self.cfg.max_prompts:
            raise ApiError(400, f"{len(prompts)} prompts, over the limit of "
                           f"{self.cfg.max_prompts} per request")  # fmt: skip
        out = await self._call(
            self.decoder.segment, body.image_id, entry, prompts, body.multimask,
            body.hq_token_only,
        )  # fmt: skip
        if "error" in out:
            raise ApiError(out["status"], out["error"])
        batch = out.pop("batch")
        self.decoder_batches.add(batch["requests"])
        self.decoder_prompts.add(batch["prompts"])
        return out

    async def everything(self, body: EverythingBody) -> dict[str, Any]:
        entry = self._entry(body.image_id)
        params = body.model_dump(exclude={"image_id"})
        out = await self._call(self.decoder.everything, body.image_id, entry, params)
        if "error" in out:
            raise ApiError(out["status"], out["error"])
        return out

    def stats(self) -> dict[str, Any]:
        return {
            "responses": dict(self.status_counts),
            "cache": self.cache.stats(),
            "encoder_batch_images": self.encoder_batches.to_dict(),
            "decoder_batch_requests": self.decoder_batches.to_dict(),
            "decoder_batch_prompts": self.decoder_prompts.to_dict(),
            "pending_uploads": len(self._pending),
            "retries": self.retries,
        }


# ----------------------------------------------------------------------------- builder
def build_app(args: dict[str, Any] | ServeConfig | None = None):
    """The Serve application for ``args`` (a :class:`ServeConfig` or its dict); the builder
    ``serve deploy`` calls with the config file's ``args``."""
    cfg = args if isinstance(args, ServeConfig) else ServeConfig.from_dict(dict(args or {}))
    conf = cfg.to_dict()

    def opts(which: str) -> dict[str, Any]:
        return {
            "num_replicas": cfg.replicas(which),
            "max_ongoing_requests": cfg.max_ongoing(which),
            "ray_actor_options": cfg.actor_options(which),
        }

    encoder = Encoder.options(**opts("encoder")).bind(conf)
    decoder = Decoder.options(**opts("decoder")).bind(conf)
    return Ingress.options(**opts("ingress")).bind(encoder, decoder, conf)


def connect(num_cpus: int | None = None) -> bool:
    """Connect to the cluster at ``RAY_ADDRESS`` if set (nothing to do when already
    connected), else start a local Ray here (``num_cpus``: its CPU count, default all).
    Returns whether Ray was started here."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or None
    if address is None:
        ray.init(num_cpus=num_cpus, include_dashboard=False)
        return True
    ray.init(address=address)
    return False


def deploy(cfg: ServeConfig) -> None:
    """Deploy ``cfg`` onto the connected cluster and wait until every deployment is ready."""
    serve.start(http_options={"host": cfg.host, "port": int(cfg.port)})
    serve.run(build_app(cfg), name=cfg.name, route_prefix=cfg.route_prefix)


def start(cfg: ServeConfig, num_cpus: int | None = None) -> bool:
    """:func:`connect` then :func:`deploy`; returns whether Ray was started here."""
    started = connect(num_cpus)
    deploy(cfg)
    return started


def stop(cfg: ServeConfig, started_ray: bool) -> None:
    """Undo :func:`start`: Serve and Ray when Ray was started here, else just this
    application (the cluster and its other applications keep running)."""
    try:
        if started_ray:
            serve.shutdown()
        else:
            serve.delete(cfg.name)
    finally:
        ray.shutdown()  # stops a local Ray; only disconnects from a cluster
