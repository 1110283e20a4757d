"""Imports go one way: formats <- kernels, io, passes <- pipeline, recipes <- api, cli.

Checked on the source (every import statement, function-local ones too), so a new arrow the
wrong way fails here rather than in a cycle at import time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cqjax

PKG = Path(cqjax.__file__).resolve().parent


def imports(path: Path) -> set[str]:
    """Every cqjax module a source file imports (``from cqjax import x`` counts as ``cqjax.x``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("cqjax")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cqjax"):
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def modules(package: str) -> list[Path]:
    return sorted((PKG / package).rglob("*.py"))


@pytest.mark.parametrize("package", ["formats", "kernels", "io"])
def test_lower_layers_never_import_passes_or_above(package):
    above = ("cqjax.passes", "cqjax.pipeline", "cqjax.recipes", "cqjax.cli", "cqjax.api")
    bad = {str(p.relative_to(PKG)): sorted(m for m in imports(p) if m.startswith(above)) for p in modules(package)}
    assert {k: v for k, v in bad.items() if v} == {}


def test_formats_import_nothing_else_of_cqjax_but_its_errors_and_the_compiled_extension():
    # cqjax._xla_ext (C++: the fast rotation and packing) imports nothing of cqjax either
    leaves = ("cqjax.formats", "cqjax.errors", "cqjax._xla_ext")
    bad = {str(p.relative_to(PKG)): sorted(m for m in imports(p) if m != "cqjax" and not m.startswith(leaves))
           for p in modules("formats")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_passes_and_stats_do_not_import_the_front_ends():
    front = ("cqjax.cli", "cqjax.api", "cqjax.recipes")
    files = modules("passes") + [PKG / "quant_stats.py", PKG / "pipeline.py"]
    bad = {str(p.relative_to(PKG)): sorted(m for m in imports(p) if m.startswith(front)) for p in files}
    assert {k: v for k, v in bad.items() if v} == {}
