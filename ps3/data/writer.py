"""Writing a source: numbered webdataset tar shards, their offset tables, then index.json.

Above both `shards` (the tar format and offset tables) and `index` (a source's index over
its shards): the writer is the one piece that needs the two.
"""

from __future__ import annotations

import io

import webdataset as wds

from .fs import filesystem
from .index import build_index
from .records import IMAGE_EXTS, Record
from .shards import SHARD_PATTERN, scan_tar, write_sidecar


class ShardWriter:
    """Writes samples of one source into numbered tar shards plus their offset tables.

    Each shard is assembled in memory, then uploaded in one write, so the same code
    writes to local disk and object storage. `close()` writes `index.json` and returns it.
    """

    def __init__(self, uri: str, source: str, samples_per_shard: int = 100, max_shard_bytes: int = 256 << 20):
        self.uri, self.source = uri.rstrip("/"), source
        self.samples_per_shard, self.max_shard_bytes = samples_per_shard, max_shard_bytes
        self.fs, self.path = filesystem(self.uri)
        self.fs.makedirs(self.path, exist_ok=True)
        self._shard_names: list[str] = []
        self._open_new()

    def _open_new(self) -> None:
        self._buffer = io.BytesIO()
        self._tar = wds.TarWriter(self._buffer, encoder=False)
        self._count = 0

    def write(self, key: str, image: bytes, image_ext: str, record: Record) -> None:
        """Append one sample; `key` must be unique within the source and contain no dot."""
        if image_ext not in IMAGE_EXTS:
            raise ValueError(f"image extension {image_ext!r} not one of {IMAGE_EXTS}")
        self.write_members(key, {image_ext: image, "json": record.to_json()})

    def write_members(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample given as raw members (extension -> bytes), unvalidated.

        For converters from other formats, and for tests that need damaged samples.
        """
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        self._tar.write({"__key__": key, **members})
        self._count += 1
        if self._count >= self.samples_per_shard or self._buffer.tell() >= self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if self._count == 0:
            return
        self._tar.close()
        data = self._buffer.getvalue()
        name = SHARD_PATTERN.format(len(self._shard_names))
        scan = scan_tar(io.BytesIO(data), len(data))
        self.fs.pipe_file(f"{self.path}/{name}", data)
        write_sidecar(self.fs, f"{self.path}/{name}", scan.samples, len(data))
        self._shard_names.append(name)
        self._open_new()

    def close(self) -> dict:
        """Flush the last shard and write the source's index.json; returns the index."""
        self._flush()
        return build_index(self.uri, source=self.source)

    def __enter__(self) -> ShardWriter:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
