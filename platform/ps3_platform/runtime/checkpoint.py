"""Sharded checkpoints on object storage: stage in host memory, upload in the background, commit by manifest.

Layout: `{uri}/{job}/{stage}/step-{N:09d}/` holds DCP's shards (`__{rank}_{i}.distcp`, every
rank writes its own), DCP's `.metadata`, one `rank-{r:05d}.pt` per rank (small per-rank
state such as RNG), one marker per rank under `_ranks/`, and `manifest.json`, written
last. A step is *committed* when its manifest exists and every file it lists is present
with the listed size; anything else is a partial step and is never loaded.

How a save runs, and why:

1. Training thread (the stall): the state dicts are copied into host-memory buffers kept
   from the previous save (a memcpy; pinned memory for GPU tensors). Then `save()` returns
   (async) and training may change the weights.
2. Background thread: `torch.distributed.checkpoint.save` writes this rank's shards from
   that copy into a private local staging directory (tmpfs `/dev/shm` by default). DCP's
   planning is collective, so this runs on a separate gloo group created on the first
   async save: NCCL and gloo groups must not be driven from two threads at once, and the
   default group belongs to the training thread. (Writing to tmpfs directly from the
   training thread was measured at ~0.5 GB/s here, 20x slower than the memcpy.)
3. Upload and commit use no collective, so each rank retries on its own through an S3
   outage: it uploads its staged files and writes a marker listing them (size, sha256),
   tagged with DCP's save id, which is identical on every rank and new for every save,
   so markers of an earlier, interrupted attempt at the same step never count. Rank 0
   waits for all markers and writes the manifest; the other ranks wait until it exists,
   so `wait()` means "committed" on every rank. Rank 0 then applies retention.

Synchronous saves run step 2 on the training thread with the default group and no copy.
Only one upload is in flight: a new `save()` first waits for the previous one. Failed
storage calls are retried with exponential backoff for `retry_budget_s` (each failure is
logged and counted in `ps3_checkpoint_failures_total`); when the budget runs out the
error is raised at the next `save()` or `wait()`, never dropped.

Metrics: this component sets `ps3_checkpoint_upload_seconds`, `ps3_checkpoint_bytes`, the
last-success timestamp and the failure counter; the trainer times the stall of `save()`
and `load()` itself (`ps3_checkpoint_save_seconds`, `ps3_checkpoint_load_seconds`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

# Private DCP helpers (also behind DCP's own async stager; present from torch 2.3 to 2.14).
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem as LocalDcpFileSystem
from torch.distributed.checkpoint.stateful import Stateful

from .metrics import Metrics
from .restart import PROGRESS
from .storage import (
    DEFAULT_REQUEST_TIMEOUT_S,
    Location,
    RetryPolicy,
    StorageAbandonedError,
    StorageError,
    open_location,
    retry,
    storage_options,
)

try:
    from torch.distributed._state_dict_utils import CompanionMismatch
except ImportError:  # pragma: no cover - older torch raised a plain ValueError
    CompanionMismatch = ValueError  # type: ignore[assignment,misc]

try:  # torch >= 2.2 keeps them here (2.14 only here); older releases exported them at the top.
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
except ImportError:  # pragma: no cover - depends on the torch build
    from torch.distributed.checkpoint import FsspecReader  # type: ignore[attr-defined,no-redef]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
#: Where damaged and superseded steps are moved (never deleted): `{stage dir}/set-aside/step-N.REASON-STAMP/`.
SET_ASIDE_DIR = "set-aside"
FORMAT = "ps3-checkpoint/1"
_STEP_DIR = re.compile(r"^step-(\d{9})$")
_CHUNK = 8 << 20  # bytes hashed per read


class CheckpointError(RuntimeError):
    """Base class of checkpoint errors."""


class CheckpointNotFoundError(CheckpointError):
    """No committed checkpoint (or not the requested step) exists where one was asked for."""


class CheckpointCorruptError(CheckpointError):
    """A file of a committed step does not match the checksum its manifest lists."""


class CheckpointUploadError(CheckpointError):
    """A save could not be committed within its retry budget (raised at the next save()/wait())."""


class CheckpointAbandonedError(CheckpointUploadError):
    """The worker was told to stop and the save did not commit within the stop grace."""


def step_dir_name(step: int) -> str:
    return f"step-{step:09d}"


def _load_rank_state(data: bytes, url: str) -> dict:
    """A rank file holds tensors and plain values only: anything else is refused, never unpickled."""
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0][:200]
        raise CheckpointError(f"{url} holds objects a weights-only load refuses ({reason}); it was not written "
                              "by this version of ps3-platform: start from the step before, or afresh") from None


def rank_state_name(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def marker_name(rank: int) -> str:
    return f"_ranks/rank-{rank:05d}.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)  # hashlib drops the GIL on large buffers: training keeps running
    return digest.hexdigest()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _dcp(fn, state: dict, what: str, **kwargs: Any) -> Any:
    """dcp.save/dcp.load, single-process when there is no group (without DCP's warning about it).

    DCP reports failures as `CheckpointException`, a BaseException that `except Exception`
    misses; it becomes a `CheckpointError` (our own, if one of ours is the cause).
    """
    try:
        if _distributed():
            return fn(state, **kwargs)
        kwargs.pop("process_group", None)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is .*single process")
            return fn(state, no_dist=True, **kwargs)
    except CheckpointException as exc:
        causes = [f[0] if isinstance(f, tuple) else f for f in exc.failures.values()]
        ours = [c for c in causes if isinstance(c, CheckpointError)]
        if ours:
            raise ours[0] from exc
        first = causes[0] if causes else exc
        raise CheckpointError(f"{what} failed on ranks {sorted(exc.failures)}: {type(first).__name__}: {first}") from exc


def _serialize(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class _HostStager:
    """Copies a state dict into host-memory buffers that are kept and reused across saves.

    After the first save this is a plain memcpy (pinned memory when the state is on a
    GPU), which is the whole training stall of an async save. Non-tensor leaves are
    copied too, so the training may change anything once `stage` returns. Uses DCP's own
    staging helpers (they handle DTensor and ShardedTensor).
    """

    def __init__(self) -> None:
        self._cache: dict | None = None

    def stage(self, state: dict) -> dict:
        on_gpu = _any_cuda(state)
        try:
            if self._cache is None:
                self._cache = _create_cpu_state_dict(state, pin_memory=on_gpu)
            staged = _copy_state_dict(state, self._cache, non_blocking=on_gpu, type_check=False)
        except (CompanionMismatch, RuntimeError):  # the state changed shape: new buffers
            self._cache = _create_cpu_state_dict(state, pin_memory=on_gpu)
            staged = _copy_state_dict(state, self._cache, non_blocking=on_gpu, type_check=False)
        if on_gpu:
            torch.cuda.synchronize()
        return staged


def _any_cuda(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.is_cuda
    if isinstance(obj, dict):
        return any(_any_cuda(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_any_cuda(v) for v in obj)
    return False


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested state dict (local shards for DTensors)."""
    if isinstance(obj, torch.Tensor):
        local = obj.to_local() if hasattr(obj, "to_local") else obj
        return local.numel() * local.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def default_staging_root() -> Path:
    """Where staged copies live: $PS3_CHECKPOINT_STAGING_DIR, else tmpfs /dev/shm, else the temp dir.

    In a pod, /dev/shm must be a memory-backed emptyDir large enough for one rank's state
    (its size counts against the pod's memory limit).
    """
    if env := os.environ.get("PS3_CHECKPOINT_STAGING_DIR"):
        return Path(env)
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm
    return Path(tempfile.gettempdir())


class _CheckedReader(FsspecReader):
    """DCP reader that first checks (and, from object storage, downloads) the files this rank needs.

    `prepare(names)` verifies them against the manifest's sha256 before DCP reads a byte,
    so a damaged shard is caught as `CheckpointCorruptError`, never loaded. With a
    `local_dir`, `prepare` downloads whole files there and DCP reads them locally: DCP's
    fsspec reader issues one ranged read per tensor, which from SeaweedFS measured
    ~125 MB/s for a 1.1 GB state, against several hundred MB/s for whole-object downloads.
    """

    def __init__(self, location: Location, step_name: str, prepare, local_dir: Path | None = None):
        super().__init__(location.url_of(step_name), **location.options)
        self._prepare = prepare
        self._local_dir = local_dir

    def read_data(self, plan, planner):
        needed = sorted({self.storage_data[item.storage_index].relative_path for item in plan.items})
        if self._local_dir is None:
            self._prepare(needed)
        else:
            missing = [name for name in needed if not (self._local_dir / name).exists()]
            if missing:
                self._prepare(missing)
            self.fs = LocalDcpFileSystem()
            self.path = self._local_dir
        return super().read_data(plan, planner)


@dataclass
class _Staged:
    """One rank's staged copy of one save, waiting to be uploaded."""

    step: int
    save_id: str
    local_dir: Path
    files: dict[str, int]  # name relative to the step dir -> size in bytes


def retention_plan(steps: list[int], committed: list[int], keep: int, keep_every: int | None) -> list[int]:
    """Steps to delete: committed ones beyond the newest `keep` that are not multiples of
    `keep_every`, and partial ones older than the newest committed step (newer partial
    steps may still be written by a save that is in flight)."""
    if not committed:
        return []
    ordered = sorted(committed)
    kept = set(ordered[-keep:])
    if keep_every:
        kept |= {s for s in ordered if s % keep_every == 0}
    committed_set = set(ordered)
    newest = ordered[-1]
    return sorted(s for s in set(steps) | committed_set
                  if (s in committed_set and s not in kept) or (s not in committed_set and s < newest))


class Checkpointer:
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

    def save(self, step: int, state: dict, rank_state: dict | None = None) -> None:
        """Save `state` (DCP, sharded) and `rank_state` (this rank's own) as `step` and commit it.

        Synchronous mode returns once the step is committed; async mode as soon as the
        state is copied to host memory. Raises the failure of the previous async save.
        """
        self.wait()  # at most one upload in flight
        if self.world_size > 1 and not _distributed():
            raise CheckpointError(f"world_size={self.world_size} but no process group is initialized")
        plain = {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in state.items()}
        if self.rank == 0 and step in self._seen_steps:
            # Before any collective, so no rank uploads yet: a stale manifest must not
            # vouch for files this save is about to overwrite.
            self._retry(lambda: self._uncommit(step), what=f"removing the old manifest of step {step}",
                        deadline=self._deadline())
        rank_bytes = _serialize(rank_state) if rank_state is not None else None
        self._inflight_step = step
        if not self.async_save:
            staged = self._write_local(step, plain, rank_bytes, group=None)
            self._upload_or_raise(staged)
            return
        if self._group is None and _distributed():
            # DCP's planning in the background thread needs its own group: the default one
            # belongs to the training thread (and may be NCCL). Collective, like save().
            self._group = dist.new_group(backend="gloo")
        host_copy = self._stager.stage(plain)
        self._thread = threading.Thread(target=self._save_in_background, args=(step, host_copy, rank_bytes),
                                        name=f"ps3-ckpt-save-{step}", daemon=True)
        self._thread.start()

    def load(self, state: dict, step: int | None = None, *, source: str | None = None) -> tuple[int, dict | None]:
        """Load the newest committed step (or `step`) into `state` in place (resharding as needed).

        Returns (step, this rank's `rank_state`), the latter None when the checkpoint was
        written by another world size (per-rank state cannot be mapped across sizes).
        `source` loads from another stage instead (`checkpoint.initFrom`): the URL of its
        stage directory (newest committed step) or of one committed `step-N` directory.

        Every file read is checked against the sha256 its manifest lists. When the newest
        step is damaged it is set aside (moved under `set-aside/`, never deleted) and the
        next newest intact step is loaded instead, with a warning; a damaged `step` that
        was asked for by number raises `CheckpointCorruptError`.
        """
        self.wait()
        if source is not None:
            other, source_step = self._for_source(source)
            return other.load(state, source_step if step is None else step)
        while True:
            chosen = self._agree_on_step(step)
            try:
                return self._load_step(state, chosen)
            except CheckpointCorruptError as exc:
                if step is not None:
                    raise
                where = self._set_aside_on_rank0(chosen, "damaged")
                log.warning("checkpoint step %d is damaged (%s); set aside%s; falling back to the newest intact step",
                            chosen, exc, f" as {where}" if where else "")

    def _load_step(self, state: dict, chosen: int) -> tuple[int, dict | None]:
        """Load one committed step on every rank (collective); raises CheckpointCorruptError on
        every rank when any rank finds a file that does not match its manifest."""
        name = step_dir_name(chosen)
        step_path = self.location.path(name)
        deadline = self._deadline()
        manifest = self._retry(lambda: json.loads(self.location.fs.cat_file(f"{step_path}/{MANIFEST}")),
                               what=f"manifest of step {chosen}", deadline=deadline)
        listed = manifest["files"]
        if self.location.is_local:
            verify = lambda names: self._verify_local(chosen, names, listed)
            _dcp(dcp.load, state, f"loading step {chosen}", storage_reader=_CheckedReader(self.location, name, verify))
        else:
            local = self._staging_root / f"{self._staging_prefix}-p{os.getpid()}-{chosen:09d}-load"
            shutil.rmtree(local, ignore_errors=True)
            fetch = lambda names: self._download(chosen, names, local, deadline, listed)
            try:
                reader = _CheckedReader(self.location, name, fetch, local_dir=local)
                _dcp(dcp.load, state, f"loading step {chosen}", storage_reader=reader)
            finally:
                shutil.rmtree(local, ignore_errors=True)
        rank_state, damaged = None, ""
        own = rank_state_name(self.rank)
        if manifest.get("world_size") == self.world_size and own in listed:
            data = self._retry(lambda: self.location.fs.cat_file(f"{step_path}/{own}"),
                               what=f"{own} of step {chosen}", deadline=deadline)
            expected = listed[own].get("sha256")
            if expected is not None and hashlib.sha256(data).hexdigest() != expected:
                damaged = f"{own} does not match the sha256 in its manifest"
            else:
                rank_state = _load_rank_state(data, self.location.url_of(f"{name}/{own}"))
        if self._any_rank(bool(damaged)):  # every rank must fall back together, not only the damaged one
            raise CheckpointCorruptError(f"checkpoint step {chosen}: {damaged or 'a rank file is damaged'}")
        if self.metrics is not None:
            self.metrics.get("ps3_checkpoint_load_bytes").set(sum(int(f["size"]) for f in listed.values()))
        log.info("loaded checkpoint %s", self.location.url_of(name))
        self.committed_step = chosen
        return chosen, rank_state

    def _any_rank(self, flag: bool) -> bool:
        if not _distributed():
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _verify_local(self, step: int, names: list[str], listed: dict) -> None:
        """Check files of a step on a local disk against the manifest's sha256, in parallel."""
        step_path = Path(self.location.path(step_dir_name(step)))

        def check(name: str) -> None:
            expected = listed.get(name, {}).get("sha256")
            if expected is not None and _sha256(step_path / name) != expected:
                raise CheckpointCorruptError(f"checkpoint step {step}: {name} does not match the sha256 in its "
                                             f"manifest ({self.location.url_of(step_dir_name(step), name)})")

        with ThreadPoolExecutor(max_workers=max(1, min(self.io_threads, len(names)))) as pool:
            list(pool.map(check, names))

    # ---- setting steps aside (never deleting them) --------------------------------------
    def set_aside(self, step: int, reason: str) -> str:
        """Move a step out of the way (under `set-aside/`, with `reason` in its name), so it is
        neither loaded nor removed by retention; returns its new URL. Not collective."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = f"{SET_ASIDE_DIR}/{step_dir_name(step)}.{reason}-{stamp}"
        source_path, target_path = self.location.path(step_dir_name(step)), self.location.path(target)

        def move() -> None:
            self.location.move_tree(source_path, target_path)
            self.location.fresh(self.location.root)

        self._retry(move, what=f"setting step {step} aside", deadline=self._deadline())
        self._seen_steps.discard(step)
        return self.location.url_of(target)

    def _set_aside_on_rank0(self, step: int, reason: str) -> str | None:
        """Rank 0 sets the step aside (or, failing that, remembers to skip it); all ranks wait."""
        where = None
        if self.rank == 0 or not _distributed():
            try:
                where = self.set_aside(step, reason)
            except StorageError as exc:
                log.error("could not set step %d aside (%s); skipping it in this process", step, exc)
            self._skipped_steps.add(step)
        if _distributed():
            dist.barrier()
        return where

    def resume_from(self, state: dict, step: int) -> tuple[int, dict | None]:
        """Load `step` (named by the user) and set aside the committed steps after it, once.

        A marker `resumed-from-step-N.json` records that the request was carried out, so
        restarts after it resume from the newest step again, which is then this run's own.
        Returns what `load` returns. Collective.
        """
        marker = self.location.path(f"resumed-from-{step_dir_name(step)}.json")
        if self._read_json(marker) is not None:
            log.info("checkpoint.resumeStep %d was carried out earlier (%s); resuming from the newest step",
                     step, self.location.url_of(f"resumed-from-{step_dir_name(step)}.json"))
            return self.load(state)
        loaded = self.load(state, step)
        if self.rank == 0 or not _distributed():
            steps = self._retry(self._scan, what="listing of checkpoints", deadline=self._deadline())
            for newer in sorted(s for s in steps if s > step):
                where = self.set_aside(newer, "superseded")
                log.warning("checkpoint step %d set aside as %s: resuming from step %d as asked", newer, where, step)
            record = json.dumps({"step": step, "time": time.time()}).encode()
            self._retry(lambda: self.location.write_bytes(marker, record), what="resume marker",
                        deadline=self._deadline())
        if _distributed():
            dist.barrier()
        return loaded

    def _for_source(self, url: str) -> tuple[Checkpointer, int | None]:
        """A read-only twin of this checkpointer pointed at another stage's directory."""
        parts = url.rstrip("/").rsplit("/", 1)
        step = None
        if len(parts) == 2 and (match := _STEP_DIR.match(parts[1])):
            url, step = parts[0], int(match.group(1))
        base, job, stage = (url.rstrip("/").rsplit("/", 2) + ["", ""])[:3]
        if not job or not stage or base.endswith(":/"):
            raise CheckpointNotFoundError(f"checkpoint source {url!r} is not a .../<job>/<stage>[/step-N] URL")
        twin = Checkpointer(uri=base, job=job, stage=stage, keep=self.keep, keep_every=None, async_save=False,
                            rank=self.rank, world_size=self.world_size, metrics=self.metrics,
                            retry_budget_s=self.policy.budget_s, staging_dir=self._staging_root,
                            io_threads=self.io_threads, storage_options=self.location.options or None)
        return twin, step

    def _download(self, step: int, names: list[str], local: Path, deadline: float, listed: dict) -> None:
        """Fetch whole files of a step into `local`, in parallel, each with retries, and check
        them against the manifest's sha256 (cheap next to the download itself)."""
        step_path = self.location.path(step_dir_name(step))

        def fetch(name: str) -> None:
            target = local / name
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = self._retry(lambda: self.location.download(f"{step_path}/{name}", target),
                                 what=f"download of {name} (step {step})", deadline=deadline)
            expected = listed.get(name, {}).get("sha256")
            if expected is not None and digest != expected:
                raise CheckpointCorruptError(
                    f"checkpoint step {step}: {name} does not match the sha256 in its manifest "
                    f"({self.location.url_of(step_dir_name(step), name)}); load an older step with step=..."
                )

        with ThreadPoolExecutor(max_workers=max(1, min(self.io_threads, len(names)))) as pool:
            list(pool.map(fetch, names))

    def wait(self) -> None:
        """Block until the in-flight upload is committed; raise its failure if it was not.

        Once the worker is told to stop, the wait lasts at most until the stop grace ends;
        then the upload is abandoned (its partial step is never loaded) and
        `CheckpointAbandonedError` says which step is the last committed one.
        """
        if self._thread is not None:
            while self._thread.is_alive():
                self._thread.join(0.1)
                if self._thread.is_alive() and self._should_abandon():
                    self._thread = None  # a daemon: it stops at its next request or poll
                    raise self._abandoned_error(self._inflight_step)
            self._thread = None
        if self._error is not None:
            if isinstance(self._error, StorageAbandonedError) or (self._stop is not None and self._stop.requested):
                error, step = self._error, self._error_step
                self._error = None
                raise self._abandoned_error(step) from error
            error, step = self._error, self._error_step
            self._error, self._error_step = None, None
            raise CheckpointUploadError(f"checkpoint step {step} was not committed: {error}") from error

    def _should_abandon(self) -> bool:
        """True once a stop was requested more than the stop grace ago (and from then on)."""
        if self._abandon.is_set():
            return True
        since = getattr(self._stop, "requested_at", None) if self._stop is not None else None
        if since is None or not self._stop.requested or time.monotonic() < since + self.stop_grace_s:
            return False
        self._abandon.set()
        return True

    def _abandoned_error(self, step: int | None) -> CheckpointAbandonedError:
        last = f"step {self.committed_step}" if self.committed_step is not None else "none"
        log.error("checkpoint step %s abandoned: not committed within the %.0f s stop grace (last committed: %s)",
                  step, self.stop_grace_s, last)
        return CheckpointAbandonedError(f"checkpoint step {step} was abandoned at stop (not committed within "
                                        f"{self.stop_grace_s:.0f} s); last committed: {last}")

    def close(self) -> None:
        """Wait for the in-flight upload (raising its failure) and drop this rank's staging files."""
        try:
            self.wait()
        finally:
            self._remove_stale_staging(include_own=True)

    # ---- local staging (collective: DCP plans across ranks) ----------------------------
    def _write_local(self, step: int, state: dict, rank_bytes: bytes | None, group: Any) -> _Staged:
        """DCP-save into a private local directory (tmpfs: a memory copy); the collective part."""
        local = self._staging_dir(step, _tensor_bytes(state))
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        try:
            writer = FileSystemWriter(local, single_file_per_rank=True, sync_files=False,
                                      thread_count=self.io_threads, overwrite=True)
            metadata = _dcp(dcp.save, state, f"staging step {step}", storage_writer=writer, process_group=group)
            if rank_bytes is not None:
                (local / rank_state_name(self.rank)).write_bytes(rank_bytes)
            files = {p.relative_to(local).as_posix(): p.stat().st_size for p in local.rglob("*") if p.is_file()}
            return _Staged(step=step, save_id=self._save_id(metadata, group), local_dir=local, files=files)
        except BaseException:
            shutil.rmtree(local, ignore_errors=True)
            raise

    def _staging_dir(self, step: int, need: int) -> Path:
        """Staging dir for this save; falls back to the temp dir when tmpfs is too small."""
        root = self._staging_root
        root.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(root).free < need * 1.1 + (64 << 20):
            fallback = Path(tempfile.gettempdir())
            log.warning("staging dir %s has less than %.0f MB free; staging step %d in %s instead",
                        root, need / 1e6, step, fallback)
            root = fallback
        return root / f"{self._staging_prefix}-p{os.getpid()}-{step:09d}"

    def _save_id(self, metadata: Any, group: Any) -> str:
        """DCP's save id (rank 0's, sent to all ranks); torch builds without it get a broadcast uuid."""
        save_id = getattr(getattr(metadata, "storage_meta", None), "save_id", None)
        if save_id:
            return str(save_id)
        box = [uuid.uuid4().hex if self.rank == 0 else None]
        if _distributed():
            dist.broadcast_object_list(box, src=0, group=group)
        return str(box[0])

    # ---- upload and commit (no collectives; retried per rank) ---------------------------
    def _save_in_background(self, step: int, host_copy: dict, rank_bytes: bytes | None) -> None:
        try:
            staged = self._write_local(step, host_copy, rank_bytes, group=self._group)
            self._upload(staged)
        except BaseException as exc:  # noqa: BLE001 - kept and raised at the next save()/wait()
            log.error("checkpoint step %d NOT committed: %s", step, exc)
            self._error, self._error_step = exc, step

    def _upload_or_raise(self, staged: _Staged) -> None:
        try:
            self._upload(staged)
        except StorageAbandonedError as exc:
            raise self._abandoned_error(staged.step) from exc
        except StorageError as exc:
            raise CheckpointUploadError(f"checkpoint step {staged.step} was not committed: {exc}") from exc

    def _upload(self, staged: _Staged) -> None:
        started = time.monotonic()
        deadline = started + self.policy.budget_s
        step_path = self.location.path(step_dir_name(staged.step))
        try:
            entries = self._upload_files(staged, step_path, deadline)
            marker = json.dumps({"save_id": staged.save_id, "rank": self.rank, "files": entries}).encode()
            self._retry(lambda: self.location.write_bytes(f"{step_path}/{marker_name(self.rank)}", marker),
                        what=f"marker of rank {self.rank} (step {staged.step})", deadline=deadline)
            if self.rank == 0:
                self._commit(staged, step_path, deadline)
            else:  # rank 0 may have started later; give it a minute beyond our own budget
                self._await_manifest(staged, step_path, deadline + 60.0)
        finally:
            shutil.rmtree(staged.local_dir, ignore_errors=True)
        seconds = time.monotonic() - started
        nbytes = sum(staged.files.values())
        if self.metrics is not None:
            self.metrics.get("ps3_checkpoint_upload_seconds").set(seconds)
            self.metrics.checkpoint_committed(time.time(), nbytes)
        log.info("checkpoint step %d committed (%.1f MB from rank %d, upload %.1fs)",
                 staged.step, nbytes / 1e6, self.rank, seconds)
        if self._trouble is not None:
            self._trouble = None
            self._tell({"checkpoint": "committed", "step": staged.step})
        self.committed_step = max(staged.step, self.committed_step or 0)
        if self.rank == 0:
            self._retain_quietly()

    def _upload_files(self, staged: _Staged, step_path: str, deadline: float) -> dict[str, dict]:
        """Upload this rank's files in parallel; returns name -> {size, sha256, rank}."""

        def upload(name: str) -> tuple[str, dict]:
            local = staged.local_dir / name
            entry = {"size": staged.files[name], "sha256": _sha256(local), "rank": self.rank}
            self._retry(lambda: self.location.put_file(local, f"{step_path}/{name}"),
                        what=f"upload of {name} (step {staged.step})", deadline=deadline)
            return name, entry

        with ThreadPoolExecutor(max_workers=max(1, min(4, len(staged.files)))) as pool:
            return dict(pool.map(upload, sorted(staged.files)))

    def _commit(self, staged: _Staged, step_path: str, deadline: float) -> None:
        """Rank 0: once every rank's marker for this save is there, write the manifest (last)."""
        markers = self._await_markers(staged, step_path, deadline)
        files: dict[str, dict] = {}
        for marker in markers.values():
            files.update(marker["files"])
        manifest = {
            "format": FORMAT, "job": self.job, "stage": self.stage, "step": staged.step,
            "save_id": staged.save_id, "world_size": self.world_size, "created": time.time(), "files": files,
        }
        data = json.dumps(manifest, indent=1, sort_keys=True).encode()
        self._retry(lambda: self.location.write_bytes(f"{step_path}/{MANIFEST}", data),
                    what=f"manifest of step {staged.step}", deadline=deadline)

    def _await_markers(self, staged: _Staged, step_path: str, deadline: float) -> dict[int, dict]:
        found: dict[int, dict] = {}
        delay = 0.05
        while True:
            for rank in range(self.world_size):
                if rank not in found:
                    marker = self._read_json(f"{step_path}/{marker_name(rank)}")
                    if marker is not None and marker.get("save_id") == staged.save_id:
                        found[rank] = marker
            if len(found) == self.world_size:
                return found
            if self._should_abandon():
                raise StorageAbandonedError(f"waiting for the other ranks' uploads of step {staged.step} abandoned")
            self._fail_if_gone(set(range(self.world_size)) - set(found), staged.step)
            if time.monotonic() > deadline:
                missing = sorted(set(range(self.world_size)) - set(found))
                raise StorageError(f"ranks {missing} did not finish uploading step {staged.step} in time")
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    def _await_manifest(self, staged: _Staged, step_path: str, deadline: float) -> None:
        delay = 0.05
        while True:
            manifest = self._read_json(f"{step_path}/{MANIFEST}")
            if manifest is not None and manifest.get("save_id") == staged.save_id:
                return
            if self._should_abandon():
                raise StorageAbandonedError(f"waiting for rank 0 to commit step {staged.step} abandoned")
            self._fail_if_gone({0}, staged.step)
            if time.monotonic() > deadline:
                raise StorageError(f"rank 0 did not commit step {staged.step} in time")
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    def _fail_if_gone(self, ranks: set[int], step: int) -> None:
        if self._peers is not None and (gone := self._peers.gone(sorted(ranks))):
            raise StorageError(f"ranks {gone} are gone: step {step} cannot commit")

    # ---- progress (what a restart lost) -------------------------------------------------
    def write_progress(self, record: dict) -> None:
        """Leave this attempt's progress beside the checkpoints (rank 0, at log intervals).

        In the background and best effort: a store that hangs must not hold up training
        steps (or a stop). One writer thread writes the newest record, so records that
        arrive while a write is in flight replace each other and the last one always lands
        (`flush_progress`); a failed write is logged and costs only how fresh `status` and
        the next restart's lost-steps figure are."""
        with self._progress_lock:
            self._progress_pending = json.dumps(record).encode()
            if self._progress_thread is None:
                self._progress_thread = threading.Thread(target=self._write_progress, name="ps3-progress",
                                                         daemon=True)
                self._progress_thread.start()

    def flush_progress(self, timeout_s: float = 5.0) -> None:
        """Wait (a little) for the last progress record to land: at the end of a stage."""
        thread = self._progress_thread
        if thread is not None:
            thread.join(timeout_s)

    def _write_progress(self) -> None:
        while True:
            with self._progress_lock:
                data, self._progress_pending = self._progress_pending, None
                if data is None:
                    self._progress_thread = None
                    return
            try:
                if self.location.is_local:
                    self.location.fs.makedirs(self.location.root, exist_ok=True)
                self.location.fs.pipe_file(self.location.path(PROGRESS), data)
            except Exception as exc:  # noqa: BLE001 - any storage error; training goes on
                log.warning("could not write %s: %s", self.location.url_of(PROGRESS), exc)

    def read_progress(self) -> dict | None:
        """The previous attempt's last progress record, if it left one."""
        record = self._read_json(self.location.path(PROGRESS))
        return record if isinstance(record, dict) else None

    def _read_json(self, path: str) -> dict | None:
        """A small JSON object, or None if it is absent, unreadable or the store is down (polling)."""
        try:
            return json.loads(self.location.fs.cat_file(path))
        except FileNotFoundError:
            return None
        except Exception as exc:  # noqa: BLE001 - a poll: the caller's deadline bounds it
            log.debug("reading %s failed: %s", path, exc)
            self._record_trouble(f"poll of {path.rsplit('/', 1)[-1]}", exc)
            return None

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
