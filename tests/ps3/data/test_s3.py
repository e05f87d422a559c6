"""The data path against a real S3 server (SeaweedFS), credentials from the environment."""

from __future__ import annotations

import re
import threading
import time

import pytest
import torch
from ps3_platform.testing import SeaweedS3

from ps3.data.check import check_source
from ps3.data.index import build_index, read_index
from ps3.data.loader import DataSource, LoaderConfig, PS3Loader
from ps3.data.retry import DataReadError
from ps3.data.synth import SynthConfig, generate
from ps3.data.views import ViewConfig

from .test_loader import tokenize

pytestmark = [pytest.mark.s3, pytest.mark.timeout(300)]
SMALL = SynthConfig(scene_size=(200, 300), doc_long_side=(200, 300), texture=False)


def test_write_index_check_and_load_from_s3(s3_server):
    bucket = s3_server.make_bucket("ps3-data-test")
    sources = generate(f"{bucket}/synth", 10, seed=2, samples_per_shard=4, config=SMALL)
    assert sources["scene"].startswith("s3://")
    assert read_index(sources["scene"])["samples"] == 10
    assert build_index(sources["document"])["samples"] == 10  # rebuild over S3 from the offset tables
    report = check_source(sources["scene"])
    assert report["ok"] == 10 and report["bad"] == {} and report["index"] == "ok"
    views = ViewConfig((32, 64, 128), 16, (4, 16), 64, 6)
    expected = None
    for workers in (0, 2):
        loader = PS3Loader([DataSource(k, v) for k, v in sorted(sources.items())], views, tokenize, rank=0,
                           world_size=1, config=LoaderConfig(8, 4, num_workers=workers))
        batches = [next(loader) for _ in range(4)]
        got = [i for b in batches for i in b["sample_id"].tolist()]
        assert loader.bad_sample_counts() == {}
        expected = expected or got
        assert got == expected
        loader.close()


def test_missing_s3_source_fails_naming_uri(s3_server):
    from ps3.data.index import DataSourceError

    bucket = s3_server.make_bucket("ps3-data-empty")
    with pytest.raises(DataSourceError, match="ps3-data-empty/nothing"):
        PS3Loader([DataSource("x", f"{bucket}/nothing")], ViewConfig((32, 64), 16, (4,), 64, 6), tokenize,
                  rank=0, world_size=1, config=LoaderConfig(4, 4))


@pytest.fixture
def own_s3(tmp_path, monkeypatch):
    """An S3 server of this test's own, which it may stop (never the shared one); env points at it."""
    server = SeaweedS3(tmp_path / "s3").start()
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)  # restored afterwards: later tests see the shared server again
    yield server
    server.stop()


def _sources(server, bucket: str) -> list[DataSource]:
    sources = generate(f"{server.make_bucket(bucket)}/synth", 10, seed=2, samples_per_shard=4, config=SMALL)
    return [DataSource(k, v) for k, v in sorted(sources.items())]


def _loader(sources: list[DataSource], **config) -> PS3Loader:
    return PS3Loader(sources, ViewConfig((32, 64), 16, (4,), 64, 6), tokenize, rank=0, world_size=1,
                     config=LoaderConfig(8, 4, **config))


@pytest.mark.faults
def test_loader_rides_out_an_s3_outage_with_the_same_batches(own_s3):
    """Reads in this process (no workers) fail once the store is stopped and retry until a thread restarts it."""
    sources = _sources(own_s3, "ps3-outage")
    undisturbed = _loader(sources)
    expected = [next(undisturbed) for _ in range(6)]
    loader = _loader(sources, read_retry_seconds=120)
    got = [next(loader)]
    own_s3.stop()
    restart = threading.Thread(target=own_s3.start)  # back after its ~20 s restart; reads retry meanwhile
    restart.start()
    try:
        got += [next(loader) for _ in range(5)]
    finally:
        restart.join()
    assert [b["sample_id"].tolist() for b in got] == [b["sample_id"].tolist() for b in expected]
    assert all(torch.equal(g["lowres"], e["lowres"]) for g, e in zip(got, expected))
    counts = loader.bad_sample_counts()
    assert set(counts) == {"read_retries"} and counts["read_retries"] > 0  # retried, nothing skipped


@pytest.mark.faults
def test_s3_down_past_the_read_retry_budget_fails_in_one_line_naming_the_shard(own_s3):
    loader = _loader(_sources(own_s3, "ps3-down"), read_retry_seconds=1, num_workers=2)
    own_s3.stop()
    started = time.monotonic()
    with pytest.raises(DataReadError) as caught:
        next(loader)
    message = str(caught.value)
    assert "\n" not in message and re.search(r"reading s3://ps3-down/synth/\w+/shard-\d{6}\.tar", message)
    assert re.search(r"still failed after \d+ attempts? \(read retry budget of 1s spent\)", message)
    assert time.monotonic() - started < 30  # one attempt takes s3fs's own retries, ~5 s
    loader.close()
