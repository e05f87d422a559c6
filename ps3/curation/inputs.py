"""What to curate: the inputs of every source, each with a stable id, planned into shards.

An input is one image file, one page of a PDF, or one image member of an existing
webdataset shard. Its id is a hash of (source, URI, page or member), so it does not change
when other files are added, and output shards are planned from sorted ids: the same inputs
always give the same shards with the same names. That is what lets a re-run skip the
shards already committed and never write an input twice (`writer.py`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
from dataclasses import asdict, dataclass

from ps3.data.fs import filesystem, fs_uri
from ps3.data.shards import SIDECAR_SUFFIX, read_sidecar, scan_shard

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff")
PDF_SUFFIX = ".pdf"


class InputError(RuntimeError):
    """A source's inputs cannot be listed at all (unreachable URI, nothing matches): names the URI."""


@dataclass(frozen=True)
class SourceSpec:
    """One source to curate (the task's params give these)."""

    name: str
    kind: str  # natural | document
    uri: str  # a directory, a glob (…/*.jpg) or, with format webdataset, a shard directory
    index: str | None = None  # a file listing input URIs, one per line
    format: str = "files"  # files | webdataset


@dataclass(frozen=True)
class InputItem:
    """One unit of curation: becomes at most one output sample."""

    id: str
    source: str
    kind: str
    uri: str
    page: int | None = None  # PDF page (0-based)
    member: tuple[int, int] | None = None  # (offset, size) of an image member inside a tar
    shard: str = ""  # the output shard it is planned into

    @property
    def name(self) -> str:
        """How logs and summaries name the input."""
        if self.page is not None:
            return f"{self.uri}#page={self.page + 1}"
        if self.member is not None:
            return f"{self.uri}#offset={self.member[0]}"
        return self.uri

    def to_row(self) -> dict:
        return {"id": self.id, "shard": self.shard, "meta": json.dumps(asdict(self))}

    @classmethod
    def from_meta(cls, meta: dict) -> InputItem:
        fields = {k: meta[k] for k in cls.__dataclass_fields__}
        if fields["member"] is not None:
            fields["member"] = tuple(fields["member"])
        return cls(**fields)


def input_id(source: str, uri: str, part: str = "") -> str:
    """A key usable in a webdataset shard (no '.' or '/') that names the input for good."""
    return hashlib.sha1(f"{source}\0{uri}\0{part}".encode()).hexdigest()[:20]


def list_inputs(source: SourceSpec, failures: list[tuple[str, str, str]]) -> list[InputItem]:
    """Every input of `source`, sorted by id. PDFs are opened to count pages; one that cannot
    be opened is recorded in `failures` as (name, kind, detail) and skipped."""
    if source.format == "webdataset":
        items = _webdataset_inputs(source, failures)
    else:
        items = []
        for uri in _file_uris(source):
            if uri.lower().endswith(PDF_SUFFIX):
                items += _pdf_inputs(source, uri, failures)
            else:
                items.append(InputItem(input_id(source.name, uri), source.name, source.kind, uri))
    unique = {item.id: item for item in items}  # an index that lists a file twice still curates it once
    return sorted(unique.values(), key=lambda i: i.id)


def _wanted(path: str, kind: str) -> bool:
    lower = path.lower()
    return lower.endswith(IMAGE_SUFFIXES) or (kind == "document" and lower.endswith(PDF_SUFFIX))


def _file_uris(source: SourceSpec) -> list[str]:
    try:
        if source.index:
            fs, path = filesystem(source.index)
            lines = fs.cat_file(path).decode().splitlines()
            return [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        fs, path = filesystem(source.uri)
        if any(c in path for c in "*?["):
            found = fs.glob(path)
        else:
            if not fs.isdir(path):
                raise InputError(f"source {source.name}: {source.uri} is not a directory or glob")
            found = [p for p in fs.find(path) if _wanted(p, source.kind)]
    except InputError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"source {source.name}: cannot list {source.index or source.uri}: "
                         f"{type(exc).__name__}: {exc}") from None
    uris = sorted(fs_uri(fs, p) for p in found if _wanted(p, source.kind))
    if not uris:
        raise InputError(f"source {source.name}: no {'images or PDFs' if source.kind == 'document' else 'images'} "
                         f"at {source.index or source.uri}")
    return uris


def _pdf_inputs(source: SourceSpec, uri: str, failures: list) -> list[InputItem]:
    from .documents import DocumentError, pdf_page_count

    try:
        fs, path = filesystem(uri)
        pages = pdf_page_count(fs.cat_file(path))
    except (DocumentError, OSError) as exc:
        failures.append((uri, "pdf_error", str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
        return []
    return [InputItem(input_id(source.name, uri, f"page{p}"), source.name, source.kind, uri, page=p)
            for p in range(pages)]


def _webdataset_inputs(source: SourceSpec, failures: list) -> list[InputItem]:
    """Image members of the shards of a webdataset directory, addressed by tar offset."""
    try:
        fs, path = filesystem(source.uri)
        shards = sorted(p for p in fs.ls(path, detail=False) if fnmatch.fnmatch(p, "*.tar"))
    except (OSError, ValueError) as exc:
        raise InputError(f"source {source.name}: cannot list {source.uri}: {type(exc).__name__}: {exc}") from None
    items = []
    for shard in shards:
        uri = fs_uri(fs, shard)
        try:
            cached = read_sidecar(fs, shard) if fs.exists(shard + SIDECAR_SUFFIX) else None
            fresh = cached is not None and cached[0] == fs.size(shard)  # a table of another tar is not trusted
            entries = cached[1] if fresh else scan_shard(fs, shard).samples
        except (OSError, ValueError) as exc:
            failures.append((uri, "read_error", f"{type(exc).__name__}: {exc}"))
            continue
        for entry in entries:
            if entry.image is not None:
                items.append(InputItem(input_id(source.name, uri, entry.key), source.name, source.kind, uri,
                                       member=tuple(entry.image)))
    if not items:
        raise InputError(f"source {source.name}: no image members in the shards at {source.uri}")
    return items


def plan_shards(items: list[InputItem], per_shard: int) -> dict[str, list[InputItem]]:
    """Chunk sorted inputs into shards named by a hash of their ids (stable across runs)."""
    shards: dict[str, list[InputItem]] = {}
    for start in range(0, len(items), per_shard):
        chunk = items[start:start + per_shard]
        digest = hashlib.sha1("\n".join(i.id for i in chunk).encode()).hexdigest()[:16]
        name = f"shard-{digest}.tar"
        shards[name] = [InputItem(**{**asdict(i), "shard": name}) for i in chunk]
    return shards
