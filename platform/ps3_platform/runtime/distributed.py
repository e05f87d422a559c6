"""Process-group setup from the environment torchrun and the PyTorchJob operator set, and
`parallelize`: the spec's activation checkpointing, compile, precision and DDP or FSDP2."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

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


#: Blocks between recomputed ones for each activation-checkpointing mode (the models count
#: them with `ps3.model.layers.checkpoints_block`). selective is torchtitan's per-layer
#: selective checkpointing at frequency 2: about half of full's memory saving for half its
#: recompute, with no per-op save list to keep in step with the model's ops.
CHECKPOINT_EVERY = {"full": 1, "selective": 2}

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(kw_only=True, slots=True, frozen=True)
class ParallelizeConfig:
    """How `parallelize` wraps a model; the spec's `train` fields of the same names."""

    parallelism: str = "ddp"
    """ddp (replicas) or fsdp (FSDP2 `fully_shard` per block, then the root)."""
    precision: str = "fp32"
    """bf16: under fsdp, bf16 parameters and compute by a `MixedPrecisionPolicy`; otherwise the trainer autocasts."""
    reduce_dtype: str = "fp32"
    """Dtype FSDP2 reduce-scatters gradients in under bf16 precision."""
    activation_checkpointing: str = "none"
    """none, selective (every other block, see `CHECKPOINT_EVERY`) or full (every block)."""
    compile: bool = False
    """torch.compile each block in place."""

    @classmethod
    def from_train(cls, train) -> ParallelizeConfig:
        """From the spec's `train` section (`ps3_platform.spec.models.Train`)."""
        return cls(parallelism=train.parallelism, precision=train.precision, reduce_dtype=train.reduce_dtype,
                   activation_checkpointing=train.activation_checkpointing, compile=train.compile)


def parallelize(model: nn.Module, world: WorldInfo, config: ParallelizeConfig) -> nn.Module:
    """Checkpoint, compile and wrap a model for data parallelism, in torchtitan's order.

    The unit of all three is the transformer block the model lists (`model.blocks()`);
    models without `blocks()` get none of the per-block steps and are sharded at the root
    only. Nothing here renames a parameter, since checkpoints and released weights are keyed
    by those names. Logs one line saying what was applied.
    """
    model = model.to(world.device)
    applied = [_apply_checkpointing(model, config.activation_checkpointing), _compile_blocks(model, config.compile)]
    if world.world_size == 1 and config.parallelism == "ddp":
        log.info("parallelism: single process, %s", ", ".join(applied))
        return model
    if config.parallelism == "fsdp":
        sharded = _shard(model, mixed_precision_policy(config))
        log.info("parallelism: FSDP2 fully_shard on %d blocks + root over %d ranks, %s, %s", sharded,
                 world.world_size, _describe_precision(config), ", ".join(applied))
        return model
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    log.info("parallelism: DDP over %d ranks, %s", world.world_size, ", ".join(applied))
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def _blocks(model: nn.Module) -> list[nn.Module]:
    return list(getattr(model, "blocks", lambda: [])())


def _apply_checkpointing(model: nn.Module, mode: str) -> str:
    """The model's own switch (`set_grad_checkpointing`): only the model knows where its
    blocks run, and a `checkpoint_wrapper` module would add `_checkpoint_wrapped_module.` to
    every block parameter's name."""
    if mode == "none":
        return "activation checkpointing off"
    if not hasattr(model, "set_grad_checkpointing"):
        return f"activation checkpointing {mode} asked, but the model has no blocks to checkpoint"
    model.set_grad_checkpointing(True, every=CHECKPOINT_EVERY[mode])
    return f"activation checkpointing {mode}"


def _compile_blocks(model: nn.Module, enabled: bool) -> str:
    """torch.compile each block in place before sharding, as torchtitan does.

    Per block rather than the whole model: identical blocks reuse one compiled graph, and
    the FSDP2 hooks between blocks stay outside the graphs. `Module.compile` keeps parameter
    names, where a `torch.compile(module)` wrapper would add `_orig_mod.`.
    """
    if not enabled:
        return "compile off"
    blocks = _blocks(model)
    for block in blocks:
        block.compile()
    return f"compile on {len(blocks)} blocks"


def mixed_precision_policy(config: ParallelizeConfig) -> MixedPrecisionPolicy:
    """bf16: parameters all-gathered and used in bf16, gradients reduced in `reduce_dtype`
    (fp32 by default, so summing many ranks' gradients loses nothing) into the fp32 shards
    the optimizer updates. fp32: no casting at all."""
    if config.precision != "bf16":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=_DTYPES[config.reduce_dtype])


def _shard(model: nn.Module, policy: MixedPrecisionPolicy) -> int:
    """FSDP2 `fully_shard` on each block, then the root (the rest); returns how many blocks."""
    blocks = _blocks(model)
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return len(blocks)


def _describe_precision(config: ParallelizeConfig) -> str:
    if config.precision != "bf16":
        return "fp32 parameters"
    return f"bf16 parameters and compute, {config.reduce_dtype} gradient reduction"


def uses_autocast(model: nn.Module, precision: str) -> bool:
    """Whether the trainer runs forward under bf16 autocast.

    Yes for bf16 under DDP or in a single process. Not under FSDP2: its mixed-precision
    policy already all-gathers bf16 parameters and casts the root's inputs to bf16, so every
    op runs in bf16 without autocast's per-op casts and the fp32 activations that autocast
    keeps for norms and softmax (torchtitan does the same). The losses upcast to fp32
    themselves (`ps3.losses`, `causal_lm_loss`), so the loss is fp32 either way.
    """
    return precision == "bf16" and not isinstance(model, FSDPModule)


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
