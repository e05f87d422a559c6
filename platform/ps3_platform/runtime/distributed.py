"""Process-group setup from the environment torchrun and the PyTorchJob operator set."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    world_size: int
    local_rank: int
    restart_count: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env(env: dict[str, str] | None = None) -> WorldInfo:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (torchrun) and pick the device; no process group yet."""
    env = os.environ if env is None else env
    rank = int(env.get("RANK", 0))
    world_size = int(env.get("WORLD_SIZE", 1))
    local_rank = int(env.get("LOCAL_RANK", 0))
    restarts = int(env.get("TORCHELASTIC_RESTART_COUNT", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    return WorldInfo(rank, world_size, local_rank, restarts, device)


def init_distributed(world: WorldInfo, timeout_s: int = 600) -> None:
    """NCCL on GPUs, gloo on CPU; a single process runs without a group."""
    if world.world_size == 1 or dist.is_initialized():
        return
    if world.device.type == "cuda":
        torch.cuda.set_device(world.device)
        backend = "cpu:gloo,cuda:nccl"  # gloo for CPU-side objects (checkpoint planning), NCCL for tensors
    else:
        backend = "gloo"
    timeout = timedelta(seconds=timeout_s)
    dist.init_process_group(backend=backend, store=_attempt_store(world, timeout), rank=world.rank,
                            world_size=world.world_size, timeout=timeout)


def _attempt_store(world: WorldInfo, timeout: timedelta) -> dist.Store:
    """The rendezvous store, with keys scoped to this restart attempt.

    Under torchrun the workers share the agent's store across restarts, and gloo's
    address exchange can then read a dead worker's address from the previous attempt
    (seen on torch 2.14: "connectFullMesh ... Connection refused" after an elastic
    restart). A per-attempt prefix makes every attempt start from clean keys.
    """
    use_agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world.world_size,
        is_master=not use_agent_store and world.rank == 0, timeout=timeout,
    )
    return dist.PrefixStore(f"ps3/attempt-{world.restart_count}", store)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: nn.Module, world: WorldInfo, strategy: str, activation_checkpointing: bool) -> nn.Module:
    """Wrap a model for data parallelism: DDP by default, FSDP2 (`fully_shard`) per block.

    FSDP2 shards each transformer block the model lists (`model.blocks()`) and then the
    root, which is how torchtitan applies it; models without `blocks()` are sharded at the
    root only. Activation checkpointing is the model's own switch
    (`set_grad_checkpointing`), since only the model knows its block boundaries.
    """
    model = model.to(world.device)
    checkpointing = activation_checkpointing and hasattr(model, "set_grad_checkpointing")
    if checkpointing:
        model.set_grad_checkpointing(True)
    ac = f"activation checkpointing {'on' if checkpointing else 'off'}"
    if world.world_size == 1 and strategy == "ddp":
        log.info("parallelism: single process, %s", ac)
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        blocks = list(getattr(model, "blocks", lambda: [])())
        for block in blocks:
            fully_shard(block)
        fully_shard(model)
        log.info("parallelism: FSDP2 fully_shard on %d blocks + root over %d ranks, %s", len(blocks),
                 world.world_size, ac)
        return model
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    log.info("parallelism: DDP over %d ranks, %s", world.world_size, ac)
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def all_reduce_mean(value: float, world: WorldInfo) -> float:
    """Average a Python float over ranks (for logging the global loss)."""
    if world.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=world.device if world.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / world.world_size


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
