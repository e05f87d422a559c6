"""The backend interface (`kubernetes`, `local`) and the status objects both return.

Public methods are the API `platformctl` calls; each backend implements the `_` hooks.
Status is one shape for both backends so `status -o json` means the same everywhere.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from collections.abc import Iterator

from ps3_platform.spec import JobSpec

#: Phases of a job and of its stages (PyTorchJob condition names, plus Pending/Skipped/Cancelled).
TERMINAL_PHASES = ("Succeeded", "Failed", "Cancelled")


class BackendError(Exception):
    """A one-line failure talking to a backend (not found, forbidden, unreachable, conflict)."""


class JobNotFoundError(BackendError):
    pass


@dataclass
class StageStatus:
    name: str
    phase: str = "Pending"
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    samples_per_s: float | None = None
    unit: str = "steps"  # what step/total count: optimizer steps, or images for data stages
    failures: dict = field(default_factory=dict)  # skipped inputs by kind (data stages)
    eta_s: float | None = None
    restarts: int = 0
    exit_code: int | None = None
    workers: int | None = None
    message: str = ""
    storage: str = ""  # checkpoint uploads failing: since when, how many retries, the last error
    restart_to_first_step_s: float | None = None  # after the last restart: process start -> first step
    lost_steps: int | None = None  # steps the last restart recomputed (done past the checkpoint resumed from)


@dataclass
class JobStatus:
    name: str
    kind: str
    backend: str
    phase: str
    stages: list[StageStatus] = field(default_factory=list)
    conditions: list[dict] = field(default_factory=list)
    eval: dict = field(default_factory=dict)
    curation: dict = field(default_factory=dict)  # stage -> summary of a curate stage (per source, failures)
    checkpoints: str | None = None
    created: float | None = None
    finished: float | None = None
    message: str = ""  # what the phase alone does not say (e.g. orphaned workers)

    @property
    def done(self) -> bool:
        return self.phase in TERMINAL_PHASES

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SubmitResult:
    name: str
    created: bool
    message: str


class Backend(ABC):
    """Where jobs run. Guarded public methods over `_` hooks (one place for shared checks)."""

    name: str = "abstract"

    def submit(self, job: JobSpec, objects: list[dict], *, replace: bool = False,
               delete_checkpoints: bool = False) -> SubmitResult:
        """Create the job (idempotent: the same spec again is 'unchanged', or resumes a Cancelled or
        Failed local run; a changed one needs replace). Checkpoints are deleted only on request."""
        return self._submit(job, objects, replace=replace, delete_checkpoints=delete_checkpoints)

    def status(self, name: str) -> JobStatus:
        return self._status(name)

    def list(self) -> list[JobStatus]:
        return self._list()

    def logs(self, name: str, *, stage: str | None = None, rank: int | None = None,
             follow: bool = False) -> Iterator[str]:
        return self._logs(name, stage=stage, rank=rank, follow=follow)

    def cancel(self, name: str) -> str:
        return self._cancel(name)

    def wait(self, name: str, *, on_status: Callable[[JobStatus], None] | None = None, poll_s: float = 2.0) -> int:
        """Block until the job ends, handing each polled status to `on_status` (the CLI prints a
        progress line); exit code 0 only when it succeeded."""
        return self._wait(name, on_status=on_status, poll_s=poll_s)

    @abstractmethod
    def _submit(self, job: JobSpec, objects: list[dict], *, replace: bool,
                delete_checkpoints: bool = False) -> SubmitResult: ...

    @abstractmethod
    def _status(self, name: str) -> JobStatus: ...

    @abstractmethod
    def _list(self) -> list[JobStatus]: ...

    @abstractmethod
    def _logs(self, name: str, *, stage: str | None, rank: int | None, follow: bool) -> Iterator[str]: ...

    @abstractmethod
    def _cancel(self, name: str) -> str: ...

    def _wait(self, name: str, *, on_status: Callable[[JobStatus], None] | None, poll_s: float) -> int:
        while True:
            status = self.status(name)
            if on_status is not None:
                on_status(status)
            if status.done:
                return 0 if status.phase == "Succeeded" else 1
            time.sleep(poll_s)
