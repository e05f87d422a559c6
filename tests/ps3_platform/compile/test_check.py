"""The webhook-rule checks catch what the CRD schemas let through; the schemas catch typos."""

from __future__ import annotations

import copy

import pytest
import yaml
from ps3_platform.compile import check_pytorchjob, check_workflow, compile_job, pytorchjobs_in
from ps3_platform.spec import load_pools, load_text

TRAINING = """
apiVersion: ps3.platform/v1
kind: TrainingJob
metadata: {name: exp}
spec: {task: noop, resources: {pool: cpu, nodes: 2}, train: {globalBatch: 8}}
"""
PIPELINE = """
apiVersion: ps3.platform/v1
kind: Pipeline
metadata: {name: pipe}
spec:
  stages:
    - {name: first, task: noop}
    - {name: second, task: noop, dependsOn: [first]}
"""


@pytest.fixture
def pytorchjob() -> dict:
    return pytorchjobs_in(compile_job(load_text(TRAINING).job, load_pools()))[0]


@pytest.fixture
def workflow() -> dict:
    return next(o for o in compile_job(load_text(PIPELINE).job, load_pools()) if o["kind"] == "Workflow")


def _set(obj: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for part in parents:
        obj = obj[int(part)] if part.isdigit() else obj[part]
    if value is _DELETE:
        del obj[int(last) if last.isdigit() else last]
    else:
        obj[int(last) if last.isdigit() else last] = value


_DELETE = object()
MASTER = "spec.pytorchReplicaSpecs.Master"


@pytest.mark.parametrize("path,value,problem", [
    (f"{MASTER}.replicas", 2, "Master.replicas must be 1"),
    (f"{MASTER}.restartPolicy", "Sometimes", "restartPolicy 'Sometimes'"),
    (f"{MASTER}.template.spec.containers.0.name", "trainer", "no container named 'pytorch'"),
    (f"{MASTER}.template.spec.containers.0.image", "", "has no image"),
    ("spec.pytorchReplicaSpecs.Worker.replicas", 0, "Worker.replicas must be >= 1"),
    ("spec.pytorchReplicaSpecs.Launcher", {"replicas": 1}, "must be Master or Worker"),
    ("spec.runPolicy.cleanPodPolicy", "Finished", "cleanPodPolicy 'Finished'"),
    ("spec.nprocPerNode", "lots", "nprocPerNode 'lots'"),
    ("spec.elasticPolicy", {"rdzvBackend": "zookeeper"}, "rdzvBackend 'zookeeper'"),
    ("spec.elasticPolicy", {"minReplicas": 3, "maxReplicas": 2}, "minReplicas (3) > maxReplicas (2)"),
    ("spec.elasticPolicy", {"nProcPerNode": 2}, "both set"),
    ("metadata.name", "Exp_1", "DNS-1035"),
])
def test_check_pytorchjob_rejects(pytorchjob, path, value, problem):
    assert check_pytorchjob(pytorchjob) == []
    _set(pytorchjob, path, value)
    problems = check_pytorchjob(pytorchjob)
    assert any(problem in p for p in problems), problems


def test_elastic_needs_workers(pytorchjob):
    del pytorchjob["spec"]["pytorchReplicaSpecs"]["Worker"]
    pytorchjob["spec"]["elasticPolicy"] = {"rdzvBackend": "c10d"}
    assert "elasticPolicy needs a Worker replica spec" in check_pytorchjob(pytorchjob)


@pytest.mark.parametrize("mutate,problem", [
    (lambda wf: wf["spec"].update(entrypoint="main"), "entrypoint 'main'"),
    (lambda wf: wf["spec"]["templates"][0]["dag"]["tasks"][1].update(depends="first"), "both 'depends'"),
    (lambda wf: wf["spec"]["templates"][0]["dag"]["tasks"][1].update(name="2nd"), "cannot begin with a digit"),
    (lambda wf: wf["spec"]["templates"][0]["dag"]["tasks"][1].update(template="nope"), "unknown template"),
    (lambda wf: wf["spec"]["templates"][0]["dag"]["tasks"][1].update(dependencies=["zeroth"]), "unknown dependency"),
    (lambda wf: wf["spec"]["templates"][1]["resource"].update(
        manifest=wf["spec"]["templates"][1]["resource"]["manifest"].replace("name: pytorch", "name: main")),
     "no container named 'pytorch'"),
])
def test_check_workflow_rejects(workflow, mutate, problem):
    assert check_workflow(workflow) == []
    mutate(workflow)
    problems = check_workflow(workflow)
    assert any(problem in p for p in problems), problems


# ---- the strict CRD validators are not vacuous -------------------------------------------
@pytest.mark.parametrize("path,value", [
    ("spec.nprocsPerNode", "1"),  # misspelt field: the API server would prune it silently
    ("spec.pytorchReplicaSpecs.Master.replicas", "one"),
    (f"{MASTER}.template.spec.containers.0.ports.0.containerPort", "23456"),
    (f"{MASTER}.template.spec.containers.0.securityContext.runAsNonroot", True),
    ("spec.runPolicy.backoffLimit", 1.5),
])
def test_pytorchjob_crd_validator_rejects(pytorchjob, pytorchjob_validator, path, value):
    assert not list(pytorchjob_validator.iter_errors(pytorchjob))
    broken = copy.deepcopy(pytorchjob)
    _set(broken, path, value)
    assert list(pytorchjob_validator.iter_errors(broken))


@pytest.mark.parametrize("path,value", [
    ("spec.templates.1.resource.action", "launch"),
    ("spec.templates.1.resource.setOwnerRefs", True),
    ("spec.templates.0.dag.tasks.0.name", "bad name!"),
    ("spec.entrypoint", 3),
])
def test_workflow_crd_validator_rejects(workflow, workflow_validator, path, value):
    assert not list(workflow_validator.iter_errors(workflow))
    broken = copy.deepcopy(workflow)
    _set(broken, path, value)
    assert list(workflow_validator.iter_errors(broken))


def test_workflow_dag_order_and_conditions(workflow):
    tasks = workflow["spec"]["templates"][0]["dag"]["tasks"]
    assert tasks == [{"name": "first", "template": "first"},
                     {"name": "second", "template": "second", "dependencies": ["first"]}]
    resource = workflow["spec"]["templates"][1]["resource"]
    assert resource["action"] == "create" and resource["setOwnerReference"] is True
    assert resource["successCondition"] == "status.replicaStatuses.Master.succeeded > 0"
    assert resource["failureCondition"] == "status.replicaStatuses.Master.failed > 0"
    manifest = yaml.safe_load(resource["manifest"])
    assert manifest["metadata"]["name"] == "pipe-first"
    labels = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]["labels"]
    assert labels["workflows.argoproj.io/workflow"] == "pipe"


def test_worker_only_stage_conditions_test_workers():
    text = PIPELINE.replace("{name: second, task: noop,", "{name: second, task: noop, elastic: {minNodes: 1, maxNodes: 2},")
    workflow = next(o for o in compile_job(load_text(text).job, load_pools()) if o["kind"] == "Workflow")
    resource = workflow["spec"]["templates"][2]["resource"]
    assert resource["successCondition"] == "status.replicaStatuses.Worker.succeeded > 0"
    assert resource["failureCondition"] == "status.replicaStatuses.Worker.failed > 0"
