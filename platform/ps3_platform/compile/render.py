"""Objects -> YAML that is byte-identical for the same input.

Keys are sorted (as `kubectl get -o yaml` prints them), shared sub-objects are never
written as anchors, and multi-line strings (the spec in the ConfigMap, Workflow
manifests) are block literals so they stay readable.
"""

from __future__ import annotations

import yaml


class _Dumper(yaml.SafeDumper):
    """Pure-Python safe dumper (the same bytes with or without libyaml)."""

    def ignore_aliases(self, data) -> bool:  # noqa: ARG002 - PyYAML hook
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(objects: list[dict]) -> str:
    """Multi-document YAML (`---` between objects), keys sorted, stable across runs."""
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=True, default_flow_style=False,
                         explicit_start=True, width=120, allow_unicode=True)


def manifest_yaml(obj: dict) -> str:
    """One object as a YAML document without the `---` marker (Argo resource manifests)."""
    return to_yaml([obj]).removeprefix("---\n")
