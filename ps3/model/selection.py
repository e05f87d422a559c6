"""Stage 2/3 selection maths: prompt scores, probabilities per scale, budgets, top-k.

Pure functions over tensors, vectorised over the batch (no loop over samples): every
sample of a batch selects the same number of cells per scale, so the per-scale budgets
(and the cells still free after earlier looks) are batch-uniform integers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["prompt_logits", "logits_to_probs", "apply_gt_override", "look_budgets", "select_topk", "index_to_map"]


def _cosine(features: torch.Tensor, prompt: torch.Tensor, dim: int) -> torch.Tensor:
    """Cosine along ``dim`` between a feature map and a prompt broadcast to it."""
    return (F.normalize(features, dim=dim) * F.normalize(prompt, dim=dim)).sum(dim=dim)


def prompt_logits(lowres_feat: torch.Tensor, prompt: torch.Tensor, conv_map: torch.Tensor | None = None,
                  hr_prompt: torch.Tensor | None = None) -> torch.Tensor:
    """Selection logits on the low-res grid, one map per high-res head.

    lowres_feat [B, S', D, G0, G0] (projected ViT features), prompt [B, D];
    conv_map [B, C, Gc, Gc] (ConvNeXt branch) with hr_prompt [B, S', C].
    The ConvNeXt cosine is max-pooled *down* to G0 and averaged with the ViT cosine
    (what the released checkpoints were trained with). Returns [B, S', G0, G0].
    """
    logits = _cosine(lowres_feat, prompt[:, None, :, None, None], dim=2)  # [B, S', G0, G0]
    if conv_map is not None:
        hr = _cosine(conv_map[:, None], hr_prompt[..., None, None], dim=2)  # [B, S', Gc, Gc]
        logits = (logits + F.adaptive_max_pool2d(hr, logits.shape[-2:])) / 2
    return logits


def logits_to_probs(logits: torch.Tensor, grids: tuple[int, ...], share_first: bool = True) -> list[torch.Tensor]:
    """Probabilities on each high-res scale's grid from [B, S', G0, G0] logits.

    ``sigmoid(clamp(5 * logit, -10, 10))`` (the released softmax over [x, 0] is the same
    function); with ``share_first`` every scale uses head 0 (the other heads stay in the
    graph with zero gradient, as in the released code). Nearest upsampling to each grid.
    """
    probs = torch.sigmoid((logits * 5.0).clamp(-10.0, 10.0))
    if share_first:
        probs = probs * 0 + probs[:, :1]
    out = []
    for i, g in enumerate(grids):
        p = F.interpolate(probs[:, i:i + 1].float(), size=(g, g), mode="nearest")
        out.append(p[:, 0].to(probs.dtype, copy=True))  # [B, G_s, G_s]; a copy, not a view (FSDP2 hooks)
    return out


def apply_gt_override(probs: list[torch.Tensor], gt_maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Teacher forcing: probability 1 on every ground-truth cell so box cells win top-k first."""
    return [torch.where(g > 0, torch.ones_like(p), p) for p, g in zip(probs, gt_maps)]


def look_budgets(budgets: tuple[int, ...], available: list[int], n_tokens: int | None = None) -> list[int]:
    """Cells to take per scale in one look.

    ``n_tokens`` (fewer than a full look) scales the budgets proportionally, remainder on
    the last scale. A scale with fewer free cells than its share passes the surplus to the
    next scale (then, if the last scale is short, back to earlier ones).
    """
    total = sum(budgets)
    counts = list(budgets)
    if n_tokens is not None and n_tokens != total:
        counts = [b * n_tokens // total for b in budgets]
        counts[-1] += n_tokens - sum(counts)
    for i in range(len(counts) - 1):  # forward spill
        spill = max(counts[i] - available[i], 0)
        counts[i] -= spill
        counts[i + 1] += spill
    for i in range(len(counts) - 1, 0, -1):  # backward spill from the last scale
        spill = max(counts[i] - available[i], 0)
        counts[i] -= spill
        counts[i - 1] += spill
    return [min(c, a) for c, a in zip(counts, available)]


def select_topk(probs: list[torch.Tensor], counts: list[int], taken: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Top-k cells per scale, excluding already-taken ones; indices sorted in raster order.

    probs: per scale [B, G, G]; taken: per scale [B, G*G] bool or None; returns per scale
    long [B, k_s] (row-major flat cell indices). Runs without gradient: the choice is
    discrete, the selection modules learn from the box losses only.
    """
    out = []
    with torch.no_grad():
        for s, (p, k) in enumerate(zip(probs, counts)):
            flat = p.flatten(1).float()  # [B, N_s]
            if taken is not None:
                flat = flat.masked_fill(taken[s], -1.0)
            idx = flat.topk(k, dim=1).indices if k > 0 else flat.new_zeros(flat.shape[0], 0, dtype=torch.long)
            out.append(idx.sort(dim=1).values)  # [B, k_s]
    return out


def index_to_map(index: torch.Tensor, cells: int) -> torch.Tensor:
    """Flat indices [B, K] -> boolean map [B, cells]."""
    m = torch.zeros(index.shape[0], cells, dtype=torch.bool, device=index.device)
    return m.scatter_(1, index, True)
