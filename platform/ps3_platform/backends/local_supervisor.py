"""Detached supervisor of one local run: stages in dependency order, each under torchrun.

`platformctl submit --backend local` starts this in its own session so the run outlives
the terminal; `status`, `logs` and `cancel` talk to it only through the run directory
(state.json, per-rank logs) and signals to its process group.

Each stage runs `python -m torch.distributed.run` (torchrun's elastic agent: c10d
rendezvous on loopback, `--max-restarts` from the spec) over
`python -m ps3_platform.runtime`, with `nodes x procsPerNode` worker processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ps3_platform.spec import load_text, stages_of
from ps3_platform.ports import free_port, port_free

#: Seconds workers get to checkpoint after a cancel before they are killed.
GRACE_SECONDS = 30
PR_SET_PDEATHSIG = 1  # prctl(2)


class RunState:
    """state.json of a run: the supervisor is its only writer (atomic replace)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "state.json"
        self.data = json.loads(self.path.read_text())

    def stage(self, name: str) -> dict:
        return self.data["stages"][name]

    def save(self) -> None:
        write_state(self.path, self.data)


def write_state(path: Path, state: dict) -> None:
    """state.json replaced atomically (via state.tmp): a reader never sees half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    tmp.replace(path)


def _stop_with_parent() -> None:
    """In the torchrun child, before exec: SIGTERM it when the supervisor dies (even by kill -9),
    so its workers checkpoint and exit instead of training on unsupervised. Linux only."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: `status` and `cancel` still find orphans
        pass


def torchrun_command(run_dir: Path, stage_name: str, nproc: int, max_restarts: int, port: int) -> list[str]:
    return [
        sys.executable, "-m", "ps3_platform.runtime.launch",  # torchrun, exiting 143 when stopped
        "--nnodes=1", f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={stage_name}",
        "--monitor-interval=0.5",
        "--log-dir", str(run_dir / "logs" / stage_name), "--redirects", "3",
        "--module", "ps3_platform.runtime", "--spec", str(run_dir / "spec.yaml"), "--stage", stage_name,
    ]


class Supervisor:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.state = RunState(run_dir)
        self.child: subprocess.Popen | None = None
        self.cancelled = False

    def _on_signal(self, signum, _frame) -> None:
        self.cancelled = True
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)  # torchrun forwards it; workers checkpoint and exit

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        job = load_text((self.run_dir / "spec.yaml").read_text(), str(self.run_dir / "spec.yaml")).job
        self._set_job("Running")
        for stage in stages_of(job):
            if self.state.stage(stage.name)["phase"] == "Succeeded":
                continue  # a resumed run: done before it was cancelled or failed
            if self.cancelled:
                self._set_stage(stage.name, "Cancelled")
                continue
            code = self._run_stage(stage)
            if self.cancelled:
                self._set_stage(stage.name, "Cancelled", exit_code=code)
            elif code != 0:
                self._set_stage(stage.name, "Failed", exit_code=code)
                self._skip_rest(job)
                self._set_job("Failed")
                return 1
            else:
                self._set_stage(stage.name, "Succeeded", exit_code=0)
        self._set_job("Cancelled" if self.cancelled else "Succeeded")
        return 0

    def _run_stage(self, stage) -> int:
        nproc = stage.resources.nodes * stage.resources.nproc
        restarts = stage.elastic.max_restarts if stage.elastic else 0
        env = {**os.environ, "PS3_RUN_DIR": str(self.run_dir), "PS3_METRICS_PORT": str(self._metrics_port(stage.name, nproc)),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **stage.env}
        cmd = torchrun_command(self.run_dir, stage.name, nproc, restarts, free_port())
        self._set_stage(stage.name, "Running", started=time.time(), workers=nproc)
        with (self.run_dir / "logs" / f"{stage.name}.agent.log").open("ab") as agent_log:
            self.child = subprocess.Popen(cmd, env=env, stdout=agent_log, stderr=subprocess.STDOUT,
                                          preexec_fn=_stop_with_parent)
            deadline = None
            while self.child.poll() is None:
                if self.cancelled and deadline is None:
                    deadline = time.time() + GRACE_SECONDS
                if deadline is not None and time.time() > deadline:
                    self.child.kill()
                time.sleep(0.2)
        return self.child.returncode

    def _metrics_port(self, stage: str, nproc: int) -> int:
        """A base port with `nproc` free ports after it (one per local worker)."""
        for _ in range(50):
            base = free_port()
            if all(port_free(base + i, "0.0.0.0") for i in range(nproc)):
                self.state.stage(stage)["metrics_ports"] = [base + i for i in range(nproc)]
                return base
        raise RuntimeError("no free metrics port range")

    def _skip_rest(self, job) -> None:
        for stage in stages_of(job):
            if self.state.stage(stage.name)["phase"] == "Pending":
                self._set_stage(stage.name, "Skipped")

    def _set_stage(self, name: str, phase: str, **fields) -> None:
        entry = self.state.stage(name)
        entry.update(phase=phase, **fields)
        if phase in ("Succeeded", "Failed", "Cancelled", "Skipped"):
            entry["finished"] = time.time()
        self.state.save()

    def _set_job(self, phase: str) -> None:
        self.state.data["phase"] = phase
        if phase in ("Succeeded", "Failed", "Cancelled"):
            self.state.data["finished"] = time.time()
        self.state.save()


def main() -> int:
    run_dir = Path(sys.argv[1])
    return Supervisor(run_dir).run()


if __name__ == "__main__":
    sys.exit(main())
