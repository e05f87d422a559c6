"""Job spec -> Kubernetes objects: pure, deterministic, no I/O.

`compile_job` returns, in the order to create them:
- TrainingJob: ConfigMap `<job>-spec` (the resolved spec), PyTorchJob `<job>-train`.
- Pipeline: ConfigMap `<job>-spec`, Argo Workflow `<job>` whose DAG creates one
  PyTorchJob `<job>-<stage>` per stage in dependency order.
- Both: NetworkPolicy `<job>-pods` after the ConfigMap when the pool configuration asks
  for per-job policies (`jobNetworkPolicies`, set by the Helm chart).
`to_yaml` prints them as multi-document YAML, byte-identical for the same spec.
"""

from __future__ import annotations

import yaml

from ps3_platform.spec import JobSpec, Pipeline, Pool, PoolConfig, Stage, stages_of

from .check import check_pytorchjob, check_workflow
from .cluster_advice import cluster_warnings
from .configmap import SPEC_PATH, configmap_name, spec_configmap
from .errors import CompileError
from .labels import JOB_LABEL, SPEC_HASH_ANNOTATION, STAGE_LABEL, job_digest
from .networkpolicy import job_networkpolicy
from .options import CompileOptions
from .pytorchjob import pytorchjob_name, stage_pytorchjob
from .render import manifest_yaml, to_yaml
from .workflow import WORKFLOW_POD_LABEL, pipeline_workflow

__all__ = [
    "CompileError", "CompileOptions", "JOB_LABEL", "SPEC_HASH_ANNOTATION", "SPEC_PATH", "STAGE_LABEL",
    "check_pytorchjob", "check_workflow", "cluster_warnings", "compile_job", "configmap_name", "manifest_yaml",
    "job_digest", "pytorchjob_name", "pytorchjobs_in", "to_yaml",
]


def _pool(pools: PoolConfig, stage: Stage) -> Pool:
    pool = pools.pools.get(stage.resources.pool)
    if pool is None:
        known = ", ".join(sorted(pools.pools)) or "none"
        raise CompileError(f"stage {stage.name!r}: pool {stage.resources.pool!r} does not exist (known pools: {known})")
    if stage.resources.gpus_per_node > pool.gpus_per_node:
        raise CompileError(f"stage {stage.name!r}: pool {stage.resources.pool!r} has {pool.gpus_per_node} GPUs per "
                           f"node, the stage asks for {stage.resources.gpus_per_node}")
    return pool


def _self_check(objects: list[dict]) -> None:
    for obj in objects:
        checker = {"PyTorchJob": check_pytorchjob, "Workflow": check_workflow}.get(obj["kind"])
        problems = checker(obj) if checker else []
        if problems:
            raise CompileError(f"{obj['kind']} {obj['metadata']['name']}: {problems[0]}")


def compile_job(job: JobSpec, pools: PoolConfig, *, namespace: str | None = None,
                options: CompileOptions | None = None) -> list[dict]:
    """All objects of `job`, in creation order. `namespace` overrides metadata.namespace."""
    options = options or CompileOptions()
    namespace = namespace or job.metadata.namespace
    digest = job_digest(job)
    stages = stages_of(job)
    is_pipeline = isinstance(job, Pipeline)
    default_image = job.spec.image if is_pipeline else None
    pod_labels = {WORKFLOW_POD_LABEL: job.metadata.name} if is_pipeline else None
    jobs = [
        stage_pytorchjob(job, stage, _pool(pools, stage), image=stage.image or default_image, digest=digest,
                         namespace=namespace, options=options, extra_pod_labels=pod_labels)
        for stage in stages
    ]
    policy = job_networkpolicy(job, digest, namespace) if pools.job_network_policies else None
    objects = [spec_configmap(job, digest, namespace, network_policy=policy["metadata"]["name"] if policy else None)]
    if policy:
        objects.append(policy)
    if is_pipeline:
        objects.append(pipeline_workflow(job, stages, jobs, digest=digest, namespace=namespace, options=options))
    else:
        objects += jobs
    _self_check(objects)
    return objects


def pytorchjobs_in(objects: list[dict]) -> list[dict]:
    """Every PyTorchJob in `objects`, including those a Workflow's resource templates create."""
    found = []
    for obj in objects:
        if obj.get("kind") == "PyTorchJob":
            found.append(obj)
        for template in obj.get("spec", {}).get("templates", []) if obj.get("kind") == "Workflow" else []:
            if manifest := template.get("resource", {}).get("manifest"):
                embedded = yaml.safe_load(manifest)
                if embedded.get("kind") == "PyTorchJob":
                    found.append(embedded)
    return found
