"""Optimizer and learning-rate schedule from the spec's `train` section."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ps3_platform.spec.models import Train


def param_groups(named_parameters, no_decay_keys: tuple[str, ...] = ()) -> list[dict]:
    """Two optimizer groups: weight decay for the weight matrices, none for norms, biases and
    scalars (tensors of fewer than 2 dimensions) nor for parameters whose name holds one of
    `no_decay_keys` (embeddings and position embeddings), as open_clip and the PS3 reference
    train. Frozen parameters are left out. The no-decay group says so (`weight_decay` 0); the
    other takes the spec's."""
    decay, no_decay = [], []
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        exempt = param.ndim < 2 or any(key in name for key in no_decay_keys)
        (no_decay if exempt else decay).append(param)
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(params, train: Train) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay, as in the PS3 recipe) or SGD with momentum.

    `params`: parameters, or groups (`param_groups`) whose own `weight_decay` wins over the spec's.
    """
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
