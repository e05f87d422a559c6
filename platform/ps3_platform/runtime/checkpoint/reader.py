"""Loading: find the step to resume from, verify its files against the manifest, read them
with DCP (downloaded whole from object storage first), and set damaged steps aside.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystem as LocalDcpFileSystem

from ..storage import Location, StorageError

try:  # torch >= 2.2 keeps them here (2.14 only here); older releases exported them at the top.
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
except ImportError:  # pragma: no cover - depends on the torch build
    from torch.distributed.checkpoint import FsspecReader  # type: ignore[attr-defined,no-redef]

from .layout import (
    _STEP_DIR,
    MANIFEST,
    SET_ASIDE_DIR,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
    _sha256,
    rank_state_name,
    step_dir_name,
)
from .staging import _dcp, _distributed

log = logging.getLogger(__name__)


def _load_rank_state(data: bytes, url: str) -> dict:
    """A rank file holds tensors and plain values only: anything else is refused, never unpickled."""
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0][:200]
        raise CheckpointError(f"{url} holds objects a weights-only load refuses ({reason}); it was not written "
                              "by this version of ps3-platform: start from the step before, or afresh") from None


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


class Loading:
    """Checkpointer's loading half (its state is set up by `Checkpointer.__init__`)."""

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

    def _for_source(self, url: str) -> tuple[Loading, int | None]:
        """A read-only twin of this checkpointer pointed at another stage's directory."""
        parts = url.rstrip("/").rsplit("/", 1)
        step = None
        if len(parts) == 2 and (match := _STEP_DIR.match(parts[1])):
            url, step = parts[0], int(match.group(1))
        base, job, stage = (url.rstrip("/").rsplit("/", 2) + ["", ""])[:3]
        if not job or not stage or base.endswith(":/"):
            raise CheckpointNotFoundError(f"checkpoint source {url!r} is not a .../<job>/<stage>[/step-N] URL")
        twin = type(self)(uri=base, job=job, stage=stage, keep=self.keep, keep_every=None, async_save=False,
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
