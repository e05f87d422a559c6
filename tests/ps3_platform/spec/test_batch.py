"""Global batch arithmetic: the same global batch on every world size."""

from __future__ import annotations

import pytest

from ps3_platform.spec import BatchPlanError, plan_batch


@pytest.mark.parametrize("world,cap,micro,accum", [(1, None, 64, 1), (2, None, 32, 1), (4, 8, 8, 2),
                                                   (8, 3, 2, 4), (64, None, 1, 1)])
def test_plan_keeps_global_batch(world, cap, micro, accum):
    plan = plan_batch(64, world, cap)
    assert (plan.micro_batch, plan.accumulation) == (micro, accum)
    assert plan.micro_batch * plan.accumulation * world == 64


def test_indivisible_world_is_a_clear_error():
    with pytest.raises(BatchPlanError, match="global batch 64 is not divisible by world size 3"):
        plan_batch(64, 3)
