"""The worker's composition root: what it refuses before any training starts."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time

import pytest

from ps3_platform.runtime import build
from ps3_platform.runtime.build import RunSetupError, _check_stores
from ps3_platform.runtime.storage import StorageConfigError, StorageError
from ps3_platform.spec import load_text, resolved, stages_of

SPEC = """
apiVersion: ps3.platform/v1
kind: TrainingJob
metadata: {name: stores}
spec:
  task: noop
  resources: {pool: cpu, procsPerNode: 1}
  train: {globalBatch: 2, microBatch: 2, steps: 3, optimizer: {lr: 0.01}}
  data:
    sources: [{name: web, uri: "s3://train-data/web"}]
    evalSources: [{name: held, uri: "s3://eval-data/held"}]
"""


@pytest.mark.faults
def test_a_data_source_without_credentials_stops_the_worker_in_one_line(tmp_path):
    """Issue 20: the worker checks every store it names at start, data sources included, and
    exits 2 (permanent) with one line naming the URI and the fix; it does not retry for minutes."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(json.dumps(resolved(load_text(SPEC).job)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_S3_"))}
    env |= {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
            "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookup for credentials
            "PS3_RUN_DIR": str(tmp_path / "run"), "PS3_METRICS_PORT": "0"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ps3_platform.runtime", "--spec", str(spec), "--stage", "train"],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert time.monotonic() - start < 30, proc.stderr
    assert "Traceback" not in proc.stderr
    (error,) = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert "s3://train-data/web: no S3 credentials: set AWS_ACCESS_KEY_ID" in error, proc.stderr
    assert not (tmp_path / "run" / "train" / "metrics.jsonl").exists()  # not one step was taken


def _probes(monkeypatch, answers: dict[str, Exception]) -> list[str]:
    """Replace check_storage with a fake that raises `answers[uri]`; returns the URIs probed."""
    probed = []

    def fake(uri):
        probed.append(uri)
        if uri in answers:
            raise answers[uri]

    monkeypatch.setattr(build, "check_storage", fake)
    return probed


def test_every_store_a_stage_names_is_probed_once_per_bucket(monkeypatch, tmp_path):
    probed = _probes(monkeypatch, {})
    (stage,) = stages_of(load_text(SPEC.replace('evalSources: [{name: held, uri: "s3://eval-data/held"}]',
                                   'evalSources: [{name: held, uri: "s3://train-data/held"}]')).job)
    _check_stores(build._stage_stores(stage, tmp_path / "stores" / "train"), logging.getLogger("test"))
    assert probed == ["s3://train-data/web", f"file://{tmp_path.resolve()}/stores/checkpoints"]


def test_a_misconfigured_store_is_permanent_and_an_unreachable_one_is_ridden_out(monkeypatch, caplog):
    uris = ["s3://a/x", "s3://b/y", "s3://c/z"]
    _probes(monkeypatch, {"s3://b/y": StorageConfigError("s3://b/y: bucket 'b' does not exist")})
    with pytest.raises(RunSetupError, match=r"^s3://b/y: bucket 'b' does not exist$"):
        _check_stores(uris, logging.getLogger("test"))
    # down or silent: maybe an outage a restarted worker must ride out; the shared endpoint is not probed again
    probed = _probes(monkeypatch, {"s3://a/x": StorageError("s3://a/x: cannot use the S3 endpoint")})
    with caplog.at_level(logging.WARNING):
        _check_stores(uris, logging.getLogger("test"))
    assert probed == ["s3://a/x"] and "s3://a/x: cannot use the S3 endpoint" in caplog.text
