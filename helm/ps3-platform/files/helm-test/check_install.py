"""`helm test` check, run in the platform image inside the cluster after an install.

Proves what platformctl relies on: the pool ConfigMap parses with the compiler's own
parser, the PyTorchJob API is served, the platformctl Role grants every verb the CLI
uses, and (when storage is on) the credentials Secret has both keys. Exits non-zero
with one line per failure.
"""

from __future__ import annotations

import os
import sys

from kubernetes import client, config
from kubernetes.client.rest import ApiException
from ps3_platform.spec import POOLS_CONFIGMAP, POOLS_KEY, PoolConfigError, parse_pools

#: (verb, API group, resource, subresource) platformctl submit/status/logs/cancel need.
PLATFORMCTL_ACCESS = [
    *[(v, "kubeflow.org", "pytorchjobs", "") for v in ("create", "get", "list", "delete")],
    *[(v, "", "configmaps", "") for v in ("create", "get", "list", "patch", "delete")],
    ("list", "", "pods", ""),
    ("get", "", "pods", "log"),
    ("list", "", "events", ""),
]
ARGO_ACCESS = [(v, "argoproj.io", "workflows", "") for v in ("create", "get", "list", "delete")]
NETWORK_POLICY_ACCESS = [(v, "networking.k8s.io", "networkpolicies", "") for v in ("create", "get", "patch", "delete")]


def check_pools(core: client.CoreV1Api, namespace: str) -> list[str]:
    try:
        data = core.read_namespaced_config_map(POOLS_CONFIGMAP, namespace).data or {}
        pools = parse_pools(data.get(POOLS_KEY, ""), f"configmap {namespace}/{POOLS_CONFIGMAP}")
    except ApiException as exc:
        return [f"cannot read configmap {namespace}/{POOLS_CONFIGMAP}: {exc.status} {exc.reason}"]
    except PoolConfigError as exc:  # names the ConfigMap and what is wrong with it
        return [str(exc)]
    print(f"ok   pools: {', '.join(sorted(pools.pools))}")
    return []


def check_pytorchjob_api(custom: client.CustomObjectsApi, namespace: str) -> list[str]:
    try:
        custom.list_namespaced_custom_object("kubeflow.org", "v1", namespace, "pytorchjobs", limit=1)
    except ApiException as exc:
        hint = " (is the training operator installed? trainingOperator.install=true)" if exc.status == 404 else ""
        return [f"cannot list pytorchjobs.kubeflow.org/v1: {exc.status} {exc.reason}{hint}"]
    print("ok   pytorchjobs.kubeflow.org/v1 is served")
    return []


def check_access(authz: client.AuthorizationV1Api, namespace: str, wanted: list[tuple]) -> list[str]:
    failures = []
    for verb, group, resource, sub in wanted:
        attrs = client.V1ResourceAttributes(namespace=namespace, verb=verb, group=group, resource=resource,
                                            subresource=sub or None)
        review = client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(resource_attributes=attrs))
        allowed = authz.create_self_subject_access_review(review).status.allowed
        name = f"{verb} {resource}{'/' + sub if sub else ''}{'.' + group if group else ''}"
        if not allowed:
            failures.append(f"platformctl Role does not allow: {name}")
    if not failures:
        print(f"ok   platformctl Role allows all {len(wanted)} verbs")
    return failures


def check_storage() -> list[str]:
    missing = [k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not os.environ.get(k)]
    if missing:
        return [f"storage secret {os.environ.get('STORAGE_SECRET')!r} has empty {', '.join(missing)}"]
    print("ok   storage secret has both keys")
    return []


def load_config() -> None:
    """The pod's ServiceAccount in the cluster; $KUBECONFIG's context when run elsewhere."""
    if os.environ.get("KUBECONFIG"):
        config.load_kube_config()
    else:
        config.load_incluster_config()


def main() -> int:
    load_config()
    namespace = os.environ["POD_NAMESPACE"]
    failures = check_pools(client.CoreV1Api(), namespace)
    failures += check_pytorchjob_api(client.CustomObjectsApi(), namespace)
    if os.environ.get("CHECK_RBAC") == "1":
        wanted = (PLATFORMCTL_ACCESS + (ARGO_ACCESS if os.environ.get("CHECK_ARGO") == "1" else [])
                  + (NETWORK_POLICY_ACCESS if os.environ.get("CHECK_NETWORK_POLICIES") == "1" else []))
        failures += check_access(client.AuthorizationV1Api(), namespace, wanted)
    if os.environ.get("STORAGE_SECRET"):
        failures += check_storage()
    for failure in failures:
        print(f"FAIL {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
