"""/dev/shm sized from the data settings: the formula, its preset copies, the pod, the warnings."""

from __future__ import annotations

import pytest
from ps3_platform.cli import main
from ps3_platform.compile import cluster_warnings, compile_job, pytorchjobs_in
from ps3_platform.compile.cluster_advice import sizing_warnings
from ps3_platform.compile.shm import (
    EVAL_BATCH,
    FULL_VIEWS_MAX,
    GIB,
    MARGIN,
    PREFETCH_FACTOR,
    PRESET_GEOMETRY,
    ps3_sample_bytes,
    quantity_bytes,
    shm_need,
    shm_size,
    vila_hd_sample_bytes,
)
from ps3_platform.spec import load_text, parse_pools, stages_of

POOLS = parse_pools("pools: {cpu: {}, h100: {gpusPerNode: 8}}", "test-pools")


def spec(*, preset: str = "ps3-tiny", task: str = "ps3_pretrain", resources: str = "{pool: cpu}",
         workers: int = 2, train: str = "{globalBatch: 8}", params: str = "{}") -> str:
    return f"""
apiVersion: ps3.platform/v1
kind: TrainingJob
metadata: {{name: shm}}
spec:
  task: {task}
  resources: {resources}
  model: {{preset: {preset}}}
  data: {{numWorkers: {workers}}}
  train: {train}
  params: {params}
"""


def stage_of(text: str):
    (stage,) = stages_of(load_text(text).job)
    return stage


#: The 4K recipe's data settings (jobs/ps3_4k.yaml): 8 ranks a node, micro-batch 32, 8 workers.
PS3_4K = dict(preset="ps3-4k-siglip", resources="{pool: h100, nodes: 16, gpusPerNode: 8, memory: 1600Gi}",
              workers=8, train="{globalBatch: 4096, microBatch: 32, steps: 10}")


# ---- the formula ---------------------------------------------------------------------------
def test_tiny_preset_need():
    """ps3-tiny sends whole views (top scale 256): 3 x (64^2 + 256^2 + 128^2 + 256^2) uint8 pixels
    + float32 gt and saliency maps of 16^2 and 32^2 cells = 464,896 bytes a sample."""
    assert ps3_sample_bytes(PRESET_GEOMETRY["ps3-tiny"]) == 3 * (64**2 + 256**2 + 128**2 + 256**2) + 8 * (16**2 + 32**2)
    need = shm_need(stage_of(spec()))  # 1 rank, all 8 samples a micro-batch, 2 workers x 2 + 1 in flight
    assert (need.procs, need.micro_batch, need.in_flight) == (1, 8, 5)
    assert need.bytes == 8 * 464_896 * 5 + MARGIN and need.quantity == "5Gi"
    assert shm_need(stage_of(spec(workers=0))).bytes == MARGIN  # no workers: batches never cross processes


def test_4k_need_uint8_is_a_quarter_of_float32():
    """The issue's figure: float32 views in flight at the 4K settings take ~145 GiB a node (the pod
    has 64Gi); uint8 pixels take a quarter of that, with the float32 maps and the margin 43Gi."""
    need = shm_need(stage_of(spec(**PS3_4K)))
    g = PRESET_GEOMETRY["ps3-4k-siglip"]
    pixels = 3 * (378**2 + 1512**2 + 2560 * 14**2)  # lowres + selection view + 2560 patches
    assert ps3_sample_bytes(g) - pixels == 8 * (54**2 + 108**2 + 270**2) + 8 * 2560  # maps, patch indexes
    samples_in_flight = 8 * 32 * (8 * PREFETCH_FACTOR + 1)
    as_float32 = samples_in_flight * (ps3_sample_bytes(g) + 3 * pixels) / GIB
    assert 144 < as_float32 < 147
    assert need.bytes - MARGIN == samples_in_flight * ps3_sample_bytes(g)
    assert (need.bytes - MARGIN) / GIB < 0.27 * as_float32 and need.quantity == "43Gi"


def test_elastic_stage_is_sized_at_its_fewest_nodes():
    """Without a micro-batch cap each rank takes its share: largest with the fewest ranks."""
    fixed = shm_need(stage_of(spec(resources="{pool: h100, nodes: 4, gpusPerNode: 8}", train="{globalBatch: 64}")))
    elastic = spec(resources="{pool: h100, nodes: 4, gpusPerNode: 8}", train="{globalBatch: 64}").replace(
        "  model:", "  elastic: {minNodes: 1, maxNodes: 4}\n  model:")
    assert fixed.micro_batch == 2 and shm_need(stage_of(elastic)).micro_batch == 8


def test_overrides_and_task_settings_change_the_need():
    base = shm_need(stage_of(spec(preset="ps3-4k-siglip")))
    fewer = shm_need(stage_of(spec(preset="ps3-4k-siglip", params="{maxSelectedPatches: 1000}")))
    assert base.bytes - fewer.bytes == 8 * 5 * 1560 * (3 * 14**2 + 8)  # patches and their indexes
    evaluation = shm_need(stage_of(spec(task="ps3_eval", params="{batchSize: 4}")))
    assert evaluation.micro_batch == 4 and shm_need(stage_of(spec(task="ps3_eval"))).micro_batch == EVAL_BATCH
    vila = shm_need(stage_of(spec(task="vila_hd", preset="ps3-4k-siglip")))
    assert vila.bytes == 8 * 3 * 3780**2 * 5 + MARGIN
    assert vila_hd_sample_bytes(PRESET_GEOMETRY["ps3-4k-siglip"]) == 3 * 3780**2
    lowres = shm_need(stage_of(spec(task="lowres_pretrain", preset="ps3-4k-siglip")))
    assert lowres.bytes == 8 * 3 * 378**2 * 5 + MARGIN  # the low-res view or crop alone


@pytest.mark.parametrize("text", [spec(task="noop"), spec(preset="someone-elses"), spec(task="curate")])
def test_stages_without_known_batches_keep_the_old_default(text):
    stage = stage_of(text)
    assert shm_need(stage) is None and shm_size(stage) == "16Gi"


def test_quantities():
    assert quantity_bytes("64Gi") == 64 * GIB and quantity_bytes("1.5G") == 1.5e9 and quantity_bytes(1000) == 1000
    with pytest.raises(ValueError):
        quantity_bytes("64GB")


# ---- the copies of the preset and loader numbers ----------------------------------------------
def test_preset_copies_match_the_registry():
    from ps3.model import get_preset, list_presets

    assert set(PRESET_GEOMETRY) == set(list_presets())
    for name, g in PRESET_GEOMETRY.items():
        p = get_preset(name)
        assert (g.scales, g.patch_size, g.selection_view_size, g.max_select_num) == (
            p.scales, p.patch_size, p.selection_view_size, p.max_select_num), name


def test_loader_numbers_match_the_loaders():
    from ps3.data.loader import LoaderConfig
    from ps3.data.views import ViewConfig
    from ps3.tasks.params import EvalParams
    from ps3.vila_hd.loader import ConversationLoaderConfig

    assert LoaderConfig(8, 8).prefetch_factor == PREFETCH_FACTOR
    assert ConversationLoaderConfig(8, 8, 8, 8, 8).prefetch_factor == PREFETCH_FACTOR
    assert ViewConfig((32, 64), 16, (4,), 64, 6).full_max == FULL_VIEWS_MAX
    assert EvalParams().batch_size == EVAL_BATCH


@pytest.mark.parametrize("name", ["ps3-tiny", "ps3-1.5k-siglip"], ids=["whole views", "patches"])
def test_sample_bytes_are_what_the_loader_makes(name):
    """The formula against the tensors `sample_tensors` returns for one sample."""
    import numpy as np

    from ps3.data.views import PlainPixels, ViewConfig, sample_tensors
    from ps3.model import get_preset
    from PIL import Image

    p = get_preset(name)
    views = ViewConfig(p.scales, p.patch_size, p.budgets, p.selection_view_size, p.text_context_length)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8))
    tensors = sample_tensors(PlainPixels(image), 128, 96, (10.0, 10.0, 60.0, 50.0), views)
    made = sum(t.numel() * t.element_size() for v in tensors.values() for t in (v if isinstance(v, list) else [v]))
    assert made == ps3_sample_bytes(PRESET_GEOMETRY[name])


# ---- the pod and the warnings --------------------------------------------------------------
def _shm_volume(text: str) -> dict:
    (job,) = pytorchjobs_in(compile_job(load_text(text).job, POOLS))
    volumes = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["volumes"]
    return next(v for v in volumes if v["name"] == "dshm")["emptyDir"]


def test_pod_gets_the_derived_size_and_an_explicit_size_wins():
    assert _shm_volume(spec(**PS3_4K)) == {"medium": "Memory", "sizeLimit": "43Gi"}
    given = {**PS3_4K, "resources": PS3_4K["resources"].replace("}", ", shmSize: 64Gi}")}
    assert _shm_volume(spec(**given))["sizeLimit"] == "64Gi"
    assert sizing_warnings(load_text(spec(**given)).job) == []


def test_explicit_size_below_the_need_warns_with_the_fix():
    small = {**PS3_4K, "resources": PS3_4K["resources"].replace("}", ", shmSize: 16Gi}")}
    (line,) = sizing_warnings(load_text(spec(**small)).job)
    assert line == ("stage 'train': /dev/shm needs 43Gi for its data settings (8 ranks x 17 micro-batches of 32 in "
                    "flight, uint8 pixels) but resources.shmSize is 16Gi; set resources.shmSize to 43Gi or lower "
                    "data.numWorkers or train.microBatch")
    assert line in cluster_warnings(load_text(spec(**small)).job)  # render and submit print it too


def test_size_above_the_pod_memory_warns():
    tight = {**PS3_4K, "resources": "{pool: h100, nodes: 16, gpusPerNode: 8, memory: 32Gi}"}
    (line,) = sizing_warnings(load_text(spec(**tight)).job)
    assert line.startswith("stage 'train': /dev/shm of 43Gi (derived from the data settings) exceeds "
                           "resources.memory 32Gi") and "raise resources.memory above 43Gi" in line


def test_validate_prints_the_warning(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    small = {**PS3_4K, "resources": PS3_4K["resources"].replace("}", ", shmSize: 16Gi}")}
    path.write_text(spec(**small))
    assert main(["validate", str(path)]) == 0
    err = capsys.readouterr().err
    assert "warning: stage 'train': /dev/shm needs 43Gi" in err and "set resources.shmSize to 43Gi" in err
