"""A save's first half, on this host: copy the state into reused host buffers, then let DCP
write this rank's shards into a private local staging directory (tmpfs by default).
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# Private DCP helpers (also behind DCP's own async stager; present from torch 2.3 to 2.14).
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint.api import CheckpointException

try:
    from torch.distributed._state_dict_utils import CompanionMismatch
except ImportError:  # pragma: no cover - older torch raised a plain ValueError
    CompanionMismatch = ValueError  # type: ignore[assignment,misc]

from .layout import CheckpointError


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


@dataclass
class _Staged:
    """One rank's staged copy of one save, waiting to be uploaded."""

    step: int
    save_id: str
    local_dir: Path
    files: dict[str, int]  # name relative to the step dir -> size in bytes

