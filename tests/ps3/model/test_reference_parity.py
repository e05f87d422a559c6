"""Opt-in parity with the released NVlabs/PS3 code: same weights, same inputs, same numbers.

Skipped unless ``PS3_REFERENCE_SRC`` names a checkout of NVlabs/PS3 (the directory holding
its ``ps3/`` package) and its dependencies (timm==1.0.15, transformers<=4.57, einops, ftfy)
are importable, e.g.::

    pip install --target /tmp/refdeps timm==1.0.15 transformers==4.56.2 tokenizers==0.22.1 \
        "huggingface_hub<1.0" einops ftfy wcwidth --no-deps
    PS3_REFERENCE_SRC=/path/to/PS3 PYTHONPATH=/tmp/refdeps pytest tests/ps3/model/test_reference_parity.py

The released package is copied under another name (``ps3_released``) because ours is ``ps3``.
Our export is loaded by the released ``PS3Model.from_pretrained`` (which also checks the
layout), and the released ``save_pretrained`` output is loaded by ``load_ps3_checkpoint``.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

from ps3.model import PS3Model, export_ps3_checkpoint, get_preset, load_ps3_checkpoint
from ps3.model.forward import vision_pretrain_forward
from ps3.model.vision import resize_square

SRC = os.environ.get("PS3_REFERENCE_SRC")
pytestmark = pytest.mark.skipif(not SRC, reason="set PS3_REFERENCE_SRC to a NVlabs/PS3 checkout to compare")


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    shutil.copytree(os.path.join(SRC, "ps3"), root / "ps3_released")
    sys.path.insert(0, str(root))
    try:
        timm = importlib.import_module("timm")
        ref = importlib.import_module("ps3_released")
    except Exception as exc:
        pytest.skip(f"released PS3 code not importable here: {exc}")
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    if "ps3_custom_vit" not in timm.list_models("ps3_custom_vit"):
        @register_model
        def ps3_custom_vit(pretrained=False, **kwargs):  # our ps3-tiny trunk, for the released loader
            args = dict(patch_size=8, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, class_token=False, global_pool="map")
            return _create_vision_transformer("ps3_custom_vit", pretrained=pretrained, **dict(args, **kwargs))
    return ref


@pytest.fixture(scope="module")
def pair(released, tmp_path_factory):
    torch.manual_seed(0)
    # the released ConvNeXt branch always sees a 1512 view with a 28-pixel stem
    ours = PS3Model(get_preset("ps3-tiny", selection_view_size=1512, sel_kernel_size=28)).eval()
    with torch.no_grad():
        for p in ours.vision_model.pos_emb_residual:
            p.normal_(0, 0.1)
        for block in ours.vision_model.highres_selection_feature_module.blocks:
            block.weight.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("ckpt") / "ours"
    export_ps3_checkpoint(ours, str(path))
    ref = released.PS3Model.from_pretrained(str(path)).eval()
    return ours, ref


def _close(a, b, tol=1e-5):
    return (a.float() - b.float()).abs().max().item() < tol


@torch.no_grad()
def test_export_loads_into_released_code_with_identical_tensors(pair):
    ours, ref = pair
    theirs = ref.state_dict()
    assert set(theirs) == set(ours.state_dict()) - {"logit_scale", "logit_bias"}
    assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items() if k in theirs)


@torch.no_grad()
@pytest.mark.parametrize("kw", [dict(num_look_close=1), dict(num_look_close="all"), dict(num_token_look_close=100)])
def test_inference_matches_released(pair, kw):
    ours, ref = pair
    img = torch.randn(2, 3, 256, 256)
    a, b = ours.encode_image(img, **kw), ref.encode_image(img, **kw)
    assert _close(a.tokens, b.last_hidden_state)
    assert all(torch.equal(x, y.bool()) for x, y in zip(a.selection_maps, b.selection_maps))


@torch.no_grad()
def test_text_and_top_down_selection_match_released(pair):
    ours, ref = pair
    tokens = torch.randint(0, 1000, (2, 16))
    out = ref.text_model(tokens)
    assert _close(ours.text_model(tokens), out.pooled_output) and _close(ours.text_prompt(tokens), out.prompt)
    img = torch.randn(2, 3, 256, 256)
    a, b = ours.encode_image(img, prompt=out.prompt), ref.encode_image(img, num_look_close=1, prompt=out.prompt)
    assert _close(a.tokens, b.last_hidden_state)


@torch.no_grad()
def test_training_forward_matches_released(pair):
    ours, ref = pair
    img, prompt = torch.randn(2, 3, 256, 256), torch.randn(2, 64)
    gt = torch.zeros(2, 256, 256)
    gt[:, 64:128, 32:96] = 1
    gt[0] = 1
    is_global = torch.tensor([[True], [False]])
    b = ref.vision_model(img, prompt=prompt, gt_selection_maps=gt, is_global_text=is_global, pool_gt_token_only=True)
    maps = [F.interpolate(gt[:, None], size=(g, g), mode="area")[:, 0] for g in ours.preset.grids[1:]]
    a = vision_pretrain_forward(ours.vision_model, lowres=resize_square(img, 64), selection_view=resize_square(img, 1512),
                                is_global=is_global[:, 0], gt_maps=maps, prompt=prompt, highres=[resize_square(img, 128), img])
    assert _close(a.pooled, b.pooled_output)
    assert all(_close(x, y) for x, y in zip(a.bottomup_probs, b.bottomup_selection_probs))
    assert all(_close(x, y) for x, y in zip(a.topdown_probs, b.topdown_selection_probs))


@torch.no_grad()
def test_released_save_loads_into_ours(pair, tmp_path):
    import json

    ours, ref = pair
    ref.save_pretrained(tmp_path, safe_serialization=True)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("ps3_platform_preset", None)  # rebuild from the released fields (+ our trunk_config)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    back = load_ps3_checkpoint(str(tmp_path)).eval()
    img = torch.randn(1, 3, 256, 256)
    assert _close(back.encode_image(img).tokens, ref.encode_image(img, num_look_close=1).last_hidden_state)
