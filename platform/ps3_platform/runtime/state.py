"""What a checkpoint holds besides the task's own objects: counters, RNG, model+optimizer view.

These are `Stateful` objects (state_dict/load_state_dict) so torch.distributed.checkpoint
can save and load them in place.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


@dataclass
class Counters:
    """Progress that must survive restarts (the same value on every rank)."""

    step: int = 0
    samples: int = 0
    resumes: int = 0
    nonfinite_steps: int = 0
    spec_hash: str = ""

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, type(getattr(self, key))(value))


class ModelAndOptimizer:
    """DCP view of model + optimizer that works for plain, DDP and FSDP2 models.

    `get_state_dict` gives fully qualified, wrapper-free keys, which is what lets a
    checkpoint written by 2 ranks load onto 1 (or onto FSDP from DDP).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None):
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        optimizers = [self.optimizer] if self.optimizer is not None else []
        model_sd, optim_sd = get_state_dict(self.model, optimizers)
        return {"model": model_sd, "optim": optim_sd} if optimizers else {"model": model_sd}

    def load_state_dict(self, state: dict) -> None:
        optimizers = [self.optimizer] if self.optimizer is not None else []
        set_state_dict(
            self.model, optimizers, model_state_dict=state["model"], optim_state_dict=state.get("optim", {})
        )


def rng_state() -> dict:
    """This rank's random generators (saved per rank: they differ between ranks).

    Only tensors, ints, floats and strings, so the file loads with `weights_only=True`:
    numpy's key array travels as a tensor.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
