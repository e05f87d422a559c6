"""`parallelize`: activation-checkpointing modes, the FSDP2 mixed-precision policy, compiled blocks.

FSDP2 runs on a 1-rank gloo group in this process: one shard per parameter, but the same
`fully_shard` units, DTensor parameters and `MixedPrecisionPolicy` as on many ranks (the
2-rank gradient parity lives in tests/ps3/model/test_fsdp.py).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from ps3.losses import sigmoid_loss
from ps3.model import PS3Model
from ps3_platform.runtime.distributed import (
    ParallelizeConfig,
    WorldInfo,
    mixed_precision_policy,
    parallelize,
    uses_autocast,
)

CPU = WorldInfo(rank=0, world_size=1, local_rank=0, restart_count=0, device=torch.device("cpu"))


@pytest.fixture
def one_rank(tmp_path):
    """A 1-rank gloo group (file rendezvous: no port to pick), destroyed after the test."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    yield CPU
    dist.destroy_process_group()


def _batch(preset, n: int = 2) -> dict:
    """A pre-training contract batch (`ps3.model`'s docs): whole high-res images, and a box in
    the top-left quarter of every selection map."""
    g = torch.Generator().manual_seed(1)
    p = preset
    boxes = [torch.zeros(n, grid, grid) for grid in p.grids[1:]]  # [B, G_s, G_s]
    for box in boxes:
        box[:, : box.shape[1] // 2, : box.shape[2] // 2] = 1
    return dict(
        lowres=torch.randn(n, 3, p.scales[0], p.scales[0], generator=g),
        selection_view=torch.randn(n, 3, p.selection_view_size, p.selection_view_size, generator=g),
        highres=[torch.randn(n, 3, s, s, generator=g) for s in p.scales[1:]], gt_maps=boxes,
        tokens=torch.randint(0, p.text_vocab_size, (n, p.text_context_length), generator=g),
        is_global=torch.zeros(n, dtype=torch.bool),
    )


def _forward_loss(model) -> torch.Tensor:
    """The pre-training losses' shape: SigLIP loss plus a term through the top-down selection."""
    out = model(_batch(model.preset))
    siglip = sigmoid_loss(out.image_features, out.text_features, out.logit_scale, out.logit_bias)
    return siglip + sum(p.float().mean() for p in out.topdown_probs)


def _trunk_indices(model: PS3Model) -> list[int]:
    """Each of `model.blocks()`'s index within its own trunk (vision blocks, then text blocks)."""
    return [*range(model.preset.depth), *range(model.preset.text_depth)]


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_checkpointing_mode_picks_the_blocks_recomputed_in_backward(mode):
    """A recomputed block runs its forward again in backward; selective is every other block
    of each trunk (1, 3, ...), full every block."""
    torch.manual_seed(0)
    model = parallelize(PS3Model("ps3-tiny"), CPU, ParallelizeConfig(activation_checkpointing=mode))
    calls: Counter[int] = Counter()
    for index, block in enumerate(model.blocks()):
        block.register_forward_pre_hook(lambda module, args, index=index: calls.update([index]))
    loss = _forward_loss(model)
    forward_calls = dict(calls)
    loss.backward()
    recomputed = [calls[i] > forward_calls[i] for i in range(len(model.blocks()))]
    expected = {"none": [False] * len(recomputed), "full": [True] * len(recomputed),
                "selective": [i % 2 == 1 for i in _trunk_indices(model)]}[mode]
    assert recomputed == expected


def test_checkpointing_does_not_change_gradients_or_names():
    def grads(mode: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = parallelize(PS3Model("ps3-tiny"), CPU, ParallelizeConfig(activation_checkpointing=mode))
        _forward_loss(model).backward()
        return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    plain, selective = grads("none"), grads("selective")
    assert plain.keys() == selective.keys()
    assert all(torch.allclose(plain[n], selective[n], atol=1e-6) for n in plain)


def test_fsdp_bf16_shards_each_block_and_computes_in_bf16(one_rank):
    torch.manual_seed(0)
    model = PS3Model("ps3-tiny")
    names = [name for name, _ in model.named_parameters()]
    model = parallelize(model, one_rank, ParallelizeConfig(parallelism="fsdp", precision="bf16"))
    blocks = model.blocks()
    assert len(blocks) == model.preset.depth + model.preset.text_depth  # both trunks
    assert all(isinstance(b, FSDPModule) for b in blocks) and isinstance(model, FSDPModule)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    policy = blocks[0]._get_fsdp_state()._fsdp_param_group.mp_policy  # no public getter
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)

    seen: set[tuple[torch.dtype, torch.dtype]] = set()  # (input, weight) dtypes inside each block
    for block in blocks:
        block.register_forward_pre_hook(lambda m, args: seen.add((args[0].dtype, next(m.parameters()).dtype)))
    loss = _forward_loss(model)
    loss.backward()
    assert seen == {(torch.bfloat16, torch.bfloat16)}
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)  # fp32 shards
    assert [name for name, _ in model.named_parameters()] == names  # checkpoints keep their keys
    assert not uses_autocast(model, "bf16")  # the policy casts; the trainer does not autocast on top


def test_mixed_precision_policy_follows_precision_and_reduce_dtype():
    bf16 = mixed_precision_policy(ParallelizeConfig(precision="bf16", reduce_dtype="bf16"))
    assert (bf16.param_dtype, bf16.reduce_dtype) == (torch.bfloat16, torch.bfloat16)
    fp32 = mixed_precision_policy(ParallelizeConfig(precision="fp32"))
    assert (fp32.param_dtype, fp32.reduce_dtype) == (None, None)  # no casting at all


def test_autocast_only_outside_fsdp():
    model = PS3Model("ps3-tiny")
    assert uses_autocast(model, "bf16") and not uses_autocast(model, "fp32")


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_loss_and_gradients():
    """`compile: true` on CPU (inductor's C++ backend): the same loss, gradients and names.

    One to two minutes on 2 cores with a cold inductor cache (three block graphs, forward and
    backward, built by the C++ compiler); seconds with a warm one. Summation order differs
    from eager, so gradients agree to fp32 rounding, not bit for bit.
    """
    def run(compile_blocks: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = parallelize(PS3Model("ps3-tiny"), CPU, ParallelizeConfig(compile=compile_blocks))
        loss = _forward_loss(model)
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    eager_loss, eager_grads = run(False)
    try:
        compiled_loss, compiled_grads = run(True)
    finally:
        torch._dynamo.reset()  # no compiled code left behind for later tests
    assert float(compiled_loss) == pytest.approx(float(eager_loss), rel=1e-5)
    assert compiled_grads.keys() == eager_grads.keys()
    assert all(torch.allclose(compiled_grads[n], eager_grads[n], rtol=1e-4, atol=1e-5) for n in eager_grads)
