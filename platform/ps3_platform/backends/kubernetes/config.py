"""Connecting to a cluster the way kubectl does: kubeconfig (file, context), else in-cluster.

A private `Configuration` per backend (never the client's global default), so two
backends in one process (tests, or several contexts) cannot leak settings into each other.
"""

from __future__ import annotations

import os
from pathlib import Path

from kubernetes import client, config
from kubernetes.config.config_exception import ConfigException

from ..base import BackendError

IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def kubeconfig_namespace(config_file: str | None, context: str | None) -> str | None:
    """The namespace the chosen kubeconfig context names, if any."""
    contexts, active = config.list_kube_config_contexts(config_file)
    chosen = next((c for c in contexts if c["name"] == context), None) if context else active
    return ((chosen or {}).get("context") or {}).get("namespace")


def connect(config_file: str | None = None, context: str | None = None) -> tuple[client.ApiClient, str]:
    """(API client, default namespace) from a kubeconfig, or in-cluster when there is none."""
    configuration = client.Configuration()
    explicit = config_file
    # Read $KUBECONFIG now: the client reads it once at import time. It may list several
    # files (':'-separated), which the client merges like kubectl.
    config_file = config_file or os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    try:
        config.load_kube_config(config_file=config_file, context=context, client_configuration=configuration,
                                persist_config=False)
        namespace = kubeconfig_namespace(config_file, context)
    except (ConfigException, OSError) as exc:
        if explicit or context:
            where = explicit or "the default kubeconfig"
            raise BackendError(f"cannot use {where}{f' context {context!r}' if context else ''}: {exc}") from None
        try:
            config.load_incluster_config(client_configuration=configuration)
        except ConfigException:
            raise BackendError("no Kubernetes configuration: no kubeconfig ($KUBECONFIG or ~/.kube/config) and not "
                               "running in a cluster; use --backend local") from None
        namespace = IN_CLUSTER_NAMESPACE.read_text().strip() if IN_CLUSTER_NAMESPACE.exists() else None
    return client.ApiClient(configuration), namespace or "default"
