"""Chart renders shared by the helm tests: defaults, and every toggle on.

Rendering goes through manifests/render.py (the `helm` binary when on PATH, otherwise
Helm 4 in-process via helm-python-sdk), the same engine the manifests generator uses.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "ps3-platform"
SCHEMAS = Path(os.environ.get("PS3_SCHEMAS_DIR", REPO.parent / "shared" / "schemas"))
K8S_VERSION = "1.30.0"


def _load_render_module():
    spec = importlib.util.spec_from_file_location("ps3_manifests_render", REPO / "manifests" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


chart = _load_render_module()

#: Every optional part switched on: the chart-testing scenario file, so `ct` and these tests agree.
ALL_ON = yaml.safe_load((CHART / "ci" / "all-toggles-values.yaml").read_text())


@pytest.fixture(scope="session")
def chart_engine():
    """manifests/render.py: render(values) -> {template: text}, objects(), lint(), ChartRenderError."""
    return chart


@pytest.fixture
def all_on() -> dict:
    return copy.deepcopy(ALL_ON)


@pytest.fixture(scope="session")
def crd_schema():
    """crd_schema("kueue-localqueues.yaml") -> strict validator of that CRD's storage version."""
    return crd_validator


@pytest.fixture(scope="session")
def default_render() -> dict[str, str]:
    return chart.render({})


@pytest.fixture(scope="session")
def default_objects(default_render) -> list[tuple[str, dict]]:
    return chart.objects(default_render)


@pytest.fixture(scope="session")
def full_render() -> dict[str, str]:
    return chart.render(copy.deepcopy(ALL_ON))


@pytest.fixture(scope="session")
def full_objects(full_render) -> list[tuple[str, dict]]:
    return chart.objects(full_render)


def _strict(schema: dict) -> dict:
    """Objects with listed properties forbid others (kubectl --validate=strict behaviour)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


#: prometheus-operator CRDs, vendored in this repository (../shared/schemas has none).
MONITORING_CRDS = Path(__file__).resolve().parent / "crds"


def crd_validator(file: str) -> jsonschema.Draft7Validator:
    """Strict validator for the storage version of a vendored CRD (skips when absent)."""
    path = MONITORING_CRDS / file if file.startswith("monitoring.coreos.com_") else SCHEMAS / file
    if not path.is_file():
        pytest.skip(f"CRD schema {path} not available (set PS3_SCHEMAS_DIR)")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))
