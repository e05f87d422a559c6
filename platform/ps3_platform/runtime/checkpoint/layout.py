"""Where a checkpoint's files live and what makes a step committed: names, errors, retention.

A step directory `step-{N:09d}/` holds DCP's shards and metadata, one `rank-{r:05d}.pt` per
rank, one marker per rank under `_ranks/` and `manifest.json`, written last; a step is
committed when its manifest exists and lists every file with its size.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

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

