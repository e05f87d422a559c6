"""`estimate_stage`: what a stage will cost before it is submitted.

The stage's task builds its model on the meta device through its probe (`TaskProbe`,
registered in the task registry), so nothing is read or allocated: FLOPs are counted by
`torch.utils.flop_counter`, memory by tracing one micro-batch, both cached per shape. The
pool's configuration gives the GPU's memory, peak FLOP/s and price; time and cost follow
at a stated MFU. Stages whose task has no probe, or whose model needs files the spec only
names (an LLM by path), get a one-line note instead of numbers.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass

from ps3_platform.runtime.distributed import CHECKPOINT_EVERY
from ps3_platform.runtime.step_trace import count_flops, trace_memory
from ps3_platform.runtime.task import ProbeUnavailableError, TaskSetupError, build_probe
from ps3_platform.spec import Pool, Stage, plan_batch
from ps3_platform.spec.batch import BatchPlanError

from .memory import MemoryBreakdown, ModelSize, StepShape, memory_per_gpu, trace_plan

#: Share of a GPU's memory a step may plan on: the CUDA context, NCCL's buffers and the caching
#: allocator's fragmentation take the rest (a few GiB on an 80 GiB card).
USABLE_MEMORY_FRACTION = 0.9
GIB = 2**30


class EstimateError(ValueError):
    """The estimate cannot be made as asked (an unknown pool, an MFU outside (0, 1])."""


@dataclass(frozen=True)
class StageEstimate:
    """One stage's estimate; the numbers are None where the note says why there are none."""

    stage: str
    task: str
    pool: str
    note: str | None = None
    world_size: int | None = None
    global_batch: int | None = None
    micro_batch: int | None = None
    accumulation: int | None = None
    steps: int | None = None
    parameters: int | None = None
    trainable: int | None = None
    flops_per_sample: float | None = None
    flops_per_step: float | None = None
    memory: MemoryBreakdown | None = None
    gpu_memory_bytes: int | None = None
    """The pool's GPU memory (`gpuMemoryGb` GiB); the fit check plans on `USABLE_MEMORY_FRACTION` of it."""
    fits: bool | None = None
    max_micro_batch: int | None = None
    """The largest micro-batch (up to the rank's share of the global batch) that fits; 0 when none does."""
    mfu: float | None = None
    step_seconds: float | None = None
    gpu_hours: float | None = None
    cost: float | None = None
    price_per_gpu_hour: float | None = None

    def to_dict(self) -> dict:
        """JSON-able, with the memory breakdown's total."""
        return {**asdict(self), "memory": self.memory.to_dict() if self.memory is not None else None}


# ---- traces, cached per shape -------------------------------------------------------------
def _shape_key(stage: Stage) -> str:
    """What fixes a stage's model and step shapes: task, model section and params."""
    return json.dumps([stage.task, stage.model.model_dump(mode="json"), stage.params], sort_keys=True, default=str)


def _stage(key: str) -> Stage:
    task, model, params = json.loads(key)
    return Stage(name="probe", task=task, model=model, params=params)


@functools.lru_cache(maxsize=64)
def _model_size(key: str) -> ModelSize:
    model = build_probe(_stage(key)).model
    blocks = list(getattr(model, "blocks", lambda: [])()) or [model]
    return ModelSize(parameters=sum(p.numel() for p in model.parameters()),
                     trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                     largest_block=max(sum(p.numel() for p in b.parameters()) for b in blocks))


@functools.lru_cache(maxsize=64)
def _flops(key: str, micro_batch: int) -> float:
    return count_flops(build_probe(_stage(key)), micro_batch)


@functools.lru_cache(maxsize=64)
def _activations(key: str, micro_batch: int, precision: str, checkpoint_every: int, grads_exist: bool):
    probe = build_probe(_stage(key))
    if checkpoint_every and hasattr(probe.model, "set_grad_checkpointing"):
        probe.model.set_grad_checkpointing(True, every=checkpoint_every)
    return trace_memory(probe, micro_batch, precision=precision, grads_exist=grads_exist)


def _checkpoint_every(stage: Stage) -> int:
    """Stride of recomputed blocks as the runtime applies `activationCheckpointing` (0: none)."""
    return CHECKPOINT_EVERY.get(stage.train.activation_checkpointing, 0)


def _precision(shape: StepShape) -> str:
    """bf16 is FSDP2 mixed precision under fsdp (bf16 parameters), autocast otherwise, as
    `ps3_platform.runtime.distributed.uses_autocast` decides."""
    if not shape.bf16:
        return "fp32"
    return "bf16" if shape.parallelism == "fsdp" else "autocast"


# ---- the estimate -------------------------------------------------------------------------
def _activation_peak(key: str, stage: Stage, shape: StepShape, micro_batch: int) -> int:
    grads_exist, grad_share = trace_plan(shape)
    trace = _activations(key, micro_batch, _precision(shape), _checkpoint_every(stage), grads_exist)
    return trace.peak_bytes(grad_share)


def _max_micro_batch(key: str, stage: Stage, shape: StepShape, micro_batch: int, share: int,
                     static: int, budget: int) -> int:
    """Largest micro-batch up to `share` whose peak fits `budget`: activations grow linearly
    with the micro-batch, so two traces (this micro-batch and twice it) give the line."""
    low = _activation_peak(key, stage, shape, micro_batch)
    high = _activation_peak(key, stage, shape, 2 * micro_batch)
    slope = max(1.0, (high - low) / micro_batch)
    intercept = low - slope * micro_batch
    fitting = int((budget - static - intercept) // slope)
    return max(0, min(share, fitting))


def _timing(flops_per_step: float, world: int, pool: Pool, mfu: float, steps: int) -> dict:
    if not pool.gpu_peak_tflops:
        return {}
    step_s = flops_per_step / (world * pool.gpu_peak_tflops * 1e12 * mfu)
    hours = steps * step_s * world / 3600
    cost = hours * pool.price_per_gpu_hour if pool.price_per_gpu_hour is not None else None
    return {"step_seconds": step_s, "gpu_hours": hours, "cost": cost}


def estimate_stage(stage: Stage, pool: Pool, *, mfu: float = 0.4) -> StageEstimate:
    """Parameters, FLOPs, per-GPU memory, fit, time and cost of one stage on `pool`.

    Time and cost assume the step reaches `mfu` of the pool's `gpuPeakTflops`; memory is
    checked against `USABLE_MEMORY_FRACTION` of its `gpuMemoryGb`. A stage that cannot be
    estimated gets a `note` (not a training task, model needs a file) and no numbers.
    """
    if not 0 < mfu <= 1:
        raise EstimateError(f"--mfu {mfu}: must lie in (0, 1]")
    base = dict(stage=stage.name, task=stage.task, pool=stage.resources.pool)
    key = _shape_key(stage)
    try:
        size = _model_size(key)
    except (ProbeUnavailableError, TaskSetupError) as exc:
        return StageEstimate(**base, note=str(exc))
    world = stage.resources.nodes * stage.resources.nproc
    try:
        plan = plan_batch(stage.train.global_batch, world, stage.train.micro_batch)
    except BatchPlanError as exc:
        return StageEstimate(**base, note=str(exc))
    shape = StepShape(world, stage.train.parallelism, plan.accumulation, stage.train.optimizer.name,
                      bf16=stage.train.precision == "bf16")
    memory = memory_per_gpu(size, shape, _activation_peak(key, stage, shape, plan.micro_batch))
    per_sample = _flops(key, plan.micro_batch) / plan.micro_batch
    per_step = per_sample * plan.global_batch
    fit: dict = {}
    if pool.gpu_memory_gb:
        budget = int(pool.gpu_memory_gb * GIB * USABLE_MEMORY_FRACTION)
        static = memory.total - memory.activations
        fit = {"gpu_memory_bytes": int(pool.gpu_memory_gb * GIB), "fits": memory.total <= budget,
               "max_micro_batch": _max_micro_batch(key, stage, shape, plan.micro_batch, plan.per_rank, static, budget)}
    return StageEstimate(
        **base, world_size=world, global_batch=plan.global_batch, micro_batch=plan.micro_batch,
        accumulation=plan.accumulation, steps=stage.train.total_steps, parameters=size.parameters,
        trainable=size.trainable, flops_per_sample=per_sample, flops_per_step=per_step, memory=memory, mfu=mfu,
        price_per_gpu_hour=pool.price_per_gpu_hour, **fit,
        **_timing(per_step, world, pool, mfu, stage.train.total_steps),
    )
