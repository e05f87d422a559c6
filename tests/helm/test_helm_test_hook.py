"""The `helm test` script (files/helm-test/check_install.py) run against an API-server double.

The double serves the chart's rendered pool ConfigMap, the PyTorchJob list endpoint, and
answers SelfSubjectAccessReviews by evaluating the chart's rendered platformctl Role, so
the script's verdict is the chart's: it passes on a good install and names what is wrong
on a broken one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

CHECK = Path(__file__).resolve().parents[2] / "helm" / "ps3-platform" / "files" / "helm-test" / "check_install.py"
NAMESPACE = "ps3"


def allowed(rules: list[dict], attrs: dict) -> bool:
    """RBAC evaluation of one access review against a Role's rules (no wildcards to handle)."""
    resource = attrs["resource"] + (f"/{attrs['subresource']}" if attrs.get("subresource") else "")
    return any(attrs.get("group", "") in r["apiGroups"] and resource in r["resources"] and attrs["verb"] in r["verbs"]
               for r in rules)


class ClusterDouble:
    """Just the API surface check_install.py calls, answered from rendered chart objects."""

    def __init__(self, objects: list[dict], *, crd_installed: bool = True):
        self.configmaps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
        role = next(o for o in objects if o["kind"] == "Role" and o["metadata"]["name"].endswith("platformctl"))
        self.rules = role["rules"]
        self.crd_installed = crd_installed
        self.reviews: list[dict] = []

    def handle(self, method: str, path: str, body: dict | None) -> tuple[int, dict]:
        path = path.split("?")[0]
        if method == "GET" and path.startswith(f"/api/v1/namespaces/{NAMESPACE}/configmaps/"):
            cm = self.configmaps.get(path.rsplit("/", 1)[1])
            return (200, cm) if cm else (404, {"kind": "Status", "code": 404, "reason": "NotFound"})
        if method == "GET" and path == f"/apis/kubeflow.org/v1/namespaces/{NAMESPACE}/pytorchjobs":
            if not self.crd_installed:
                return 404, {"kind": "Status", "code": 404, "reason": "NotFound"}
            return 200, {"kind": "PyTorchJobList", "apiVersion": "kubeflow.org/v1", "metadata": {}, "items": []}
        if method == "POST" and path == "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews":
            attrs = body["spec"]["resourceAttributes"]
            self.reviews.append(attrs)
            return 201, {**body, "status": {"allowed": allowed(self.rules, attrs)}}
        return 404, {"kind": "Status", "code": 404, "reason": "NotFound"}


@pytest.fixture
def serve(tmp_path):
    servers = []

    def start(double: ClusterDouble) -> Path:
        class Handler(BaseHTTPRequestHandler):
            def _reply(self, method: str):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                code, payload = double.handle(method, self.path, body)
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._reply("GET")

            def do_POST(self):
                self._reply("POST")

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "double",
            "clusters": [{"name": "double", "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"}}],
            "users": [{"name": "test", "user": {"token": "t"}}],
            "contexts": [{"name": "double", "context": {"cluster": "double", "user": "test"}}]}))
        return kubeconfig

    yield start
    for server in servers:
        server.shutdown()


def run_check(kubeconfig: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "KUBECONFIG": str(kubeconfig), "POD_NAMESPACE": NAMESPACE, "CHECK_RBAC": "1", **env}
    return subprocess.run([sys.executable, str(CHECK)], check=False, capture_output=True, text=True, env=full_env,
                          timeout=60)


def rendered(chart_engine, values: dict) -> list[dict]:
    return [o for _, o in chart_engine.objects(chart_engine.render(values))]


def test_a_good_install_passes(chart_engine, all_on, serve):
    double = ClusterDouble(rendered(chart_engine, all_on))
    proc = run_check(serve(double), CHECK_ARGO="1", STORAGE_SECRET="s3-creds", AWS_ACCESS_KEY_ID="k",
                     AWS_SECRET_ACCESS_KEY="s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok   pools: a100, cpu, h100" in proc.stdout
    assert "ok   platformctl Role allows all 16 verbs" in proc.stdout
    assert {"verb": "get", "resource": "pods", "subresource": "log", "namespace": NAMESPACE} in \
        [{k: v for k, v in r.items() if v} for r in double.reviews]


def test_a_role_without_argo_verbs_fails_naming_them(chart_engine, serve):
    double = ClusterDouble(rendered(chart_engine, {}))  # argo off: no workflow verbs in the Role
    proc = run_check(serve(double), CHECK_ARGO="1")
    assert proc.returncode == 1
    assert "FAIL platformctl Role does not allow: create workflows.argoproj.io" in proc.stdout


def test_missing_crd_and_broken_pools_are_reported(chart_engine, serve):
    objects = rendered(chart_engine, {})
    pools = next(o for o in objects if o["metadata"]["name"] == "ps3-platform-pools")
    pools["data"]["pools.yaml"] = "pools:\n  h100:\n    gpus: 8\n"
    proc = run_check(serve(ClusterDouble(objects, crd_installed=False)))
    assert proc.returncode == 1
    assert "FAIL configmap ps3/ps3-platform-pools: invalid pool configuration" in proc.stdout
    assert "FAIL cannot list pytorchjobs.kubeflow.org/v1: 404" in proc.stdout
    assert "trainingOperator.install=true" in proc.stdout


def test_empty_storage_keys_fail(chart_engine, serve):
    proc = run_check(serve(ClusterDouble(rendered(chart_engine, {}))), STORAGE_SECRET="s3-creds",
                     AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="")
    assert proc.returncode == 1
    assert "FAIL storage secret 's3-creds' has empty AWS_SECRET_ACCESS_KEY" in proc.stdout
