"""Global batch arithmetic under elasticity.

The spec fixes the global batch. Whatever the world size, each optimizer step must see
exactly that many samples, so the per-rank micro-batch and the number of accumulation
steps are derived here, in one pure function the validator and the runtime share.
"""

from __future__ import annotations

from dataclasses import dataclass


class BatchPlanError(ValueError):
    """The global batch cannot be split evenly over this world size."""


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    world_size: int
    micro_batch: int  # samples per rank per forward/backward
    accumulation: int  # forwards per optimizer step on each rank

    @property
    def per_rank(self) -> int:
        return self.micro_batch * self.accumulation


def splits_evenly(global_batch: int, world_size: int) -> bool:
    """Whether every rank can take the same share of the global batch."""
    return world_size >= 1 and global_batch % world_size == 0


def plan_batch(global_batch: int, world_size: int, max_micro_batch: int | None = None) -> BatchPlan:
    """Split `global_batch` into world_size x accumulation x micro_batch exactly.

    The micro-batch is the largest divisor of the per-rank share that fits
    `max_micro_batch`, so fewer ranks mean more accumulation, never a different batch.
    """
    if world_size < 1:
        raise BatchPlanError(f"world size must be positive, got {world_size}")
    if not splits_evenly(global_batch, world_size):
        raise BatchPlanError(
            f"global batch {global_batch} is not divisible by world size {world_size}; "
            f"choose a node count whose total rank count divides {global_batch}"
        )
    per_rank = global_batch // world_size
    cap = min(per_rank, max_micro_batch or per_rank)
    micro = max(d for d in range(1, cap + 1) if per_rank % d == 0)
    return BatchPlan(global_batch, world_size, micro, per_rank // micro)
