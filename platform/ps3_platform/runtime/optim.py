"""Optimizer and learning-rate schedule from the spec's `train` section."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ps3_platform.spec.models import Train


def build_optimizer(params, train: Train) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay, as in the PS3 recipe) or SGD with momentum."""
    opt = train.optimizer
    if opt.name == "adamw":
        return torch.optim.AdamW(params, lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay, eps=opt.eps)
    return torch.optim.SGD(params, lr=opt.lr, momentum=opt.betas[0], weight_decay=opt.weight_decay)


@dataclass
class WarmupDecay:
    """Multiplier for LambdaLR: linear warmup, then cosine/linear decay or constant.

    A dataclass rather than a closure so LambdaLR's state_dict can save it.
    """

    warmup_steps: int
    total_steps: int
    decay: str
    min_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.decay == "cosine" else 1 - progress
        return self.min_ratio + (1 - self.min_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, train: Train) -> torch.optim.lr_scheduler.LambdaLR:
    sched = train.schedule
    fn = WarmupDecay(sched.warmup_steps, train.total_steps, sched.decay, sched.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
