"""The pod rehearsal's own logic (`ops/rehearse.py`), without buildah: the environment it gives
each replica of a really compiled 2-node job. `make rehearse` runs the containers themselves."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from ps3_platform.compile import compile_job
from ps3_platform.spec import load_pools, load_text

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rehearse():
    spec = importlib.util.spec_from_file_location("rehearse", ROOT / "ops" / "rehearse.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["rehearse"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["rehearse"]


def test_each_replica_gets_the_rendered_env_the_secret_and_the_operator_variables(rehearse):
    objects = compile_job(load_text(rehearse.JOB.replace("{endpoint}", "http://127.0.0.1:8333")).job, load_pools())
    secrets = {rehearse.SECRET: {"AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret"}}
    pods = rehearse.pods_from(objects, secrets, master_port=29999)
    assert [p.name for p in pods] == ["ps3-rehearse-master-0", "ps3-rehearse-worker-0"]
    for rank, pod in enumerate(pods):
        env = pod.env
        assert (env["RANK"], env["PET_NODE_RANK"], env["WORLD_SIZE"], env["PET_NNODES"]) == (str(rank), str(rank), "2", "2")
        assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == "29999"
        assert env["AWS_ACCESS_KEY_ID"] == "key" and env["AWS_SECRET_ACCESS_KEY"] == "secret"  # from the Secret only
        assert env["HOME"] == "/home/ps3"  # the writable emptyDir under the read-only root
        security = pod.template["spec"]["containers"][0]["securityContext"]
        assert security["readOnlyRootFilesystem"] is True


def test_an_elastic_job_is_refused(rehearse):
    with pytest.raises(SystemExit, match="fixed-size job"):
        rehearse.operator_env({"spec": {"elasticPolicy": {}, "pytorchReplicaSpecs": {}}}, "Worker", 0, 1)
