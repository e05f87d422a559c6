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

from ps3_platform.spec import JobSpec

from .labels import COMPONENT_LABEL, JOB_LABEL, object_annotations, object_labels


def networkpolicy_name(job_name: str) -> str:
    return f"{job_name}-pods"


def job_networkpolicy(job: JobSpec, digest: str, namespace: str | None) -> dict:
    pods = {JOB_LABEL: job.metadata.name, COMPONENT_LABEL: "training"}
    metadata: dict = {"name": networkpolicy_name(job.metadata.name), "labels": object_labels(job, "network"),
                      "annotations": object_annotations(job, digest)}
    if namespace:
        metadata["namespace"] = namespace
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": metadata,
            "spec": {"podSelector": {"matchLabels": pods}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {"matchLabels": dict(pods)}}]}]}}
