"""What a real step allocates, to hold the estimate to: the reference side of its checks.

On CPU the reference is torch.profiler's memory timeline (every allocation and free the CPU
allocator reports during one warm step), the CPU's `max_memory_allocated`. It shares no code
with the estimate below the model: the estimate traces the step on the meta device.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable

import torch

from ps3_platform.runtime.task import TaskProbe


class NoMemoryTimeline(RuntimeError):
    """This torch's profiler cannot export a memory timeline (it is marked deprecated)."""


def training_step(probe: TaskProbe, micro_batch: int, checkpointing: str = "none") -> Callable[[], None]:
    """A plain step of the probe's model on its own device: forward, backward, AdamW."""
    model = probe.model
    if checkpointing != "none":
        model.set_grad_checkpointing(True, every=1 if checkpointing == "full" else 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        probe.loss(model, probe.batch(micro_batch)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def cpu_peak_bytes(step: Callable[[], None]) -> int:
    """Peak bytes the CPU allocator holds during one warm `step` (the first one only creates
    AdamW's state, as every later step has it)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    if not hasattr(prof, "export_memory_timeline"):
        raise NoMemoryTimeline("this torch has no profiler memory timeline")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "timeline.json")
        prof.export_memory_timeline(path, device="cpu")
        with open(path) as f:
            _times, sizes = json.load(f)
    return max(sum(row) for row in sizes)
