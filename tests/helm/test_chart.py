"""helm/ps3-platform rendered by the real Helm engine: valid objects, and each part does its job."""

from __future__ import annotations

import copy
import json
import py_compile
import re
import tempfile
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from ps3_platform.compile import compile_job
from ps3_platform.spec import load_pools, load_text, parse_pools
from ps3_platform.spec.pools import DEFAULT_POOLS_FILE

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "ps3-platform"
K8S_VERSION = "1.30.0"
#: API groups validated against vendored CRDs (monitoring ones in tests/helm/crds): not core.
KUEUE_SCHEMAS = {"ResourceFlavor": "kueue-resourceflavors.yaml", "ClusterQueue": "kueue-clusterqueues.yaml",
                 "LocalQueue": "kueue-localqueues.yaml"}
MONITORING = {"PodMonitor": "monitoring.coreos.com_podmonitors.yaml",
              "ServiceMonitor": "monitoring.coreos.com_servicemonitors.yaml",
              "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml"}
PLATFORMCTL_RULES = [
    {"apiGroups": ["kubeflow.org"], "resources": ["pytorchjobs"], "verbs": ["create", "get", "list", "delete"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "get", "list", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["list"]},
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["create", "get", "patch", "delete"]},
]
ARGO_RULE = {"apiGroups": ["argoproj.io"], "resources": ["workflows"], "verbs": ["create", "get", "list", "delete"]}


def by_kind(objs, kind):
    return [o for _, o in objs if o["kind"] == kind]


def one(objs, kind, name=None):
    found = [o for o in by_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def test_lint_is_clean_with_defaults_and_all_toggles(chart_engine, all_on):
    assert chart_engine.lint({}) == []
    assert chart_engine.lint(all_on) == []


def test_default_render_has_the_platform_objects_and_no_optional_ones(default_objects):
    kinds = {(o["kind"], o["metadata"]["name"]) for _, o in default_objects}
    for expected in [("ConfigMap", "ps3-platform-pools"), ("PriorityClass", "ps3-training"),
                     ("PriorityClass", "ps3-batch"), ("ServiceAccount", "ps3-platform-job"),
                     ("Role", "ps3-platform-platformctl"), ("NetworkPolicy", "ps3-platform-training"),
                     ("PodMonitor", "ps3-platform-training"), ("PrometheusRule", "ps3-platform")]:
        assert expected in kinds
    present = {o["kind"] for _, o in default_objects if "helm.sh/hook" not in (o["metadata"].get("annotations") or {})}
    for optional in ("CustomResourceDefinition", "Deployment", "ServiceMonitor", "ResourceFlavor", "ClusterQueue",
                     "ValidatingWebhookConfiguration", "RoleBinding"):
        assert optional not in present, f"{optional} rendered although its toggle is off"


@pytest.mark.parametrize("which", ["default_objects", "full_objects"])
def test_core_objects_are_valid_kubernetes(which, request):
    """Every built-in kind against Kubernetes' OpenAPI, strict (unknown fields are errors)."""
    checked = 0
    for path, obj in request.getfixturevalue(which):
        if obj["kind"] not in MONITORING and obj["kind"] not in KUEUE_SCHEMAS:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            checked += 1
    assert checked >= 6


@pytest.mark.parametrize("which", ["default_objects", "full_objects"])
def test_monitoring_objects_validate_against_prometheus_operator_crds(which, request, crd_schema):
    """PodMonitor, ServiceMonitor, PrometheusRule against the operator's own CRD schemas, strict."""
    seen = set()
    for path, obj in request.getfixturevalue(which):
        if obj["kind"] in MONITORING:
            assert obj["apiVersion"] == "monitoring.coreos.com/v1", path
            errors = sorted(crd_schema(MONITORING[obj["kind"]]).iter_errors(obj), key=str)
            assert not errors, f"{path}: {errors[0].json_path}: {errors[0].message}"
            seen.add(obj["kind"])
    assert seen == ({"PodMonitor", "PrometheusRule"} if which == "default_objects" else set(MONITORING))


def test_a_misspelt_monitoring_field_is_caught(default_objects, crd_schema):
    monitor = copy.deepcopy(next(o for _, o in default_objects if o["kind"] == "PodMonitor"))
    monitor["spec"]["podMetricsEndpoints"][0]["relabellings"] = monitor["spec"]["podMetricsEndpoints"][0].pop("relabelings")
    assert list(crd_schema(MONITORING["PodMonitor"]).iter_errors(monitor))


def test_kueue_objects_match_the_kueue_crds(full_objects, crd_schema):
    kueue = [(path, o) for path, o in full_objects if o["kind"] in KUEUE_SCHEMAS]
    assert {o["kind"] for _, o in kueue} == set(KUEUE_SCHEMAS)
    for path, obj in kueue:
        errors = [e.message for e in crd_schema(KUEUE_SCHEMAS[obj["kind"]]).iter_errors(obj)]
        assert not errors, f"{path} {obj['kind']}: {errors[:3]}"
    typo = {**kueue[-1][1], "spec": {"clusterQueu": "ps3-platform"}}  # the validator does notice mistakes
    assert not crd_schema(KUEUE_SCHEMAS[typo["kind"]]).is_valid(typo)


def test_pools_configmap_is_read_by_the_compiler(default_objects):
    """The rendered pools.yaml parses with the compiler's parser and equals the built-in pools."""
    cm = one(default_objects, "ConfigMap", "ps3-platform-pools")
    pools = parse_pools(cm["data"]["pools.yaml"], "configmap ps3-platform-pools")
    assert pools == load_pools(DEFAULT_POOLS_FILE), "chart defaults drifted from spec/default_pools.yaml"


def test_custom_pools_replace_the_defaults(chart_engine):
    pools = {"h100": None, "a100": None, "cpu": None,
             "l40s": {"gpusPerNode": 4, "gpuResource": "nvidia.com/gpu", "nodeSelector": {"pool": "l40s"},
                      "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
                      "priorityClass": "team-a", "kueueQueue": "team-a", "schedulerQueue": "gang-a",
                      "gpuPeakTflops": 362, "gpuMemoryGb": 48, "pricePerGpuHour": 1.1}}
    objs = chart_engine.objects(chart_engine.render({"pools": pools}))
    parsed = parse_pools(one(objs, "ConfigMap", "ps3-platform-pools")["data"]["pools.yaml"], "cm")
    assert list(parsed.pools) == ["l40s"]
    assert parsed.pools["l40s"].model_dump(by_alias=True) == pools["l40s"]
    pc = one(objs, "PriorityClass", "team-a")  # named by a pool, not listed: the defaults apply
    assert (pc["value"], pc["preemptionPolicy"]) == (1000, "PreemptLowerPriority")


def test_platformctl_role_grants_exactly_what_the_cli_needs(default_objects, full_objects, chart_engine):
    assert one(default_objects, "Role", "ps3-platform-platformctl")["rules"] == PLATFORMCTL_RULES
    assert one(full_objects, "Role", "ps3-platform-platformctl")["rules"] == [*PLATFORMCTL_RULES, ARGO_RULE]
    binding = one(full_objects, "RoleBinding", "ps3-platform-platformctl")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "ps3-platform-platformctl"}
    assert {"kind": "ServiceAccount", "name": "ci", "namespace": "ps3"} in binding["subjects"]
    without_policies = chart_engine.objects(chart_engine.render({"networkPolicy": {"enabled": False}}))
    assert one(without_policies, "Role", "ps3-platform-platformctl")["rules"] == PLATFORMCTL_RULES[:-1]
    pools = one(without_policies, "ConfigMap", "ps3-platform-pools")["data"]["pools.yaml"]
    assert not parse_pools(pools, "cm").job_network_policies and not by_kind(without_policies, "NetworkPolicy")


def test_no_wildcards_and_no_cluster_admin_anywhere(full_objects):
    for _, obj in full_objects:
        for rule in obj.get("rules", []) if obj["kind"] in ("Role", "ClusterRole") else []:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule.get(key, []), f"{obj['kind']} {obj['metadata']['name']}: wildcard {key}"
        if obj["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            assert obj["roleRef"]["name"] not in ("cluster-admin", "admin", "edit")


def test_argo_toggle_adds_the_workflow_runner(full_objects, default_objects):
    sa = one(full_objects, "ServiceAccount", "ps3-platform-workflow")
    role = one(full_objects, "Role", "ps3-platform-workflow")
    assert {"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"], "verbs": ["create", "patch"]} \
        in role["rules"]
    binding = one(full_objects, "RoleBinding", "ps3-platform-workflow")
    assert binding["subjects"][0]["name"] == sa["metadata"]["name"]
    assert not [o for o in by_kind(default_objects, "ServiceAccount") if o["metadata"]["name"].endswith("workflow")]


def test_training_operator_install_ships_the_upstream_crd_and_a_pytorch_only_controller(full_objects):
    crd = one(full_objects, "CustomResourceDefinition", "pytorchjobs.kubeflow.org")
    upstream = yaml.safe_load((CHART / "files" / "crds" / "kubeflow.org_pytorchjobs.yaml").read_text())
    assert crd["spec"] == upstream["spec"]
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    deploy = one(full_objects, "Deployment", "ps3-platform-training-operator")
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--enable-scheme=pytorchjob" in args and "--gang-scheduler-name=volcano" in args
    assert "--webhook-service-name=ps3-platform-training-operator" in args
    hook = one(full_objects, "ValidatingWebhookConfiguration")
    assert hook["metadata"]["name"] == "validator.training-operator.kubeflow.org"  # fixed in the operator binary
    assert hook["webhooks"][0]["clientConfig"]["service"]["name"] == "ps3-platform-training-operator"
    binding = one(full_objects, "ClusterRoleBinding", "ps3-platform-training-operator")
    assert binding["roleRef"]["name"] == "ps3-platform-training-operator"


def test_kueue_toggle_creates_flavors_queue_and_local_queues(full_objects):
    flavors = {o["metadata"]["name"]: o for o in by_kind(full_objects, "ResourceFlavor")}
    assert flavors["ps3-platform-h100"]["spec"]["nodeLabels"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    queue = one(full_objects, "ClusterQueue", "ps3-platform")
    group = queue["spec"]["resourceGroups"][0]
    assert group["coveredResources"] == ["cpu", "memory", "nvidia.com/gpu"]
    assert {f["name"] for f in group["flavors"]} == set(flavors)
    assert queue["spec"]["cohortName"] == "research"
    local = {o["metadata"]["name"]: o["spec"]["clusterQueue"] for o in by_kind(full_objects, "LocalQueue")}
    assert local == {"h100": "ps3-platform", "batch": "ps3-platform"}


def test_kueue_quota_for_an_unknown_pool_fails_with_the_pool_list(chart_engine):
    with pytest.raises(chart_engine.ChartRenderError, match=r"kueue.quotas.tpu: there is no pool \"tpu\""):
        chart_engine.render({"kueue": {"enabled": True, "quotas": {"tpu": {"gpus": 8}}}})


def test_baseline_network_policy_admits_only_the_monitoring_namespace(default_objects):
    policy = one(default_objects, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    (scrape,) = policy["ingress"]
    assert scrape["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    assert scrape["ports"] == [{"protocol": "TCP", "port": 9464, "endPort": 9471}]


def _admits(policies: list[dict], dst: dict, src: dict, port: int) -> bool:
    """Kubernetes NetworkPolicy ingress semantics (matchLabels only): pods no policy selects
    accept anything; selected pods accept what any selecting policy's rule matches."""
    def matches(selector: dict, labels: dict) -> bool:
        return selector.get("matchLabels", {}).items() <= labels.items()

    def peer_ok(peer: dict) -> bool:
        if "namespaceSelector" in peer:
            ns_ok = matches(peer["namespaceSelector"], {"kubernetes.io/metadata.name": src["namespace"]})
        else:
            ns_ok = src["namespace"] == dst["namespace"]
        return ns_ok and matches(peer.get("podSelector", {}), src["labels"])

    def port_ok(rule: dict) -> bool:
        return not rule.get("ports") or any(p["port"] <= port <= p.get("endPort", p["port"]) for p in rule["ports"])

    selecting = [p for p in policies if p["metadata"]["namespace"] == dst["namespace"]
                 and matches(p["spec"]["podSelector"], dst["labels"])]
    return not selecting or any(port_ok(rule) and any(peer_ok(peer) for peer in rule.get("from", []))
                                for p in selecting for rule in p["spec"].get("ingress", []))


def test_a_jobs_pods_admit_their_own_job_and_prometheus_only(default_objects):
    """Chart baseline + the per-job policies platformctl creates: two jobs of one namespace are isolated."""
    pools = parse_pools(one(default_objects, "ConfigMap", "ps3-platform-pools")["data"]["pools.yaml"], "cm")
    assert pools.job_network_policies
    policies, pods = list(by_kind(default_objects, "NetworkPolicy")), {}
    for name in ("alpha", "beta"):
        objects = compile_job(load_text(MULTI_RANK_JOB.replace("probe", name)).job, pools, namespace="ps3")
        policies += [o for o in objects if o["kind"] == "NetworkPolicy"]
        template = next(o for o in objects if o["kind"] == "PyTorchJob")["spec"]["pytorchReplicaSpecs"]["Worker"]
        pods[name] = {"namespace": "ps3", "labels": template["template"]["metadata"]["labels"]}
    prometheus = {"namespace": "monitoring", "labels": {"app.kubernetes.io/name": "prometheus"}}
    stranger = {"namespace": "ps3", "labels": {"app": "notebook"}}
    alpha, beta = pods["alpha"], pods["beta"]
    assert _admits(policies, alpha, alpha, 29500) and _admits(policies, alpha, alpha, 41234)  # c10d, NCCL
    assert not _admits(policies, alpha, beta, 29500) and not _admits(policies, beta, alpha, 41234)
    assert not _admits(policies, alpha, stranger, 29500)
    assert _admits(policies, alpha, prometheus, 9464) and not _admits(policies, alpha, prometheus, 29500)
    assert not _admits(policies, alpha, {**prometheus, "namespace": "default"}, 9464)


MULTI_RANK_JOB = """
apiVersion: ps3.platform/v1
kind: TrainingJob
metadata: {name: probe}
spec:
  task: ps3_pretrain
  resources: {pool: h100, nodes: 2, gpusPerNode: 8}
  train: {globalBatch: 64}
"""


def test_compiled_training_pods_are_scraped_and_admitted(default_objects):
    """Chart ConfigMap -> compiler -> pod template: PodMonitor, NetworkPolicy, SA and priority all line up."""
    pools = parse_pools(one(default_objects, "ConfigMap", "ps3-platform-pools")["data"]["pools.yaml"], "cm")
    job = next(o for o in compile_job(load_text(MULTI_RANK_JOB).job, pools) if o["kind"] == "PyTorchJob")
    template = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    labels, pod = template["metadata"]["labels"], template["spec"]
    monitor = one(default_objects, "PodMonitor")["spec"]
    assert monitor["selector"]["matchLabels"].items() <= labels.items()
    assert one(default_objects, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    keep = monitor["podMetricsEndpoints"][0]["relabelings"][0]
    scrape = one(default_objects, "NetworkPolicy")["spec"]["ingress"][0]["ports"][0]
    ports = pod["containers"][0]["ports"]
    metrics = [p for p in ports if re.fullmatch(keep["regex"], p["name"])]
    assert len(metrics) == 8 and all(scrape["port"] <= p["containerPort"] <= scrape["endPort"] for p in metrics)
    assert not re.fullmatch(keep["regex"], "pytorchjob-port")
    assert pod["serviceAccountName"] == one(default_objects, "ServiceAccount", "ps3-platform-job")["metadata"]["name"]
    assert pod["priorityClassName"] in {o["metadata"]["name"] for o in by_kind(default_objects, "PriorityClass")}


def test_dashboards_ship_as_labelled_configmaps_equal_to_ops(default_objects):
    maps = [o for o in by_kind(default_objects, "ConfigMap") if "dashboards" in o["metadata"]["labels"].values()]
    sources = sorted((REPO / "ops" / "dashboards").glob("*.json"))
    assert len(maps) == len(sources) == 3
    for cm in maps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        (name, text), = cm["data"].items()
        assert json.loads(text) == json.loads((REPO / "ops" / "dashboards" / name).read_text())


def test_prometheusrule_is_the_ops_rules_plus_one_rule_per_pool(default_objects, chart_engine):
    groups = one(default_objects, "PrometheusRule")["spec"]["groups"]
    ops = yaml.safe_load((REPO / "ops" / "prometheus" / "ps3-platform.rules.yaml").read_text())["groups"]
    assert groups[:-1] == ops
    pools = groups[-1]
    assert pools["name"] == "ps3-platform.pools"
    assert {r["labels"]["pool"]: r["expr"] for r in pools["rules"]} == {
        "a100": 'max by (node) (kube_node_labels{label_nvidia_com_gpu_product="NVIDIA-A100-SXM4-80GB"})',
        "h100": 'max by (node) (kube_node_labels{label_nvidia_com_gpu_product="NVIDIA-H100-80GB-HBM3"})',
    }
    moved = chart_engine.objects(chart_engine.render({"prometheusRule": {"runbookBaseUrl": "https://wiki.example/rb/"}}))
    urls = [r["annotations"]["runbook_url"] for g in one(moved, "PrometheusRule")["spec"]["groups"]
            for r in g["rules"] if "alert" in r]
    assert urls and all(u.startswith("https://wiki.example/rb/PS3") for u in urls)


def test_helm_test_hook_checks_the_install(full_objects):
    hooks = [o for _, o in full_objects if (o["metadata"].get("annotations") or {}).get("helm.sh/hook") == "test"]
    pod = next(o for o in hooks if o["kind"] == "Pod")
    container = pod["spec"]["containers"][0]
    secret_refs = {e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"] if "valueFrom" in e
                   and "secretKeyRef" in e["valueFrom"]}
    assert secret_refs == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}  # pod cannot start without the Secret
    binding = next(o for o in hooks if o["kind"] == "RoleBinding")
    assert binding["roleRef"]["name"] == "ps3-platform-platformctl"
    assert binding["subjects"][0]["name"] == pod["spec"]["serviceAccountName"]
    script = next(o for o in hooks if o["kind"] == "ConfigMap")["data"]["check_install.py"]
    assert script == (CHART / "files" / "helm-test" / "check_install.py").read_text().rstrip("\n")
    py_compile.compile(str(CHART / "files" / "helm-test" / "check_install.py"), doraise=True,
                       cfile=str(Path(tempfile.mkdtemp()) / "check_install.pyc"))


def test_notes_say_what_was_installed_and_warn_about_kueue(default_render, full_render):
    default_notes = next(v for k, v in default_render.items() if k.endswith("NOTES.txt")) \
        if any(k.endswith("NOTES.txt") for k in default_render) else pytest.skip("engine does not render NOTES")
    full_notes = next(v for k, v in full_render.items() if k.endswith("NOTES.txt"))
    assert "platformctl submit" in default_notes and "not installed (the cluster must already run it)" in default_notes
    assert "kubeflow.org/pytorchjob integration DISABLED" not in default_notes
    assert "installed by this chart" in full_notes and "kubeflow.org/pytorchjob integration DISABLED" in full_notes
    assert "ps3.platform/job,ps3.platform/stage" in default_notes


def test_other_release_name_and_namespace(chart_engine):
    """Names derive from the release, except the contract names the compiler looks up."""
    objs = chart_engine.objects(chart_engine.render({}, name="prod", namespace="vision"))
    names = {(o["kind"], o["metadata"]["name"]) for _, o in objs}
    assert ("ConfigMap", "ps3-platform-pools") in names and ("ServiceAccount", "ps3-platform-job") in names
    assert ("Role", "prod-ps3-platform-platformctl") in names
    namespaced = [o for _, o in objs if o["kind"] not in ("PriorityClass",)]
    assert {o["metadata"]["namespace"] for o in namespaced} == {"vision"}
    monitor = one(objs, "PodMonitor")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["vision"]}
