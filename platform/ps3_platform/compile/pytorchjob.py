"""One stage -> one `kubeflow.org/v1` PyTorchJob.

Replica layout:
- fixed size, 1 node: a Master only (torchrun's static rendezvous on MASTER_ADDR).
- fixed size, N > 1 nodes: Master (1) + Worker (N - 1); the job succeeds when the Master
  does, and the operator gives every pod MASTER_ADDR/RANK.
- elastic: Worker replicas only, with `elasticPolicy` (c10d rendezvous). The operator
  points the rendezvous at `<job>-worker-0` by default, and a Master would be a fixed
  pod outside the elastic range (the HPA/scale subresource only moves `Worker.replicas`),
  so elastic stages have no Master. Success is then "any worker succeeded".
"""

from __future__ import annotations

import copy
import re

from ps3_platform.spec import JobSpec, Pool, Stage

from .errors import CompileError
from .labels import KUEUE_QUEUE_LABEL, object_annotations, object_labels
from .options import CompileOptions
from .pod import pod_template

API_VERSION = "kubeflow.org/v1"
KIND = "PyTorchJob"
# Pods and their headless Services are named `<job>-worker-<i>`: a DNS-1035 label.
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def pytorchjob_name(job_name: str, stage_name: str) -> str:
    return f"{job_name}-{stage_name}"


def _check_name(name: str, max_index: int) -> None:
    """The operator derives pod and Service names from the job name; they must stay valid."""
    longest = f"{name}-worker-{max_index}"
    if len(longest) > 63:
        raise CompileError(f"PyTorchJob name {name!r} is too long: its pod/Service name {longest!r} exceeds "
                           "63 characters; shorten metadata.name or the stage name")
    if not _DNS_1035.match(name):
        raise CompileError(f"PyTorchJob name {name!r} must start with a letter (Service names are DNS-1035 labels); "
                           "rename metadata.name")


def replica_specs(stage: Stage, template: dict, restart_policy: str) -> dict:
    nodes = stage.resources.nodes

    def replica(count: int) -> dict:
        # A copy per replica type: shared dicts would become YAML anchors in the output.
        return {"replicas": count, "restartPolicy": restart_policy, "template": copy.deepcopy(template)}

    if stage.elastic:
        return {"Worker": replica(nodes)}
    specs = {"Master": replica(1)}
    if nodes > 1:
        specs["Worker"] = replica(nodes - 1)
    return specs


def _elastic_policy(stage: Stage, name: str) -> dict | None:
    if not stage.elastic:
        return None
    return {
        "rdzvBackend": "c10d",
        "rdzvId": name,
        "minReplicas": stage.elastic.min_nodes,
        "maxReplicas": stage.elastic.max_nodes,
        "maxRestarts": stage.elastic.max_restarts,
    }


def _run_policy(stage: Stage, pool: Pool, options: CompileOptions) -> dict:
    policy: dict = {"backoffLimit": options.backoff_limit, "cleanPodPolicy": options.clean_pod_policy}
    if options.ttl_seconds_after_finished is not None:
        policy["ttlSecondsAfterFinished"] = options.ttl_seconds_after_finished
    scheduling: dict = {}
    if pool.scheduler_queue:
        scheduling["queue"] = pool.scheduler_queue
    if pool.priority_class:
        scheduling["priorityClass"] = pool.priority_class
    if scheduling and stage.elastic:
        # A gang scheduler starts the job once the elastic minimum fits (k8s_anchors §e.3).
        scheduling["minAvailable"] = stage.elastic.min_nodes
    if scheduling:
        policy["schedulingPolicy"] = scheduling
    return policy


def stage_pytorchjob(job: JobSpec, stage: Stage, pool: Pool, *, image: str | None, digest: str,
                     namespace: str | None, options: CompileOptions, extra_pod_labels: dict | None = None) -> dict:
    """The PyTorchJob of one stage (`extra_pod_labels`: e.g. Argo's workflow label)."""
    name = pytorchjob_name(job.metadata.name, stage.name)
    max_nodes = stage.elastic.max_nodes if stage.elastic else stage.resources.nodes
    _check_name(name, max_nodes - 1)
    labels = object_labels(job, "training", stage.name)
    metadata_labels = dict(labels)
    if pool.kueue_queue:
        metadata_labels[KUEUE_QUEUE_LABEL] = pool.kueue_queue
    metadata: dict = {"name": name, "labels": metadata_labels, "annotations": object_annotations(job, digest)}
    if namespace:
        metadata["namespace"] = namespace
    template = pod_template(job, stage, pool, {**labels, **(extra_pod_labels or {})}, options, image)
    spec: dict = {
        "nprocPerNode": str(stage.resources.nproc),
        "pytorchReplicaSpecs": replica_specs(stage, template, options.restart_policy),
        "runPolicy": _run_policy(stage, pool, options),
    }
    if elastic := _elastic_policy(stage, name):
        spec["elasticPolicy"] = elastic
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}


def success_replica(obj: dict) -> str:
    """Replica type whose `succeeded` count means the job is done (Master, else Worker)."""
    return "Master" if "Master" in obj["spec"]["pytorchReplicaSpecs"] else "Worker"
