"""Per-source balanced sampling and global batch composition."""

from __future__ import annotations

from collections import Counter

import pytest

from ps3.data.sampling import BatchPlanner, SamplingError, SourceInfo, replacement

SOURCES = [SourceInfo("big", 1000, has_global=True), SourceInfo("small", 30, has_global=False)]


def test_sources_balanced_by_weight_not_size():
    planner = BatchPlanner(SOURCES, 40, seed=0, global_fraction=0.0)
    counts = Counter(slot.source for _ in range(50) for slot in planner.next_batch())
    assert abs(counts[0] / 2000 - 0.5) < 0.05  # 1000 vs 30 images, equal weights: half each
    weighted = BatchPlanner([SourceInfo("a", 100, 3.0), SourceInfo("b", 100, 1.0)], 40, 0, 0.0)
    counts = Counter(slot.source for _ in range(50) for slot in weighted.next_batch())
    assert abs(counts[0] / 2000 - 0.75) < 0.05


def test_each_source_is_reshuffled_endless_stream():
    planner = BatchPlanner([SourceInfo("only", 10)], 5, seed=3, global_fraction=0.0)
    seen = [s.index for _ in range(4) for s in sorted(planner.next_batch(), key=lambda s: 0)]
    firsts, seconds = seen[:10], seen[10:]
    assert sorted(firsts) == list(range(10)) and sorted(seconds) == list(range(10))
    assert firsts != seconds  # each epoch has its own order


def test_global_fraction_is_exact_and_only_from_global_sources():
    planner = BatchPlanner(SOURCES, 40, seed=1, global_fraction=0.25)
    for _ in range(10):
        batch = planner.next_batch()
        glob = [s for s in batch if s.is_global]
        assert len(glob) == 10 and all(s.source == 0 for s in glob)
    no_global = BatchPlanner([SOURCES[1]], 8, seed=1, global_fraction=0.25)
    assert not any(s.is_global for s in no_global.next_batch())


def test_image_at_most_once_per_global_batch():
    planner = BatchPlanner([SourceInfo("tiny", 12, has_global=True)], 12, seed=0, global_fraction=0.5)
    for _ in range(20):  # every batch must use all 12 images exactly once, across epochs
        keys = [s.key for s in planner.next_batch()]
        assert len(set(keys)) == 12


def test_batch_larger_than_data_is_a_clear_error():
    with pytest.raises(SamplingError, match="more distinct images"):
        BatchPlanner([SourceInfo("tiny", 5)], 8, seed=0).next_batch()


def test_deterministic_and_resumable_from_state():
    a = BatchPlanner(SOURCES, 16, seed=5)
    for _ in range(3):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch() for _ in range(3)]
    b = BatchPlanner(list(reversed(SOURCES)), 16, seed=5)  # source order in the spec changed
    b.load_state_dict(state)
    got = [b.next_batch() for _ in range(3)]
    name = lambda planner, s: planner.sources[s.source].name
    assert [[(name(a, s), s.index, s.is_global) for s in batch] for batch in expected] == \
        [[(name(b, s), s.index, s.is_global) for s in batch] for batch in got]


def test_replacement_is_deterministic_and_avoids_batch():
    slot = BatchPlanner(SOURCES, 4, seed=0).next_batch()[0]
    used = {(slot.source, i) for i in range(990)}
    r = replacement(slot, 0, 1000, used)
    assert r == replacement(slot, 0, 1000, used) and r >= 990


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1000, 4097])
def test_feistel_is_a_seeded_permutation(size):
    from ps3.data.sampling import FeistelPermutation

    a, b = FeistelPermutation(size, [1, 2]), FeistelPermutation(size, [1, 3])
    assert sorted(a(i) for i in range(size)) == list(range(size))
    if size > 8:
        assert [a(i) for i in range(size)] != [b(i) for i in range(size)] != list(range(size))


def test_stand_ins_of_different_slots_never_collide():
    planner = BatchPlanner([SourceInfo("big", 100_000)], 64, seed=0, global_fraction=0.0)
    slots = planner.next_batch()
    used = {s.key for s in slots}
    picks = [replacement(s, a, 100_000, used) for s in slots for a in range(3)]
    assert len(set(picks)) == len(picks) and not ({(0, p) for p in picks} & used)
