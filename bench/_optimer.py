"""Per-call timers around a model's fused ops, for ``python -m bench.roofline measure``.

:class:`OpTimer` wraps every op of a :class:`~samhq_fast.ops.fused.FusedOps` so that each call
is timed on its own: eager, the device synchronised before and after the call (CUDA events on a
GPU, wall clock on CPU). That measures each op's own time, not its overlap with its neighbours;
the forward around them runs slower than unsynchronised. The calls are keyed by the shape
signatures of :mod:`bench.roofline`, which joins them with the model.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench import roofline as rl

OP_NAMES = (
    "layer_norm",
    "add_layer_norm",
    "layer_norm_2d",
    "linear",
    "rel_pos_attention",
    "decoder_attention",
    "conv2d",
    "conv_transpose2d",
)


def call_signature(op: str, args: tuple, kwargs: dict[str, Any]) -> str:
    """The :mod:`bench.roofline` signature of one call of fused op ``op``."""
    x = args[0]
    if op == "linear":
        k = x.shape[-1]
        return rl.sig_linear(x.numel() // k, k, args[1].shape[0])
    if op in ("layer_norm", "add_layer_norm"):
        c = x.shape[-1]
        return rl.sig_layer_norm(x.numel() // c, c)
    if op == "layer_norm_2d":
        return rl.sig_layer_norm_2d(*x.shape)
    if op == "rel_pos_attention":
        heads = args[1] if len(args) > 1 else kwargs["num_heads"]
        window = args[2] if len(args) > 2 else kwargs["window_size"]
        return rl.sig_rel_pos_attention(*x.shape, heads, window)
    if op == "decoder_attention":
        q, k = x, args[1]
        heads = args[3] if len(args) > 3 else kwargs["num_heads"]
        return rl.sig_decoder_attention(
            q.shape[0], q.shape[1], k.shape[0], k.shape[1], q.shape[2], heads
        )
    if op == "conv2d":
        groups = args[6] if len(args) > 6 else kwargs.get("groups", 1)
        return rl.sig_conv("conv2d", x.shape, args[1].shape, groups)
    if op == "conv_transpose2d":
        return rl.sig_conv("conv_transpose2d", x.shape, args[1].shape)
    raise ValueError(f"unknown fused op {op!r}")


class OpTimer:
    """Times every call of the wrapped ops while :attr:`enabled`; :attr:`part` labels them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.calls: list[dict[str, Any]] = []
        self.part = "encoder"
        self.enabled = False
        self.stream: str | None = None  # the encoder's residual stream dtype, as seen by norm1

    def _see(self, op: str, args: tuple) -> None:
        if self.stream is None and self.part == "encoder" and op == "layer_norm":
            names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
            self.stream = names.get(args[0].dtype)

    @property
    def clock(self) -> str:
        return "CUDA events" if self.device.type == "cuda" else "CPU wall clock"

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _timed(self, op: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if not self.enabled:
                return fn(*args, **kwargs)
            sig = call_signature(op, args, kwargs)
            self._see(op, args)
            if self.device.type == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(self.device)
                start.record()
                out = fn(*args, **kwargs)
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1e3
            else:
                t0 = time.perf_counter()
                out = fn(*args, **kwargs)
                seconds = time.perf_counter() - t0
            self.calls.append({"part": self.part, "op": op, "sig": sig, "seconds": seconds})
            return out

        call.__name__ = f"timed_{op}"
        return call

    def wrap(self, ops: Any) -> Any:
        """A copy of ``ops`` (a ``FusedOps``) whose every op is timed."""
        return dataclasses.replace(ops, **{n: self._timed(n, getattr(ops, n)) for n in OP_NAMES})

    def instrument(self, model: Any) -> None:
        """Give ``model`` (a ``SamHQModel`` with a fused backend) the timed ops."""
        fused = model.mask_decoder.fused
        if fused is None:
            raise ValueError("the model runs the reference backend: no fused ops to time")
        timed = self.wrap(fused)
        enc = model.image_encoder
        if hasattr(enc, "set_fused"):
            enc.set_fused(timed)
            enc.set_attention_fn(timed.rel_pos_attention)
        model.mask_decoder.fused = timed

    def timed_forward(self, fn: Callable[[], Any], part: str) -> tuple[Any, float]:
        """Run ``fn`` with the timers on; returns its output and its whole time (seconds)."""
        self.part, self.enabled = part, True
        try:
            self.sync()
            t0 = time.perf_counter()
            out = fn()
            self.sync()
            return out, time.perf_counter() - t0
        finally:
            self.enabled = False


def _model(config: Any, device: torch.device, dtype: str, backend: str) -> Any:
    from samhq_fast import SamHQModel
    from samhq_fast.weights import parse_dtype

    with torch.device(device):  # random init on the device (vit_h on CPU takes long)
        model = SamHQModel(config)
    model = model.to(dtype=parse_dtype(dtype)).eval().requires_grad_(False)
    model.set_backend(backend)
    return model


def _case(
    title: str, ops: list, timer: OpTimer, rounds: int, forward: list[float], ceil: dict, part: str
) -> dict[str, Any]:
    calls = [dict(c, seconds=c["seconds"] / rounds) for c in timer.calls if c["part"] == part]
    fwd = sorted(forward)[len(forward) // 2]
    rows = rl.join(ops, calls, ceil, {part: fwd})
    for r in rows:
        r["calls"] = r["calls"] / rounds
    return {
        "title": title,
        "part": part,
        "clock": timer.clock,
        "forward_clock": "wall clock, synchronised per op",
        "rounds": rounds,
        "forward_s": fwd,
        "timed_s": sum(c["seconds"] for c in calls),
        "predicted_s": rl.totals(ops, ceil)["predicted_s"],
        "rows": rows,
        "breakdown": rl.category_breakdown(rows, part, fwd),
    }


def measure_all(
    presets: list[str],
    batch: int,
    prompts: list[int],
    dtype: str,
    backend: str,
    dry_run: bool,
    out: Path,
) -> dict[str, Any]:
    """Encoder of each preset at ``batch`` and the decoder (first preset's) at each prompt count,
    per op, joined with the roofline model."""
    from bench._env import device_name
    from samhq_fast.config import PRESETS

    device = torch.device("cpu" if dry_run or not torch.cuda.is_available() else "cuda")
    name = device_name(device.type) if device.type == "cuda" else "CPU"
    kind, ceil = rl.ceilings_for(name if device.type == "cuda" else None)
    rounds, warmup = (1, 0) if device.type == "cpu" else (3, 1)
    if dry_run:
        tests = str(Path(__file__).resolve().parent.parent / "tests")
        if tests not in sys.path:  # bench._cases.tiny_config imports tests/_weights.py
            sys.path.insert(0, tests)
        from bench._cases import tiny_config
    result: dict[str, Any] = {
        "device": name,
        "ceilings": {"gpu": kind, **ceil},
        "note": (
            f"Measured: {'CPU wall clock (dry run, tiny shapes: plumbing, not figures)' if device.type == 'cpu' else 'CUDA events'}"  # noqa: E501
            f", one call at a time (synchronised per op), {rounds} round(s) after {warmup} "
            f"warm-up. Predicted: the roofline model (bench/roofline.py) at the {kind} "
            "ceilings. % of roofline = predicted / measured."
        ),
        "cases": [],
    }
    timer = OpTimer(device)
    with torch.inference_mode():
        for i, preset in enumerate(presets):
            config = tiny_config(preset) if dry_run else PRESETS[preset]
            model = _model(config, device, dtype, backend)
            timer.instrument(model)
            s = config.vision_config.image_size
            pixels = torch.randn(batch, 3, s, s, device=device)
            enc = model.image_encoder
            for _ in range(warmup):
                enc(pixels)
            times = []
            for _ in range(rounds):
                (emb, interm, _, _), t = timer.timed_forward(
                    lambda enc=enc, pixels=pixels: enc(pixels), "encoder"
                )
                times.append(t)
            # the stream dtype the model really runs (the model's default may be ahead of it)
            ops = rl.encoder_ops(config, batch, dtype, stream=timer.stream)
            result["stream_dtype"] = timer.stream
            title = f"encoder {preset}{' (tiny stand-in)' if dry_run else ''} batch {batch} {dtype}"
            title += f", residual stream {timer.stream}"
            result["cases"].append(_case(title, ops, timer, rounds, times, ceil, "encoder"))
            rl.write_measured(out, result)
            timer.calls.clear()
            if i == 0:
                for p in prompts:
                    result["cases"].append(
                        _decoder_case(
                            model,
                            config,
                            emb[:1],
                            interm[0][:1],
                            p,
                            dtype,
                            timer,
                            rounds,
                            warmup,
                            ceil,
                            preset,
                            dry_run,
                        )
                    )
                    rl.write_measured(out, result)
                    timer.calls.clear()
            del model, emb, interm
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return result


def _decoder_case(
    model, config, emb, interm, prompts, dtype, timer, rounds, warmup, ceil, preset, dry_run
) -> dict[str, Any]:
    s = config.vision_config.image_size
    g = torch.Generator().manual_seed(prompts)
    coords = (torch.rand(1, prompts, 1, 2, generator=g) * s).to(emb.device)
    labels = torch.ones(1, prompts, 1, dtype=torch.int64, device=emb.device)
    pe, dec = model.prompt_encoder, model.mask_decoder
    image_pe = model.get_image_wide_positional_embeddings()

    def run():
        sparse, dense = pe(coords, labels, None, None)
        return dec(emb, image_pe, sparse, dense, False, False, interm_embeddings=[interm])

    for _ in range(warmup):
        run()
    times = []
    for _ in range(rounds):
        _, t = timer.timed_forward(run, "decoder")
        times.append(t)
    sparse_tokens = 2  # one point + the padding point
    ops = rl.decoder_ops(config, prompts, sparse_tokens, dtype)
    title = f"HQ decoder ({preset}{' tiny' if dry_run else ''}) {prompts} point prompt(s) {dtype}"
    return _case(title, ops, timer, rounds, times, ceil, "decoder")
