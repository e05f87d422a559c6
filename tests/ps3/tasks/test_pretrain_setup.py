"""Bad ps3_pretrain specs fail at start (exit 2, one clear line) before any step runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from ps3.data import synth
from ps3.model import PS3Model, export_ps3_checkpoint, train_tiny_tokenizer
from ps3.tasks.synth import vocabulary_captions
from ps3_platform.spec import load_text, resolved

SPEC = """
apiVersion: ps3.platform/v1
kind: TrainingJob
metadata: {{name: bad}}
spec:
  task: ps3_pretrain
  model: {{preset: ps3-tiny, initFrom: {init}}}
  data:
    sources: [{{name: scene, uri: "{data}/scene"}}]
    numWorkers: 0
    tokenizer: {data}/tokenizer.json
  train: {{globalBatch: {batch}, steps: 2}}
  params: {params}
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = f"file://{tmp_path_factory.mktemp('data')}"
    synth.generate(root, 4, 0, ("scene",), config=synth.SynthConfig(scene_size=(256, 384), texture=False))
    train_tiny_tokenizer(vocabulary_captions(), f"{root}/tokenizer.json")
    return root


def _run(tmp_path, data, *, init="null", batch=2, params="{}"):
    spec = tmp_path / "spec.yaml"
    job = load_text(SPEC.format(init=init, data=data, batch=batch, params=params)).job
    spec.write_text(json.dumps(resolved(job)))
    env = {**os.environ, "PS3_RUN_DIR": str(tmp_path / "run"), "PS3_METRICS_PORT": "0"}
    proc = subprocess.run([sys.executable, "-m", "ps3_platform.runtime", "--spec", str(spec), "--stage", "train"],
                          env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


def test_missing_init_weights(tmp_path, data):
    code, err = _run(tmp_path, data, init=f"file://{tmp_path}/nothing-here")
    assert code == 2 and "model.initFrom" in err and "no config.json" in err
    assert "Traceback" not in err


def test_weights_of_another_architecture(tmp_path, data):
    other = PS3Model("ps3-tiny-4s")  # four scales, the spec's preset has three
    export_ps3_checkpoint(other, f"file://{tmp_path}/other")
    code, err = _run(tmp_path, data, init=f"file://{tmp_path}/other")
    assert code == 2 and "model.initFrom" in err and "Traceback" not in err


def test_batch_too_large_for_the_selected_patch_budget(tmp_path, data):
    code, err = _run(tmp_path, data, batch=64, params="{maxTokensPerMicroBatch: 1000}")
    assert code == 2 and "set train.microBatch to" in err


def test_preset_patch_budget_above_the_paper_cap(tmp_path, data):
    code, err = _run(tmp_path, data, params="{maxSelectedPatches: 5000}")
    assert code == 2 and "params.maxSelectedPatches" in err


def test_malformed_init_config_is_one_line(tmp_path, data):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    code, err = _run(tmp_path, data, init=f"file://{tmp_path}/broken")
    assert code == 2 and "cannot read config.json" in err and "Traceback" not in err


def test_global_batch_larger_than_the_data(tmp_path, data):
    code, err = _run(tmp_path, data, batch=8)  # the fixture holds 4 scenes
    assert code == 2 and "spec data:" in err and "Traceback" not in err


def test_preset_whose_top_scale_the_data_never_reaches(tmp_path, data):
    """The fixture's scenes are 256-384 px: a top scale of 1024 is more than twice what they reach."""
    spec = SPEC.replace("preset: ps3-tiny,", "preset: ps3-tiny-4s, overrides: {{scales: [64, 128, 256, 1024]}},")
    job = load_text(spec.format(init="null", data=data, batch=2, params="{}")).job
    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(resolved(job)))
    env = {**os.environ, "PS3_RUN_DIR": str(tmp_path / "run"), "PS3_METRICS_PORT": "0"}
    proc = subprocess.run([sys.executable, "-m", "ps3_platform.runtime", "--spec", str(path), "--stage", "train"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "encodes up to 1024 px" in proc.stderr
    assert re.search(r"images in data.sources has a long side of (2[5-9]\d|3[0-8]\d) px", proc.stderr)
    assert "Traceback" not in proc.stderr
