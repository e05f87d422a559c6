"""Schema validators for compiled objects, loaded once per session.

The CRD schemas are structural: the API server *prunes* unknown fields instead of
rejecting them, so a misspelt field would silently vanish in a cluster. The validators
here are strict (unknown fields are errors, as with `kubectl apply --validate=strict`),
which is what catches a compiler typo.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

#: The vendored CRDs live beside the repository (`../shared/schemas`).
SCHEMAS = Path(os.environ.get("PS3_SCHEMAS_DIR", Path(__file__).resolve().parents[4] / "shared" / "schemas"))


def _strict(schema: dict) -> dict:
    """Copy of an openAPIV3Schema where objects with listed properties forbid others."""
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


def crd_validator(file: str) -> jsonschema.Draft7Validator:
    path = SCHEMAS / file
    if not path.is_file():
        pytest.skip(f"CRD schema {path} not available")
    with path.open() as fh:
        crd = yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


@pytest.fixture(scope="session")
def pytorchjob_validator() -> jsonschema.Draft7Validator:
    return crd_validator("pytorchjob.yaml")


@pytest.fixture(scope="session")
def workflow_validator() -> jsonschema.Draft7Validator:
    # 2.8 MB: parsed once for the whole session.
    return crd_validator("argo-workflow.yaml")
