"""Rules the CRD schemas do not check, enforced by the webhooks or controllers in a cluster.

The PyTorchJob CRD types `restartPolicy`, `cleanPodPolicy` and `rdzvBackend` as plain
strings and does not know that the Master must be single or that the operator needs a
container named `pytorch`; the training operator's validating webhook (v1.9) rejects such
jobs at submit time. Checking here turns a late API error into a compile-time one.
The Argo CRD's CEL rules (x-kubernetes-validations) are likewise not run by jsonschema.
"""

from __future__ import annotations

import re

import yaml

from .options import CLEAN_POD_POLICIES, RESTART_POLICIES

REPLICA_TYPES = ("Master", "Worker")
RDZV_BACKENDS = ("c10d", "etcd", "etcd-v2")
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_NPROC = re.compile(r"^(auto|cpu|gpu|[1-9][0-9]*)$")


def _replica_problems(rtype: str, spec: dict) -> list[str]:
    where = f"pytorchReplicaSpecs.{rtype}"
    problems = []
    replicas = spec.get("replicas", 1)
    if rtype == "Master" and replicas != 1:
        problems.append(f"{where}.replicas must be 1, got {replicas}")
    if rtype == "Worker" and replicas < 1:
        problems.append(f"{where}.replicas must be >= 1, got {replicas}")
    policy = spec.get("restartPolicy")
    if policy is not None and policy not in RESTART_POLICIES:
        problems.append(f"{where}.restartPolicy {policy!r} is not one of {', '.join(RESTART_POLICIES)}")
    containers = spec.get("template", {}).get("spec", {}).get("containers") or []
    if not any(c.get("name") == "pytorch" for c in containers):
        problems.append(f"{where}: no container named 'pytorch'")
    problems += [f"{where}: container {c.get('name')!r} has no image" for c in containers if not c.get("image")]
    return problems


def _elastic_problems(spec: dict) -> list[str]:
    elastic = spec.get("elasticPolicy")
    if elastic is None:
        return []
    problems = []
    if "Worker" not in spec.get("pytorchReplicaSpecs", {}):
        problems.append("elasticPolicy needs a Worker replica spec")
    if elastic.get("rdzvBackend", "c10d") not in RDZV_BACKENDS:
        problems.append(f"elasticPolicy.rdzvBackend {elastic['rdzvBackend']!r} is not one of "
                        f"{', '.join(RDZV_BACKENDS)}")
    if "nProcPerNode" in elastic and "nprocPerNode" in spec:
        problems.append("elasticPolicy.nProcPerNode and nprocPerNode are both set")
    low, high = elastic.get("minReplicas"), elastic.get("maxReplicas")
    if low is not None and high is not None and low > high:
        problems.append(f"elasticPolicy.minReplicas ({low}) > maxReplicas ({high})")
    return problems


def check_pytorchjob(obj: dict) -> list[str]:
    """Problems the training operator's webhook would reject `obj` for ([] when none)."""
    problems = []
    name = obj.get("metadata", {}).get("name", "")
    if not _DNS_1035.match(name):
        problems.append(f"metadata.name {name!r} is not a DNS-1035 label")
    spec = obj.get("spec", {})
    replicas = spec.get("pytorchReplicaSpecs") or {}
    if not replicas:
        problems.append("pytorchReplicaSpecs is empty")
    for rtype, rspec in replicas.items():
        if rtype not in REPLICA_TYPES:
            problems.append(f"pytorchReplicaSpecs.{rtype}: replica type must be Master or Worker")
            continue
        problems += _replica_problems(rtype, rspec)
    nproc = spec.get("nprocPerNode")
    if nproc is not None and not _NPROC.match(str(nproc)):
        problems.append(f"nprocPerNode {nproc!r} must be auto, cpu, gpu or a positive integer")
    clean = spec.get("runPolicy", {}).get("cleanPodPolicy")
    if clean is not None and clean not in CLEAN_POD_POLICIES:
        problems.append(f"runPolicy.cleanPodPolicy {clean!r} is not one of {', '.join(CLEAN_POD_POLICIES)}")
    return problems + _elastic_problems(spec)


def check_workflow(obj: dict) -> list[str]:
    """Argo's CEL rules and reference checks for our DAG Workflows, plus each embedded PyTorchJob."""
    spec = obj.get("spec", {})
    templates = {t.get("name"): t for t in spec.get("templates", [])}
    problems = []
    if spec.get("entrypoint") not in templates:
        problems.append(f"entrypoint {spec.get('entrypoint')!r} is not a template")
    for template in templates.values():
        tasks = template.get("dag", {}).get("tasks", [])
        names = {t["name"] for t in tasks}
        for task in tasks:
            if "depends" in task and "dependencies" in task:
                problems.append(f"task {task['name']!r}: cannot use both 'depends' and 'dependencies'")
            if ("depends" in task or "dependencies" in task) and task["name"][:1].isdigit():
                problems.append(f"task {task['name']!r}: name cannot begin with a digit when using dependencies")
            if task.get("template") not in templates:
                problems.append(f"task {task['name']!r}: unknown template {task.get('template')!r}")
            problems += [f"task {task['name']!r}: unknown dependency {d!r}"
                         for d in task.get("dependencies", []) if d not in names]
        if manifest := template.get("resource", {}).get("manifest"):
            embedded = yaml.safe_load(manifest)
            problems += [f"template {template['name']!r}: {p}" for p in check_pytorchjob(embedded)]
    return problems
