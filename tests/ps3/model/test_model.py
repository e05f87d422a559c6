"""PS3Model end to end: losses wire up, selection learns from box supervision only, a few steps learn."""

from __future__ import annotations

import torch

from ps3.losses import box_supervision_loss, sigmoid_loss
from ps3.model import PS3Model, clamp_logit_scale_

from .conftest import make_batch

SELECTION = ("vision_model.selection_feature_proj.", "vision_model.prior_prompt", "vision_model.prompt_proj_for_highres.",
             "vision_model.highres_selection_feature_module.")


def _losses(model, batch):
    out = model(batch)
    contrastive = sigmoid_loss(out.image_features, out.text_features, out.logit_scale, out.logit_bias)
    box = box_supervision_loss(out.topdown_probs, out.bottomup_probs, batch["gt_maps"], batch["is_global"])
    return contrastive, box["loss"]


def test_box_loss_trains_selection_and_contrastive_loss_does_not(tiny_model, tiny_preset):
    batch = make_batch(tiny_preset, 3)
    contrastive, box = _losses(tiny_model, batch)
    contrastive.backward(retain_graph=True)
    grads = {n: p.grad for n, p in tiny_model.named_parameters()}
    assert all(grads[n] is None for n in grads if n.startswith(SELECTION))
    assert grads["logit_scale"] is not None and grads["vision_model.trunk.blocks.0.attn.qkv.weight"] is not None
    tiny_model.zero_grad()
    box.backward()
    for prefix in SELECTION:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in tiny_model.named_parameters() if n.startswith(prefix)), prefix
    assert tiny_model.text_model.prompt_proj.fc2.weight.grad.abs().sum() > 0  # top-down prompt head learns too


def test_a_few_steps_reduce_both_losses(tiny_preset):
    torch.manual_seed(0)
    model = PS3Model(tiny_preset)
    batch = make_batch(tiny_preset, 4, n_global=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(12):
        contrastive, box = _losses(model, batch)
        if first is None:
            first = (contrastive.item(), box.item())
        opt.zero_grad()
        (contrastive + box).backward()
        opt.step()
        clamp_logit_scale_(model)
    contrastive, box = _losses(model, batch)
    assert contrastive.item() < first[0] and box.item() < first[1]


def test_encode_text_is_normalised_and_prompt_has_vision_width(tiny_model, tiny_preset):
    tokens = make_batch(tiny_preset, 2)["tokens"]
    assert torch.allclose(tiny_model.encode_text(tokens).norm(dim=-1), torch.ones(2))
    assert tiny_model.text_prompt(tokens).shape == (2, tiny_preset.width)


def test_blocks_are_the_fsdp_units(tiny_model, tiny_preset):
    assert len(tiny_model.blocks()) == tiny_preset.depth + tiny_preset.text_depth
