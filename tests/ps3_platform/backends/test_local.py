"""Local backend: real torchrun agents, real worker processes, real signals."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from ps3_platform.backends.base import JobNotFoundError
from ps3_platform.backends.local import LocalBackend, _group_alive
from ps3_platform.cli import main
from ps3_platform.spec import load_text

JOB = """
apiVersion: ps3.platform/v1
kind: TrainingJob
metadata: {{name: {name}}}
spec:
  task: noop
  resources: {{pool: cpu, procsPerNode: 2}}
  elastic: {{minNodes: 1, maxNodes: 1, maxRestarts: 2}}
  checkpoint: {{intervalSteps: 5}}
  train: {{globalBatch: 8, microBatch: 2, steps: {steps}, optimizer: {{lr: 0.01}}}}
  params: {{stepSeconds: {step_seconds}}}
  monitoring: {{logEverySteps: 1}}
"""


def _job(name="toy", steps=12, step_seconds=0.0):
    return load_text(JOB.format(name=name, steps=steps, step_seconds=step_seconds)).job


def _wait_for(predicate, timeout=120.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_two_worker_job_runs_to_completion(platform_home):
    backend = LocalBackend()
    result = backend.submit(_job(), [])
    assert result.created
    assert backend.wait("toy", poll_s=0.5) == 0
    status = backend.status("toy")
    assert status.phase == "Succeeded"
    (stage,) = status.stages
    assert (stage.step, stage.total_steps, stage.workers) == (12, 12, 2)
    logs = list(backend.logs("toy", rank=1))
    assert any("[rank1]" in line for line in logs)
    # Same spec again: nothing happens; a changed one needs --replace.
    assert "unchanged" in backend.submit(_job(), []).message


def test_changed_spec_needs_replace(platform_home):
    backend = LocalBackend()
    backend.submit(_job(steps=2), [])
    backend.wait("toy", poll_s=0.5)
    from ps3_platform.backends.base import BackendError

    with pytest.raises(BackendError, match="--replace"):
        backend.submit(_job(steps=3), [])
    assert backend.submit(_job(steps=3), [], replace=True).created


def _committed(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in run_dir.glob("checkpoints/toy/train/step-*/manifest.json"))


@pytest.mark.faults
def test_resubmitting_a_cancelled_job_resumes_it_from_its_committed_checkpoint(platform_home):
    backend = LocalBackend()
    backend.submit(_job(steps=60, step_seconds=0.05), [])
    run_dir = backend.run_dir("toy")
    _wait_for(lambda: _committed(run_dir), what="a committed checkpoint")
    backend.cancel("toy")
    saved = _committed(run_dir)[-1]
    assert backend.status("toy").phase == "Cancelled" and saved < 60
    result = backend.submit(_job(steps=60, step_seconds=0.05), [])
    assert result.created and result.message.startswith(f"job 'toy' was Cancelled; resuming it in place: train from step {saved}")
    assert backend.wait("toy", poll_s=0.5) == 0
    assert backend.status("toy").stages[0].step == 60
    logs = "".join(backend.logs("toy", rank=0))
    assert f"resumed from step {saved}" in logs


@pytest.mark.faults
def test_replace_never_deletes_checkpoints_unless_asked_and_lists_them(platform_home):
    backend = LocalBackend()
    backend.submit(_job(steps=5), [])
    assert backend.wait("toy", poll_s=0.5) == 0
    run_dir = backend.run_dir("toy")
    assert _committed(run_dir) == [5]
    result = backend.submit(_job(steps=6), [], replace=True)
    aside = next(platform_home.glob("runs/toy.replaced-*"))
    assert f"checkpoints (1 steps) are kept in {aside / 'checkpoints'}" in result.message
    assert (aside / "checkpoints/toy/train/step-000000005/manifest.json").exists()
    assert backend.wait("toy", poll_s=0.5) == 0
    from ps3_platform.backends.base import BackendError

    with pytest.raises(BackendError, match="goes with --replace"):
        backend.submit(_job(steps=6), [], delete_checkpoints=True)
    result = backend.submit(_job(steps=7), [], replace=True, delete_checkpoints=True)
    assert "deleted the replaced run's checkpoints: toy/train/step-000000005, toy/train/step-000000006" in result.message
    assert backend.wait("toy", poll_s=0.5) == 0


def test_sigkilled_worker_is_restarted_and_job_succeeds(platform_home):
    backend = LocalBackend()
    backend.submit(_job(steps=40, step_seconds=0.05), [])
    pid_file = backend.run_dir("toy") / "train" / "rank-1.pid"
    metrics = backend.run_dir("toy") / "train" / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 8, what="training progress")
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert backend.wait("toy", poll_s=0.5) == 0
    status = backend.status("toy")
    assert status.stages[0].restarts >= 1
    assert status.stages[0].step == 40


def test_cancel_leaves_no_process_behind(platform_home):
    backend = LocalBackend()
    backend.submit(_job(steps=10_000, step_seconds=0.05), [])
    run_dir = backend.run_dir("toy")
    _wait_for(lambda: (run_dir / "train" / "rank-1.pid").exists(), what="workers to start")
    worker_pids = [int((run_dir / "train" / f"rank-{r}.pid").read_text()) for r in (0, 1)]
    pgid = json.loads((run_dir / "state.json").read_text())["pgid"]
    message = backend.cancel("toy")
    assert re.fullmatch(r"job 'toy' cancelled; stage train stopped at step \d+, checkpoint committed; "
                        r"no process left running", message), message
    assert not _group_alive(pgid)
    for pid in worker_pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert backend.status("toy").phase == "Cancelled"


@pytest.mark.faults
@pytest.mark.parametrize("event, said", [
    ({"event": "preempted", "step": 25, "committed": 20},
     "stage train stopped at step 25 but its final save did NOT commit: the last committed checkpoint is step 20 "
     "(steps 21-25 are recomputed on resume)"),
    ({"event": "preempted", "step": 3, "committed": None},
     "stage train stopped at step 3 with no committed checkpoint: a resume starts it afresh"),
    ({"event": "completed", "step": 9, "committed": 9, "time": 0.0},  # an earlier attempt's: not this stop
     "stage train stopped without reporting its last checkpoint (killed after the grace period?)"),
])
def test_cancel_says_what_a_stopped_stage_kept(platform_home, event, said):
    backend = LocalBackend()
    stage_dir = backend.run_dir("toy") / "train"
    stage_dir.mkdir(parents=True)
    (stage_dir / "metrics.jsonl").write_text(json.dumps({"time": time.time() + 1, **event}) + "\n")
    assert backend._what_was_saved("toy", "train", time.time()) == said


def test_unknown_job_is_a_one_line_error(platform_home, capsys):
    with pytest.raises(JobNotFoundError):
        LocalBackend().status("nope")
    assert main(["status", "nope", "--backend", "local"]) == 1
    assert capsys.readouterr().err.strip().startswith("error: no local job named 'nope'")


def test_status_json_via_cli(platform_home, tmp_path, capsys):
    spec = tmp_path / "job.yaml"
    spec.write_text(JOB.format(name="clijob", steps=3, step_seconds=0))
    assert main(["submit", str(spec), "--backend", "local", "--wait", "-q"]) == 0
    capsys.readouterr()
    assert main(["status", "clijob", "-o", "json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["phase"] == "Succeeded" and status["stages"][0]["step"] == 3


def test_ctrl_c_during_submit_wait_cancels_and_leaves_no_process(platform_home, tmp_path):
    import subprocess
    import sys

    spec = tmp_path / "job.yaml"
    spec.write_text(JOB.format(name="interrupted", steps=10_000, step_seconds=0.05))
    # A terminal leaves SIGINT at its default; a test runner started in the background (`cmd &`
    # without job control) ignores it, and Python keeps an ignored SIGINT ignored. Restore it.
    cli = subprocess.Popen([sys.executable, "-m", "ps3_platform.cli", "submit", str(spec), "--backend", "local",
                            "--wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "PS3_PLATFORM_HOME": str(platform_home)},
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    run_dir = LocalBackend().run_dir("interrupted")
    _wait_for(lambda: (run_dir / "train" / "rank-1.pid").exists(), what="workers to start")
    pgid = json.loads((run_dir / "state.json").read_text())["pgid"]
    cli.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends
    out, err = cli.communicate(timeout=120)
    assert cli.returncode == 130, err
    assert "interrupted: cancelling 'interrupted'" in err and "no process left running" in err
    assert "Traceback" not in err
    assert not _group_alive(pgid)
    assert LocalBackend().status("interrupted").phase == "Cancelled"


def test_logs_follow_streams_until_the_job_ends(platform_home):
    backend = LocalBackend()
    backend.submit(_job(name="followed", steps=15, step_seconds=0.1), [])
    lines = list(backend.logs("followed", rank=0, follow=True))  # returns only once the job is done
    steps = [line for line in lines if "step " in line and "/15" in line]
    assert steps and "step 15/15" in steps[-1]
    status = backend.status("followed")
    assert status.phase == "Succeeded" and status.stages[0].step == 15
    assert status.stages[0].loss is not None and status.stages[0].samples_per_s


@pytest.mark.faults
def test_a_stage_whose_step_stops_advancing_is_stalled_without_eta(platform_home):
    from ps3_platform.backends.base import JobStatus
    from ps3_platform.backends.display import progress_line

    backend = LocalBackend()
    run_dir = backend.run_dir("toy")
    (run_dir / "train").mkdir(parents=True)
    now = time.time()

    def stage(ages):
        records = [{"time": now - age, "step": step, "total": 100, "loss": 1.0, "step_seconds": 0.5}
                   for step, age in ages]
        (run_dir / "train" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return backend._stage_status(run_dir, "train", {"phase": "Running", "total_steps": 100})

    moving = stage([(10, 12.0), (20, 7.0)])
    assert moving.eta_s == 40.0 and not moving.message
    (run_dir / "train" / "metrics.jsonl").open("a").write(json.dumps(
        {"time": now, "step": 21, "total": 100, "loss": 1.0, "bad_samples": {"bad_image": 3}}) + "\n")
    counted = backend._stage_status(run_dir, "train", {"phase": "Running", "total_steps": 100})
    assert counted.failures == {"bad_image": 3}
    assert progress_line(JobStatus(name="toy", kind="TrainingJob", backend="local", phase="Running",
                                   stages=[counted])).endswith("(3 bad samples skipped)")
    frozen = stage([(10, 305.0), (20, 300.0)])
    assert frozen.eta_s is None and frozen.message == "stalled: no step for 300 s (last: step 20)"
    line = progress_line(JobStatus(name="toy", kind="TrainingJob", backend="local", phase="Running", stages=[frozen]))
    assert line == "toy: Running | train stalled: no step for 300 s (last: step 20)"
    slow = stage([(10, 1100.0), (20, 600.0)])  # records every 500 s: 600 s is not yet stalled
    assert not slow.message


@pytest.mark.faults
def test_submit_refuses_an_unusable_store_at_once(platform_home, monkeypatch):
    from ps3_platform.backends.base import BackendError

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # privileged, unused: refused
    monkeypatch.delenv("FSSPEC_S3_ENDPOINT_URL", raising=False)  # (the shared S3 server's, when it ran first)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    job = load_text(JOB.format(name="toy", steps=3, step_seconds=0).replace(
        "checkpoint: {intervalSteps: 5}", "checkpoint: {intervalSteps: 5, uri: 's3://ckpt/runs'}")).job
    start = time.monotonic()
    with pytest.raises(BackendError, match=r"^storage check failed: s3://ckpt/runs: cannot use the S3 endpoint"):
        LocalBackend().submit(job, [])
    assert time.monotonic() - start < 15 and not LocalBackend().run_dir("toy").exists()
