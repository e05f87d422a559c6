"""The ConfigMap holding the resolved spec, and how pods mount it.

Workers read the spec from a file (`--spec /etc/ps3-platform/spec.yaml`), the same way
as under the local backend, so the runtime has one code path. The ConfigMap holds the
*resolved* spec (every default filled in) so a later change of a default in a new
platformctl cannot change a job that is already running.
"""

from __future__ import annotations

import yaml

from ps3_platform.spec import JobSpec, resolved

from .labels import NETWORK_POLICY_ANNOTATION, object_annotations, object_labels

SPEC_DIR = "/etc/ps3-platform"
SPEC_KEY = "spec.yaml"
SPEC_PATH = f"{SPEC_DIR}/{SPEC_KEY}"
SPEC_VOLUME = "spec"


def configmap_name(job_name: str) -> str:
    return f"{job_name}-spec"


def spec_text(job: JobSpec) -> str:
    """The resolved spec as YAML with sorted keys: key order in the user's file must not matter."""
    return yaml.safe_dump(resolved(job), sort_keys=True, default_flow_style=False, width=120)


def spec_configmap(job: JobSpec, digest: str, namespace: str | None, network_policy: str | None = None) -> dict:
    """`network_policy`: the job's NetworkPolicy, recorded so that cancel deletes it too."""
    annotations = object_annotations(job, digest)
    if network_policy:
        annotations[NETWORK_POLICY_ANNOTATION] = network_policy
    metadata: dict = {"name": configmap_name(job.metadata.name), "labels": object_labels(job, "spec"),
                      "annotations": annotations}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": {SPEC_KEY: spec_text(job)}}


def spec_volume(job_name: str) -> dict:
    items = [{"key": SPEC_KEY, "path": SPEC_KEY}]
    return {"name": SPEC_VOLUME, "configMap": {"name": configmap_name(job_name), "items": items}}


def spec_mount() -> dict:
    return {"name": SPEC_VOLUME, "mountPath": SPEC_DIR, "readOnly": True}
