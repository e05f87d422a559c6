"""Fixtures shared by the whole suite: a real S3 server, an isolated platform home, a tiny VILA-HD."""

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


@pytest.fixture(scope="session")
def tiny_vila_hd(tmp_path_factory):
    """(model, tokenizer, LLM directory): the tiny PS3 encoder and a random 2-layer Qwen2 whose
    tokenizer knows the synthetic questions' words, built once (tests must not train it)."""
    import torch

    from ps3.model import PS3VisionEncoder, get_preset
    from ps3.vila_hd.llm import build_tiny_llm, load_llm
    from ps3.vila_hd.model import VilaHD
    from ps3.vila_hd.synth import vocabulary_texts

    directory = tmp_path_factory.mktemp("tiny-llm")
    build_tiny_llm(str(directory), vocabulary_texts())
    llm = load_llm(str(directory))
    torch.manual_seed(0)
    newline = llm.tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
    model = VilaHD(PS3VisionEncoder(get_preset("ps3-tiny")), llm.model, image_token_id=llm.image_token_id,
                   newline_token_id=newline)
    return model.eval(), llm.tokenizer, directory


@pytest.fixture(autouse=True)
def platform_home(tmp_path, monkeypatch):
    """Every test gets its own $PS3_PLATFORM_HOME so runs never leak between tests."""
    home = tmp_path / "ps3-home"
    monkeypatch.setenv("PS3_PLATFORM_HOME", str(home))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    return home


@pytest.fixture
def data_loader_kwargs(monkeypatch) -> dict:
    """The keyword arguments the planned loaders (PS3's, VILA-HD's) last built their torch
    DataLoader with; the DataLoader itself is built without pinning (no GPU in the tests)."""
    import ps3.data.loader as planned

    seen: dict = {}

    class Recording(planned.DataLoader):
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)
            super().__init__(*args, **{**kwargs, "pin_memory": False})

    monkeypatch.setattr(planned, "DataLoader", Recording)
    return seen
