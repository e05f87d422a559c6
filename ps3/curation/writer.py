"""Output shards that are either committed whole or absent, and the marker that says so.

A shard is written to `<name>.tmp`, moved to `<name>`, given its offset table, and only
then committed by `<name>.done`: a JSON list of every input it covers and what became of
it (written, or skipped and why). A run killed at any point leaves no marker for a shard
it did not finish, so the next run writes that shard again under the same name (inputs
are planned into shards deterministically, `inputs.plan_shards`), and shards with a
marker are never touched: each input ends up in the output exactly once.
"""

from __future__ import annotations

import io
import json
import logging

import webdataset as wds

from ps3.data.fs import filesystem
from ps3.data.index import build_index
from ps3.data.shards import scan_tar, write_sidecar

log = logging.getLogger(__name__)

MARKER_SUFFIX = ".done"


def committed_shards(uri: str) -> dict[str, dict]:
    """{shard name: marker} of the shards already committed under a source's output `uri`."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return {}
    done = {}
    for marker in fs.glob(f"{path}/*.tar{MARKER_SUFFIX}"):
        name = marker.rsplit("/", 1)[-1].removesuffix(MARKER_SUFFIX)
        try:
            done[name] = json.loads(fs.cat_file(marker))
        except (ValueError, OSError):
            log.warning("unreadable commit marker %s: its shard will be written again", marker)
    return done


def write_shard(uri: str, name: str, samples: list[dict], outcomes: dict[str, dict]) -> None:
    """Write and commit one shard.

    `samples` are {"key", "image", "ext", "json"} (bytes members); `outcomes` maps every
    input id planned into this shard to {"input", "status": "written"|"skipped", "reason"?}.
    """
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)
    buffer = io.BytesIO()
    with wds.TarWriter(buffer, encoder=False) as tar:
        for sample in samples:
            tar.write({"__key__": sample["key"], sample["ext"]: sample["image"], "json": sample["json"]})
    data = buffer.getvalue()
    final = f"{path}/{name}"
    fs.pipe_file(final + ".tmp", data)
    fs.mv(final + ".tmp", final)
    write_sidecar(fs, final, scan_tar(io.BytesIO(data), len(data)).samples, len(data))
    marker = {"samples": len(samples), "inputs": outcomes}
    fs.pipe_file(final + MARKER_SUFFIX, json.dumps(marker, sort_keys=True).encode())


def finish_source(uri: str, source: str, planned: set[str]) -> dict:
    """Write the source's index.json over its committed, planned shards only.

    Shards left by an earlier run over different inputs are named in a warning and kept
    out of the index (never deleted: they may be someone's data).
    """
    fs, path = filesystem(uri)
    committed = set(committed_shards(uri))
    stale = sorted(committed - planned)
    if stale:
        log.warning("source %s: %d committed shards at %s are not in this run's plan (inputs changed?) and are "
                    "left out of index.json: %s", source, len(stale), uri, ", ".join(stale[:5]))
    fs.makedirs(path, exist_ok=True)  # a source whose inputs were all skipped still gets an (empty) index
    return build_index(uri, source=source, shards=sorted(committed & planned))
