"""One-way dependencies (DESIGN.md): ps3/ never imports the control plane; the runtime never
imports a specific model; the spec imports nothing above it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "ps3": ("ps3_platform.cli", "ps3_platform.compile", "ps3_platform.backends"),
    "platform/ps3_platform/runtime": ("ps3.model", "ps3.data", "ps3.losses", "ps3_platform.cli",
                                      "ps3_platform.compile", "ps3_platform.backends"),
    "platform/ps3_platform/spec": ("ps3", "ps3_platform.cli", "ps3_platform.compile", "ps3_platform.backends",
                                   "ps3_platform.runtime", "torch"),
    "platform/ps3_platform/compile": ("ps3", "ps3_platform.cli", "ps3_platform.backends", "ps3_platform.runtime",
                                      "torch"),
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_forbidden_imports(package):
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in _imports(path):
            if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[package]):
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_no_init_in_platform_dir():
    assert not (ROOT / "platform" / "__init__.py").exists(), "a package named `platform` shadows the stdlib"
