"""Webdataset tar shards: writing them, scanning them, and reading one sample by offset.

A shard is a plain webdataset tar (`<key>.jpg|png` + `<key>.json`, members of a sample
adjacent), so any webdataset reader can consume it. Next to each shard we keep a small
offset table (`<shard>.idx.json`) so the loader can fetch any sample with one ranged read.
Random access is what makes the sample order a pure function of (seed, position): exact
resume needs no shuffle buffers to be replayed, and an S3 ranged GET of a 1-3 MB 4K JPEG
costs about what a streamed read does.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

import webdataset as wds
from webdataset.tariterators import base_plus_ext

from .fs import filesystem, join
from .records import IMAGE_EXTS, BadSample
from .retry import ReadRetry, read_with

SIDECAR_SUFFIX = ".idx.json"
SHARD_PATTERN = "shard-{:06d}.tar"


@dataclass(frozen=True)
class SampleEntry:
    """Where one sample's members live inside its shard (None: member absent)."""

    key: str
    image_ext: str | None
    image: tuple[int, int] | None  # (offset, size) of the image member's data
    json: tuple[int, int] | None  # (offset, size) of the json member's data
    boxes: int = 0  # boxes in its json (0 when the json is bad)
    has_global: bool = False  # json carries a global caption

    def to_list(self) -> list:
        return [self.key, self.image_ext, self.image, self.json, self.boxes, int(self.has_global)]

    @classmethod
    def from_list(cls, row: list) -> SampleEntry:
        key, ext, image, js, boxes, glob = row
        return cls(key, ext, tuple(image) if image else None, tuple(js) if js else None, int(boxes), bool(glob))


@dataclass
class ShardScan:
    """What a pass over one tar found: its samples, the damage it stepped over, why it stopped."""

    samples: list[SampleEntry]
    error: str | None = None  # set when the tar ends early (truncated, unreadable)
    skipped: list[str] = field(default_factory=list)  # corrupt headers resynchronised past

    def problems(self) -> str | None:
        """One line naming all damage, or None for a clean shard."""
        parts = self.skipped + ([self.error] if self.error else [])
        return "; ".join(parts) or None


def scan_tar(stream: IO[bytes], total_size: int) -> ShardScan:
    """Group a tar's members into samples with their data offsets.

    `stream` must be seekable (BytesIO, fsspec files). A corrupt header is stepped over
    (see `_members`), so only the damaged member is lost and its sample shows up
    incomplete: the loader counts it under missing_image/missing_json, with its key. A
    truncated tail ends the scan; the sample cut off there is kept without the member, so
    it is counted too.
    """
    groups: dict[str, dict] = {}
    error, skipped, expected = None, [], stream.tell()
    try:
        for tar, member in _members(stream, total_size):
            if member.offset > expected:
                skipped.append(f"corrupt tar header at byte {expected} ({member.offset - expected} bytes skipped)")
            expected = member.offset_data + -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            key, ext = base_plus_ext(member.name) if member.isfile() else (None, None)
            if key is None:
                continue
            members = groups.setdefault(key, {})
            if member.offset_data + member.size > total_size:
                error = f"truncated at member {member.name}"
                break
            data = tar.extractfile(member).read() if ext.lower() == "json" else None
            members[ext.lower()] = (member.offset_data, member.size, data)
        else:
            error = _end_marker_error(stream, expected, total_size)
    except (tarfile.TarError, OSError, EOFError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    return ShardScan([_entry(k, m) for k, m in groups.items()], error, skipped)


def _end_marker_error(stream: IO[bytes], end: int, total_size: int) -> str | None:
    """None if a zero block (end of archive) follows the last member; else what is wrong.

    A tar cut exactly between members reads as a shorter, valid archive: only the
    missing end marker tells that samples were lost.
    """
    if end + tarfile.BLOCKSIZE > total_size:
        return f"truncated after byte {end}: no end-of-archive marker"
    stream.seek(end)
    block = stream.read(tarfile.BLOCKSIZE)
    return None if block == tarfile.NUL * tarfile.BLOCKSIZE else f"unreadable tar data after byte {end}"


def _members(stream: IO[bytes], total_size: int) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """Every readable member header, resynchronising after corrupt ones.

    tarfile's `ignore_zeros` already tries each following 512-byte block after a bad
    header, but a bad header behind a pax extended header (webdataset writes those) is a
    hard ReadError; then reading restarts one block past the pax header.
    """
    start = stream.tell()
    while start < total_size:
        stream.seek(start)
        tar = None
        try:
            tar = tarfile.open(fileobj=stream, mode="r:", ignore_zeros=True)
            while (member := tar.next()) is not None:
                yield tar, member
            return
        except tarfile.ReadError:
            start = (tar.offset if tar is not None else start) + tarfile.BLOCKSIZE


def _entry(key: str, members: dict) -> SampleEntry:
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    image = members[ext][:2] if ext else None
    js = members.get("json")
    boxes, has_global = 0, False
    if js is not None:
        try:
            obj = json.loads(js[2])
            boxes, has_global = len(obj.get("boxes", [])), bool(obj.get("global_caption"))
        except (ValueError, AttributeError, TypeError):
            pass
    return SampleEntry(key, ext, image, js[:2] if js else None, boxes, has_global)


def require_members(entry: SampleEntry) -> None:
    """The one classification of an incomplete sample, for the loader and `data check` alike."""
    if entry.json is None:
        raise BadSample("missing_json", entry.key)
    if entry.image is None:
        raise BadSample("missing_image", entry.key)


def read_sample_bytes(fs, path: str, entry: SampleEntry, reads: ReadRetry | None = None) -> tuple[bytes, bytes]:
    """(image bytes, json bytes) of one sample with a single ranged read.

    With `reads`, storage errors are retried (DataReadError when its budget is spent): an
    outage is not bad data. A missing object or a short read is a bad sample either way.
    """
    require_members(entry)
    start = min(entry.image[0], entry.json[0])
    end = max(entry.image[0] + entry.image[1], entry.json[0] + entry.json[1])
    try:
        blob = read_with(reads, fs, path, lambda: fs.cat_file(path, start=start, end=end))
    except (OSError, ValueError) as exc:  # FileNotFoundError; without `reads` also S3 errors (OSErrors)
        raise BadSample("read_error", entry.key, f"{path}: {type(exc).__name__}") from None
    if len(blob) != end - start:
        raise BadSample("read_error", entry.key, f"{path}: short read")
    img = blob[entry.image[0] - start: entry.image[0] - start + entry.image[1]]
    js = blob[entry.json[0] - start: entry.json[0] - start + entry.json[1]]
    return img, js


def write_sidecar(fs, shard_path: str, samples: list[SampleEntry], size: int) -> None:
    """Write `<shard>.idx.json`: the shard's size and each sample's member offsets."""
    table = {"bytes": size, "samples": [s.to_list() for s in samples]}
    fs.pipe_file(shard_path + SIDECAR_SUFFIX, json.dumps(table, separators=(",", ":")).encode())


def read_sidecar(fs, shard_path: str, reads: ReadRetry | None = None) -> tuple[int, list[SampleEntry]] | None:
    """The shard's (size, samples) from its offset table, or None if there is none.

    With `reads`, storage errors are retried (DataReadError when its budget is spent).
    """
    path = shard_path + SIDECAR_SUFFIX
    try:
        table = json.loads(read_with(reads, fs, path, lambda: fs.cat_file(path)))
        return int(table["bytes"]), [SampleEntry.from_list(r) for r in table["samples"]]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return None  # a damaged table is rebuilt from the tar


def scan_shard(fs, shard_path: str) -> ShardScan:
    """Scan a shard on `fs` (raises OSError if it cannot be opened at all)."""
    size = fs.size(shard_path)
    with fs.open(shard_path, "rb") as stream:
        return scan_tar(stream, size)


def iter_webdataset(uri: str, shard_names: list[str]) -> Iterator[dict]:
    """Samples of the named shards through webdataset's own tar reader (format check)."""
    fs, path = filesystem(uri)
    for name in shard_names:
        with fs.open(f"{path}/{name}", "rb") as stream:
            yield from wds.tariterators.group_by_keys(
                wds.tariterators.tar_file_expander([{"url": join(uri, name), "stream": stream}]))
