"""Tiny builders for Grafana dashboard JSON (schema 39), so dashboards are code, not clicks.

Plain dicts instead of grafana-foundation-sdk: the dashboards need a handful of panel
kinds, and dicts keep the generated JSON obvious to review and cheap to diff.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Every query goes to the datasource the viewer picks in the `datasource` variable.
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39
PANEL_WIDTH = 12
PANEL_HEIGHT = 8


@dataclass(frozen=True)
class Query:
    """One PromQL query of a panel and the legend of its series."""

    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    """A panel: `kind` is timeseries, stat or table; `unit` is a Grafana unit id."""

    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"
    description: str = ""
    width: int = PANEL_WIDTH


@dataclass(frozen=True)
class Row:
    """A titled row of panels, laid out left to right and wrapped at 24 columns."""

    title: str
    panels: tuple[Panel, ...]


@dataclass
class Variable:
    """A query variable (multi-select with All = `.*`) filled from `label_values(...)`."""

    name: str
    label: str
    query: str
    extra: dict = field(default_factory=dict)


def datasource_variable() -> dict:
    return {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
            "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []}


def query_variable(var: Variable) -> dict:
    return {
        "name": var.name, "label": var.label, "type": "query", "datasource": DATASOURCE,
        "query": {"query": var.query, "refId": f"{var.name}-query"}, "definition": var.query,
        "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1, "hide": 0, "regex": "", "options": [], **var.extra,
    }


def _targets(queries: tuple[Query, ...], kind: str) -> list[dict]:
    refs = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out = []
    for ref, query in zip(refs, queries, strict=False):
        target = {"refId": ref, "datasource": DATASOURCE, "expr": query.expr, "legendFormat": query.legend,
                  "range": kind == "timeseries", "instant": kind != "timeseries"}
        if kind == "table":
            target["format"] = "table"
        out.append(target)
    return out


def _options(kind: str) -> dict:
    if kind == "stat":
        return {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "colorMode": "value", "graphMode": "area", "textMode": "auto"}
    if kind == "table":
        return {"showHeader": True}
    return {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"}}


def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    return {
        "id": panel_id, "type": panel.kind, "title": panel.title, "description": panel.description,
        "datasource": DATASOURCE, "gridPos": {"h": PANEL_HEIGHT, "w": panel.width, "x": x, "y": y},
        "targets": _targets(panel.queries, panel.kind),
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": _options(panel.kind),
    }


def layout(rows: tuple[Row, ...]) -> list[dict]:
    """Row headers and their panels with ids and grid positions, top to bottom."""
    out: list[dict] = []
    next_id, y = 1, 0
    for row in rows:
        out.append({"id": next_id, "type": "row", "title": row.title, "collapsed": False, "panels": [],
                    "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
        next_id, y, x = next_id + 1, y + 1, 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y = 0, y + PANEL_HEIGHT
            out.append(panel_json(panel, next_id, x, y))
            next_id, x = next_id + 1, x + panel.width
        y += PANEL_HEIGHT
    return out


def dashboard(uid: str, title: str, description: str, variables: list[Variable], rows: tuple[Row, ...]) -> dict:
    """A complete dashboard: datasource variable first, then the query variables."""
    return {
        "uid": uid, "title": title, "description": description,
        "tags": ["ps3-platform"], "editable": False, "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION, "version": 1, "refresh": "30s", "timezone": "browser",
        "time": {"from": "now-6h", "to": "now"},
        "annotations": {"list": []}, "links": [],
        "templating": {"list": [datasource_variable(), *[query_variable(v) for v in variables]]},
        "panels": layout(rows),
    }
