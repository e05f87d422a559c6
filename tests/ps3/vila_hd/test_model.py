"""VilaHD on a tiny PS3 and a tiny Qwen2: the two passes, image tokens, selection, stand-ins."""

from __future__ import annotations

import pytest
import torch

from ps3.model import PS3VisionEncoder, get_preset
from ps3.vila_hd.llm import build_tiny_llm, load_llm
from ps3.vila_hd.losses import selection_loss, selection_recall
from ps3.vila_hd.model import IGNORE, Selection, VilaHD, box_maps, smooth_probs
from ps3.vila_hd.projector import merge_2x2, whole_blocks


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llm")
    build_tiny_llm(str(directory), ["what shape is the red sign", "circle square triangle cross", "A B C D"])
    return load_llm(str(directory))


def _model(llm, preset="ps3-tiny", seed=0, **kw):
    torch.manual_seed(seed)
    newline = llm.tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
    return VilaHD(PS3VisionEncoder(get_preset(preset)), llm.model, image_token_id=llm.image_token_id,
                  newline_token_id=newline, **kw)


def _batch(llm, size=256, sizes=((300, 200), (2000, 1500))):
    img = llm.image_token_id
    ids = torch.tensor([[5, img, 7, 8, 9, 10, 11, 0], [img, 6, 7, 8, 9, 10, 11, 12]])
    return dict(input_ids=ids, attention_mask=(ids != 0).long() | (torch.arange(8) < 7).long()[None],
                labels=torch.tensor([[IGNORE] * 5 + [10, 11, IGNORE], [IGNORE] * 6 + [11, 12]]),
                prompt_end=torch.tensor([3, 4]),
                images=torch.randint(0, 255, (2, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)),
                image_sizes=torch.tensor(sizes), boxes=torch.tensor([[0.1, 0.1, 0.3, 0.3], [0.0, 0.0, 0.0, 0.0]]),
                has_box=torch.tensor([True, False]), grounding=torch.tensor([False, False]))


def _text_only(batch: dict) -> dict:
    """A one-conversation micro-batch with no image, beside `_batch`'s shapes."""
    return dict(batch, images=batch["images"][:0], input_ids=torch.tensor([[5, 6, 7, 8]]),
                attention_mask=torch.ones(1, 4), labels=torch.tensor([[IGNORE, IGNORE, 7, 8]]),
                prompt_end=torch.tensor([1]), boxes=batch["boxes"][:0], has_box=batch["has_box"][:0],
                image_sizes=batch["image_sizes"][:0])


def test_merge_and_whole_blocks():
    grid = torch.arange(27 * 27, dtype=torch.float32).reshape(1, 27, 27, 1)
    merged = merge_2x2(grid)
    assert merged.shape == (1, 14 * 14, 4)
    assert merged[0, 0].tolist() == [0, 1, 27, 28]  # a 2x2 neighbourhood side by side
    assert merged[0, -1].tolist() == [27 * 27 - 1, 0, 0, 0]  # zero padding of the odd edge
    sel = torch.zeros(1, 4, 4, dtype=torch.bool)
    sel[0, :2, :2] = True
    sel[0, 2, 2] = True  # one cell of a block: not a token
    assert whole_blocks(sel)[0].tolist() == [True, False, False, False]


def test_pass_one_is_gradient_free_and_only_the_head_learns_from_selection(llm):
    model = _model(llm)
    batch = _batch(llm)
    seen = []
    handle = model.llm.register_forward_hook(lambda m, a, out: seen.append(torch.is_grad_enabled()))
    out = model(batch, Selection(mode="after_prompt"))
    handle.remove()
    assert seen == [False, True]  # pass 1 without gradients, pass 2 with
    loss = selection_loss(out.selection_probs, batch["boxes"], batch["has_box"], model.vision_tower.preset.grids[1:])
    loss["loss"].backward()
    assert model.mm_projector.top_down_prompt_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.llm.parameters())  # the prompt is a detached LLM state
    assert model.vision_tower.selection_feature_proj.fc1.weight.grad.abs().sum() > 0


def test_lm_loss_trains_projector_and_llm_not_the_selection(llm):
    model = _model(llm)
    out = model(_batch(llm), Selection(mode="after_prompt"))
    out.lm_loss.backward()
    assert model.mm_projector.mlp.fc1.weight.grad.abs().sum() > 0
    assert model.mm_projector.high_res_pos_embed.grad.abs().sum() > 0
    assert model.mm_projector.top_down_prompt_head.weight.grad is None  # top-k is discrete


def test_image_tokens_follow_the_budget_and_are_never_empty(llm):
    model = _model(llm)
    batch = _batch(llm)
    low = 16 + 1  # 8x8 low-res cells -> 4x4 tokens, plus the newline
    assert model(batch, Selection(num_look_close=0)).image_tokens == [low, low]
    full = model(batch, Selection(num_look_close=1))
    assert all(low < t <= low + 80 // 4 for t in full.image_tokens)
    assert [int(s.sum()) for s in full.selected] == [2 * 16, 2 * 64]  # preset budgets per image
    assert Selection(num_look_close=1).image_tokens(model.vision_tower) == low + 20
    assert Selection(num_look_close="all").patches(model.vision_tower) == 16 * 16 + 32 * 32
    assert Selection(num_look_close=100).patches(model.vision_tower) == 16 * 16 + 32 * 32  # capped at every patch


def test_bottom_up_needs_no_pass_one_and_differs_from_top_down(llm):
    model = _model(llm)
    seen = []
    handle = model.llm.register_forward_hook(lambda m, a, out: seen.append(1))
    bottom = model(_batch(llm), Selection(mode="after_image"))
    handle.remove()
    assert len(seen) == 1
    top = model(_batch(llm), Selection(mode="after_prompt"))
    assert not torch.equal(bottom.selection_probs[0], top.selection_probs[0])


def test_gt_forced_selection_takes_the_box_cells_first(llm):
    model = _model(llm)
    batch = _batch(llm)
    grids = model.vision_tower.preset.grids[1:]
    out = model(batch, Selection(gt_forced=True, num_look_close=1))  # 16 + 49 box cells fit 16 + 64
    assert selection_recall(out.selected, batch["boxes"], batch["has_box"], grids).tolist() == [1.0]


def test_a_micro_batch_without_images_still_runs_the_tower(llm):
    model = _model(llm)
    batch = _batch(llm)
    text_only = _text_only(batch)
    out = model(text_only, Selection())
    assert out.image_tokens == [] and float(out.ghost) == 0.0
    (out.lm_loss + out.ghost).backward()
    assert model.vision_tower.trunk.blocks[0].attn.qkv.weight.grad is not None  # same forwards on every rank


def test_dynamic_resolution_keeps_small_images_off_the_top_scale(llm):
    model = _model(llm, preset="ps3-tiny-4s")  # scales 64/128/256/512: the midpoint of the top two is 384
    batch = _batch(llm, size=512, sizes=((300, 200), (2000, 1500)))
    out = model(batch, Selection(dynamic_resolution=True))
    top = out.selected[-1].flatten(1).sum(1)
    assert top[0] == 0 and top[1] > 0
    assert [int(s.flatten(1).sum(1)[0]) for s in out.selected] != [0, 0, 0]
    assert sum(int(s[0].sum()) for s in out.selected) == sum(int(s[1].sum()) for s in out.selected)


def test_dynamic_resolution_discards_the_stand_in_of_an_empty_group(llm):
    model = _model(llm, preset="ps3-tiny-4s")
    vision_forwards = []
    model.vision_tower.trunk.blocks[0].register_forward_hook(lambda m, a, out: vision_forwards.append(1))
    model(_batch(llm, size=512, sizes=((300, 200), (2000, 1500))), Selection(dynamic_resolution=True))  # mixed
    mixed_forwards = len(vision_forwards)
    vision_forwards.clear()
    small = model(_batch(llm, size=512, sizes=((300, 200), (350, 200))), Selection(dynamic_resolution=True))
    assert len(vision_forwards) == mixed_forwards  # the empty large group still runs, on a stand-in
    assert small.selected[-1].sum() == 0  # but image 0 keeps its own selection: none at the top scale
    per_image = [sum(int(s[i].sum()) for s in small.selected) for i in range(2)]
    assert per_image[0] == per_image[1] > 0
    assert small.image_tokens[0] == small.image_tokens[1]
    assert small.ghost is not None and float(small.ghost) == 0.0
    (small.lm_loss + small.ghost).backward()  # the stand-in is in backward on every rank too


@pytest.mark.parametrize("mode", ["after_prompt", "after_image"])
def test_a_micro_batch_without_images_runs_the_llm_as_often_as_one_with_images(llm, mode):
    model = _model(llm)
    batch = _batch(llm)
    text_only = _text_only(batch)
    calls = []
    handle = model.llm.register_forward_hook(lambda m, a, out: calls.append(1))
    model(batch, Selection(mode=mode))
    with_images = len(calls)
    calls.clear()
    out = model(text_only, Selection(mode=mode))
    handle.remove()
    assert len(calls) == with_images == (2 if mode == "after_prompt" else 1)  # FSDP2 all-gathers per forward
    assert out.image_tokens == [] and float(out.ghost) == 0.0
    (out.lm_loss + out.ghost).backward()
    if mode == "after_prompt":  # the discarded prompt keeps the head in backward like its peers'
        assert model.mm_projector.top_down_prompt_head.weight.grad is not None


def test_smoothing_spreads_selection_over_whole_regions(llm):
    probs = torch.zeros(1, 12, 12)
    probs[0, 0, 0] = 1.0
    smooth = smooth_probs(probs)  # 6x6 regions of 2x2 cells
    assert smooth[0, :2, :2].tolist() == [[0.25, 0.25]] * 2 and smooth.sum() == 1.0
    assert smooth[0, 2:].sum() == 0 and smooth[0, :, 2:].sum() == 0
    flat = torch.full((2, 16, 16), 0.3)
    assert torch.allclose(smooth_probs(flat), flat)  # a flat map stays flat
    model = _model(llm)
    plain = model(_batch(llm), Selection(mode="after_image"))
    smoothed = model(_batch(llm), Selection(mode="after_image", smooth_selection_prob=True))
    for raw, even in zip(plain.selection_probs, smoothed.selection_probs):
        assert even.shape == raw.shape
        assert all(len(m.unique()) <= 36 < len(r.unique()) for m, r in zip(even, raw))
    assert any(not torch.equal(a, b) for a, b in zip(plain.selected, smoothed.selected))


def test_context_grows_with_the_token_budget(llm):
    enc = _model(llm).vision_tower
    low = 16 + 1  # low-res tokens and the newline
    budgets = [0, 40, 80, 200, 1280, 5000]
    tokens = [Selection(num_look_close=0, num_token_look_close=b or None).image_tokens(enc) for b in budgets]
    assert tokens == [low, low + 10, low + 20, low + 50, low + 320, low + 320]  # capped at every patch
    assert Selection(num_look_close=1, num_token_look_close=200).patches(enc) == 200  # the token count wins
    model = _model(llm)
    for budget in (40, 200):
        out = model(_batch(llm), Selection(num_token_look_close=budget))
        assert [int(sum(s[i].sum() for s in out.selected)) for i in range(2)] == [budget, budget]
        assert all(low < t <= Selection(num_token_look_close=budget).image_tokens(enc) for t in out.image_tokens)


def test_box_maps_mark_every_touched_cell():
    maps = box_maps(torch.tensor([[0.0, 0.0, 0.26, 0.5], [0, 0, 1, 1]]), torch.tensor([True, False]), (4,))
    assert maps[0][0].tolist() == [[1, 1, 0, 0]] * 2 + [[0, 0, 0, 0]] * 2
    assert maps[0][1].sum() == 0


def test_selection_loss_is_a_graph_zero_without_boxes(llm):
    probs = [torch.rand(2, 4, 4, requires_grad=True)]
    out = selection_loss(probs, torch.zeros(2, 4), torch.tensor([False, False]), (4,))
    assert float(out["loss"]) == 0.0
    out["loss"].backward()
    assert probs[0].grad is not None


def test_blocks_and_activation_checkpointing_cover_both_trunks(llm):
    model = _model(llm)
    blocks = model.blocks()
    assert len(blocks) == len(model.vision_tower.trunk.blocks) + len(model.llm.model.layers)
    model.train()
    model.set_grad_checkpointing(True)
    out = model(_batch(llm), Selection())
    out.lm_loss.backward()
    assert model.llm.is_gradient_checkpointing and model.vision_tower.trunk.grad_checkpointing
    assert model.mm_projector.mlp.fc1.weight.grad is not None
    model.set_grad_checkpointing(True, every=2)  # the spec's selective mode: every other block and layer
    assert [layer.gradient_checkpointing for layer in model.llm.model.layers] == [False, True]
    assert model.vision_tower.trunk.checkpoint_every == 2
    model.set_grad_checkpointing(False)
    assert not model.llm.is_gradient_checkpointing
