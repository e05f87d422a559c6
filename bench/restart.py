"""What a restart costs: kill -9 one of two local workers and time the way back to training.

A local job (the `noop` task, 2 worker processes under torchrun, gloo, checkpoints every
`--interval` steps on local disk) runs until it has logged `--kill-at` steps; then one worker
gets SIGKILL. The elastic agent restarts the group, every worker resumes from the last
committed checkpoint, and the workers report (`ps3_restart_to_first_step_seconds`,
`ps3_lost_steps`, shown by `platformctl status`):

- `restart_to_first_step_s`: seconds from a restarted worker's process start to its first
  completed step (interpreter, imports, rendezvous, checkpoint load, first batch).
- `lost_steps`: steps the killed attempt had done past that checkpoint (recomputed).

Baseline in the same run: `cold_start_to_first_step_s`, the same from the job's first start
(submit to the first logged step).

`uneven_step_overhead`: the median step time of the same 2 workers when the global batch does
not split evenly (9 = 5 + 4, so one rank runs a forward with one sample less and every loss is
weighted by its share) over the median when it does (10 = 5 + 5). Both steps wait on a rank
with 5 samples, so the ratio isolates what the uneven split itself costs (goal <= 1.1).

Usage: python bench/restart.py [--quick] [--interval N]
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import time
from pathlib import Path

SPEC = """
apiVersion: ps3.platform/v1
kind: TrainingJob
metadata: {{name: {name}}}
spec:
  task: noop
  resources: {{pool: cpu, procsPerNode: 2}}
  elastic: {{minNodes: 1, maxNodes: 1, maxRestarts: 3}}
  checkpoint: {{uri: "file://{root}/ckpt", intervalSteps: {interval}, keep: 2}}
  train: {{globalBatch: {batch}, microBatch: {micro}, steps: {steps}, optimizer: {{lr: 0.02}}, seed: 3}}
  params: {{stepSeconds: {step_seconds}, dim: {dim}}}
  monitoring: {{logEverySteps: 1}}
"""


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "train" / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if '"loss"' in line]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def _median_step_s(backend, spec: str, skip: int = 5) -> float:
    """Median `step_seconds` of a finished run, its first `skip` steps (warm-up) left out."""
    from ps3_platform.spec import load_text

    job = load_text(spec).job
    backend.submit(job, [])
    if backend.wait(job.metadata.name, poll_s=0.2) != 0:
        raise SystemExit(f"the job did not finish: {backend.status(job.metadata.name)}")
    times = sorted(r["step_seconds"] for r in _records(backend.run_dir(job.metadata.name)) if r["step"] > skip)
    return times[len(times) // 2]


def uneven_step_overhead(backend, root: str, steps: int) -> tuple[float, float]:
    """Median step seconds with global batches 9 (5 + 4) and 10 (5 + 5) on 2 workers."""
    uneven, even = (_median_step_s(backend, SPEC.format(name=f"batch{batch}", root=root, interval=1000, steps=steps,
                                                        batch=batch, micro=5, step_seconds=0, dim=4096))
                    for batch in (9, 10))
    return uneven, even


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a shorter run, under a minute")
    parser.add_argument("--interval", type=int, default=10, help="checkpoint interval in steps")
    args = parser.parse_args()
    steps, kill_at = (30, 15) if args.quick else (60, 35)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PS3_PLATFORM_HOME"] = f"{tmp}/home"
        from ps3_platform.backends.local import LocalBackend
        from ps3_platform.spec import load_text

        backend = LocalBackend()
        job = load_text(SPEC.format(name="restart", root=tmp, interval=args.interval, steps=steps, batch=8,
                                    micro=2, step_seconds=0.05, dim=16)).job
        submitted = time.time()
        backend.submit(job, [])
        run_dir = backend.run_dir("restart")
        _wait_for(lambda: _records(run_dir), 120, "the first step")
        cold = time.time() - submitted
        _wait_for(lambda: len(_records(run_dir)) >= kill_at, 120, f"{kill_at} steps")
        os.kill(int((run_dir / "train" / "rank-1.pid").read_text()), signal.SIGKILL)
        code = backend.wait("restart", poll_s=0.2)
        stage = backend.status("restart").stages[0]
        if code != 0 or stage.restart_to_first_step_s is None:
            raise SystemExit(f"the job did not recover: {stage}")
        resumed = next(r["resumed_step"] for r in _records(run_dir) if r.get("attempt") == 1)
        uneven, even = uneven_step_overhead(backend, tmp, 40 if args.quick else 200)
    result = {"restart_to_first_step_s": stage.restart_to_first_step_s, "lost_steps": stage.lost_steps,
              "checkpoint_interval_steps": args.interval, "resumed_step": resumed, "killed_after_steps": kill_at,
              "cold_start_to_first_step_s": round(cold, 2), "restart_vs_cold_start":
                  round(stage.restart_to_first_step_s / cold, 2), "uneven_step_overhead": round(uneven / even, 3),
              "uneven_step_s": round(uneven, 4), "even_step_s": round(even, 4), "workers": 2}
    print(f"{'kill -9 of 1 of 2 local workers (noop task, gloo)':<52}{'value':>10}")
    print(f"{'  restart: worker process start -> first step (s)':<52}{stage.restart_to_first_step_s:>10.2f}")
    print(f"{'  baseline: cold start, submit -> first step (s)':<52}{cold:>10.2f}")
    print(f"{'  steps recomputed (checkpoint every ' + str(args.interval) + ')':<52}{stage.lost_steps:>10}")
    print(f"{'2 workers, step time (median, s)':<52}{'value':>10}")
    print(f"{'  global batch 9 = 5 + 4 (uneven, weighted losses)':<52}{uneven:>10.4f}")
    print(f"{'  baseline: global batch 10 = 5 + 5 (even)':<52}{even:>10.4f}")
    print(f"{'  uneven-split step overhead':<52}{uneven / even:>10.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
