"""Per-GPU memory: the sharding arithmetic, and the estimate against what a real step allocates.

On CPU the measurement is torch.profiler's memory timeline: every allocation and free the CPU
allocator reports during a warm step (forward, backward, optimizer step), the CPU's
`max_memory_allocated`. The estimate traces the same step on the meta device, so the two
share no code below the model. On a GPU the reference is `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import pytest
import torch

from ps3_platform.estimate import ModelSize, StepShape, estimate_stage, memory_per_gpu, trace_plan
from ps3_platform.estimate.measure import NoMemoryTimeline, cpu_peak_bytes, training_step
from ps3_platform.runtime.task import build_probe
from ps3_platform.spec import Pool, load_text

SIZE = ModelSize(parameters=1000, trainable=800, largest_block=100)


@pytest.mark.parametrize("shape, expected", [
    # (params, grads held, optimizer, gathered): one process replicates everything, holds no buckets
    (StepShape(1, "ddp", 1, "adamw"), (4000, 0, 6400, 0)),
    (StepShape(1, "ddp", 4, "adamw"), (4000, 3200, 6400, 0)),  # gradients kept between micro-batches
    (StepShape(8, "ddp", 1, "sgd"), (4000, 3200, 3200, 0)),  # DDP's buckets; one momentum
    (StepShape(8, "fsdp", 1, "adamw"), (500, 400, 800, 800)),  # sharded by 8; two fp32 blocks gathered
    (StepShape(8, "fsdp", 2, "adamw", bf16=True), (500, 400, 800, 400)),  # bf16 blocks gathered
])
def test_sharding_arithmetic(shape, expected):
    m = memory_per_gpu(SIZE, shape, activation_peak=10)
    assert (m.parameters, m.gradients, m.optimizer, m.gathered) == expected
    assert m.total == sum(expected) + 10


def test_trace_is_read_as_the_parallelism_keeps_gradients():
    assert trace_plan(StepShape(8, "ddp", 1, "adamw")) == (False, 1.0)  # gradients land in the trace
    assert trace_plan(StepShape(8, "ddp", 3, "adamw")) == (True, 1.0)  # already there, held apart
    assert trace_plan(StepShape(8, "fsdp", 1, "adamw")) == (False, 0.0)  # reduce-scattered into held shards


def _tiny_stage(micro_batch: int, checkpointing: str):
    text = f"""
apiVersion: ps3.platform/v1
kind: TrainingJob
metadata: {{name: memory}}
spec:
  task: ps3_pretrain
  resources: {{pool: cpu}}
  model: {{preset: ps3-tiny}}
  train: {{globalBatch: {micro_batch}, steps: 1, activationCheckpointing: {checkpointing}}}
"""
    from ps3_platform.spec import stages_of

    return stages_of(load_text(text).job)[0]


def _measured_cpu_peak(stage, micro_batch: int) -> int:
    """Peak bytes a warm CPU step allocates: parameters, AdamW state, batch, activations, gradients."""
    torch.manual_seed(0)
    step = training_step(build_probe(stage, "cpu"), micro_batch, stage.train.activation_checkpointing)
    try:
        return cpu_peak_bytes(step)
    except NoMemoryTimeline as exc:
        pytest.skip(str(exc))


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("checkpointing", ["none", "full"])
def test_cpu_estimate_is_within_a_quarter_of_the_measured_peak(checkpointing):
    micro_batch = 8  # activations are ~85 % of the peak already
    stage = _tiny_stage(micro_batch, checkpointing)
    estimate = estimate_stage(stage, Pool()).memory.total
    measured = _measured_cpu_peak(stage, micro_batch)
    print(f"tiny preset, micro-batch {micro_batch}, checkpointing {checkpointing}: "
          f"estimated {estimate / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB")
    assert estimate == pytest.approx(measured, rel=0.25)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gpu_estimate_is_within_15_percent_of_max_memory_allocated(precision):
    """One process (DDP, no wrapper): bf16 is the trainer's autocast over fp32 parameters."""
    micro_batch = 32
    stage = _tiny_stage(micro_batch, "none")
    stage.train.precision = precision
    estimate = estimate_stage(stage, Pool()).memory.total
    torch.manual_seed(0)
    probe = build_probe(stage, "cuda")
    optimizer = torch.optim.AdamW(probe.model.parameters(), lr=1e-4)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = probe.loss(probe.model, probe.batch(micro_batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    print(f"tiny preset on {torch.cuda.get_device_name()}, {precision}: estimated {estimate / 2**20:.1f} MiB, "
          f"measured {measured / 2**20:.1f} MiB")
    assert estimate == pytest.approx(measured, rel=0.15)
