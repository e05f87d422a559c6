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
(submit to the first logged step). `uneven_step_overhead` (a world size that does not divide
the global batch) is null: uneven splits are not implemented yet (issue 17, item 3).

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
metadata: {{name: restart}}
spec:
  task: noop
  resources: {{pool: cpu, procsPerNode: 2}}
  elastic: {{minNodes: 1, maxNodes: 1, maxRestarts: 3}}
  checkpoint: {{uri: "file://{root}/ckpt", intervalSteps: {interval}, keep: 2}}
  train: {{globalBatch: 8, microBatch: 2, steps: {steps}, optimizer: {{lr: 0.02}}, seed: 3}}
  params: {{stepSeconds: 0.05}}
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
        job = load_text(SPEC.format(root=tmp, interval=args.interval, steps=steps)).job
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
    result = {"restart_to_first_step_s": stage.restart_to_first_step_s, "lost_steps": stage.lost_steps,
              "checkpoint_interval_steps": args.interval, "resumed_step": resumed, "killed_after_steps": kill_at,
              "cold_start_to_first_step_s": round(cold, 2), "restart_vs_cold_start":
                  round(stage.restart_to_first_step_s / cold, 2), "uneven_step_overhead": None, "workers": 2}
    print(f"{'kill -9 of 1 of 2 local workers (noop task, gloo)':<52}{'value':>10}")
    print(f"{'  restart: worker process start -> first step (s)':<52}{stage.restart_to_first_step_s:>10.2f}")
    print(f"{'  baseline: cold start, submit -> first step (s)':<52}{cold:>10.2f}")
    print(f"{'  steps recomputed (checkpoint every ' + str(args.interval) + ')':<52}{stage.lost_steps:>10}")
    print(f"{'  uneven-split step overhead':<52}{'n/a':>10}  (not implemented yet)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
