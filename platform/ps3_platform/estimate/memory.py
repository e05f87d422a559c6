"""Per-GPU memory of a training step: what the parallelism shards, plus the traced micro-batch.

Pure arithmetic over counts, so it is tested without a model. The optimizer's weights are
fp32 whatever the precision, so parameters, gradients and AdamW's two moments are 4 bytes
per element each. FSDP2 shards all three over the stage's ranks and gathers one block at a
time (the next one prefetched; in bf16 under bf16 precision); DDP replicates them and adds
its gradient buckets. The activations are the traced high-water mark of one micro-batch
(`ps3_platform.runtime.step_trace`), inputs included; which gradients the trace counts
depends on the parallelism (`trace_plan`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

#: Bytes per element of what the runtime keeps in fp32 (parameters, gradients, optimizer moments).
FP32 = 4
#: Optimizer state tensors per trainable parameter (AdamW: two moments; SGD: momentum).
OPTIMIZER_STATES = {"adamw": 2, "sgd": 1}


@dataclass(frozen=True)
class ModelSize:
    """Element counts the memory model needs."""

    parameters: int
    trainable: int
    largest_block: int
    """Parameters of the largest unit FSDP gathers at once (a transformer block)."""


@dataclass(frozen=True)
class StepShape:
    """How the stage runs a step, from its spec and batch plan."""

    world_size: int
    parallelism: str  # "ddp" | "fsdp"
    accumulation: int
    optimizer: str  # "adamw" | "sgd"
    bf16: bool = False  # precision bf16 (FSDP2 then gathers bf16 blocks)

    @property
    def fsdp(self) -> bool:
        return self.parallelism == "fsdp" and self.world_size > 1


def trace_plan(shape: StepShape) -> tuple[bool, float]:
    """How to read the trace of one micro-batch: (gradients already there, share of each landing
    gradient to count).

    DDP keeps full gradients: a later micro-batch of an accumulating step starts with them
    (counted as held, not traced); otherwise they land during backward and the trace counts
    them. FSDP reduce-scatters each gradient into the fp32 shard as it lands, so the shards
    are held for the whole step and the unsharded ones only pass through.
    """
    if shape.fsdp:
        return False, 0.0
    return shape.accumulation > 1, 1.0


@dataclass(frozen=True)
class MemoryBreakdown:
    """Peak bytes on one GPU during a step, by what holds them."""

    parameters: int
    gradients: int
    """Held through the whole step: kept between micro-batches when accumulating, DDP's buckets."""
    optimizer: int
    activations: int
    """Traced high-water mark of one micro-batch (gradients landing in backward included)."""
    gathered: int
    """FSDP: the unsharded block in use and the one prefetched."""

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations + self.gathered

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def memory_per_gpu(size: ModelSize, shape: StepShape, activation_peak: int) -> MemoryBreakdown:
    """Peak memory on one rank; `activation_peak` is the trace's high-water mark read as
    `trace_plan(shape)` says."""
    shard = shape.world_size if shape.fsdp else 1
    held_gradients = shape.fsdp or shape.accumulation > 1
    gradients = FP32 * size.trainable // shard if held_gradients else 0
    if shape.parallelism == "ddp" and shape.world_size > 1:
        gradients += FP32 * size.trainable  # the buckets the all-reduce reads (gradient_as_bucket_view off)
    gathered = 2 * (2 if shape.bf16 else FP32) * size.largest_block if shape.fsdp else 0
    return MemoryBreakdown(
        parameters=FP32 * size.parameters // shard,
        gradients=gradients,
        optimizer=OPTIMIZER_STATES[shape.optimizer] * FP32 * size.trainable // shard,
        activations=activation_peak,
        gathered=gathered,
    )
