"""The task contract: what a recipe gives the runtime, and what the runtime gives it.

A task (`ps3/tasks/`) owns the science: it builds the model and a stateful data iterator
and says how one micro-batch becomes a loss. The runtime owns everything else: process
group, parallelism wrapper, precision, accumulation, clipping, checkpoints, metrics and
signals. New recipes are new tasks; the runtime never imports a specific model.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, runtime_checkable

import torch
from torch import nn

from ps3_platform.spec import BatchPlan, Stage

from .metrics import Metrics

#: Where the runtime finds tasks by name (module with a `TASKS` dict of name -> "module:function",
#: and a `PROBES` dict for the training tasks that `platformctl estimate` can trace; see `TaskProbe`).
TASK_REGISTRY_MODULE = "ps3.tasks"


@runtime_checkable
class StatefulIterator(Protocol):
    """A data iterator that can say where it is and go back there (exact resume)."""

    def __iter__(self) -> Iterator[Any]: ...
    def __next__(self) -> Any: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class StepResult:
    """One micro-batch's loss (a scalar tensor with grad) plus figures to report."""

    loss: torch.Tensor
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)  # scalars; tensors are read when logged
    samples: int = 0
    tokens: int = 0


@dataclass
class RunContext:
    """What the runtime hands a task at build time."""

    job: str
    stage: Stage
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    batch: BatchPlan
    run_dir: Path
    metrics: Metrics
    log: logging.Logger
    parallelize: Callable[[nn.Module], nn.Module]
    build_optimizer: Callable[[Any], torch.optim.Optimizer]
    build_scheduler: Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]
    load_weights: Callable[[nn.Module, str], int]
    """Load a model's weights from another stage's committed checkpoint (URL of its stage
    directory, or of one step-N directory); returns the step loaded."""
    record_uri: str = ""
    """URL of this stage's directory beside its checkpoints (`{checkpoint.uri}/{job}/{stage}`):
    records written there (a curation summary) are what `status` reads on any backend."""

    @property
    def params(self) -> dict:
        return self.stage.params


@dataclass
class TaskState:
    """What `build()` returns.

    `step(model, micro_batch)` runs forward and returns the loss; the runtime does backward,
    accumulation and the optimizer step. `model` is already wrapped by `ctx.parallelize`.
    Tasks without training (data generation) set `run` instead and leave the rest None.
    """

    model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    data: StatefulIterator | None = None
    step: Callable[[nn.Module, Any], StepResult] | None = None
    evaluate: Callable[[], dict] | None = None
    run: Callable[[], dict] | None = None
    flops_per_sample: float | None = None
    bad_sample_counts: Callable[[], dict[str, int]] | None = None
    after_optimizer_step: Callable[[], None] | None = None


@dataclass
class TaskProbe:
    """A training task's step without data, weights or a process group: what `platformctl
    estimate` traces (FLOPs, memory) and what the MFU figure counts.

    A task offers one through `PROBES` in the task registry: "module:function", the function
    taking `(stage, device)` and returning this, importable without the task's data. On the
    meta device nothing is allocated, so a 4K model costs nothing to build. It raises
    `ProbeUnavailableError` when the model cannot be built from the spec alone (weights of
    another model read by path) and `TaskSetupError` for a spec the task would refuse.
    """

    model: nn.Module
    """The stage's model on the probe's device, as `build()` makes it before `ctx.parallelize`
    (trainable parameters are those with `requires_grad`)."""
    batch: Callable[[int], Any]
    """`batch(n)`: a micro-batch of n samples with the shapes and dtypes the task's loader gives."""
    loss: Callable[[nn.Module, Any], torch.Tensor]
    """`loss(model, batch)`: the forward the task's `step` runs, to the scalar it trains on."""


class UnknownTaskError(LookupError):
    pass


class ProbeUnavailableError(LookupError):
    """A task has no probe, or cannot build its model from the spec alone; the message says why
    in a few words ("not a training task", "model needs params.llm ...")."""


class TaskSetupError(RuntimeError):
    """A task cannot start with this spec (missing weights, data that does not fit the
    model...): permanent, so the worker exits with a user-error code before any step."""


def resolve_task(name: str) -> Callable[[RunContext], TaskState]:
    """The build function of task `name`, imported lazily from the registry."""
    registry = importlib.import_module(TASK_REGISTRY_MODULE).TASKS
    if name not in registry:
        raise UnknownTaskError(f"unknown task {name!r}; registered: {', '.join(sorted(registry))}")
    module, _, attr = registry[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def build_probe(stage: Stage, device: torch.device | str = "meta") -> TaskProbe:
    """The probe of `stage`'s task with its model on `device` (see `TaskProbe`)."""
    registry = importlib.import_module(TASK_REGISTRY_MODULE)
    probes = getattr(registry, "PROBES", {})
    if stage.task not in probes:
        raise ProbeUnavailableError(f"not a training task ({stage.task})")
    module, _, attr = probes[stage.task].partition(":")
    return getattr(importlib.import_module(module), attr)(stage, torch.device(device))
