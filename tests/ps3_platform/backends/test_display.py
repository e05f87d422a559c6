"""Status output: what `submit --wait` prints while a job runs."""

from __future__ import annotations

import pytest

from ps3.data.retry import RETRY_COUNT_KEY
from ps3_platform.backends.base import JobStatus, StageStatus
from ps3_platform.backends.display import progress_line


def _line(failures: dict, unit: str = "steps") -> str:
    stage = StageStatus(name="train", phase="Running", step=21, total_steps=100, loss=1.0, samples_per_s=8.0,
                        eta_s=10.0, unit=unit, failures=failures)
    return progress_line(JobStatus(name="toy", kind="TrainingJob", backend="local", phase="Running", stages=[stage]))


def test_the_retry_key_is_the_loaders():
    from ps3_platform.backends.display import READ_RETRIES

    assert READ_RETRIES == RETRY_COUNT_KEY


@pytest.mark.faults
@pytest.mark.parametrize("failures, shown", [
    ({}, "ETA 00:00:10"),
    ({"bad_image": 3}, "ETA 00:00:10 (3 bad samples skipped)"),
    ({"read_retries": 8}, "ETA 00:00:10 (8 read retries)"),  # an outage retried through lost nothing
    ({"read_retries": 1, "bad_image": 2, "missing_json": 1}, "ETA 00:00:10 (3 bad samples skipped, 1 read retry)"),
])
def test_read_retries_are_not_counted_as_skipped_samples(failures, shown):
    assert _line(failures).endswith(shown)


@pytest.mark.faults
def test_image_stages_show_retries_apart_from_skips():
    assert _line({"read_retries": 4, "bad_image": 1}, unit="images").endswith("(1 skipped, 4 read retries)")
