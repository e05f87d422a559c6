"""A real Prometheus scrapes training workers plus DCGM/kube-state-metrics fixtures on
loopback, loads the chart's rules, and every query of every dashboard panel returns data.

Workers are scraped through the chart's rendered PodMonitor: pod-discovery meta labels on
static targets, then the operator's and the chart's relabelings, applied by Prometheus (so
a changed relabeling in the chart shows here as a dashboard without data). DCGM with
honor_labels and `node` (ServiceMonitor); kube-state-metrics with honor_labels.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from ps3_platform.ports import free_port

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((REPO / "ops" / "dashboards").glob("*.json"))
#: Grafana's $__rate_interval for a 1 s scrape would be 4 s; 10 s leaves room on a busy machine.
RATE_INTERVAL = "10s"
DATA_TIMEOUT_S = 60


def _meta_label(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _pod_meta(target, namespace: str, port_name: str) -> dict[str, str]:
    """The `__meta_kubernetes_pod_*` labels Kubernetes service discovery gives a training pod's port."""
    labels = {"app.kubernetes.io/part-of": "ps3-platform", "app.kubernetes.io/component": "training",
              "ps3.platform/job": target.job, "ps3.platform/stage": target.stage}
    return {"__meta_kubernetes_namespace": namespace, "__meta_kubernetes_pod_name": target.pod,
            "__meta_kubernetes_pod_node_name": target.node, "__meta_kubernetes_pod_container_name": "pytorch",
            "__meta_kubernetes_pod_container_port_name": port_name,
            **{f"__meta_kubernetes_pod_label_{_meta_label(k)}": v for k, v in labels.items()}}


def _relabel(rule: dict) -> dict:
    """A PodMonitor relabeling (camelCase) as a Prometheus relabel_config."""
    names = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    out = {names.get(k, k): v for k, v in rule.items()}
    out["action"] = out.get("action", "replace").lower()
    return out


def training_scrape_job(pod_monitor: dict, targets, namespace: str) -> dict:
    """What prometheus-operator generates from the chart's PodMonitor, with static targets
    standing in for pod discovery: its selector, the operator's namespace/pod/container
    labels, then the chart's own relabelings, all applied by Prometheus itself. A non-metrics
    port is offered too, so the chart's keep rule has something to drop."""
    spec = pod_monitor["spec"]
    endpoint = spec["podMetricsEndpoints"][0]
    selector = [{"action": "keep", "source_labels": [f"__meta_kubernetes_pod_label_{_meta_label(k)}"], "regex": v}
                for k, v in spec["selector"]["matchLabels"].items()]
    operator = [{"source_labels": [f"__meta_kubernetes_{m}"], "target_label": label}
                for m, label in (("namespace", "namespace"), ("pod_name", "pod"), ("pod_container_name", "container"))]
    static = [{"targets": [t.address], "labels": _pod_meta(t, namespace, name)}
              for t in targets for name in ("metrics", "pytorchjob-port")]
    return {"job_name": f"podMonitor/{namespace}/{pod_monitor['metadata']['name']}",
            "honor_labels": endpoint["honorLabels"], "metrics_path": endpoint["path"], "static_configs": static,
            "relabel_configs": selector + operator + [_relabel(r) for r in endpoint["relabelings"]]}


def scrape_config(training_job: dict, exporters, rules_file: Path) -> dict:
    dcgm = [{"job_name": f"dcgm-{node}", "honor_labels": True, "metrics_path": exporters.dcgm_path(node),
             "static_configs": [{"targets": [exporters.address], "labels": {"node": node}}]}
            for node in exporters.nodes]
    ksm = {"job_name": "kube-state-metrics", "honor_labels": True, "metrics_path": exporters.ksm_path,
           "static_configs": [{"targets": [exporters.address]}]}
    return {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(rules_file)],
            "scrape_configs": [training_job, *dcgm, ksm]}


@pytest.fixture(scope="module")
def prometheus(prometheus_bins, training_metrics_targets, cluster_exporters, chart_rule_groups, chart_pod_monitor,
               tmp_path_factory):
    """URL of a Prometheus server with the chart's rendered rules (default pools) loaded."""
    work = tmp_path_factory.mktemp("prometheus")
    rules = work / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": chart_rule_groups({})}, sort_keys=False))
    config = work / "prometheus.yml"
    training = training_scrape_job(chart_pod_monitor, training_metrics_targets, cluster_exporters.namespace)
    config.write_text(yaml.safe_dump(scrape_config(training, cluster_exporters, rules)))
    port = free_port()
    log = (work / "prometheus.log").open("w")
    proc = subprocess.Popen([prometheus_bins.prometheus, f"--config.file={config}",
                             f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                             "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, work / "prometheus.log")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def _wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    pytest.fail(f"prometheus not ready after 30 s: {log.read_text()[-2000:]}")


def api(url: str, path: str, **params: str) -> dict:
    data = urllib.parse.urlencode(params).encode() if params else None
    try:
        with urllib.request.urlopen(f"{url}/api/v1/{path}", data=data, timeout=10) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{path} {params}: HTTP {exc.code} {exc.read().decode()[:500]}") from None
    assert body["status"] == "success", body
    return body["data"]


def has_finite_value(url: str, expr: str) -> bool:
    result = api(url, "query", query=expr)["result"]
    return any(math.isfinite(float(r["value"][1])) for r in result)


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable of every dashboard."""
    out = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for inner in [panel, *panel.get("panels", [])]:
                out += [(f"{path.stem} / {inner['title']} / {t['refId']}", t["expr"]) for t in inner.get("targets", [])]
        for var in dashboard["templating"]["list"]:
            if var["type"] == "query":
                metric, label = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"]["query"]).groups()
                out.append((f"{path.stem} / variable {var['name']}", f"count by ({label}) ({metric})"))
    return out


def substitute(expr: str, variables: dict[str, str]) -> str:
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace(f"${name}", variables[name])
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def test_every_dashboard_query_returns_data(prometheus, training_metrics_targets):
    """Picked values (a real job) and All (`.*`): each query must return a finite sample."""
    target = training_metrics_targets[0]
    choices = [{"namespace": "ps3", "job": target.job, "stage": target.stage, "pool": ".*"},
               {"namespace": ".*", "job": ".*", "stage": ".*", "pool": ".*"}]
    pending = {(where, substitute(expr, v)) for where, expr in dashboard_queries() for v in choices}
    assert len(pending) > 60
    deadline = time.monotonic() + DATA_TIMEOUT_S
    while pending and time.monotonic() < deadline:
        pending = {(where, expr) for where, expr in pending if not has_finite_value(prometheus, expr)}
        if pending:
            time.sleep(1)
    assert not pending, "queries without data:\n" + "\n".join(f"{w}: {e}" for w, e in sorted(pending))
    # ...and the check does notice a query that matches nothing (a job that does not exist).
    _, expr = next(q for q in dashboard_queries() if q[0].endswith("/ Loss / A"))
    assert not has_finite_value(prometheus, substitute(expr, {**choices[0], "job": "no-such-job"}))


def test_rules_evaluate_cleanly_and_a_healthy_run_fires_nothing(prometheus):
    deadline = time.monotonic() + DATA_TIMEOUT_S
    while time.monotonic() < deadline and not has_finite_value(prometheus, "ps3_job:dcgm_gpu_util:avg"):
        time.sleep(1)
    time.sleep(2)  # a couple more evaluations of every group
    rules = [r for g in api(prometheus, "rules")["groups"] for r in g["rules"]]
    assert len(rules) >= 13
    broken = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not broken, broken
    firing = [a["labels"]["alertname"] for a in api(prometheus, "alerts")["alerts"] if a["state"] == "firing"]
    assert not firing, firing
    result = api(prometheus, "query", query="ps3:node_pool_info")["result"]
    pools = {r["metric"]["pool"]: r["metric"]["node"] for r in result}
    assert pools == {"h100": "gpu-node-a", "a100": "gpu-node-b"}


def test_workers_count_bad_samples_by_reason(training_metrics_targets):
    """The run's data hold an undecodable image and an image without json: both reasons are served."""
    pattern = re.compile(r'^ps3_data_bad_samples_total\{[^}]*reason="(\w+)"[^}]*\} (\S+)$', re.M)
    deadline, seen = time.monotonic() + DATA_TIMEOUT_S, {}
    while time.monotonic() < deadline:
        seen = {}
        for target in training_metrics_targets:
            with urllib.request.urlopen(f"http://{target.address}/metrics", timeout=5) as resp:
                for reason, value in pattern.findall(resp.read().decode()):
                    seen[reason] = seen.get(reason, 0.0) + float(value)
        if seen.get("bad_image", 0) >= 1 and seen.get("missing_json", 0) >= 1:
            return
        time.sleep(1)
    pytest.fail(f"bad samples served by the workers: {seen}")


def test_pod_monitor_relabelings_keep_only_metrics_ports_and_label_the_job(prometheus, training_metrics_targets):
    """Prometheus applied the chart's relabelings: one target per worker, non-metrics ports dropped."""
    with urllib.request.urlopen(f"{prometheus}/api/v1/targets?state=active", timeout=10) as resp:
        targets = json.load(resp)["data"]["activeTargets"]
    training = [t for t in targets if t["scrapePool"].startswith("podMonitor/")]
    assert len(training) == len(training_metrics_targets)
    for target in training:
        labels = target["labels"]
        assert labels["ps3_job"] == "live" and labels["ps3_stage"] == "train" and labels["container"] == "pytorch"
        assert labels["node"] and labels["pod"].startswith("live-train-worker-")
