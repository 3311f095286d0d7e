"""The ahead-of-time tier: every kernel launch of the models compiled for sm_90 and sm_80.

No GPU needed: :mod:`samhq_fast.kernels.aot` records the launches at the models' real shapes
(meta tensors), expands them over every autotune config and compiles each distinct kernel with
triton's own compiler and ptxas. It runs in a subprocess because the Triton interpreter, which
this test session switches on without CUDA, makes kernels uncompilable.

The oldest triton that pyproject.toml allows is checked too when ``scripts/test.sh`` has put it
in ``.aot/triton-<version>`` (CI does).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

pytestmark = pytest.mark.aot
REPO = Path(__file__).resolve().parents[2]
KERNELS = {"_linear_fwd", "_linear_epilogue", "_linear_tma_fwd", "_rel_pos_attn_fwd",
           "_layer_norm_rows", "_decoder_attn_fwd", "_decoder_attn_combine"}  # fmt: skip


def triton_floor() -> str:
    """The oldest triton version pyproject.toml allows."""
    text = (REPO / "pyproject.toml").read_text()
    m = re.search(r'"triton>=([\d.]+)', text)
    assert m, "pyproject.toml must declare a triton floor (triton>=X.Y)"
    return m.group(1)


def _aot(tmp_path: Path, archs: list[str], extra_path: str | None = None, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_path, str(REPO)]))
    out = tmp_path / "aot.json"
    cmd = [sys.executable, "-m", "samhq_fast.kernels.aot", "--arch", *archs, "--json", str(out),
           *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=2400)
    print(proc.stdout[-3000:])
    assert out.exists(), f"aot produced no result (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    result = json.loads(out.read_text())
    result["returncode"] = proc.returncode
    return result


def _check(result: dict, archs: list[str], dtypes=("fp32", "bf16", "fp16")) -> None:
    rows = result["rows"]
    assert result["problems"] == [], "\n".join(result["problems"])
    assert result["returncode"] == 0
    assert len(rows) >= 40
    assert {r["kernel"] for r in rows} == KERNELS
    assert {r["arch"] for r in rows} == {f"sm_{a}" for a in archs}
    assert {r["dtype"] for r in rows} == set(dtypes)
    # Real shapes were recorded: every preset, encoder and decoder.
    origins = {o.split()[0] for r in rows for o in r["origins"]}
    assert origins == {"vit_b", "vit_l", "vit_h", "vit_tiny"}
    # Tensor cores on Hopper: the big half-precision GEMM tiles are wgmma.
    big = [r for r in rows if r["kernel"] == "_linear_fwd" and r["dtype"] in ("bf16", "fp16")
           and r["arch"] == "sm_90" and " m128 " in f" {r['config']} "]  # fmt: skip
    if "90" in archs:
        assert big and all(r["wgmma"] > 0 for r in big)


def test_every_kernel_compiles_for_hopper_and_ampere(tmp_path):
    import triton

    # CI's sample: every kernel variant (dtype, target, specialisation) once, and every config
    # of bf16 on sm_90; `--sample all` (the committed report) compiles every config of each.
    result = _aot(tmp_path, ["90", "80"], None, "--sample", "ci")
    assert result["env"]["triton"] == triton.__version__
    assert result["env"]["cases_total"] > result["env"]["cases"]
    _check(result, ["90", "80"])


def test_oldest_supported_triton_compiles_too(tmp_path):
    floor = triton_floor()
    site = REPO / ".aot" / f"triton-{floor}"
    if not (site / "triton").is_dir():
        pytest.skip(f"triton {floor} is not in {site} (scripts/test.sh installs it there)")
    # Every variant once, for Hopper (the GPU image's triton), bf16 and fp32.
    result = _aot(tmp_path, ["90"], str(site), "--sample", "minimal", "--dtypes", "bf16,fp32")
    assert result["env"]["triton"].startswith(floor)
    _check(result, ["90"], ("fp32", "bf16"))
