"""Shard writer, offset tables, index and webdataset compatibility."""

from __future__ import annotations

import json
import os

import pytest

from ps3.data.fs import filesystem
from ps3.data.index import DataSourceError, SourceIndex, build_index, read_index
from ps3.data.records import parse_record
from ps3.data.shards import iter_webdataset, read_sample_bytes

from .conftest import write_source


def test_writer_makes_index_with_counts(tmp_path):
    uri = f"file://{tmp_path}/src"
    index = write_source(uri, 10, per_shard=4)
    assert [s["samples"] for s in index["shards"]] == [4, 4, 2]
    assert index["samples"] == 10 and index["boxes"] == 20 and index["global_captions"] == 10
    assert index["source"] == "toy"
    assert read_index(uri) == index


def test_shards_are_plain_webdataset(tmp_path):
    uri = f"file://{tmp_path}/src"
    index = write_source(uri, 5, per_shard=3)
    samples = list(iter_webdataset(uri, [s["name"] for s in index["shards"]]))
    assert [s["__key__"] for s in samples] == [f"s{i:05d}" for i in range(5)]
    assert json.loads(samples[2]["json"])["captions"] == ["box a 2", "box b 2"]
    assert samples[0]["jpg"][:3] == b"\xff\xd8\xff"


def test_random_access_by_offsets(tmp_path):
    uri = f"file://{tmp_path}/src"
    write_source(uri, 9, per_shard=4)
    src = SourceIndex.open(uri)
    assert len(src) == 9
    path, entry = src.locate(6)
    image, js = read_sample_bytes(src.fs, path, entry)
    assert parse_record(entry.key, js).captions == ["box a 6", "box b 6"]
    assert image[:3] == b"\xff\xd8\xff"


def test_build_index_rebuilds_without_sidecars(tmp_path):
    uri = f"file://{tmp_path}/src"
    write_source(uri, 6, per_shard=4)
    fs, path = filesystem(uri)
    for p in fs.glob(f"{path}/*.idx.json") + [f"{path}/index.json"]:
        fs.rm(p)
    index = build_index(uri)
    assert index["samples"] == 6 and index["source"] == "src"
    assert fs.exists(f"{path}/shard-000000.tar.idx.json")


def test_missing_index_names_uri(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match="empty.*platformctl data index"):
        SourceIndex.open(f"file://{tmp_path}/empty")


def test_all_shards_missing_fails_naming_uri(tmp_path):
    uri = f"file://{tmp_path}/src"
    write_source(uri, 4, per_shard=2)
    fs, path = filesystem(uri)
    for p in fs.glob(f"{path}/*.tar"):
        fs.rm(p)
    with pytest.raises(DataSourceError, match=f"{tmp_path}/src.*no readable shard"):
        SourceIndex.open(uri)


def test_truncated_shards_left_out_at_start_and_all_truncated_fails(tmp_path):
    uri = f"file://{tmp_path}/src"
    write_source(uri, 8, per_shard=4)
    fs, path = filesystem(uri)
    first = fs.cat_file(f"{path}/shard-000000.tar")
    fs.pipe_file(f"{path}/shard-000000.tar", first[:1000])
    assert SourceIndex.open(uri).shards == ["shard-000001.tar"]
    fs.pipe_file(f"{path}/shard-000001.tar", b"")
    with pytest.raises(DataSourceError, match=f"{tmp_path}/src has no readable shard"):
        SourceIndex.open(uri)


def test_shards_of_the_right_size_but_unreadable_fail_at_start(tmp_path):
    uri = f"file://{tmp_path}/src"
    write_source(uri, 8, per_shard=4)
    fs, path = filesystem(uri)
    first = f"{path}/shard-000000.tar"
    fs.pipe_file(first, bytes(len(fs.cat_file(first))))  # same size, offset table kept, contents gone
    assert SourceIndex.open(uri).shards == ["shard-000001.tar"]  # left out; one sound shard is enough
    second = f"{path}/shard-000001.tar"
    fs.pipe_file(second, os.urandom(len(fs.cat_file(second))))
    with pytest.raises(DataSourceError, match=f"source {uri} has no readable shard .*shard-000000.tar"):
        SourceIndex.open(uri)
