"""``samhq-fast`` command line (argparse + Pillow only).

Example::

    samhq-fast segment photo.jpg --point 320,240 --point 100,80,0 --out mask.png \\
        --overlay overlay.png --json
    samhq-fast segment photo.jpg --box 10,20,300,400 --checkpoint sam_hq_vit_b.pth --out m.png

Several ``--box`` give several prompts (the points, if any, go with every box); the mask PNG is
their union. Errors are reported as one ``samhq-fast: error: ...`` line on stderr, exit code 2
for usage / input problems and 1 for failures while running the model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import numpy as np

from samhq_fast.ops.backend import BACKENDS

PROG = "samhq-fast"
OVERLAY_TINT = (30, 144, 255)
POINT_COLOURS = {1: (0, 220, 0), 0: (230, 0, 0), -1: (160, 160, 160)}
BOX_COLOUR = (255, 200, 0)


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as a single ``prog: error: ...`` line (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(message, 2)


def _numbers(text: str, counts: tuple[int, ...], what: str) -> list[float]:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in counts:
        raise argparse.ArgumentTypeError(f"bad {what} {text!r}")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad {what} {text!r}: not numbers") from None
    if not all(np.isfinite(values)):
        raise argparse.ArgumentTypeError(f"bad {what} {text!r}: not finite")
    return values


def parse_point(text: str) -> tuple[float, float, int]:
    """``"X,Y"`` or ``"X,Y,L"`` (label 1 foreground, 0 background, -1 not a point)."""
    v = _numbers(text, (2, 3), "point (expected X,Y or X,Y,LABEL)")
    label = v[2] if len(v) == 3 else 1.0
    if label not in (1.0, 0.0, -1.0):
        raise argparse.ArgumentTypeError(
            f"bad point {text!r}: label must be 1 (foreground), 0 (background) or -1"
        )
    return v[0], v[1], int(label)


def parse_box(text: str) -> tuple[float, float, float, float]:
    """``"X1,Y1,X2,Y2"``."""
    v = _numbers(text, (4,), "box (expected X1,Y1,X2,Y2)")
    return v[0], v[1], v[2], v[3]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Fast, exact SAM-HQ segmentation.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    seg = sub.add_parser("segment", help="segment one image from point / box prompts")
    seg.add_argument("image", help="input image file")
    seg.add_argument(
        "--point", type=parse_point, action="append", default=[], metavar="X,Y[,L]",
        help="point prompt in pixels; L = 1 foreground (default), 0 background; repeatable",
    )  # fmt: skip
    seg.add_argument(
        "--box", type=parse_box, action="append", default=[], metavar="X1,Y1,X2,Y2",
        help="box prompt in pixels; repeat for several objects (mask = union)",
    )  # fmt: skip
    _model_args(seg)
    seg.add_argument(
        "--multimask", action="store_true",
        help="SAM-HQ multimask rule: the best of SAM's three masks (by predicted IoU) + HQ mask",
    )  # fmt: skip
    seg.add_argument("--out", required=True, help="mask PNG to write (0/255, original size)")
    seg.add_argument("--overlay", default=None, help="overlay PNG to write")
    seg.add_argument("--json", action="store_true", help="print scores and mask stats as JSON")

    ev = sub.add_parser("everything", help="segment everything (automatic mask generation)")
    ev.add_argument("image", help="input image file, or a folder of images")
    _model_args(ev)
    ev.add_argument("--out-dir", required=True, help="folder for one 0/255 PNG per mask")
    ev.add_argument("--overlay", default=None, help="overlay PNG (folder input: a folder)")
    ev.add_argument("--rle", default=None, help="JSON file of COCO-RLE records (folder: a folder)")
    ev.add_argument("--points-per-side", type=int, default=32)
    ev.add_argument("--points-per-batch", type=int, default=256)
    ev.add_argument("--pred-iou-thresh", type=float, default=0.88)
    ev.add_argument("--stability-score-thresh", type=float, default=0.95)
    ev.add_argument("--box-nms-thresh", type=float, default=0.7)
    ev.add_argument("--crop-n-layers", type=int, default=0)
    ev.add_argument("--min-mask-region-area", type=int, default=0)
    _export_onnx_args(sub)
    _serve_args(sub)
    return parser


def _export_onnx_args(sub) -> None:
    ex = sub.add_parser(
        "export-onnx",
        help="export the image encoder and the HQ decoder (official SAM-HQ interface) to ONNX",
    )
    ex.add_argument(
        "checkpoint", help="official sam_hq_*.pth, HF directory, preset or hub id (as load_model)"
    )
    ex.add_argument("--out", required=True, metavar="DIR", help="folder to write the models to")
    ex.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 14, default 17)")
    ex.add_argument("--hq-token-only", action="store_true", help="decoder: the HQ mask alone")
    ex.add_argument(
        "--multimask", action="store_true",
        help="decoder: SAM-HQ multimask rule (best of SAM's 3 masks by IoU, + HQ mask)",
    )  # fmt: skip
    ex.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    ex.add_argument(
        "--use-stability-score", action="store_true",
        help="decoder: stability score of the low-res mask instead of the predicted IoU",
    )  # fmt: skip
    ex.add_argument(
        "--return-extra-metrics", action="store_true",
        help="decoder: also output stability_scores and areas (five outputs, as officially)",
    )  # fmt: skip
    ex.add_argument("--decoder-only", action="store_true", help="skip encoder.onnx")
    ex.add_argument(
        "--no-verify", action="store_true", help="skip the onnxruntime check after export"
    )


def _export_onnx(args: argparse.Namespace) -> int:
    from samhq_fast.onnx_export import MIN_OPSET, OnnxDependencyError, require_onnx

    try:
        require_onnx()
    except OnnxDependencyError as e:
        raise CLIError(str(e), 1) from None
    if args.opset < MIN_OPSET:
        raise CLIError(f"--opset must be >= {MIN_OPSET}, got {args.opset}")
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--out exists and is not a directory: {args.out}")
    if not os.path.isdir(os.path.dirname(out)):
        raise CLIError(f"output directory's parent does not exist: {os.path.dirname(out)}")

    from samhq_fast.onnx_export import export_onnx
    from samhq_fast.weights import CheckpointError, CheckpointNotFoundError, load_model

    try:
        model = load_model(args.checkpoint, device="cpu", dtype="fp32", backend="reference")
    except CheckpointNotFoundError as e:
        raise CLIError(f"no weights for {args.checkpoint!r}: {e}") from None
    except (CheckpointError, ValueError, OSError) as e:
        raise CLIError(f"cannot load {args.checkpoint!r}: {e}") from None
    print(f"exporting {args.checkpoint} ({args.dtype}, opset {args.opset}) ...", flush=True)
    try:
        result = export_onnx(
            model,
            out,
            opset=args.opset,
            hq_token_only=args.hq_token_only,
            multimask_output=args.multimask,
            dtype=args.dtype,
            use_stability_score=args.use_stability_score,
            return_extra_metrics=args.return_extra_metrics,
            encoder=not args.decoder_only,
            verify=not args.no_verify,
            source=str(args.checkpoint),
        )
    except ValueError as e:
        raise CLIError(str(e)) from None
    print(result.summary())
    for name, err in result.verification.items():
        print(f"onnxruntime vs PyTorch {name}: {err:.2e} (max abs error / max abs value)")
    for note in result.notes:
        print(f"note: {note}")
    files = [result.decoder] if args.decoder_only else [result.encoder, result.decoder]
    print("wrote " + ", ".join(str(f) for f in files) + f", {result.readme}, "
          f"{os.path.join(out, 'triton')}/")  # fmt: skip
    return 0


def _serve_args(sub) -> None:
    from samhq_fast.serve.config import ServeConfig

    d = ServeConfig()
    sv = sub.add_parser(
        "serve", help="HTTP service on Ray Serve (local Ray, or the cluster at RAY_ADDRESS)"
    )
    src = sv.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="preset or hub id (default vit_b)")
    src.add_argument("--checkpoint", default=None, help="official .pth or HF directory")
    sv.add_argument("--device", default=None, help="cpu or cuda (default: cuda if any here)")
    sv.add_argument("--dtype", default=d.dtype, choices=["fp32", "bf16", "fp16"])
    sv.add_argument("--backend", default=d.backend, choices=list(BACKENDS))
    sv.add_argument("--host", default=d.host, help="HTTP address (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=d.port)
    sv.add_argument("--encoder-replicas", type=int, default=d.encoder_replicas)
    sv.add_argument("--decoder-replicas", type=int, default=d.decoder_replicas)
    sv.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                    help="requests per encoder / decoder call")  # fmt: skip
    sv.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms,
                    help="how long a batch waits to fill")  # fmt: skip
    sv.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels)
    sv.add_argument("--max-body-mb", type=float, default=d.max_body_mb)
    sv.add_argument("--cache-mb", type=float, default=d.cache_mb,
                    help="embedding cache (LRU) of the ingress, in MB")  # fmt: skip
    sv.add_argument("--decoder-cache-mb", type=float, default=d.decoder_cache_mb)
    sv.add_argument("--encoder-cpus", type=float, default=d.encoder_cpus,
                    help="CPUs each encoder replica reserves (fractions allowed)")  # fmt: skip
    sv.add_argument("--decoder-cpus", type=float, default=d.decoder_cpus)
    sv.add_argument(
        "--encoder-gpus",
        type=float,
        default=None,
        help="GPUs per encoder replica (default 1 with --device cuda, else 0)",
    )
    sv.add_argument("--decoder-gpus", type=float, default=None)
    sv.add_argument("--torch-threads", type=int, default=None)
    sv.add_argument(
        "--num-cpus",
        type=int,
        default=None,
        help="CPUs of the local Ray (without RAY_ADDRESS; default all)",
    )
    sv.add_argument("--name", default=d.name, help="Serve application name")
    sv.add_argument("--route-prefix", default=d.route_prefix)
    sv.add_argument("--print-config", action="store_true",
                    help="print the equivalent Ray Serve config file (for `serve deploy`) "
                    "and exit")  # fmt: skip


def _model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="preset or hub id (default vit_b)")
    src.add_argument("--checkpoint", default=None, help="official .pth or HF directory")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--backend", default="auto", choices=list(BACKENDS))
    p.add_argument("--hq-only", action="store_true", help="use the HQ mask alone")


def mask_stats(mask: np.ndarray) -> dict:
    """``{"area": pixels, "bbox": [x, y, w, h]}`` of a boolean ``(H, W)`` mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return {"area": 0, "bbox": [0, 0, 0, 0]}
    x0, y0 = int(xs.min()), int(ys.min())
    return {"area": int(len(xs)), "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]}


def render_overlay(
    image: np.ndarray,
    mask: np.ndarray,
    points: Sequence[tuple[float, float, int]],
    boxes: Sequence[tuple[float, float, float, float]],
):
    """The image with the mask tinted, points as dots (green fg / red bg) and boxes drawn."""
    from PIL import Image, ImageDraw

    out = image.astype(np.float32)
    tint = np.asarray(OVERLAY_TINT, np.float32)
    out[mask] = 0.45 * out[mask] + 0.55 * tint
    pil = Image.fromarray(out.round().astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    h, w = mask.shape
    line = max(1, round(min(h, w) / 200))
    radius = max(2, round(min(h, w) / 80))
    for x1, y1, x2, y2 in boxes:
        draw.rectangle([x1, y1, x2, y2], outline=BOX_COLOUR, width=line)
    for x, y, label in points:
        draw.ellipse(
            [x - radius, y - radius, x + radius, y + radius],
            fill=POINT_COLOURS[label], outline=(255, 255, 255),
        )  # fmt: skip
    return pil


def _read_image(path: str) -> np.ndarray:
    from samhq_fast.image import load_image

    try:
        return load_image(path)
    except Exception as e:
        raise CLIError(f"cannot read image {path}: {e}") from None


def _load_predictor(args: argparse.Namespace):
    from samhq_fast.predictor import Predictor
    from samhq_fast.weights import CheckpointError, CheckpointNotFoundError

    if args.checkpoint is not None and not os.path.exists(args.checkpoint):
        raise CLIError(f"checkpoint not found: {args.checkpoint}")
    source = args.checkpoint or args.model or "vit_b"
    try:
        return Predictor(source, device=args.device, dtype=args.dtype, backend=args.backend)
    except CheckpointNotFoundError as e:
        msg = str(e).split(". Offline")[0]
        raise CLIError(
            f"no weights for {source!r}: {msg}. Offline, pass --checkpoint PATH "
            "(an official sam_hq_*.pth or an HF directory)"
        ) from None
    except (CheckpointError, ValueError) as e:
        raise CLIError(f"cannot load {source!r}: {e}") from None


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def render_everything(image: np.ndarray, records: Sequence[dict]):
    """The image with each mask tinted in its own colour (largest first, so small ones show)."""
    from PIL import Image

    out = image.astype(np.float32)
    rng = np.random.default_rng(0)
    for rec in sorted(records, key=lambda r: -r["area"]):
        m = rec["segmentation"]
        colour = rng.integers(40, 256, 3).astype(np.float32)
        out[m] = 0.4 * out[m] + 0.6 * colour
    return Image.fromarray(out.round().astype(np.uint8))


def _everything(args: argparse.Namespace) -> int:
    from PIL import Image

    from samhq_fast.amg import AutomaticMaskGenerator, coco_encode_rle, mask_to_rle

    if os.path.isdir(args.image):
        files = sorted(
            os.path.join(args.image, f)
            for f in os.listdir(args.image)
            if f.lower().endswith(IMAGE_SUFFIXES)
        )
        if not files:
            raise CLIError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {args.image}")
    elif os.path.isfile(args.image):
        files = [args.image]
    else:
        raise CLIError(f"image file or folder not found: {args.image}")
    folder = len(files) > 1 or os.path.isdir(args.image)
    predictor = _load_predictor(args)
    try:
        amg = AutomaticMaskGenerator(
            predictor,
            points_per_side=args.points_per_side,
            points_per_batch=args.points_per_batch,
            pred_iou_thresh=args.pred_iou_thresh,
            stability_score_thresh=args.stability_score_thresh,
            box_nms_thresh=args.box_nms_thresh,
            crop_n_layers=args.crop_n_layers,
            min_mask_region_area=args.min_mask_region_area,
            hq_token_only=args.hq_only,
        )
    except (ValueError, TypeError, ImportError) as e:
        raise CLIError(str(e)) from None
    for path in (args.out_dir, *(p for p in (args.overlay, args.rle) if folder and p)):
        os.makedirs(path, exist_ok=True)
    for n, path in enumerate(files, 1):
        image = _read_image(path)
        records = amg.generate(image)
        stem = os.path.splitext(os.path.basename(path))[0]
        out_dir = os.path.join(args.out_dir, stem) if folder else args.out_dir
        os.makedirs(out_dir, exist_ok=True)
        for i, rec in enumerate(records):
            mask = rec["segmentation"].astype(np.uint8) * 255
            Image.fromarray(mask, mode="L").save(os.path.join(out_dir, f"mask_{i:03d}.png"))
        if args.overlay:
            target = os.path.join(args.overlay, f"{stem}.png") if folder else args.overlay
            render_everything(image, records).save(target)
        if args.rle:
            import torch

            rles = mask_to_rle(torch.as_tensor(np.stack([r["segmentation"] for r in records])))
            out = [
                {**{k: v for k, v in r.items() if k != "segmentation"},
                 "segmentation": coco_encode_rle(rle)}
                for r, rle in zip(records, rles, strict=True)
            ] if records else []  # fmt: skip
            target = os.path.join(args.rle, f"{stem}.json") if folder else args.rle
            with open(target, "w", encoding="utf-8") as f:
                json.dump(out, f)
        if folder:
            print(f"[{n}/{len(files)}] {os.path.basename(path)}: {len(records)} masks",
                  file=sys.stderr, flush=True)  # fmt: skip
    if not folder:
        print(f"{len(records)} masks written to {args.out_dir}", file=sys.stderr)
    return 0


def _segment(args: argparse.Namespace) -> int:
    from PIL import Image

    if not os.path.isfile(args.image):
        raise CLIError(f"image file not found: {args.image}")
    for path in (args.out, args.overlay):
        parent = os.path.dirname(os.path.abspath(path)) if path else None
        if parent and not os.path.isdir(parent):
            raise CLIError(f"output directory does not exist: {parent}")

    image = _read_image(args.image)
    predictor = _load_predictor(args)

    points = args.point
    kw: dict = {}
    if points:
        kw["point_coords"] = np.array([p[:2] for p in points], dtype=np.float64)
        kw["point_labels"] = np.array([p[2] for p in points], dtype=np.int64)
    if args.box:
        kw["box"] = np.array(args.box, dtype=np.float64)
    try:
        # The input contract (samhq_fast.contract) before the encoder runs.
        prompts = predictor.validate_prompts(image.shape[:2], **kw)
        predictor.set_image(image)
        masks, scores, _ = predictor.decode_prompts(
            predictor.embedding, prompts, multimask_output=args.multimask,
            hq_token_only=args.hq_only,
        )  # fmt: skip
    except (ValueError, TypeError) as e:
        raise CLIError(str(e)) from None
    if masks.ndim == 3:  # one prompt -> (1, C, H, W)
        masks, scores = masks[None], scores[None]
    per_prompt = masks[:, 0]  # (K, H, W): one mask per prompt
    union = per_prompt.any(axis=0)
    try:
        Image.fromarray(union.astype(np.uint8) * 255, mode="L").save(args.out)
        if args.overlay:
            render_overlay(image, union, points, args.box).save(args.overlay)
    except (OSError, ValueError) as e:
        raise CLIError(f"cannot write output: {e}") from None
    if args.json:
        report = {
            "scores": [float(s) for s in scores[:, 0]],
            "masks": [mask_stats(m) for m in per_prompt],
        }
        print(json.dumps(report))
    return 0


def _serve_config(args: argparse.Namespace):
    from samhq_fast.serve.config import ServeConfig

    if args.checkpoint is not None:
        if not os.path.exists(args.checkpoint):
            raise CLIError(f"checkpoint not found: {args.checkpoint}")
        source = os.path.abspath(args.checkpoint)  # replicas may run in another directory
    else:
        source = args.model or "vit_b"
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    fields = ("dtype", "backend", "host", "port", "encoder_replicas", "decoder_replicas",
              "max_batch_size", "batch_wait_ms", "max_image_pixels", "max_body_mb", "cache_mb",
              "decoder_cache_mb", "encoder_cpus", "decoder_cpus", "encoder_gpus",
              "decoder_gpus", "torch_threads", "name", "route_prefix")  # fmt: skip
    try:
        return ServeConfig(model=source, device=device, **{k: getattr(args, k) for k in fields})
    except ValueError as e:
        raise CLIError(str(e)) from None


def _serve(args: argparse.Namespace) -> int:
    import signal
    import time

    from samhq_fast.serve.config import dump_serve_config

    cfg = _serve_config(args)
    if args.print_config:
        sys.stdout.write(dump_serve_config(cfg))
        return 0
    try:
        from samhq_fast.serve import app
    except ImportError as e:
        raise CLIError(
            f"the HTTP service needs Ray Serve ({e}): pip install 'samhq-fast[serve]'"
        ) from None
    stop = []

    def on_signal(signum, frame):
        stop.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    started = False
    try:
        where = os.environ.get("RAY_ADDRESS") or "a local Ray"
        print(f"{PROG}: deploying {cfg.model} ({cfg.device}, {cfg.dtype}) onto {where}",
              file=sys.stderr, flush=True)  # fmt: skip
        started = app.connect(num_cpus=args.num_cpus)
        for s in old:  # again: connecting to a cluster installs Ray's own SIGTERM handler
            signal.signal(s, on_signal)
        app.deploy(cfg)
        url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
        print(f"{PROG}: serving on {url} (API docs: {url}/docs); Ctrl-C or SIGTERM stops it",
              file=sys.stderr, flush=True)  # fmt: skip
        while not stop:
            time.sleep(0.2)
        print(f"{PROG}: shutting down", file=sys.stderr, flush=True)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if started or app.ray.is_initialized():
            app.stop(cfg, started)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``samhq-fast`` / ``python -m samhq_fast``; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        if args.command == "export-onnx":
            return _export_onnx(args)
        if args.command == "serve":
            return _serve(args)
        return _everything(args) if args.command == "everything" else _segment(args)
    except CLIError as e:
        print(f"{PROG}: error: {e}".splitlines()[0], file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # no tracebacks for users; the message names the problem
        text = f"{type(e).__name__}: {e}".splitlines()[0]
        print(f"{PROG}: error: {text}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
