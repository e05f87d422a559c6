"""How large a stage's /dev/shm must be, from its data settings (pure, no torch).

Data-loader worker processes hand each micro-batch to the training process through
/dev/shm, so a node holds, per rank, every batch its workers have made ahead plus the one
being consumed:

    need = procs per node x per-rank micro-batch x bytes per sample
           x (numWorkers x PREFETCH_FACTOR + 1) + MARGIN

Pixels cross as uint8 (`ps3.data.views`); as float32 they took four times the room: at
the 4K settings (ps3-4k-siglip, micro-batch 32, 8 workers, 8 ranks a node) about 145 GiB
a node, against 39 GiB as uint8. A spec's `resources.shmSize` still wins; `shm_warnings`
says when it is too small for the data settings, or when the size exceeds the pod's memory.

The preset numbers are copied here (`PRESET_GEOMETRY`) because `ps3.model` imports torch
and `platformctl validate` must not; a test keeps the copy equal to `ps3.model.get_preset`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from ps3_platform.spec import Stage
from ps3_platform.spec.batch import plan_batch

GIB = 1 << 30
#: /dev/shm of a stage whose task sends no known image batches (curate's Ray object store uses it too).
DEFAULT_SHM = "16Gi"
#: Room beside the batches. Checkpoint staging writes this node's shards of the training state
#: to /dev/shm (runtime/checkpoint/staging.py `default_staging_root`) and falls back to the temp
#: dir when they do not fit (writer `_staging_dir`); NCCL keeps its intra-node buffers there.
#: A fixed margin, not the state size (the spec does not say it: a VILA-HD LLM comes from a
#: URI): 4 GiB holds a PS3-4K node's share (~0.9 B parameters x 12 bytes with AdamW, over 64
#: or more ranks: < 2 GB). Larger states stage on disk unless shmSize is raised.
MARGIN = 4 * GIB
#: Micro-batches each loader worker keeps ready (ps3.data.loader.LoaderConfig.prefetch_factor,
#: the same in ps3.vila_hd.loader.ConversationLoaderConfig).
PREFETCH_FACTOR = 2
#: A preset whose top scale is at most this sends whole high-res views, above it pre-gathered
#: patches (ps3.data.views.ViewConfig.full_max with highres "auto", as the tasks build it).
FULL_VIEWS_MAX = 1024
#: ps3_eval's images per batch when its params do not say (ps3.tasks.params.EvalParams.batch_size).
EVAL_BATCH = 32
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|Ki|Mi|Gi|Ti|M|G|T)?$")
_UNITS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
          "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}


@dataclass(frozen=True)
class Geometry:
    """The preset numbers a batch's size depends on."""

    scales: tuple[int, ...]  # low-res first, e.g. (378, 756, 1512, 3780)
    patch_size: int
    selection_view_size: int
    max_select_num: int  # high-res patches per image

    @property
    def patches(self) -> bool:
        """Whether high-res input is pre-gathered patches rather than whole views."""
        return self.scales[-1] > FULL_VIEWS_MAX


PRESET_GEOMETRY = {
    "ps3-1.5k-siglip": Geometry((378, 756, 1512), 14, 1512, 2560),
    "ps3-4k-siglip": Geometry((378, 756, 1512, 3780), 14, 1512, 2560),
    "ps3-tiny": Geometry((64, 128, 256), 8, 256, 80),
    "ps3-tiny-4s": Geometry((64, 128, 256, 512), 8, 256, 160),
}


@dataclass(frozen=True)
class ShmNeed:
    """What a stage's /dev/shm must hold, and how the figure came about (for messages)."""

    bytes: int
    procs: int  # ranks on a node
    micro_batch: int  # samples per rank per micro-batch
    in_flight: int  # micro-batches per rank in /dev/shm at once

    @property
    def quantity(self) -> str:
        return f"{math.ceil(self.bytes / GIB)}Gi"

    def explain(self) -> str:
        return f"{self.procs} ranks x {self.in_flight} micro-batches of {self.micro_batch} in flight, uint8 pixels"


def quantity_bytes(quantity: str | int | float) -> float:
    """Bytes of a Kubernetes quantity as the spec accepts them ('64Gi', '500M', 1e9)."""
    match = _QUANTITY.match(str(quantity))
    if not match:
        raise ValueError(f"{quantity!r} is not a Kubernetes quantity")
    return float(match.group(1)) * _UNITS[match.group(2)]


def geometry_of(stage: Stage) -> Geometry | None:
    """The stage's preset with the spec's overrides, or None for a preset not known here."""
    geometry = PRESET_GEOMETRY.get(stage.model.preset or "")
    overrides = dict(stage.model.overrides)
    if stage.task == "ps3_pretrain" and stage.params.get("maxSelectedPatches"):
        overrides["max_select_num"] = stage.params["maxSelectedPatches"]  # as the task's preset_for applies it
    try:
        fields = {k: int(overrides[k]) for k in ("patch_size", "selection_view_size", "max_select_num")
                  if k in overrides}
        if "scales" in overrides:
            fields["scales"] = tuple(int(s) for s in overrides["scales"])
    except (TypeError, ValueError):  # the task rejects such overrides when it starts
        return None
    return replace(geometry, **fields) if geometry else None


def ps3_sample_bytes(g: Geometry) -> int:
    """One PS3 sample as the loader sends it: uint8 views, float32 maps, int64 patch indexes."""
    views = g.scales[0] ** 2 + g.selection_view_size ** 2
    if g.patches:
        highres = g.max_select_num * g.patch_size ** 2  # hr_patches [K, 3, p, p]
    else:
        highres = sum(s * s for s in g.scales[1:])  # highres [3, S, S] per scale
    maps = 2 * 4 * sum((s // g.patch_size) ** 2 for s in g.scales[1:])  # gt_maps + saliency_maps
    index = 8 * g.max_select_num if g.patches else 0  # hr_index
    return 3 * (views + highres) + maps + index


def lowres_sample_bytes(g: Geometry) -> int:
    """One low-res contrastive pair (`lowres_pretrain`): the uint8 low-res view or crop alone."""
    return 3 * g.scales[0] ** 2


def vila_hd_sample_bytes(g: Geometry) -> int:
    """One conversation's image, squashed to the top scale as uint8 [3, S, S]; interleaved
    samples with several images need that much per image."""
    return 3 * g.scales[-1] ** 2


def rank_micro_batch(stage: Stage) -> int:
    """Samples per rank per micro-batch; with elasticity at the fewest nodes, the largest."""
    if stage.task == "ps3_eval":
        return int(stage.params.get("batchSize", EVAL_BATCH))  # one loader per rank, world size 1
    nodes = stage.elastic.min_nodes if stage.elastic else stage.resources.nodes
    world = min(nodes * stage.resources.nproc, stage.train.global_batch)
    return plan_batch(stage.train.global_batch, world, stage.train.micro_batch).micro_batch


def shm_need(stage: Stage) -> ShmNeed | None:
    """What /dev/shm must hold for the stage's data settings (see the module docstring), or
    None when its task or preset is not one whose batches are known here."""
    geometry = geometry_of(stage)
    per_sample = {"ps3_pretrain": ps3_sample_bytes, "ps3_eval": ps3_sample_bytes,
                  "lowres_pretrain": lowres_sample_bytes, "vila_hd": vila_hd_sample_bytes}.get(stage.task)
    if geometry is None or per_sample is None:
        return None
    workers = stage.data.num_workers
    in_flight = workers * PREFETCH_FACTOR + 1 if workers else 0  # no workers: batches stay in-process
    procs, micro = stage.resources.nproc, rank_micro_batch(stage)
    return ShmNeed(procs * micro * per_sample(geometry) * in_flight + MARGIN, procs, micro, in_flight)


def shm_size(stage: Stage) -> str:
    """The sizeLimit of the stage's /dev/shm: the spec's shmSize, else the need, else DEFAULT_SHM."""
    if stage.resources.shm_size is not None:
        return str(stage.resources.shm_size)
    need = shm_need(stage)
    return need.quantity if need else DEFAULT_SHM


def shm_warnings(stage: Stage) -> list[str]:
    """One line per problem: a given shmSize below the need, or a size above the pod's memory."""
    where, need, size = f"stage {stage.name!r}", shm_need(stage), shm_size(stage)
    fewer = "or lower data.numWorkers or train.microBatch"
    warnings = []
    if stage.resources.shm_size is not None and need and quantity_bytes(size) < need.bytes:
        warnings.append(f"{where}: /dev/shm needs {need.quantity} for its data settings ({need.explain()}) but "
                        f"resources.shmSize is {size}; set resources.shmSize to {need.quantity} {fewer}")
    memory = stage.resources.memory
    if memory is not None and quantity_bytes(size) > quantity_bytes(memory):
        given = "resources.shmSize" if stage.resources.shm_size is not None else "derived from the data settings"
        warnings.append(f"{where}: /dev/shm of {size} ({given}) exceeds resources.memory {memory}, which a "
                        f"memory-backed /dev/shm counts against; raise resources.memory above {size} {fewer}")
    return warnings
