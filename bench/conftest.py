"""pytest setup of ``bench/``: options, the case matrices, shared weights, models and references.

On CPU the matrices are small (a few minutes on a quiet 2-core machine); with CUDA the default
is the headline set of ``scripts/gpu_session.sh`` (minutes, compile included), and
``--bench-full`` gives the full matrices (hours on a GPU). ``python -m pytest bench/ --help``
lists the options (group "samhq_fast benchmarks").
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # _weights, _official

from bench._cases import (  # noqa: E402
    E2E_POINT,
    E2E_SIZE,
    Settings,
    decoder_cases,
    e2e_cases,
    encoder_cases,
    tiny_config,
)
from bench._peers import (  # noqa: E402
    PeerUnavailable,
    Weights,
    build,
    encoder_fn,
    make_prompts,
    make_weights,
    segment_fn,
    synthetic_image,
)
from bench._timing import release_free_memory, skip_oom  # noqa: E402

DECODE_POINT = (0.4, 0.6)  # the one point (fraction of the input size) decoded per image


def _csv(value: str | None, cast=str) -> tuple | None:
    return None if value is None else tuple(cast(v.strip()) for v in value.split(",") if v.strip())


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("samhq_fast benchmarks")
    g.addoption(
        "--bench-full",
        action="store_true",
        help="full matrices (the default when CUDA is available)",
    )
    g.addoption("--bench-small", action="store_true", help="CPU-size matrices even with CUDA")
    g.addoption(
        "--bench-headline",
        action="store_true",
        help="the GPU session's headline set (the default when CUDA is available)",
    )
    g.addoption(
        "--bench-tiny",
        action="store_true",
        help="small stand-in models at 128 px (plumbing checks, e.g. gpu_session --dry-run)",
    )
    g.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda if available)")
    g.addoption("--bench-presets", default=None, help="e.g. vit_b,vit_tiny")
    g.addoption("--bench-dtypes", default=None, help="e.g. fp32,bf16")
    g.addoption("--bench-batches", default=None, help="encoder batch sizes, e.g. 1,8")
    g.addoption(
        "--bench-backends",
        default=None,
        help="ours: torch,triton,compile,fast (triton + compile + graphs)",
    )
    g.addoption("--bench-impls", default=None, help="ours,official,hf")
    g.addoption("--bench-prompts", default=None, help="decoder prompts per image, e.g. 1,16")
    g.addoption("--bench-rounds", type=int, default=None, help="timed rounds for every case")
    g.addoption("--bench-warmup", type=int, default=None, help="warm-up rounds for every case")


def _settings(config: pytest.Config) -> Settings:
    opt = config.getoption
    device = torch.device(opt("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    full = bool(opt("--bench-full"))
    headline = bool(opt("--bench-headline")) or (device.type == "cuda" and not opt("--bench-small"))
    return Settings.make(
        device=device,
        full=full,
        headline=headline,
        tiny=bool(opt("--bench-tiny")),
        presets=_csv(opt("--bench-presets")),
        dtypes=_csv(opt("--bench-dtypes")),
        batches=_csv(opt("--bench-batches"), int),
        backends=_csv(opt("--bench-backends")),
        impls=_csv(opt("--bench-impls")),
        prompts=_csv(opt("--bench-prompts"), int),
        rounds=opt("--bench-rounds"),
        warmup=opt("--bench-warmup"),
    )


def pytest_configure(config: pytest.Config) -> None:
    config._samhq_bench_settings = _settings(config)  # type: ignore[attr-defined]
    config._samhq_bench_start = time.time()  # type: ignore[attr-defined]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    s: Settings = metafunc.config._samhq_bench_settings  # type: ignore[attr-defined]
    for name, make in (
        ("enc_case", encoder_cases),
        ("dec_case", decoder_cases),
        ("e2e_case", e2e_cases),
    ):
        if name in metafunc.fixturenames:
            cases = make(s)
            metafunc.parametrize(name, cases, ids=[c.id for c in cases])


FILE_ORDER = ("test_bench_encoder", "test_bench_decoder", "test_bench_e2e", "test_bench_amg")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Encoder first: its reference case's output is then reused by the decoder benchmarks."""

    def rank(item: pytest.Item) -> int:
        stem = Path(str(item.fspath)).stem
        return FILE_ORDER.index(stem) if stem in FILE_ORDER else len(FILE_ORDER)

    items.sort(key=rank)  # stable: keeps the case order within a file


_SKIPPED: list[dict[str, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Remember skipped benchmarks and why: ``bench.report`` lists them."""
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        _SKIPPED.append({"test": report.nodeid.split("::")[-1], "reason": reason})


def pytest_benchmark_update_json(config: pytest.Config, benchmarks, output_json: dict) -> None:
    s: Settings = config._samhq_bench_settings  # type: ignore[attr-defined]
    start = config._samhq_bench_start  # type: ignore[attr-defined]
    output_json["samhq_fast"] = {
        "session_seconds": round(time.time() - start, 1),
        "skipped": list(_SKIPPED),
        "settings": {
            "device": str(s.device),
            "full": s.full,
            "headline": s.headline,
            "tiny": s.tiny,
            "presets": list(s.presets),
            "dtypes": list(s.dtypes),
            "batches": list(s.batches),
            "backends": list(s.backends),
            "impls": list(s.impls),
        },
    }


@pytest.fixture(scope="session")
def settings(pytestconfig: pytest.Config) -> Settings:
    return pytestconfig._samhq_bench_settings  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------ models
class Zoo:
    """Weights per preset (made once) and ONE built model at a time.

    Holding several models changes the timings on a small machine (memory placement and page
    faults: a model measured beside two idle peers ran 30% slower here), so a model is dropped
    before the next one is built, and cases are ordered to reuse it.
    """

    def __init__(self, directory: Path, device: torch.device, tiny: bool = False) -> None:
        self.directory = directory
        self.device = device
        self.tiny = tiny
        self._weights: dict[str, Weights] = {}
        self._key: tuple | None = None
        self._model: torch.nn.Module | None = None
        self._failed: dict[tuple, str] = {}

    def weights(self, preset: str) -> Weights:
        if preset not in self._weights:
            config = tiny_config(preset) if self.tiny else None
            self._weights[preset] = make_weights(preset, self.directory, config=config)
        return self._weights[preset]

    def drop(self) -> None:
        """Forget the held model (callers' references keep it alive until they let go)."""
        self._key = self._model = None
        release_free_memory()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def model(self, impl: str, preset: str, dtype: str, backend: str) -> torch.nn.Module:
        """Build (or reuse) a model; a peer that cannot be built skips the case."""
        build_backend = "torch"
        if impl == "ours" and backend in ("triton", "fast", "reference"):
            build_backend = "reference" if backend == "reference" else "triton"
        key = (impl, preset, dtype, build_backend)
        if key in self._failed:
            pytest.skip(self._failed[key])
        if key != self._key:
            self.drop()
            w = self.weights(preset)
            try:
                model = build(impl, w, str(self.device), dtype, build_backend)
            except PeerUnavailable as err:
                self._failed[key] = str(err)
                pytest.skip(str(err))
            except torch.cuda.OutOfMemoryError as err:
                skip_oom(err, f"building {impl} {preset} {dtype}")
            self._key, self._model = key, model
        return self._model


@pytest.fixture(scope="session")
def zoo(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("bench_weights"), settings.device, settings.tiny)


# -------------------------------------------------------------------------- references
@dataclass
class EncoderRef:
    emb: torch.Tensor  # (B, 256, h, w) fp32
    interm: torch.Tensor  # (B, h, w, C) fp32
    masks: torch.Tensor  # (B, 4h, 4w) logits of one point per image, our fp32 decoder


class References:
    """Outputs of our reference fp32 path (the reference every error is measured against), on the
    benchmark device, computed once; a timed ``ours reference fp32`` case stores its own.

    Benchmarks ask for references *before* they take their own model from the zoo (computing
    one may load our fp32 model, and the zoo holds one model at a time). The mask decoding that
    turns an encoder output into masks uses a small decoder-only copy of our fp32 model.
    """

    def __init__(self, zoo: Zoo, device: torch.device) -> None:
        self.zoo, self.device = zoo, device
        self._pixels: dict[tuple, torch.Tensor] = {}
        self._enc: dict[tuple, EncoderRef] = {}
        self._dec: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._e2e: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._decoders: dict[str, torch.nn.Module] = {}
        self._image = None

    def _ref_model(self, preset: str) -> torch.nn.Module:
        return self.zoo.model("ours", preset, "fp32", "reference")

    def decoder_model(self, preset: str) -> torch.nn.Module:
        """Our fp32 model without its image encoder (prompt encoder + HQ decoder)."""
        if preset not in self._decoders:
            full = self._ref_model(preset)
            encoder = full.image_encoder
            full.image_encoder = torch.nn.Identity()
            try:
                self._decoders[preset] = copy.deepcopy(full)
            finally:
                full.image_encoder = encoder
        return self._decoders[preset]

    def pixels(self, preset: str, batch: int) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised-image stand-ins (fp32), the same for every implementation."""
        if (preset, batch) not in self._pixels:
            s = self.zoo.weights(preset).config.vision_config.image_size
            g = torch.Generator().manual_seed(1000 + batch)
            x = torch.randn(batch, 3, s, s, generator=g)
            self._pixels[(preset, batch)] = x.to(self.device)
        return self._pixels[(preset, batch)]

    @torch.inference_mode()
    def decode_point(self, preset: str, emb: torch.Tensor, interm: torch.Tensor) -> torch.Tensor:
        """One point per image through our fp32 decoder: ``(B, 4h, 4w)`` mask logits."""
        model = self.decoder_model(preset)
        b = emb.shape[0]
        s = model.config.vision_config.image_size
        pts = torch.tensor([DECODE_POINT], device=self.device) * s
        labels = torch.ones(b, 1, 1, dtype=torch.long, device=self.device)
        sparse, dense = model.prompt_encoder(pts.expand(b, 1, 1, 2).contiguous(), labels)
        masks, _ = model.mask_decoder(
            emb.float(),
            model.get_image_wide_positional_embeddings(),
            sparse,
            dense,
            False,
            False,
            interm_embeddings=[interm.float()],
            convention="official",
        )
        return masks.reshape(b, *masks.shape[-2:])

    def store_encoder(self, preset: str, batch: int, emb: torch.Tensor, interm: torch.Tensor):
        key = (preset, batch)
        if key not in self._enc:
            emb, interm = emb.float(), interm.float()
            self._enc[key] = EncoderRef(emb, interm, self.decode_point(preset, emb, interm))

    def encoder(self, preset: str, batch: int) -> EncoderRef:
        key = (preset, batch)
        if key not in self._enc:
            fn = encoder_fn("ours", self._ref_model(preset))
            pixels = self.pixels(preset, batch)
            chunk = 4 if self.device.type == "cuda" else batch
            outs = [fn(pixels[i : i + chunk]) for i in range(0, batch, chunk)]
            emb = torch.cat([o[0] for o in outs])
            interm = torch.cat([o[1] for o in outs])
            self.store_encoder(preset, batch, emb, interm)
        return self._enc[key]

    def decoder_inputs(self, preset: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Image 0 of the batch-1 encoder reference: the decoder benchmarks' input."""
        ref = self.encoder(preset, 1)
        return ref.emb[:1], ref.interm[:1]

    def store_decoder(self, key: tuple, logits: torch.Tensor, iou: torch.Tensor) -> None:
        self._dec.setdefault(key, (logits.float(), iou.float()))

    def decoder(self, preset: str, kind: str, prompts: int, hq_token_only: bool):
        """Reference ``(logits (P, 1, 4h, 4w), iou (P, 1))`` of a decoder case."""
        from bench._peers import decoder_fn

        key = (preset, kind, prompts, hq_token_only)
        if key not in self._dec:
            emb, interm = self.decoder_inputs(preset)
            p = self.prompts(preset, kind, prompts)
            fn = decoder_fn("ours", self.decoder_model(preset), hq_token_only)
            self.store_decoder(key, *fn(emb, interm, p))
        return self._dec[key]

    def prompts(self, preset: str, kind: str, count: int):
        s = self.zoo.weights(preset).config.vision_config.image_size
        return make_prompts(kind, count, s, seed=count).to(self.device)

    def store_e2e(self, preset: str, masks: torch.Tensor, low: torch.Tensor) -> None:
        self._e2e.setdefault(preset, (masks, low.float()))

    def e2e(self, preset: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference ``(masks (1, H, W) bool, low-res logits (1, 4h, 4w))`` of the photo."""
        if preset not in self._e2e:
            fn = segment_fn("ours", self._ref_model(preset))
            self.store_e2e(preset, *fn(self.e2e_image(), E2E_POINT))
        return self._e2e[preset]

    def e2e_image(self):
        """The synthetic ``E2E_SIZE`` photo, ``(H, W, 3)`` uint8 (made once)."""
        if self._image is None:
            self._image = synthetic_image(*E2E_SIZE)
        return self._image


@pytest.fixture(scope="session")
def refs(zoo: Zoo, settings: Settings) -> References:
    return References(zoo, settings.device)
