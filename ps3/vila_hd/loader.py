"""Batches of conversation samples for VILA-HD training: `ConversationLoader`.

Built like `ps3.data.loader.PS3Loader` (the same `PlannedLoader` base: deterministic step
plans, exact resume, per-source weights, bad samples counted and skipped) with what
conversations add: a micro-batch never mixes QA and grounding samples, images are squashed
to the model's top scale and cross worker processes as uint8, and text is tokenised with
the LLM's own chat template (`ps3.vila_hd.conversations`).
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ps3.data import records
from ps3.data.batches import MAX_ATTEMPTS, MAX_LOGGED_KEYS, SourceRef
from ps3.data.index import DataSourceError, SourceIndex

# Shared with PS3Loader on purpose: both loaders cut, accept sources and record positions alike.
from ps3.data.loader import PlannedLoader, Position, as_source
from ps3_platform.spec.batch import BatchPlan, plan_batch
from ps3.data.retry import ReadRetry
from ps3.data.sampling import BatchPlanner, SamplingError, Slot, SourceInfo, replacement
from ps3.data.views import channels_first

from .conversations import (
    GROUNDING,
    IGNORE_INDEX,
    KINDS,
    QA,
    BadSample,
    Encoded,
    check_tokenizer,
    decode_image,
    encode_conversation,
    read_conversation,
    sample_boxes,
    validate_sample,
)

log = logging.getLogger(__name__)

# ---- batches -------------------------------------------------------------------------
@dataclass
class Prepared:
    """One conversation ready for batching."""

    encoded: Encoded
    images: list[torch.Tensor]  # uint8 [3, S, S] each, placeholder order
    sizes: list[tuple[int, int]]  # original (width, height)
    boxes: list[tuple[float, float, float, float] | None]  # normalised to 0..1, or None
    grounding: bool
    id: str


def prepare_sample(meta: Mapping, images: Sequence[bytes], tokenizer, *, image_size: int, max_length: int,
                   image_tokens: int) -> Prepared:
    """Validate, tokenise and decode one sample; images are decoded only if all else is fine."""
    sizes = [_image_size(data) for data in images]
    validate_sample(meta, sizes)
    encoded = encode_conversation(meta, tokenizer, max_length=max_length, image_tokens=image_tokens)
    if encoded.n_images != len(images):  # a template that writes <image> itself
        raise BadSample("too_many_placeholders", f"{encoded.n_images} image tokens for {len(images)} images")
    boxes = [None if b is None else _normalised(b, w, h) for b, (w, h) in zip(sample_boxes(meta, sizes), sizes)]
    pixels = [_squash(data, image_size) for data in images]
    return Prepared(encoded, pixels, sizes, boxes, meta.get("kind", QA) == GROUNDING, str(meta.get("id", "")))


def _image_size(data: bytes) -> tuple[int, int]:
    try:
        return Image.open(io.BytesIO(data)).size  # header only
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise BadSample("bad_image", f"{type(exc).__name__}: {exc}") from None


def _squash(data: bytes, size: int) -> torch.Tensor:
    """uint8 [3, S, S]: the full decode squash-resized with Pillow's bicubic.

    No reduced-scale JPEG decode (`draft`): inference must see the very same pixels, and a
    plain Pillow resize is what any other caller will do.
    """
    image = decode_image(data, "image").image.resize((size, size), Image.BICUBIC)
    return channels_first(np.asarray(image))  # the same uint8 layout as PS3's views


def _normalised(box: tuple[float, ...], width: int, height: int) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = records.clip_box(box, width, height)
    return x0 / width, y0 / height, x1 / width, y1 / height


def collate(samples: Sequence[Prepared], *, pad_id: int, image_size: int) -> dict:
    """The batch contract of `ps3.vila_hd` (right padding to the longest conversation)."""
    length = max(len(s.encoded.input_ids) for s in samples)
    input_ids = torch.full((len(samples), length), pad_id, dtype=torch.long)  # [B, L]
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)  # [B, L]
    attention_mask = torch.zeros((len(samples), length), dtype=torch.bool)  # [B, L]
    for row, sample in enumerate(samples):
        n = len(sample.encoded.input_ids)
        input_ids[row, :n] = torch.tensor(sample.encoded.input_ids)
        labels[row, :n] = torch.tensor(sample.encoded.labels)
        attention_mask[row, :n] = True
    images = [image for s in samples for image in s.images]
    boxes = [box for s in samples for box in s.boxes]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "prompt_end": torch.tensor([s.encoded.prompt_end for s in samples], dtype=torch.long),  # [B]
        "images": torch.stack(images) if images else torch.zeros((0, 3, image_size, image_size), dtype=torch.uint8),
        "image_sizes": torch.tensor([size for s in samples for size in s.sizes], dtype=torch.long).reshape(-1, 2),
        "boxes": torch.tensor([b or (0.0, 0.0, 0.0, 0.0) for b in boxes], dtype=torch.float32).reshape(-1, 4),
        "has_box": torch.tensor([b is not None for b in boxes], dtype=torch.bool),  # [N]
        "grounding": torch.tensor([s.grounding for s in samples], dtype=torch.bool),  # [B]
        "ids": [s.id for s in samples],
    }


# ---- loader --------------------------------------------------------------------------
@dataclass(frozen=True)
class ConversationLoaderConfig:
    """How conversations become micro-batches (everything but the sources and tokenizer)."""

    image_size: int  # S: images are squash-resized to S x S (the PS3 preset's top scale)
    max_length: int  # LLM tokens per conversation, images expanded; longer ones are too_long
    image_tokens: int  # upper bound on the LLM tokens one image becomes
    global_batch: int  # conversations per optimizer step over all ranks
    micro_batch: int  # conversations per rank per forward
    seed: int = 0  # the order is a function of (seed, position)
    num_workers: int = 0  # worker processes per rank; 0 = produce in the calling process
    prefetch_factor: int = 2  # micro-batches each worker keeps ready
    read_retry_seconds: float = 300.0  # how long one read retries storage errors before the job fails
    pin_memory: bool = False  # page-locked batches (CUDA), so the copy to the device can be non-blocking


class _StepPlanner:
    """Which kind each step is, plus one BatchPlanner per kind; state_dict() is the position.

    A step's kind is drawn from (seed, step) with probability proportional to the summed
    weight of that kind's sources; each kind's planner moves only on its own steps.
    """

    KIND_STREAM = 0x6B696E64  # keeps the kind draw independent of the planners' draws

    def __init__(self, groups: dict[str, list[SourceInfo]], global_batch: int, seed: int):
        self.kinds = sorted(groups)
        self.weights = np.array([sum(s.weight for s in groups[k]) for k in self.kinds], dtype=float)
        self.planners = {k: BatchPlanner(groups[k], global_batch, seed, global_fraction=0.0) for k in self.kinds}
        self.seed, self.step = seed, 0

    def next_batch(self) -> tuple[str, list[Slot]]:
        rng = np.random.default_rng([self.seed, self.step, self.KIND_STREAM])
        kind = self.kinds[int(rng.choice(len(self.kinds), p=self.weights / self.weights.sum()))]
        self.step += 1
        return kind, self.planners[kind].next_batch()

    def state_dict(self) -> dict:
        return {"step": self.step, "kinds": {k: p.state_dict() for k, p in self.planners.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        for kind, planner_state in state["kinds"].items():
            if kind in self.planners:
                self.planners[kind].load_state_dict(planner_state)


class ConversationLoader(PlannedLoader):
    """Stateful iterator of this rank's conversation micro-batches (batch contract: ps3.vila_hd).

    Built like PS3Loader: every rank plans the same global batch per step, takes its
    contiguous share and yields it as `accumulation` micro-batches; bad samples are
    counted and replaced by deterministic stand-ins from the same source; the state is
    the global position, so a restart continues at exactly the next micro-batch.

    Kinds are interleaved by step: a whole global batch is QA or grounding, drawn per step
    with probability proportional to the summed weight of each kind's sources. Every
    micro-batch is therefore one kind, and all ranks run the same kind of forward in a
    step (DDP sees the same parameters used everywhere). A source holds one kind, read
    from a few of its samples at start; a sample of the other kind is kind_mismatch.
    """

    def __init__(self, sources: Sequence, tokenizer, *, rank: int, world_size: int,
                 config: ConversationLoaderConfig):
        self.sources = [as_source(s) for s in sources]
        self.tokenizer, self.config, self.rank, self.world_size = tokenizer, config, rank, world_size
        check_tokenizer(tokenizer)
        self.plan = plan_batch(config.global_batch, world_size, config.micro_batch)
        self.accumulation = self.plan.accumulation
        if len({s.name for s in self.sources}) != len(self.sources):
            raise SamplingError("source names must be unique (they key the resume state)")
        opening = ReadRetry(config.read_retry_seconds, counts=Counter())
        self._refs = [SourceRef.open(s.name, s.uri, i, opening) for i, s in enumerate(self.sources)]
        self._members = _group_by_kind(self._refs)  # kind -> positions in self.sources
        self._groups = {kind: [self._info(p) for p in positions] for kind, positions in self._members.items()}
        for kind, infos in self._groups.items():
            if sum(i.size for i in infos) < config.global_batch:
                raise SamplingError(f"global batch {config.global_batch} is larger than the "
                                    f"{sum(i.size for i in infos)} {kind} samples of {[i.name for i in infos]}")
        self._planner = self._new_planner()
        self._start()
        self._bad.update(opening.counts)  # retries while opening the sources

    def source_sizes(self) -> list[SourceInfo]:
        """(name, conversations, weight) of every source, in the spec's order: what a stage logs."""
        return [self._info(i) for i in range(len(self.sources))]

    def _info(self, position: int) -> SourceInfo:
        source = self.sources[position]
        return SourceInfo(source.name, sum(self._refs[position].counts), source.weight)

    def _new_planner(self) -> _StepPlanner:
        return _StepPlanner(self._groups, self.config.global_batch, self.config.seed)

    def __next__(self) -> dict:
        batch, bad = self._next_item()
        self._bad.update(bad)
        return batch

    def _stream_of(self, position: Position) -> IterableDataset:
        maker = _Maker(self._refs, self._members, self.tokenizer, self.config)
        return _MicroBatches(maker, self._groups, self.config, self.plan, self.rank, position)


def _group_by_kind(refs: list[SourceRef], probes: int = 8) -> dict[str, list[int]]:
    """kind -> positions of the sources holding it, from the json of a few samples each."""
    groups: dict[str, list[int]] = {}
    for ref in refs:
        index = ref.index()
        kinds = set()
        for i in sorted({len(index) * k // probes for k in range(probes)}):
            try:
                kinds.add(_read_meta(index, i).get("kind", QA))
            except (BadSample, OSError, IndexError, ValueError):
                continue  # the loader counts it when it is drawn
        kinds &= set(KINDS)
        if len(kinds) != 1:
            raise DataSourceError(f"source {ref.uri}: probed samples have kinds {sorted(kinds)}; a source must "
                                  f"hold one kind of {KINDS} (write qa and grounding samples to separate sources)")
        groups.setdefault(kinds.pop(), []).append(ref.position)
    return groups


def _read_meta(index: SourceIndex, i: int) -> dict:
    """Sample `i`'s json alone (one small ranged read, no images)."""
    shard_path, entry = index.locate(i)
    if entry.json is None:
        raise BadSample("bad_json", f"{entry.key}: no json member")
    offset, size = entry.json
    meta = json.loads(index.fs.cat_file(shard_path, start=offset, end=offset + size))
    if not isinstance(meta, dict):
        raise BadSample("bad_json", f"{entry.key}: not an object")
    return meta


class _Maker:
    """Turns planned slots into a micro-batch; opens source indexes lazily (once per process)."""

    def __init__(self, refs: list[SourceRef], members: dict[str, list[int]], tokenizer,
                 config: ConversationLoaderConfig):
        self.refs, self.members, self.tokenizer, self.config = refs, members, tokenizer, config
        self._indexes: dict[int, SourceIndex] = {}
        self._logged: set[str] = set()
        self.bad: Counter = Counter()
        self.reads = ReadRetry(config.read_retry_seconds, counts=self.bad)  # retries counted with the skips

    def make(self, kind: str, slots: list[Slot], used: set[tuple[int, int]]) -> dict:
        samples = [self.load(kind, slot, used) for slot in slots]
        return collate(samples, pad_id=self.tokenizer.pad_token_id, image_size=self.config.image_size)

    def load(self, kind: str, slot: Slot, used: set[tuple[int, int]]) -> Prepared:
        """The slot's sample, or a stand-in's (see sampling.replacement) if it is bad."""
        position = self.members[kind][slot.source]
        if position not in self._indexes:
            self._indexes[position] = self.refs[position].index(self.reads)
        index, idx, tried = self._indexes[position], slot.index, set()
        for attempt in range(MAX_ATTEMPTS):
            try:
                return self._prepare(kind, index, idx)
            except BadSample as exc:
                self._count(exc, f"{index.uri}#{idx}")
            tried.add((slot.source, idx))
            idx = replacement(slot, attempt, len(index), used | tried)
        raise DataSourceError(f"{MAX_ATTEMPTS} bad samples in a row from source {index.uri}; run "
                              f"`platformctl data check {index.uri}`")

    def _prepare(self, kind: str, index: SourceIndex, idx: int) -> Prepared:
        key, meta, images = read_conversation(index, idx)
        if meta.get("kind", QA) in KINDS and meta.get("kind", QA) != kind:
            raise BadSample("kind_mismatch", f"{key} is {meta.get('kind', QA)} in a {kind} source")
        config = self.config
        return prepare_sample(meta, images, self.tokenizer, image_size=config.image_size,
                              max_length=config.max_length, image_tokens=config.image_tokens)

    def _count(self, exc: BadSample, where: str) -> None:
        self.bad[exc.kind] += 1
        if where not in self._logged and len(self._logged) < MAX_LOGGED_KEYS:
            self._logged.add(where)
            log.warning("skipping bad conversation %s: %s", where, exc)


class _MicroBatches(IterableDataset):
    """This rank's micro-batches from a position on; in a worker, only every n-th of them."""

    def __init__(self, maker: _Maker, groups: dict[str, list[SourceInfo]], config: ConversationLoaderConfig,
                 plan: BatchPlan, rank: int, start: Position):
        super().__init__()
        self.maker, self.groups, self.config = maker, groups, config
        self.plan, self.rank, self.start = plan, rank, start

    def __iter__(self) -> Iterator[tuple[dict, dict]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        planner = _StepPlanner(self.groups, self.config.global_batch, self.config.seed)
        planner.load_state_dict(self.start.planner)
        spans = [self.plan.read_span(self.rank, a) for a in range(self.plan.accumulation)]
        n, micro = 0, self.start.micro  # n counts micro-batches from the start position
        while True:
            kind, slots = planner.next_batch()
            used = {s.key for s in slots}
            for a in range(micro, len(spans)):
                if n % workers == worker:
                    before = self.maker.bad.copy()
                    batch = self.maker.make(kind, slots[spans[a][0]:spans[a][1]], used)
                    yield batch, dict(self.maker.bad - before)
                n += 1
            micro = 0


def build_conversation_loader(sources: Sequence, *, tokenizer, image_size: int, max_length: int, image_tokens: int,
                              rank: int, world_size: int, global_batch: int, micro_batch: int, seed: int,
                              num_workers: int = 0, read_retry_seconds: float = 300.0,
                              pin_memory: bool = False) -> ConversationLoader:
    """Keyword-only adapter for a task's composition root: flat numbers in, loader out.

    `sources` are DataSource or mappings {"name", "uri", "weight"?} (the spec's data.sources).
    """
    config = ConversationLoaderConfig(image_size, max_length, image_tokens, global_batch, micro_batch, seed,
                                      num_workers, read_retry_seconds=read_retry_seconds, pin_memory=pin_memory)
    return ConversationLoader(sources, tokenizer, rank=rank, world_size=world_size, config=config)
