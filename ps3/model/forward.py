"""The two ways the PS3 vision encoder is driven: one pre-training look, and multi-look inference.

Pre-training follows the batch contract with the data pipeline (``ps3.data``): the low-res
view and the selection view come ready-made, and the high-res input comes either as full
images per scale (tiny presets, tests) or as pre-gathered patches with their cell indices
(the fast path at 4K, where the loader decoded only the region the step uses).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ps3.model.errors import PS3InputError
from ps3.model.selection import (
    apply_gt_override,
    index_to_map,
    look_budgets,
    select_topk,
)
from ps3.model.trunk import gather_patches
from ps3.model.vision import LowRes, PS3VisionEncoder, resize_square

__all__ = ["PretrainVisionOutput", "PS3ImageOutput", "vision_pretrain_forward", "encode_image_multilook", "count_looks",
           "run_looks"]


@dataclass
class PretrainVisionOutput:
    """Vision side of one pre-training forward."""

    pooled: torch.Tensor  # [B, D] low-res pooled for global samples, in-box high-res pooled otherwise
    lowres_pooled: torch.Tensor  # [B, D]
    bottomup_probs: list[torch.Tensor]  # per high-res scale [B, G_s, G_s], with gradient
    topdown_probs: list[torch.Tensor] | None  # same, for the given prompt; None without one
    hr_index: list[torch.Tensor]  # per scale long [B, K_s]: the cells that were encoded


def _check_list(name: str, items: list[torch.Tensor] | None, shapes: list[tuple[int, ...]]) -> None:
    """Per-scale list of tensors with the expected trailing shapes, or a PS3InputError naming it."""
    if items is None or len(items) != len(shapes):
        n = None if items is None else len(items)
        raise PS3InputError(f"{name} must be a list of {len(shapes)} tensors (one per high-res scale), got {n}")
    for s, (t, shape) in enumerate(zip(items, shapes)):
        if tuple(t.shape[1:]) != shape:
            raise PS3InputError(f"{name}[{s}] must be [B, {', '.join(map(str, shape))}], got {list(t.shape)}")


def _highres_patches(enc: PS3VisionEncoder, probs: list[torch.Tensor], gt_maps: list[torch.Tensor] | None,
                     highres: list[torch.Tensor] | None, hr_index: list[torch.Tensor] | None,
                     hr_patches: list[torch.Tensor] | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Resolve the two contract input forms into (patches per scale, index per scale)."""
    p = enc.preset
    if (highres is None) == (hr_index is None):
        raise PS3InputError("give exactly one high-res input form: `highres` (full images) or `hr_index` + `hr_patches`")
    if hr_index is not None:
        _check_list("hr_patches", hr_patches, [(t.shape[1], 3, p.patch_size, p.patch_size) for t in hr_index])
        for s, idx in enumerate(hr_index):
            cells = p.grids[s + 1] ** 2
            readable = idx.numel() and idx.device.type != "meta"
            if idx.dtype != torch.long or (readable and (idx.min() < 0 or idx.max() >= cells)):
                raise PS3InputError(f"hr_index[{s}] must be long cell indices in [0, {cells}) for scale {p.scales[s + 1]}")
        return list(hr_patches), list(hr_index)
    _check_list("highres", highres, [(3, s, s) for s in p.scales[1:]])
    if gt_maps is not None:
        probs = apply_gt_override(probs, gt_maps)
    index = select_topk(probs, list(p.budgets))
    return [gather_patches(img, idx, p.patch_size) for img, idx in zip(highres, index)], index


def _inbox_mask(gt_maps: list[torch.Tensor] | None, index: list[torch.Tensor]) -> torch.Tensor | None:
    """In-box pooling mask [B, K]: the ground-truth map read at the encoded cells."""
    if gt_maps is None:
        return None
    return torch.cat([g.flatten(1).gather(1, idx) > 0 for g, idx in zip(gt_maps, index)], dim=1)


def vision_pretrain_forward(enc: PS3VisionEncoder, *, lowres: torch.Tensor, selection_view: torch.Tensor,
                            is_global: torch.Tensor, gt_maps: list[torch.Tensor] | None = None,
                            prompt: torch.Tensor | None = None, highres: list[torch.Tensor] | None = None,
                            hr_index: list[torch.Tensor] | None = None,
                            hr_patches: list[torch.Tensor] | None = None) -> PretrainVisionOutput:
    """One pre-training look: bottom-up and top-down maps, teacher-forced selection, in-box pooling.

    With full images, the cells are the top-k of the top-down map (bottom-up without a
    prompt) after the ground-truth override; with ``hr_index`` the loader chose them.
    Global samples get the low-res pooled feature (the high-res pass still runs for them,
    which keeps the batch rectangular).
    """
    p = enc.preset
    b = lowres.shape[0]
    if gt_maps is not None:
        _check_list("gt_maps", gt_maps, [(g, g) for g in p.grids[1:]])
    low = enc.encode_lowres(lowres)
    feats = enc.selection_features(low, selection_view)
    bottomup = enc.selection_probs(feats, None)
    topdown = enc.selection_probs(feats, prompt) if prompt is not None else None
    patches, index = _highres_patches(enc, topdown or bottomup, gt_maps, highres, hr_index, hr_patches)
    tokens = enc.encode_highres(enc.embed_selected(patches, index), low)  # [B, K, D]
    hr_pooled = enc.trunk.pool(tokens, _inbox_mask(gt_maps, index))  # [B, D]
    glob = is_global.reshape(b, 1).bool()
    pooled = torch.where(glob, low.pooled.to(hr_pooled.dtype), hr_pooled)
    return PretrainVisionOutput(pooled, low.pooled, bottomup, topdown, index)


@dataclass
class PS3ImageOutput:
    """Inference output; token order is low-res, then high-res by scale and raster position."""

    lowres_pooled: torch.Tensor  # [B, D]
    pooled: torch.Tensor  # [B, D] MAP over every selected high-res token (low-res pooled if none)
    tokens: torch.Tensor  # [B, N0 + K_total, D] block outputs before the final norm
    selection_maps: list[torch.Tensor] = field(default_factory=list)  # per scale bool [B, G, G], union of looks
    selection_probs: list[torch.Tensor] = field(default_factory=list)  # per scale [B, G, G]
    feature_maps: list[torch.Tensor] = field(default_factory=list)  # per scale [B, D, G, G]; zeros where unselected


def count_looks(enc: PS3VisionEncoder, num_look_close: int | str | None, num_token_look_close: int | None,
                per_look: int | None = None) -> list[int | None]:
    """Token count of each look (None = a full look of ``per_look``, default ``max_select_num``)."""
    p = enc.preset
    per_look = per_look or p.max_select_num
    most = math.ceil(p.max_highres_tokens / per_look)
    if num_token_look_close is not None:
        n = min(int(num_token_look_close), p.max_highres_tokens)
        looks = math.ceil(n / per_look)
        last = n % per_look
        return [None] * (looks - 1) + [last or None] if looks else []
    if num_look_close == "all":
        return [None] * most
    if not isinstance(num_look_close, int) or num_look_close < 0:
        raise PS3InputError(f"num_look_close must be a non-negative int or 'all', got {num_look_close!r}")
    return [None] * min(num_look_close, most)


def _merge_looks(parts_idx: list[torch.Tensor], parts_tok: list[torch.Tensor], grid: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One scale's looks -> (tokens in raster order [B, K, D], feature map [B, D, G, G], selection map [B, G, G])."""
    idx = torch.cat(parts_idx, dim=1)  # [B, K]
    tok = torch.cat(parts_tok, dim=1)  # [B, K, D]
    order = idx.argsort(dim=1)
    idx = idx.gather(1, order)
    tok = tok.gather(1, order[..., None].expand_as(tok))
    b, _, d = tok.shape
    canvas = tok.new_zeros(b, grid * grid, d).scatter(1, idx[..., None].expand_as(tok), tok)
    return tok, canvas.transpose(1, 2).reshape(b, d, grid, grid), index_to_map(idx, grid * grid).reshape(b, grid, grid)


def _prepare_views(enc: PS3VisionEncoder, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Squash-resize one image to the low-res, selection and high-res views."""
    p = enc.preset
    if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        raise PS3InputError(f"pixel_values must be [B, 3, H, W], got {list(pixel_values.shape)}")
    h, w = pixel_values.shape[-2:]
    if min(h, w) < p.scales[0]:
        raise PS3InputError(f"image {h}x{w} is smaller than the lowest scale {p.scales[0]} of preset {p.name}; upscale it first")
    views = [resize_square(pixel_values, s) for s in p.scales]
    return views[0], resize_square(pixel_values, p.selection_view_size), views[1:]


def _check_budgets(enc: PS3VisionEncoder, budgets: tuple[int, ...] | None) -> tuple[int, ...]:
    """Per-look budgets per high-res scale: the preset's, or a caller's (e.g. none at 4K)."""
    p = enc.preset
    if budgets is None:
        return p.budgets
    budgets = tuple(int(b) for b in budgets)
    if len(budgets) != p.num_highres_scales or min(budgets) < 0 or sum(budgets) == 0:
        raise PS3InputError(f"scale_budgets must be {p.num_highres_scales} non-negative ints with a positive sum "
                            f"(one per high-res scale {list(p.scales[1:])}), got {list(budgets)}")
    return budgets


def run_looks(enc: PS3VisionEncoder, low: LowRes, probs: list[torch.Tensor], highres: list[torch.Tensor],
               looks: list[int | None], budgets: tuple[int, ...]) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Each look takes new cells (never re-encoding earlier ones) against the same low-res K/V."""
    p = enc.preset
    b = low.pooled.shape[0]
    cells = [g * g for g in p.grids[1:]]
    taken = [torch.zeros(b, n, dtype=torch.bool, device=low.pooled.device) for n in cells]
    idx_parts: list[list[torch.Tensor]] = [[] for _ in cells]
    tok_parts: list[list[torch.Tensor]] = [[] for _ in cells]
    used = [0] * len(cells)  # batch-uniform: every sample takes the same counts per look
    for n_tokens in looks:
        counts = look_budgets(budgets, [n - u for n, u in zip(cells, used)], n_tokens)
        used = [u + c for u, c in zip(used, counts)]
        index = select_topk(probs, counts, taken)
        patches = [gather_patches(img, idx, p.patch_size) for img, idx in zip(highres, index)]
        out = enc.encode_highres(enc.embed_selected(patches, index), low)  # [B, K, D]
        for s, part in enumerate(out.split(counts, dim=1)):
            idx_parts[s].append(index[s])
            tok_parts[s].append(part)
            taken[s].scatter_(1, index[s], True)
    return idx_parts, tok_parts


@torch.no_grad()
def encode_image_multilook(enc: PS3VisionEncoder, pixel_values: torch.Tensor, *, prompt: torch.Tensor | None = None,
                           num_look_close: int | str = 1, num_token_look_close: int | None = None,
                           scale_budgets: tuple[int, ...] | None = None) -> PS3ImageOutput:
    """Inference: encode low-res, select top-down (prompt) or bottom-up, then one or more looks.

    ``num_look_close``: int (clamped to the looks needed to cover everything), ``'all'``,
    or 0 for the low-res result only; ``num_token_look_close`` instead gives a token count.
    ``scale_budgets`` replaces the per-look tokens per scale (e.g. ``(2048, 8192, 0)``: no
    4K patches, as VILA-HD does for smaller images); a scale that runs out of free cells
    passes its surplus to the next one.
    """
    p = enc.preset
    budgets = _check_budgets(enc, scale_budgets)
    lowres, view, highres = _prepare_views(enc, pixel_values)
    low = enc.encode_lowres(lowres)
    probs = enc.selection_probs(enc.selection_features(low, view), prompt)
    looks = count_looks(enc, num_look_close, num_token_look_close, sum(budgets))
    if not looks:
        return PS3ImageOutput(low.pooled, low.pooled, low.tokens, [], probs, [])
    idx_parts, tok_parts = run_looks(enc, low, probs, highres, looks, budgets)
    toks, maps, sel = zip(*(_merge_looks(i, t, g) for i, t, g in zip(idx_parts, tok_parts, p.grids[1:])))
    hr = torch.cat(toks, dim=1)
    pooled = enc.trunk.pool(hr) if hr.shape[1] else low.pooled
    return PS3ImageOutput(low.pooled, pooled, torch.cat([low.tokens, hr], dim=1), list(sel), probs, list(maps))
