"""VilaHD under FSDP2 on 2 gloo ranks, one of which has a micro-batch without images.

FSDP2 all-gathers each sharded unit (PS3 block, LLM decoder layer) in every forward, so a
rank that ran one forward fewer than its peer would leave the peer waiting forever. Top-down
mode runs the LLM twice (pass 1 gives the selection prompt): a text-only micro-batch must
still run both passes and the vision tower, and the step must finish on both ranks.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ps3.model import PS3VisionEncoder, get_preset
from ps3.vila_hd.llm import build_tiny_llm, load_llm
from ps3.vila_hd.model import Selection, VilaHD

from .test_model import _batch, _text_only


def _worker(rank: int, out_dir: str, llm_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=2)
    try:
        llm = load_llm(llm_dir)
        torch.manual_seed(0)
        model = VilaHD(PS3VisionEncoder(get_preset("ps3-tiny")), llm.model, image_token_id=llm.image_token_id,
                       newline_token_id=0)
        mesh = init_device_mesh("cpu", (2,))
        for unit in model.blocks():
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
        batch = _batch(llm) if rank == 0 else _text_only(_batch(llm))
        for _ in range(2):  # two steps: the second starts from the first's gradients
            out = model(batch, Selection(mode="after_prompt"))
            (out.lm_loss + out.ghost).backward()  # the ghost keeps what the batch left unused in backward
        (torch.tensor([1.0]) if rank else torch.tensor([0.0])).numpy().tofile(os.path.join(out_dir, f"done-{rank}"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_text_only_micro_batch_on_one_rank_does_not_hang_fsdp(tmp_path):
    llm_dir = tmp_path / "llm"
    build_tiny_llm(str(llm_dir), ["what shape is the red sign", "circle square triangle cross", "A B C D"])
    context = mp.start_processes(_worker, args=(str(tmp_path), str(llm_dir)), nprocs=2, start_method="spawn",
                                 join=False)
    deadline = time.time() + 240
    while not context.join(timeout=1):
        if time.time() > deadline:
            for process in context.processes:
                process.kill()
            raise AssertionError("the ranks hang: one ran fewer FSDP forwards than the other")
    assert (tmp_path / "done-0").exists() and (tmp_path / "done-1").exists()


def test_fsdp_bf16_and_selective_checkpointing_run_a_step(tmp_path, tiny_vila_hd):
    """The VILA-HD jobs' setting through the runtime's `parallelize` (fsdp, bf16, selective
    checkpointing) on a 1-rank group in this process: bf16 PS3 blocks and Qwen2 layers, every
    other decoder layer recomputed, an fp32 loss."""
    from ps3_platform.runtime.distributed import ParallelizeConfig, WorldInfo, parallelize

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        llm = load_llm(str(tiny_vila_hd[2]))  # a fresh copy: sharding changes the model in place
        torch.manual_seed(0)
        model = VilaHD(PS3VisionEncoder(get_preset("ps3-tiny")), llm.model, image_token_id=llm.image_token_id,
                       newline_token_id=0).train()
        world = WorldInfo(rank=0, world_size=1, local_rank=0, restart_count=0, device=torch.device("cpu"))
        config = ParallelizeConfig(parallelism="fsdp", precision="bf16", activation_checkpointing="selective")
        model = parallelize(model, world, config)
        assert [layer.gradient_checkpointing for layer in model.llm.model.layers] == [False, True]
        out = model(_batch(llm), Selection(mode="after_prompt"))
        (out.lm_loss + out.ghost).backward()
        assert out.lm_loss.dtype == torch.float32 and torch.isfinite(out.lm_loss)
        assert model.mm_projector.mlp.fc1.weight.grad.dtype == torch.float32  # the fp32 shards
    finally:
        dist.destroy_process_group()
