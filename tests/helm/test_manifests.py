"""manifests/ and the chart's files/ are generated: they must equal what the generators write."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / script), *args]
    return subprocess.run(command, check=False, capture_output=True, text=True, cwd=REPO)


def _generator():
    spec = importlib.util.spec_from_file_location("ps3_manifests_generate", REPO / "manifests" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kustomize_bases_match_the_chart():
    proc = _run("manifests/generate.py", "--check")
    assert proc.returncode == 0, proc.stderr


def test_drift_is_detected(tmp_path):
    generate = _generator()
    for directory, files in generate.bases().items():
        (tmp_path / directory).mkdir()
        for name, text in files.items():
            (tmp_path / directory / name).write_text(text)
    assert generate.drift(tmp_path) == []
    role = tmp_path / "base" / "role-ps3-platform-platformctl.yaml"
    role.write_text(role.read_text().replace("- delete", "- deletecollection"))
    (tmp_path / "base" / "extra.yaml").write_text("kind: ConfigMap\n")
    assert generate.drift(tmp_path) == ["manifests/base/role-ps3-platform-platformctl.yaml is stale",
                                        "manifests/base/extra.yaml is no longer generated"]


def test_base_has_the_default_render_without_helm_parts(chart_engine):
    generate = _generator()
    rendered = [o for _, o in chart_engine.objects(chart_engine.render({}))
                if "helm.sh/hook" not in (o["metadata"].get("annotations") or {})]
    base = generate.bases()["base"]
    docs = [yaml.safe_load(text) for name, text in base.items() if name != "kustomization.yaml"]
    assert sorted((o["kind"], o["metadata"]["name"]) for o in docs) == \
        sorted((o["kind"], o["metadata"]["name"]) for o in rendered)
    for doc in docs:
        assert "helm.sh/chart" not in doc["metadata"]["labels"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kustomize"


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl (with built-in kustomize) not on PATH")
@pytest.mark.parametrize("directory", ["base", "training-operator"])
def test_kustomize_builds(directory):
    command = ["kubectl", "kustomize", str(REPO / "manifests" / directory)]
    proc = subprocess.run(command, check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    kinds = {d["kind"] for d in yaml.safe_load_all(proc.stdout) if d}
    assert ("PrometheusRule" if directory == "base" else "CustomResourceDefinition") in kinds


def test_chart_copies_of_rules_dashboards_and_crd_match_their_sources():
    proc = _run("ops/sync_chart.py", "--check")
    assert proc.returncode == 0, proc.stderr
