"""An HTTP test double of the Kubernetes API server, for the real `kubernetes` client.

It runs `http.server` on loopback in a thread and implements just the REST surface the
Kubernetes backend uses — namespaced get/list (label selectors)/create/replace/patch/
delete for ConfigMaps, Pods, PyTorchJobs and Argo Workflows, and pod logs (plain and
`follow=true`, streamed in chunks) — with the API server's real response shapes:
`Status` objects with reason/details/code for errors, `*List` kinds, server-set
metadata (uid, resourceVersion, creationTimestamp), Foreground deletion that keeps the
object (with a deletionTimestamp) for a few reads.

Every request is recorded (method, path, query, JSON body, headers) so tests assert the
exact calls. Paths the double does not serve answer 404 like an API server without the
CRD and are recorded in `unexpected`.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

CORE = "/api/v1"
NETWORKING = "/apis/networking.k8s.io/v1"
KUBEFLOW = "/apis/kubeflow.org/v1"
ARGO = "/apis/argoproj.io/v1alpha1"
_PATH = re.compile(r"^(?P<gv>/api/v1|/apis/[^/]+/[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)"
                   r"(?:/(?P<name>[^/]+)(?:/(?P<sub>log|status))?)?$")
_KINDS = {"configmaps": "ConfigMap", "pods": "Pod", "networkpolicies": "NetworkPolicy", "pytorchjobs": "PyTorchJob",
          "workflows": "Workflow", "events": "Event"}
_GROUPS = {"configmaps": "", "pods": "", "networkpolicies": "networking.k8s.io", "pytorchjobs": "kubeflow.org",
           "workflows": "argoproj.io", "events": ""}
T0 = "2026-11-24T07:00:00Z"

#: The two jobs the backend tests submit to the double (a 2-node TrainingJob and a 2-stage Pipeline).
TRAINING_SPEC = """
apiVersion: ps3.platform/v1
kind: TrainingJob
metadata: {name: exp}
spec:
  task: noop
  resources: {pool: cpu, nodes: 2}
  train: {globalBatch: 32, steps: 1000}
  checkpoint: {uri: "s3://ckpt/runs"}
"""
PIPELINE_SPEC = """
apiVersion: ps3.platform/v1
kind: Pipeline
metadata: {name: pipe}
spec:
  stages:
    - {name: prep, task: noop}
    - {name: fit, task: noop, dependsOn: [prep], train: {steps: 50}}
"""


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    headers: dict[str, str] = field(default_factory=dict, compare=False)

    def __iter__(self):  # lets tests compare against plain tuples
        return iter((self.method, self.path, self.query, self.body))

    def access(self) -> tuple[str, str, str] | None:
        """(API group, resource[/subresource], RBAC verb) this request needs; None off the namespaced API."""
        m = _PATH.match(self.path)
        if m is None:
            return None
        group = "" if m["gv"] == CORE else m["gv"].split("/")[2]
        resource = m["plural"] + (f"/{m['sub']}" if m["sub"] else "")
        named = m["name"] is not None
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch",
                "DELETE": "delete" if named else "deletecollection"}.get(self.method)
        if self.method == "GET":
            verb = "get" if named else ("watch" if self.query.get("watch") in ("true", "1") else "list")
        return group, resource, verb


def status_body(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "details": details if details is not None else {}, "code": code}


def _resource(plural: str) -> str:
    group = _GROUPS.get(plural, "")
    return f"{plural}.{group}" if group else plural


def _fields_match(obj: dict, fields: str) -> bool:
    """The API server's field selectors, as far as the backend uses them (`a.b=value`, ANDed)."""
    for term in filter(None, fields.split(",")):
        path, _, value = term.partition("=")
        target = obj
        for part in path.split("."):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        if target != value:
            return False
    return True


def _matches(labels: dict, selector: str) -> bool:
    for term in filter(None, selector.split(",")):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term not in labels:
            return False
    return True


def _merge(target: dict, patch: dict) -> dict:
    """JSON merge patch (RFC 7386); lists are replaced, which is also what strategic merge
    does for ownerReferences."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value
    return target


class ApiServerDouble:
    """State and behaviour of the fake API server; `start()` serves it on 127.0.0.1."""

    def __init__(self, *, token: str = "test-token", user: str = "alice"):
        self.token = token
        self.user = user
        self.requests: list[Request] = []
        self.unexpected: list[Request] = []
        self.store: dict[str, dict[str, dict]] = {}  # collection path -> name -> object
        self.installed = {CORE, NETWORKING, KUBEFLOW, ARGO}
        self.forbidden: set[tuple[str, str]] = set()  # (verb, plural)
        self.pod_logs: dict[tuple[str, str], list[str]] = {}
        self.follow_delay = 0.01
        self.linger_reads = 0  # GETs a Foreground-deleted object stays visible for
        self._lingering: dict[str, int] = {}
        self._lingering_obj: dict[str, dict] = {}
        self._uid = 0
        self._rv = 100
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None

    # ---- lifecycle --------------------------------------------------------------------
    def start(self) -> "ApiServerDouble":
        double = self

        class Handler(_Handler):
            server_double = double

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def write_kubeconfig(self, path: Path, *, namespace: str | None = "team-a", context: str = "double") -> Path:
        ctx = {"cluster": "double", "user": self.user}
        if namespace:
            ctx["namespace"] = namespace
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": context,
            "clusters": [{"name": "double", "cluster": {"server": self.url}}],
            "users": [{"name": self.user, "user": {"token": self.token}}],
            "contexts": [{"name": context, "context": ctx},
                         {"name": "other", "context": {"cluster": "double", "user": self.user, "namespace": "other-ns"}}],
        }
        path.write_text(json.dumps(config))
        return path

    # ---- fixtures for tests -----------------------------------------------------------
    def collection(self, gv: str, ns: str, plural: str) -> dict[str, dict]:
        return self.store.setdefault(f"{gv}/namespaces/{ns}/{plural}", {})

    def put(self, gv: str, ns: str, plural: str, obj: dict) -> dict:
        """Store `obj` as if it had been created (server-set metadata added)."""
        with self._lock:
            obj = json.loads(json.dumps(obj))
            self._stamp(obj, ns)
            self.collection(gv, ns, plural)[obj["metadata"]["name"]] = obj
            return obj

    def get(self, gv: str, ns: str, plural: str, name: str) -> dict | None:
        return self.collection(gv, ns, plural).get(name)

    def set_status(self, gv: str, ns: str, plural: str, name: str, status: dict) -> None:
        with self._lock:
            self.collection(gv, ns, plural)[name]["status"] = status

    def add_pod(self, ns: str, job_name: str, rtype: str, index: int, *, phase: str = "Running",
                logs: list[str] | None = None) -> dict:
        """A pod as the training operator creates it (names and labels of v1.9)."""
        name = f"{job_name}-{rtype}-{index}"
        labels = {"training.kubeflow.org/job-name": job_name, "training.kubeflow.org/operator-name": "pytorchjob-controller",
                  "training.kubeflow.org/replica-type": rtype, "training.kubeflow.org/replica-index": str(index)}
        if rtype == "master":
            labels["training.kubeflow.org/job-role"] = "master"
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
               "spec": {"containers": [{"name": "pytorch", "image": "ghcr.io/ps3-platform/ps3-platform:0.1.0"}]},
               "status": {"phase": phase}}
        if logs is not None:
            self.pod_logs[(ns, name)] = logs
        return self.put(CORE, ns, "pods", pod)

    def add_event(self, ns: str, involved: dict, reason: str, message: str, *, type: str = "Warning") -> dict:
        """An event about `involved` (an object of this double), as a controller records it."""
        meta = involved["metadata"]
        event = {"apiVersion": "v1", "kind": "Event", "metadata": {"name": f"{meta['name']}.{len(self.requests):x}"},
                 "involvedObject": {"kind": involved.get("kind"), "name": meta["name"], "namespace": ns},
                 "type": type, "reason": reason, "message": message, "lastTimestamp": T0}
        return self.put(CORE, ns, "events", event)

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    # ---- request handling -------------------------------------------------------------
    def _stamp(self, obj: dict, ns: str) -> None:
        meta = obj.setdefault("metadata", {})
        self._uid += 1
        self._rv += 1
        meta.setdefault("uid", f"00000000-0000-4000-8000-{self._uid:012d}")
        meta["resourceVersion"] = str(self._rv)
        meta.setdefault("creationTimestamp", T0)
        meta["namespace"] = ns
        meta.setdefault("generation", 1)

    def handle(self, req: Request) -> tuple[int, Any, str]:
        """(status code, body, content type); body is a dict, a str, or an iterator of str chunks."""
        with self._lock:
            self.requests.append(req)
        if req.headers.get("authorization") != f"Bearer {self.token}":
            return 401, status_body(401, "Unauthorized", "Unauthorized"), "application/json"
        m = _PATH.match(req.path)
        if not m or m["gv"] not in self.installed or m["plural"] not in _KINDS:
            self.unexpected.append(req)
            return 404, status_body(404, "NotFound", "the server could not find the requested resource"), "application/json"
        gv, ns, plural, name, sub = m["gv"], m["ns"], m["plural"], m["name"], m["sub"]
        verb = {"GET": "get" if name else "list", "POST": "create", "PUT": "update", "PATCH": "patch",
                "DELETE": "delete"}[req.method]
        if (verb, plural) in self.forbidden:
            message = (f'{_resource(plural)}{" " + repr(name).replace(chr(39), chr(34)) if name else ""} is forbidden: '
                       f'User "{self.user}" cannot {verb} resource "{plural}" in API group "{_GROUPS[plural]}" '
                       f'in the namespace "{ns}"')
            return 403, status_body(403, "Forbidden", message, {"name": name or "", "group": _GROUPS[plural],
                                                                   "kind": plural}), "application/json"
        with self._lock:
            if sub == "log":
                return self._log(ns, name, req.query)
            return getattr(self, f"_{verb}")(gv, ns, plural, name, req)

    def _not_found(self, plural: str, name: str):
        details = {"name": name, "kind": plural}
        if _GROUPS[plural]:
            details["group"] = _GROUPS[plural]
        return 404, status_body(404, "NotFound", f'{_resource(plural)} "{name}" not found', details), "application/json"

    def _get(self, gv, ns, plural, name, req):
        key = f"{gv}/namespaces/{ns}/{plural}/{name}"
        obj = self.collection(gv, ns, plural).get(name)
        if obj is None and self._lingering.get(key, 0) > 0:
            self._lingering[key] -= 1
            return 200, self._lingering_obj[key], "application/json"
        if obj is None:
            return self._not_found(plural, name)
        return 200, obj, "application/json"

    def _list(self, gv, ns, plural, name, req):
        selector = req.query.get("labelSelector", "")
        fields = req.query.get("fieldSelector", "")
        items = [o for _, o in sorted(self.collection(gv, ns, plural).items())
                 if _matches(o["metadata"].get("labels", {}), selector) and _fields_match(o, fields)]
        api_version = gv.removeprefix("/apis/").removeprefix("/api/")
        return 200, {"apiVersion": api_version, "kind": f"{_KINDS[plural]}List",
                     "metadata": {"resourceVersion": str(self._rv)}, "items": items}, "application/json"

    def _create(self, gv, ns, plural, name, req):
        obj = json.loads(json.dumps(req.body))
        name = obj.get("metadata", {}).get("name")
        if name in self.collection(gv, ns, plural):
            details = {"name": name, "kind": plural, **({"group": _GROUPS[plural]} if _GROUPS[plural] else {})}
            return 409, status_body(409, "AlreadyExists", f'{_resource(plural)} "{name}" already exists', details), \
                "application/json"
        self._stamp(obj, ns)
        self.collection(gv, ns, plural)[name] = obj
        return 201, obj, "application/json"

    def _update(self, gv, ns, plural, name, req):
        old = self.collection(gv, ns, plural).get(name)
        if old is None:
            return self._not_found(plural, name)
        obj = json.loads(json.dumps(req.body))
        obj["metadata"]["uid"] = old["metadata"]["uid"]
        obj["metadata"]["creationTimestamp"] = old["metadata"]["creationTimestamp"]
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        obj["metadata"]["namespace"] = ns
        self.collection(gv, ns, plural)[name] = obj
        return 200, obj, "application/json"

    def _patch(self, gv, ns, plural, name, req):
        old = self.collection(gv, ns, plural).get(name)
        if old is None:
            return self._not_found(plural, name)
        _merge(old, json.loads(json.dumps(req.body)))
        self._rv += 1
        old["metadata"]["resourceVersion"] = str(self._rv)
        return 200, old, "application/json"

    def _delete(self, gv, ns, plural, name, req):
        obj = self.collection(gv, ns, plural).pop(name, None)
        if obj is None:
            return self._not_found(plural, name)
        policy = (req.body or {}).get("propagationPolicy") or req.query.get("propagationPolicy")
        if policy == "Foreground":
            obj["metadata"]["deletionTimestamp"] = T0
            obj["metadata"]["finalizers"] = ["foregroundDeletion"]
            key = f"{gv}/namespaces/{ns}/{plural}/{name}"
            self._lingering[key] = self.linger_reads
            self._lingering_obj[key] = obj
            return 200, obj, "application/json"
        return 200, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                     "details": {"name": name, "kind": plural, "uid": obj["metadata"]["uid"]}}, "application/json"

    def _log(self, ns, name, query):
        pod = self.collection(CORE, ns, "pods").get(name)
        if pod is None:
            return self._not_found("pods", name)
        if pod["status"]["phase"] == "Pending":
            message = f'container "pytorch" in pod "{name}" is waiting to start: ContainerCreating'
            return 400, status_body(400, "BadRequest", message), "application/json"
        lines = list(self.pod_logs.get((ns, name), []))
        if "tailLines" in query:
            lines = lines[-int(query["tailLines"]):]
        text_lines = [line + "\n" for line in lines]
        if query.get("follow") == "true":
            return 200, self._stream(text_lines), "text/plain"
        return 200, "".join(text_lines), "text/plain"

    def _stream(self, lines: list[str]):
        for line in lines:
            time.sleep(self.follow_delay)
            # Split lines across chunks on purpose: the client must reassemble them.
            half = len(line) // 2
            yield line[:half]
            yield line[half:]


class _Handler(BaseHTTPRequestHandler):
    server_double: ApiServerDouble
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # small header+body writes would otherwise stall 40 ms each

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _serve(self) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        headers = {k.lower(): v for k, v in self.headers.items()}
        req = Request(self.command, parts.path, dict(parse_qsl(parts.query)), body, headers)
        code, payload, ctype = self.server_double.handle(req)
        if isinstance(payload, (dict, str)):
            data = (json.dumps(payload) if isinstance(payload, dict) else payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for chunk in payload:
                data = chunk.encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve


# ---- realistic status objects ------------------------------------------------------------
def _condition(ctype: str, status: str, job: str, reason: str | None = None, message: str | None = None) -> dict:
    verb = {"Created": "created", "Running": "running", "Restarting": "restarting", "Succeeded": "successfully completed",
            "Failed": "failed", "Suspended": "suspended"}[ctype]
    return {"type": ctype, "status": status, "reason": reason or f"PyTorchJob{ctype}",
            "message": message or f"PyTorchJob {job} is {verb}.", "lastUpdateTime": T0, "lastTransitionTime": T0}


def pytorchjob_status(job: str, phase: str, *, master: bool = True, workers: int = 1) -> dict:
    """`status` of a PyTorchJob in `phase`, shaped like training-operator v1.9 writes it.

    The operator appends the newest condition last; Succeeded/Failed/Suspended flip
    Running to False, Running and Restarting replace each other (pkg/util/status.go).
    """
    conditions = [_condition("Created", "True", job)]
    rtypes = (["Master"] if master else []) + (["Worker"] if workers else [])
    counts = {r: {"active": 0} for r in rtypes}
    if phase == "Running":
        conditions.append(_condition("Running", "True", job))
        for r in rtypes:
            counts[r] = {"active": 1 if r == "Master" else workers}
    elif phase == "Restarting":
        conditions.append(_condition("Restarting", "True", job, message=f"PyTorchJob {job} is restarting because 1 "
                                     "Worker replica(s) failed."))
        for r in rtypes:
            counts[r] = {"active": 1 if r == "Master" else max(workers - 1, 0)}
    elif phase in ("Succeeded", "Failed", "Suspended"):
        conditions.append(_condition("Running", "False", job))
        message = f"PyTorchJob {job} is failed because 1 Master replica(s) failed." if phase == "Failed" else None
        conditions.append(_condition(phase, "True", job, message=message))
        key = {"Succeeded": "succeeded", "Failed": "failed"}.get(phase)
        if key:
            main = "Master" if master else "Worker"
            counts[main] = {key: 1}
    for r in rtypes:
        counts[r]["selector"] = f"training.kubeflow.org/job-name={job},training.kubeflow.org/replica-type={r.lower()}"
    status: dict = {"conditions": conditions, "replicaStatuses": counts, "startTime": T0, "lastReconcileTime": T0}
    if phase in ("Succeeded", "Failed"):
        status["completionTime"] = "2026-11-24T08:00:00Z"
    return status


def workflow_status(phase: str, *, finished: bool | None = None) -> dict:
    status = {"phase": phase, "startedAt": T0, "progress": "1/2"}
    if finished or phase in ("Succeeded", "Failed", "Error"):
        status["finishedAt"] = "2026-11-24T09:00:00Z"
    return status
