"""A small dict-in, dict-out layer over the `kubernetes` client, with one-line errors.

Everything the backend does is get/list/create/replace/patch/delete of five resources
plus pod logs, so they are addressed uniformly by a `Resource` descriptor instead of
the client's per-kind method names. Responses are read as plain JSON (`_preload_content
=False`): the backend needs a few fields, not the client's typed models.

API errors become `BackendError`s that say what to do: a 404 on a resource *type*
(no details.name in the Status, or no JSON at all) means the CRD is not installed; 403
names the verb and resource the user lacks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from ..base import BackendError, JobNotFoundError

#: Seconds for one API call (log streams with follow have no read timeout).
REQUEST_TIMEOUT_S = 30


@dataclass(frozen=True)
class Resource:
    kind: str
    plural: str
    group: str = ""  # "" = core API
    version: str = "v1"
    missing_api: str = ""  # message when the API (CRD) is not served
    typed: str = ""  # built-in kinds: the typed client's method stem ("config_map"); "" = custom object

    @property
    def qualified(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


CONFIGMAP = Resource("ConfigMap", "configmaps", typed="config_map")
POD = Resource("Pod", "pods", typed="pod")
NETWORKPOLICY = Resource("NetworkPolicy", "networkpolicies", "networking.k8s.io", typed="network_policy")
PYTORCHJOB = Resource(
    "PyTorchJob", "pytorchjobs", "kubeflow.org", "v1",
    "PyTorchJob CRD not installed in cluster: install the Kubeflow training operator or "
    "`helm install ps3-platform --set trainingOperator.install=true`")
WORKFLOW = Resource(
    "Workflow", "workflows", "argoproj.io", "v1alpha1",
    "Argo Workflow CRD not installed in cluster: Pipelines need Argo Workflows (install it, or enable it in the "
    "ps3-platform chart), or submit each stage as a TrainingJob")

EVENT = Resource("Event", "events", typed="event")

#: Only for error messages: RBAC names logs as the `pods/log` subresource.
POD_LOG = Resource("Pod", "pods/log", typed="pod")


class ApiMissing(BackendError):
    """The resource type is not served (CRD not installed)."""


class Conflict(BackendError):
    """The object already exists (HTTP 409)."""


def _status_body(exc: ApiException) -> dict | None:
    try:
        body = json.loads(exc.body or "")
    except (TypeError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def api_error(exc: ApiException, verb: str, res: Resource, name: str | None, namespace: str) -> BackendError:
    """Translate an API error into a one-line BackendError."""
    body = _status_body(exc)
    message = " ".join(str((body or {}).get("message") or exc.reason or exc.body or "").split())
    target = f"{res.kind} {name!r}" if name else res.qualified
    details = (body or {}).get("details") or {}
    if exc.status == 404 and verb == "create" and details.get("kind") == "namespaces":
        return BackendError(f"namespace {namespace!r} does not exist; create it or choose another with -n")
    if exc.status == 404:
        if not res.typed and not ((body or {}).get("details") or {}).get("name"):
            return ApiMissing(res.missing_api)
        return JobNotFoundError(f"{target} not found in namespace {namespace!r}")
    if exc.status == 403:
        return BackendError(f"permission denied: cannot {verb} {res.qualified} in namespace {namespace!r} "
                            f"({message}); ask a cluster admin for a Role that allows {verb!r} on {res.qualified}")
    if exc.status == 401:
        return BackendError(f"unauthorized: the API server rejected your credentials ({message}); "
                            "refresh your kubeconfig login")
    if exc.status == 400:
        return BackendError(f"{target}: {message}")
    if exc.status == 409:
        return Conflict(f"conflict: {target} in namespace {namespace!r}: {message}")
    if exc.status == 422:
        return BackendError(f"the API server rejected {target}: {message}")
    return BackendError(f"{verb} {target} in namespace {namespace!r} failed: HTTP {exc.status} {exc.reason}: {message}")


class Kube:
    """Namespaced CRUD on `Resource`s as plain dicts; every failure is a BackendError."""

    def __init__(self, api_client: client.ApiClient):
        self.api_client = api_client
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self._typed = {"": self.core, "networking.k8s.io": client.NetworkingV1Api(api_client)}

    @property
    def host(self) -> str:
        return self.api_client.configuration.host

    def _call(self, verb: str, res: Resource, name: str | None, ns: str, fn: Callable, *args, **kwargs) -> Any:
        kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT_S)
        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            raise api_error(exc, verb, res, name, ns) from None
        except urllib3.exceptions.HTTPError as exc:
            reason = getattr(exc, "reason", None) or exc
            raise BackendError(f"cannot reach the Kubernetes API server at {self.host}: {reason}") from None

    def _method(self, verb: str, res: Resource) -> tuple[Callable, tuple]:
        if not res.typed:
            return getattr(self.custom, f"{verb}_namespaced_custom_object"), (res.group, res.version)
        return getattr(self._typed[res.group], f"{verb}_namespaced_{res.typed}"), ()

    def _json(self, verb: str, res: Resource, name: str | None, ns: str, *args, **kwargs) -> dict:
        api_verb = {"get": "get" if not res.typed else "read"}.get(verb, verb)
        fn, prefix = self._method(api_verb, res)
        if not res.typed:
            call_args = (*prefix, ns, res.plural, *args)
        elif verb in ("list", "create"):
            call_args = (ns, *args)
        else:
            call_args = (args[0], ns, *args[1:])
        response = self._call(verb, res, name, ns, fn, *call_args, _preload_content=False, **kwargs)
        return json.loads(response.data or b"{}")

    def get(self, res: Resource, name: str, ns: str, *, missing_api_ok: bool = False) -> dict | None:
        """The object, or None when it (or, with missing_api_ok, its whole API) does not exist."""
        try:
            return self._json("get", res, name, ns, name)
        except ApiMissing:
            if missing_api_ok:
                return None
            raise
        except JobNotFoundError:
            return None

    def list(self, res: Resource, ns: str, selector: str, *, fields: str = "",
             missing_api_ok: bool = False) -> list[dict]:
        """Objects matching the label `selector` (and the field selector `fields`, if given)."""
        extra = {"field_selector": fields} if fields else {}
        try:
            return self._json("list", res, None, ns, label_selector=selector, **extra).get("items", [])
        except ApiMissing:
            if missing_api_ok:
                return []
            raise

    def create(self, res: Resource, body: dict, ns: str) -> dict:
        return self._json("create", res, body["metadata"]["name"], ns, body)

    def replace(self, res: Resource, body: dict, ns: str) -> dict:
        name = body["metadata"]["name"]
        return self._json("replace", res, name, ns, name, body)

    def patch(self, res: Resource, name: str, body: dict, ns: str) -> dict:
        return self._json("patch", res, name, ns, name, body)

    def delete(self, res: Resource, name: str, ns: str, *, missing_api_ok: bool = True) -> bool:
        """Delete with Foreground propagation (dependents first); False when it was not there."""
        options = client.V1DeleteOptions(propagation_policy="Foreground")
        try:
            self._json("delete", res, name, ns, name, body=options)
        except ApiMissing:
            if missing_api_ok:
                return False
            raise
        except JobNotFoundError:
            return False
        return True

    def pod_log(self, pod: str, ns: str, *, tail_lines: int | None = None) -> str:
        fn = self.core.read_namespaced_pod_log
        kwargs = {"container": "pytorch", "_preload_content": False}
        if tail_lines is not None:
            kwargs["tail_lines"] = tail_lines
        response = self._call("get", POD_LOG, pod, ns, fn, pod, ns, **kwargs)
        return response.data.decode(errors="replace")

    def pod_log_stream(self, pod: str, ns: str) -> urllib3.HTTPResponse:
        """An open streaming response of the pod's log (`follow=true`); the caller closes it."""
        fn = self.core.read_namespaced_pod_log
        return self._call("get", POD_LOG, pod, ns, fn, pod, ns, container="pytorch",
                          follow=True, _preload_content=False, _request_timeout=None)
