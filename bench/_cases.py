"""The benchmark matrices: which cases run on CPU (small) and on CUDA / ``--bench-full``.

Cases are ordered so that the reference (ours, reference backend, fp32) of each group runs first and
its output is reused for the errors of the other cases.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from bench._peers import IMPLS, PEER_BACKENDS

ALL_PRESETS = ("vit_b", "vit_l", "vit_h", "vit_tiny")
ALL_DTYPES = ("fp32", "bf16", "fp16")
PEER_DTYPES = ("fp32", "bf16")  # the peers are benchmarked in fp32 and, where they run, bf16
# "fast": triton kernels + torch.compile + CUDA graphs for the decoder (Predictor(compile=True))
# "reference": the oracle; "torch": the fast pure-PyTorch path
ALL_BACKENDS = ("reference", "torch", "triton", "compile", "fast")
REFERENCE = ("ours", "fp32", "reference")

E2E_SIZE = (1000, 1500)  # (H, W) of the synthetic photo
E2E_POINT = (700.0, 450.0)  # (x, y) in image pixels


@dataclass(frozen=True)
class Settings:
    device: torch.device
    full: bool
    presets: tuple[str, ...]
    dtypes: tuple[str, ...]
    batches: tuple[int, ...]
    backends: tuple[str, ...]
    impls: tuple[str, ...]
    prompts: tuple[int, ...] | None
    rounds: int | None = None
    warmup: int | None = None
    explicit: frozenset[str] = field(default_factory=frozenset)
    # The GPU session's selection (the CUDA default): encoder vit_b/vit_h bf16 batch 8, ours
    # eager and fast vs the peers; decoder 1 and 64 points; AMG vit_b 32x32.
    headline: bool = False
    # Small stand-in models at 128 px (scripts/gpu_session.sh --dry-run: plumbing, not figures).
    tiny: bool = False

    @classmethod
    def make(
        cls,
        device: torch.device,
        full: bool,
        presets: tuple[str, ...] | None = None,
        dtypes: tuple[str, ...] | None = None,
        batches: tuple[int, ...] | None = None,
        backends: tuple[str, ...] | None = None,
        impls: tuple[str, ...] | None = None,
        prompts: tuple[int, ...] | None = None,
        rounds: int | None = None,
        warmup: int | None = None,
        headline: bool = False,
        tiny: bool = False,
    ) -> Settings:
        given = {
            k
            for k, v in dict(
                presets=presets, dtypes=dtypes, batches=batches, backends=backends, prompts=prompts
            ).items()
            if v is not None
        }
        for name, values, allowed in (
            ("presets", presets, ALL_PRESETS),
            ("dtypes", dtypes, ALL_DTYPES),
            ("backends", backends, ALL_BACKENDS),
            ("impls", impls, IMPLS),
        ):
            bad = sorted(set(values or ()) - set(allowed))
            if bad:
                raise ValueError(f"--bench-{name}: unknown {bad}; choose from {allowed}")
        headline = headline and not full
        if headline:
            cuda = device.type == "cuda"
            presets = presets or ("vit_b", "vit_h")
            dtypes = dtypes or ("bf16",)
            batches = batches or (8,)
            backends = backends or (("torch", "fast") if cuda else ("torch", "triton"))
            prompts = prompts or (1, 64)
        return cls(
            device=device,
            full=full,
            presets=presets or (ALL_PRESETS if full else ("vit_b", "vit_tiny")),
            dtypes=dtypes or (ALL_DTYPES if full else ("fp32", "bf16")),
            batches=batches or ((1, 8, 32) if full else (1,)),
            backends=backends or (ALL_BACKENDS if full else ("reference", "torch", "triton")),
            impls=impls or IMPLS,
            prompts=prompts,
            rounds=rounds,
            warmup=warmup,
            explicit=frozenset(given),
            headline=headline,
            tiny=tiny,
        )

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def rounds_for(self, section: str, size: int = 1, preset: str = "vit_b") -> tuple[int, int]:
        """``(rounds, warmup_rounds)``: ``size`` is the batch (encoder) or the prompt count."""
        if self.tiny and not self.cuda:
            rounds, warmup = 1, 0
        elif self.cuda:
            rounds, warmup = {"encoder": (10, 3), "decoder": (20, 3), "e2e": (10, 2)}[section]
        elif section == "encoder":
            rounds, warmup = (3, 1) if preset == "vit_tiny" else (2, 1)
        elif section == "decoder":
            rounds, warmup = (5, 1) if size <= 1 else (2, 1) if size <= 16 else (1, 1)
        else:  # e2e: the encoder section ran these shapes already (cases run encoder first)
            rounds, warmup = 2, 0
        return (
            self.rounds if self.rounds is not None else rounds,
            self.warmup if self.warmup is not None else warmup,
        )


@dataclass(frozen=True)
class EncoderCase:
    impl: str
    preset: str
    dtype: str
    backend: str
    batch: int

    @property
    def id(self) -> str:
        return f"{self.preset}-b{self.batch}-{self.impl}-{self.backend}-{self.dtype}"

    @property
    def is_reference(self) -> bool:
        return (self.impl, self.dtype, self.backend) == REFERENCE


@dataclass(frozen=True)
class DecoderCase:
    impl: str
    preset: str
    dtype: str
    backend: str
    prompts: int
    kind: str
    hq_token_only: bool

    @property
    def id(self) -> str:
        hq = "-hq_only" if self.hq_token_only else ""
        what = f"{self.prompts}{self.kind}{hq}"
        return f"{self.preset}-{what}-{self.impl}-{self.backend}-{self.dtype}"

    @property
    def is_reference(self) -> bool:
        return (self.impl, self.dtype, self.backend) == REFERENCE


@dataclass(frozen=True)
class E2ECase:
    impl: str
    preset: str
    dtype: str
    backend: str

    @property
    def id(self) -> str:
        h, w = E2E_SIZE
        return f"{self.preset}-{w}x{h}-{self.impl}-{self.backend}-{self.dtype}"

    @property
    def is_reference(self) -> bool:
        return (self.impl, self.dtype, self.backend) == REFERENCE


def _impl_dtypes(s: Settings, impl: str) -> tuple[str, ...]:
    return s.dtypes if impl == "ours" else tuple(d for d in s.dtypes if d in PEER_DTYPES)


# "compile" wraps the torch model, so it follows "torch" (same model, no rebuild); "fast" wraps
# the triton model.
_BUILD_ORDER = {"reference": 0, "torch": 1, "compile": 2, "triton": 3, "fast": 4}


def model_groups(s: Settings, backends: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """``(impl, dtype, backend)`` of every model to time, the reference (ours, fp32, reference)
    first. Cases are grouped by model so that one model at a time is held in memory."""
    groups = []
    if "ours" in s.impls:
        pairs = [(d, b) for d in s.dtypes for b in backends]
        pairs.sort(key=lambda p: (p != ("fp32", "reference"), s.dtypes.index(p[0]),
                                  _BUILD_ORDER.get(p[1], 9)))  # fmt: skip
        groups += [("ours", d, b) for d, b in pairs]
    for impl in ("official", "hf"):
        if impl in s.impls:
            groups += [(impl, d, PEER_BACKENDS[impl]) for d in _impl_dtypes(s, impl)]
    return groups


def encoder_cases(s: Settings) -> list[EncoderCase]:
    return [
        EncoderCase(impl, preset, dtype, backend, batch)
        for preset in s.presets
        for impl, dtype, backend in model_groups(s, s.backends)
        for batch in s.batches
    ]


def _decoder_preset(s: Settings) -> str:
    vits = [p for p in s.presets if p != "vit_tiny"]
    return "vit_b" if "vit_b" in vits or not vits else vits[0]


def decoder_cases(s: Settings) -> list[DecoderCase]:
    """vit_b's decoder (the decoder is the same for every preset but for the HQ features)."""
    preset = _decoder_preset(s)
    if s.headline:
        configs = [(n, "points", False) for n in s.prompts or (1, 64)]
    elif s.full or s.prompts is not None:
        counts = s.prompts or (1, 16, 64, 256)
        configs = [(n, k, hq) for n in counts for k in ("points", "boxes") for hq in (False, True)]
    else:
        configs = [(1, "points", False), (1, "points", True), (16, "points", False),
                   (16, "boxes", False)]  # fmt: skip
    # The CPU default times fp32 only (bf16 is covered by the encoder section).
    dtypes = s.dtypes if (s.full or s.headline or "dtypes" in s.explicit) else ("fp32",)
    sub = Settings.make(s.device, s.full, dtypes=dtypes, impls=s.impls)
    backends = s.backends
    return [
        DecoderCase(impl, preset, dtype, backend, n, kind, hq)
        for impl, dtype, backend in model_groups(sub, backends)
        for n, kind, hq in configs
    ]


def e2e_cases(s: Settings) -> list[E2ECase]:
    if s.headline:
        return []
    if s.full and "presets" not in s.explicit:
        presets = ("vit_b", "vit_h")
    else:
        presets = tuple(p for p in s.presets if p != "vit_tiny")[:2] or ("vit_b",)
    dtypes = s.dtypes if (s.full or "dtypes" in s.explicit) else ("fp32",)
    sub = Settings.make(s.device, s.full, dtypes=dtypes, impls=s.impls)
    # CPU default: the PyTorch paths only (the encoder section shows why the others skip).
    backends = s.backends if s.full or "backends" in s.explicit else ("reference", "torch")
    return [
        E2ECase(impl, preset, dtype, backend)
        for preset in presets
        for impl, dtype, backend in model_groups(sub, backends)
    ]


def skip_reason(impl: str, backend: str, preset: str, device: torch.device) -> str | None:
    """Why a case cannot run here (``None``: it can)."""
    if impl == "ours" and backend in ("triton", "fast") and device.type != "cuda":
        if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            return None  # the interpreter, switched on by the caller (gpu_session --dry-run)
        return "Triton runs only in the interpreter on CPU (and CUDA graphs need CUDA)"
    if impl == "hf" and preset == "vit_tiny":
        return "transformers has no TinyViT (vit_tiny) SAM-HQ"
    return None


def tiny_config(preset: str):
    """A small stand-in for ``preset`` at 128 px (head dim 64, or 80 for vit_h; windowed and
    global layers), for plumbing checks: ``--bench-tiny``."""
    import dataclasses

    from samhq_fast.config import PRESETS, SamHQConfig, SamHQPromptEncoderConfig

    from _weights import small_config  # tests/_weights.py, on the path via bench/conftest.py

    if preset == "vit_tiny":
        p = PRESETS["vit_tiny"]
        return SamHQConfig(
            dataclasses.replace(p.vision_config, image_size=128),
            SamHQPromptEncoderConfig(image_size=128),
            p.mask_decoder_config,
        )
    hidden, heads = (160, 2) if preset == "vit_h" else (128, 2)
    return small_config(128, hidden=hidden, depth=2, heads=heads, window=3, global_idx=(1,))
