"""FSDP2: every block is its own fully_shard unit, with activation checkpointing, on 2 gloo ranks."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ps3.model import PS3Model

from .conftest import make_batch

PROBE = "vision_model.trunk.blocks.1.attn.qkv.weight"


def _loss(model, batch):
    out = model(batch)
    return (out.image_features @ out.text_features.T).sum() + out.logit_bias.sum() + sum(p.sum() for p in out.topdown_probs)


def _worker(rank: int, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # A file rendezvous: no TCP port to pick (and race other test runs for).
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        model = PS3Model("ps3-tiny")
        model.set_grad_checkpointing(True)
        mesh = init_device_mesh("cpu", (2,))
        for block in model.blocks():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        _loss(model, make_batch(model.preset, 2)).backward()
        grad = dict(model.named_parameters())[PROBE].grad.full_tensor()
        if rank == 0:
            torch.save(grad, os.path.join(out_dir, "grad.pt"))
        dist.barrier()  # nobody tears down gloo while the peer still talks to it
    finally:
        dist.destroy_process_group()


def test_fully_shard_per_block_matches_single_process(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path),), nprocs=2, start_method="spawn", join=True)
    torch.manual_seed(0)
    model = PS3Model("ps3-tiny")
    _loss(model, make_batch(model.preset, 2)).backward()
    ref = dict(model.named_parameters())[PROBE].grad
    assert torch.allclose(torch.load(tmp_path / "grad.pt"), ref, atol=1e-5)
