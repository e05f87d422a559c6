"""Losses: SigLIP sigmoid loss (single process and gloo rings of 2, 3 and 5 ranks) and box supervision."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ps3.losses import BoxLossConfig, SigmoidLoss, box_supervision_loss, sigmoid_loss, sigmoid_loss_all_gather

WORLD, B, E = 2, 3, 8


def _features(n: int = WORLD * B, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, E, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n, E, generator=g), dim=-1)
    return img, txt


def test_single_process_matches_definition():
    img, txt = _features()
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    logits = scale * img @ txt.T + bias
    labels = 2 * torch.eye(len(img)) - 1
    ref = -F.logsigmoid(labels * logits).sum() / len(img)
    assert torch.allclose(sigmoid_loss(img, txt, scale, bias), ref)
    assert torch.allclose(SigmoidLoss()(img, txt, scale, bias), ref)
    assert torch.allclose(sigmoid_loss_all_gather(img, txt, scale, bias), ref)


def _shares(sizes: list[int]) -> list[slice]:
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    return [slice(a, a + n) for a, n in zip(starts, sizes)]


def _worker(rank: int, out_dir: str, sizes: list[int], exchange: str = "ring") -> None:
    # A file rendezvous: no TCP port to pick (and race other test runs for).
    world = len(sizes)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        img, txt = _features(sum(sizes))
        mine = _shares(sizes)[rank]
        if sizes[rank] == 0:  # a stand-in forward: the sample before, weighted 0
            mine = slice(mine.start - 1, mine.start)
        i, t = img[mine].clone().requires_grad_(True), txt[mine].clone().requires_grad_(True)
        log_scale = torch.tensor(math.log(10.0), requires_grad=True)
        bias = torch.tensor(-10.0, requires_grad=True)
        if exchange == "ring":
            loss = SigmoidLoss(rank=rank, world_size=world)(i, t, log_scale.exp(), bias, sizes=sizes)
        else:
            loss = sigmoid_loss_all_gather(i, t, log_scale.exp(), bias, rank=rank, world_size=world, sizes=sizes)
        weight = sizes[rank] * world / sum(sizes)  # the runtime's loss weight for an uneven share
        (loss * weight).backward()
        shared = torch.stack([loss.detach() * weight, log_scale.grad, bias.grad])
        dist.all_reduce(shared)  # what gradient averaging sees, times world
        torch.save({"img": i.grad, "txt": t.grad, "shared": shared / world}, os.path.join(out_dir, f"{rank}.pt"))
        dist.barrier()  # nobody tears down gloo while the peer still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("exchange,sizes", [("ring", [B, B]), ("ring", [3, 3, 2]), ("ring", [2, 2, 2, 1, 1]),
                                            ("ring", [1, 1, 0]), ("all_gather", [B, B]), ("all_gather", [3, 3, 2]),
                                            ("all_gather", [1, 1, 0])],
                         ids=["ring-even", "ring-3", "ring-5", "ring-stand-in", "gather-even", "gather-3",
                              "gather-stand-in"])
def test_distributed_loss_equals_single_process_loss_and_gradients(tmp_path, exchange, sizes):
    """Ring shifts and one all-gather alike, also with shares that differ by one (a world size
    that does not divide the batch) and with a rank whose forward is a stand-in."""
    world = len(sizes)
    mp.start_processes(_worker, args=(str(tmp_path), sizes, exchange), nprocs=world, start_method="spawn", join=True)
    img, txt = _features(sum(sizes))
    img.requires_grad_(True)
    txt.requires_grad_(True)
    log_scale = torch.tensor(math.log(10.0), requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    ref = sigmoid_loss(img, txt, log_scale.exp(), bias)
    ref.backward()
    for rank, mine in enumerate(_shares(sizes)):
        got = torch.load(tmp_path / f"{rank}.pt")
        if sizes[rank] == 0:
            assert not got["img"].any() and not got["txt"].any(), "a stand-in adds no gradient"
            continue
        assert torch.allclose(got["shared"][0], ref.detach(), atol=1e-5)
        assert torch.allclose(got["shared"][1], log_scale.grad, atol=1e-5)
        assert torch.allclose(got["shared"][2], bias.grad, atol=1e-5)
        # gradient averaging divides by world: a rank's own feature gradients are world x the global ones
        assert torch.allclose(got["img"] / world, img.grad[mine], atol=1e-6)
        assert torch.allclose(got["txt"] / world, txt.grad[mine], atol=1e-6)


def _maps(batch=3):
    torch.manual_seed(0)
    probs = [torch.rand(batch, 4, 4, requires_grad=True), torch.rand(batch, 8, 8, requires_grad=True)]
    gts = [torch.zeros(batch, 4, 4), torch.zeros(batch, 8, 8)]
    gts[0][:, 1:3, 1:3] = 1
    gts[1][:, 2:6, 2:6] = 1
    return probs, gts


def test_box_loss_is_bce_plus_dice_on_local_samples_only():
    probs, gts = _maps()
    is_global = torch.tensor([True, False, False])
    out = box_supervision_loss(probs, None, gts, is_global)
    bce = torch.stack([F.binary_cross_entropy(p[1:], g[1:]) for p, g in zip(probs, gts)]).mean()
    dice = torch.stack([
        (1 - (2 * (p[1:] * g[1:]).sum((1, 2)) + 1) / (p[1:].sum((1, 2)) + g[1:].sum((1, 2)) + 1)).mean()
        for p, g in zip(probs, gts)
    ]).mean()
    assert torch.allclose(out["topdown_bce"], bce) and torch.allclose(out["topdown_dice"], dice)
    assert torch.allclose(out["loss"], bce + dice)
    out["loss"].backward()
    assert probs[0].grad[0].abs().sum() == 0 and probs[0].grad[1].abs().sum() > 0


def test_box_loss_weights_are_parameters():
    probs, gts = _maps()
    local = torch.zeros(3, dtype=torch.bool)
    both = box_supervision_loss(probs, probs, gts, local)
    bce_only = box_supervision_loss(probs, probs, gts, local, BoxLossConfig(dice_weight=0.0))
    assert torch.allclose(bce_only["loss"], both["topdown_bce"] + both["bottomup_bce"])
    assert torch.allclose(both["loss"], both["topdown_bce"] + both["topdown_dice"] + both["bottomup_bce"] + both["bottomup_dice"])


def test_box_loss_without_local_samples_is_zero_but_in_graph():
    probs, gts = _maps()
    out = box_supervision_loss(probs, probs, gts, torch.ones(3, dtype=torch.bool))
    assert out["loss"].item() == 0.0 and out["loss"].requires_grad
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in probs)


def test_box_loss_is_fp32_under_bf16_autocast_and_handles_empty_boxes():
    probs, gts = _maps()
    gts[0][1] = 0
    gts[1][1] = 0  # an empty box
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = box_supervision_loss([p.bfloat16() for p in probs], None, gts, torch.zeros(3, dtype=torch.bool))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


def test_box_loss_needs_some_probabilities():
    with pytest.raises(ValueError, match="needs topdown_probs or bottomup_probs"):
        box_supervision_loss(None, None, [torch.zeros(1, 2, 2)], torch.zeros(1, dtype=torch.bool))


def test_clamp_logit_scale_helpers():
    from ps3.losses import clamp_logit_scale_
    from ps3.model import PS3Model
    from ps3.model import clamp_logit_scale_ as clamp_model

    p = torch.nn.Parameter(torch.tensor(9.0))
    clamp_logit_scale_(p)
    assert p.item() == pytest.approx(math.log(100))
    model = PS3Model("ps3-tiny", depth=1, select_layers=(0,), text_depth=1)
    assert model.logit_scale.item() == pytest.approx(math.log(10)) and model.logit_bias.item() == -10
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    clamp_model(model)
    assert model.logit_scale.item() == 0.0
