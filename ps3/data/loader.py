"""The resumable per-rank loader a PS3 pre-training task hands to the runtime.

Every rank plans the same global batch for each step (sampling.BatchPlanner), takes its
contiguous share of the slots and yields it as `accumulation` micro-batches, cut as the
runtime's batch plan says (shares may differ by one sample when the world size does not
divide the global batch; each micro-batch says how many samples every rank has in it). The state is
the global position (step, micro-batch within it, per-source stream cursors), identical
on all ranks, so a restart continues at exactly the next sample, also with another world
size. Worker processes each make every `num_workers`-th micro-batch from the same plan;
the DataLoader returns them in order, so workers do not change what is produced.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ps3_platform.spec.batch import BatchPlan, plan_batch

from .batches import MicroBatchMaker, SourceRef
from .retry import DataReadError, ReadRetry, one_line
from .sampling import BatchPlanner, SamplingError, SourceInfo
from .views import ViewConfig

log = logging.getLogger(__name__)
Tokenize = Callable[[list[str]], torch.Tensor]
STATE_VERSION = 1


@dataclass(frozen=True)
class DataSource:
    """A training source from the spec: its name, shard directory URI and sampling weight."""

    name: str
    uri: str
    weight: float = 1.0


@dataclass(frozen=True)
class LoaderConfig:
    """How batches are cut and produced (everything but the sources, preset and tokenizer)."""

    global_batch: int  # samples per optimizer step over all ranks (the spec's train.globalBatch)
    micro_batch: int  # at most this many samples per rank per forward
    seed: int = 0  # the sampling order is a function of (seed, position)
    num_workers: int = 0  # worker processes per rank; 0 = produce in the calling process
    global_caption_fraction: float = 0.25  # share of each global batch that are global pairs
    prefetch_factor: int = 2  # micro-batches each worker keeps ready
    read_retry_seconds: float = 300.0  # how long one data read retries storage errors before the job fails
    pin_memory: bool = False  # page-locked batches (CUDA), so the copy to the device can be non-blocking


@dataclass
class Position:
    """Where the next micro-batch is: step, micro-batch index and the planner at the step."""

    step: int = 0
    micro: int = 0
    planner: dict = field(default_factory=dict)  # BatchPlanner state at the start of `step`


class PlannedLoader:
    """The position keeping every planned loader shares: advance, state, resume, bad counts.

    A subclass sets `world_size`, `plan`, `accumulation` and `config` (global_batch, num_workers,
    prefetch_factor and, optionally, pin_memory), builds `self._planner = self._new_planner()` and calls
    `self._start()`; it implements `_new_planner()` and `_stream_of(position)` (an
    IterableDataset of this rank's micro-batches from a position).
    """

    def _start(self) -> None:
        self._pos = Position(planner=self._planner.state_dict())
        self._bad: Counter = Counter()
        self._stream: Iterator | None = None

    def __iter__(self):
        return self

    def _next_item(self):
        """The stream's next item, the position moved past it."""
        if self._stream is None:
            self._stream = self._open_stream()
        try:
            item = next(self._stream)
        except DataReadError as exc:  # storage down past the retry budget: fail in one line
            self._stream = None  # a later next() reopens at the same position
            raise one_line(exc) from exc.__cause__  # the storage error, when raised in this process
        self._pos.micro += 1
        if self._pos.micro == self.accumulation:  # step done: move the planner past its plan
            self._planner.next_batch()
            self._pos = Position(self._pos.step + 1, 0, self._planner.state_dict())
        return item

    def _open_stream(self) -> Iterator:
        """Micro-batches from the position: in this process, or from worker processes.

        With `pin_memory`, the DataLoader's own thread copies each batch into page-locked
        memory while the step runs, so `to_device` copies without blocking. Inline
        (num_workers 0) batches stay pageable: pinning there would be one more copy on the
        training thread, and a non-blocking copy of pageable memory is simply synchronous.
        """
        stream = self._stream_of(copy.deepcopy(self._pos))
        if self.config.num_workers == 0:
            return iter(stream)
        return iter(DataLoader(stream, batch_size=None, num_workers=self.config.num_workers,
                               prefetch_factor=self.config.prefetch_factor, persistent_workers=False,
                               pin_memory=getattr(self.config, "pin_memory", False)))

    def state_dict(self) -> dict:
        """The exact position: identical on every rank, valid for any world size at a step boundary."""
        return {"version": STATE_VERSION, "step": self._pos.step, "micro": self._pos.micro,
                "planner": copy.deepcopy(self._pos.planner), "world_size": self.world_size,
                "global_batch": self.config.global_batch}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the micro-batch after the one `state` was taken at."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')} is not {STATE_VERSION}")
        if state["micro"] and state["world_size"] != self.world_size:
            raise ValueError(f"data state was taken mid-step (micro-batch {state['micro']}) at world size "
                             f"{state['world_size']}; it can only resume at world size {state['world_size']}")
        self._planner = self._new_planner()
        self._planner.load_state_dict(state["planner"])
        self._pos = Position(int(state["step"]), int(state["micro"]), self._planner.state_dict())
        self.close()

    def bad_sample_counts(self) -> dict[str, int]:
        """Cumulative skipped samples by reason, summed over this rank's worker processes.

        Storage errors retried through are counted here too, under "read_retries".
        """
        return dict(self._bad)

    def close(self) -> None:
        """Stop worker processes (the next `next()` starts them again from the position)."""
        self._stream = None


class PS3Loader(PlannedLoader):
    """Stateful iterator of this rank's micro-batches (see module docstring).

    Each item is a dict: lowres [B, 3, S0, S0], selection_view [B, 3, Ssel, Ssel],
    gt_maps list of [B, G_s, G_s], either highres list of [B, 3, S_s, S_s] or hr_index
    list of [B, K_s] + hr_patches list of [B, K_s, 3, p, p], tokens [B, L] long,
    is_global [B] bool, sample_id [B] long, source [B] long (position in `sources`).
    Pixels (batches.IMAGE_KEYS) are uint8: `batches.normalize_images` makes them model
    input, on the device.
    """

    def __init__(self, sources: Sequence[DataSource | Mapping], views: ViewConfig, tokenize: Tokenize, *,
                 rank: int, world_size: int, config: LoaderConfig):
        self.sources = [as_source(s) for s in sources]
        self.views, self.tokenize, self.config = views, tokenize, config
        self.rank, self.world_size = rank, world_size
        self.plan = plan_batch(config.global_batch, world_size, config.micro_batch)
        self.accumulation = self.plan.accumulation
        opening = ReadRetry(config.read_retry_seconds, counts=Counter())
        self._refs = [SourceRef.open(s.name, s.uri, i, opening)  # fails on a dead source
                      for i, s in enumerate(self.sources)]
        self._infos = [SourceInfo(s.name, sum(r.counts), s.weight, r.global_captions > 0)
                       for s, r in zip(self.sources, self._refs)]
        if sum(i.size for i in self._infos) < config.global_batch:
            raise SamplingError(f"global batch {config.global_batch} is larger than the {sum(i.size for i in self._infos)} "
                                f"images in {[s.uri for s in self.sources]}: one image may appear once per batch")
        self._planner = self._new_planner()
        self._start()
        self._bad.update(opening.counts)  # retries while opening the sources

    def _new_planner(self) -> BatchPlanner:
        return BatchPlanner(self._infos, self.config.global_batch, self.config.seed,
                            self.config.global_caption_fraction)

    def __next__(self) -> dict:
        batch, captions, bad = self._next_item()
        self._bad.update(bad)
        tokens = self.tokenize(captions)
        if tokens.shape != (len(captions), self.views.context_length):
            raise ValueError(f"tokenize returned {tuple(tokens.shape)}, expected "
                             f"({len(captions)}, {self.views.context_length}) (context_length)")
        batch["tokens"] = tokens.long()  # [B, L]
        return batch

    def _stream_of(self, position: Position) -> IterableDataset:
        return _MicroBatches(self._refs, self._infos, self.views, self.config, self.plan, self.rank, position)


def as_source(source) -> DataSource:
    """A DataSource from itself, a mapping, or any object with name/uri/weight (the spec's Source)."""
    if isinstance(source, DataSource):
        return source
    if isinstance(source, Mapping):
        return DataSource(**source)
    return DataSource(source.name, str(source.uri), float(getattr(source, "weight", 1.0)))


class _MicroBatches(IterableDataset):
    """This rank's micro-batches from a position on; in a worker, only every n-th of them."""

    def __init__(self, refs: list[SourceRef], infos: list[SourceInfo], views: ViewConfig, config: LoaderConfig,
                 plan: BatchPlan, rank: int, start: Position):
        super().__init__()
        self.refs, self.infos, self.views, self.config = refs, infos, views, config
        self.plan, self.rank, self.start = plan, rank, start

    def __iter__(self) -> Iterator[tuple[dict, list[str], dict]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        maker = MicroBatchMaker(self.refs, self.views, self.config.read_retry_seconds)
        planner = BatchPlanner(self.infos, self.config.global_batch, self.config.seed,
                               self.config.global_caption_fraction)
        planner.load_state_dict(self.start.planner)
        spans = [self.plan.read_span(self.rank, a) for a in range(self.plan.accumulation)]
        rank_sizes = [self.plan.micro_sizes(a) for a in range(self.plan.accumulation)]  # O(world) each: once
        n, micro = 0, self.start.micro  # n counts micro-batches from the start position
        while True:
            slots = planner.next_batch()
            used = {s.key for s in slots}
            for a in range(micro, len(spans)):
                if n % workers == worker:
                    before = maker.bad.copy()
                    batch, captions = maker.make(slots[spans[a][0]:spans[a][1]], used)
                    batch["rank_sizes"] = rank_sizes[a]  # for losses that exchange across ranks
                    yield batch, captions, dict(maker.bad - before)
                n += 1
            micro = 0


def build_loader(sources: Sequence[DataSource | Mapping], *, rank: int, world_size: int, global_batch: int,
                 micro_batch: int, seed: int, scales: Sequence[int], patch_size: int, budgets: Sequence[int],
                 selection_view_size: int, context_length: int, tokenize: Tokenize, num_workers: int = 0,
                 global_caption_fraction: float = 0.25, highres: str = "auto",
                 read_retry_seconds: float = 300.0, pin_memory: bool = False,
                 local_crop: tuple[float, float] | None = None) -> PS3Loader:
    """Keyword-only adapter for a task's composition root: flat preset numbers in, loader out.

    `sources` are DataSource or mappings with name, uri and optional weight (the spec's
    data.sources). The preset numbers come from ps3.model's preset as plain values.
    `local_crop` makes low-res contrastive batches instead (`ViewConfig.local_crop`).
    """
    views = ViewConfig(tuple(scales), patch_size, tuple(budgets), selection_view_size, context_length, highres,
                       local_crop=tuple(local_crop) if local_crop else None)
    config = LoaderConfig(global_batch, micro_batch, seed, num_workers, global_caption_fraction,
                          read_retry_seconds=read_retry_seconds, pin_memory=pin_memory)
    return PS3Loader(sources, views, tokenize, rank=rank, world_size=world_size, config=config)
