"""A real Prometheus scrapes training workers plus DCGM/kube-state-metrics fixtures on
loopback, loads the chart's rules, and every query of every dashboard panel returns data.

Labels are attached the way the chart's scrape objects attach them in a cluster: workers
with honor_labels (their own `job` label is the training job) plus namespace/pod/node/
ps3_job/ps3_stage target labels (PodMonitor); DCGM with honor_labels and `node`
(ServiceMonitor); kube-state-metrics with honor_labels.
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


def scrape_config(targets, exporters, rules_file: Path) -> dict:
    training = [{"targets": [t.address], "labels": {"namespace": exporters.namespace, "pod": t.pod, "node": t.node,
                                                    "container": "pytorch", "ps3_job": t.job, "ps3_stage": t.stage}}
                for t in targets]
    dcgm = [{"job_name": f"dcgm-{node}", "honor_labels": True, "metrics_path": exporters.dcgm_path(node),
             "static_configs": [{"targets": [exporters.address], "labels": {"node": node}}]}
            for node in exporters.nodes]
    ksm = {"job_name": "kube-state-metrics", "honor_labels": True, "metrics_path": exporters.ksm_path,
           "static_configs": [{"targets": [exporters.address]}]}
    return {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(rules_file)],
            "scrape_configs": [{"job_name": "training", "honor_labels": True, "static_configs": training}, *dcgm, ksm]}


@pytest.fixture(scope="module")
def prometheus(prometheus_bins, training_metrics_targets, cluster_exporters, chart_rule_groups, tmp_path_factory):
    """URL of a Prometheus server with the chart's rendered rules (default pools) loaded."""
    work = tmp_path_factory.mktemp("prometheus")
    rules = work / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": chart_rule_groups({})}, sort_keys=False))
    config = work / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(training_metrics_targets, cluster_exporters, rules)))
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
