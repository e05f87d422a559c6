"""Reading and writing ``config.json`` + ``model.safetensors`` directories through fsspec.

Local paths and ``file://`` URIs are memory-mapped; other URIs (``s3://`` ...) are read
into memory in one piece (a 4K PS3 checkpoint is about 4 GB in fp32).
"""

from __future__ import annotations

import json
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save as st_save

from ps3.model.errors import CheckpointError

__all__ = ["join", "read_json", "write_json", "read_tensors", "write_tensors", "check_state_dict"]


def join(root: str, name: str) -> str:
    """``root/name`` for local paths and URIs alike."""
    return str(root).rstrip("/") + "/" + name


def read_json(uri: str) -> dict[str, Any]:
    """A JSON file as a dict; a missing or malformed file is a ``CheckpointError`` naming it."""
    try:
        with fsspec.open(uri, "r") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {uri}: {exc}") from exc


def write_json(uri: str, data: dict[str, Any]) -> None:
    with fsspec.open(uri, "w", auto_mkdir=True) as f:
        json.dump(data, f, indent=2, sort_keys=False)


def read_tensors(uri: str) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file."""
    fs, path = fsspec.core.url_to_fs(uri)
    try:
        if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
            return st_load_file(path)
        with fs.open(path, "rb") as f:
            return st_load(f.read())
    except Exception as exc:
        raise CheckpointError(f"cannot read tensors from {uri}: {exc}") from exc


def write_tensors(uri: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors (moved to CPU, contiguous) as one safetensors file."""
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    blob = st_save(cpu, metadata=metadata or {"format": "pt"})
    with fsspec.open(uri, "wb", auto_mkdir=True) as f:
        f.write(blob)


def _names(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(source: str, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                     *, allowed_missing: set[str] = frozenset()) -> None:
    """Fail loudly unless ``tensors`` covers ``expected`` exactly, with the same shapes.

    ``allowed_missing`` lists our parameters a source legitimately lacks (for example the
    PS3-only selection modules when starting from plain SigLIP weights).
    """
    missing = [k for k in expected if k not in tensors and k not in allowed_missing]
    unexpected = [k for k in tensors if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in tensors if k in expected and tuple(tensors[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_names(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} wrong shapes: {'; '.join(shapes[:6])}")
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + " | ".join(problems))
