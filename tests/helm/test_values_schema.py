"""Bad values fail at values.schema.json, before any template runs, naming the offending key."""

from __future__ import annotations

import pytest

BAD_VALUES = {
    "unknown pool field": ({"pools": {"h100": {"gpus": 8}}}, "/pools/h100", "additional properties 'gpus'"),
    "negative GPUs": ({"pools": {"h100": {"gpusPerNode": -1}}}, "/pools/h100/gpusPerNode", "minimum"),
    "storage on, no secret name": ({"storage": {"enabled": True}}, "/storage/secretName", "minLength"),
    "storage on, empty secret name": ({"storage": {"enabled": True, "secretName": ""}}, "/storage/secretName",
                                      "minLength"),
    "unknown top-level key": ({"monitoring": {"enabled": True}}, "at ''", "additional properties 'monitoring'"),
    "bad toleration operator": ({"pools": {"h100": {"tolerations": [{"key": "a", "operator": "Maybe"}]}}},
                                "/pools/h100/tolerations/0/operator", "'Exists', 'Equal'"),
    "pool name with capitals": ({"pools": {"H100": {"gpusPerNode": 8}}}, "invalid propertyName", "'H100'"),
}


@pytest.mark.parametrize("values,where,what", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_values_are_rejected_by_the_schema(chart_engine, values, where, what):
    with pytest.raises(chart_engine.ChartRenderError) as info:
        chart_engine.render(values)
    message = str(info.value)
    assert "values don't meet the specifications of the schema" in message
    assert where in message and what in message


@pytest.mark.parametrize("values,where,what", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_lint_reports_the_same_error(chart_engine, values, where, what):
    problems = chart_engine.lint(values)
    assert any(where in p and what in p for p in problems), problems


def test_storage_with_a_secret_name_is_accepted(chart_engine):
    objs = chart_engine.objects(chart_engine.render({"storage": {"enabled": True, "secretName": "s3-creds"}}))
    assert objs


def test_schema_rejects_what_the_compiler_would_reject():
    """The pool definition in the schema lists exactly the compiler's Pool fields (camelCase)."""
    import json
    from pathlib import Path

    from ps3_platform.spec import Pool

    schema = json.loads((Path(__file__).resolve().parents[2] / "helm" / "ps3-platform" / "values.schema.json")
                        .read_text())
    fields = {f.alias or name for name, f in Pool.model_fields.items()}
    assert set(schema["definitions"]["pool"]["properties"]) == fields
