"""Object storage for the runtime: fsspec URL -> filesystem, and retries for transient errors.

Specs carry only URLs (`file://...`, `s3://bucket/prefix`); the endpoint and credentials
come from the environment, which in cluster is filled from the Secret the spec names
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL` or
`FSSPEC_S3_ENDPOINT_URL`, `AWS_DEFAULT_REGION`). Nothing here knows about checkpoints.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import fsspec

log = logging.getLogger(__name__)
T = TypeVar("T")
_STREAM_BLOCK = 16 << 20  # bytes per read when streaming objects (s3fs fetches ahead by this much)

#: Errors a retry cannot fix: a bug or a malformed URL on our side. Everything else is
#: retried until the budget runs out, including "access denied" and "no such bucket": a
#: store that is restarting answers both for a few seconds before its config is loaded,
#: and a real misconfiguration still surfaces (logged at every attempt, raised at the end).
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (TypeError, ValueError, AttributeError, NotImplementedError)


class StorageError(RuntimeError):
    """A storage operation kept failing until its retry budget ran out (or failed permanently)."""


class StorageConfigError(StorageError):
    """A store that no retry will make usable: no credentials, no such bucket, access denied."""


#: Seconds one storage request may make no progress (connect, or wait on its socket) before it
#: fails and is retried. botocore applies it to each socket operation, not to the transfer, so
#: it bounds a frozen store without cutting off a large object that is still moving.
DEFAULT_REQUEST_TIMEOUT_S = 20.0
#: Slowest upload rate still taken for progress when sizing a write's whole-call timeout.
MIN_WRITE_BYTES_PER_S = 4 << 20


def storage_options(uri: str, env: dict[str, str] | None = None, *,
                    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S) -> dict[str, Any]:
    """fsspec options for `uri` taken from the environment (empty for non-S3 URLs)."""
    env = os.environ if env is None else env
    if fsspec.utils.get_protocol(uri) not in ("s3", "s3a"):
        return {}
    options: dict[str, Any] = {
        # One attempt per request: our own retry loop owns the waiting (with a budget) and
        # logs every failure, so a stuck store shows in the log within one timeout.
        "config_kwargs": {"connect_timeout": min(10.0, request_timeout_s), "read_timeout": request_timeout_s,
                          "retries": {"max_attempts": 1}},
    }
    if key := env.get("AWS_ACCESS_KEY_ID"):
        options["key"] = key
        options["secret"] = env.get("AWS_SECRET_ACCESS_KEY", "")
    client: dict[str, str] = {}
    if endpoint := env.get("FSSPEC_S3_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL"):
        client["endpoint_url"] = endpoint
    if region := env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"):
        client["region_name"] = region
    if client:
        options["client_kwargs"] = client
    return options


@dataclass(frozen=True)
class Location:
    """A directory on some fsspec filesystem: the filesystem, its root path and the URL."""

    fs: fsspec.AbstractFileSystem
    root: str  # path in the filesystem's own form: "bucket/a/b" for s3, "/a/b" for file
    url: str
    options: dict[str, Any]
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S

    def _bounded(self, nbytes: int) -> dict[str, float]:
        """A whole-call timeout for writes to object storage, sized to the object: a PUT to a
        frozen store waits for its `100-continue` outside botocore's socket timeouts and would
        hang until the store wakes up. Local filesystems take no such argument."""
        if not getattr(self.fs, "async_impl", False):
            return {}
        return {"timeout": self.request_timeout_s + nbytes / MIN_WRITE_BYTES_PER_S}

    @property
    def is_local(self) -> bool:
        return "file" in _protocols(self.fs)

    def path(self, *parts: str) -> str:
        """Path of `parts` under the root, in the filesystem's form."""
        return "/".join([self.root.rstrip("/"), *parts])

    def url_of(self, *parts: str) -> str:
        """Full URL of `parts` under the root (what DCP's fsspec reader/writer take)."""
        return "/".join([self.url.rstrip("/"), *parts])

    def ensure_dir(self, path: str) -> None:
        """Create `path` on local filesystems; object stores have no directories to create."""
        if self.is_local:
            self.fs.makedirs(path, exist_ok=True)

    def fresh(self, path: str) -> None:
        """Forget cached listings under `path` so other processes' writes are seen."""
        self.fs.invalidate_cache(path)

    def put_file(self, local: Path, path: str) -> None:
        if self.is_local:
            self.fs.makedirs(self.fs._parent(path), exist_ok=True)
        self.fs.put_file(str(local), path, **self._bounded(local.stat().st_size))

    def download(self, path: str, local: Path) -> str:
        """Stream an object to a local file (one sequential read) and return its sha256."""
        digest = hashlib.sha256()
        # A cached listing may hold an older ETag of an overwritten object (s3fs then raises
        # FileExpired on every read); always ask the store afresh.
        self.fs.invalidate_cache(path)
        with self.fs.open(path, "rb", block_size=_STREAM_BLOCK) as src, local.open("wb") as dst:
            while chunk := src.read(_STREAM_BLOCK):
                digest.update(chunk)
                dst.write(chunk)
        return digest.hexdigest()

    def move_tree(self, source: str, target: str) -> None:
        """Move every file under `source` to the same place under `target`. A rename on local
        disks; on object stores copy-then-delete file by file (s3fs's recursive mv fails on the
        directory key it tries to remove last), so an interrupted move can simply be rerun."""
        if self.is_local:
            self.fs.makedirs(self.fs._parent(target), exist_ok=True)
            self.fs.mv(source, target, recursive=True)
            return
        self.fs.invalidate_cache(source)
        files = self.fs.find(source)
        for path in files:
            self.fs.copy(path, f"{target}/{path[len(source):].lstrip('/')}", **self._bounded(0))
        if files:
            self.fs.rm(files)
        self.fs.invalidate_cache(source)

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a small object; on local disks via rename so a crash never leaves half a file."""
        if self.is_local:
            self.fs.makedirs(self.fs._parent(path), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)
        else:
            self.fs.pipe_file(path, data, **self._bounded(len(data)))


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def open_location(url: str, options: dict[str, Any] | None = None) -> Location:
    """Resolve a URL to a `Location`; plain paths are local. Options default to the environment."""
    if "://" not in url:
        url = f"file://{Path(url).resolve()}"
    options = storage_options(url) if options is None else options
    fs, root = fsspec.core.url_to_fs(url, **options)
    if hasattr(fs, "retries"):  # s3fs retries timeouts 5 times on its own, silently: ours log each one
        fs.retries = 1
    timeout = options.get("config_kwargs", {}).get("read_timeout", DEFAULT_REQUEST_TIMEOUT_S)
    return Location(fs=fs, root=root.rstrip("/") or root, url=url.rstrip("/"), options=options,
                    request_timeout_s=float(timeout))


@dataclass(kw_only=True, slots=True)
class RetryPolicy:
    """How long and how often a storage operation is retried."""

    budget_s: float = 300.0
    """Total time one logical operation (e.g. a checkpoint upload) may spend retrying."""
    first_delay_s: float = 0.5
    """Wait after the first failure; doubles after each further failure."""
    max_delay_s: float = 8.0
    """Cap on the wait, so a store that comes back is noticed within seconds."""

    def __post_init__(self) -> None:
        if self.budget_s < 0 or self.first_delay_s <= 0 or self.max_delay_s < self.first_delay_s:
            raise ValueError(f"bad retry policy {self}: need budget_s >= 0 and 0 < first_delay_s <= max_delay_s")


class StorageAbandonedError(StorageError):
    """The caller gave up on an operation between two attempts (a worker told to stop)."""


def retry(fn: Callable[[], T], *, what: str, deadline: float, policy: RetryPolicy,
          on_failure: Callable[[str, BaseException, int, float | None], None] | None = None,
          abandoned: Callable[[], bool] | None = None) -> T:
    """Call `fn` until it succeeds, with exponential backoff, until `deadline` (time.monotonic()).

    `on_failure(what, error, attempt, delay)` runs after every failed attempt (the caller
    logs and counts it); `delay` is None when no retry follows. Permanent errors and the
    last failure past the deadline raise `StorageError` naming `what`, chained to the cause.
    `abandoned()` is polled while waiting to retry; when it turns true the wait ends in
    `StorageAbandonedError`, so a worker that must stop is not held by a backoff.
    """
    delay = policy.first_delay_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except PERMANENT_ERRORS as exc:
            if on_failure is not None:
                on_failure(what, exc, attempt, None)
            raise StorageError(f"{what} failed permanently: {type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if on_failure is not None:
                    on_failure(what, exc, attempt, None)
                raise StorageError(
                    f"{what} still failing after {attempt} attempts (retry budget spent): "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            wait = min(delay, remaining)
            if on_failure is not None:
                on_failure(what, exc, attempt, wait)
            if _sleep_unless(wait, abandoned):
                raise StorageAbandonedError(f"{what} abandoned after {attempt} attempts: {type(exc).__name__}: {exc}") from exc
            delay = min(delay * 2, policy.max_delay_s)


def _sleep_unless(seconds: float, abandoned: Callable[[], bool] | None) -> bool:
    """Sleep `seconds`, polling `abandoned` every 0.1 s; True if it turned true."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if abandoned is not None and abandoned():
            return True
        time.sleep(min(0.1, left))
    return abandoned is not None and abandoned()


def check_storage(url: str, *, timeout_s: float = 10.0, env: dict[str, str] | None = None) -> None:
    """Fail fast, in one line naming the URL and the fix, when `url`'s object store cannot be used
    (no credentials, access denied, no such bucket, endpoint unreachable or silent).

    One listing of the bucket with short timeouts, bounded by `timeout_s` even when the store
    accepts the connection and never answers. Local paths are not checked. Run at submit and
    at each worker's start: a misconfiguration would otherwise be retried for the whole budget.
    Raises StorageConfigError for what no retry fixes, StorageError for an endpoint that is
    down or silent (maybe an outage a worker should ride out).
    """
    if "://" not in url or fsspec.utils.get_protocol(url) not in ("s3", "s3a"):
        return
    env = os.environ if env is None else env
    options = storage_options(url, env)
    options["config_kwargs"] = {"connect_timeout": timeout_s, "read_timeout": timeout_s,
                                "retries": {"max_attempts": 1}}
    endpoint = options.get("client_kwargs", {}).get("endpoint_url", "AWS")
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    outcome: dict[str, BaseException | None] = {}

    def probe() -> None:
        try:
            fs, _ = fsspec.core.url_to_fs(url, skip_instance_cache=True, **options)
            fs.ls(bucket, refresh=True)
            outcome["error"] = None
        except BaseException as exc:  # noqa: BLE001 - classified below
            outcome["error"] = exc

    thread = threading.Thread(target=probe, name="ps3-storage-check", daemon=True)
    thread.start()
    thread.join(timeout_s + 5.0)
    if "error" not in outcome:
        raise StorageError(f"{url}: the S3 endpoint {endpoint} did not answer within {timeout_s:.0f} s "
                           f"(is the store up? check AWS_ENDPOINT_URL)")
    error = outcome["error"]
    if error is None:
        return
    name = type(error).__name__
    if name == "NoCredentialsError":
        raise StorageConfigError(f"{url}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                           f"(on a cluster, the Secret the spec names)") from None
    if isinstance(error, FileNotFoundError):
        raise StorageConfigError(f"{url}: bucket {bucket!r} does not exist at {endpoint}: create it or fix the URI") from None
    if isinstance(error, PermissionError):
        raise StorageConfigError(f"{url}: access to bucket {bucket!r} at {endpoint} denied: check the credentials "
                           f"(AWS_ACCESS_KEY_ID) and their permissions") from None
    detail = " ".join(str(error).split())[:200]
    raise StorageError(f"{url}: cannot use the S3 endpoint {endpoint}: {name}: {detail} "
                       f"(check AWS_ENDPOINT_URL and the network)") from None
