"""Model weights from a path or any fsspec URI, made local once per node.

Models load from local files only (torch.load, from_pretrained), and weights are never
fetched from a model hub: a run names them explicitly. Remote weights are copied into a
cache keyed by their URI, so every actor on a node after the first starts without a copy.
Local paths (and file:// URIs) are used in place; copying gigabytes of SAM or Qwen2-VL
from one local disk to another would only cost time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from ps3.curation.models import WeightsError
from ps3.data.fs import filesystem

#: Files whose names and sizes identify a model directory (see `file_digest`).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".json", ".model", ".txt")


def cache_dir() -> Path:
    """Where remote weights are copied: `$PS3_CACHE`, else ~/.cache/ps3-platform."""
    root = os.environ.get("PS3_CACHE") or Path.home() / ".cache" / "ps3-platform"
    return Path(root) / "weights"


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def check_weights(uri: str) -> None:
    """Raise `WeightsError` unless `uri` exists; cheap (no copy), for validating a spec."""
    _stat(uri)


def _stat(uri: str) -> tuple[object, str]:
    """The filesystem and path of `uri`, which must exist; any failure is one line naming it."""
    try:
        fs, path = filesystem(uri)
        found = fs.exists(path)
    except Exception as exc:  # missing driver, credentials, unreachable endpoint: all say "cannot read"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"cannot read weights at {uri}: {reason}") from exc
    if not found:
        raise WeightsError(f"weights not found: {uri}")
    return fs, path


def local_weights(uri: str) -> Path:
    """A local path holding the weights file or model directory at `uri`.

    Remote weights land in `cache_dir()/<hash of uri>/<name>`. The copy goes to a
    temporary directory first and is renamed into place, so a crash never leaves a
    half-copied model that later runs would trust, and two actors copying at once both
    end with one complete copy.
    """
    fs, path = _stat(uri)
    if _is_local(uri):
        return Path(path)
    name = path.rstrip("/").rsplit("/", 1)[-1] or "weights"
    target = cache_dir() / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not (target / name).exists():
        _copy_into(fs, path, target, name, uri)
    return target / name


def _copy_into(fs, path: str, target: Path, name: str, uri: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        if fs.isdir(path):
            fs.get(path.rstrip("/") + "/", str(staging / name), recursive=True)
        else:
            fs.get(path, str(staging / name))
        os.rename(staging, target)
    except OSError as exc:
        if not (target / name).exists():  # lost a race to another copier: theirs is complete
            raise WeightsError(f"cannot copy weights from {uri}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def file_digest(path: str | Path) -> str:
    """"sha256:<12 hex>" identifying weights, for each sample's provenance.

    A file is hashed in full. A directory (a transformers checkpoint of many gigabytes)
    is identified by the relative names and sizes of its weight and config files instead:
    cheap, and it changes whenever a checkpoint is replaced by a different one, though it
    cannot see an in-place edit that keeps every size.
    """
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES):
            digest.update(f"{file.relative_to(path).as_posix()}\0{file.stat().st_size}\n".encode())
    else:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()[:12]}"
