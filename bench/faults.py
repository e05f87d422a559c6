"""Fault benchmark: how long the platform takes to notice, stop and recover, with real faults.

One run, real components: SeaweedFS S3 servers on loopback (frozen with SIGSTOP, stopped
and restarted), local-backend jobs of real torchrun workers (killed with SIGKILL, stopped
with SIGTERM), a checkpoint shard damaged on disk, a hostile spec file. Measured:

- `resume_after_kill_during_upload_s`: kill -9 of rank 1 while a checkpoint upload is stuck
  (store frozen, thawed right after the kill) -> first step of the restarted group.
  Baseline in the same run: the same kill with no upload in flight.
- `sigterm_to_exit_during_stuck_upload_s`: `cancel` (SIGTERM) while the store is frozen ->
  every process gone (the spec's default `checkpoint.stopGraceSeconds` applies).
- `stuck_request_detected_s`: a save to a frozen store -> its first logged failure (the
  default `checkpoint.requestTimeoutSeconds`).
- `data_outage_job_succeeded`: a ps3_pretrain job whose data is on S3 survives an outage
  of that store (30 s; 15 s with --quick) and ends Succeeded.
- `damaged_checkpoint_fallback`: the newest checkpoint's shard damaged -> the resubmitted
  job resumes from the previous intact step and ends Succeeded.
- `yaml_bomb_validate_s`: `platformctl validate` of a 9-level alias bomb.
- `lost_steps_total`: over all scenarios, committed (intact) steps that a recovery did not
  resume from.

Goals (issue 20): <= 10, <= 15, <= 30, 1, 1, <= 1, 0. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

from ps3_platform.backends.local import LocalBackend, _last_event
from ps3_platform.runtime.checkpoint import Checkpointer, step_dir_name
from ps3_platform.spec import load_text
from ps3_platform.testing import SeaweedS3

NOOP = """
apiVersion: ps3.platform/v1
kind: TrainingJob
metadata: {{name: {name}}}
spec:
  task: noop
  resources: {{pool: cpu, procsPerNode: 2}}
  elastic: {{minNodes: 1, maxNodes: 1, maxRestarts: 3}}
  checkpoint: {{uri: "{uri}", intervalSteps: 5, keep: 3, async: true}}
  train: {{globalBatch: 8, microBatch: 2, steps: {steps}, optimizer: {{lr: 0.02}}, seed: 3}}
  params: {{stepSeconds: {step_seconds}}}
  monitoring: {{logEverySteps: 1}}
"""

PRETRAIN = """
apiVersion: ps3.platform/v1
kind: TrainingJob
metadata: {{name: {name}}}
spec:
  task: ps3_pretrain
  resources: {{pool: cpu}}
  elastic: {{minNodes: 1, maxNodes: 1, maxRestarts: 1}}
  model: {{preset: ps3-tiny}}
  data:
    sources: [{{name: scene, uri: "{data}/scene"}}]
    numWorkers: 0
    tokenizer: {tokenizer}
  checkpoint: {{uri: "{ckpt}", intervalSteps: 10}}
  train: {{globalBatch: 4, steps: {steps}, seed: 0}}
  monitoring: {{logEverySteps: 1}}
"""

BOMB = "\n".join(['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'] + [
    f"{c}: &{c} [{','.join(['*' + p] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")])


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def steps(backend: LocalBackend, name: str) -> list[dict]:
    path = backend.run_dir(name) / "train" / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if '"loss"' in line]


def committed(uri: str, name: str) -> int | None:
    return Checkpointer(uri=uri, job=name, stage="train", keep=1, keep_every=None, async_save=False,
                        rank=0, world_size=1).latest_committed()


def resumed_from(backend: LocalBackend, name: str) -> int | None:
    """The step the newest restart loaded (from the workers' logs)."""
    found = [int(m) for line in backend.logs(name) for m in re.findall(r"resumed from step (\d+)", line)]
    return found[-1] if found else None


def noop_job(name: str, uri: str, *, steps_: int = 400, step_seconds: float = 0.05):
    return load_text(NOOP.format(name=name, uri=uri, steps=steps_, step_seconds=step_seconds)).job


# ---- scenarios ------------------------------------------------------------------------------
def kill_rank_1(backend: LocalBackend, uri: str, name: str, store: SeaweedS3, *, during_upload: bool) -> dict:
    """kill -9 of rank 1 (during a stuck upload, or not) -> first step of the restarted group."""
    job = noop_job(name, uri)
    job.spec.checkpoint.request_timeout_seconds = 2.0
    backend.submit(job, [])
    wait_for(lambda: committed(uri, name), 120, "a first commit")
    before = committed(uri, name)
    if during_upload:
        store.freeze()
        stuck_upload(backend, name)
    pid = int((backend.run_dir(name) / "train" / "rank-1.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    store.thaw()
    wait_for(lambda: any(r.get("attempt", 0) >= 1 for r in steps(backend, name)), 120, "a step after the restart")
    seconds = time.monotonic() - killed
    start = resumed_from(backend, name)
    backend.cancel(name)
    return {"seconds": seconds, "lost": max(0, before - (start or 0))}


def stuck_upload(backend: LocalBackend, name: str, at_most_s: float = 8.0) -> None:
    """Wait (the store frozen) until status shows a failing upload, or `at_most_s`: a save whose
    other ranks are already blocked on its commit fails no request of rank 0's, and is in flight too."""
    try:
        wait_for(lambda: backend.status(name).stages[0].storage, at_most_s, "an upload to fail")
    except TimeoutError:
        pass


def sigterm_during_stuck_upload(backend: LocalBackend, uri: str, store: SeaweedS3) -> dict:
    name = "faults-sigterm"
    job = noop_job(name, uri)
    job.spec.checkpoint.request_timeout_seconds = 2.0  # notice the frozen store sooner; the grace is the default
    backend.submit(job, [])
    wait_for(lambda: committed(uri, name), 120, "a first commit")
    store.freeze()
    try:
        stuck_upload(backend, name)
        before = committed_steps_seen(backend, name)
        started = time.monotonic()
        message = backend.cancel(name)
        seconds = time.monotonic() - started
    finally:
        store.thaw()
    end = _last_event(backend.run_dir(name) / "train" / "metrics.jsonl")
    return {"seconds": seconds, "lost": max(0, before - (end.get("committed") or 0)), "message": message}


def committed_steps_seen(backend: LocalBackend, name: str) -> int:
    """Newest step the job's log recorded as committed (readable while the store is frozen)."""
    found = [int(m) for line in backend.logs(name) for m in re.findall(r"checkpoint step (\d+) committed", line)]
    return max(found, default=0)


def stuck_request(uri: str, store: SeaweedS3) -> dict:
    """A save into a frozen store with the spec's default request timeout -> first logged failure."""
    import torch

    failures: list[float] = []
    ck = Checkpointer(uri=uri, job="stuck", stage="train", keep=1, keep_every=None, async_save=True, rank=0,
                      world_size=1, note=lambda record: failures.append(time.monotonic()))
    store.freeze()
    try:
        started = time.monotonic()
        ck.save(1, {"w": torch.zeros(1000)})
        wait_for(lambda: failures, 120, "a failed request")
        seconds = failures[0] - started
    finally:
        store.thaw()
    ck.wait()
    return {"seconds": seconds, "lost": 0 if ck.latest_committed() == 1 else 1}


def damaged_checkpoint(backend: LocalBackend, root: Path) -> dict:
    uri, name = f"file://{root}/ckpt", "faults-damaged"
    backend.submit(noop_job(name, uri, steps_=30), [])
    wait_for(lambda: len(steps(backend, name)) >= 12, 120, "12 steps")
    backend.cancel(name)
    stage_dir = root / "ckpt" / name / "train"
    intact = sorted(int(p.name.split("-")[1]) for p in stage_dir.glob("step-*") if (p / "manifest.json").exists())
    shard = max((stage_dir / step_dir_name(intact[-1])).glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    backend.submit(noop_job(name, uri, steps_=30), [])
    succeeded = backend.wait(name, poll_s=0.3) == 0
    start = resumed_from(backend, name)
    fallback = int(succeeded and start == intact[-2])
    return {"fallback": fallback, "lost": max(0, intact[-2] - (start or 0))}


def data_outage(backend: LocalBackend, root: Path, store: SeaweedS3, outage_s: float) -> dict:
    """ps3_pretrain with its data on S3; the store is stopped for `outage_s` mid-run."""
    from ps3.data import synth
    from ps3.model import train_tiny_tokenizer
    from ps3.tasks.synth import vocabulary_captions

    bucket = store.make_bucket("faults-data")
    synth.generate(bucket, 16, 0, ("scene",), samples_per_shard=4,
                   config=synth.SynthConfig(scene_size=(256, 384), texture=False))
    tokenizer = f"file://{root}/tokenizer.json"
    train_tiny_tokenizer(vocabulary_captions(), tokenizer)
    name = "faults-data"
    job = load_text(PRETRAIN.format(name=name, data=bucket, tokenizer=tokenizer, ckpt=f"file://{root}/ckpt",
                                    steps=20)).job
    backend.submit(job, [])
    wait_for(lambda: len(steps(backend, name)) >= 3, 300, "3 steps")
    store.stop()
    time.sleep(outage_s)
    store.start()
    succeeded = backend.wait(name, poll_s=0.5) == 0
    stage = backend.status(name).stages[0]
    return {"succeeded": int(succeeded), "read_retries": (stage.failures or {}).get("read_retries", 0),
            "restarts": stage.restarts, "lost": 0}


def yaml_bomb(root: Path) -> float:
    from ps3_platform.cli import main

    path = root / "bomb.yaml"
    path.write_text(BOMB)
    started = time.monotonic()
    with contextlib.redirect_stderr(io.StringIO()):
        code = main(["validate", str(path)])
    seconds = time.monotonic() - started
    assert code == 2, "the bomb was not refused"
    return seconds


# ---- the run --------------------------------------------------------------------------------
def run(quick: bool) -> dict:
    root = Path(tempfile.mkdtemp(prefix="ps3-faults-"))
    os.environ["PS3_PLATFORM_HOME"] = str(root / "home")
    backend = LocalBackend()
    result: dict = {"yaml_bomb_validate_s": yaml_bomb(root)}
    store = SeaweedS3(root / "s3").start()
    saved = {k: os.environ.get(k) for k in store.env}
    os.environ.update(store.env)
    lost = 0
    try:
        uri = store.make_bucket("faults")
        stuck = stuck_request(uri, store)
        result["stuck_request_detected_s"], lost = stuck["seconds"], lost + stuck["lost"]
        term = sigterm_during_stuck_upload(backend, uri, store)
        result["sigterm_to_exit_during_stuck_upload_s"], lost = term["seconds"], lost + term["lost"]
        kill = kill_rank_1(backend, uri, "faults-kill-upload", store, during_upload=True)
        result["resume_after_kill_during_upload_s"], lost = kill["seconds"], lost + kill["lost"]
        if not quick:
            base = kill_rank_1(backend, uri, "faults-kill-plain", store, during_upload=False)
            result["baseline_resume_after_kill_s"], lost = base["seconds"], lost + base["lost"]
        damaged = damaged_checkpoint(backend, root)
        result["damaged_checkpoint_fallback"], lost = damaged["fallback"], lost + damaged["lost"]
        outage_s = 15.0 if quick else 30.0
        data = data_outage(backend, root, store, outage_s)
        result.update(data_outage_s=outage_s, data_outage_job_succeeded=data["succeeded"],
                      data_read_retries=data["read_retries"], data_outage_restarts=data["restarts"])
        lost += data["lost"]
    finally:
        store.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    result["lost_steps_total"] = lost
    return result


GOALS = {
    "resume_after_kill_during_upload_s": ("<=", 10), "sigterm_to_exit_during_stuck_upload_s": ("<=", 15),
    "stuck_request_detected_s": ("<=", 30), "data_outage_job_succeeded": ("==", 1),
    "damaged_checkpoint_fallback": ("==", 1), "yaml_bomb_validate_s": ("<=", 1), "lost_steps_total": ("==", 0),
}


def print_table(result: dict) -> None:
    print(f"{'figure':42} {'value':>10}  goal")
    for key, value in result.items():
        goal = GOALS.get(key)
        mark = ""
        if goal:
            ok = value <= goal[1] if goal[0] == "<=" else value == goal[1]
            mark = f"{goal[0]} {goal[1]}  {'ok' if ok else 'MISSED'}"
        print(f"{key:42} {value:>10.2f}  {mark}" if isinstance(value, float) else f"{key:42} {value:>10}  {mark}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="15 s data outage, no baseline kill (about 3 minutes)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    result = run(args.quick)
    print_table(result)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
