"""manifests/render.py speaks to a `helm` binary the same way it uses helm-python-sdk.

No Helm binary is installed here, so a stand-in `helm` prints the in-process render in
`helm template`'s stream format (`---` + `# Source: <template>` per document); the test
checks that the binary path parses it back into the same objects and surfaces errors.
"""

from __future__ import annotations

import stat
import sys
import textwrap

FAKE_HELM = textwrap.dedent('''\
    #!{python}
    """Stand-in for `helm template NAME CHART --namespace NS --values FILE` (helm-python-sdk inside)."""
    import json, sys
    from helm_python import Chart, HelmError
    args = sys.argv[1:]
    assert args[0] == "template", args
    name, chart = args[1], args[2]
    namespace = args[args.index("--namespace") + 1]
    values = json.load(open(args[args.index("--values") + 1]))
    try:
        rendered = Chart.load(chart).render(values, name=name, namespace=namespace)
    except HelmError as exc:
        print("Error: " + str(exc), file=sys.stderr)
        sys.exit(1)
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in text.split("\\n---\\n"):
            if doc.strip():
                print("---\\n# Source: " + path + "\\n" + doc.strip("\\n").removeprefix("---\\n"))
''')


def test_binary_engine_parses_helm_template_output(chart_engine, tmp_path, monkeypatch, all_on):
    helm = tmp_path / "helm"
    helm.write_text(FAKE_HELM.format(python=sys.executable))
    helm.chmod(helm.stat().st_mode | stat.S_IEXEC)
    expected = chart_engine.objects(chart_engine.render(all_on))
    monkeypatch.setenv("PS3_HELM", str(helm))
    assert chart_engine.engine() == "binary"
    got = chart_engine.objects(chart_engine.render(all_on))
    assert sorted((o["kind"], o["metadata"]["name"]) for _, o in got) == \
        sorted((o["kind"], o["metadata"]["name"]) for _, o in expected)
    assert [o for _, o in got if o["kind"] == "PrometheusRule"] == \
        [o for _, o in expected if o["kind"] == "PrometheusRule"]


def test_binary_engine_reports_helm_errors(chart_engine, tmp_path, monkeypatch):
    helm = tmp_path / "helm"
    helm.write_text(FAKE_HELM.format(python=sys.executable))
    helm.chmod(helm.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PS3_HELM", str(helm))
    try:
        chart_engine.render({"pools": {"h100": {"gpusPerNode": -2}}})
    except chart_engine.ChartRenderError as exc:
        assert "/pools/h100/gpusPerNode" in str(exc)
    else:
        raise AssertionError("negative GPUs rendered through the binary engine")
