"""The `curate` task as users run it: real Ray, real worker processes, real kills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ps3.curation.config import CurationConfig
from ps3.curation.models.qwen2_vl import build_tiny_qwen2_vl
from ps3.curation.pipeline import curate
from ps3.curation import ray_cluster
from ps3.curation.ray_adapter import ResourceError, check_resources, stream
from ps3.curation.writer import committed_shards
from ps3.data import synth
from ps3.data.index import read_index
from ps3.data.shards import iter_webdataset
from ps3_platform.cli import main

ROOT = Path(__file__).resolve().parents[3]
SMALL = synth.SynthConfig(scene_size=(1024, 1280), doc_long_side=(1024, 1280))


def samples_of(uri: str) -> dict[str, dict]:
    names = [s["name"] for s in read_index(uri)["shards"]]
    out = {}
    for sample in iter_webdataset(uri, names):
        assert sample["__key__"] not in out, "an input was written twice"
        out[sample["__key__"]] = json.loads(sample["json"])
    return out


@pytest.mark.slow
def test_curate_quickstart_on_two_ray_nodes_then_pretrain(platform_home, capsys):
    """Two worker processes form one Ray cluster (rank 0 head, rank 1 joins); the curated shards
    train ps3-tiny unchanged; status shows the summary (table 9's columns)."""
    overrides = ["spec.stages[0].params.samples=3", "spec.stages[0].params.pagesPerPdf=2",
                 "spec.stages[0].params.maxSide=1024", "spec.stages[1].resources.procsPerNode=2",
                 "spec.stages[1].train.globalBatch=2", "spec.stages[1].params.samplesPerShard=2",
                 "spec.stages[2].train.steps=2", "spec.stages[2].train.globalBatch=4",
                 "spec.stages[2].checkpoint.intervalSteps=2"]
    args = ["submit", str(ROOT / "jobs" / "curate_quickstart.yaml"), "--backend", "local", "--wait", "-q"]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 0, capsys.readouterr().out
    assert "curation (curate)" in capsys.readouterr().out
    assert main(["status", "curate-quickstart", "-o", "json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [s["phase"] for s in status["stages"]] == ["Succeeded"] * 3
    summary = status["curation"]["curate"]
    assert summary["sources"]["document"]["images"] == 3 and summary["sources"]["document"]["boxes_per_image"] > 0
    assert summary["sources"]["scene"]["images"] >= 1
    curate_stage = next(s for s in status["stages"] if s["name"] == "curate")
    assert curate_stage["unit"] == "images" and curate_stage["step"] == curate_stage["total_steps"] == 6
    run = platform_home / "runs" / "curate-quickstart"
    logs = "".join(p.read_text() for p in (run / "logs" / "curate").rglob("stderr.log"))
    assert "joined the Ray cluster" in logs and "Ray head at" in logs
    assert list((run / "checkpoints" / "curate-quickstart" / "pretrain").glob("step-*/manifest.json"))
    # the summary also lies beside the stage's checkpoints, where status on a cluster reads it
    beside = run / "checkpoints" / "curate-quickstart" / "curate" / "curation.json"
    assert json.loads(beside.read_text()) == summary


def embedded_ray(tmp_path: Path):
    ray_cluster.disable_implicit_auth()
    return ray_cluster.embedded(2, 0, f"/tmp/ray-t{os.getpid()}")


def test_ray_pipeline_captions_with_a_tiny_qwen2_vl(tmp_path):
    """Masks -> boxes -> Qwen2-VL local and global captions in Ray actors, batched (a random model:
    its words are noise, what is checked is that every box and image gets one through the real path)."""
    model = build_tiny_qwen2_vl(tmp_path / "qwen2-vl")
    raw = synth.generate_raw(f"file://{tmp_path}/raw", 2, seed=1, kinds=["scene"], config=SMALL)
    config = CurationConfig.model_validate({
        "output": f"file://{tmp_path}/out", "sources": [{"name": "scene", "kind": "natural", "uri": raw["scene"]}],
        "masks": {"generator": "classical"},
        "captions": {"captioner": "qwen2-vl", "model": f"file://{model}", "batchSize": 4, "maxNewTokens": 8}})
    with embedded_ray(tmp_path):
        summary = curate(config, stream=stream)
        too_many = config.model_copy(update={"workers": config.workers.model_copy(update={"masks": 3,
                                                                                          "gpus_per_actor": 1.0})})
        with pytest.raises(ResourceError, match="needs 4 actors with 4 CPUs and 1 GPUs.*has 2 CPUs and 0 GPUs"):
            check_resources("natural", too_many)  # would wait forever for actors that cannot be placed
    samples = samples_of(f"file://{tmp_path}/out/scene")
    assert len(samples) == 2 and summary["sources"]["scene"]["captions_per_image"] == 5  # 4 local + 1 global
    for sample in samples.values():
        assert len(sample["captions"]) == len(sample["boxes"]) == 4 and "global_caption" in sample
        assert sample["provenance"]["captions"]["name"] == "qwen2-vl"


def _spec(tmp_path: Path, raw: dict, output: str) -> Path:
    spec = {"apiVersion": "ps3.platform/v1", "kind": "TrainingJob", "metadata": {"name": "cur"},
            "spec": {"task": "curate", "resources": {"pool": "cpu"},
                     "params": {"output": output, "samplesPerShard": 1,
                                "sources": [{"name": "scene", "kind": "natural", "uri": raw["scene"]}],
                                "masks": {"generator": "classical"}, "captions": {"captioner": "ocr"}}}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _worker(spec: Path, run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PS3_RUN_DIR": str(run_dir), "PS3_CURATE_CPUS": "2", "PS3_METRICS_PORT": "0"}
    return subprocess.Popen([sys.executable, "-m", "ps3_platform.runtime", "--spec", str(spec), "--stage", "train"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


@pytest.mark.slow
def test_killed_curate_stage_resumes_to_the_clean_result_input_by_input(tmp_path):
    raw = synth.generate_raw(f"file://{tmp_path}/raw", 6, seed=5, kinds=["scene"], config=SMALL)
    output = f"file://{tmp_path}/out"
    spec = _spec(tmp_path, raw, output)
    proc = _worker(spec, tmp_path / "run")
    deadline = time.monotonic() + 240
    while not committed_shards(f"{output}/scene") and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the worker and its Ray processes, mid-run
    proc.wait()
    partial = committed_shards(f"{output}/scene")
    assert 0 < len(partial) < 6, "killed after the first shard and before the last"

    proc = _worker(spec, tmp_path / "run")
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-3000:]
    assert {k: committed_shards(f"{output}/scene")[k] for k in partial} == partial  # never rewritten

    clean = CurationConfig.model_validate({**yaml.safe_load(spec.read_text())["spec"]["params"],
                                           "output": f"file://{tmp_path}/clean"})
    with embedded_ray(tmp_path):
        curate(clean, stream=stream)  # the same pipeline, uninterrupted, in this process
    got, want = samples_of(f"{output}/scene"), samples_of(f"file://{tmp_path}/clean/scene")
    assert got.keys() == want.keys()
    assert {k: (v["input"], v["boxes"]) for k, v in got.items()} == {k: (v["input"], v["boxes"])
                                                                    for k, v in want.items()}
    summary = json.loads((tmp_path / "run" / "train" / "curation.json").read_text())
    assert summary["sources"]["scene"]["inputs"] == 6


def test_missing_weights_fail_validate_in_one_line(tmp_path, capsys):
    spec = yaml.safe_load((ROOT / "jobs" / "curate.yaml").read_text())
    spec["spec"]["params"]["masks"]["checkpoint"] = f"file://{tmp_path}/sam_vit_h.pth"
    spec["spec"]["params"]["captions"]["model"] = f"file://{tmp_path}/qwen2-vl"
    path = tmp_path / "curate.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main(["validate", str(path)]) != 0
    err = capsys.readouterr().err
    assert "params.masks.checkpoint" in err and "sam_vit_h.pth" in err and "params.captions.model" in err
    assert "Traceback" not in err


def test_progress_reaches_metrics_and_the_status_log(tmp_path):
    from types import SimpleNamespace

    from ps3.curation.pipeline import Progress
    from ps3.tasks.curate import _reporter
    from ps3_platform.runtime.metrics import JsonlLog, Metrics

    metrics = Metrics("job", "curate", 0)
    log = JsonlLog(tmp_path / "metrics.jsonl")
    lines = []
    logger = SimpleNamespace(info=lambda fmt, *args: lines.append(fmt % args))
    report = _reporter(SimpleNamespace(metrics=metrics, log=logger), log)
    progress = Progress(total=10, done=3)
    progress.failures["bad_image"] += 1
    report(progress, "scene", {"a": {"status": "written", "boxes": 4}, "b": {"status": "skipped",
                                                                        "reason": "bad_image"}})
    log.close()
    value = metrics.registry.get_sample_value
    labels = {"job": "job", "stage": "curate", "rank": "0"}
    assert value("ps3_curate_images_total", {**labels, "source": "scene", "outcome": "written"}) == 1
    assert value("ps3_curate_boxes_total", {**labels, "source": "scene"}) == 4
    assert value("ps3_curate_failures_total", {**labels, "kind": "bad_image"}) == 1
    assert value("ps3_curate_images_done", labels) == 3 and value("ps3_curate_images_planned", labels) == 10
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 3 and record["total"] == 10 and record["unit"] == "images"
    assert record["failures"] == {"bad_image": 1}
    from ps3_platform.backends.kubernetes.status import parse_progress, stage_status

    progress = parse_progress("\n".join(["step 3/9 loss 1.0 lr 0.1 2.0 samples/s", *lines]))
    assert progress["unit"] == "images" and (progress["step"], progress["total_steps"]) == (3, 10)
    running = {"status": {"conditions": [{"type": "Running", "status": "True"}]}}
    status = stage_status("curate", running, progress=progress)
    assert status.unit == "images" and status.eta_s is not None  # what `platformctl status` shows on a cluster


def test_inputs_that_fail_at_listing_reach_the_failure_metric(tmp_path):
    """A PDF that cannot be opened or a shard that cannot be read never reaches a shard's
    outcomes: it is counted by kind in ps3_curate_failures_total all the same."""
    from types import SimpleNamespace

    from ps3_platform.runtime.metrics import JsonlLog, Metrics

    from ps3.curation.pipeline import Plan, Progress
    from ps3.tasks.curate import _reporter

    metrics = Metrics("job", "curate", 0)
    log = JsonlLog(tmp_path / "metrics.jsonl")
    report = _reporter(SimpleNamespace(metrics=metrics, log=SimpleNamespace(info=lambda *a: None)), log)
    config = CurationConfig.model_validate({"output": f"file://{tmp_path}/out",
                                            "sources": [{"name": "docs", "kind": "document", "uri": "unused"}]})
    plan = Plan({"docs": {}}, [("a.pdf", "pdf_error", "cannot open PDF"), ("b.pdf", "pdf_error", "cannot open PDF"),
                               ("c.tar", "read_error", "OSError: gone")])
    progress = Progress(report=report)
    summary = curate(config, plan, progress, stream=lambda rows, kind, cfg: iter(rows))
    report(progress, None, None)  # a later report adds nothing already counted
    log.close()
    assert summary["failures"] == {"pdf_error": 2, "read_error": 1}
    labels = {"job": "job", "stage": "curate", "rank": "0"}
    value = metrics.registry.get_sample_value
    assert value("ps3_curate_failures_total", {**labels, "kind": "pdf_error"}) == 2
    assert value("ps3_curate_failures_total", {**labels, "kind": "read_error"}) == 1
