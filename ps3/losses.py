"""PS3 pre-training losses: distributed SigLIP sigmoid loss and box supervision of selection maps.

Both take rank / world size (and an optional process group) as arguments, so they run and
are tested on CPU with gloo; nothing here reads global state.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["sigmoid_loss", "SigmoidLoss", "BoxLossConfig", "box_supervision_loss", "ring_shift", "clamp_logit_scale_", "MAX_LOGIT_SCALE"]

MAX_LOGIT_SCALE = math.log(100.0)
"""Upper bound of the learned log temperature (SigLIP / OpenCLIP clamp it to [0, log 100])."""


def clamp_logit_scale_(log_scale: torch.Tensor, max_value: float = MAX_LOGIT_SCALE) -> None:
    """Clamp a log-temperature parameter to [0, max_value] in place (after each optimizer step)."""
    with torch.no_grad():
        log_scale.clamp_(0.0, max_value)


class _RingShift(torch.autograd.Function):
    """Send a tensor to the next rank and receive the previous rank's, with autograd.

    Backward runs the same exchange in the opposite direction: the gradient of what this
    rank received goes back to its sender, and the gradient of what it sent comes back.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, to_rank: int, from_rank: int, group) -> torch.Tensor:
        ctx.to_rank, ctx.from_rank, ctx.group = to_rank, from_rank, group
        out = torch.empty_like(x)
        ops = [dist.P2POp(dist.isend, x.contiguous(), to_rank, group), dist.P2POp(dist.irecv, out, from_rank, group)]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _RingShift.apply(grad.contiguous(), ctx.from_rank, ctx.to_rank, ctx.group), None, None, None


def ring_shift(x: torch.Tensor, rank: int, world_size: int, group=None) -> torch.Tensor:
    """Autograd-aware P2P: returns the tensor of rank-1 (mod world) after sending ours to rank+1."""
    to_rank, from_rank = (rank + 1) % world_size, (rank - 1) % world_size
    if group is not None:  # P2P ops address global ranks
        to_rank, from_rank = dist.get_global_rank(group, to_rank), dist.get_global_rank(group, from_rank)
    return _RingShift.apply(x, to_rank, from_rank, group)


def _pair_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, diagonal: bool) -> torch.Tensor:
    """Sum of -log sigmoid(label * logit) over one [B_img, B_txt] block; +1 on the diagonal if ``diagonal``."""
    logits = scale * img @ txt.T + bias  # [B, B']
    labels = -torch.ones_like(logits)
    if diagonal:
        labels = labels + 2 * torch.eye(*logits.shape, device=logits.device, dtype=logits.dtype)
    return -F.logsigmoid(labels * logits).sum()


def sigmoid_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor, *, rank: int = 0, world_size: int = 1, group=None,
                 sizes: Sequence[int] | None = None) -> torch.Tensor:
    """SigLIP loss of this rank's images against the texts of every rank.

    Features are L2-normalised [B, E]; ``logit_scale`` is the temperature itself (the exp of
    the learned log scale). Positives are the local diagonal; the texts of the other ranks
    travel around a ring (world-1 autograd-aware P2P shifts) and only add negatives, so no
    rank ever holds more than one [B, B] logits block. Divided by the local batch: the mean
    over ranks (what DDP/FSDP gradient averaging optimises) equals the single-process loss
    over the concatenated global batch. ``sizes`` (every rank's batch in this forward) lets
    ranks hold different batches: blocks travel padded to the largest and are cut to their
    sender's size on arrival; weighting each rank's mean by its size then gives the global mean.
    """
    img, txt = image_features.float(), text_features.float()
    scale, bias = logit_scale.float(), logit_bias.float()
    loss = _pair_loss(img, txt, scale, bias, diagonal=True)
    uneven = sizes is not None and len(set(sizes)) > 1
    block = F.pad(txt, (0, 0, 0, max(sizes) - txt.shape[0])) if uneven else txt
    for shift in range(1, world_size):
        block = ring_shift(block, rank, world_size, group)
        received = block[:sizes[(rank - shift) % world_size]] if uneven else block
        loss = loss + _pair_loss(img, received, scale, bias, diagonal=False)
    return loss / img.shape[0]


def sigmoid_loss_all_gather(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                            logit_bias: torch.Tensor, *, rank: int = 0, world_size: int = 1, group=None,
                            sizes: Sequence[int] | None = None) -> torch.Tensor:
    """``sigmoid_loss`` with one all-gather of every rank's texts instead of world-1 ring shifts.

    Same loss and gradients (the texts' gradients return to their ranks through the
    gather's backward, a reduce-scatter); one collective of world x B texts and one
    [B, world x B] logits block, against world-1 exchanges of [B, B] blocks: faster where
    the interconnect favours few large collectives, heavier in memory at large worlds.
    ``sizes`` as in ``sigmoid_loss``: blocks are gathered padded and cut to their sender's size.
    """
    from torch.distributed.nn.functional import all_gather

    img, txt = image_features.float(), text_features.float()
    scale, bias = logit_scale.float(), logit_bias.float()
    if world_size == 1:
        return _pair_loss(img, txt, scale, bias, diagonal=True) / img.shape[0]
    sizes = list(sizes) if sizes is not None else [txt.shape[0]] * world_size
    padded = F.pad(txt, (0, 0, 0, max(sizes) - txt.shape[0]))
    blocks = [block[:n] for block, n in zip(all_gather(padded, group=group), sizes)]
    blocks[rank] = txt  # this rank's own texts keep their direct gradient path
    texts = torch.cat(blocks)  # [sum(sizes), E]
    logits = scale * img @ texts.T + bias
    labels = -torch.ones_like(logits)
    start = sum(sizes[:rank])
    labels[:, start:start + img.shape[0]] += 2 * torch.eye(img.shape[0], device=img.device, dtype=img.dtype)
    return -F.logsigmoid(labels * logits).sum() / img.shape[0]


class SigmoidLoss(nn.Module):
    """``sigmoid_loss`` bound to a rank / world size / group (like open_clip's loss modules)."""

    def __init__(self, *, rank: int = 0, world_size: int = 1, group=None) -> None:
        super().__init__()
        self.rank, self.world_size, self.group = rank, world_size, group

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
        return sigmoid_loss(image_features, text_features, logit_scale, logit_bias,
                            rank=self.rank, world_size=self.world_size, group=self.group, sizes=sizes)


@dataclass(kw_only=True, slots=True)
class BoxLossConfig:
    """Weights of the selection-map supervision (the paper uses BCE + DICE; the released code BCE only)."""

    bce_weight: float = 1.0
    """Weight of the per-cell binary cross-entropy."""
    dice_weight: float = 1.0
    """Weight of the DICE loss (set 0 to reproduce the released recipe)."""
    topdown_weight: float = 1.0
    """Weight of the top-down (caption prompt) term."""
    bottomup_weight: float = 1.0
    """Weight of the bottom-up (learned prior prompt) term."""
    dice_smooth: float = 1.0
    """Additive smoothing of the DICE ratio, so an empty box gives a finite loss."""


def _map_terms(probs: list[torch.Tensor], gts: list[torch.Tensor], local: torch.Tensor, smooth: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale-averaged BCE and DICE over local samples only (weights keep shapes static)."""
    n_local = local.sum().clamp(min=1)
    bce, dice = [], []
    for p, g in zip(probs, gts):
        p, g = p.float().flatten(1), (g > 0).float().flatten(1)  # [B, N]
        per_cell = F.binary_cross_entropy(p, g, reduction="none")  # [B, N]
        bce.append((per_cell.mean(1) * local).sum() / n_local)
        ratio = (2 * (p * g).sum(1) + smooth) / (p.sum(1) + g.sum(1) + smooth)  # [B]
        dice.append(((1 - ratio) * local).sum() / n_local)
    return torch.stack(bce).mean(), torch.stack(dice).mean()


def box_supervision_loss(topdown_probs: list[torch.Tensor] | None, bottomup_probs: list[torch.Tensor] | None,
                         gt_maps: list[torch.Tensor], is_global: torch.Tensor, config: BoxLossConfig | None = None,
                         *, bottomup_gt_maps: list[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """BCE + DICE between selection probabilities and ground-truth box maps, per high-res scale.

    probs / gt maps: per scale [B, G_s, G_s]; only local-caption samples (``~is_global``)
    count. Computed in fp32 with autocast off. With no local sample every term is an exact
    zero that still depends on all probabilities (DDP static graphs and FSDP need every
    selection parameter in the graph). ``bottomup_gt_maps`` (e.g. the union of all boxes
    of the image, paper Fig. 5c) defaults to ``gt_maps``.
    """
    cfg = config or BoxLossConfig()
    local = (~is_global.reshape(-1).bool()).float()
    out: dict[str, torch.Tensor] = {}
    total = None
    device_type = gt_maps[0].device.type
    # The meta device (cost tracing, ps3_platform.runtime.step_trace) has no autocast to turn off.
    fp32 = contextlib.nullcontext() if device_type == "meta" else torch.autocast(device_type=device_type, enabled=False)
    with fp32:
        for name, probs, gts, weight in (("topdown", topdown_probs, gt_maps, cfg.topdown_weight),
                                         ("bottomup", bottomup_probs, bottomup_gt_maps or gt_maps, cfg.bottomup_weight)):
            if probs is None:
                continue
            bce, dice = _map_terms(probs, gts, local, cfg.dice_smooth)
            out[f"{name}_bce"], out[f"{name}_dice"] = bce, dice
            term = weight * (cfg.bce_weight * bce + cfg.dice_weight * dice)
            total = term if total is None else total + term
    if total is None:
        raise ValueError("box_supervision_loss needs topdown_probs or bottomup_probs")
    out["loss"] = total
    return out
