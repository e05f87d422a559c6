"""Weights: HF SiglipModel init, released PS3 layout load/export, architecture fidelity, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ps3.model import CheckpointError, PS3Model, get_preset
from ps3.model.siglip_hf import PS3_ONLY_PREFIXES, load_siglip_hf
from ps3.model.weights import (
    export_ps3_checkpoint,
    load_ps3_checkpoint,
    preset_from_ps3_config,
)

from .conftest import make_batch

transformers = pytest.importorskip("transformers")

TANH = dict(gelu_approximate="tanh", text_gelu_approximate="tanh")


def _hf_siglip(tmp_path, width=64, heads=4):
    cfg = transformers.SiglipConfig(
        text_config=dict(vocab_size=1000, hidden_size=width, num_hidden_layers=2, num_attention_heads=heads,
                         intermediate_size=128, max_position_embeddings=16),
        vision_config=dict(hidden_size=width, num_hidden_layers=4, num_attention_heads=heads, intermediate_size=128,
                           image_size=64, patch_size=8),
    )
    torch.manual_seed(1)
    hf = transformers.SiglipModel(cfg).eval()
    with torch.no_grad():  # non-trivial values for everything, so a mix-up cannot hide
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    out = tmp_path / "siglip"
    hf.save_pretrained(out, safe_serialization=True)
    return hf, out


def test_hf_siglip_weights_give_the_same_features(tmp_path):
    hf, path = _hf_siglip(tmp_path)
    model = load_siglip_hf(PS3Model("ps3-tiny", **TANH).eval(), str(path))
    pixels = torch.randn(2, 3, 64, 64)
    tokens = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        ref_v = hf.vision_model(pixel_values=pixels)
        ref_t = hf.text_model(input_ids=tokens)
        low = model.vision_model.encode_lowres(pixels)
        text = model.text_model(tokens)
    assert torch.allclose(low.pooled, ref_v.pooler_output, atol=1e-5)
    assert torch.allclose(model.vision_model.trunk.norm(low.tokens), ref_v.last_hidden_state, atol=1e-5)
    assert torch.allclose(text, ref_t.pooler_output, atol=1e-5)
    assert torch.allclose(model.logit_scale, hf.logit_scale) and torch.allclose(model.logit_bias, hf.logit_bias)


def test_hf_load_keeps_only_ps3_modules_at_init(tmp_path):
    _, path = _hf_siglip(tmp_path)
    torch.manual_seed(0)
    fresh = PS3Model("ps3-tiny", **TANH)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    load_siglip_hf(fresh, str(path))
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, before[k]) == k.startswith(PS3_ONLY_PREFIXES), k


def test_hf_missing_tensor_is_named(tmp_path):
    _, path = _hf_siglip(tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["vision_model.encoder.layers.2.self_attn.k_proj.bias"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing \['vision_model.encoder.layers.2.self_attn.k_proj.bias'\]"):
        load_siglip_hf(PS3Model("ps3-tiny", **TANH), str(path))


def test_hf_unexpected_tensor_is_named(tmp_path):
    _, path = _hf_siglip(tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["vision_model.encoder.layers.99.mlp.fc1.weight"] = torch.zeros(2, 2)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected \['vision_model.encoder.layers.99.mlp.fc1.weight'\]"):
        load_siglip_hf(PS3Model("ps3-tiny", **TANH), str(path))


def test_hf_wrong_shapes_and_heads_are_clear_errors(tmp_path):
    _, path = _hf_siglip(tmp_path, width=32, heads=4)
    with pytest.raises(CheckpointError, match=r"wrong shapes: .*checkpoint \(32"):
        load_siglip_hf(PS3Model("ps3-tiny", **TANH), str(path))
    _, path = _hf_siglip(tmp_path / "b", width=64, heads=2)
    with pytest.raises(CheckpointError, match="vision heads: checkpoint 2 vs preset 4"):
        load_siglip_hf(PS3Model("ps3-tiny", **TANH), str(path))


def test_hf_gelu_flavour_must_match_unless_allowed(tmp_path):
    _, path = _hf_siglip(tmp_path)
    with pytest.raises(CheckpointError, match="gelu_approximate"):
        load_siglip_hf(PS3Model("ps3-tiny"), str(path))
    load_siglip_hf(PS3Model("ps3-tiny"), str(path), allow_gelu_mismatch=True)


def test_ps3_export_load_round_trip_is_exact(tmp_path, tiny_preset):
    torch.manual_seed(0)
    model = PS3Model(tiny_preset).eval()
    with torch.no_grad():
        for p in model.vision_model.pos_emb_residual:
            p.normal_()
    export_ps3_checkpoint(model, str(tmp_path / "ckpt"))
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["model_type"] == "ps3" and cfg["vision_config"]["ps3_scales"] == [64, 128, 256]
    assert json.loads((tmp_path / "ckpt" / "preprocessor_config.json").read_text())["image_size"] == [256, 256]
    assert load_file(tmp_path / "ckpt" / "model.safetensors")["logit_scale"].shape == ()  # released layout
    loaded = load_ps3_checkpoint("file://" + str(tmp_path / "ckpt")).eval()
    assert loaded.preset == model.preset
    batch = make_batch(tiny_preset, 2)
    with torch.no_grad():
        a, b = model(batch), loaded(batch)
    assert torch.equal(a.image_features, b.image_features) and torch.equal(a.text_features, b.text_features)


def test_ps3_round_trip_through_an_fsspec_uri_and_without_our_preset_key(tiny_preset):
    torch.manual_seed(0)
    model = PS3Model(tiny_preset)
    export_ps3_checkpoint(model, "memory://ckpts/tiny")
    import fsspec

    fs = fsspec.filesystem("memory")
    cfg = json.loads(fs.cat("/ckpts/tiny/config.json"))
    del cfg["ps3_platform_preset"]  # rebuild from the released-style fields only
    fs.pipe("/ckpts/tiny/config.json", json.dumps(cfg).encode())
    loaded = load_ps3_checkpoint("memory://ckpts/tiny")
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert loaded.preset.budgets == tiny_preset.budgets


RELEASED_4K = {
    "architectures": ["PS3Model"], "model_type": "ps3",
    "vision_config": {"model_name": "vit_so400m_patch14_siglip_384", "hidden_size": 1152, "pool": "map", "ps3": True,
                      "ps3_scales": [378, 756, 1512, 3780], "select_based_on_layer": [0, 9, 18, 26], "min_select_num": 1,
                      "max_select_num": 2560, "separate_pos_emb": True, "highres_selection_feature": True},
    "text_config": {"context_length": 64, "vocab_size": 32000, "width": 1152, "heads": 16, "layers": 27,
                    "mlp_ratio": 3.7362, "no_causal_mask": True, "proj_bias": True, "pool_type": "last",
                    "norm_kwargs": {"eps": 1e-6}, "output_dim": 1152, "prompt_proj_dim": 1152},
}


def _count(model, prefix):
    return sum(v.numel() for k, v in model.state_dict().items() if k.startswith(prefix))


def test_released_4k_config_rebuilds_the_released_architecture():
    preset = preset_from_ps3_config(RELEASED_4K)
    assert preset.replace(name="ps3-4k-siglip") == get_preset("ps3-4k-siglip")
    with torch.device("meta"):
        model = PS3Model(preset)
    # parameter counts of the released model (reference digest §1.1, measured on the released code)
    v = "vision_model."
    assert round((_count(model, v + "trunk.") - _count(model, v + "trunk.attn_pool.")) / 1e6, 2) == 412.99
    assert round(_count(model, v + "trunk.attn_pool.") / 1e6, 2) == 15.24
    assert round(_count(model, v + "selection_feature_proj.") / 1e6, 2) == 37.18
    assert round(_count(model, v + "pos_emb_residual.") / 1e6, 2) == 100.78
    assert round(_count(model, v + "highres_selection_feature_module.") / 1e6, 2) == 7.85
    assert round(_count(model, v + "prompt_proj_for_highres.") / 1e6, 2) == 1.77
    assert round(_count(model, v) / 1e6, 1) == 575.8
    assert round(_count(model, "text_model.") / 1e6, 1) == 452.4
    names = set(model.state_dict())
    for key in ("vision_model.trunk.attn_pool.latent", "vision_model.trunk.blocks.26.attn.qkv.weight",
                "vision_model.highres_selection_feature_module.blocks.2.weight",
                "vision_model.highres_selection_feature_module.stem.1.weight", "vision_model.pos_emb_residual.2",
                "text_model.transformer.resblocks.26.attn.in_proj_weight", "text_model.prompt_proj.norm.weight",
                "logit_scale", "logit_bias"):
        assert key in names, key


def test_released_config_without_separate_pos_emb_has_no_residual_tables():
    shared = json.loads(json.dumps(RELEASED_4K))
    shared["vision_config"]["separate_pos_emb"] = False
    preset = preset_from_ps3_config(shared)
    assert preset.separate_pos_emb is False
    with torch.device("meta"):
        model = PS3Model(preset)
    assert _count(model, "vision_model.pos_emb_residual.") == 0


def test_other_architectures_are_clear_errors(tmp_path):
    _, siglip = _hf_siglip(tmp_path)
    with pytest.raises(CheckpointError, match=r"is not a PS3 checkpoint \(model_type 'siglip'; expected 'ps3'"):
        load_ps3_checkpoint(str(siglip))
    export_ps3_checkpoint(PS3Model("ps3-tiny"), str(tmp_path / "ps3"))
    with pytest.raises(CheckpointError, match="is a 'ps3' checkpoint; load_siglip_hf expects"):
        load_siglip_hf(PS3Model("ps3-tiny", **TANH), str(tmp_path / "ps3"))
    radio = json.loads(json.dumps(RELEASED_4K))
    radio["vision_config"]["model_name"] = "radio_v2.5-h"
    with pytest.raises(CheckpointError, match="vision trunk 'radio_v2.5-h' is not a timm ViT named by size and patch"):
        preset_from_ps3_config(radio)
    radio["vision_config"]["model_name"] = "vit_large_patch16_224"  # 1024 wide, the config says 1152
    with pytest.raises(CheckpointError, match="hidden_size 1152 disagrees with the 1024 wide trunk"):
        preset_from_ps3_config(radio)
    radio["vision_config"].update(model_name="vit_so400m_patch16_siglip_256")  # 3780 is no multiple of 16
    with pytest.raises(CheckpointError, match=r"config.json: preset .* are not multiples of patch_size=16"):
        preset_from_ps3_config(radio)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_ps3_checkpoint(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("name, fields, expected", [
    ("vit_large_patch16_siglip_384", {"hidden_size": 1024}, (16, 1024, 24, 16, 4096)),
    ("vit_base_patch16_224", {}, (16, 768, 12, 12, 3072)),
    ("vit_so400m_patch16_siglip_256", {}, (16, 1152, 27, 16, 4304)),
    ("eva02_custom", {"patch_size": 14, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                      "intermediate_size": 512}, (14, 256, 4, 4, 512)),
])
def test_any_timm_vit_trunk_is_built_from_its_name_or_the_configs_fields(name, fields, expected):
    config = json.loads(json.dumps(RELEASED_4K))
    config["vision_config"].pop("hidden_size")
    patch, depth = expected[0], expected[2]
    config["vision_config"].update(model_name=name, **fields, select_based_on_layer=[0, depth // 3, 2 * depth // 3,
                                                                                     depth - 1])
    config["text_config"]["output_dim"] = expected[1]  # the towers meet in the trunk's width
    if patch == 16:  # the scales must be multiples of the patch
        config["vision_config"]["ps3_scales"] = [256, 512, 1024, 2048]
    preset = preset_from_ps3_config(config)
    assert (preset.patch_size, preset.width, preset.depth, preset.heads, preset.mlp_dim) == expected
    with torch.device("meta"):
        PS3Model(preset)  # a model of that shape builds


def test_ps3_checkpoint_with_a_wrong_tensor_is_named(tmp_path, tiny_preset):
    export_ps3_checkpoint(PS3Model(tiny_preset), str(tmp_path / "c"))
    tensors = load_file(tmp_path / "c" / "model.safetensors")
    tensors["vision_model.prior_prompt"] = torch.zeros(7)
    tensors["vision_model.extra"] = torch.zeros(1)
    save_file(tensors, tmp_path / "c" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected: vision_model.extra \| 1 wrong shapes: vision_model.prior_prompt"):
        load_ps3_checkpoint(str(tmp_path / "c"))
