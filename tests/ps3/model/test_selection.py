"""Selection maths: probabilities, GT override, budgets per look, vectorised top-k."""

from __future__ import annotations

import torch

from ps3.model.selection import (
    apply_gt_override,
    index_to_map,
    logits_to_probs,
    look_budgets,
    prompt_logits,
    select_topk,
)


def test_probs_are_clamped_sigmoid_of_head0_upsampled_nearest():
    logits = torch.randn(2, 2, 4, 4)
    probs = logits_to_probs(logits, (8, 16), share_first=True)
    ref = torch.sigmoid((5 * logits[:, 0]).clamp(-10, 10))
    assert torch.allclose(probs[0], ref.repeat_interleave(2, 1).repeat_interleave(2, 2))
    assert torch.allclose(probs[1], ref.repeat_interleave(4, 1).repeat_interleave(4, 2))
    own = logits_to_probs(logits, (8, 16), share_first=False)
    assert not torch.allclose(own[1][:, ::4, ::4], probs[1][:, ::4, ::4])


def test_highres_branch_is_max_pooled_down_and_averaged():
    feat, prompt = torch.randn(1, 1, 8, 2, 2), torch.randn(1, 8)
    conv, hr_prompt = torch.randn(1, 4, 4, 4), torch.randn(1, 1, 4)
    got = prompt_logits(feat, prompt, conv, hr_prompt)
    lr = torch.nn.functional.cosine_similarity(feat[0, 0], prompt[0][:, None, None], dim=0)
    hr = torch.nn.functional.cosine_similarity(conv[0], hr_prompt[0, 0][:, None, None], dim=0)
    hr = hr.reshape(2, 2, 2, 2).amax(dim=(1, 3))
    assert torch.allclose(got[0, 0], (lr + hr) / 2, atol=1e-6)


def test_gt_override_sets_box_cells_to_one():
    p = [torch.rand(2, 4, 4) * 0.5]
    g = [torch.zeros(2, 4, 4)]
    g[0][0, 1, 1] = 1
    out = apply_gt_override(p, g)[0]
    assert out[0, 1, 1] == 1 and torch.equal(out[1], p[0][1])


def test_topk_matches_a_per_sample_loop_and_excludes_taken():
    torch.manual_seed(0)
    probs = [torch.rand(5, 4, 4), torch.rand(5, 8, 8)]
    taken = [torch.rand(5, 16) < 0.3, torch.zeros(5, 64, dtype=torch.bool)]
    taken[0][:, :4] = False  # keep enough free cells
    got = select_topk(probs, [3, 10], taken)
    for b in range(5):
        for s, k in enumerate([3, 10]):
            flat = probs[s][b].flatten().masked_fill(taken[s][b], -1)
            assert set(got[s][b].tolist()) == set(flat.topk(k).indices.tolist())
            assert not taken[s][b][got[s][b]].any()
            assert got[s][b].tolist() == sorted(got[s][b].tolist())


def test_look_budgets_scale_and_spill():
    assert look_budgets((16, 64), [256, 1024]) == [16, 64]
    assert look_budgets((16, 64), [256, 1024], n_tokens=40) == [8, 32]
    assert look_budgets((16, 64), [5, 1024]) == [5, 75]  # surplus moves on
    assert look_budgets((16, 64), [256, 10]) == [70, 10]  # and back from the last scale
    assert look_budgets((16, 64), [3, 4]) == [3, 4]


def test_index_to_map():
    m = index_to_map(torch.tensor([[0, 3]]), 4)
    assert m.tolist() == [[True, False, False, True]]
