"""Retrying data reads through a storage outage, the way checkpoint reads and writes are retried.

An S3 outage of a minute must not fail a training job, and must not be mistaken for bad
data either: skipping every sample read during it would silently change what the model
sees. So the loader retries a failed read with exponential backoff for up to a budget,
logs and counts every retry, and fails the job with one line naming the object when the
budget is spent. Errors a retry cannot fix (the object is missing, the bytes do not
parse) are raised at once and stay what they were: a counted bad-sample skip, or the
caller's own error.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .fs import fs_uri

log = logging.getLogger(__name__)
T = TypeVar("T")

#: The count key retries are added under in the loader's bad-sample counts (so they reach
#: metrics.jsonl and `platformctl status` beside the skips, with no channel of their own).
RETRY_COUNT_KEY = "read_retries"

#: Errors no retry fixes: the object is not there, or the bytes or the call are wrong.
#: Everything else is retried: s3fs raises OSErrors for S3 answers (503, 500, "access
#: denied" while a store restarts) but lets botocore's and aiohttp's connection errors
#: through, and those are no OSErrors.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError, IsADirectoryError, NotADirectoryError,
    ValueError, TypeError, KeyError, IndexError, AttributeError, NotImplementedError,
)


class DataReadError(RuntimeError):
    """A data read kept failing until its retry budget was spent; names the object's URI.

    Not an OSError on purpose: callers turn OSErrors into bad-sample skips, and an
    outage is not bad data.
    """


@dataclass
class ReadRetry:
    """How one process retries its data reads; counts the retries in `counts` if given."""

    budget_s: float = 300.0  # time one read may spend failing and retrying before the job fails
    first_delay_s: float = 0.5  # wait after the first failure; doubles after each further one
    max_delay_s: float = 8.0  # cap on the wait, so a store that comes back is noticed within seconds
    counts: Counter | None = None  # the loader's bad-sample counter: retries go in under RETRY_COUNT_KEY

    def read(self, fs, path: str, fn: Callable[[], T]) -> T:
        """`fn()` (a read of `path` on `fs`), retried on transient errors until the budget is spent."""
        deadline = time.monotonic() + self.budget_s
        delay, attempt = self.first_delay_s, 0
        while True:
            attempt += 1
            try:
                return fn()
            except PERMANENT_ERRORS:
                raise
            except Exception as exc:
                wait = min(delay, deadline - time.monotonic())
                if wait <= 0:
                    raise self._spent(fs, path, exc, attempt) from exc
                self._note_retry(fs, path, exc, attempt, wait)
                time.sleep(wait)
                delay = min(2 * delay, self.max_delay_s)

    def _spent(self, fs, path: str, exc: Exception, attempt: int) -> DataReadError:
        """The job's one-line failure: which object, how many attempts, the last error."""
        return DataReadError(f"reading {fs_uri(fs, path)} still failed after {attempt} attempt{'s' * (attempt > 1)} "
                             f"(read retry budget of {self.budget_s:g}s spent): {type(exc).__name__}: {_flat(exc)}")

    def _note_retry(self, fs, path: str, exc: Exception, attempt: int, wait: float) -> None:
        """One warning and one count per retry, so an outage shows in the log and in status."""
        if self.counts is not None:
            self.counts[RETRY_COUNT_KEY] += 1
        log.warning("data read of %s failed (attempt %d), retrying in %.1fs: %s: %s",
                    fs_uri(fs, path), attempt, wait, type(exc).__name__, _flat(exc))


def _flat(exc: BaseException) -> str:
    """An error's text on one line: the DataReadError naming it must stay one line."""
    return " ".join(str(exc).split())


def read_with(reads: ReadRetry | None, fs, path: str, fn: Callable[[], T]) -> T:
    """`fn()` retried by `reads`; without one, called once with its errors as they are.

    Callers other than the training loader (data check, benchmarks) pass None and keep
    their own error handling.
    """
    return fn() if reads is None else reads.read(fs, path, fn)


def one_line(exc: DataReadError) -> DataReadError:
    """`exc` with its one-line message, also when a DataLoader worker raised it.

    torch re-raises a worker's exception in the main process with the worker's whole
    traceback as its message; its last line is the original `DataReadError: message`.
    """
    last = (str(exc).strip().splitlines() or [""])[-1]
    return DataReadError(last.split(f"{DataReadError.__name__}: ", 1)[-1])
