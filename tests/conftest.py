"""Fixtures shared by the whole suite: a real S3 server, an isolated platform home."""

from __future__ import annotations

import os

import pytest

from ps3_platform.testing import SeaweedS3


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server on loopback for the whole session; sets the AWS_* environment.

    Tests that need the store to go away (outage tests) should start their own SeaweedS3
    instead of stopping this shared one.
    """
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture(autouse=True)
def platform_home(tmp_path, monkeypatch):
    """Every test gets its own $PS3_PLATFORM_HOME so runs never leak between tests."""
    home = tmp_path / "ps3-home"
    monkeypatch.setenv("PS3_PLATFORM_HOME", str(home))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    return home
