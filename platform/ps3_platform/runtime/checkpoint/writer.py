"""Saving: stage, upload in the background, commit by manifest (see the package docstring for
the order of a save and why), and stop waiting when the worker is told to stop.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.stateful import Stateful

from ..storage import (
    StorageAbandonedError,
    StorageError,
)
from .layout import (
    FORMAT,
    MANIFEST,
    CheckpointAbandonedError,
    CheckpointError,
    CheckpointUploadError,
    _sha256,
    marker_name,
    rank_state_name,
    step_dir_name,
)
from .staging import _dcp, _distributed, _serialize, _Staged, _tensor_bytes

log = logging.getLogger(__name__)


class Saving:
    """Checkpointer's saving half (its state is set up by `Checkpointer.__init__`)."""

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
