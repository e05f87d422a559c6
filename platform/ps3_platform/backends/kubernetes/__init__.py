"""Kubernetes backend: PyTorchJobs (and Argo Workflows for Pipelines) via the API server."""

from .api import ApiMissing, Conflict, api_error
from .backend import KubernetesBackend
from .config import connect

__all__ = ["ApiMissing", "Conflict", "KubernetesBackend", "api_error", "connect", "fetch_pools"]


def fetch_pools(namespace: str | None = None, *, config_file: str | None = None, context: str | None = None):
    """Pool configuration from the cluster's `ps3-platform-pools` ConfigMap (for the CLI)."""
    return KubernetesBackend(config_file=config_file, context=context, namespace=namespace).fetch_pools()
