"""The Kubernetes backend against an HTTP double of the API server (exact requests).

The real `kubernetes` client talks HTTP to `k8s_double.ApiServerDouble` on loopback,
configured from a real kubeconfig file (token auth, context namespace). Tests assert the
exact method, path, query and JSON body of every request, so a change in what the
backend sends to a cluster shows up here.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import sys
from pathlib import Path

import pytest
from kubernetes.client.exceptions import ApiException
from ps3_platform.backends.base import BackendError, JobNotFoundError
from ps3_platform.backends.kubernetes import KubernetesBackend, api_error
from ps3_platform.backends.kubernetes.api import CONFIGMAP, PYTORCHJOB, WORKFLOW
from ps3_platform.backends.kubernetes.logs import split_lines
from ps3_platform.backends.kubernetes.status import parse_progress, pytorchjob_phase, ranked_pods
from ps3_platform.compile import compile_job
from ps3_platform.spec import PoolConfigError, load_pools, load_text, parse_pools


def _load_double():
    spec = importlib.util.spec_from_file_location("k8s_double", Path(__file__).with_name("k8s_double.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["k8s_double"] = module
    spec.loader.exec_module(module)
    return module


kd = _load_double()
NS = "team-a"
KF = f"/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs"
ARGO = f"/apis/argoproj.io/v1alpha1/namespaces/{NS}/workflows"
CM = f"/api/v1/namespaces/{NS}/configmaps"
NP = f"/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies"
PODS = f"/api/v1/namespaces/{NS}/pods"
FOREGROUND = {"propagationPolicy": "Foreground"}

TRAINING, PIPELINE = kd.TRAINING_SPEC, kd.PIPELINE_SPEC


def compiled(text: str, overrides: list[str] | None = None):
    job = load_text(text, overrides=overrides).job
    return job, compile_job(job, load_pools())


@pytest.fixture
def server():
    double = kd.ApiServerDouble().start()
    yield double
    double.stop()
    assert double.unexpected == [], "the backend called paths a cluster does not serve"


@pytest.fixture
def backend(server, tmp_path):
    kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
    return KubernetesBackend(config_file=str(kubeconfig), poll_s=0.01, delete_timeout_s=5)


def calls(server) -> list[tuple]:
    """(method, path, query, body) of every request so far."""
    return [tuple(r) for r in server.requests]


def writes(server) -> list[tuple]:
    return [c for c in calls(server) if c[0] != "GET"]


def with_ns(obj: dict) -> dict:
    return {**obj, "metadata": {**obj["metadata"], "namespace": NS}}


# ---- configuration ----------------------------------------------------------------------
def test_kubeconfig_gives_server_token_and_namespace(server, tmp_path):
    kubeconfig = str(server.write_kubeconfig(tmp_path / "kc"))
    assert KubernetesBackend(config_file=kubeconfig).namespace == NS
    assert KubernetesBackend(config_file=kubeconfig, context="other").namespace == "other-ns"
    assert KubernetesBackend(config_file=kubeconfig, namespace="mine").namespace == "mine"
    server.write_kubeconfig(tmp_path / "plain", namespace=None)
    assert KubernetesBackend(config_file=str(tmp_path / "plain")).namespace == "default"
    with pytest.raises(JobNotFoundError):
        KubernetesBackend(config_file=kubeconfig).status("nothing")
    assert server.requests[0].headers["authorization"] == "Bearer test-token"


def test_no_configuration_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(BackendError, match=r"no Kubernetes configuration: .* use --backend local"):
        KubernetesBackend()
    with pytest.raises(BackendError, match=r"^cannot use /\S+/missing context 'nope': Invalid kube-config file"):
        KubernetesBackend(config_file=str(tmp_path / "missing"), context="nope")


def test_in_cluster_fallback_uses_the_service_account_namespace(server, tmp_path, monkeypatch):
    """Inside a pod (no kubeconfig): the client's in-cluster loader, namespace from the SA mount."""
    from ps3_platform.backends.kubernetes import config as kconfig

    def fake_incluster(client_configuration):
        client_configuration.host = server.url
        client_configuration.api_key = {"authorization": f"Bearer {server.token}"}

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setattr(kconfig.config, "load_incluster_config", fake_incluster)
    (tmp_path / "ns").write_text("ml-jobs\n")
    monkeypatch.setattr(kconfig, "IN_CLUSTER_NAMESPACE", tmp_path / "ns")
    backend = KubernetesBackend()
    assert backend.namespace == "ml-jobs"
    with pytest.raises(JobNotFoundError, match="namespace 'ml-jobs'"):
        backend.status("exp")
    assert server.requests[-1].headers["authorization"] == "Bearer test-token"


def test_unknown_context_is_reported(server, tmp_path):
    kubeconfig = str(server.write_kubeconfig(tmp_path / "kc"))
    with pytest.raises(BackendError, match="context 'staging'"):
        KubernetesBackend(config_file=kubeconfig, context="staging")


# ---- pools ------------------------------------------------------------------------------
POOLS_YAML = "pools:\n  cpu: {}\n  h100: {gpusPerNode: 8, kueueQueue: research}\n"


def test_fetch_pools_reads_the_chart_configmap(server, backend):
    server.put(kd.CORE, NS, "configmaps", {"apiVersion": "v1", "kind": "ConfigMap",
                                          "metadata": {"name": "ps3-platform-pools"}, "data": {"pools.yaml": POOLS_YAML}})
    pools = backend.fetch_pools()
    assert pools.pools["h100"].kueue_queue == "research"
    assert backend.pools() == pools
    assert calls(server) == [("GET", f"{CM}/ps3-platform-pools", {}, None)] * 2


def test_fetch_pools_missing_or_broken(server, backend, tmp_path):
    with pytest.raises(BackendError, match=r"ConfigMap 'ps3-platform-pools' .* not found in namespace 'team-a'.*--pools"):
        backend.fetch_pools()
    server.put(kd.CORE, NS, "configmaps", {"metadata": {"name": "ps3-platform-pools"}, "data": {"pools.yaml": "pools: [1"}})
    with pytest.raises(PoolConfigError, match="configmap team-a/ps3-platform-pools"):
        backend.fetch_pools()
    local = tmp_path / "pools.yaml"
    local.write_text(POOLS_YAML)
    server.clear_requests()
    assert "h100" in backend.pools(str(local)).pools
    assert calls(server) == []  # --pools FILE does not touch the cluster


# ---- submit -----------------------------------------------------------------------------
def test_submit_training_job_exact_requests(server, backend):
    job, objects = compiled(TRAINING)
    cm, policy, pj = objects
    result = backend.submit(job, objects)
    assert result.created
    assert result.message == ("job 'exp' created in namespace 'team-a': ConfigMap exp-spec, NetworkPolicy exp-pods, "
                              "PyTorchJob exp-train")
    uid = server.get(kd.KUBEFLOW, NS, "pytorchjobs", "exp-train")["metadata"]["uid"]
    owner = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "name": "exp-train", "uid": uid,
             "blockOwnerDeletion": False}
    assert calls(server) == [
        ("GET", f"{KF}/exp-train", {}, None),
        ("GET", f"{CM}/exp-spec", {}, None),
        ("POST", CM, {}, with_ns(cm)),
        ("POST", NP, {}, with_ns(policy)),
        ("POST", KF, {}, with_ns(pj)),
        ("PATCH", f"{CM}/exp-spec", {}, {"metadata": {"ownerReferences": [owner]}}),
        ("PATCH", f"{NP}/exp-pods", {}, {"metadata": {"ownerReferences": [owner]}}),
    ]
    assert server.requests[-1].headers["content-type"] == "application/strategic-merge-patch+json"


def test_submit_uses_the_namespace_the_objects_name(server, backend):
    job = load_text(TRAINING).job
    objects = compile_job(job, load_pools(), namespace="vision")
    backend.submit(job, objects)
    assert [c[1] for c in writes(server)] == ["/api/v1/namespaces/vision/configmaps",
                                              "/apis/networking.k8s.io/v1/namespaces/vision/networkpolicies",
                                              "/apis/kubeflow.org/v1/namespaces/vision/pytorchjobs",
                                              "/api/v1/namespaces/vision/configmaps/exp-spec",
                                              "/apis/networking.k8s.io/v1/namespaces/vision/networkpolicies/exp-pods"]


def test_resubmit_same_spec_is_unchanged_and_writes_nothing(server, backend):
    job, objects = compiled(TRAINING)
    backend.submit(job, objects)
    server.clear_requests()
    again = backend.submit(*compiled(TRAINING))
    assert not again.created
    assert again.message == "job 'exp' already exists in namespace 'team-a', unchanged"
    assert calls(server) == [("GET", f"{KF}/exp-train", {}, None)]


def test_resubmit_changed_spec_needs_replace(server, backend):
    backend.submit(*compiled(TRAINING))
    server.clear_requests()
    with pytest.raises(BackendError, match=r"already exists in namespace 'team-a' with a different spec .*--replace"):
        backend.submit(*compiled(TRAINING, ["spec.train.steps=2000"]))
    assert writes(server) == []


def test_replace_deletes_waits_for_foreground_deletion_and_recreates(server, backend):
    backend.submit(*compiled(TRAINING))
    server.clear_requests()
    server.linger_reads = 2  # deleted objects stay visible (deletionTimestamp set) for two reads
    job, objects = compiled(TRAINING, ["spec.train.steps=2000"])
    result = backend.submit(job, objects, replace=True)
    assert result.created and result.message.startswith("job 'exp' replaced in namespace 'team-a'")
    assert [c[:2] for c in calls(server)] == [
        ("GET", f"{KF}/exp-train"),
        ("GET", f"{CM}/exp-spec"),
        ("GET", KF),
        ("DELETE", f"{KF}/exp-train"),
        ("DELETE", f"{NP}/exp-pods"),
        ("DELETE", f"{CM}/exp-spec"),
        ("GET", f"{KF}/exp-train"), ("GET", f"{KF}/exp-train"), ("GET", f"{KF}/exp-train"),
        ("GET", f"{NP}/exp-pods"), ("GET", f"{NP}/exp-pods"), ("GET", f"{NP}/exp-pods"),
        ("GET", f"{CM}/exp-spec"), ("GET", f"{CM}/exp-spec"), ("GET", f"{CM}/exp-spec"),
        ("POST", CM), ("POST", NP), ("POST", KF), ("PATCH", f"{CM}/exp-spec"), ("PATCH", f"{NP}/exp-pods"),
    ]
    deletes = [c for c in calls(server) if c[0] == "DELETE"]
    assert all(body == FOREGROUND for *_, body in deletes)
    assert calls(server)[2][2] == {"labelSelector": "ps3.platform/job=exp"}
    stored = server.get(kd.KUBEFLOW, NS, "pytorchjobs", "exp-train")
    assert stored["metadata"]["annotations"] == objects[2]["metadata"]["annotations"]


def test_replace_of_a_pipeline_waits_for_its_stage_jobs(server, backend):
    """Argo would fail to create `pipe-prep` while the old one is still terminating."""
    backend.submit(*compiled(PIPELINE))
    server.put(kd.KUBEFLOW, NS, "pytorchjobs", {"metadata": {"name": "pipe-prep", "labels": {"ps3.platform/job": "pipe"}}})
    server.clear_requests()
    server.linger_reads = 1
    backend.submit(*compiled(PIPELINE, ["spec.stages.0.train.steps=5"]), replace=True)
    assert [c[:2] for c in calls(server)] == [
        ("GET", f"{ARGO}/pipe"), ("GET", f"{CM}/pipe-spec"), ("GET", KF),
        ("DELETE", f"{ARGO}/pipe"), ("DELETE", f"{KF}/pipe-prep"), ("DELETE", f"{NP}/pipe-pods"),
        ("DELETE", f"{CM}/pipe-spec"),
        ("GET", f"{ARGO}/pipe"), ("GET", f"{ARGO}/pipe"),
        ("GET", f"{KF}/pipe-prep"), ("GET", f"{KF}/pipe-prep"),
        ("GET", f"{NP}/pipe-pods"), ("GET", f"{NP}/pipe-pods"),
        ("GET", f"{CM}/pipe-spec"), ("GET", f"{CM}/pipe-spec"),
        ("POST", CM), ("POST", NP), ("POST", ARGO), ("PATCH", f"{CM}/pipe-spec"), ("PATCH", f"{NP}/pipe-pods"),
    ]


def test_replace_times_out_when_deletion_hangs(server, tmp_path):
    backend = KubernetesBackend(config_file=str(server.write_kubeconfig(tmp_path / "kc")), poll_s=0.01,
                                delete_timeout_s=0.05)
    backend.submit(*compiled(TRAINING))
    server.linger_reads = 10_000
    with pytest.raises(BackendError, match="timed out after 0s waiting for PyTorchJob 'exp-train' to be deleted"):
        backend.submit(*compiled(TRAINING, ["spec.train.steps=2000"]), replace=True)


def test_submit_pipeline_creates_the_workflow(server, backend):
    job, objects = compiled(PIPELINE)
    cm, policy, wf = objects
    result = backend.submit(job, objects)
    assert result.message == ("job 'pipe' created in namespace 'team-a': ConfigMap pipe-spec, NetworkPolicy pipe-pods, "
                              "Workflow pipe")
    uid = server.get(kd.ARGO, NS, "workflows", "pipe")["metadata"]["uid"]
    owner = {"metadata": {"ownerReferences": [{"apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow", "name": "pipe",
                                               "uid": uid, "blockOwnerDeletion": False}]}}
    assert calls(server) == [
        ("GET", f"{ARGO}/pipe", {}, None),
        ("GET", f"{CM}/pipe-spec", {}, None),
        ("POST", CM, {}, with_ns(cm)),
        ("POST", NP, {}, with_ns(policy)),
        ("POST", ARGO, {}, with_ns(wf)),
        ("PATCH", f"{CM}/pipe-spec", {}, owner),
        ("PATCH", f"{NP}/pipe-pods", {}, owner),
    ]


def test_a_job_of_another_kind_with_the_same_name_conflicts(server, backend):
    backend.submit(*compiled(PIPELINE))
    training = TRAINING.replace("name: exp", "name: pipe")
    with pytest.raises(BackendError, match="'pipe' already exists .* different spec"):
        backend.submit(*compiled(training))


def test_leftover_configmap_is_replaced(server, backend):
    job, objects = compiled(TRAINING)
    server.put(kd.CORE, NS, "configmaps", {"metadata": {"name": "exp-spec"}, "data": {"spec.yaml": "old"}})
    server.clear_requests()
    backend.submit(job, objects)
    assert [c[:2] for c in writes(server)] == [("POST", CM), ("PUT", f"{CM}/exp-spec"), ("POST", NP), ("POST", KF),
                                               ("PATCH", f"{CM}/exp-spec"), ("PATCH", f"{NP}/exp-pods")]
    assert server.get(kd.CORE, NS, "configmaps", "exp-spec")["data"] == objects[0]["data"]


@pytest.mark.parametrize("spec,missing,message", [
    (TRAINING, kd.KUBEFLOW, "PyTorchJob CRD not installed in cluster: install the Kubeflow training operator or "
                            "`helm install ps3-platform --set trainingOperator.install=true`"),
    (PIPELINE, kd.ARGO, "Argo Workflow CRD not installed in cluster: Pipelines need Argo Workflows"),
])
def test_missing_crd_is_named(server, backend, spec, missing, message):
    server.installed.discard(missing)
    with pytest.raises(BackendError) as info:
        backend.submit(*compiled(spec))
    assert str(info.value).startswith(message)
    assert writes(server) == []
    server.unexpected.clear()


def test_forbidden_create_names_verb_and_resource_and_cleans_up(server, backend):
    server.forbidden.add(("create", "pytorchjobs"))
    with pytest.raises(BackendError) as info:
        backend.submit(*compiled(TRAINING))
    assert str(info.value) == (
        "permission denied: cannot create pytorchjobs.kubeflow.org in namespace 'team-a' (pytorchjobs.kubeflow.org is "
        'forbidden: User "alice" cannot create resource "pytorchjobs" in API group "kubeflow.org" in the namespace '
        "\"team-a\"); ask a cluster admin for a Role that allows 'create' on pytorchjobs.kubeflow.org")
    assert [c[:2] for c in writes(server)] == [("POST", CM), ("POST", NP), ("POST", KF), ("DELETE", f"{CM}/exp-spec"),
                                               ("DELETE", f"{NP}/exp-pods")]
    assert server.get(kd.CORE, NS, "configmaps", "exp-spec") is None
    assert server.get(kd.NETWORKING, NS, "networkpolicies", "exp-pods") is None


def test_owner_reference_failure_is_a_warning(server, backend):
    server.forbidden.add(("patch", "configmaps"))
    result = backend.submit(*compiled(TRAINING))
    assert result.created
    assert "warning: ConfigMap exp-spec will not be garbage-collected: permission denied: cannot patch" in result.message


def test_bad_token_is_unauthorized(server, tmp_path):
    kubeconfig = server.write_kubeconfig(tmp_path / "kc")
    server.token = "rotated"
    with pytest.raises(BackendError, match="unauthorized: the API server rejected your credentials"):
        KubernetesBackend(config_file=str(kubeconfig)).status("exp")


def test_unreachable_server(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    double = kd.ApiServerDouble()
    double._server = type("S", (), {"server_address": ("127.0.0.1", port)})()
    kubeconfig = double.write_kubeconfig(tmp_path / "kc")
    with pytest.raises(BackendError, match=rf"cannot reach the Kubernetes API server at http://127.0.0.1:{port}"):
        KubernetesBackend(config_file=str(kubeconfig)).list()


# ---- status -----------------------------------------------------------------------------
@pytest.mark.parametrize("phase,workers", [
    ("Created", 0), ("Running", 2), ("Restarting", 1), ("Succeeded", 0), ("Failed", 0), ("Suspended", 0),
])
def test_status_from_pytorchjob_conditions(server, backend, phase, workers):
    backend.submit(*compiled(TRAINING))
    server.set_status(kd.KUBEFLOW, NS, "pytorchjobs", "exp-train", kd.pytorchjob_status("exp-train", phase, workers=1))
    server.clear_requests()
    status = backend.status("exp")
    assert (status.name, status.kind, status.backend, status.phase) == ("exp", "TrainingJob", "kubernetes", phase)
    (stage,) = status.stages
    assert (stage.name, stage.phase, stage.total_steps) == ("train", phase, 1000)
    assert (stage.workers or 0) == workers
    assert status.conditions[-1]["type"] == phase and status.conditions[-1]["status"] == "True"
    assert status.done == (phase in ("Succeeded", "Failed"))
    assert status.checkpoints == "s3://ckpt/runs/exp"
    assert status.created == 1795503600.0  # 2026-11-24T07:00:00Z
    assert status.finished == (1795507200.0 if phase in ("Succeeded", "Failed") else None)
    expected = [("GET", f"{CM}/exp-spec", {}, None), ("GET", KF, {"labelSelector": "ps3.platform/job=exp"}, None)]
    if phase in ("Created", "Running", "Restarting"):  # why pods wait; progress: the rank-0 pod's log tail
        expected.append(("GET", PODS, {"labelSelector": "training.kubeflow.org/job-name=exp-train"}, None))
    if phase == "Created":  # no pods yet: the operator's events on the job say why
        expected.append(("GET", f"/api/v1/namespaces/{NS}/events", {"fieldSelector": "involvedObject.name=exp-train"},
                         None))
    assert calls(server) == expected
    json.dumps(status.to_dict())


def test_status_before_the_operator_reports_is_pending(server, backend):
    backend.submit(*compiled(TRAINING))
    assert backend.status("exp").phase == "Pending"


def test_status_progress_from_the_rank0_log(server, backend):
    backend.submit(*compiled(TRAINING))
    server.set_status(kd.KUBEFLOW, NS, "pytorchjobs", "exp-train", kd.pytorchjob_status("exp-train", "Running"))
    log = ["2026-11-24 07:10:00,000 [rank0] INFO step 10/1000 loss 2.5000 lr 1.00e-04 60.0 samples/s",
           "2026-11-24 07:11:00,000 [rank0] INFO step 250/1000 loss 1.2345 lr 9.00e-05 64.0 samples/s",
           "2026-11-24 07:11:01,000 [rank0] INFO checkpoint step 250 committed"]
    server.add_pod(NS, "exp-train", "worker", 0, logs=["worker noise"])
    server.add_pod(NS, "exp-train", "master", 0, logs=log)
    server.clear_requests()
    (stage,) = backend.status("exp").stages
    assert (stage.step, stage.total_steps, stage.loss, stage.samples_per_s) == (250, 1000, 1.2345, 64.0)
    assert stage.eta_s == pytest.approx(750 * 32 / 64.0)
    assert calls(server)[-1] == ("GET", f"{PODS}/exp-train-master-0/log",
                                 {"container": "pytorch", "tailLines": "200"}, None)


def test_status_progress_needs_no_log_permission(server, backend):
    backend.submit(*compiled(TRAINING))
    server.set_status(kd.KUBEFLOW, NS, "pytorchjobs", "exp-train", kd.pytorchjob_status("exp-train", "Running"))
    server.add_pod(NS, "exp-train", "master", 0, logs=["step 1/2 loss 1.0 lr 1e-3 5.0 samples/s"])
    server.forbidden.add(("list", "pods"))
    status = backend.status("exp")
    assert status.phase == "Running" and status.stages[0].step is None


def test_status_of_a_pipeline(server, backend):
    backend.submit(*compiled(PIPELINE))
    server.set_status(kd.ARGO, NS, "workflows", "pipe", kd.workflow_status("Running"))
    labels = {"ps3.platform/job": "pipe", "ps3.platform/stage": "prep", "app.kubernetes.io/managed-by": "platformctl"}
    server.put(kd.KUBEFLOW, NS, "pytorchjobs", {
        "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
        "metadata": {"name": "pipe-prep", "labels": labels, "annotations": {"ps3.platform/kind": "Pipeline"}},
        "spec": {}, "status": kd.pytorchjob_status("pipe-prep", "Succeeded", workers=0)})
    server.clear_requests()
    status = backend.status("pipe")
    assert (status.kind, status.phase) == ("Pipeline", "Running")
    assert [(s.name, s.phase, s.total_steps) for s in status.stages] == [("prep", "Succeeded", 1), ("fit", "Pending", 50)]
    assert calls(server) == [
        ("GET", f"{CM}/pipe-spec", {}, None),
        ("GET", KF, {"labelSelector": "ps3.platform/job=pipe"}, None),
        ("GET", f"{ARGO}/pipe", {}, None),
    ]
    server.set_status(kd.ARGO, NS, "workflows", "pipe", kd.workflow_status("Error"))
    status = backend.status("pipe")
    assert status.phase == "Failed" and status.finished is not None
    assert [(s.name, s.phase) for s in status.stages] == [("prep", "Succeeded"), ("fit", "Skipped")]


def test_status_of_an_unknown_job(server, backend):
    with pytest.raises(JobNotFoundError, match="job 'nope' not found in namespace 'team-a'"):
        backend.status("nope")


def test_list_groups_objects_by_job(server, backend):
    backend.submit(*compiled(TRAINING))
    backend.submit(*compiled(PIPELINE))
    server.set_status(kd.KUBEFLOW, NS, "pytorchjobs", "exp-train", kd.pytorchjob_status("exp-train", "Running"))
    server.clear_requests()
    jobs = backend.list()
    assert [(j.name, j.kind, j.phase) for j in jobs] == [("exp", "TrainingJob", "Running"), ("pipe", "Pipeline", "Pending")]
    managed = "app.kubernetes.io/managed-by=platformctl"
    assert calls(server) == [
        ("GET", CM, {"labelSelector": f"{managed},app.kubernetes.io/component=spec"}, None),
        ("GET", KF, {"labelSelector": managed}, None),
        ("GET", ARGO, {"labelSelector": managed}, None),
    ]


def test_list_without_argo_still_lists_training_jobs(server, backend):
    backend.submit(*compiled(TRAINING))
    server.installed.discard(kd.ARGO)
    assert [j.name for j in backend.list()] == ["exp"]
    server.unexpected.clear()


def test_list_without_the_training_operator_says_so(server, backend):
    server.installed.discard(kd.KUBEFLOW)
    with pytest.raises(BackendError, match="PyTorchJob CRD not installed"):
        backend.list()
    server.unexpected.clear()


# ---- logs -------------------------------------------------------------------------------
@pytest.fixture
def running(server, backend):
    backend.submit(*compiled(TRAINING))
    server.add_pod(NS, "exp-train", "master", 0, logs=["m line 1", "m line 2"])
    server.add_pod(NS, "exp-train", "worker", 0, logs=["w line 1"])
    server.clear_requests()
    return backend


def test_logs_of_every_rank_are_prefixed(server, running):
    assert list(running.logs("exp")) == ["[rank 0] m line 1\n", "[rank 0] m line 2\n", "[rank 1] w line 1\n"]
    assert calls(server) == [
        ("GET", KF, {"labelSelector": "ps3.platform/job=exp"}, None),
        ("GET", PODS, {"labelSelector": "training.kubeflow.org/job-name=exp-train"}, None),
        ("GET", f"{PODS}/exp-train-master-0/log", {"container": "pytorch"}, None),
        ("GET", f"{PODS}/exp-train-worker-0/log", {"container": "pytorch"}, None),
    ]


def test_logs_of_one_rank(server, running):
    assert list(running.logs("exp", stage="train", rank=1)) == ["w line 1\n"]
    assert calls(server)[-1] == ("GET", f"{PODS}/exp-train-worker-0/log", {"container": "pytorch"}, None)
    with pytest.raises(BackendError, match="has no rank 5"):
        running.logs("exp", rank=5)


def test_logs_follow_reassembles_lines(server, running):
    server.pod_logs[(NS, "exp-train-master-0")] = [f"step {i} of a longer line" for i in range(20)]
    lines = list(running.logs("exp", rank=0, follow=True))
    assert lines == [f"step {i} of a longer line\n" for i in range(20)]
    assert calls(server)[-1] == ("GET", f"{PODS}/exp-train-master-0/log", {"container": "pytorch", "follow": "true"}, None)


def test_logs_follow_every_rank_at_once(server, running):
    lines = list(running.logs("exp", follow=True))
    assert sorted(lines) == ["[rank 0] m line 1\n", "[rank 0] m line 2\n", "[rank 1] w line 1\n"]
    assert lines.index("[rank 0] m line 1\n") < lines.index("[rank 0] m line 2\n")


def test_logs_errors(server, running):
    server.add_pod(NS, "exp-train", "worker", 1, phase="Pending")
    with pytest.raises(BackendError, match='container "pytorch" in pod "exp-train-worker-1" is waiting to start'):
        list(running.logs("exp", rank=2))
    with pytest.raises(JobNotFoundError, match="job 'exp' has no stage 'eval'"):
        running.logs("exp", stage="eval")
    with pytest.raises(JobNotFoundError, match="job 'other' has no started stage"):
        running.logs("other")


def test_logs_before_pods_exist(server, backend):
    backend.submit(*compiled(TRAINING))
    with pytest.raises(BackendError, match="stage 'train' of job 'exp' has no pods yet"):
        backend.logs("exp")


def test_logs_default_to_the_newest_stage_of_a_pipeline(server, backend):
    backend.submit(*compiled(PIPELINE))
    for stage, created in (("prep", "2026-11-24T07:00:00Z"), ("fit", "2026-11-24T07:30:00Z")):
        server.put(kd.KUBEFLOW, NS, "pytorchjobs", {"metadata": {
            "name": f"pipe-{stage}", "creationTimestamp": created,
            "labels": {"ps3.platform/job": "pipe", "ps3.platform/stage": stage}}})
        server.add_pod(NS, f"pipe-{stage}", "master", 0, logs=[f"{stage} says hi"])
    assert list(backend.logs("pipe")) == ["fit says hi\n"]
    assert list(backend.logs("pipe", stage="prep")) == ["prep says hi\n"]


# ---- cancel -----------------------------------------------------------------------------
def test_cancel_training_job(server, backend):
    backend.submit(*compiled(TRAINING))
    server.clear_requests()
    message = backend.cancel("exp")
    assert message == ("job 'exp' cancelled in namespace 'team-a': deleted PyTorchJob exp-train, NetworkPolicy exp-pods, "
                       "ConfigMap exp-spec")
    assert calls(server) == [
        ("GET", f"{CM}/exp-spec", {}, None),
        ("GET", KF, {"labelSelector": "ps3.platform/job=exp"}, None),
        ("DELETE", f"{KF}/exp-train", {}, FOREGROUND),
        ("DELETE", f"{NP}/exp-pods", {}, FOREGROUND),
        ("DELETE", f"{CM}/exp-spec", {}, FOREGROUND),
    ]
    with pytest.raises(JobNotFoundError, match="job 'exp' not found"):
        backend.status("exp")


def test_cancel_pipeline_deletes_the_workflow_first(server, backend):
    backend.submit(*compiled(PIPELINE))
    server.put(kd.KUBEFLOW, NS, "pytorchjobs", {"metadata": {"name": "pipe-prep", "labels": {"ps3.platform/job": "pipe"}}})
    server.clear_requests()
    assert backend.cancel("pipe").endswith(
        "deleted Workflow pipe, PyTorchJob pipe-prep, NetworkPolicy pipe-pods, ConfigMap pipe-spec")
    assert [c[:2] for c in calls(server) if c[0] == "DELETE"] == [
        ("DELETE", f"{ARGO}/pipe"), ("DELETE", f"{KF}/pipe-prep"), ("DELETE", f"{NP}/pipe-pods"),
        ("DELETE", f"{CM}/pipe-spec")]


def test_cancel_unknown_job(server, backend):
    with pytest.raises(JobNotFoundError, match="job 'ghost' not found in namespace 'team-a'"):
        backend.cancel("ghost")


# ---- pure parts -------------------------------------------------------------------------
def _exc(status: int, body) -> ApiException:
    return ApiException(status=status, reason="reason", body=body if isinstance(body, str) else json.dumps(body))


@pytest.mark.parametrize("exc,verb,res,expected", [
    (_exc(404, "404 page not found"), "get", PYTORCHJOB, "PyTorchJob CRD not installed in cluster"),
    (_exc(404, kd.status_body(404, "NotFound", "the server could not find the requested resource")), "list", WORKFLOW,
     "Argo Workflow CRD not installed"),
    (_exc(404, kd.status_body(404, "NotFound", 'pytorchjobs.kubeflow.org "x" not found', {"name": "x"})), "get",
     PYTORCHJOB, "PyTorchJob 'x' not found in namespace 'ns'"),
    (_exc(404, kd.status_body(404, "NotFound", 'namespaces "ns" not found', {"name": "ns", "kind": "namespaces"})),
     "create", CONFIGMAP, "namespace 'ns' does not exist"),
    (_exc(403, kd.status_body(403, "Forbidden", "nope")), "delete", WORKFLOW,
     "permission denied: cannot delete workflows.argoproj.io in namespace 'ns' (nope)"),
    (_exc(422, kd.status_body(422, "Invalid", 'PyTorchJob "x" is invalid: spec: Required value')), "create",
     PYTORCHJOB, "the API server rejected PyTorchJob 'x': PyTorchJob \"x\" is invalid: spec: Required value"),
    (_exc(500, kd.status_body(500, "InternalError", "etcd\nleader changed")), "get", CONFIGMAP,
     "get ConfigMap 'x' in namespace 'ns' failed: HTTP 500 reason: etcd leader changed"),
])
def test_api_errors_are_one_line(exc, verb, res, expected):
    message = str(api_error(exc, verb, res, None if verb in ("list",) else "x", "ns"))
    assert message.startswith(expected)
    assert "\n" not in message


@pytest.mark.parametrize("conditions,phase", [
    ([], "Pending"),
    ([("Created", "True")], "Created"),
    ([("Created", "True"), ("Running", "True")], "Running"),
    ([("Created", "True"), ("Restarting", "True")], "Restarting"),
    ([("Created", "True"), ("Running", "False"), ("Succeeded", "True")], "Succeeded"),
    ([("Created", "True"), ("Running", "False"), ("Failed", "True")], "Failed"),
    ([("Created", "True"), ("Running", "False"), ("Suspended", "True")], "Suspended"),
    ([("Created", "True"), ("Suspended", "False"), ("Running", "True")], "Running"),  # resumed
])
def test_last_true_condition_wins(conditions, phase):
    obj = {"status": {"conditions": [{"type": t, "status": s} for t, s in conditions]}}
    assert pytorchjob_phase(obj)[0] == phase


def test_ranks_follow_the_operator_numbering():
    def pod(rtype, index):
        return {"metadata": {"name": f"j-{rtype}-{index}", "labels": {
            "training.kubeflow.org/replica-type": rtype, "training.kubeflow.org/replica-index": str(index)}}}

    with_master = [pod("worker", 1), pod("master", 0), pod("worker", 0)]
    assert [(r, p["metadata"]["name"]) for r, p in ranked_pods(with_master)] == [
        (0, "j-master-0"), (1, "j-worker-0"), (2, "j-worker-1")]
    elastic = [pod("worker", 1), pod("worker", 0)]
    assert [r for r, _ in ranked_pods(elastic)] == [0, 1]


def test_split_lines_and_progress_parsing():
    assert list(split_lines([b"ab", b"c\nde", b"f\n\ng"])) == ["abc\n", "def\n", "\n", "g\n"]
    assert parse_progress("no progress here") is None
    assert parse_progress("step 3/9 loss nan lr 1.00e-04 12.5 samples/s")["step"] == 3


# ---- platformctl end to end against the double --------------------------------------------
def test_platformctl_submit_status_logs_cancel(server, tmp_path, monkeypatch, capsys):
    """The CLI wiring: backend chosen from $KUBECONFIG, pools from the cluster ConfigMap."""
    from ps3_platform.cli import main

    monkeypatch.setenv("KUBECONFIG", str(server.write_kubeconfig(tmp_path / "kubeconfig")))
    server.put(kd.CORE, NS, "configmaps", {"metadata": {"name": "ps3-platform-pools"}, "data": {"pools.yaml": POOLS_YAML}})
    spec = tmp_path / "exp.yaml"
    spec.write_text(TRAINING)
    assert main(["submit", str(spec)]) == 0
    out, err = capsys.readouterr()
    assert "backend: kubernetes" in err
    assert out.strip() == "job 'exp' created in namespace 'team-a': ConfigMap exp-spec, PyTorchJob exp-train"
    server.set_status(kd.KUBEFLOW, NS, "pytorchjobs", "exp-train", kd.pytorchjob_status("exp-train", "Succeeded"))
    assert main(["status", "exp", "-o", "json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["phase"], status["stages"][0]["phase"]) == ("Succeeded", "Succeeded")
    server.add_pod(NS, "exp-train", "master", 0, phase="Succeeded", logs=["done"])
    assert main(["logs", "exp", "--rank", "0"]) == 0
    assert capsys.readouterr().out == "done\n"
    assert main(["cancel", "exp"]) == 0
    assert "deleted PyTorchJob exp-train, ConfigMap exp-spec" in capsys.readouterr().out
    assert main(["status", "exp"]) == 1
    assert "error: job 'exp' not found in namespace 'team-a'" in capsys.readouterr().err


def test_without_job_network_policies_only_the_configmap_is_created(server, backend):
    """Clusters whose chart has networkPolicy.enabled=false: no policy, and cancel does not ask for one."""
    job = load_text(TRAINING).job
    objects = compile_job(job, parse_pools(POOLS_YAML + "\njobNetworkPolicies: false\n", "test"))
    assert [o["kind"] for o in objects] == ["ConfigMap", "PyTorchJob"]
    backend.submit(job, objects)
    backend.cancel("exp")
    assert not [c for c in calls(server) if "networkpolicies" in c[1]]


CURATE = """
apiVersion: ps3.platform/v1
kind: TrainingJob
metadata: {name: cur}
spec:
  task: curate
  resources: {pool: cpu}
  checkpoint: {uri: "CKPT"}
  params:
    output: file:///data/curated
    sources: [{name: web, kind: natural, uri: "file:///raw/*.jpg"}]
"""


def test_status_shows_the_summary_a_finished_curate_stage_left_beside_its_checkpoints(server, backend, tmp_path):
    spec = CURATE.replace("CKPT", f"file://{tmp_path}/ckpt")
    backend.submit(*compiled(spec))
    server.set_status(kd.KUBEFLOW, NS, "pytorchjobs", "cur-train", kd.pytorchjob_status("cur-train", "Running"))
    record = tmp_path / "ckpt" / "cur" / "train" / "curation.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"sources": {"web": {"inputs": 3, "images": 2}}, "failures": {"no_masks": 1}}))
    assert backend.status("cur").curation == {}  # still running: progress, not a summary
    server.set_status(kd.KUBEFLOW, NS, "pytorchjobs", "cur-train", kd.pytorchjob_status("cur-train", "Succeeded"))
    status = backend.status("cur")
    assert status.curation == {"train": {"sources": {"web": {"inputs": 3, "images": 2}}, "failures": {"no_masks": 1}}}
    record.unlink()  # a store this machine cannot read: no summary, no error
    assert backend.status("cur").curation == {}


def test_status_reads_the_record_rank0_leaves_beside_the_checkpoints(server, backend, tmp_path):
    """Progress, ETA and what the last restart cost come from the workers' progress.json (not a
    log regex); a finished stage's eval.json shows as the job's evaluation."""
    backend.submit(*compiled(TRAINING.replace("s3://ckpt/runs", f"file://{tmp_path}/ckpt")))
    server.set_status(kd.KUBEFLOW, NS, "pytorchjobs", "exp-train", kd.pytorchjob_status("exp-train", "Running"))
    server.add_pod(NS, "exp-train", "master", 0, logs=["step 1/1000 loss 9.0 lr 1e-3 5.0 samples/s"])
    stage_dir = tmp_path / "ckpt" / "exp" / "train"
    stage_dir.mkdir(parents=True)
    (stage_dir / "progress.json").write_text(json.dumps(
        {"step": 420, "total_steps": 1000, "loss": 0.75, "samples_per_s": 80.0, "eta_s": 1234.5, "committed_step": 400,
         "restarts": 1, "restart_to_first_step_s": 41.5, "lost_steps": 17}))
    (stage,) = backend.status("exp").stages
    assert (stage.step, stage.loss, stage.samples_per_s, stage.eta_s) == (420, 0.75, 80.0, 1234.5)
    assert (stage.restart_to_first_step_s, stage.lost_steps) == (41.5, 17)
    (stage_dir / "eval.json").write_text(json.dumps({"accuracy": 0.5}))
    assert backend.status("exp").eval == {}  # still running
    server.set_status(kd.KUBEFLOW, NS, "pytorchjobs", "exp-train", kd.pytorchjob_status("exp-train", "Succeeded"))
    status = backend.status("exp")
    assert status.eval == {"accuracy": 0.5} and status.stages[0].eta_s is None
    (stage_dir / "progress.json").write_text("{torn")  # unreadable: back to the rank-0 log
    server.set_status(kd.KUBEFLOW, NS, "pytorchjobs", "exp-train", kd.pytorchjob_status("exp-train", "Running"))
    assert backend.status("exp").stages[0].step == 1


def test_waiting_pods_say_why(server, backend):
    backend.submit(*compiled(TRAINING))
    server.set_status(kd.KUBEFLOW, NS, "pytorchjobs", "exp-train", kd.pytorchjob_status("exp-train", "Created"))
    master = server.add_pod(NS, "exp-train", "master", 0, phase="Pending")
    master["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                       "message": "0/8 nodes are available: 8 Insufficient nvidia.com/gpu."}]
    server.put(kd.CORE, NS, "pods", master)
    worker = server.add_pod(NS, "exp-train", "worker", 0, phase="Pending")
    worker["status"]["containerStatuses"] = [{"name": "pytorch", "state": {"waiting": {
        "reason": "ImagePullBackOff", "message": "Back-off pulling image \"ghcr.io/ps3-platform/ps3-platform:0.1.0\""}}}]
    server.put(kd.CORE, NS, "pods", worker)
    (stage,) = backend.status("exp").stages
    assert stage.message == ("waiting: exp-train-master-0 unschedulable: 0/8 nodes are available: 8 Insufficient "
                             "nvidia.com/gpu. (+1 more)")
    del server.collection(kd.CORE, NS, "pods")["exp-train-master-0"]
    assert backend.status("exp").stages[0].message.startswith(
        "waiting: exp-train-worker-0 image pull (ImagePullBackOff): Back-off pulling image")


def test_pods_the_operator_cannot_create_say_why(server, backend):
    backend.submit(*compiled(TRAINING))
    server.set_status(kd.KUBEFLOW, NS, "pytorchjobs", "exp-train", kd.pytorchjob_status("exp-train", "Created"))
    assert not backend.status("exp").stages[0].message.startswith("waiting")  # no pods, no events yet
    job = server.get(kd.KUBEFLOW, NS, "pytorchjobs", "exp-train")
    server.add_event(NS, job, "SuccessfulCreateService", "Created service: exp-train-master-0", type="Normal")
    server.add_event(NS, job, "FailedCreatePod", 'Error creating: pods "exp-train-master-0" is forbidden: exceeded '
                     "quota: gpu-quota, requested: requests.nvidia.com/gpu=8, used: 8, limited: 8")
    (stage,) = backend.status("exp").stages
    assert stage.message == ('waiting: quota: Error creating: pods "exp-train-master-0" is forbidden: exceeded quota: '
                             "gpu-quota, requested: requests.nvidia.com/gpu=8, used: 8, limited: 8")
    assert ("GET", f"/api/v1/namespaces/{NS}/events", {"fieldSelector": "involvedObject.name=exp-train"}, None) \
        in calls(server)
