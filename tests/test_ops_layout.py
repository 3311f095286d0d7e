"""One owner per concern in ``samhq_fast/ops`` and ``samhq_fast/kernels``.

* Each op's contract (its reference and its argument check) lives in ``samhq_fast/ops/<op>.py``;
  the kernel file imports both from there and defines no check of its own.
* Only ``samhq_fast/ops/fused.py`` (the backend choice, made once at model build) imports
  kernels: no op module imports its kernel back, so there is no ops <-> kernels import circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from samhq_fast.ops import fused

PKG = Path(__file__).resolve().parent.parent / "samhq_fast"
# kernel file -> (its op module, the check it must import from there)
KERNEL_CHECKS = {
    "linear": ("samhq_fast.ops.linear", "check_linear_inputs"),
    "layer_norm": ("samhq_fast.ops.layer_norm", "check_args"),
    "decoder_attention": ("samhq_fast.ops.decoder_attention", "check_inputs"),
    "rel_pos_attention": ("samhq_fast.ops.attention", "check_rel_pos_inputs"),
}


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """Every import in the file, at any depth: ``(module, names)``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


@pytest.mark.parametrize("path", sorted((PKG / "ops").glob("*.py")), ids=lambda p: p.name)
def test_op_modules_do_not_import_kernels(path):
    if path.name == "fused.py":
        return
    bad = [m for m, _ in _imports(path) if m.startswith("samhq_fast.kernels")]
    assert not bad, f"{path.name} imports {bad}: only ops/fused.py chooses kernels"


@pytest.mark.parametrize("kernel", sorted(KERNEL_CHECKS))
def test_kernels_take_their_checks_from_the_op_module(kernel):
    module, check = KERNEL_CHECKS[kernel]
    path = PKG / "kernels" / f"{kernel}.py"
    names = {n for m, ns in _imports(path) if m == module for n in ns}
    assert check in names, f"kernels/{kernel}.py must import {check} from {module}"
    tree = ast.parse(path.read_text())
    own = [f.name for f in tree.body if isinstance(f, ast.FunctionDef) and "check" in f.name]
    assert not own, f"kernels/{kernel}.py defines its own checks {own}"


def test_fused_build_is_the_one_dispatch():
    from samhq_fast.ops.attention import rel_pos_attention_reference
    from samhq_fast.ops.decoder_attention import decoder_attention_reference
    from samhq_fast.ops.linear import linear_reference

    ref = fused.build("reference")
    assert ref.linear is linear_reference
    assert ref.rel_pos_attention is rel_pos_attention_reference
    assert ref.decoder_attention is decoder_attention_reference
    with pytest.raises(ValueError, match="backend"):
        fused.build("cuda")
