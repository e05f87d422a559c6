"""`lowres_pretrain`: the towers learn from low-res pairs, the selection modules do not move,
and `ps3_pretrain` starts from the stage's committed checkpoint (the quickstart runs both)."""

from __future__ import annotations

import torch

from ps3.losses import sigmoid_loss
from ps3.model import PS3Model
from ps3.tasks.lowres_pretrain import freeze_selection


def test_a_low_res_batch_trains_the_towers_and_nothing_of_selection():
    torch.manual_seed(0)
    model = PS3Model("ps3-tiny")
    freeze_selection(model)
    p = model.preset
    batch = {"lowres": torch.randn(4, 3, p.scales[0], p.scales[0]),
             "tokens": torch.randint(0, p.text_vocab_size, (4, p.text_context_length))}
    out = model(batch)  # no selection view: the low-res contrastive forward
    assert out.image_features.shape == (4, p.embed_dim) and out.topdown_probs == []
    sigmoid_loss(out.image_features, out.text_features, out.logit_scale, out.logit_bias).backward()
    trained = {n for n, q in model.named_parameters() if q.requires_grad}
    assert trained and all(model.get_parameter(n).grad is not None for n in trained)  # DDP: none unused
    assert all(n.startswith(("vision_model.trunk.", "text_model.", "logit_")) for n in trained)
    frozen = {n for n, _ in model.named_parameters()} - trained
    assert {"vision_model.prior_prompt", "text_model.prompt_proj.fc1.weight"} <= frozen
    assert any(n.startswith("vision_model.highres_selection_feature_module.") for n in frozen)
