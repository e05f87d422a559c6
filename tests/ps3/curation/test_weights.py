"""Weights from paths and URIs: local ones used in place, remote ones copied once, missing ones named."""

from __future__ import annotations

import fsspec
import pytest

from ps3.curation.models import WeightsError
from ps3.curation.models.weights import check_weights, file_digest, local_weights


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PS3_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_local_path_and_file_uri_are_used_in_place(tmp_path, cache):
    weights = tmp_path / "sam.pth"
    weights.write_bytes(b"weights")
    assert local_weights(str(weights)) == weights
    assert local_weights(f"file://{weights}") == weights
    assert not cache.exists()  # nothing copied


def test_remote_file_is_copied_once_into_the_cache(cache):
    fs = fsspec.filesystem("memory")
    fs.pipe("/models/sam.pth", b"v1")
    first = local_weights("memory://models/sam.pth")
    assert first.read_bytes() == b"v1" and first.name == "sam.pth" and cache in first.parents
    fs.pipe("/models/sam.pth", b"v2")  # a cached copy is not fetched again
    assert local_weights("memory://models/sam.pth") == first and first.read_bytes() == b"v1"
    assert not [p for p in first.parent.parent.iterdir() if p.name.endswith(".tmp")]


def test_remote_directory_is_copied_with_its_files(cache):
    fs = fsspec.filesystem("memory")
    fs.pipe({"/qwen/config.json": b"{}", "/qwen/model.safetensors": b"x" * 10, "/qwen/sub/tok.json": b"[]"})
    local = local_weights("memory://qwen")
    assert (local / "config.json").read_bytes() == b"{}"
    assert (local / "model.safetensors").stat().st_size == 10
    assert (local / "sub" / "tok.json").exists()


@pytest.mark.parametrize("uri", ["/no/such/sam.pth", "file:///no/such/sam.pth", "memory://no/such/dir"])
def test_missing_weights_raise_one_line_naming_the_uri(uri):
    for call in (check_weights, local_weights):
        with pytest.raises(WeightsError) as info:
            call(uri)
        assert uri in str(info.value) and "\n" not in str(info.value)


def test_digest_of_a_file_and_a_directory(tmp_path):
    (tmp_path / "a.pth").write_bytes(b"one")
    (tmp_path / "b.pth").write_bytes(b"two")
    digests = {file_digest(tmp_path / "a.pth"), file_digest(tmp_path / "b.pth")}
    assert len(digests) == 2 and all(d.startswith("sha256:") and len(d) == 19 for d in digests)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    before = file_digest(model)
    assert before == file_digest(model)
    (model / "model.safetensors").write_bytes(b"x")
    assert file_digest(model) != before
