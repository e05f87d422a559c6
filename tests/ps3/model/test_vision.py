"""Vision encoder: the three stages, both contract input forms, looks, pooling, precision, checkpointing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ps3.model import PS3InputError, PS3Model, get_preset
from ps3.model.forward import vision_pretrain_forward
from ps3.model.layers import AttentionPool, KVAttention
from ps3.model.trunk import gather_patches, resample_pos_table

from .conftest import make_batch


def _vision(model, batch, **kw):
    keys = ("lowres", "selection_view", "is_global", "gt_maps", "highres", "hr_index", "hr_patches")
    args = {k: batch[k] for k in keys if k in batch}
    args["prompt"] = model.text_prompt(batch["tokens"])
    args.update(kw)
    return vision_pretrain_forward(model.vision_model, **args)


def test_pretrain_forward_shapes_and_budgets(tiny_model, tiny_preset):
    out = tiny_model(make_batch(tiny_preset, 3))
    assert out.image_features.shape == (3, 64) and out.text_features.shape == (3, 64)
    assert torch.allclose(out.image_features.norm(dim=-1), torch.ones(3))
    assert [t.shape for t in out.topdown_probs] == [(3, 16, 16), (3, 32, 32)]
    assert [t.shape for t in out.bottomup_probs] == [(3, 16, 16), (3, 32, 32)]
    assert [t.shape for t in out.hr_index] == [(3, 16), (3, 64)]


def test_box_cells_are_selected_first(tiny_model, tiny_preset):
    batch = make_batch(tiny_preset, 3, n_global=0)
    out = tiny_model(batch)
    for gt, idx in zip(batch["gt_maps"], out.hr_index):
        inbox = gt.flatten(1).gather(1, idx) > 0
        # box is (grid/4)^2 cells: 16 on scale 1 (budget 16), 64 on scale 2 (budget 64)
        assert inbox.all()


def test_pregathered_form_equals_full_images_for_same_cells(tiny_model, tiny_preset):
    full = make_batch(tiny_preset, 3)
    ref = _vision(tiny_model, full)
    gathered = dict(full)
    highres = gathered.pop("highres")
    gathered["hr_index"] = ref.hr_index
    gathered["hr_patches"] = [gather_patches(img, i, 8) for img, i in zip(highres, ref.hr_index)]
    got = _vision(tiny_model, gathered)
    assert torch.allclose(got.pooled, ref.pooled, atol=1e-6)


def test_global_samples_use_lowres_pooled_feature(tiny_model, tiny_preset):
    out = _vision(tiny_model, make_batch(tiny_preset, 3, n_global=1))
    assert torch.equal(out.pooled[0], out.lowres_pooled[0])
    assert not torch.allclose(out.pooled[1], out.lowres_pooled[1])


def test_batch_samples_are_independent(tiny_model, tiny_preset):
    batch = make_batch(tiny_preset, 3, n_global=0)
    full = _vision(tiny_model, batch).pooled
    one = {k: (v[1:2] if torch.is_tensor(v) else [t[1:2] for t in v]) for k, v in batch.items()}
    assert torch.allclose(_vision(tiny_model, one).pooled[0], full[1], atol=1e-5)


def test_lowres_kv_gives_highres_tokens_global_context_and_gradient(tiny_model, tiny_preset):
    batch = make_batch(tiny_preset, 2, n_global=0)
    batch["lowres"].requires_grad_(True)
    out = _vision(tiny_model, batch)
    grad = torch.autograd.grad(out.pooled.sum(), batch["lowres"])[0]
    assert grad.abs().sum() > 0  # high-res pooled depends on the low-res image only through K/V


def test_selection_gets_no_gradient_from_the_contrastive_path(tiny_model, tiny_preset):
    out = _vision(tiny_model, make_batch(tiny_preset, 2, n_global=0))
    out.pooled.sum().backward()
    assert tiny_model.vision_model.prior_prompt.grad is None
    assert tiny_model.vision_model.selection_feature_proj.fc2.weight.grad is None


def test_kv_attention_matches_manual_softmax():
    torch.manual_seed(0)
    attn = KVAttention(16, 2)
    x, pk, pv = torch.randn(2, 5, 16), torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8)
    out, (k, v) = attn(x, (pk, pv))
    q = attn.qkv(x).reshape(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)[0]
    keys, vals = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    ref = torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(8), -1) @ vals
    assert torch.allclose(out, attn.proj(ref.transpose(1, 2).reshape(2, 5, 16)), atol=1e-5)


def test_masked_pooling_ignores_out_of_box_tokens_and_empty_mask_pools_all():
    torch.manual_seed(0)
    pool = AttentionPool(16, 2, 32, eps=1e-6, approximate="none")
    x = torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    y = x.clone()
    y[0, 2:] += 5.0
    assert torch.allclose(pool(x, mask)[0], pool(y, mask)[0], atol=1e-6)
    assert torch.allclose(pool(x, mask)[1], pool(x)[1], atol=1e-6)
    assert mask[1].sum() == 0  # the caller's mask is not modified in place


def test_selected_patch_embedding_equals_whole_image_embedding(tiny_model):
    vis = tiny_model.vision_model
    with torch.no_grad():
        vis.pos_emb_residual[1].normal_()
    img = torch.randn(2, 3, 256, 256)
    idx = torch.arange(32 * 32).expand(2, -1)
    got = vis.embed_selected([gather_patches(torch.zeros(2, 3, 128, 128), idx[:, :0], 8), gather_patches(img, idx, 8)],
                             [idx[:, :0], idx])
    ref = vis.trunk.embed_image(img) + vis.pos_emb_residual[1]
    assert torch.allclose(got, ref, atol=1e-5)


def test_pos_table_resample_is_identity_at_own_grid_and_bicubic_otherwise():
    t = torch.randn(1, 16, 8)
    assert resample_pos_table(t, 4) is t
    up = resample_pos_table(t, 8)
    ref = F.interpolate(t.reshape(1, 4, 4, 8).permute(0, 3, 1, 2), size=(8, 8), mode="bicubic", antialias=True)
    assert torch.allclose(up, ref.permute(0, 2, 3, 1).reshape(1, 64, 8))


def test_bottom_up_uses_learned_prior_prompt(tiny_model, tiny_preset):
    vis = tiny_model.vision_model
    batch = make_batch(tiny_preset, 2)
    feats = vis.selection_features(vis.encode_lowres(batch["lowres"]), batch["selection_view"])
    bu = vis.selection_probs(feats, None)
    same = vis.selection_probs(feats, vis.prior_prompt[None].expand(2, -1))
    assert all(torch.equal(a, b) for a, b in zip(bu, same))


def test_looks_cover_new_cells_and_order_tokens(tiny_model):
    img = torch.randn(2, 3, 256, 256)
    one = tiny_model.encode_image(img)
    assert one.tokens.shape == (2, 64 + 80, 64)
    assert [int(m[0].sum()) for m in one.selection_maps] == [16, 64]
    alls = tiny_model.encode_image(img, num_look_close="all")  # ceil(1280 / 80) = 16 looks
    assert alls.tokens.shape == (2, 64 + 256 + 1024, 64)
    assert all(m.all() for m in alls.selection_maps)
    part = tiny_model.encode_image(img, num_token_look_close=100)  # a full look + 20 tokens
    assert part.tokens.shape == (2, 164, 64)
    assert [int(m[0].sum()) for m in part.selection_maps] == [16 + 4, 64 + 16]
    # feature maps are zero exactly where nothing was selected
    fm, sel = part.feature_maps[1], part.selection_maps[1]
    assert (fm.abs().sum(1) > 0).eq(sel).all()
    low = tiny_model.encode_image(img, num_look_close=0)
    assert low.tokens.shape == (2, 64, 64) and torch.equal(low.pooled, low.lowres_pooled)


def test_first_look_tokens_match_pretrain_path_without_gt(tiny_model):
    """Multi-look inference and the pre-training forward share the high-res code path."""
    img = torch.randn(1, 3, 256, 256)
    out = tiny_model.encode_image(img)
    vis = tiny_model.vision_model
    from ps3.model.vision import resize_square
    pre = vision_pretrain_forward(vis, lowres=resize_square(img, 64), selection_view=img, is_global=torch.tensor([False]),
                                  highres=[resize_square(img, 128), img])
    assert torch.allclose(vis.trunk.pool(out.tokens[:, 64:]), pre.pooled, atol=1e-5)


def test_non_square_images_are_squash_resized(tiny_model):
    img = torch.randn(1, 3, 300, 200)
    from ps3.model.vision import resize_square
    a = tiny_model.encode_image(img)
    b = tiny_model.encode_image(resize_square(img, 256))
    # 256 view of a squashed image == squash straight to 256; the other views resize from different sources
    assert a.tokens.shape == b.tokens.shape
    assert torch.allclose(a.lowres_pooled, tiny_model.encode_image(resize_square(img, 64).expand(1, 3, 64, 64)).lowres_pooled)


def test_image_smaller_than_lowest_scale_is_a_clear_error(tiny_model):
    with pytest.raises(PS3InputError, match="smaller than the lowest scale 64"):
        tiny_model.encode_image(torch.randn(1, 3, 48, 300))


def test_prompt_of_wrong_width_is_a_clear_error(tiny_model, tiny_preset):
    with pytest.raises(PS3InputError, match=r"prompt must be \[B=1, 64\]"):
        tiny_model.encode_image(torch.randn(1, 3, 256, 256), prompt=torch.randn(1, 32))
    with pytest.raises(PS3InputError, match="prompt"):
        _vision(tiny_model, make_batch(tiny_preset, 2), prompt=torch.randn(2, 65))


def test_empty_box_pools_all_tokens_without_nan(tiny_model, tiny_preset):
    batch = make_batch(tiny_preset, 2, n_global=0)
    for m in batch["gt_maps"]:
        m[0] = 0
    out = tiny_model(batch)
    assert torch.isfinite(out.image_features).all()


@pytest.mark.parametrize("mutate, msg", [
    (lambda b: b.update(lowres=torch.randn(2, 3, 60, 60)), r"lowres must be \[B, 3, 64, 64\]"),
    (lambda b: b.update(selection_view=torch.randn(2, 3, 128, 128)), "selection_view"),
    (lambda b: b["highres"].pop(), "highres must be a list of 2"),
    (lambda b: b.update(hr_index=[torch.zeros(2, 16, dtype=torch.long)] * 2), "exactly one high-res input form"),
    (lambda b: b["gt_maps"].__setitem__(0, torch.zeros(2, 8, 8)), r"gt_maps\[0\] must be \[B, 16, 16\]"),
    (lambda b: b.update(tokens=torch.zeros(2, 5, dtype=torch.long)), r"tokens must be \[B, 16\]"),
    (lambda b: b.update(tokens=torch.full((2, 16), 5000)), "token ids must lie in"),
])
def test_bad_batches_name_the_field(tiny_model, tiny_preset, mutate, msg):
    batch = make_batch(tiny_preset, 2)
    mutate(batch)
    with pytest.raises(PS3InputError, match=msg):
        tiny_model(batch)


def test_bad_hr_index_is_a_clear_error(tiny_model, tiny_preset):
    batch = make_batch(tiny_preset, 2, form="gathered")
    batch["hr_index"][1] = batch["hr_index"][1] + 5000
    with pytest.raises(PS3InputError, match=r"hr_index\[1\] must be long cell indices in \[0, 1024\)"):
        tiny_model(batch)


def test_bf16_autocast_and_checkpointing_match_reference_gradients(tiny_preset):
    torch.manual_seed(0)
    model = PS3Model(tiny_preset)
    batch = make_batch(tiny_preset, 2)

    def grads(m):
        m.zero_grad()
        out = m(batch)
        (out.image_features @ out.text_features.T).sum().add(sum(p.sum() for p in out.topdown_probs)).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    ref = grads(model)
    model.set_grad_checkpointing(True)
    ck = grads(model)
    assert ref.keys() == ck.keys()
    assert all(torch.allclose(ref[n], ck[n], atol=1e-5) for n in ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
        assert out.image_features.dtype == torch.bfloat16
    (out.image_features.float().sum() + sum(p.float().sum() for p in out.bottomup_probs)).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_4scale_tiny_preset_runs(tiny_preset):
    p = get_preset("ps3-tiny-4s")
    torch.manual_seed(0)
    out = PS3Model(p)(make_batch(p, 2, form="gathered"))
    assert [t.shape[1] for t in out.hr_index] == list(p.budgets)


def test_custom_scale_budgets_per_look(tiny_model):
    img = torch.randn(1, 3, 256, 256)
    out = tiny_model.encode_image(img, scale_budgets=(40, 0))
    assert [int(m.sum()) for m in out.selection_maps] == [40, 0]
    two = tiny_model.encode_image(img, num_look_close=2, scale_budgets=(200, 0))  # 256 cells: the rest spills over
    assert [int(m.sum()) for m in two.selection_maps] == [256, 144]
    with pytest.raises(PS3InputError, match="scale_budgets must be 2 non-negative ints"):
        tiny_model.encode_image(img, scale_budgets=(1, 2, 3))


def test_real_4k_preset_shapes_on_meta_device():
    """The released geometry (shapes of ps3_reference §1.8) without allocating anything."""
    p = get_preset("ps3-4k-siglip")
    with torch.device("meta"):
        model = PS3Model(p)
    b = 2
    batch = dict(lowres=torch.empty(b, 3, 378, 378, device="meta"), selection_view=torch.empty(b, 3, 1512, 1512, device="meta"),
                 highres=[torch.empty(b, 3, s, s, device="meta") for s in (756, 1512, 3780)],
                 gt_maps=[torch.empty(b, g, g, device="meta") for g in (54, 108, 270)],
                 tokens=torch.zeros(b, 64, dtype=torch.long, device="meta"), is_global=torch.zeros(b, dtype=torch.bool, device="meta"))
    low = model.vision_model.encode_lowres(batch["lowres"])
    assert len(low.kv) == 27 and low.kv[0][0].shape == (b, 16, 729, 72)
    out = model(batch)
    assert [t.shape[1] for t in out.hr_index] == [85, 341, 2134]
    assert [tuple(t.shape) for t in out.topdown_probs] == [(b, 54, 54), (b, 108, 108), (b, 270, 270)]
    assert out.image_features.shape == (b, 1152)
