"""Render and lint helm/ps3-platform with the real Helm engine.

The `helm` binary when it is on PATH, otherwise Helm 4 in-process through the
helm-python-sdk wheel (`helm_python`), so neither the manifests generator nor the tests
need a Helm install. Both return the same shape: template path -> rendered text.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[1] / "helm" / "ps3-platform"
RELEASE = "ps3-platform"
NAMESPACE = "ps3"


class ChartRenderError(Exception):
    """Helm refused the values or a template failed; the message is Helm's."""


def engine() -> str:
    """'binary' when a helm executable is on PATH (or $PS3_HELM), else 'python'."""
    return "binary" if helm_binary() else "python"


def helm_binary() -> str | None:
    return os.environ.get("PS3_HELM") or shutil.which("helm")


def _render_binary(values: dict, name: str, namespace: str) -> dict[str, str]:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump(values, f)  # JSON is YAML
    try:
        command = [helm_binary(), "template", name, str(CHART), "--namespace", namespace, "--values", f.name]
        proc = subprocess.run(command, check=False, capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        raise ChartRenderError(proc.stderr.strip())
    out: dict[str, str] = {}
    for chunk in re.split(r"^---\n(?=# Source: )", proc.stdout, flags=re.MULTILINE):
        match = re.match(r"# Source: (\S+)\n", chunk)
        if match:
            out[match.group(1)] = out.get(match.group(1), "") + "---\n" + chunk[match.end():]
    return out


def _render_python(values: dict, name: str, namespace: str) -> dict[str, str]:
    from helm_python import Chart, HelmError

    chart = Chart.load(str(CHART))
    try:
        # Like `helm install`, render() validates the values against values.schema.json first.
        return chart.render(values, name=name, namespace=namespace)
    except HelmError as exc:
        raise ChartRenderError(str(exc)) from None
    finally:
        chart.close()


def render(values: dict | None = None, *, name: str = RELEASE, namespace: str = NAMESPACE) -> dict[str, str]:
    """Template path -> rendered manifest text (NOTES.txt included with the python engine)."""
    values = values or {}
    if engine() == "binary":
        return _render_binary(values, name, namespace)
    return _render_python(values, name, namespace)


def objects(rendered: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    """(template path, object) for every non-empty YAML document, NOTES.txt skipped."""
    out = []
    for path in sorted(rendered):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(rendered[path]):
            if doc:
                out.append((path, doc))
    return out


def lint(values: dict | None = None) -> list[str]:
    """Lint errors and warnings (severity >= 2) as 'path: message' lines; [] when clean."""
    if engine() == "binary":
        command = [helm_binary(), "lint", str(CHART), "--strict"]
        proc = subprocess.run(command, check=False, capture_output=True, text=True)
        return [] if proc.returncode == 0 else [proc.stdout + proc.stderr]
    from helm_python import lint as helm_lint

    report = helm_lint(str(CHART), values or {}, namespace=NAMESPACE)
    found = [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2]
    return found + list(report["errors"])
