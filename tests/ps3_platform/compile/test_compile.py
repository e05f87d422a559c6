"""Compiled objects: valid against the real CRDs and core schemas, webhook rules, layout.

Cases are the job files in `jobs/` (whatever exists) plus inline specs covering the
shapes those files may not: multi-node, elastic, pipelines with a diamond DAG, Kueue and
gang-scheduler pools, storage credentials.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from ps3_platform.compile import (
    check_pytorchjob,
    check_workflow,
    compile_job,
    job_digest,
    pytorchjobs_in,
    to_yaml,
)
from ps3_platform.spec import load, load_pools, load_text, parse_pools, resolved

REPO = Path(__file__).resolve().parents[3]
K8S_VERSION = "1.30.0"

POOLS = parse_pools("""
pools:
  cpu: {}
  h100:
    gpusPerNode: 8
    nodeSelector: {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}
    tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
    priorityClass: ps3-training
  queued:
    gpusPerNode: 4
    gpuResource: amd.com/gpu
    kueueQueue: team-a
    schedulerQueue: gang-a
    priorityClass: ps3-batch
jobNetworkPolicies: true
""", "test-pools")

INLINE = {
    "minimal": """
apiVersion: ps3.platform/v1
kind: TrainingJob
metadata: {name: minimal}
spec:
  task: noop
""",
    "multinode": """
apiVersion: ps3.platform/v1
kind: TrainingJob
metadata:
  name: big
  namespace: vision
  labels: {team: vision, cost-center: "42"}
spec:
  task: ps3_pretrain
  image: registry.example/ps3:1.2
  storage: {credentialsSecret: s3-creds, endpoint: "http://minio.storage:9000", region: us-east-1}
  resources: {pool: h100, nodes: 4, gpusPerNode: 8, cpu: "96", memory: 1000Gi, shmSize: 64Gi}
  env: {NCCL_DEBUG: WARN}
  train: {globalBatch: 256}
  monitoring: {port: 9500}
""",
    "elastic": """
apiVersion: ps3.platform/v1
kind: TrainingJob
metadata: {name: stretchy}
spec:
  task: ps3_pretrain
  resources: {pool: queued, nodes: 2, gpusPerNode: 4}
  elastic: {minNodes: 1, maxNodes: 4, maxRestarts: 5}
  train: {globalBatch: 48}
""",
    "pipeline": """
apiVersion: ps3.platform/v1
kind: Pipeline
metadata: {name: diamond, labels: {team: vision}}
spec:
  image: registry.example/ps3:1.2
  storage: {credentialsSecret: s3-creds}
  stages:
    - name: synth
      task: synth_data
    - name: pretrain
      task: ps3_pretrain
      dependsOn: [synth]
      resources: {pool: h100, nodes: 2, gpusPerNode: 8}
      train: {globalBatch: 64}
    - name: probe
      task: ps3_eval
      dependsOn: [synth]
      image: registry.example/ps3-eval:1.2
    - name: evaluate
      task: ps3_eval
      dependsOn: [probe, pretrain]
      resources: {pool: queued, nodes: 2, gpusPerNode: 4}
      elastic: {minNodes: 1, maxNodes: 2}
      train: {globalBatch: 8}
""",
}

JOB_FILES = sorted(glob.glob(str(REPO / "jobs" / "*.yaml")))


def _load_case(case: str):
    if case in INLINE:
        return load_text(INLINE[case], f"<{case}>").job, POOLS
    return load(case).job, load_pools()


CASES = list(INLINE) + JOB_FILES


@pytest.fixture(params=CASES, ids=lambda c: Path(c).name)
def compiled(request):
    job, pools = _load_case(request.param)
    request.node.pools = pools
    return job, compile_job(job, pools)


# ---- schema validity --------------------------------------------------------------------
def test_pytorchjobs_validate_against_crd(compiled, pytorchjob_validator):
    _, objects = compiled
    jobs = pytorchjobs_in(objects)
    assert jobs
    for obj in jobs:
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in pytorchjob_validator.iter_errors(obj)]
        assert errors == []


def test_workflows_validate_against_crd(compiled, workflow_validator):
    job, objects = compiled
    workflows = [o for o in objects if o["kind"] == "Workflow"]
    assert len(workflows) == (1 if job.kind == "Pipeline" else 0)
    for obj in workflows:
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in workflow_validator.iter_errors(obj)]
        assert errors == []
        assert check_workflow(obj) == []


def test_core_objects_validate_with_kubernetes_validate(compiled):
    _, objects = compiled
    core = [o for o in objects if o["kind"] in ("ConfigMap", "NetworkPolicy")]
    assert [o["kind"] for o in core] == ["ConfigMap", "NetworkPolicy"]
    for obj in core:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    # The pod templates, checked as the Pods the operator will create from them.
    for obj in pytorchjobs_in(objects):
        for rtype, rspec in obj["spec"]["pytorchReplicaSpecs"].items():
            pod = {"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": f"{obj['metadata']['name']}-{rtype.lower()}-0", **rspec["template"]["metadata"]},
                   "spec": rspec["template"]["spec"]}
            kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


def test_webhook_rules_hold(compiled):
    _, objects = compiled
    for obj in pytorchjobs_in(objects):
        assert check_pytorchjob(obj) == []


# ---- determinism ------------------------------------------------------------------------
def test_same_spec_gives_byte_identical_yaml(compiled, request):
    job, objects = compiled
    again = compile_job(job.model_copy(deep=True), request.node.pools)
    assert to_yaml(objects) == to_yaml(again)


def test_yaml_is_identical_across_processes(tmp_path):
    """Hash seeds and dict order of a fresh interpreter must not leak into the output."""
    import subprocess
    import sys

    spec = tmp_path / "job.yaml"
    spec.write_text(INLINE["pipeline"])
    pools = tmp_path / "pools.yaml"
    pools.write_text(yaml.safe_dump(POOLS.model_dump(by_alias=True)))
    code = ("import sys; from ps3_platform.spec import load, load_pools; from ps3_platform.compile import compile_job, to_yaml;"
            f"sys.stdout.write(to_yaml(compile_job(load({str(spec)!r}).job, load_pools({str(pools)!r}))))")
    outputs = {subprocess.run([sys.executable, "-c", code], env={"PYTHONHASHSEED": seed}, capture_output=True,
                              text=True, check=True).stdout for seed in ("1", "2")}
    assert len(outputs) == 1
    assert outputs.pop() == to_yaml(compile_job(load(spec).job, POOLS))


def test_key_order_in_the_spec_file_does_not_matter():
    reordered = """
kind: TrainingJob
spec:
  train: {globalBatch: 256}
  monitoring: {port: 9500}
  env: {NCCL_DEBUG: WARN}
  resources: {shmSize: 64Gi, memory: 1000Gi, cpu: "96", gpusPerNode: 8, nodes: 4, pool: h100}
  storage: {region: us-east-1, endpoint: "http://minio.storage:9000", credentialsSecret: s3-creds}
  image: registry.example/ps3:1.2
  task: ps3_pretrain
metadata:
  labels: {cost-center: "42", team: vision}
  namespace: vision
  name: big
apiVersion: ps3.platform/v1
"""
    a = load_text(INLINE["multinode"]).job
    b = load_text(reordered).job
    assert job_digest(a) == job_digest(b)
    assert to_yaml(compile_job(a, POOLS)) == to_yaml(compile_job(b, POOLS))


def test_changed_spec_changes_the_hash():
    a = load_text(INLINE["minimal"]).job
    b = load_text(INLINE["minimal"], overrides=["spec.train.steps=7"]).job
    assert job_digest(a) != job_digest(b)
    assert len(job_digest(a)) == 64


def test_to_yaml_round_trips_and_has_no_anchors(compiled):
    _, objects = compiled
    text = to_yaml(objects)
    assert "&id" not in text and "*id" not in text
    assert list(yaml.safe_load_all(text)) == objects
    assert text.startswith("---\n")


GOLDEN = Path(__file__).with_name("golden")


@pytest.mark.parametrize("case", ["multinode", "pipeline"])
def test_golden_output(case):
    """Reviewable diff of compiled output; regenerate with PS3_UPDATE_GOLDEN=1."""
    import os

    text = to_yaml(compile_job(load_text(INLINE[case]).job, POOLS))
    path = GOLDEN / f"{case}.yaml"
    if os.environ.get("PS3_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), (
        f"compiled output of {case!r} changed: review the diff, then regenerate with PS3_UPDATE_GOLDEN=1")


# ---- the spec ConfigMap -----------------------------------------------------------------
def test_configmap_holds_the_resolved_spec_the_runtime_can_load(compiled):
    job, objects = compiled
    cm = objects[0]
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == f"{job.metadata.name}-spec"
    text = cm["data"]["spec.yaml"]
    assert yaml.safe_load(text) == resolved(job)
    assert load_text(text, "spec.yaml").job == job
    for obj in pytorchjobs_in(objects):
        for rspec in obj["spec"]["pytorchReplicaSpecs"].values():
            pod = rspec["template"]["spec"]
            assert pod["volumes"][0]["configMap"]["name"] == cm["metadata"]["name"]
            container = pod["containers"][0]
            mount = next(m for m in container["volumeMounts"] if m["name"] == "spec")
            spec_arg = container["command"][container["command"].index("--spec") + 1]
            assert spec_arg == f"{mount['mountPath']}/spec.yaml"


def test_objects_are_created_in_dependency_order(compiled):
    job, objects = compiled
    kinds = [o["kind"] for o in objects]
    assert kinds == ["ConfigMap", "NetworkPolicy", "Workflow" if job.kind == "Pipeline" else "PyTorchJob"]


def test_every_object_carries_hash_and_labels(compiled):
    job, objects = compiled
    digest = job_digest(job)
    for obj in objects + pytorchjobs_in(objects):
        meta = obj["metadata"]
        assert meta["annotations"]["ps3.platform/spec-hash"] == digest
        assert meta["labels"]["ps3.platform/job"] == job.metadata.name
        assert meta["labels"]["app.kubernetes.io/part-of"] == "ps3-platform"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "platformctl"
        for key, value in job.metadata.labels.items():
            assert meta["labels"][key] == value


# ---- namespace --------------------------------------------------------------------------
@pytest.mark.parametrize("case,override,expected", [
    ("minimal", None, None), ("minimal", "team-b", "team-b"),
    ("multinode", None, "vision"), ("multinode", "team-b", "team-b"), ("pipeline", "ns1", "ns1"),
])
def test_namespace_on_every_namespaced_object(case, override, expected):
    objects = compile_job(load_text(INLINE[case]).job, POOLS, namespace=override)
    for obj in objects + pytorchjobs_in(objects):
        assert obj["metadata"].get("namespace") == expected


def test_pytorchjobs_in_finds_workflow_manifests():
    objects = compile_job(load_text(INLINE["pipeline"]).job, POOLS)
    names = [o["metadata"]["name"] for o in pytorchjobs_in(objects)]
    assert names == ["diamond-synth", "diamond-pretrain", "diamond-probe", "diamond-evaluate"]


def test_job_and_cluster_output_as_json_is_plain_data(compiled):
    _, objects = compiled
    assert json.loads(json.dumps(objects)) == objects
