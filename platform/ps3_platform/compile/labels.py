"""Labels and annotations every compiled object carries, and the spec hash.

Dashboards join GPU metrics (DCGM exporter's `pod`/`namespace` labels) with jobs through
these labels, and the Kubernetes backend finds a job's objects by `ps3.platform/job`, so
the keys are a contract: change them only together with `ops/` and the backend.
"""

from __future__ import annotations

import hashlib
import json
import re

from ps3_platform.spec import JobSpec, resolved

from .errors import CompileError

JOB_LABEL = "ps3.platform/job"
STAGE_LABEL = "ps3.platform/stage"
SPEC_HASH_ANNOTATION = "ps3.platform/spec-hash"
KIND_ANNOTATION = "ps3.platform/kind"
#: On the spec ConfigMap: the job's NetworkPolicy, so cancel knows to delete it.
NETWORK_POLICY_ANNOTATION = "ps3.platform/network-policy"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
#: Set by the training operator on every pod it creates (used to find a stage's pods).
OPERATOR_JOB_NAME_LABEL = "training.kubeflow.org/job-name"
MANAGED_BY = "platformctl"

#: Labels on every object; `component` says what kind of workload it is.
BASE_LABELS = {
    "app.kubernetes.io/name": "ps3-platform",
    "app.kubernetes.io/part-of": "ps3-platform",
    "app.kubernetes.io/managed-by": MANAGED_BY,
}
COMPONENT_LABEL = "app.kubernetes.io/component"

# Kubernetes label syntax: optional DNS-subdomain prefix, a name of <= 63 characters,
# values of <= 63 characters (empty allowed).
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_RESERVED_PREFIXES = ("ps3.platform/", "app.kubernetes.io/", "training.kubeflow.org/", "kueue.x-k8s.io/")


def job_digest(job: JobSpec) -> str:
    """sha256 of the resolved job: equal hashes mean a re-submit changes nothing.

    Canonical JSON (sorted keys, no spaces) so the hash does not depend on key order in
    the user's file, only on what the job means once defaults are filled in.
    """
    blob = json.dumps(resolved(job), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def check_label(key: str, value: str) -> None:
    """Raise CompileError when `key: value` is not a valid Kubernetes label."""
    prefix, _, name = key.rpartition("/")
    if (prefix and not _LABEL_PREFIX.match(prefix)) or not _LABEL_NAME.match(name):
        raise CompileError(f"metadata.labels: {key!r} is not a valid label key "
                           "(an optional DNS prefix/, then <= 63 letters, digits, '-', '_' or '.')")
    if value and not _LABEL_NAME.match(value):
        raise CompileError(f"metadata.labels.{key}: {value!r} is not a valid label value "
                           "(<= 63 letters, digits, '-', '_' or '.', starting and ending alphanumeric)")


def user_labels(job: JobSpec) -> dict[str, str]:
    """The spec's metadata.labels, checked; platform-owned keys may not be overridden."""
    labels = dict(job.metadata.labels)
    for key, value in labels.items():
        if key.startswith(_RESERVED_PREFIXES):
            raise CompileError(f"metadata.labels: {key!r} is reserved for the platform; use another key")
        check_label(key, value)
    return labels


def object_labels(job: JobSpec, component: str, stage: str | None = None) -> dict[str, str]:
    """Labels for one object (and its pods): base + job/stage + the spec's own labels."""
    labels = {**user_labels(job), **BASE_LABELS, COMPONENT_LABEL: component, JOB_LABEL: job.metadata.name}
    if stage is not None:
        labels[STAGE_LABEL] = stage
    return labels


def object_annotations(job: JobSpec, digest: str) -> dict[str, str]:
    return {SPEC_HASH_ANNOTATION: digest, KIND_ANNOTATION: job.kind}
