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


def _quiet() -> None:
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # progress goes to status and metrics, not the log
    context.actor_task_retry_on_errors = False  # per-row errors are values (stages.failed), not exceptions


def _actors(ds, cls, config: CurationConfig, size: int, batch_size: int):
    from ray.data import ActorPoolStrategy

    workers = config.workers
    device = "cuda" if workers.gpus_per_actor > 0 else "cpu"
    return ds.map_batches(
        cls, fn_constructor_kwargs={"config": config, "device": device}, compute=ActorPoolStrategy(size=size),
        batch_size=batch_size, batch_format="pandas", num_cpus=workers.cpus_per_actor,
        num_gpus=workers.gpus_per_actor,
    )


def stream(rows: list[dict], kind: str, config: CurationConfig) -> Iterator[dict]:
    """Run `rows` (inputs of one kind) through their stages; yields each finished row."""
    import ray.data

    if not rows:
        return
    _quiet()
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 200)))
    # The CPU stages ask for what the actors ask for, so Ray Data fuses each into the actor stage
    # after it (one process, no extra copies). With different requests they stay separate tasks,
    # and pools that hold every CPU would starve them: the run would wait forever.
    cpus = config.workers.cpus_per_actor
    ds = ds.map(read_input, fn_kwargs={"config": config}, num_cpus=cpus)
    if kind == "natural":
        ds = _actors(ds, Segment, config, config.workers.masks, SEGMENT_BATCH)
        ds = ds.map(select_boxes, fn_kwargs={"config": config}, num_cpus=cpus)
        ds = _actors(ds, Caption, config, config.workers.captions, max(1, config.captions.batch_size // 4))
    else:
        ds = _actors(ds, DocumentText, config, config.workers.captions, DOCUMENT_BATCH)
    yield from ds.iter_rows()
