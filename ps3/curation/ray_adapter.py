"""The one module that calls Ray Data: it turns the stages into a streaming dataset.

Functions become Ray tasks (`map`), model stages become fixed actor pools
(`map_batches` with `ActorPoolStrategy`, an integer batch size and the GPUs the stage's
pool has), so a Ray upgrade touches this file only. Nothing is collected on the driver:
`iter_rows` streams finished rows to the shard writer as they complete.
"""

from __future__ import annotations

from collections.abc import Iterator

from .actors import Caption, DocumentText, Segment
from .config import CurationConfig
from .stages import read_input, select_boxes

#: Rows (images) per model call; one 4K image's masks take a SAM forward per crop already.
SEGMENT_BATCH = 1
DOCUMENT_BATCH = 2
#: Rows per Ray Data block: one per block for small runs, at most this many for large ones.
ROWS_PER_BLOCK = 8
MIN_BLOCKS = 200


def _quiet() -> None:
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # progress goes to status and metrics, not the log
    context.actor_task_retry_on_errors = False  # per-row errors are values (stages.failed), not exceptions


class ResourceError(ValueError):
    """The actor pools ask for more than the Ray cluster has (they would wait forever)."""


def _actors(ds, cls, config: CurationConfig, size: int, batch_size: int, gpus: float):
    from ray.data import ActorPoolStrategy

    return ds.map_batches(
        cls, fn_constructor_kwargs={"config": config, "device": "cuda" if gpus > 0 else "cpu"},
        compute=ActorPoolStrategy(size=size), batch_size=batch_size, batch_format="pandas",
        num_cpus=config.workers.cpus_per_actor, num_gpus=gpus,
    )


def actor_gpus(config: CurationConfig) -> tuple[float, float]:
    """GPUs per mask actor and per caption actor: only models that use one get one."""
    gpus = config.workers.gpus_per_actor
    return (gpus if config.masks.generator == "sam" else 0.0,
            gpus if config.captions.captioner == "qwen2-vl" else 0.0)


def check_resources(kind: str, config: CurationConfig) -> None:
    """Fail in one line when the pools cannot all be placed (Ray Data would wait for them forever)."""
    import ray

    workers = config.workers
    pools = [workers.masks, workers.captions] if kind == "natural" else [workers.captions]
    mask_gpus, caption_gpus = actor_gpus(config)
    gpus = workers.masks * mask_gpus + workers.captions * caption_gpus if kind == "natural" else 0.0
    cpus = sum(pools) * workers.cpus_per_actor
    have = ray.cluster_resources()
    if gpus > have.get("GPU", 0) or cpus > have.get("CPU", 0):
        raise ResourceError(
            f"{kind} curation needs {sum(pools)} actors with {cpus:g} CPUs and {gpus:g} GPUs in all, the Ray "
            f"cluster has {have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs: lower params.workers "
            "(masks, captions, cpusPerActor, gpusPerActor) or add nodes")


def stream(rows: list[dict], kind: str, config: CurationConfig) -> Iterator[dict]:
    """Run `rows` (inputs of one kind) through their stages; yields each finished row."""
    import ray.data

    if not rows:
        return
    _quiet()
    check_resources(kind, config)
    # Small blocks: a block is the unit of work (and of loss, if an actor dies), and shards
    # can only be written once all their rows are back.
    blocks = min(len(rows), max(MIN_BLOCKS, -(-len(rows) // ROWS_PER_BLOCK)))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    # The CPU stages ask for what the actors ask for, so Ray Data fuses each into the actor stage
    # after it (one process, no extra copies). With different requests they stay separate tasks,
    # and pools that hold every CPU would starve them: the run would wait forever.
    cpus = config.workers.cpus_per_actor
    ds = ds.map(read_input, fn_kwargs={"config": config}, num_cpus=cpus)
    if kind == "natural":
        mask_gpus, caption_gpus = actor_gpus(config)
        ds = _actors(ds, Segment, config, config.workers.masks, SEGMENT_BATCH, mask_gpus)
        ds = ds.map(select_boxes, fn_kwargs={"config": config}, num_cpus=cpus)
        ds = _actors(ds, Caption, config, config.workers.captions, max(1, config.captions.batch_size // 4),
                     caption_gpus)
    else:
        ds = _actors(ds, DocumentText, config, config.workers.captions, DOCUMENT_BATCH, 0.0)  # Tesseract: CPU
    yield from ds.iter_rows()
