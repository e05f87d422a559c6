"""The trainer loop in one process: accumulation, non-finite policies, resume bookkeeping."""

from __future__ import annotations

import dataclasses

import logging
from pathlib import Path

import pytest
import torch

from ps3_platform.runtime import build
from ps3_platform.runtime.checkpoint import Checkpointer
from ps3_platform.runtime.distributed import world_from_env
from ps3_platform.runtime.metrics import JsonlLog, Metrics
from ps3_platform.runtime.signals import StopFlag
from ps3_platform.runtime.task import resolve_task
from ps3_platform.runtime.trainer import NonFiniteLossError, SpecChangedError, Trainer
from ps3_platform.spec import load_text, plan_batch, stages_of

SPEC = """
apiVersion: ps3.platform/v1
kind: TrainingJob
metadata: {{name: unit}}
spec:
  task: noop
  train: {{globalBatch: 8, microBatch: {micro}, steps: {steps}, optimizer: {{lr: 0.01}},
          nonFinite: {{policy: {policy}, maxConsecutive: 2}}}}
  checkpoint: {{intervalSteps: 4}}
  params: {{nanAtSteps: {nan}}}
"""


def _trainer(tmp_path: Path, *, micro=2, steps=8, policy="skip", nan=(), spec_hash="h", checkpoint=True,
             allow=False) -> Trainer:
    job = load_text(SPEC.format(micro=micro, steps=steps, policy=policy, nan=list(nan))).job
    stage = stages_of(job)[0]
    world = world_from_env({})
    plan = plan_batch(8, 1, micro)
    metrics = Metrics("unit", "train", 0)
    ctx = build._context(job, stage, world, plan, metrics, tmp_path / "run", logging.getLogger("test"))
    torch.manual_seed(0)
    task = resolve_task("noop")(ctx)
    ckpt = Checkpointer(uri=f"file://{tmp_path}/ckpt", job="unit", stage="train", keep=3, keep_every=None,
                        async_save=False, rank=0, world_size=1) if checkpoint else None
    return Trainer(ctx, task, world, ckpt, spec_hash=spec_hash, allow_spec_change=allow, stop=StopFlag(),
                   log=JsonlLog(tmp_path / "metrics.jsonl"))


def test_accumulation_does_not_change_the_update(tmp_path):
    """8 samples as 4 micro-batches of 2 or 1 of 8: the same weights (up to float order)."""
    a = _trainer(tmp_path / "a", micro=2, checkpoint=False)
    b = _trainer(tmp_path / "b", micro=8, checkpoint=False)
    a.train(), b.train()
    for (name, pa), pb in zip(a.task.model.named_parameters(), b.task.model.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), name


def test_nan_step_is_skipped_and_counted(tmp_path):
    trainer = _trainer(tmp_path, nan=[2], checkpoint=False)
    assert trainer.train() == "completed"
    assert trainer.counters.nonfinite_steps == 1 and trainer.counters.step == 8
    assert trainer.ctx.metrics.get("ps3_nonfinite_loss_total")._value.get() == 1


def test_nan_in_a_row_rolls_back_to_the_last_checkpoint(tmp_path, caplog):
    trainer = _trainer(tmp_path, policy="rollback", nan=[5, 6], steps=8)
    with caplog.at_level(logging.WARNING):
        assert trainer.train() == "completed"
    assert "rolled back to step 4" in caplog.text
    assert trainer.counters.step == 8


def test_nan_with_fail_policy_raises_at_once(tmp_path):
    trainer = _trainer(tmp_path, policy="fail", nan=[1], checkpoint=False)
    with pytest.raises(NonFiniteLossError, match="1 non-finite losses in a row at step 1"):
        trainer.train()


def test_skip_policy_gives_up_after_max_consecutive(tmp_path):
    trainer = _trainer(tmp_path, policy="skip", nan=[3, 4], checkpoint=False)
    with pytest.raises(NonFiniteLossError, match="2 non-finite losses in a row"):
        trainer.train()


def test_changed_spec_is_refused_unless_allowed(tmp_path):
    _trainer(tmp_path, spec_hash="old").train()
    with pytest.raises(SpecChangedError, match="--allow-spec-change"):
        _trainer(tmp_path, spec_hash="new").resume()
    resumed = _trainer(tmp_path, spec_hash="new", allow=True)
    resumed.resume()
    assert resumed.counters.step == 8 and resumed.counters.spec_hash == "new"


@pytest.mark.faults
def test_replayed_steps_carry_their_attempt(tmp_path):
    import json

    import shutil

    _trainer(tmp_path, steps=6).train()  # checkpoints at step 4 (interval) and 6 (end)

    shutil.rmtree(next((tmp_path / "ckpt" / "unit" / "train").glob("step-000000006")))
    again = _trainer(tmp_path, steps=6)
    again.resume()
    again.train()  # steps 5 and 6 again, from step 4's checkpoint
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["step"], r["attempt"]) for r in records if "loss" in r]
    assert steps == [(6, 0), (6, 1)]  # the last step is always logged


@pytest.mark.faults
def test_a_restart_before_the_first_commit_is_a_new_attempt(tmp_path):
    """Nothing to resume from, so the agent's restart count tells the replayed steps apart."""
    import json

    again = _trainer(tmp_path, steps=2, checkpoint=False)
    again.world = dataclasses.replace(again.world, restart_count=1)  # as TORCHELASTIC_RESTART_COUNT=1 gives
    again.train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["attempt"] for r in records if "loss" in r} == {1}


def test_gradients_are_clipped_to_the_spec_norm(tmp_path):
    trainer = _trainer(tmp_path, checkpoint=False)  # train.gradClip defaults to 1.0
    model = trainer.task.model
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    before = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    reported = trainer._clip_gradients(model)
    after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert reported == pytest.approx(float(before))  # the metric shows the norm before clipping
    assert float(after) == pytest.approx(trainer.ctx.stage.train.grad_clip, rel=1e-4)


def test_activation_checkpointing_switch_reaches_the_model():
    from ps3.model import PS3Model
    from ps3_platform.runtime.distributed import ParallelizeConfig, parallelize

    world = world_from_env({})
    on = parallelize(PS3Model("ps3-tiny"), world, ParallelizeConfig(activation_checkpointing="full"))
    off = parallelize(PS3Model("ps3-tiny"), world, ParallelizeConfig(activation_checkpointing="none"))
    assert on.vision_model.trunk.grad_checkpointing and on.text_model.grad_checkpointing
    assert not off.vision_model.trunk.grad_checkpointing and not off.text_model.grad_checkpointing


def _gather_bad(rank: int, store: str, out: str) -> None:
    import json as _json
    from types import SimpleNamespace

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    fake = SimpleNamespace(world=SimpleNamespace(world_size=2),
                           _bad_reported=[{"bad_image": 2}, {"bad_image": 1, "no_boxes": 4}][rank])
    total = Trainer._bad_on_every_rank(fake)
    dist.destroy_process_group()
    Path(f"{out}.{rank}").write_text(_json.dumps(total))


@pytest.mark.faults
def test_bad_sample_counts_are_summed_over_ranks(tmp_path):
    import json

    import torch.multiprocessing as mp

    mp.spawn(_gather_bad, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"out.{rank}").read_text()) == {"bad_image": 3, "no_boxes": 4}
