"""The measured GEMM choice (samhq_fast.kernels.gemm_choice) and the candidates it picks from.

The choice logic runs here with a stand-in timer and device name (no GPU needed); the candidates
themselves are checked against the fp32 reference through ``linear(gemm=...)``, in the
interpreter on CPU and at the encoder's real shapes on CUDA.
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch

pytest.importorskip("triton")

from test_linear import GPU_CASES, _name, check_against_reference, make_inputs  # noqa: E402

from samhq_fast.kernels.gemm_choice import GemmChoice  # noqa: E402
from samhq_fast.kernels.linear import GEMMS, linear  # noqa: E402

linear_mod = importlib.import_module("samhq_fast.kernels.linear")
CUDA = torch.device("cuda")
VERSIONS = {"torch": "t1", "triton": "x1"}


def _choice(tmp_path, times: dict[str, float], calls: list, capturing=False, versions=VERSIONS):
    def timer(fn):
        name = fn()
        calls.append(name)
        return times[name]

    return GemmChoice(timer=timer, device_name=lambda d: "NVIDIA H200 (test)",
                      capturing=lambda: capturing, versions=lambda: dict(versions),
                      cache_dir=tmp_path)  # fmt: skip


CANDS = {"triton": lambda: "triton", "cublas": lambda: "cublas"}


def test_the_faster_is_kept_cached_and_reloaded(tmp_path):
    calls: list[str] = []
    c = _choice(tmp_path, {"triton": 2.0, "cublas": 1.5}, calls)
    assert c.choose("k1", {"M": 8}, CANDS, CUDA) == "cublas"
    assert sorted(calls) == ["cublas", "triton"]
    assert c.choose("k1", {"M": 8}, CANDS, CUDA) == "cublas" and len(calls) == 2  # cached
    path = tmp_path / "gemm-choice-nvidia-h200-test.json"
    data = json.loads(path.read_text())
    assert data["device"] == "NVIDIA H200 (test)" and data["torch"] == "t1"
    assert data["entries"]["k1"] == {"M": 8, "triton_ms": 2.0, "cublas_ms": 1.5,
                                     "choice": "cublas"}  # fmt: skip
    # A new process (a new cache object) reads the file and measures nothing.
    calls2: list[str] = []
    c2 = _choice(tmp_path, {"triton": 0.1, "cublas": 9.0}, calls2)
    assert c2.choose("k1", {}, CANDS, CUDA) == "cublas" and calls2 == []
    assert c2.measured() == [{"device": "NVIDIA H200 (test)", "key": "k1", **data["entries"]["k1"]}]
    # ... and a new key is measured and added beside the old one.
    assert c2.choose("k2", {}, CANDS, CUDA) == "triton"
    assert set(json.loads(path.read_text())["entries"]) == {"k1", "k2"}


def test_other_versions_measure_again(tmp_path):
    _choice(tmp_path, {"triton": 2.0, "cublas": 1.0}, []).choose("k", {}, CANDS, CUDA)
    calls: list[str] = []
    c = _choice(tmp_path, {"triton": 1.0, "cublas": 2.0}, calls, versions={**VERSIONS,
                "triton": "x2"})  # fmt: skip
    assert c.choose("k", {}, CANDS, CUDA) == "triton" and len(calls) == 2


def test_no_timing_without_cuda_or_during_capture(tmp_path):
    calls: list[str] = []
    c = _choice(tmp_path, {"triton": 2.0, "cublas": 1.0}, calls, capturing=True)
    assert c.choose("k", {}, CANDS, torch.device("cpu")) == "triton"
    assert c.choose("k", {}, CANDS, torch.device("meta")) == "triton"
    assert c.choose("k", {}, CANDS, CUDA) == "triton"  # capturing: the default, not stored
    assert calls == [] and not list(tmp_path.iterdir())
    assert c.choose("k", {}, {"triton": CANDS["triton"]}, CUDA) == "triton"


def test_a_bad_or_unwritable_cache_is_ignored_with_a_warning(tmp_path):
    (tmp_path / "gemm-choice-nvidia-h200-test.json").write_text("{not json")
    c = _choice(tmp_path, {"triton": 2.0, "cublas": 1.0}, [])
    with pytest.warns(UserWarning, match="ignoring the GEMM choice cache"):
        assert c.choose("k", {}, CANDS, CUDA) == "cublas"
    blocked = tmp_path / "file"
    blocked.write_text("")
    c = _choice(blocked / "sub", {"triton": 2.0, "cublas": 1.0}, [])
    with pytest.warns(UserWarning, match="could not write"):
        assert c.choose("k", {}, CANDS, CUDA) == "cublas"
    assert c.choose("k", {}, CANDS, CUDA) == "cublas"  # still kept in memory


def test_cache_dir_from_the_environment_at_call_time(tmp_path, monkeypatch):
    c = GemmChoice()
    monkeypatch.setenv("SAMHQ_FAST_CACHE_DIR", str(tmp_path))
    assert c.path("NVIDIA H100 80GB HBM3") == tmp_path / "gemm-choice-nvidia-h100-80gb-hbm3.json"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=_name)
@pytest.mark.parametrize(
    ("activation", "residual", "bias"),
    [("none", None, True), ("gelu", None, True), ("none", "fp32", True), ("none", "same", False),
     ("relu", "same", True)],
)  # fmt: skip
@pytest.mark.parametrize("gemm", GEMMS)
def test_every_candidate_matches_the_reference(gemm, activation, residual, bias, dtype):
    inputs = make_inputs((2, 5, 7), 48, 40, dtype, bias=bias, residual=residual, seed=3,
                         x_layout="slice")  # fmt: skip
    if gemm == "tma" and dtype == torch.float32:  # half precision only
        with pytest.raises(ValueError, match="is not bfloat16/float16"):
            linear(**inputs, activation=activation, gemm=gemm)
        return
    check_against_reference(inputs, activation, gemm=gemm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_name)
def test_linear_runs_the_chosen_candidate(dtype, monkeypatch):
    """The dispatch of a large-M GEMM on CUDA, with CPU tensors standing in: linear() offers the
    candidates that can run (the TMA GEMM for half precision only) and runs the one chosen."""
    seen = {}

    class Fake:
        def choose(self, key, info, candidates, device):
            seen.update(key=key, names=list(candidates), info=info)
            return "cublas"

    monkeypatch.setattr(linear_mod, "on_gpu", lambda t: True)
    monkeypatch.setattr(linear_mod, "CHOICE", Fake())
    inputs = make_inputs((2, 80), 48, 40, dtype, residual="fp32", seed=5)
    check_against_reference(inputs, "gelu")
    half = dtype != torch.float32
    assert seen["names"] == ["triton", "cublas", "tma"][: 3 if half else 2]
    assert seen["info"]["M"] == 160 and "M256|N40|K48" in seen["key"]


def test_unknown_gemm_is_refused():
    inputs = make_inputs((4,), 16, 16, torch.float32)
    with pytest.raises(ValueError, match="gemm must be one of"):
        linear(**inputs, gemm="magic")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_name)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c[0])
def test_real_shapes_every_candidate_and_the_choice_gpu(case, dtype, tmp_path, monkeypatch):
    _, K, N, act, res = case
    inputs = make_inputs((8, 64, 64), K, N, dtype, residual=res, seed=1)
    for gemm in GEMMS:  # the TMA GEMM needs Hopper
        if gemm != "tma" or torch.cuda.get_device_capability() >= (9, 0):
            check_against_reference(inputs, act, gemm=gemm)
    monkeypatch.setattr(linear_mod, "CHOICE", GemmChoice(cache_dir=tmp_path))
    check_against_reference(inputs, act)  # measured, then run
    rows = linear_mod.CHOICE.measured()
    assert len(rows) == 1 and rows[0]["choice"] in GEMMS and rows[0]["N"] == N
    print(
        f"[gemm] {case[0]} {_name(dtype)}: "
        + ", ".join(f"{g} {rows[0][f'{g}_ms']:.3f} ms" for g in GEMMS)
        + f" -> {rows[0]['choice']}"
    )
