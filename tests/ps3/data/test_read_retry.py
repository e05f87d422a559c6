"""Data reads retry storage errors, and only those (no S3 server: a filesystem that fails on cue)."""

from __future__ import annotations

import logging
from collections import Counter

import pytest

import ps3.data.retry as retry_module
from ps3.data.fs import filesystem
from ps3.data.index import SourceIndex
from ps3.data.loader import DataSource, LoaderConfig, PS3Loader
from ps3.data.records import BadSample
from ps3.data.retry import DataReadError, ReadRetry, one_line
from ps3.data.shards import read_sample_bytes

from .conftest import write_source
from .test_loader import TINY, tokenize


class FlakyFS:
    """A real filesystem whose `cat_file` first raises `errors` (one per call), then reads."""

    def __init__(self, fs, errors: list[BaseException]):
        self.fs, self.errors, self.calls = fs, list(errors), 0

    def cat_file(self, path, start=None, end=None):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.fs.cat_file(path, start=start, end=end)

    def unstrip_protocol(self, path):
        return self.fs.unstrip_protocol(path)


@pytest.fixture
def sample(tmp_path):
    """(filesystem, shard path, entry) of the first sample of a tiny local source."""
    uri = f"file://{tmp_path}/src"
    write_source(uri, 4)
    index = SourceIndex.open(uri)
    shard, entry = index.locate(0)
    return index.fs, shard, entry


class FakeClock:
    """Stands in for the `time` module of ps3.data.retry: a wait is recorded and moves the clock on."""

    def __init__(self):
        self.now, self.waits = 0.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


@pytest.fixture
def waits(monkeypatch):
    """The backoff waits, recorded on a fake clock instead of slept."""
    clock = FakeClock()
    monkeypatch.setattr(retry_module, "time", clock)
    return clock.waits


def test_storage_errors_are_retried_with_backoff_logged_and_counted(sample, waits, caplog):
    fs, shard, entry = sample
    flaky = FlakyFS(fs, [ConnectionError("endpoint down")] * 6 + [PermissionError("access denied")])
    counts = Counter()
    with caplog.at_level(logging.WARNING, logger="ps3.data.retry"):
        assert read_sample_bytes(flaky, shard, entry, ReadRetry(counts=counts)) == read_sample_bytes(fs, shard, entry)
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert counts == {"read_retries": 7}
    retries = [r.getMessage() for r in caplog.records]
    assert len(retries) == 7 and all(shard in m and "failed (attempt" in m for m in retries)
    assert "ConnectionError: endpoint down" in retries[0] and "PermissionError: access denied" in retries[-1]


def test_spent_budget_fails_in_one_line_naming_the_shard(sample, waits):
    fs, shard, entry = sample
    flaky = FlakyFS(fs, [TimeoutError("read timed out\nafter 20 s")] * 100)
    with pytest.raises(DataReadError) as caught:
        read_sample_bytes(flaky, shard, entry, ReadRetry(budget_s=0.75, counts=Counter()))
    message = str(caught.value)
    assert "\n" not in message and f"file://{shard}" in message
    assert "after 3 attempts" in message and "TimeoutError: read timed out after 20 s" in message
    assert flaky.calls == 3 and waits == [0.5, 0.25]  # the last wait is cut to the budget


def test_missing_object_and_short_read_are_bad_samples_not_retried(sample, waits):
    fs, shard, entry = sample
    counts = Counter()
    with pytest.raises(BadSample, match="read_error.*FileNotFoundError"):
        read_sample_bytes(FlakyFS(fs, [FileNotFoundError(shard)]), shard, entry, ReadRetry(counts=counts))

    class ShortFS(FlakyFS):
        def cat_file(self, path, start=None, end=None):
            return super().cat_file(path, start, end)[:-1]

    with pytest.raises(BadSample, match="read_error.*short read"):
        read_sample_bytes(ShortFS(fs, []), shard, entry, ReadRetry(counts=counts))
    assert waits == [] and counts == {}


def test_shard_deleted_under_a_running_loader_is_skipped_not_retried(tmp_path, waits):
    uri = f"file://{tmp_path}/src"
    write_source(uri, 12)
    loader = PS3Loader([DataSource("toy", uri)], TINY, tokenize, rank=0, world_size=1, config=LoaderConfig(8, 4))
    fs, path = filesystem(uri)
    fs.rm(f"{path}/shard-000001.tar")
    for _ in range(6):
        next(loader)
    counts = loader.bad_sample_counts()
    assert counts.get("read_error", 0) >= 1 and "read_retries" not in counts and waits == []


def test_worker_traceback_is_cut_to_the_one_line():
    """torch re-raises a worker's error with the worker's traceback as its message."""
    worker = DataReadError("Caught DataReadError in DataLoader worker process 1.\nOriginal Traceback (most recent "
                           "call last):\n  File \"x.py\", line 1, in f\nps3.data.retry.DataReadError: reading "
                           "s3://b/shard-000000.tar still failed after 3 attempts (...): OSError: down\n")
    assert str(one_line(worker)) == "reading s3://b/shard-000000.tar still failed after 3 attempts (...): OSError: down"
    assert str(one_line(DataReadError("reading x failed"))) == "reading x failed"
