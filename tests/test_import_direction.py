"""One-way dependencies (DESIGN.md): `cli -> compile/backends -> spec`; ps3/ never imports the
control plane; the runtime never imports a specific model (it looks tasks up by name); the
science under ps3/ never imports the tasks built on it; and no module imports itself back
through others, not even inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTROL_PLANE = ("ps3_platform.cli", "ps3_platform.compile", "ps3_platform.backends")
FORBIDDEN = {
    "ps3": CONTROL_PLANE,
    **{f"ps3/{science}": ("ps3.tasks",) for science in ("model", "data", "losses", "curation", "vila_hd")},
    "platform/ps3_platform/runtime": ("ps3", *CONTROL_PLANE),
    "platform/ps3_platform/backends": ("ps3", "ps3_platform.cli"),
    # the estimate reaches models only through the task registry's probes
    "platform/ps3_platform/estimate": ("ps3", *CONTROL_PLANE),
    "platform/ps3_platform/spec": ("ps3", *CONTROL_PLANE, "ps3_platform.runtime", "torch"),
    "platform/ps3_platform/compile": ("ps3", "ps3_platform.cli", "ps3_platform.backends", "ps3_platform.runtime",
                                      "torch"),
}
PACKAGES = {"ps3": ROOT / "ps3", "ps3_platform": ROOT / "platform" / "ps3_platform"}


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


def _module_files() -> dict[str, Path]:
    modules = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _dependencies(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules `name` imports anywhere in its file (its own ancestors aside)."""
    found = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join([*package[:len(package) - node.level + 1], *([node.module] if node.module else [])]) \
                if node.level else node.module
            candidates = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {c for c in candidates if c in modules and c != name and not name.startswith(c + ".")}
    return found


def test_no_import_cycles():
    modules = _module_files()
    graph = {name: _dependencies(name, path, modules) for name, path in modules.items()}
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> None:
        if name in trail:
            cycle = trail[trail.index(name):] + [name]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        for dependency in sorted(graph[name]):
            visit(dependency, [*trail, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
