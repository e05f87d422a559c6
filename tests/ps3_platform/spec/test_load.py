"""Spec loading: defaults, overrides, stage order, hashing, schema."""

from __future__ import annotations

import itertools
import json

import jsonschema
import pytest
import yaml

from ps3_platform.cli import main
from ps3_platform.spec import SpecError, load_text, resolved, spec_hash, stages_of
from ps3_platform.spec.schema import job_schema

PIPELINE = """
apiVersion: ps3.platform/v1
kind: Pipeline
metadata: {name: demo}
spec:
  stages:
    - {name: evaluate, task: noop, dependsOn: [train]}
    - {name: data, task: noop}
    - {name: train, task: noop, dependsOn: [data]}
"""

JOB = """
apiVersion: ps3.platform/v1
kind: TrainingJob
metadata: {name: demo}
spec:
  task: noop
  checkpoint: {async: true}
  train: {globalBatch: 8, steps: 3}
"""


def test_pipeline_stages_come_in_dependency_order():
    job = load_text(PIPELINE).job
    assert [s.name for s in stages_of(job)] == ["data", "train", "evaluate"]


def test_training_job_is_one_stage_named_train_with_defaults():
    job = load_text(JOB).job
    (stage,) = stages_of(job)
    assert stage.name == "train" and stage.checkpoint.async_ is True
    assert stage.train.total_steps == 3 and stage.resources.pool == "cpu"


@pytest.mark.parametrize(("value", "mode"), [("true", "full"), ("false", "none"), ("selective", "selective"),
                                           ("full", "full"), ("none", "none")])
def test_activation_checkpointing_takes_modes_and_the_old_booleans(value, mode):
    job = load_text(JOB, overrides=[f"spec.train.activationCheckpointing={value}"]).job
    assert job.spec.train.activation_checkpointing == mode


def test_precision_and_sharding_defaults():
    train = load_text(JOB).job.spec.train
    assert (train.activation_checkpointing, train.compile, train.reduce_dtype) == ("none", False, "fp32")
    sharded = ["spec.train.parallelism=fsdp", "spec.train.precision=bf16", "spec.train.reduceDtype=bf16"]
    assert load_text(JOB, overrides=sharded).job.spec.train.reduce_dtype == "bf16"


@pytest.mark.parametrize(("override", "message"), [
    ("spec.train.activationCheckpointing=every", "Input should be 'none', 'selective' or 'full'"),
    ("spec.train.reduceDtype=bf16", "reduceDtype: bf16 needs parallelism: fsdp and precision: bf16"),
])
def test_precision_and_sharding_errors_say_what_to_set(override, message):
    with pytest.raises(SpecError, match=message):
        load_text(JOB, overrides=[override])


def test_set_overrides_parse_values_as_yaml():
    job = load_text(JOB, overrides=["spec.train.steps=7", "spec.checkpoint.async=false",
                                    "spec.data.sources=[{name: a, uri: 'file:///x'}]"]).job
    assert job.spec.train.steps == 7 and job.spec.checkpoint.async_ is False
    assert job.spec.data.sources[0].uri == "file:///x"


def test_set_overrides_index_lists_both_ways():
    job = load_text(PIPELINE, overrides=["spec.stages[1].train.steps=5", "spec.stages.2.train.steps=6"]).job
    assert [s.train.steps for s in job.spec.stages] == [None, 5, 6]


def test_set_override_errors_are_reported_as_spec_errors():
    with pytest.raises(SpecError, match="unknown field 'stepz'; did you mean 'steps'"):
        load_text(JOB, overrides=["spec.train.stepz=7"])
    with pytest.raises(SpecError, match="expected KEY.PATH=VALUE"):
        load_text(JOB, overrides=["spec.train.steps"])


def test_set_override_errors_point_at_a_real_place_in_the_file():
    train_line = next(i for i, line in enumerate(JOB.splitlines(), 1) if line.strip().startswith("train:"))
    with pytest.raises(SpecError) as new_key:  # a key the file lacks: its parent's position
        load_text(JOB, overrides=["spec.train.stepz=7"])
    assert new_key.value.issues[0].line == train_line
    with pytest.raises(SpecError) as bad_value:  # a key the file has: that key's position
        load_text(JOB, overrides=["spec.train.steps=abc"])
    assert bad_value.value.issues[0].line >= train_line


def test_epochs_give_total_steps():
    job = load_text(JOB, overrides=["spec.train.steps=null", "spec.train.epochs=2",
                                    "spec.train.samplesPerEpoch=100"]).job
    assert stages_of(job)[0].train.total_steps == 25


def test_resolved_spec_round_trips_and_validates_against_schema():
    job = load_text(JOB).job
    dumped = resolved(job)
    assert load_text(yaml.safe_dump(dumped)).job == job
    jsonschema.validate(dumped, job_schema())


def test_spec_hash_ignores_resources_but_not_training():
    stage = stages_of(load_text(JOB).job)[0].model_dump(mode="json", by_alias=True)
    other_nodes = {**stage, "resources": {**stage["resources"], "nodes": 4}}
    other_lr = {**stage, "train": {**stage["train"], "steps": 99}}
    assert spec_hash(stage) == spec_hash(other_nodes)
    assert spec_hash(stage) != spec_hash(other_lr)


def test_schema_command_prints_json_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "TrainingJob" in json.dumps(schema) and schema["$schema"].startswith("https://json-schema.org")


def test_validate_command_accepts_good_spec(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text(JOB)
    assert main(["validate", str(path)]) == 0
    assert "valid TrainingJob 'demo'" in capsys.readouterr().out


# ---- hostile files: bounded, one positioned line each, fast --------------------------------
BOMB = "\n".join(['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'] + [
    f"{c}: &{c} [{','.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")])


def _validate(tmp_path, capsys, content: bytes, *extra: str) -> list[str]:
    import time

    spec = tmp_path / "hostile.yaml"
    spec.write_bytes(content)
    start = time.monotonic()
    assert main(["validate", str(spec), *extra]) == 2
    assert time.monotonic() - start < 1.0
    return capsys.readouterr().err.strip().splitlines()


@pytest.mark.faults
def test_alias_bomb_is_refused_at_once(tmp_path, capsys):
    assert len(BOMB) < 500
    (err,) = _validate(tmp_path, capsys, BOMB.encode())
    assert err.startswith(f"{tmp_path / 'hostile.yaml'}:") and "expands to more than 10000 values" in err


@pytest.mark.faults
def test_non_utf8_byte_is_located(tmp_path, capsys):
    (err,) = _validate(tmp_path, capsys, JOB.encode().replace(b"task: noop", b"task: no\xffop"))
    line = next(i for i, text in enumerate(JOB.splitlines(), 1) if "task: noop" in text)
    col = JOB.splitlines()[line - 1].index("noop") + 3
    assert err == f"{tmp_path / 'hostile.yaml'}:{line}:{col}: not UTF-8: byte 0xff (save the spec as UTF-8)"


@pytest.mark.faults
def test_deep_nesting_is_refused_with_a_position(tmp_path, capsys):
    (err,) = _validate(tmp_path, capsys, b"spec: " + b"[" * 100_000 + b"]" * 100_000 + b"\n")
    assert err.startswith(f"{tmp_path / 'hostile.yaml'}:1:") and "nested deeper than 64 levels" in err


@pytest.mark.parametrize("value", ["[1, 2", "{a: ", "&x [*y]", "'open"])
def test_bad_set_value_is_one_line(tmp_path, capsys, value):
    (err,) = _validate(tmp_path, capsys, JOB.encode(), "--set", f"spec.train.steps={value}")
    assert err.startswith("--set:1:1: spec.train.steps: value ") and "is not valid YAML" in err


def _set_bomb(levels: int) -> str:
    """A one-line `--set` value whose aliases expand to 9**levels values (nine per level)."""
    names = "abcdefghi"[:levels]
    nested = [f"&{c} [{','.join(['*' + p] * 9)}]" for p, c in itertools.pairwise(names)]
    return "[" + ", ".join([f"&a [{','.join(['1'] * 9)}]", *nested]) + "]"


@pytest.mark.faults
def test_alias_bomb_in_a_set_value_is_refused_at_once(tmp_path, capsys):
    """`--set` values are bounded like files: 9**6 values (well past the limit, yet small
    enough that an unbounded loader accepts it in a second instead of hanging the test)."""
    value = _set_bomb(6)
    assert len(value) < 200
    (err,) = _validate(tmp_path, capsys, JOB.encode(), "--set", f"spec.model.overrides.x={value}")
    assert err.startswith("--set:1:") and "spec.model.overrides.x[" in err
    assert "expands to more than 10000 values" in err


def test_set_values_within_the_limits_still_parse():
    job = load_text(JOB, overrides=["spec.model.overrides.x=[&a [1, 2], *a]", "spec.model.overrides.y={k: v}"]).job
    assert job.spec.model.overrides == {"x": [[1, 2], [1, 2]], "y": {"k": "v"}}
