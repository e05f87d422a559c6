"""The chart's platformctl Role is exactly what the Kubernetes backend calls: no more, no less.

Every platformctl command runs against the API-server double (tests/ps3_platform/backends),
each request is mapped to the (API group, resource, verb) RBAC checks, and the union must
equal the rules the chart renders, so a new call without a rule, or a rule nothing uses,
fails here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from ps3_platform.backends.kubernetes import KubernetesBackend
from ps3_platform.compile import compile_job
from ps3_platform.spec import load_pools, load_text

DOUBLE = Path(__file__).resolve().parents[1] / "ps3_platform" / "backends" / "k8s_double.py"
NS = "team-a"


def _double():
    spec = importlib.util.spec_from_file_location("k8s_double", DOUBLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("k8s_double", module)
    spec.loader.exec_module(module)
    return module


def _compiled(text: str, overrides: list[str] | None = None):
    job = load_text(text, overrides=overrides).job
    return job, compile_job(job, load_pools())


@pytest.fixture(scope="module")
def used_access(tmp_path_factory) -> set[tuple[str, str, str]]:
    """(group, resource, verb) of every request of a full submit/status/list/logs/cancel lifecycle."""
    kd = _double()
    server = kd.ApiServerDouble().start()
    try:
        kubeconfig = server.write_kubeconfig(tmp_path_factory.mktemp("kube") / "kubeconfig")
        backend = KubernetesBackend(config_file=str(kubeconfig), poll_s=0.01, delete_timeout_s=5)
        server.put(kd.CORE, NS, "configmaps", {"metadata": {"name": "ps3-platform-pools"},
                                                "data": {"pools.yaml": "pools: {cpu: {gpusPerNode: 0}}"}})
        backend.pools(None)
        backend.submit(*_compiled(kd.TRAINING_SPEC))
        backend.submit(*_compiled(kd.TRAINING_SPEC))  # unchanged: reads only
        backend.submit(*_compiled(kd.TRAINING_SPEC, ["spec.train.steps=5"]), replace=True)
        server.set_status(kd.KUBEFLOW, NS, "pytorchjobs", "exp-train", kd.pytorchjob_status("exp-train", "Created"))
        backend.status("exp")  # no pods yet: why not (events)
        server.set_status(kd.KUBEFLOW, NS, "pytorchjobs", "exp-train", kd.pytorchjob_status("exp-train", "Running"))
        server.add_pod(NS, "exp-train", "master", 0, logs=["step 3/5 loss 1.0"])
        backend.status("exp")
        backend.list()
        list(backend.logs("exp"))
        server.set_status(kd.KUBEFLOW, NS, "pytorchjobs", "exp-train", kd.pytorchjob_status("exp-train", "Succeeded"))
        list(backend.logs("exp", rank=0, follow=True))
        backend.cancel("exp")
        backend.submit(*_compiled(kd.PIPELINE_SPEC))
        backend.submit(*_compiled(kd.PIPELINE_SPEC, ["spec.stages[1].train.steps=7"]), replace=True)
        backend.status("pipe")
        backend.cancel("pipe")
        assert server.unexpected == []
        return {access for r in server.requests if (access := r.access()) is not None}
    finally:
        server.stop()


def _granted(role: dict) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


def test_platformctl_role_equals_what_the_backend_calls(used_access, full_objects, default_objects):
    role = next(o for _, o in full_objects if o["kind"] == "Role" and o["metadata"]["name"] == "ps3-platform-platformctl")
    assert _granted(role) == used_access
    without_argo = next(o for _, o in default_objects
                        if o["kind"] == "Role" and o["metadata"]["name"] == "ps3-platform-platformctl")
    assert _granted(without_argo) == {a for a in used_access if a[0] != "argoproj.io"}


def test_helm_test_hook_checks_the_same_access(used_access):
    """The `helm test` pod asks the API server for exactly these (SelfSubjectAccessReview)."""
    spec = importlib.util.spec_from_file_location(
        "check_install", Path(__file__).resolve().parents[2] / "helm" / "ps3-platform" / "files" / "helm-test"
        / "check_install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    checked = {(group, resource + (f"/{sub}" if sub else ""), verb)
               for verb, group, resource, sub in
               module.PLATFORMCTL_ACCESS + module.ARGO_ACCESS + module.NETWORK_POLICY_ACCESS}
    assert checked == used_access
