"""`noop` and `sleep`: a tiny regression model on a deterministic stream.

They exercise the whole runtime (distribution, accumulation, checkpoints, resume,
signals, metrics) without any science, so platform tests stay fast and exact.
Params: `dim` (features), `stepSeconds` (sleep per micro-batch, to make runs slow enough
to interrupt), `nanAtSteps` (global steps whose loss is made NaN, for fault tests).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ps3_platform.runtime.task import RunContext, StepResult, TaskState
from ps3_platform.spec import BatchPlan
from .params import NoopParams


@dataclass
class RegressionStream:
    """Micro-batches of (x, y = x @ w_true + noise), a pure function of the global sample index.

    The state is one number, the next global sample, so resuming on any world size
    continues with exactly the samples an uninterrupted run would have seen.
    """

    dim: int
    seed: int
    plan: BatchPlan
    rank: int
    position: int = 0
    micro_index: int = 0

    def __iter__(self):
        return self

    def _sample(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        x = torch.randn(self.dim, generator=gen)
        w_true = torch.linspace(-1, 1, self.dim)
        y = x @ w_true + 0.01 * torch.randn((), generator=gen)
        return x, y.reshape(1)

    def __next__(self) -> dict:
        start, stop = self.plan.read_span(self.rank, self.micro_index)
        pairs = [self._sample(self.position + i) for i in range(start, stop)]
        step = self.position // self.plan.global_batch
        self.micro_index += 1
        if self.micro_index == self.plan.accumulation:  # step boundary: everyone moves a global batch
            self.micro_index = 0
            self.position += self.plan.global_batch
        return {"x": torch.stack([p[0] for p in pairs]), "y": torch.stack([p[1] for p in pairs]),
                "step": step}

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
        self.micro_index = 0


class Regressor(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.hidden = nn.Linear(dim, 32)
        self.out = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


def build(ctx: RunContext, default_step_seconds: float = 0.0) -> TaskState:
    params = NoopParams.model_validate({"stepSeconds": default_step_seconds, **ctx.params})
    model = ctx.parallelize(Regressor(params.dim))
    optimizer = ctx.build_optimizer(model.parameters())
    data = RegressionStream(params.dim, ctx.stage.data.seed, ctx.batch, ctx.rank)
    nan_steps = set(params.nan_at_steps)

    def step(model: nn.Module, batch: dict) -> StepResult:
        if params.step_seconds:
            time.sleep(params.step_seconds)
        loss = nn.functional.mse_loss(model(batch["x"].to(ctx.device)), batch["y"].to(ctx.device))
        if batch["step"] in nan_steps:
            loss = loss * float("nan")
        return StepResult(loss=loss, samples=len(batch["x"]), tokens=len(batch["x"]))

    flops = 6 * sum(p.numel() for p in model.parameters())
    return TaskState(model=model, optimizer=optimizer, scheduler=ctx.build_scheduler(optimizer),
                     data=data, step=step, flops_per_sample=flops)


def build_sleep(ctx: RunContext) -> TaskState:
    """Like noop, but each micro-batch sleeps (default 1 s): a job slow enough to watch."""
    return build(ctx, default_step_seconds=1.0)
