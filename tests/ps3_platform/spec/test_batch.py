"""Global batch arithmetic: the same global batch on every world size, divided or not."""

from __future__ import annotations

import pytest

from ps3_platform.spec import BatchPlanError, plan_batch


@pytest.mark.parametrize("world,cap,micro,accum", [(1, None, 64, 1), (2, None, 32, 1), (4, 8, 8, 2),
                                                   (8, 3, 3, 3), (64, None, 1, 1), (3, None, 22, 1),
                                                   (5, 4, 4, 4), (9, 2, 2, 4)])
def test_plan_keeps_global_batch(world, cap, micro, accum):
    plan = plan_batch(64, world, cap)
    assert (plan.micro_batch, plan.accumulation) == (micro, accum)
    spans = [span for rank in range(world) for span in plan.micro_spans(rank)]
    assert [a for a, _ in spans] == [0] + [b for _, b in spans[:-1]], "spans tile the global batch in order"
    assert spans[-1][1] == 64
    sizes = [b - a for a, b in spans]
    assert max(sizes) == micro and max(sizes) - min(sizes) <= 1
    assert all(len(plan.micro_spans(rank)) == accum for rank in range(world)), "same forwards on every rank"


@pytest.mark.parametrize("world,cap", [(3, None), (5, 2), (7, 4), (8, 8), (3, 1), (5, 1)])
def test_loss_weights_make_the_global_mean(world, cap):
    """sum over ranks and forwards of weight x (mean of n samples) / world == mean over the batch."""
    plan = plan_batch(8, world, cap)
    values = [float(v * v) for v in range(8)]
    total = 0.0
    for rank in range(world):
        for micro, (a, b) in enumerate(plan.micro_spans(rank)):
            read = slice(*plan.read_span(rank, micro))  # a stand-in's sample, weighted 0, when a == b
            total += plan.loss_weight(rank, micro) * sum(values[read]) / (read.stop - read.start)
    assert total / world == pytest.approx(sum(values) / 8)
    assert plan.even == (8 % world == 0)


def test_micro_sizes_are_what_every_rank_runs_in_one_forward():
    plan = plan_batch(8, 5)
    assert plan.micro_sizes(0) == [2, 2, 2, 1, 1] and plan.share(3) == (6, 7)


def test_a_short_rank_in_forwards_of_one_reads_a_stand_in_weighted_zero():
    plan = plan_batch(8, 3, 1)  # shares 3/3/2: three forwards everywhere, the last one of rank 2 empty
    assert plan.accumulation == 3 and plan.micro_spans(2)[2] == (8, 8)
    assert plan.read_span(2, 2) == (7, 8) and plan.loss_weight(2, 2) == 0.0
    assert plan.micro_sizes(2) == [1, 1, 0] and plan.read_span(2, 1) == (7, 8)


@pytest.mark.parametrize("batch,world,cap,message", [
    (4, 5, None, "global batch 4 is smaller than world size 5"),
    (8, 0, None, "world size must be positive"),
])
def test_unplannable_batches_are_clear_errors(batch, world, cap, message):
    with pytest.raises(BatchPlanError, match=message):
        plan_batch(batch, world, cap)
