"""Per-source `index.json`: which shards a source has and how many samples each holds.

The loader needs sample counts up front (per-source streams are permutations of
0..N-1) without touching every shard; the index gives them in one small read. It is
written by `ShardWriter.close()` or rebuilt by `build_index(uri)` (`platformctl data
index URI`) after shards were added or copied by other tools.
"""

from __future__ import annotations

import bisect
import json
import logging
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field

from .fs import filesystem, fs_uri, join
from .records import BadSample, parse_record
from .retry import ReadRetry, read_with
from .shards import SampleEntry, read_sidecar, scan_shard, write_sidecar

INDEX_NAME = "index.json"
INDEX_FORMAT = "ps3-wds/1"
log = logging.getLogger(__name__)


class DataSourceError(RuntimeError):
    """A source cannot be used at all (no index, no readable shard); names the URI."""


def build_index(uri: str, source: str | None = None, shards: list[str] | None = None) -> dict:
    """Scan the shards under `uri` (using offset tables where valid), write index.json.

    `shards` limits the index to those names (a curation run indexes only the shards it
    committed, never a half-written one beside them); by default every `*.tar` is indexed.

    Returns the index: {"format", "source", "samples", "boxes", "global_captions",
    "shards": [{"name", "samples", "boxes", "global_captions", "bytes", "error"?}]}.
    A shard that cannot be scanned at all is listed with 0 samples and its error.
    """
    fs, path = filesystem(uri)
    if not fs.isdir(path):
        raise DataSourceError(f"no source directory at {uri}")
    names = sorted(shards if shards is not None else
                   (p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if p.endswith(".tar")))
    summaries = [_shard_summary(fs, f"{path}/{name}") | {"name": name} for name in names]
    index = {
        "format": INDEX_FORMAT,
        "source": source or path.rsplit("/", 1)[-1],
        "samples": sum(s["samples"] for s in summaries),
        "boxes": sum(s["boxes"] for s in summaries),
        "global_captions": sum(s["global_captions"] for s in summaries),
        "shards": summaries,
    }
    fs.pipe_file(f"{path}/{INDEX_NAME}", json.dumps(index, indent=1).encode())
    return index


def _shard_summary(fs, shard_path: str) -> dict:
    size = fs.size(shard_path)
    cached = read_sidecar(fs, shard_path)
    error = None
    if cached is not None and cached[0] == size:
        samples = cached[1]
    else:
        try:
            scan = scan_shard(fs, shard_path)
        except OSError as exc:
            return {"samples": 0, "boxes": 0, "global_captions": 0, "bytes": size, "error": str(exc)}
        samples, error = scan.samples, scan.problems()
        write_sidecar(fs, shard_path, samples, size)
    summary = {"samples": len(samples), "boxes": sum(s.boxes for s in samples),
               "global_captions": sum(s.has_global for s in samples), "bytes": size}
    return summary | ({"error": error} if error else {})


def read_index(uri: str, reads: ReadRetry | None = None) -> dict:
    """The parsed index.json of a source; DataSourceError naming the URI if absent or bad.

    With `reads`, storage errors are retried (DataReadError when its budget is spent).
    """
    fs, path = filesystem(uri)
    index_path = f"{path}/{INDEX_NAME}"
    try:
        index = json.loads(read_with(reads, fs, index_path, lambda: fs.cat_file(index_path)))
    except FileNotFoundError:
        raise DataSourceError(
            f"no {INDEX_NAME} in {uri}; build it with `platformctl data index {uri}`") from None
    except (OSError, ValueError) as exc:
        raise DataSourceError(f"cannot read {join(uri, INDEX_NAME)}: {exc}") from None
    if index.get("format") != INDEX_FORMAT or not isinstance(index.get("shards"), list):
        raise DataSourceError(f"{join(uri, INDEX_NAME)} is not a {INDEX_FORMAT} index; rebuild it")
    return index


def _unreadable_lead(fs, path: str, names: list[str], reads: ReadRetry | None = None) -> list[str]:
    """'name: problem' for the shards before the first one whose first tar header is sound.

    Catches a source whose shards exist at the right size but hold something else
    (overwritten, encrypted, another format) before any step runs, for the cost of one
    offset table and one 512-byte read when the first shard is fine.
    """
    problems = []
    for name in names:
        problem = _first_header_problem(fs, f"{path}/{name}", reads)
        if problem is None:
            break
        problems.append(f"{name}: {problem}")
    return problems


def _first_header_problem(fs, shard_path: str, reads: ReadRetry | None = None) -> str | None:
    try:
        entry = load_table(fs, shard_path, reads)[0]
        offset = min(m[0] for m in (entry.image, entry.json) if m is not None)
        block = read_with(reads, fs, shard_path,
                          lambda: fs.cat_file(shard_path, start=offset - tarfile.BLOCKSIZE, end=offset))
        header = tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except (OSError, IndexError, ValueError, tarfile.TarError) as exc:
        return f"{type(exc).__name__}: {exc}"
    expected = (entry.key + ".")[:100]  # a ustar name field holds 100 bytes (pax carries longer ones)
    return None if header.name.startswith(expected) else f"first member is {header.name!r}, not {entry.key}"


def load_table(fs, shard_path: str, reads: ReadRetry | None = None) -> list[SampleEntry]:
    """A shard's samples from its offset table, or from a scan of the tar if the table is missing or bad.

    With `reads`, storage errors are retried (DataReadError when its budget is spent); a
    missing shard still raises FileNotFoundError.
    """
    cached = read_sidecar(fs, shard_path, reads)
    if cached is not None:
        return cached[1]
    return read_with(reads, fs, shard_path, lambda: scan_shard(fs, shard_path)).samples


@dataclass
class SourceIndex:
    """Random access to a source's samples: global sample number -> shard and offsets.

    Offset tables are loaded lazily and kept in a small LRU cache, so a source with
    thousands of shards costs one small read per shard actually visited.
    """

    uri: str
    shards: list[str]
    counts: list[int]
    global_captions: int
    cache_size: int = 64
    _starts: list[int] = field(default_factory=list, repr=False)
    _tables: OrderedDict = field(default_factory=OrderedDict, repr=False)
    reads: ReadRetry | None = field(default=None, repr=False)  # retries storage errors of its reads; None: none

    def __post_init__(self) -> None:
        self._starts = [0]
        for n in self.counts:
            self._starts.append(self._starts[-1] + n)
        self.fs, self.path = filesystem(self.uri)

    @classmethod
    def open(cls, uri: str, reads: ReadRetry | None = None) -> SourceIndex:
        """Read index.json and keep the listed shards that exist with their indexed size.

        One listing call checks them all: a missing, emptied or truncated shard is left
        out (with a warning); if none is left, DataSourceError names the URI. With
        `reads`, storage errors of these reads are retried and the index keeps it.
        """
        index = read_index(uri, reads)
        listed = [s for s in index["shards"] if int(s["samples"]) > 0]
        fs, path = filesystem(uri)
        sizes = {e["name"].rsplit("/", 1)[-1]: e.get("size")
                 for e in read_with(reads, fs, path, lambda: fs.ls(path, detail=True))}
        live = [s for s in listed if s["name"] in sizes and sizes[s["name"]] == s.get("bytes", sizes[s["name"]])]
        if not live:
            raise DataSourceError(f"source {uri} has no readable shard: the {len(listed)} non-empty shards in its "
                                  f"index are missing or changed size; run `platformctl data check {uri}`")
        if len(live) < len(listed):
            log.warning("source %s: %d of %d shards missing or truncated; using the rest",
                        uri, len(listed) - len(live), len(listed))
        unreadable = _unreadable_lead(fs, path, [s["name"] for s in live], reads)
        if len(unreadable) == len(live):
            raise DataSourceError(f"source {uri} has no readable shard ({len(unreadable)} tried; {unreadable[0]}); "
                                  f"run `platformctl data check {uri}`")
        if unreadable:
            log.warning("source %s: leaving out %d unreadable shards (%s)", uri, len(unreadable), unreadable[0])
        live = live[len(unreadable):]
        return cls(uri, [s["name"] for s in live], [int(s["samples"]) for s in live],
                   int(index.get("global_captions", 0)), reads=reads)

    def __len__(self) -> int:
        return self._starts[-1]

    def locate(self, i: int) -> tuple[str, SampleEntry]:
        """(shard path, entry) of sample number `i`; raises OSError/IndexError on a bad shard."""
        s = bisect.bisect_right(self._starts, i) - 1
        shard_path = f"{self.path}/{self.shards[s]}"
        table = self._table(shard_path)
        return shard_path, table[i - self._starts[s]]

    def _table(self, shard_path: str) -> list[SampleEntry]:
        if shard_path in self._tables:
            self._tables.move_to_end(shard_path)
            return self._tables[shard_path]
        table = load_table(self.fs, shard_path, self.reads)
        self._tables[shard_path] = table
        if len(self._tables) > self.cache_size:
            self._tables.popitem(last=False)
        return table

    def describe(self) -> str:
        return fs_uri(self.fs, self.path)

    def probe_long_sides(self, samples: int = 8) -> list[int]:
        """Long image sides (json width/height) of up to `samples` samples spread over the source.

        A start-up check reads these few small json members to tell whether the data
        ever reaches a preset's top scale; unreadable ones are skipped (the loader counts them).
        """
        sides = []
        for i in sorted({len(self) * k // samples for k in range(samples)}):
            try:
                shard_path, entry = self.locate(i)
                if entry.json is None:
                    continue
                offset, size = entry.json
                record = parse_record(entry.key, self.fs.cat_file(shard_path, start=offset, end=offset + size))
                sides.append(max(record.width, record.height))
            except (OSError, IndexError, BadSample):
                continue
        return sides
