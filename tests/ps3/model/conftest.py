"""Shared builders for the PS3 model tests: tiny models and synthetic contract batches."""

from __future__ import annotations

import pytest
import torch

from ps3.model import PS3Model, get_preset


def make_batch(preset, batch: int = 3, *, form: str = "full", seed: int = 0, n_global: int = 1) -> dict:
    """A contract batch with a box in the middle of every local sample."""
    g = torch.Generator().manual_seed(seed)
    p = preset
    gt = []
    for grid in p.grids[1:]:
        m = torch.zeros(batch, grid, grid)
        lo, hi = grid // 4, grid // 2
        m[:, lo:hi, lo:hi] = 1.0
        m[:n_global] = 1.0  # global samples: the whole image is the "box"
        gt.append(m)
    b = dict(
        lowres=torch.randn(batch, 3, p.scales[0], p.scales[0], generator=g),
        selection_view=torch.randn(batch, 3, p.selection_view_size, p.selection_view_size, generator=g),
        gt_maps=gt,
        tokens=torch.randint(0, p.text_vocab_size, (batch, p.text_context_length), generator=g),
        is_global=torch.arange(batch) < n_global,
    )
    highres = [torch.randn(batch, 3, s, s, generator=g) for s in p.scales[1:]]
    if form == "full":
        b["highres"] = highres
    else:  # pre-gathered: in-box cells first, then any others (the loader's business)
        from ps3.model.trunk import gather_patches
        idx = [m.flatten(1).argsort(dim=1, descending=True, stable=True)[:, :k].sort(1).values
               for m, k in zip(gt, p.budgets)]
        b["hr_index"] = idx
        b["hr_patches"] = [gather_patches(img, i, p.patch_size) for img, i in zip(highres, idx)]
        b["_highres"] = highres
    return b


@pytest.fixture
def tiny_preset():
    return get_preset("ps3-tiny")


@pytest.fixture
def tiny_model(tiny_preset):
    torch.manual_seed(0)
    return PS3Model(tiny_preset).eval()
