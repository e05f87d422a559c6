"""Checks that need the platform configuration (pools), on top of the pure models."""

from __future__ import annotations

import difflib

from .batch import BatchPlanError, plan_batch
from .load import LoadedSpec, SpecError, SpecIssue
from .models import StageBody, TrainingJob
from .pools import PoolConfig


def _stage_prefix(loaded: LoadedSpec, index: int) -> tuple:
    return ("spec",) if isinstance(loaded.job, TrainingJob) else ("spec", "stages", index)


def _stage_issues(loaded: LoadedSpec, stage: StageBody, prefix: tuple, pools: PoolConfig) -> list[SpecIssue]:
    issues: list[SpecIssue] = []
    res = stage.resources
    pool = pools.pools.get(res.pool)
    if pool is None:
        close = difflib.get_close_matches(res.pool, list(pools.pools), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known pools: {', '.join(sorted(pools.pools))}"
        issues.append(loaded.issue(prefix + ("resources", "pool"), f"pool {res.pool!r} does not exist; {hint}"))
        return issues
    if res.gpus_per_node > pool.gpus_per_node:
        issues.append(loaded.issue(
            prefix + ("resources", "gpusPerNode"),
            f"pool {res.pool!r} has {pool.gpus_per_node} GPUs per node, the stage asks for {res.gpus_per_node}",
        ))
    elif pool.gpus_per_node and not res.gpus_per_node:
        # Otherwise the pod lands on (and taints away) a GPU node without requesting a GPU.
        issues.append(loaded.issue(
            prefix + ("resources", "pool"),
            f"pool {res.pool!r} is a GPU pool ({pool.gpus_per_node} per node) but resources.gpusPerNode is 0; "
            f"set gpusPerNode (1-{pool.gpus_per_node}) or use a CPU pool",
        ))
    node_counts = {res.nodes}
    if stage.elastic:
        node_counts |= {stage.elastic.min_nodes, stage.elastic.max_nodes}
        if not stage.elastic.min_nodes <= res.nodes <= stage.elastic.max_nodes:
            issues.append(loaded.issue(
                prefix + ("resources", "nodes"),
                f"nodes ({res.nodes}) must lie between elastic.minNodes ({stage.elastic.min_nodes}) "
                f"and elastic.maxNodes ({stage.elastic.max_nodes})",
            ))
    if stage.elastic:  # a rendezvous may form at any count in the range
        node_counts |= set(range(stage.elastic.min_nodes, stage.elastic.max_nodes + 1))
    for nodes in sorted(node_counts):
        try:
            plan_batch(stage.train.global_batch, nodes * res.nproc, stage.train.micro_batch)
        except BatchPlanError as exc:
            issues.append(loaded.issue(prefix + ("train", "globalBatch"),
                                       f"at {nodes} nodes x {res.nproc} processes: {exc}"))
            break
    return issues


def check_against_pools(loaded: LoadedSpec, pools: PoolConfig) -> None:
    """Raise SpecError listing every stage that does not fit the configured pools."""
    job = loaded.job
    stages = [job.spec] if isinstance(job, TrainingJob) else list(job.spec.stages)
    issues: list[SpecIssue] = []
    for index, stage in enumerate(stages):
        issues += _stage_issues(loaded, stage, _stage_prefix(loaded, index), pools)
    if issues:
        raise SpecError(issues)
