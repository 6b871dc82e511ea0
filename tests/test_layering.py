"""Imports point only downward: each layer of rid_fast imports only the layers below it.

    kernels (Triton)   →  ops.common only
    ops                →  ops, kernels
    mi                 →  mi, ops
    pid                →  pid, ops
    distill            →  distill, mi, ops
    train              →  train, distill, mi, pid, ops
    bench              →  mi, ops
    cli, __init__      →  anything

Checked on the source with ``ast`` (imports inside functions included), so a lazy import cannot
hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

#: Layer → the rid_fast layers its modules may import ("ops.common": that module alone).
ALLOWED = {
    "kernels": {"ops.common"},
    "ops": {"ops", "kernels"},
    "mi": {"mi", "ops"},
    "pid": {"pid", "ops"},
    "distill": {"distill", "mi", "ops"},
    "train": {"train", "distill", "mi", "pid", "ops"},
    "bench": {"mi", "ops"},
}


def _layer_of(path: Path) -> str:
    """The layer of a source file: ``kernels/…`` → kernels, ``rid_fast/<layer>/…`` → layer."""
    relative = path.relative_to(ROOT)
    if relative.parts[0] == "kernels":
        return "kernels"
    return relative.parts[1].removesuffix(".py")


def imported_layers(source: str, *, package: str) -> set[str]:
    """The rid_fast layers ``source`` imports, as ``"mi"``, ``"ops"``, ``"kernels"``… (and
    ``"ops.common"`` for that module); ``package`` resolves relative imports."""
    layers = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names = [base] if base != "rid_fast" else [f"rid_fast.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] != "rid_fast" or len(parts) < 2:
                continue
            layers.add("ops.common" if parts[1:3] == ["ops", "common"] else parts[1])
    return layers


def forbidden_imports(path: Path) -> set[str]:
    """The layers ``path`` imports that its own layer may not."""
    layer = _layer_of(path)
    relative = path.relative_to(ROOT)
    package = "rid_fast.kernels" if layer == "kernels" else ".".join(relative.parts[:-1])
    allowed = ALLOWED[layer] | {layer} | ({"ops.common"} if "ops" in ALLOWED[layer] else set())
    return imported_layers(path.read_text(), package=package) - allowed


SOURCES = sorted([*ROOT.glob("kernels/*.py"), *ROOT.glob("rid_fast/*/**/*.py"), ROOT / "rid_fast" / "bench.py"])


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    assert not forbidden_imports(path), f"{path.relative_to(ROOT)} imports {sorted(forbidden_imports(path))}"


def test_the_check_sees_a_forbidden_import(tmp_path):
    """The check itself can fail: a kernel module importing the streaming path, and a lazy import
    of the trainer inside a function of the estimators' layer, are both caught."""
    assert imported_layers("from rid_fast.ops.streaming import diagonal_scores", package="rid_fast.kernels") == {"ops"}
    lazy = "def f():\n    from rid_fast.train import loop\n"
    assert imported_layers(lazy, package="rid_fast.mi") == {"train"}
    assert imported_layers("from . import tuning", package="rid_fast.kernels") == {"kernels"}
    assert imported_layers("from rid_fast import pid", package="rid_fast.train") == {"pid"}
