"""The token-selection loss: PS3's selection maps against the box a question is about.

BCE + Dice per high-res scale between the selection probabilities (top-down for
`after_prompt`, the prior for `after_image`) and the box's cells, averaged over scales;
images without a box do not count. It is the only signal the prompt head and PS3's
selection modules get in VILA-HD training, since top-k selection passes no gradient.
"""

from __future__ import annotations

import torch

from ps3.losses import BoxLossConfig, box_supervision_loss

from .model import box_maps


def selection_loss(probs: list[torch.Tensor], boxes: torch.Tensor, has_box: torch.Tensor,
                   grids: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """{"loss", "bce", "dice"}; an exact zero in the graph when no image has a box."""
    maps = box_maps(boxes, has_box, grids)
    # PS3's pre-training box loss with only the top-down term: "global" samples are skipped there,
    # which is what an image without a box is here.
    out = box_supervision_loss(probs, None, maps, ~has_box.bool(), BoxLossConfig(bottomup_weight=0.0))
    return {"loss": out["loss"], "bce": out["topdown_bce"], "dice": out["topdown_dice"]}


def selection_recall(selected: list[torch.Tensor], boxes: torch.Tensor, has_box: torch.Tensor,
                     grids: tuple[int, ...]) -> torch.Tensor:
    """Per image with a box [M]: the share of its box cells (all scales together) that were
    encoded (the paper's table 7 recall)."""
    maps = box_maps(boxes, has_box, grids)
    hit = sum((m * s.float()).flatten(1).sum(1) for m, s in zip(maps, selected))
    total = sum(m.flatten(1).sum(1) for m in maps)
    keep = has_box.bool() & (total > 0)
    return hit[keep] / total[keep]
