"""The training loop: resume -> steps (accumulate, clip, step, report, checkpoint) -> close.

Everything that is not the science lives here or in the components it calls; the task
only turns a micro-batch into a loss. Read `Trainer.train` top to bottom.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ps3_platform.spec.pools import PEAK_TFLOPS_ENV

from .checkpoint import CheckpointAbandonedError
from .distributed import WorldInfo, uses_autocast
from .metrics import JsonlLog
from .restart import RestartCost
from .signals import StopFlag
from .state import Counters, ModelAndOptimizer, rng_state, seed_everything, set_rng_state
from .task import RunContext, StepResult, TaskState


class SpecChangedError(RuntimeError):
    """The checkpoint was written under a different spec (and the user did not allow it)."""


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class StepStats:
    loss: float
    grad_norm: float
    seconds: float
    data_wait: float
    samples: int
    tokens: int
    extra: dict = field(default_factory=dict)


def _peak_flops(device: torch.device) -> float:
    """Dense bf16 peak FLOP/s of one device: MFU's denominator.

    The pool's `gpuPeakTflops`, which the compiler puts in the pod's environment; without
    one (a local run, a pool that does not say), a table by device name, and a nominal
    100 GFLOP/s on CPU.
    """
    if pool_peak := os.environ.get(PEAK_TFLOPS_ENV):
        return float(pool_peak) * 1e12
    if device.type != "cuda":
        return 1e11
    name = torch.cuda.get_device_name(device)
    for key, peak in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12)):
        if key in name:
            return peak
    return 1e14


def _precision_name(autocast: bool, precision: str) -> str:
    if autocast:
        return "bf16 autocast"
    return "bf16 parameters (FSDP2 mixed precision), no autocast" if precision == "bf16" else "fp32"


class Trainer:
    def __init__(self, ctx: RunContext, task: TaskState, world: WorldInfo, checkpointer, *,
                 spec_hash: str, allow_spec_change: bool, stop: StopFlag, log: JsonlLog):
        self.ctx, self.task, self.world = ctx, task, world
        self.checkpointer = checkpointer
        self.counters = Counters(spec_hash=spec_hash)
        self.allow_spec_change = allow_spec_change
        self.stop, self.log = stop, log
        self.total_steps = ctx.stage.train.total_steps
        self.consecutive_nonfinite = 0
        self.autocast = uses_autocast(task.model, ctx.stage.train.precision)
        ctx.log.info("precision: %s", _precision_name(self.autocast, ctx.stage.train.precision))
        self._bad_reported: dict[str, int] = {}
        self._mean_step_s: float | None = None
        self.restart = RestartCost()

    # ---- checkpoint state -------------------------------------------------------------
    def _state(self, with_data: bool = True) -> dict:
        state = {"app": ModelAndOptimizer(self.task.model, self.task.optimizer), "counters": self.counters}
        if self.task.scheduler is not None:
            state["scheduler"] = self.task.scheduler
        if with_data and self.task.data is not None:
            state["data"] = self.task.data
        return state

    def resume(self) -> None:
        """Load the newest committed checkpoint (or the one `checkpoint.resumeStep` names), if any.

        Every (re)start goes through here."""
        requested = self.ctx.stage.checkpoint.resume_step
        if self.checkpointer is None or (requested is None and self.checkpointer.latest_committed() is None):
            return
        expected_hash = self.counters.spec_hash
        started = time.perf_counter()
        if requested is not None:
            step, rank_state = self.checkpointer.resume_from(self._state(), requested)
        else:
            step, rank_state = self.checkpointer.load(self._state())
        self.ctx.metrics.get("ps3_checkpoint_load_seconds").set(time.perf_counter() - started)
        if self.counters.spec_hash != expected_hash and not self.allow_spec_change:
            raise SpecChangedError(
                f"checkpoint step {step} was written by a different spec (hash {self.counters.spec_hash}, "
                f"now {expected_hash}); pass --allow-spec-change to continue from it anyway"
            )
        self.counters.spec_hash = expected_hash
        if rank_state is not None:
            set_rng_state(rank_state["rng"])
        else:  # another world size: per-rank generators cannot carry over, so derive them
            seed_everything(self.ctx.stage.train.seed + 1000 * self.world.rank + step)
        self.counters.resumes += 1
        self.ctx.metrics.get("ps3_restarts").set(self.counters.resumes)
        self.restart.resumed(step, self.checkpointer.read_progress())
        if self.restart.lost_steps is not None:
            self.ctx.metrics.get("ps3_lost_steps").set(self.restart.lost_steps)
        self.ctx.log.info("resumed from step %d (samples %d)%s", step, self.counters.samples,
                          "" if not self.restart.lost_steps else f"; {self.restart.lost_steps} steps done "
                          "since that checkpoint are recomputed")

    def save(self) -> None:
        if self.checkpointer is None:
            return
        started = time.perf_counter()
        self.checkpointer.save(self.counters.step, self._state(), {"rng": rng_state()})
        self.ctx.metrics.get("ps3_checkpoint_save_seconds").observe(time.perf_counter() - started)

    # ---- the loop ---------------------------------------------------------------------
    def train(self) -> str:
        """Run to the end of the stage; returns 'completed' or 'preempted'."""
        self.resume()
        self.ctx.metrics.get("ps3_total_steps").set(self.total_steps)
        model = self.task.model
        model.train()
        outcome = "completed"
        try:
            while self.counters.step < self.total_steps:
                stats = self._train_step(model)
                stop_requested = self._agree_on_stop()
                if stats is not None:
                    self._report(stats)
                if self._should_checkpoint() or stop_requested:
                    self.save()
                if stop_requested:
                    outcome = "preempted"
                    break
            if self.checkpointer is not None:
                if outcome == "completed" and not self._should_checkpoint():
                    self.save()
                self.checkpointer.wait()
                self.checkpointer.flush_progress()
        except CheckpointAbandonedError as exc:  # told to stop, and the upload did not commit in the grace
            self.ctx.log.warning("%s; exiting without it", exc)
            return "preempted"
        return outcome

    def _should_checkpoint(self) -> bool:
        interval = self.ctx.stage.checkpoint.interval_steps
        step = self.counters.step
        return step > 0 and (step % interval == 0 or step == self.total_steps)

    def _agree_on_stop(self) -> bool:
        """All ranks stop together, at the same step, if any rank got a signal."""
        flag = torch.tensor([1.0 if self.stop.requested else 0.0])
        if self.world.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _train_step(self, model) -> StepStats | None:
        """One optimizer step over `accumulation` micro-batches; None if the step was skipped.

        Each micro-batch's mean loss is weighted by its share of the global batch (the plan's
        `loss_weight`), so ranks with one sample more or less still give the exact global mean.
        Losses add up on the device and are read once, after the last micro-batch (reading one
        per micro-batch would make the host wait for each forward); a task's `metrics` may be
        tensors too, read only at the steps that are logged.
        """
        plan, rank = self.ctx.batch, self.world.rank
        started = time.perf_counter()
        data_wait, weighted_loss, samples, tokens, extra = 0.0, 0.0, 0, 0, {}
        for micro in range(plan.accumulation):
            wait_start = time.perf_counter()
            batch = next(self.task.data)
            data_wait += time.perf_counter() - wait_start
            sync = micro == plan.accumulation - 1
            weight = plan.loss_weight(rank, micro)
            with self._no_sync(model, sync), self._precision():
                result: StepResult = self.task.step(model, batch)
                (result.loss * weight).backward()
            weighted_loss = weighted_loss + weight * result.loss.detach()
            start, stop = plan.micro_spans(rank)[micro]
            samples += (result.samples or stop - start) if stop > start else 0  # a stand-in counts nothing
            tokens += result.tokens
            extra = result.metrics
        loss = self._global_mean(float(weighted_loss))  # the step's one read of the loss
        grad_norm = self._clip_gradients(model)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self._handle_nonfinite(loss)
            return None
        self.consecutive_nonfinite = 0
        self.task.optimizer.step()
        if self.task.scheduler is not None:
            self.task.scheduler.step()
        self.task.optimizer.zero_grad(set_to_none=True)
        if self.task.after_optimizer_step is not None:
            self.task.after_optimizer_step()
        self.counters.step += 1
        self.counters.samples += plan.global_batch
        seconds = time.perf_counter() - started
        return StepStats(loss, grad_norm, seconds, data_wait, samples, tokens, extra)

    def _progress_record(self, step: int, loss: float, samples_per_s: float) -> dict:
        """What `platformctl status` shows of a stage on a cluster, and what a restart lost."""
        eta = (self.total_steps - step) * self._mean_step_s if self._mean_step_s else None
        return {"step": step, "total_steps": self.total_steps, "loss": round(loss, 6),
                "samples_per_s": round(samples_per_s, 3), "eta_s": None if eta is None else round(eta, 1),
                "committed_step": self.checkpointer.committed_step, "restarts": self.counters.resumes,
                "attempt": self._attempt(), **self.restart.record(), "time": round(time.time(), 3)}

    def _attempt(self) -> int:
        """How many times this run has started again: resumes from a checkpoint (also across
        resubmits), or the agent's restart count when a restart came before the first commit
        (then nothing was resumed, yet steps are replayed)."""
        return max(self.counters.resumes, self.world.restart_count)

    def _no_sync(self, model, sync: bool):
        """Reduce gradients once per optimizer step, not once per micro-batch."""
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter only on the last one
            model.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        if not sync and hasattr(model, "no_sync"):
            return model.no_sync()  # DDP
        return contextlib.nullcontext()

    def _precision(self):
        """bf16 autocast where `uses_autocast` says so; FSDP2's policy casts for itself."""
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.world.device.type, dtype=torch.bfloat16)

    def _global_mean(self, value: float) -> float:
        if self.world.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world.world_size

    def _clip_gradients(self, model) -> float:
        params = [p for p in model.parameters() if p.grad is not None]
        max_norm = self.ctx.stage.train.grad_clip or float("inf")
        if not params:
            return 0.0
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2 returns a DTensor
            norm = norm.full_tensor()
        return float(norm)

    def _handle_nonfinite(self, loss: float) -> None:
        """Skip the step; after N in a row roll back to the last checkpoint (or fail)."""
        policy = self.ctx.stage.train.non_finite
        self.task.optimizer.zero_grad(set_to_none=True)
        self.consecutive_nonfinite += 1
        self.counters.nonfinite_steps += 1
        self.ctx.metrics.get("ps3_nonfinite_loss_total").inc()
        self.ctx.log.warning("non-finite loss %s at step %d (%d in a row)", loss, self.counters.step,
                             self.consecutive_nonfinite)
        if self.consecutive_nonfinite < policy.max_consecutive and policy.policy != "fail":
            return
        if policy.policy == "rollback" and self.checkpointer is not None and self.checkpointer.latest_committed():
            self.checkpointer.wait()
            # Model, optimizer, schedule and counters go back; the data position keeps moving
            # forward so the run does not replay the batches that blew up.
            step, _ = self.checkpointer.load(self._state(with_data=False))
            self.ctx.log.warning("rolled back to step %d", step)
            self.consecutive_nonfinite = 0
            return
        raise NonFiniteLossError(
            f"{self.consecutive_nonfinite} non-finite losses in a row at step {self.counters.step} "
            f"(train.nonFinite.policy={policy.policy})"
        )

    def _bad_on_every_rank(self) -> dict[str, int]:
        """Bad samples skipped so far by all ranks together, by reason (each rank reads its own
        part of every batch, so rank 0's counts alone undercount)."""
        if self.world.world_size == 1 or not dist.is_initialized():
            return dict(self._bad_reported)
        per_rank: list[dict[str, int] | None] = [None] * self.world.world_size
        dist.all_gather_object(per_rank, dict(self._bad_reported))
        total: dict[str, int] = {}
        for counts in per_rank:
            for reason, n in (counts or {}).items():
                total[reason] = total.get(reason, 0) + n
        return total

    def _report(self, stats: StepStats) -> None:
        m, plan, step = self.ctx.metrics, self.ctx.batch, self.counters.step
        first = self.restart.first_step_done()
        if first is not None:
            m.get("ps3_restart_to_first_step_seconds").set(first)
            self.ctx.log.info("first step after the restart: %.1f s after this process started", first)
        samples_per_s = plan.global_batch / stats.seconds
        lr = self.task.optimizer.param_groups[0]["lr"]
        m.get("ps3_step_seconds").observe(stats.seconds)
        self._mean_step_s = stats.seconds if self._mean_step_s is None else 0.9 * self._mean_step_s + 0.1 * stats.seconds
        m.get("ps3_checkpoint_interval_seconds").set(self.ctx.stage.checkpoint.interval_steps * self._mean_step_s)
        m.get("ps3_steps_total").inc()
        m.get("ps3_step").set(step)
        m.get("ps3_samples_total").inc(stats.samples)
        m.get("ps3_samples_per_second").set(samples_per_s)
        tokens_per_s = stats.tokens * self.world.world_size / stats.seconds
        m.get("ps3_tokens_per_second").set(tokens_per_s)
        m.get("ps3_loss").set(stats.loss)
        m.get("ps3_learning_rate").set(lr)
        m.get("ps3_grad_norm").set(stats.grad_norm)
        m.get("ps3_data_wait_seconds_total").inc(stats.data_wait)
        mfu = None
        if self.task.flops_per_sample:
            achieved = self.task.flops_per_sample * samples_per_s
            mfu = achieved / (self.world.world_size * _peak_flops(self.world.device))
            m.get("ps3_mfu").set(mfu)
        if self.task.bad_sample_counts is not None:
            for reason, count in self.task.bad_sample_counts().items():
                new = count - self._bad_reported.get(reason, 0)
                if new > 0:
                    m.get("ps3_data_bad_samples_total", reason=reason).inc(new)
                    self._bad_reported[reason] = count
        if step % self.ctx.stage.monitoring.log_every_steps != 0 and step != self.total_steps:
            return
        bad = self._bad_on_every_rank()  # a collective: every rank logs on the same steps
        if self.world.is_main:
            # attempt: a step recomputed after a restart is told from its first run
            record = {"step": step, "attempt": self._attempt(), "total": self.total_steps,
                      "loss": round(stats.loss, 6), "lr": lr,
                      "grad_norm": round(stats.grad_norm, 4), "samples": self.counters.samples,
                      "samples_per_s": round(samples_per_s, 3), "step_seconds": round(stats.seconds, 4),
                      "data_wait_s": round(stats.data_wait, 4), "tokens_per_s": round(tokens_per_s, 1),
                      **({"mfu": round(mfu, 6)} if mfu is not None else {}),
                      **({"bad_samples": bad} if bad else {}), **self.restart.record(),
                      **{name: float(value) for name, value in stats.extra.items()}}
            self.log.write(record)
            if self.checkpointer is not None:
                self.checkpointer.write_progress(self._progress_record(step, stats.loss, samples_per_s))
            self.ctx.log.info("step %d/%d loss %.4f lr %.2e %.1f samples/s", step, self.total_steps,
                              stats.loss, lr, samples_per_s)
