"""Composition root of a worker: process group, metrics, task, checkpointer, trainer.

The one place where components are built, with keyword-only dependencies; the loop in
`trainer.py` only calls them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ps3_platform.spec import BatchPlan, JobSpec, Stage
from ps3_platform.spec.models import EVAL_RECORD, expand_run_placeholder

from .checkpoint import CheckpointCorruptError, CheckpointError, Checkpointer, CheckpointNotFoundError
from .distributed import ParallelizeConfig, WorldInfo, init_distributed, parallelize, shutdown_distributed
from .gpu import start_gpu_sampler
from .metrics import JsonlLog, Metrics
from .optim import build_optimizer, build_scheduler
from .peers import Peers
from .signals import StopFlag
from .state import seed_everything
from .storage import StorageConfigError, StorageError, check_storage, open_location, storage_options
from .task import RunContext, TaskSetupError, TaskState, UnknownTaskError, resolve_task
from .trainer import SpecChangedError, Trainer


class RunSetupError(RuntimeError):
    """The stage cannot start (permanent: retrying will not help)."""


def run_dir_for(job: str, stage: str) -> Path:
    """Where a worker writes its figures: $PS3_RUN_DIR (the local backend sets it), else /tmp."""
    if env := os.environ.get("PS3_RUN_DIR"):
        return Path(env) / stage
    return Path("/tmp/ps3-platform") / job / stage


def checkpoint_uri(stage: Stage, run_dir: Path) -> str:
    return stage.checkpoint.uri or f"file://{run_dir.parent.resolve()}/checkpoints"


def _stage_stores(stage: Stage, run_dir: Path) -> list[str]:
    """Every store a stage reads or writes: its data sources, then its checkpoints."""
    return [*(src.uri for src in [*stage.data.sources, *stage.data.eval_sources]), checkpoint_uri(stage, run_dir)]


def _check_stores(uris: list[str], log: logging.Logger) -> None:
    """Fail in one line naming the URI and the fix (RunSetupError: exit 2, not retried) when an
    object store is misconfigured: no credentials, no such bucket, access denied. Otherwise the
    data reads and checkpoint uploads would retry it for their whole budgets (issue 20).

    A store that is down or silent is only logged: a worker restarted during an outage should
    ride it out with those budgets. One endpoint serves every s3:// URI, so after one such
    failure the rest are not probed (each would wait out the same timeout). A bucket is
    probed once, however many URIs it holds.
    """
    probed = set()
    for uri in uris:
        bucket = uri.split("/", 3)[:3]  # scheme, "", bucket: what one probe answers for
        if tuple(bucket) in probed:
            continue
        probed.add(tuple(bucket))
        try:
            check_storage(uri)
        except StorageConfigError as exc:
            raise RunSetupError(str(exc)) from None
        except StorageError as exc:
            log.warning("%s; continuing: data reads and checkpoint uploads retry within their budgets", exc)
            return


def _publish_eval(job: JobSpec, stage: Stage, world: WorldInfo, run_dir: Path, log: logging.Logger) -> None:
    """Copy the stage's eval.json beside its checkpoints, where `platformctl status` finds it on a
    cluster (a pod's run directory goes with the pod). Best effort: the local copy stays."""
    local = run_dir / EVAL_RECORD
    if not world.is_main or not local.exists():
        return
    url = f"{checkpoint_uri(stage, run_dir).rstrip('/')}/{job.metadata.name}/{stage.name}"
    try:
        location = open_location(url, storage_options(url))
        if location.is_local:  # object stores have no directories to make
            location.fs.makedirs(location.root, exist_ok=True)
        location.fs.pipe_file(location.path(EVAL_RECORD), local.read_bytes())
    except Exception as exc:  # noqa: BLE001 - any storage error: the evaluation itself is done
        log.warning("could not copy %s to %s: %s", EVAL_RECORD, url, exc)


def _serve_metrics(metrics: Metrics, stage: Stage, world: WorldInfo, log: logging.Logger) -> None:
    """Each process on a node serves on base port + local rank; a busy port is logged, not fatal."""
    base = int(os.environ.get("PS3_METRICS_PORT", stage.monitoring.port))
    port = base + world.local_rank
    try:
        metrics.serve(port)
        log.info("metrics on :%d/metrics", port)
    except OSError as exc:
        log.warning("metrics port %d unavailable (%s); continuing without /metrics", port, exc.strerror)


def _context(job: JobSpec, stage: Stage, world: WorldInfo, plan: BatchPlan, metrics: Metrics,
             run_dir: Path, log: logging.Logger) -> RunContext:
    train = stage.train
    return RunContext(
        job=job.metadata.name, stage=stage, rank=world.rank, world_size=world.world_size,
        local_rank=world.local_rank, device=world.device, batch=plan, run_dir=run_dir, metrics=metrics, log=log,
        parallelize=lambda model: parallelize(model, world, ParallelizeConfig.from_train(train)),
        build_optimizer=lambda params: build_optimizer(params, train),
        build_scheduler=lambda optimizer: build_scheduler(optimizer, train),
        load_weights=lambda model, url: load_weights(model, url, world, metrics),
        record_uri=f"{checkpoint_uri(stage, run_dir).rstrip('/')}/{job.metadata.name}/{stage.name}",
    )


def load_weights(model, url: str, world: WorldInfo, metrics: Metrics) -> int:
    """Model weights (no optimizer) from a committed checkpoint of another stage."""
    from .state import ModelAndOptimizer

    base, job, stage = (url.rstrip("/").rsplit("/", 2) + ["", ""])[:3]
    reader = Checkpointer(uri=base, job=job or "job", stage=stage or "stage", keep=1, keep_every=None,
                          async_save=False, rank=world.rank, world_size=world.world_size, metrics=metrics)
    try:
        step, _ = reader.load({"app": ModelAndOptimizer(model, None)}, source=url)
    except CheckpointError as exc:
        raise TaskSetupError(f"cannot load weights from {url}: {exc}") from None
    return step


def _checkpointer(job: JobSpec, stage: Stage, world: WorldInfo, metrics: Metrics, run_dir: Path, stop: StopFlag,
                  notes: JsonlLog) -> Checkpointer:
    """`notes`: this rank's storage-failure records (`checkpoint-rank-N.jsonl`, read by `status`):
    every rank's, since a rank waiting on a commit may be the only one that sees the store fail."""
    ckpt = stage.checkpoint
    return Checkpointer(
        uri=checkpoint_uri(stage, run_dir), job=job.metadata.name, stage=stage.name, keep=ckpt.keep,
        keep_every=ckpt.keep_every, async_save=ckpt.async_, rank=world.rank, world_size=world.world_size,
        metrics=metrics, retry_budget_s=ckpt.retry_budget_seconds, request_timeout_s=ckpt.request_timeout_seconds,
        stop=stop, stop_grace_s=ckpt.stop_grace_seconds, note=notes.write,
        peers=Peers.from_env(world.restart_count) if world.world_size > 1 else None,
    )


def run_stage(job: JobSpec, stage: Stage, world: WorldInfo, plan: BatchPlan, log: logging.Logger, *,
              spec_hash: str, allow_spec_change: bool) -> str:
    """Run one stage in this process; returns 'completed' or 'preempted'."""
    stop = StopFlag().install()
    init_distributed(world)
    run_dir = run_dir_for(job.metadata.name, stage.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    stage = expand_run_placeholder(stage, str(run_dir.parent.resolve()))
    (run_dir / f"rank-{world.rank}.pid").write_text(str(os.getpid()))  # which process is which rank
    metrics = Metrics(job.metadata.name, stage.name, world.rank)
    _serve_metrics(metrics, stage, world, log)
    start_gpu_sampler(metrics, world.device)
    try:
        _check_stores(_stage_stores(stage, run_dir), log)  # before the task opens its data
        seed_everything(stage.train.seed)  # identical initial weights on every rank
        try:
            build = resolve_task(stage.task)
        except UnknownTaskError as exc:
            raise RunSetupError(str(exc)) from None
        ctx = _context(job, stage, world, plan, metrics, run_dir, log)
        try:
            task: TaskState = build(ctx)
        except TaskSetupError as exc:
            raise RunSetupError(str(exc)) from None
        seed_everything(stage.train.seed + 1000 * world.rank)  # distinct per-rank randomness from here on
        if task.run is not None:
            try:
                task.run()
            except TaskSetupError as exc:  # found only once running (a data task's inputs): still one line
                raise RunSetupError(str(exc)) from None
            _publish_eval(job, stage, world, run_dir, log)
            return "completed"
        jsonl = JsonlLog(run_dir / "metrics.jsonl" if world.is_main else None)
        notes = JsonlLog(run_dir / f"checkpoint-rank-{world.rank}.jsonl")
        notes.write({"checkpoint": "started"})  # a failure noted by an earlier attempt is history
        checkpointer = _checkpointer(job, stage, world, metrics, run_dir, stop, notes)
        trainer = Trainer(ctx, task, world, checkpointer, spec_hash=spec_hash, allow_spec_change=allow_spec_change,
                          stop=stop, log=jsonl)
        outcome = "failed"
        try:
            outcome = trainer.train()
            if outcome == "completed" and task.evaluate is not None:
                task.evaluate()
                _publish_eval(job, stage, world, run_dir, log)
        except (SpecChangedError, CheckpointNotFoundError, CheckpointCorruptError) as exc:
            raise RunSetupError(str(exc)) from None  # retrying cannot help: the user must choose
        finally:  # whatever happened: the step reached and the step a resume starts from (`cancel` says both)
            committed = checkpointer.committed_step if checkpointer is not None else None
            jsonl.write({"event": outcome, "step": trainer.counters.step, "committed": committed})
            jsonl.close()
            notes.close()
        return outcome
    finally:
        shutdown_distributed()
