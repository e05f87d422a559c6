"""`check_source`: counts per shard, bad records by reason, damaged tars."""

from __future__ import annotations

import json

import pytest

from ps3.data.check import check_source
from ps3.data.fs import filesystem

from .conftest import BAD_CASES, corrupt_header, write_bad_source, write_source


def test_check_counts_good_source(tmp_path):
    uri = f"file://{tmp_path}/src"
    write_source(uri, 7, per_shard=3)
    report = check_source(uri)
    assert report["index"] == "ok" and report["samples"] == 7 and report["ok"] == 7
    assert report["boxes"] == 14 and report["bad"] == {}
    assert [s["samples"] for s in report["shards"]] == [3, 3, 1]


def test_check_counts_each_bad_reason(tmp_path):
    uri = f"file://{tmp_path}/bad"
    write_bad_source(uri, good=4)
    report = check_source(uri)
    expected = {}
    for reason in BAD_CASES.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert report["bad"] == expected
    assert report["ok"] == 4 and report["samples"] == 4 + len(BAD_CASES)
    shard = report["shards"][0]
    assert shard["bad_keys"]["bad_box"] == ["b_box"] and shard["error"] is None


def test_check_truncated_shard_and_stale_index(tmp_path):
    uri = f"file://{tmp_path}/src"
    write_source(uri, 8, per_shard=4)
    fs, path = filesystem(uri)
    data = fs.cat_file(f"{path}/shard-000001.tar")
    fs.pipe_file(f"{path}/shard-000001.tar", data[: len(data) // 2])
    report = check_source(uri)
    damaged = report["shards"][1]
    assert damaged["error"] and damaged["samples"] < 4 and report["bad"]["read_error"] == 1
    assert report["index"] == "stale"


def test_check_corrupt_tar_header_loses_only_that_member(tmp_path):
    uri = f"file://{tmp_path}/src"
    write_source(uri, 4, per_shard=4)
    fs, path = filesystem(uri)
    corrupt_header(fs, f"{path}/shard-000000.tar", b"s00001.jpg")
    shard = check_source(uri)["shards"][0]
    assert shard["samples"] == 4 and shard["ok"] == 3  # the scan resynchronises at the next header
    assert shard["bad"] == {"missing_image": 1} and shard["bad_keys"]["missing_image"] == ["s00001"]
    assert "corrupt tar header at byte" in shard["error"]


@pytest.mark.faults
def test_check_missing_shard_listed_in_index(tmp_path):
    uri = f"file://{tmp_path}/src"
    write_source(uri, 8, per_shard=4)
    fs, path = filesystem(uri)
    fs.rm(f"{path}/shard-000001.tar")
    report = check_source(uri)
    assert report["missing_shards"] == ["shard-000001.tar"] and report["index"] == "stale"


@pytest.mark.faults
def test_check_missing_shard_is_in_the_table_and_both_forms_exit_1(tmp_path, capsys):
    from ps3_platform.cli import main

    uri = f"file://{tmp_path}/src"
    write_source(uri, 8, per_shard=4)
    fs, path = filesystem(uri)
    fs.rm(f"{path}/shard-000001.tar")
    assert main(["data", "check", uri]) == 1
    out = capsys.readouterr().out
    assert "missing" in next(line for line in out.splitlines() if "shard-000001.tar" in line)
    assert "missing shards (index.json lists them, storage lacks them): shard-000001.tar" in out
    assert main(["data", "check", uri, "-o", "json"]) == 1
    assert json.loads(capsys.readouterr().out)["missing_shards"] == ["shard-000001.tar"]


@pytest.mark.faults
def test_check_classifies_a_lost_member_as_the_loader_does(tmp_path):
    from ps3.data.index import SourceIndex, build_index
    from ps3.data.records import BadSample
    from ps3.data.shards import read_sample_bytes

    uri = f"file://{tmp_path}/src"
    write_source(uri, 4, per_shard=4)
    fs, path = filesystem(uri)
    corrupt_header(fs, f"{path}/shard-000000.tar", b"s00001.json")
    fs.rm(f"{path}/shard-000000.tar.idx.json")
    assert check_source(uri)["bad"] == {"missing_json": 1}
    build_index(uri)
    index = SourceIndex.open(uri)
    reasons = []
    for i in range(len(index)):
        shard, entry = index.locate(i)
        try:
            read_sample_bytes(index.fs, shard, entry)
        except BadSample as exc:
            reasons.append(exc.reason)
    assert reasons == ["missing_json"]
