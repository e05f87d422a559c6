"""The Checkpointer: one job stage's checkpoints, saved by `Saving`, loaded by `Loading`; here
what both share: where the steps are, which are committed, retention and storage retries.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from ..metrics import Metrics
from ..storage import (
    DEFAULT_REQUEST_TIMEOUT_S,
    Location,
    RetryPolicy,
    StorageError,
    open_location,
    retry,
    storage_options,
)
from .layout import (
    _STEP_DIR,
    MANIFEST,
    CheckpointError,
    CheckpointNotFoundError,
    retention_plan,
    step_dir_name,
)
from .progress import ProgressRecords
from .reader import Loading
from .staging import _distributed, _HostStager, default_staging_root
from .writer import Saving

log = logging.getLogger(__name__)


class Checkpointer(Saving, Loading, ProgressRecords):
    """Saves, commits, finds and loads the sharded checkpoints of one job stage (one per rank).

    `save`, `load` are collective: every rank calls them at the same step, from the thread
    that owns the default process group. `latest_committed` is not collective.
    """


    def __init__(self, *, uri: str, job: str, stage: str, keep: int, keep_every: int | None,
                 async_save: bool, rank: int, world_size: int, metrics: Metrics | None = None,
                 retry_budget_s: float = 300.0, staging_dir: str | Path | None = None,
                 io_threads: int = 4, storage_options: dict[str, Any] | None = None,
                 request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, stop: Any = None,
                 stop_grace_s: float = 10.0, note: Callable[[dict], None] | None = None, peers: Any = None):
        """`retry_budget_s`: how long one save may keep retrying storage errors (an outage
        of a few minutes is survived); `staging_dir`: where staged copies go (default
        `default_staging_root()`); `io_threads`: files per rank, written and uploaded in
        parallel; `storage_options`: fsspec options (default: from the environment, with
        `request_timeout_s`); `stop`: the worker's stop flag (`.requested`, `.requested_at`):
        once it is set, a save that has not committed within `stop_grace_s` of the signal
        is abandoned, so a stuck upload cannot hold a worker past its pod's grace period;
        `note(record)` receives `{"checkpoint": "failing" | "failed" | "committed", ...}` on every
        storage failure and on the first commit after one (what `status` shows of an outage);
        `peers` (`runtime.peers.Peers`) tells a dead rank from a slow one, so a save that waits
        on a killed rank's upload fails at once instead of at the end of its budget."""
        _check_arguments(job=job, stage=stage, keep=keep, keep_every=keep_every, rank=rank,
                         world_size=world_size, io_threads=io_threads)
        self.job, self.stage = job, stage
        self.keep, self.keep_every = keep, keep_every
        self.async_save = async_save
        self.rank, self.world_size = rank, world_size
        self.metrics = metrics
        self.io_threads = io_threads
        self.policy = RetryPolicy(budget_s=retry_budget_s)
        url = f"{uri.rstrip('/')}/{job}/{stage}"
        if storage_options is None:
            storage_options = _default_options(url, request_timeout_s)
        self.location: Location = open_location(url, storage_options)
        self._stop, self.stop_grace_s = stop, stop_grace_s
        self._note = note
        self._peers = peers
        self._trouble: dict | None = None  # the storage failures since the last commit
        self._abandon = threading.Event()
        self._inflight_step: int | None = None
        self._staging_root = Path(staging_dir) if staging_dir is not None else default_staging_root()
        self._staging_prefix = f"ps3-ckpt-{_slug(job)}-{_slug(stage)}-r{rank}"
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._error_step: int | None = None
        self._seen_steps: set[int] = set()
        self._skipped_steps: set[int] = set()  # damaged steps that could not be set aside
        self.committed_step: int | None = None  # newest step this run loaded or committed (what a stop keeps)
        self._group: Any = None  # gloo group for DCP in the background thread (async, multi-rank)
        self._stager = _HostStager()
        self._progress_lock = threading.Lock()  # `write_progress`: one writer thread, the newest record
        self._progress_thread: threading.Thread | None = None
        self._progress_pending: bytes | None = None
        self._remove_stale_staging()

    # ---- public API ---------------------------------------------------------------------
    def latest_committed(self) -> int | None:
        """Newest step with a complete manifest (partial and broken steps are skipped)."""

        def newest() -> int | None:
            steps = self._scan()
            for step in sorted(steps, reverse=True):
                if step not in self._skipped_steps and self._committed_manifest(step, steps[step]) is not None:
                    return step
            return None

        return self._retry(newest, what="listing of checkpoints", deadline=self._deadline())

    def close(self) -> None:
        """Wait for the in-flight upload (raising its failure) and drop this rank's staging files."""
        try:
            self.wait()
        finally:
            self._remove_stale_staging(include_own=True)

    # ---- finding committed steps -------------------------------------------------------
    def _scan(self) -> dict[int, dict[str, int]]:
        """step -> {file relative to the step dir: size}, from one recursive listing."""
        loc = self.location
        loc.fresh(loc.root)
        steps: dict[int, dict[str, int]] = {}
        if loc.is_local:  # empty step dirs exist only on real filesystems (and are partial steps)
            if not loc.fs.isdir(loc.root):
                return {}
            for name in loc.fs.ls(loc.root, detail=False):
                if match := _STEP_DIR.match(name.rstrip("/").rsplit("/", 1)[-1]):
                    steps[int(match.group(1))] = {}
        try:
            found = loc.fs.find(loc.root, detail=True)
        except FileNotFoundError:
            found = {}
        for path, info in found.items():
            head, _, rest = path[len(loc.root):].lstrip("/").partition("/")
            if (match := _STEP_DIR.match(head)) and rest and info.get("type") != "directory":
                steps.setdefault(int(match.group(1)), {})[rest] = int(info["size"])
        self._seen_steps = set(steps)
        return steps

    def _committed_manifest(self, step: int, files: dict[str, int]) -> dict | None:
        """The step's manifest if every file it lists is present with the listed size."""
        if MANIFEST not in files:
            return None
        try:
            manifest = json.loads(self.location.fs.cat_file(self.location.path(step_dir_name(step), MANIFEST)))
        except FileNotFoundError:
            return None
        except ValueError as exc:  # truncated or not JSON: not committed
            log.warning("checkpoint step %d: unreadable manifest (%s); not committed", step, exc)
            return None
        listed = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(listed, dict) or manifest.get("step") != step:
            log.warning("checkpoint step %d: malformed manifest; not committed", step)
            return None
        for name, entry in listed.items():
            if files.get(name) != entry.get("size"):
                problem = "is missing" if name not in files else f"has {files[name]} bytes, not {entry.get('size')}"
                log.warning("checkpoint step %d: %s %s; not committed", step, name, problem)
                return None
        return manifest

    def _agree_on_step(self, step: int | None) -> int:
        """Rank 0 picks the step and tells the others, so all ranks load the same one."""
        answer: tuple[str, Any] | None = None
        if self.rank == 0 or not _distributed():
            try:
                answer = ("ok", self._resolve_step(step))
            except Exception as exc:  # noqa: BLE001 - every rank must raise it, not only rank 0
                answer = (type(exc).__name__, str(exc))
        if _distributed():
            box = [answer]
            dist.broadcast_object_list(box, src=0)
            answer = box[0]
        assert answer is not None
        if answer[0] == "ok":
            return int(answer[1])
        if answer[0] == CheckpointNotFoundError.__name__:
            raise CheckpointNotFoundError(answer[1])
        raise CheckpointError(f"finding the checkpoint to load failed: {answer[0]}: {answer[1]}")

    def _resolve_step(self, step: int | None) -> int:
        if step is None:
            latest = self.latest_committed()
            if latest is None:
                raise CheckpointNotFoundError(f"no committed checkpoint under {self.location.url}")
            return latest
        steps = self._retry(self._scan, what="listing of checkpoints", deadline=self._deadline())
        if step not in steps or self._committed_manifest(step, steps[step]) is None:
            raise CheckpointNotFoundError(f"step {step} is not a committed checkpoint under {self.location.url}")
        return step

    # ---- retention ----------------------------------------------------------------------
    def _retain_quietly(self) -> None:
        """Apply retention; a failure is logged and retried after the next commit."""
        try:
            self._retry(self._retain, what="retention", deadline=time.monotonic() + 60.0)
        except StorageError as exc:
            log.warning("checkpoint retention failed (will retry after the next commit): %s", exc)

    def _retain(self) -> None:
        steps = self._scan()
        committed = [s for s in sorted(steps) if self._committed_manifest(s, steps[s]) is not None]
        for step in retention_plan(list(steps), committed, self.keep, self.keep_every):
            if step in committed:
                self._uncommit(step)  # manifest first: a crash mid-delete leaves a partial step
            self.location.fs.rm(self.location.path(step_dir_name(step)), recursive=True)
            log.info("checkpoint step %d deleted (retention)", step)

    def _uncommit(self, step: int) -> None:
        path = self.location.path(step_dir_name(step), MANIFEST)
        try:
            self.location.fs.rm_file(path)
        except FileNotFoundError:
            pass

    # ---- helpers ------------------------------------------------------------------------
    def _deadline(self) -> float:
        return time.monotonic() + self.policy.budget_s

    def _retry(self, fn, *, what: str, deadline: float):
        return retry(fn, what=what, deadline=deadline, policy=self.policy, on_failure=self._on_failure,
                     abandoned=self._should_abandon)

    def _tell(self, record: dict) -> None:
        if self._note is not None:
            try:
                self._note(record)
            except Exception as exc:  # noqa: BLE001 - reporting must never break a save
                log.debug("checkpoint note failed: %s", exc)

    def _on_failure(self, what: str, exc: BaseException, attempt: int, delay: float | None) -> None:
        if self.metrics is not None:
            self.metrics.get("ps3_checkpoint_failures_total").inc()
        self._record_trouble(what, exc, gave_up=delay is None)
        if delay is None:
            log.error("checkpoint %s failed (attempt %d), giving up: %s: %s", what, attempt, type(exc).__name__, exc)
        else:
            log.warning("checkpoint %s failed (attempt %d), retrying in %.1fs: %s: %s",
                        what, attempt, delay, type(exc).__name__, exc)

    def _record_trouble(self, what: str, exc: BaseException, *, gave_up: bool = False) -> None:
        """Count a failed storage request since the last commit and note it (what `status` shows)."""
        trouble = self._trouble or {"since": round(time.time(), 3), "retries": 0}
        trouble["retries"] += 1
        trouble["error"] = f"{what}: {type(exc).__name__}: {' '.join(str(exc).split())}"[:300]
        self._trouble = trouble
        self._tell({"checkpoint": "failed" if gave_up else "failing", **trouble})

    def _remove_stale_staging(self, include_own: bool = False) -> None:
        """Drop staged copies left by dead processes of this rank (tmpfs space is memory)."""
        pattern = re.compile(re.escape(self._staging_prefix) + r"-p(\d+)-\d{9}")
        for root in {self._staging_root, Path(tempfile.gettempdir())}:
            for path in root.glob(f"{self._staging_prefix}-p*"):
                if not (match := pattern.match(path.name)):
                    continue
                pid = int(match.group(1))
                if (pid == os.getpid() and include_own) or (pid != os.getpid() and not _alive(pid)):
                    shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _default_options(url: str, request_timeout_s: float) -> dict[str, Any]:
    return storage_options(url, request_timeout_s=request_timeout_s)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def _check_arguments(*, job: str, stage: str, keep: int, keep_every: int | None, rank: int,
                     world_size: int, io_threads: int) -> None:
    """Reject arguments that would silently misplace or lose checkpoints."""
    for field, value in (("job", job), ("stage", stage)):
        if not value or "/" in value:
            raise ValueError(f"checkpoint {field} must be a non-empty name without '/', got {value!r}")
    if keep < 1:
        raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
    if keep_every is not None and keep_every < 1:
        raise ValueError(f"checkpoint.keepEvery must be >= 1 or unset, got {keep_every}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"checkpoint rank {rank} is not in a world of size {world_size}")
    if io_threads < 1:
        raise ValueError(f"checkpoint io_threads must be >= 1, got {io_threads}")

