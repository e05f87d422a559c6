"""Turning planned slots into a micro-batch: fetch, validate, decode, replace bad samples.

Runs in the loader's worker processes (or inline). A bad sample (see records.BAD_REASONS)
is counted, its key logged once per process, and its slot refilled by a deterministic
stand-in from the same source, so every micro-batch has exactly `micro_batch` samples and
the global order stays a function of (seed, position).
"""

from __future__ import annotations

import logging
import math
import zlib
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from .decode import decode_sample
from .index import DataSourceError, SourceIndex
from .records import BadSample, clip_box
from .retry import ReadRetry
from .sampling import Slot, replacement
from .shards import read_sample_bytes
from .views import FastPixels, ViewConfig, lowres_tensors, normalize_pixels, sample_tensors

log = logging.getLogger(__name__)
#: After this many bad samples in a row for one slot, the source is considered broken.
MAX_ATTEMPTS = 32
#: Keys already logged by this process; bounded so a rotten source cannot grow it forever.
_logged_keys: set[str] = set()
MAX_LOGGED_KEYS = 100_000
#: Batch entries holding uint8 pixels (a tensor, or a list of them per high-res scale).
IMAGE_KEYS = ("lowres", "selection_view", "highres", "hr_patches")


@dataclass(frozen=True)
class SourceRef:
    """A source as the main process opened it: workers use exactly this shard list.

    Re-listing in each worker could see another set of shards (one deleted meanwhile) and
    map sample numbers to other images than the planner meant.
    """

    name: str
    uri: str
    position: int  # in the spec's source list: the batch's `source` value
    shards: tuple[str, ...]
    counts: tuple[int, ...]
    global_captions: int

    @classmethod
    def open(cls, name: str, uri: str, position: int, reads: ReadRetry | None = None) -> SourceRef:
        """Open the source's index (fails naming the URI if it is unusable); `reads` retries storage errors."""
        index = SourceIndex.open(uri, reads)
        return cls(name, uri, position, tuple(index.shards), tuple(index.counts), index.global_captions)

    def index(self, reads: ReadRetry | None = None) -> SourceIndex:
        return SourceIndex(self.uri, list(self.shards), list(self.counts), self.global_captions, reads=reads)

    @property
    def id_base(self) -> int:
        """High bits of this source's sample ids: stable under reordering of the spec."""
        return (zlib.crc32(self.name.encode()) & 0x7FFFFFFF) << 32


@dataclass
class Pair:
    """One validated sample ready for batching."""

    tensors: dict
    caption: str
    is_global: bool
    sample_id: int
    source: int


class MicroBatchMaker:
    """Makes micro-batches from slots; opens source indexes lazily (once per process).

    With `read_retry_s`, storage errors of its reads are retried for that long each and
    counted in `bad` under "read_retries", which travels to the trainer with the skips.
    """

    def __init__(self, sources: list[SourceRef], views: ViewConfig, read_retry_s: float | None = None):
        self.sources, self.views = sources, views
        self._indexes: dict[int, SourceIndex] = {}
        self.bad: Counter = Counter()
        self.reads = None if read_retry_s is None else ReadRetry(read_retry_s, counts=self.bad)

    def _index(self, src: int) -> SourceIndex:
        if src not in self._indexes:
            self._indexes[src] = self.sources[src].index(self.reads)
        return self._indexes[src]

    def make(self, slots: list[Slot], used: set[tuple[int, int]]) -> tuple[dict, list[str]]:
        """(batch tensors without tokens, captions) for `slots`; `used` = the global batch's keys."""
        pairs = [self.load(slot, used) for slot in slots]
        return collate(pairs), [p.caption for p in pairs]

    def load(self, slot: Slot, used: set[tuple[int, int]]) -> Pair:
        """The slot's pair, or a stand-in's if its image is bad.

        Stand-ins avoid the planned batch and this slot's earlier stand-ins only, so they
        do not depend on how slots were split over ranks, micro-batches or workers.
        """
        index, idx = self._index(slot.source), slot.index
        tried: set[tuple[int, int]] = set()
        for attempt in range(MAX_ATTEMPTS):
            try:
                return self._pair(slot, index, idx)
            except BadSample as exc:
                self._count(exc, index)
            tried.add((slot.source, idx))
            idx = replacement(slot, attempt, len(index), _Union(used, tried))
        raise DataSourceError(f"{MAX_ATTEMPTS} bad samples in a row from source {index.uri}; run "
                              f"`platformctl data check {index.uri}`")

    def _count(self, exc: BadSample, index: SourceIndex) -> None:
        self.bad[exc.reason] += 1
        where = f"{getattr(exc, 'shard', index.uri)}#{exc.key}"
        if where not in _logged_keys and len(_logged_keys) < MAX_LOGGED_KEYS:
            _logged_keys.add(where)
            log.warning("skipping bad sample %s: %s", where, exc)

    def _pair(self, slot: Slot, index: SourceIndex, idx: int) -> Pair:
        try:
            shard_path, entry = index.locate(idx)
        except (OSError, IndexError) as exc:
            raise BadSample("read_error", f"sample{idx}", f"{type(exc).__name__}: {exc}") from None
        try:
            return self._pair_from(slot, index, idx, shard_path, entry)
        except BadSample as exc:
            exc.shard = shard_path  # the skip line names the shard to look in
            raise

    def _pair_from(self, slot: Slot, index: SourceIndex, idx: int, shard_path: str, entry) -> Pair:
        image, raw = read_sample_bytes(index.fs, shard_path, entry, self.reads)
        record, dec = decode_sample(entry.key, image, raw, self.views.decode_size)
        if slot.is_global:
            if record.global_caption is None:
                raise BadSample("no_global_caption", entry.key)
            caption, box = record.global_caption, None
            if not caption.strip():
                raise BadSample("empty_caption", entry.key)
        else:
            if not record.boxes:
                raise BadSample("no_boxes", entry.key)
            rng = np.random.default_rng(slot.seed)
            j = int(rng.integers(len(record.boxes)))
            caption, box = record.captions[j], clip_box(record.boxes[j], record.width, record.height)
        pixels = FastPixels(dec, image, entry.key)
        if self.views.local_crop is not None:  # low-res contrastive pre-training
            factor = 1.0 if box is None else math.exp(rng.uniform(*np.log(self.views.local_crop)))
            tensors = lowres_tensors(pixels, record.width, record.height, box, self.views, factor)
        else:
            every_box = [clip_box(b, record.width, record.height) for b in record.boxes]
            tensors = sample_tensors(pixels, record.width, record.height, box, self.views, every_box)
        ref = self.sources[slot.source]
        return Pair(tensors, caption, slot.is_global, ref.id_base | idx, ref.position)


class _Union:
    """Membership in either of two sets, without copying the large one."""

    def __init__(self, big: set, small: set):
        self.big, self.small = big, small

    def __contains__(self, item) -> bool:
        return item in self.small or item in self.big


def collate(pairs: list[Pair]) -> dict:
    """Stack per-sample tensors; per-scale entries stay lists (one tensor per scale).

    Pixels stay uint8 (see views): the batch crosses to the training process through /dev/shm.
    """
    first = pairs[0].tensors
    batch: dict = {
        key: torch.stack([p.tensors[key] for p in pairs])  # [B, 3, S0, S0], [B, 3, Ssel, Ssel]
        for key in ("lowres", "selection_view") if key in first  # low-res pre-training has no selection view
    } | {
        "is_global": torch.tensor([p.is_global for p in pairs], dtype=torch.bool),  # [B]
        "sample_id": torch.tensor([p.sample_id for p in pairs], dtype=torch.long),  # [B]
        "source": torch.tensor([p.source for p in pairs], dtype=torch.long),  # [B]
    }
    for key in ("gt_maps", "saliency_maps", "highres", "hr_index", "hr_patches"):
        if first.get(key):
            batch[key] = [torch.stack([p.tensors[key][s] for p in pairs]) for s in range(len(first[key]))]
    return batch


def normalize_images(batch: dict, dtype: torch.dtype = torch.float32) -> dict:
    """The batch with its uint8 pixels (IMAGE_KEYS) normalised to `dtype`, where they are.

    Meant to run on the device, after the copy: the one place a PS3 batch's pixels become
    model input. Entries already floating point are left as they are, so it is safe twice.
    """
    def normalized(value):
        if isinstance(value, list):
            return [normalized(v) for v in value]
        return normalize_pixels(value, dtype) if value.dtype == torch.uint8 else value

    return {k: normalized(v) if k in IMAGE_KEYS else v for k, v in batch.items()}
