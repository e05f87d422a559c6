"""fsspec access to data URIs, with S3 settings taken from the environment.

Specs never carry credentials: in a cluster a Secret provides the standard AWS variables,
locally the user's shell does. fsspec only reads `FSSPEC_S3_*` once, at import, so the
endpoint is looked up again on every call; tests that start an S3 server late still work.
"""

from __future__ import annotations

import os
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

#: Environment variables naming an S3-compatible endpoint, in order of preference.
S3_ENDPOINT_VARS = ("FSSPEC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def storage_options(uri: str) -> dict[str, Any]:
    """fsspec keyword arguments for `uri`'s protocol from the environment (empty if none)."""
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    if protocol not in ("s3", "s3a"):
        return {}
    # Bounded requests, one attempt each: the loader's own retries (ps3/data/retry.py) own the
    # waiting through an outage and log every failure.
    options: dict[str, Any] = {"config_kwargs": {"connect_timeout": 10, "read_timeout": 20,
                                                 "retries": {"max_attempts": 1}}}
    endpoint = next((os.environ[v] for v in S3_ENDPOINT_VARS if os.environ.get(v)), None)
    if endpoint:
        options["endpoint_url"] = endpoint
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        options["key"] = os.environ["AWS_ACCESS_KEY_ID"]
        options["secret"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        options["client_kwargs"] = {"region_name": region}
    return options


def filesystem(uri: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem serving `uri` and the path inside it (no protocol, no trailing slash)."""
    fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri))
    return fs, path.rstrip("/")


def join(uri: str, *parts: str) -> str:
    """`uri` with path parts appended by '/' (fsspec URLs always use '/')."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def fs_uri(fs: AbstractFileSystem, path: str) -> str:
    """A URL for `path` on `fs` that names its protocol, for messages and indexes."""
    return fs.unstrip_protocol(path)
