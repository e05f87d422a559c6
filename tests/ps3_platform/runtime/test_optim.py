"""Optimizer groups: weight decay on weight matrices only, as open_clip and the PS3 reference train."""

from __future__ import annotations

import pytest

from ps3.model import PS3Model
from ps3_platform.runtime.optim import build_optimizer, param_groups
from ps3_platform.spec.models import Train


def _exempt(model) -> set[str]:
    groups = param_groups(model.named_parameters(), model.no_weight_decay_keys)
    exempt = {id(p) for p in groups[1]["params"]}
    return {name for name, p in model.named_parameters() if id(p) in exempt}


def test_ps3_norms_biases_scalars_and_embeddings_take_no_weight_decay():
    model = PS3Model("ps3-tiny")
    exempt = _exempt(model)
    for name in ("logit_scale", "logit_bias", "vision_model.prior_prompt", "vision_model.trunk.pos_embed",
                 "vision_model.pos_emb_residual.0", "vision_model.trunk.attn_pool.latent",
                 "text_model.positional_embedding", "text_model.token_embedding.weight",
                 "vision_model.trunk.patch_embed.proj.bias", "text_model.prompt_proj.norm.weight"):
        assert name in exempt, name
    for name in ("vision_model.trunk.patch_embed.proj.weight", "text_model.prompt_proj.fc1.weight",
                 "vision_model.trunk.blocks.0.attn.qkv.weight"):
        assert name not in exempt, name
    assert all(p.ndim >= 2 for name, p in model.named_parameters() if name not in exempt)


def test_groups_carry_their_decay_and_frozen_parameters_are_left_out():
    model = PS3Model("ps3-tiny")
    model.text_model.requires_grad_(False)
    optimizer = build_optimizer(param_groups(model.named_parameters(), model.no_weight_decay_keys),
                                Train.model_validate({"optimizer": {"lr": 1e-3, "weightDecay": 0.1}}))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    listed = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert listed == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("name,exempt", [("mm_projector.high_res_pos_embed", True),
                                         ("llm.model.embed_tokens.weight", True),
                                         ("mm_projector.mlp.fc1.weight", False)])
def test_vila_hd_embeddings_take_no_weight_decay(tiny_vila_hd, name, exempt):
    model, _, _ = tiny_vila_hd
    assert (name in _exempt(model)) == exempt
