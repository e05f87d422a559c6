"""The quickstart pipeline end to end (shrunk with --set), and status -o json's `eval`."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from ps3_platform.cli import main

ROOT = Path(__file__).resolve().parents[3]
SHRINK = [
    "spec.stages[0].params.samples=12", "spec.stages[0].params.evalSamples=8", "spec.stages[0].params.maxSide=512",
    "spec.stages[1].train.steps=2", "spec.stages[1].train.globalBatch=8", "spec.stages[1].checkpoint.intervalSteps=2",
    "spec.stages[2].train.steps=4", "spec.stages[2].train.globalBatch=8", "spec.stages[2].checkpoint.intervalSteps=2",
    "spec.stages[3].params.batches=1", "spec.stages[3].params.batchSize=8",
]


def test_quickstart_pipeline_runs_and_reports_eval(platform_home, capsys):
    args = ["submit", str(ROOT / "jobs" / "quickstart.yaml"), "--backend", "local", "--wait", "-q"]
    for item in SHRINK:
        args += ["--set", item]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "R@1" in out and "checkpoints: file://" in out and "platformctl render jobs/ps3_4k.yaml" in out
    assert main(["status", "quickstart", "-o", "json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["phase"] == "Succeeded"
    assert [s["phase"] for s in status["stages"]] == ["Succeeded"] * 4
    for key in ("retrieval_r1", "retrieval_r1_lowres", "retrieval_r1_untrained", "recall_topdown",
                "recall_bottomup", "recall_random"):
        assert 0.0 <= status["eval"][key] <= 1.0, key
    assert status["eval"]["checkpoint_step"] == 4 and status["eval"]["n_pairs"] == 8
    pictures = sorted(Path(status["eval"]["pictures"]).glob("selection-*.png"))
    assert len(pictures) == 4 and "selection maps (top-down vs bottom-up)" in out
    with Image.open(pictures[0]) as picture:
        assert picture.format == "PNG" and picture.width == 2 * picture.height - 48  # two square panels, a caption
    committed = list((platform_home / "runs" / "quickstart" / "checkpoints" / "quickstart" / "pretrain").glob(
        "step-*/manifest.json"))
    assert committed, "pre-training committed checkpoints"
    logs = "\n".join(p.read_text() for p in (platform_home / "runs" / "quickstart" / "logs").rglob("*.log"))
    assert "quickstart/lowres/step-000000002" in logs, "pre-training started from the low-res stage's checkpoint"
