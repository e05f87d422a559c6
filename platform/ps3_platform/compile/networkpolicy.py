"""The per-job NetworkPolicy: a job's pods accept connections from that job's pods only.

Rendezvous (c10d) and NCCL/gloo use ephemeral ports, so the rule lists no port. Kubernetes
cannot express "pods with the same label value", so one chart-wide policy cannot keep two
jobs of a namespace apart: each job brings its own. NetworkPolicies add up, and the chart's
baseline policy (installed together with these, see `PoolConfig.job_network_policies`)
selects every training pod and admits only metrics scraping, so a pod ends up reachable
by its own job and by Prometheus, nothing else. The backend makes the policy owned by the
workload, so it goes with it.
"""

from __future__ import annotations

from ps3_platform.ports import RAY_PORTS, RAY_WORKER_PORTS
from ps3_platform.spec import JobSpec, stages_of
from ps3_platform.spec.models import RAY_TASKS

from .labels import COMPONENT_LABEL, JOB_LABEL, object_annotations, object_labels


def networkpolicy_name(job_name: str) -> str:
    return f"{job_name}-pods"


def job_networkpolicy(job: JobSpec, digest: str, namespace: str | None) -> dict:
    pods = {JOB_LABEL: job.metadata.name, COMPONENT_LABEL: "training"}
    metadata: dict = {"name": networkpolicy_name(job.metadata.name), "labels": object_labels(job, "network"),
                      "annotations": object_annotations(job, digest)}
    if namespace:
        metadata["namespace"] = namespace
    ingress = [{"from": [{"podSelector": {"matchLabels": dict(pods)}}]}]
    if any(stage.task in RAY_TASKS for stage in stages_of(job)):
        ingress.append(ray_rule(pods))
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": metadata,
            "spec": {"podSelector": {"matchLabels": pods}, "policyTypes": ["Ingress"], "ingress": ingress}}


def ray_rule(pods: dict[str, str]) -> dict:
    """The Ray ports, by name, from the job's own pods.

    The rule above already admits every port from those pods; this one names what a Ray
    stage listens on (head, node manager, object manager, agents, the worker port range),
    so an operator who narrows the first rule knows what curation needs.
    """
    low, high = RAY_WORKER_PORTS
    ports = [{"protocol": "TCP", "port": port} for port in RAY_PORTS.values()]
    ports.append({"protocol": "TCP", "port": low, "endPort": high})
    return {"from": [{"podSelector": {"matchLabels": dict(pods)}}], "ports": ports}
