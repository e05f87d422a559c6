"""What each stage's PyTorchJob says: replicas, elasticity, run policy, pod details."""

from __future__ import annotations

import pytest
from ps3_platform.compile import CompileError, CompileOptions, compile_job, pytorchjobs_in
from ps3_platform.spec import load_text, parse_pools

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
""", "test-pools")


def job_yaml(name: str = "exp", *, resources: str = "{pool: cpu}", extra: str = "", metadata: str = "") -> str:
    return f"""
apiVersion: ps3.platform/v1
kind: TrainingJob
metadata: {{name: {name}{metadata}}}
spec:
  task: noop
  resources: {resources}
  train: {{globalBatch: 64}}
{extra}"""


def compile_one(text: str, options: CompileOptions | None = None, pools=POOLS) -> dict:
    objects = compile_job(load_text(text).job, pools, options=options)
    (pytorchjob,) = pytorchjobs_in(objects)
    return pytorchjob


def pod_of(obj: dict, rtype: str = "Master") -> dict:
    return obj["spec"]["pytorchReplicaSpecs"][rtype]["template"]["spec"]


# ---- replica layout ---------------------------------------------------------------------
@pytest.mark.parametrize("resources,elastic,expected,policy", [
    ("{pool: cpu}", "", {"Master": 1}, None),
    ("{pool: cpu, nodes: 2}", "", {"Master": 1, "Worker": 1}, None),
    ("{pool: h100, nodes: 4, gpusPerNode: 8}", "", {"Master": 1, "Worker": 3}, None),
    ("{pool: cpu, nodes: 2}", "  elastic: {minNodes: 1, maxNodes: 4, maxRestarts: 7}",
     {"Worker": 2}, {"rdzvBackend": "c10d", "rdzvId": "exp-train", "minReplicas": 1, "maxReplicas": 4, "maxRestarts": 7}),
    ("{pool: cpu, nodes: 1}", "  elastic: {minNodes: 1, maxNodes: 1}",
     {"Worker": 1}, {"rdzvBackend": "c10d", "rdzvId": "exp-train", "minReplicas": 1, "maxReplicas": 1, "maxRestarts": 3}),
])
def test_replica_layout(resources, elastic, expected, policy):
    obj = compile_one(job_yaml(resources=resources, extra=elastic))
    replicas = obj["spec"]["pytorchReplicaSpecs"]
    assert {k: v["replicas"] for k, v in replicas.items()} == expected
    assert all(v["restartPolicy"] == "ExitCode" for v in replicas.values())
    assert obj["spec"].get("elasticPolicy") == policy
    assert obj["metadata"]["name"] == "exp-train"
    assert obj["apiVersion"] == "kubeflow.org/v1" and obj["kind"] == "PyTorchJob"


@pytest.mark.parametrize("resources,nproc", [
    ("{pool: cpu}", "1"), ("{pool: h100, gpusPerNode: 8}", "8"), ("{pool: h100, gpusPerNode: 2}", "2"),
    ("{pool: cpu, procsPerNode: 4}", "4"), ("{pool: h100, gpusPerNode: 8, procsPerNode: 2}", "2"),
])
def test_nproc_per_node_is_a_string(resources, nproc):
    obj = compile_one(job_yaml(resources=resources))
    assert obj["spec"]["nprocPerNode"] == nproc
    metrics = [p for p in pod_of(obj)["containers"][0]["ports"] if p["name"].startswith("metrics")]
    # One metrics port per local rank: the runtime serves on monitoring.port + local rank.
    assert [p["containerPort"] for p in metrics] == [9464 + i for i in range(int(nproc))]


def test_container_command_and_ports():
    container = pod_of(compile_one(job_yaml()))["containers"][0]
    assert container["name"] == "pytorch"
    assert container["command"] == ["python", "-m", "ps3_platform.runtime.launch", "--module", "ps3_platform.runtime",
                                    "--spec", "/etc/ps3-platform/spec.yaml", "--stage", "train"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"pytorchjob-port": 23456, "metrics": 9464}


def test_default_image_is_the_platform_image_of_this_version():
    from ps3_platform import __version__

    assert pod_of(compile_one(job_yaml()))["containers"][0]["image"] == f"ghcr.io/ps3-platform/ps3-platform:{__version__}"
    assert pod_of(compile_one(job_yaml(), CompileOptions(image="x/y:1")))["containers"][0]["image"] == "x/y:1"
    assert pod_of(compile_one(job_yaml(extra="  image: a/b:2")))["containers"][0]["image"] == "a/b:2"


# ---- run policy and scheduling ----------------------------------------------------------
def test_run_policy_defaults():
    assert compile_one(job_yaml())["spec"]["runPolicy"] == {
        "backoffLimit": 6, "cleanPodPolicy": "Running", "ttlSecondsAfterFinished": 604800}


def test_run_policy_options():
    options = CompileOptions(backoff_limit=2, clean_pod_policy="All", ttl_seconds_after_finished=None)
    assert compile_one(job_yaml(), options)["spec"]["runPolicy"] == {"backoffLimit": 2, "cleanPodPolicy": "All"}


@pytest.mark.parametrize("field,value", [
    ("clean_pod_policy", "Sometimes"), ("restart_policy", "Maybe"), ("backoff_limit", -1),
    ("ttl_seconds_after_finished", -5), ("termination_grace_seconds", -1),
])
def test_bad_options_are_rejected(field, value):
    with pytest.raises(CompileError, match=r"\w"):
        CompileOptions(**{field: value})


@pytest.mark.parametrize("resources,elastic,scheduling,kueue", [
    ("{pool: cpu}", "", None, None),
    ("{pool: h100, gpusPerNode: 8}", "", {"priorityClass": "ps3-training"}, None),
    ("{pool: queued, gpusPerNode: 4}", "", {"queue": "gang-a"}, "team-a"),
    ("{pool: queued, gpusPerNode: 4, nodes: 2}", "  elastic: {minNodes: 2, maxNodes: 3}",
     {"queue": "gang-a", "minAvailable": 2}, "team-a"),
])
def test_pool_scheduling(resources, elastic, scheduling, kueue):
    obj = compile_one(job_yaml(resources=resources, extra=elastic))
    assert obj["spec"]["runPolicy"].get("schedulingPolicy") == scheduling
    assert obj["metadata"]["labels"].get("kueue.x-k8s.io/queue-name") == kueue
    rtype = "Worker" if elastic else "Master"
    # The Kueue label belongs on the job (Kueue's webhook reads it there), not on pods.
    assert "kueue.x-k8s.io/queue-name" not in obj["spec"]["pytorchReplicaSpecs"][rtype]["template"]["metadata"]["labels"]


def test_pool_placement_and_gpus():
    obj = compile_one(job_yaml(resources="{pool: h100, nodes: 2, gpusPerNode: 8, cpu: '96', memory: 900Gi}"))
    for rtype in ("Master", "Worker"):
        pod = pod_of(obj, rtype)
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert pod["priorityClassName"] == "ps3-training"
        assert pod["containers"][0]["resources"] == {
            "requests": {"cpu": "96", "memory": "900Gi", "nvidia.com/gpu": "8"},
            "limits": {"memory": "900Gi", "nvidia.com/gpu": "8"},
        }


def test_custom_gpu_resource_name():
    pod = pod_of(compile_one(job_yaml(resources="{pool: queued, gpusPerNode: 2}")))
    assert pod["containers"][0]["resources"] == {"requests": {"amd.com/gpu": "2"}, "limits": {"amd.com/gpu": "2"}}


def test_cpu_pool_has_no_gpu_request_and_no_placement():
    pod = pod_of(compile_one(job_yaml()))
    assert "resources" not in pod["containers"][0]
    assert not {"nodeSelector", "tolerations", "priorityClassName"} & set(pod)


# ---- pod security, storage, volumes -----------------------------------------------------
def test_restricted_security_context():
    pod = pod_of(compile_one(job_yaml()))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["containers"][0]["securityContext"] == {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True,
        "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (1000, 1000)
    assert pod["serviceAccountName"] == "ps3-platform-job"
    assert pod["terminationGracePeriodSeconds"] == 120


def test_shm_is_a_sized_memory_volume():
    pod = pod_of(compile_one(job_yaml(resources="{pool: cpu, shmSize: 32Gi}")))
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]


def test_read_only_root_leaves_tmp_and_home_writable():
    """Every path a worker writes is an emptyDir: the run directory under /tmp, caches under HOME."""
    pod = pod_of(compile_one(job_yaml()))
    container = pod["containers"][0]
    writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/tmp", "/home/ps3", "/dev/shm"}
    assert all("emptyDir" in v for v in pod["volumes"] if v["name"] in {"tmp", "home", "dshm"})
    assert {"name": "HOME", "value": "/home/ps3"} in container["env"]
    env = pod_of(compile_one(job_yaml(extra="  env: {HOME: /tmp/home}")))["containers"][0]["env"]
    assert [e["value"] for e in env if e["name"] == "HOME"] == ["/tmp/home"]  # a stage may choose its own


def test_storage_credentials_only_by_secret_reference():
    extra = "  storage: {credentialsSecret: my-s3, endpoint: 'http://s3.local:9000', region: eu-west-1}\n  env: {FOO: bar}"
    env = pod_of(compile_one(job_yaml(extra=extra)))["containers"][0]["env"]
    assert env == [
        {"name": "FOO", "value": "bar"},
        {"name": "HOME", "value": "/home/ps3"},
        {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": "110"},
        {"name": "AWS_ENDPOINT_URL", "value": "http://s3.local:9000"},
        {"name": "AWS_REGION", "value": "eu-west-1"},
        {"name": "AWS_DEFAULT_REGION", "value": "eu-west-1"},
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "my-s3", "key": "AWS_ACCESS_KEY_ID"}}},
        {"name": "AWS_SECRET_ACCESS_KEY",
         "valueFrom": {"secretKeyRef": {"name": "my-s3", "key": "AWS_SECRET_ACCESS_KEY"}}},
    ]


def test_agent_shutdown_timeout_leaves_the_workers_most_of_the_grace_period():
    def timeout_of(options=None, extra=""):
        env = pod_of(compile_one(job_yaml(extra=extra), options))["containers"][0]["env"]
        return [e["value"] for e in env if e["name"] == "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]

    assert timeout_of() == ["110"]
    assert timeout_of(CompileOptions(termination_grace_seconds=600)) == ["590"]
    assert timeout_of(extra="  env: {TORCH_ELASTIC_SHUTDOWN_TIMEOUT: '45'}") == ["45"]


def test_stop_grace_must_fit_in_the_pods_termination_grace():
    """A worker that waits for its upload longer than the pod lives is SIGKILLed mid-wait."""
    grace = "  checkpoint: {stopGraceSeconds: 115}"
    with pytest.raises(CompileError, match="stopGraceSeconds \\(115\\) must be below the 110 s"):
        compile_one(job_yaml(extra=grace))
    assert compile_one(job_yaml(extra=grace), CompileOptions(termination_grace_seconds=300))


def test_env_may_not_shadow_platform_storage_settings():
    with pytest.raises(CompileError, match="AWS_ENDPOINT_URL is set by the platform"):
        compile_one(job_yaml(extra="  env: {AWS_ENDPOINT_URL: 'http://x'}"))


def test_labels_on_job_and_pods():
    obj = compile_one(job_yaml(metadata=", labels: {team: vision}"))
    expected = {
        "app.kubernetes.io/name": "ps3-platform", "app.kubernetes.io/part-of": "ps3-platform",
        "app.kubernetes.io/component": "training", "app.kubernetes.io/managed-by": "platformctl",
        "ps3.platform/job": "exp", "ps3.platform/stage": "train", "team": "vision",
    }
    assert obj["metadata"]["labels"] == expected
    assert obj["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]["labels"] == expected


# ---- errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("text,message", [
    (job_yaml(resources="{pool: tpu}"), "pool 'tpu' does not exist"),
    (job_yaml(resources="{pool: cpu, gpusPerNode: 1}"), "has 0 GPUs per node"),
    (job_yaml(name="a" * 50, resources="{pool: cpu, nodes: 2}"), "exceeds 63 characters"),
    (job_yaml(name="1abc"), "must start with a letter"),
    (job_yaml(metadata=", labels: {ps3.platform/job: other}"), "reserved for the platform"),
    (job_yaml(metadata=", labels: {'bad key!': x}"), "not a valid label key"),
    (job_yaml(metadata=", labels: {team: 'no spaces'}"), "not a valid label value"),
    (job_yaml(metadata=", labels: {team: " + "x" * 64 + "}"), "not a valid label value"),
])
def test_compile_errors_are_one_line(text, message):
    with pytest.raises(CompileError, match=message) as info:
        compile_one(text)
    assert "\n" not in str(info.value)


def test_pipeline_stage_names_must_start_with_a_letter():
    text = """
apiVersion: ps3.platform/v1
kind: Pipeline
metadata: {name: p}
spec:
  stages:
    - {name: 1st, task: noop}
    - {name: second, task: noop, dependsOn: [1st]}
"""
    with pytest.raises(CompileError, match="must start with a letter"):
        compile_job(load_text(text).job, POOLS)


# ---- cluster warnings -------------------------------------------------------------------
@pytest.mark.parametrize("extra,expected", [
    ("  checkpoint: {uri: 's3://b/ckpt'}", []),
    ("", ["checkpoint.uri is not set"]),
    ("  checkpoint: {uri: 'file:///tmp/ckpt'}", ["is a path inside the pod"]),
    ("  checkpoint: {uri: 's3://b/ckpt'}\n  data: {sources: [{name: a, uri: 'file:///data/a'}, {name: b, uri: 's3://b/d'}]}",
     ["data source 'a' (file:///data/a) must exist inside the image"]),
    # globalBatch 64 over 4 procs per node at 3, 5, 6 or 7 nodes splits unevenly: nothing to warn about
    ("  checkpoint: {uri: 's3://b/ckpt'}\n  elastic: {minNodes: 2, maxNodes: 8}", []),
    ("  checkpoint: {uri: 's3://b/ckpt'}\n  elastic: {minNodes: 1, maxNodes: 2}", []),
])
def test_cluster_warnings(extra, expected):
    from ps3_platform.compile import cluster_warnings

    warnings = cluster_warnings(load_text(job_yaml(resources="{pool: cpu, nodes: 2, procsPerNode: 4}",
                                                   extra=extra)).job)
    assert len(warnings) == len(expected)
    for warning, fragment in zip(warnings, expected, strict=True):
        assert warning.startswith("stage 'train': ") and fragment in warning
