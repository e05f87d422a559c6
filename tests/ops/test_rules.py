"""Alert and recording rules: promtool accepts them, every alert is unit-tested and has a runbook."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "ops" / "prometheus" / "ps3-platform.rules.yaml"
RULE_TESTS = sorted((REPO / "ops" / "prometheus" / "tests").glob("*.yaml"))
RUNBOOKS = REPO / "ops" / "runbooks"
RUNBOOK_SECTIONS = ("## Meaning", "## Impact", "## Diagnosis", "## Mitigation")


def alerts() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


def promtool(bins, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([bins.promtool, *args], check=False, capture_output=True, text=True, cwd=cwd)


def test_rules_file_passes_promtool_check(prometheus_bins):
    proc = promtool(prometheus_bins, "check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr


POOL_VALUES = {"pools": {"multi": {"gpusPerNode": 8, "nodeSelector": {"cloud.google.com/gke-nodepool": "h100-a",
                                                                      "nvidia.com/gpu.present": "true"}}}}


@pytest.mark.parametrize("values", [{}, POOL_VALUES], ids=["default-pools", "two-label-selector"])
def test_chart_rendered_rules_pass_promtool_check(prometheus_bins, chart_rule_groups, values, tmp_path):
    groups = chart_rule_groups(values)
    assert groups[-1]["name"] == "ps3-platform.pools"
    path = tmp_path / "chart.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    proc = promtool(prometheus_bins, "check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_rule_unit_tests_pass(prometheus_bins):
    assert RULE_TESTS
    proc = promtool(prometheus_bins, "test", "rules", *map(str, RULE_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_alert_has_a_firing_unit_test():
    tested = set()
    for path in RULE_TESTS:
        for group in yaml.safe_load(path.read_text())["tests"]:
            tested |= {t["alertname"] for t in group.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert {a["alert"] for a in alerts()} <= tested
    assert len(alerts()) == 6


@pytest.mark.parametrize("broken", [("< 30", "< 5"), ("> 0.25", "> 0.9"), ("> 0.01", "> 0.5"), (">= 3", ">= 30")])
def test_unit_tests_catch_a_changed_threshold(prometheus_bins, tmp_path, broken):
    """The unit tests pin the thresholds: loosening one makes promtool test fail."""
    old, new = broken
    assert old in RULES.read_text()
    (tmp_path / "prometheus").mkdir()
    (tmp_path / "prometheus" / RULES.name).write_text(RULES.read_text().replace(old, new))
    shutil.copytree(REPO / "ops" / "prometheus" / "tests", tmp_path / "prometheus" / "tests")
    proc = promtool(prometheus_bins, "test", "rules", *map(str, sorted((tmp_path / "prometheus" / "tests").glob("*"))))
    assert proc.returncode != 0


@pytest.mark.parametrize("alert", [a["alert"] for a in alerts()])
def test_every_alert_has_a_runbook(alert):
    rule = next(a for a in alerts() if a["alert"] == alert)
    assert rule["annotations"]["runbook_url"].endswith(f"/ops/runbooks/{alert}.md")
    assert rule["labels"]["severity"] in ("warning", "critical")
    runbook = RUNBOOKS / f"{alert}.md"
    assert runbook.is_file(), f"missing runbook {runbook.relative_to(REPO)}"
    text = runbook.read_text()
    assert text.startswith(f"# {alert}\n")
    for section in RUNBOOK_SECTIONS:
        assert section in text, f"{runbook.name}: no '{section}' section"
