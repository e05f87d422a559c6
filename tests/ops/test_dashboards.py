"""Dashboards are generated: committed JSON equals the generator, and they use real metric names."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ps3_platform.runtime.metrics import METRICS

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((REPO / "ops" / "dashboards").glob("*.json"))
RULES = REPO / "ops" / "prometheus" / "ps3-platform.rules.yaml"
#: Series from outside the runtime the dashboards and rules may use.
EXTERNAL = re.compile(r"^(DCGM_FI_[A-Z_]+|kube_[a-z_]+)$")
#: Optional gauge the checkpoint rule uses when the runtime exports it (falls back to 30 min).
OPTIONAL_RUNTIME = {"ps3_checkpoint_interval_seconds"}
PROMQL_WORDS = {"by", "on", "group_left", "group_right", "without", "ignoring", "bool", "or", "and", "unless",
                "offset", "Inf", "NaN", "le"}


def exported_names() -> set[str]:
    """Series names Prometheus sees from the runtime's METRICS (counter/histogram suffixes)."""
    names = set()
    for name, (kind, _, _) in METRICS.items():
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    return names


def panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out += [panel, *panel.get("panels", [])]
    return [p for p in out if p["type"] != "row"]


def expressions() -> list[str]:
    out = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        out += [t["expr"] for p in panels(dashboard) for t in p["targets"]]
        out += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    rules = yaml.safe_load(RULES.read_text())["groups"]
    return out + [r["expr"] for g in rules for r in g["rules"]]


def series_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are neither functions nor labels."""
    expr = re.sub(r'"[^"]*"', '""', expr)  # string literals (label values, regexes)
    expr = re.sub(r"\{[^}]*\}", "{}", expr)  # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)  # label lists
    expr = re.sub(r"label_values\(([^,]+),\s*\w+\)", r"\1", expr)  # variable queries
    found = set()
    for match in re.finditer(r"(?<![\w:$.])([a-zA-Z_:][\w:]*)", expr):
        name = match.group(1)
        if name in PROMQL_WORDS or expr[match.end():].lstrip().startswith("("):
            continue
        found.add(name)
    return found


def test_committed_json_equals_the_generator():
    command = [sys.executable, str(REPO / "ops" / "dashboards" / "generate.py"), "--check"]
    proc = subprocess.run(command, check=False, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in DASHBOARDS] == ["ps3-gpu-utilisation.json", "ps3-node-pools.json", "ps3-training.json"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_dashboard_shape(path):
    dashboard = json.loads(path.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "job", "stage"} <= set(variables)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in panels(dashboard):
        assert panel["targets"], f"{panel['title']}: no queries"
        assert panel["datasource"]["uid"] == "${datasource}"
        for target in panel["targets"]:
            assert target["expr"].strip()


def test_training_panels_filter_on_the_job_variables():
    dashboard = json.loads((REPO / "ops" / "dashboards" / "ps3-training.json").read_text())
    for panel in panels(dashboard):
        for target in panel["targets"]:
            for var in ("$namespace", "$job", "$stage"):
                assert var in target["expr"], f"{panel['title']}: does not filter on {var}"


def test_the_issue_asks_for_these_panels():
    titles = {p["title"] for path in DASHBOARDS for p in panels(json.loads(path.read_text()))}
    for title in ("GPU utilisation", "SM active", "Tensor pipe active", "GPU memory used", "Power draw",
                  "GPU utilisation per GPU", "Samples per second", "Step time", "Data-wait share", "Loss",
                  "Learning rate", "MFU", "Checkpoint age", "Checkpoint save time", "Restarts",
                  "Bad samples per second", "GPUs allocatable vs allocated", "Unallocated GPUs"):
        assert title in titles


def test_every_series_name_is_exported_recorded_or_external():
    exported = exported_names()
    rules = yaml.safe_load(RULES.read_text())["groups"]
    recorded = {r["record"] for g in rules for r in g["rules"] if "record" in r} | {"ps3:node_pool_info"}
    unknown = set()
    for expr in expressions():
        for name in series_names(expr):
            if not (name in exported or name in recorded or name in OPTIONAL_RUNTIME or EXTERNAL.match(name)):
                unknown.add(name)
    assert not unknown, f"series that nothing exports: {sorted(unknown)} (renamed in runtime/metrics.py?)"


def test_the_name_check_catches_a_typo():
    assert series_names('sum by (job) (rate(ps3_sampels_total{job=~"$job"}[5m]))') == {"ps3_sampels_total"}
    assert "ps3_sampels_total" not in exported_names()
