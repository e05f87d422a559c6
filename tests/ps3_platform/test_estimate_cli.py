"""`platformctl estimate` as a user runs it: the quickstart spec, its table and JSON, pools that
fit or do not, a priced pool, and the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ps3_platform.cli import main

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "jobs" / "quickstart.yaml")
#: A pool too small for the quickstart's micro-batch of 16 (~120 MiB per rank), one roomy and priced.
POOLS = """
pools:
  cpu: {}
  small: {gpusPerNode: 8, gpuMemoryGb: 0.06, gpuPeakTflops: 1}
  roomy: {gpusPerNode: 8, gpuMemoryGb: 80, gpuPeakTflops: 989, pricePerGpuHour: 2.5}
"""


@pytest.fixture
def pools(tmp_path) -> str:
    path = tmp_path / "pools.yaml"
    path.write_text(POOLS)
    return str(path)


def _estimate(capsys, *args: str) -> dict:
    assert main(["estimate", QUICKSTART, "-o", "json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def _pretrain(result: dict) -> dict:
    return next(s for s in result["stages"] if s["stage"] == "pretrain")


def test_quickstart_json_has_every_figure_and_notes_the_other_stages(capsys):
    result = _estimate(capsys)
    assert result["job"] == "quickstart" and result["mfu"] == 0.4
    notes = {s["stage"]: s["note"] for s in result["stages"]}
    assert notes == {"data": "not a training task (synth_data)", "lowres": None, "pretrain": None,
                     "evaluate": "not a training task (ps3_eval)"}
    lowres = next(s for s in result["stages"] if s["stage"] == "lowres")
    assert lowres["trainable"] < lowres["parameters"]  # the selection modules wait for pre-training
    assert lowres["flops_per_sample"] < _pretrain(result)["flops_per_sample"] / 3  # no high-res pass
    stage = _pretrain(result)
    assert (stage["world_size"], stage["micro_batch"], stage["accumulation"], stage["steps"]) == (2, 16, 1, 300)
    assert stage["parameters"] == stage["trainable"] > 500_000
    assert stage["flops_per_step"] == pytest.approx(stage["flops_per_sample"] * 32)
    memory = stage["memory"]
    assert set(memory) == {"parameters", "gradients", "optimizer", "activations", "gathered", "total"}
    assert memory["optimizer"] == 2 * memory["parameters"]  # AdamW's two fp32 moments, replicated (DDP)
    assert memory["activations"] > memory["parameters"]
    # the cpu pool says nothing of GPUs: no fit, time or cost
    assert stage["fits"] is stage["step_seconds"] is stage["cost"] is None


def test_a_small_pool_does_not_fit_and_names_the_micro_batch_that_would(capsys, pools):
    stage = _pretrain(_estimate(capsys, "--pools", pools, "--pool", "small"))
    assert stage["pool"] == "small" and stage["fits"] is False
    assert 1 <= stage["max_micro_batch"] < stage["micro_batch"]
    assert stage["memory"]["total"] > 0.9 * 0.06 * 2**30


def test_a_priced_pool_fits_and_gives_time_gpu_hours_and_cost(capsys, pools):
    stage = _pretrain(_estimate(capsys, "--pools", pools, "--pool", "roomy", "--mfu", "0.5"))
    assert stage["fits"] is True and stage["max_micro_batch"] == 16  # the rank's whole share
    assert stage["step_seconds"] == pytest.approx(stage["flops_per_step"] / (2 * 989e12 * 0.5))
    assert stage["gpu_hours"] == pytest.approx(300 * stage["step_seconds"] * 2 / 3600)
    assert stage["cost"] == pytest.approx(stage["gpu_hours"] * 2.5)


def test_table_output(capsys, pools):
    assert main(["estimate", QUICKSTART, "--pools", pools, "--pool", "roomy"]) == 0
    out = capsys.readouterr().out
    for text in ("quickstart: estimate per stage", "FLOPs per sample", "activations (traced)", "yes / 16", "cost",
                 "data: not a training task (synth_data)"):
        assert text in out


@pytest.mark.parametrize("args, message", [
    (["--pool", "h200"], "error: --pool h200: no such pool (pools: a100, cpu, h100)"),
    (["--mfu", "1.5"], "error: --mfu 1.5: must lie in (0, 1]"),
])
def test_errors_are_one_line(capsys, args, message):
    assert main(["estimate", QUICKSTART, *args]) == 1
    assert capsys.readouterr().err.strip() == message
