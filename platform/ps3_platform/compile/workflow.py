"""A Pipeline -> one Argo Workflow that creates the stage PyTorchJobs in dependency order.

Each stage is a `resource` template (action `create`, owner reference to the Workflow so
deleting the Workflow deletes its PyTorchJobs). Argo parses success/failure conditions
with label-selector syntax over gjson paths, so `status.conditions` cannot be searched;
the replica counters are what it can test (k8s_anchors §c, argo-workflows#7143).

Caveat (documented, accepted): under `ExitCode` a retryable failure can show
`failed > 0` for a moment before the operator replaces the pod, which would fail the
Workflow step while the PyTorchJob itself carries on.
"""

from __future__ import annotations

from ps3_platform.spec import Pipeline, Stage

from .errors import CompileError
from .labels import object_annotations, object_labels
from .options import CompileOptions
from .pytorchjob import success_replica
from .render import manifest_yaml

API_VERSION = "argoproj.io/v1alpha1"
KIND = "Workflow"
ENTRYPOINT = "pipeline"
#: Pod label `argo logs` uses to find pods a resource template created.
WORKFLOW_POD_LABEL = "workflows.argoproj.io/workflow"


def _task_name(stage: Stage) -> str:
    # Argo rejects DAG task names that start with a digit when dependencies are used.
    if stage.name[0].isdigit():
        raise CompileError(f"stage name {stage.name!r} must start with a letter in a Pipeline (Argo task names)")
    return stage.name


def resource_template(stage: Stage, pytorchjob: dict) -> dict:
    replica = success_replica(pytorchjob)
    return {
        "name": _task_name(stage),
        "resource": {
            "action": "create",
            "setOwnerReference": True,
            "manifest": manifest_yaml(pytorchjob),
            "successCondition": f"status.replicaStatuses.{replica}.succeeded > 0",
            "failureCondition": f"status.replicaStatuses.{replica}.failed > 0",
        },
    }


def dag_template(stages: list[Stage]) -> dict:
    tasks = []
    for stage in stages:  # already in dependency order
        task: dict = {"name": _task_name(stage), "template": _task_name(stage)}
        if stage.depends_on:
            task["dependencies"] = sorted(stage.depends_on)
        tasks.append(task)
    return {"name": ENTRYPOINT, "dag": {"tasks": tasks}}


def pipeline_workflow(job: Pipeline, stages: list[Stage], pytorchjobs: list[dict], *, digest: str,
                      namespace: str | None, options: CompileOptions) -> dict:
    """The Workflow named like the job; `pytorchjobs[i]` belongs to `stages[i]`."""
    metadata: dict = {
        "name": job.metadata.name,
        "labels": object_labels(job, "pipeline"),
        "annotations": object_annotations(job, digest),
    }
    if namespace:
        metadata["namespace"] = namespace
    resources = [resource_template(s, p) for s, p in zip(stages, pytorchjobs, strict=True)]
    spec: dict = {
        "entrypoint": ENTRYPOINT,
        "serviceAccountName": options.workflow_service_account,
        # Executor pods of succeeded steps go; failed ones stay for debugging.
        "podGC": {"strategy": "OnPodSuccess"},
        "templates": [dag_template(stages), *resources],
    }
    if options.ttl_seconds_after_finished is not None:
        spec["ttlStrategy"] = {"secondsAfterCompletion": options.ttl_seconds_after_finished}
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": metadata, "spec": spec}
