"""Global batch arithmetic under elasticity.

The spec fixes the global batch. Whatever the world size, each optimizer step must see
exactly that many samples, so the per-rank shares, the micro-batches and the number of
accumulation steps are derived here, in one pure function the validator, the loaders and
the runtime share.

A world size that does not divide the global batch is allowed (an elastic job may lose a
node to any count in its range): the first `global_batch % world_size` ranks take one
sample more. Every rank runs the same number of forwards (FSDP gathers parameters in each
one, so a rank with fewer would hang the others), and each rank spreads its share over
them as evenly as it goes, so micro-batches differ by at most one sample. Because shares
differ, each micro-batch's mean loss is weighted by its sample count (`loss_weight`): the
step's gradient is then exactly the mean over the global batch, as with an even split.
With micro-batches of one sample a short rank has a forward with no sample of its own: it
reads the sample before (`read_span`) and weights that forward 0, so it still runs.
"""

from __future__ import annotations

from dataclasses import dataclass


class BatchPlanError(ValueError):
    """The global batch cannot be split over this world size."""


def _spread(total: int, parts: int) -> list[int]:
    """`total` split into `parts` sizes differing by at most one, larger ones first."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    world_size: int
    micro_batch: int  # the largest micro-batch any rank runs (all of them when the split is even)
    accumulation: int  # forwards per optimizer step, the same on every rank

    @property
    def per_rank(self) -> int:
        """The largest share of the global batch a rank takes."""
        return -(-self.global_batch // self.world_size)

    @property
    def even(self) -> bool:
        """Whether every forward on every rank has `micro_batch` samples."""
        return self.micro_batch * self.accumulation * self.world_size == self.global_batch

    def share(self, rank: int) -> tuple[int, int]:
        """This rank's [start, stop) within the step's global batch."""
        sizes = _spread(self.global_batch, self.world_size)
        start = sum(sizes[:rank])
        return start, start + sizes[rank]

    def micro_spans(self, rank: int) -> list[tuple[int, int]]:
        """[start, stop) of each of this rank's micro-batches within the step's global batch."""
        start, stop = self.share(rank)
        spans = []
        for size in _spread(stop - start, self.accumulation):
            spans.append((start, start + size))
            start += size
        return spans

    def read_span(self, rank: int, micro: int) -> tuple[int, int]:
        """What forward `micro` reads: its span, or for an empty one the sample before it (a
        stand-in whose loss weight is 0: the forward runs so that every rank runs as many)."""
        start, stop = self.micro_spans(rank)[micro]
        return (start, stop) if stop > start else (start - 1, start)

    def micro_sizes(self, micro: int) -> list[int]:
        """The sample count of forward `micro` on every rank (what a cross-rank loss exchanges;
        0 for a stand-in forward, whose sample must not count for the others either)."""
        return [_spread(share, self.accumulation)[micro] for share in _spread(self.global_batch, self.world_size)]

    def loss_weight(self, rank: int, micro: int) -> float:
        """Factor on a micro-batch's mean loss so that gradient averaging over ranks gives the
        mean over the global batch: samples x world size / global batch (1/accumulation when even)."""
        start, stop = self.micro_spans(rank)[micro]
        return (stop - start) * self.world_size / self.global_batch


def splits_evenly(global_batch: int, world_size: int) -> bool:
    """Whether every rank can take the same share of the global batch."""
    return world_size >= 1 and global_batch % world_size == 0


def plan_batch(global_batch: int, world_size: int, max_micro_batch: int | None = None) -> BatchPlan:
    """Split `global_batch` over `world_size` ranks in forwards of at most `max_micro_batch`.

    The accumulation is the fewest forwards that fit the largest share; fewer ranks mean
    more accumulation, never a different batch.
    """
    if world_size < 1:
        raise BatchPlanError(f"world size must be positive, got {world_size}")
    if global_batch < world_size:
        raise BatchPlanError(f"global batch {global_batch} is smaller than world size {world_size}: "
                             "every rank needs at least one sample; raise train.globalBatch or use fewer ranks")
    largest = -(-global_batch // world_size)
    cap = min(largest, max_micro_batch or largest)
    accumulation = -(-largest // cap)
    return BatchPlan(global_batch, world_size, -(-largest // accumulation), accumulation)
