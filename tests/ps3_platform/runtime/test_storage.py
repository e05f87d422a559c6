"""`check_storage`: an unusable object store is one line naming the URL and the fix, within seconds."""

from __future__ import annotations

import socket
import time

import pytest
from ps3_platform.runtime.storage import StorageConfigError, StorageError, check_storage

CREDS = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}


def _closed_port() -> int:
    """Port 1 on loopback: privileged and unused, so nothing started by other tests can answer."""
    return 1


def _refused(message: str, url: str, env: dict, within: float, kind=StorageError) -> None:
    start = time.monotonic()
    with pytest.raises(kind) as caught:
        check_storage(url, timeout_s=2.0, env=env)
    assert time.monotonic() - start < within
    text = str(caught.value)
    assert "\n" not in text and text.startswith(f"{url}: ") and message in text, text


@pytest.mark.faults
def test_missing_credentials(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}", "AWS_DEFAULT_REGION": "us-east-1"}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    _refused("no S3 credentials: set AWS_ACCESS_KEY_ID", "s3://ckpt/run", env, within=10, kind=StorageConfigError)


@pytest.mark.faults
def test_unreachable_endpoint():
    env = CREDS | {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}"}
    _refused("cannot use the S3 endpoint http://127.0.0.1:", "s3://ckpt/run", env, within=10)
    with pytest.raises(StorageError) as caught:  # down, not misconfigured: a worker may ride it out
        check_storage("s3://ckpt/run", timeout_s=2.0, env=env)
    assert not isinstance(caught.value, StorageConfigError)


@pytest.mark.faults
def test_silent_endpoint_is_bounded():
    with socket.socket() as listener:  # accepts connections (the backlog) and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        env = CREDS | {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{listener.getsockname()[1]}"}
        _refused("", "s3://ckpt/run", env, within=10)


@pytest.mark.s3
@pytest.mark.faults
def test_missing_bucket_and_a_usable_one(s3_server):
    import os

    env = dict(os.environ) | s3_server.env  # the server's credentials, whatever other tests did to the environment
    _refused("bucket 'no-such-bucket' does not exist", "s3://no-such-bucket/run", env, within=10,
             kind=StorageConfigError)
    check_storage(s3_server.make_bucket("usable"), env=env)
    check_storage("file:///nowhere/at/all", env=env)  # local paths: nothing to check
