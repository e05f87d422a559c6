"""`platformctl estimate`: parameters, FLOPs, per-GPU memory, fit, time and cost per stage.

    estimate_job(job, pools, pool=None, mfu=0.4) -> list[StageEstimate]   # every stage of a spec
    estimate_stage(stage, pool, mfu=0.4) -> StageEstimate                 # one stage on one pool
    memory_per_gpu(size, shape, activation_peak) -> MemoryBreakdown       # the arithmetic alone

The model-side work (building the stage's model on the meta device, counting FLOPs, tracing
memory) goes through the task registry's probes and `ps3_platform.runtime.step_trace`; this
package never imports a model.
"""

from __future__ import annotations

from ps3_platform.spec import JobSpec, PoolConfig, stages_of

from .memory import MemoryBreakdown, ModelSize, StepShape, memory_per_gpu, trace_plan
from .stage import GIB, USABLE_MEMORY_FRACTION, EstimateError, StageEstimate, estimate_stage

__all__ = ["GIB", "USABLE_MEMORY_FRACTION", "EstimateError", "MemoryBreakdown", "ModelSize", "StageEstimate",
           "StepShape", "estimate_job", "estimate_stage", "memory_per_gpu", "trace_plan"]


def estimate_job(job: JobSpec, pools: PoolConfig, *, pool: str | None = None, mfu: float = 0.4) -> list[StageEstimate]:
    """Every stage of `job`, each on its own pool or on `pool` when given (same node and
    process counts: "what if this ran on the A100s")."""
    if pool is not None and pool not in pools.pools:
        raise EstimateError(f"--pool {pool}: no such pool (pools: {', '.join(sorted(pools.pools))})")
    estimates = []
    for stage in stages_of(job):
        if pool is not None:
            stage = stage.model_copy(deep=True)
            stage.resources.pool = pool
        estimates.append(estimate_stage(stage, pools.pools[stage.resources.pool], mfu=mfu))
    return estimates
