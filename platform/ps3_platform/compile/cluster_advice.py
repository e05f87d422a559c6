"""Things that compile fine but will not work as the user expects on a cluster.

Not errors: `render` must work for specs written for the local backend (quickstart),
and the same spec is valid there. `platformctl submit --backend kubernetes` prints these.
"""

from __future__ import annotations

from ps3_platform.spec import JobSpec, splits_evenly, stages_of


def _ranges(numbers: list[int]) -> str:
    """[9, 10, 11, 13] -> '9-11, 13'."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def unsplittable_node_counts(stage) -> list[int]:
    """Node counts the elastic range admits at which the global batch cannot be split evenly.

    The validator checks minNodes, nodes and maxNodes; a rendezvous may also form at any
    count in between (a lost node), where the runtime would stop with a batch-plan error.
    """
    if stage.elastic is None:
        return []
    nproc, batch = stage.resources.nproc, stage.train.global_batch
    return [n for n in range(stage.elastic.min_nodes, stage.elastic.max_nodes + 1) if not splits_evenly(batch, n * nproc)]


def cluster_warnings(job: JobSpec) -> list[str]:
    """One line per stage setting that compiles but will not behave as expected on a cluster."""
    warnings = []
    for stage in stages_of(job):
        where = f"stage {stage.name!r}"
        if bad := unsplittable_node_counts(stage):
            warnings.append(f"{where}: globalBatch {stage.train.global_batch} cannot be split over "
                            f"{_ranges(bad)} nodes x {stage.resources.nproc} processes; if the elastic "
                            "rendezvous forms at one of those counts the workers stop with a batch-plan error "
                            "and the agent restarts them (maxRestarts) until the count changes")
        if stage.checkpoint.uri is None:
            warnings.append(f"{where}: checkpoint.uri is not set, so checkpoints stay inside the pod and are lost when "
                            "it is restarted; set it to an object-store URI such as s3://bucket/checkpoints")
        elif stage.checkpoint.uri.startswith("file://"):
            warnings.append(f"{where}: checkpoint.uri {stage.checkpoint.uri} is a path inside the pod; "
                            "use an object-store URI (s3://...) so restarted pods can resume")
        for source in stage.data.sources + stage.data.eval_sources:
            if source.uri.startswith("file://"):
                warnings.append(f"{where}: data source {source.name!r} ({source.uri}) must exist inside the image")
    return warnings
