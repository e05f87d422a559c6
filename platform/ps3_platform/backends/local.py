"""Local backend: run a job on this machine, the embedded default without a cluster.

Each run lives in `$PS3_PLATFORM_HOME/runs/NAME` (default `~/.ps3-platform`): the resolved
spec, `state.json` written by the detached supervisor, per-rank logs from torchrun, the
rank-0 metrics log of each stage and, unless the spec names a URI, the checkpoints.

Why not TorchX's local scheduler: it would put a second supervisor and log layout
between us and torchrun, and its app handles do not know our stages; the agent we need
is torchrun's, which this backend runs directly (one process group per stage).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import yaml

from ps3_platform.spec import JobSpec, resolved, stages_of
from ps3_platform.spec.models import CURATION_RECORD

from .base import TERMINAL_PHASES, Backend, BackendError, JobNotFoundError, JobStatus, StageStatus, SubmitResult
from .local_supervisor import write_state


def platform_home() -> Path:
    return Path(os.environ.get("PS3_PLATFORM_HOME", Path.home() / ".ps3-platform"))


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.waitpid(pid, os.WNOHANG)  # a dead child of this process (a test's supervisor) is a zombie until reaped
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group_alive(pgid: int | None) -> bool:
    """True while any process of the group is still running (zombies do not count)."""
    return bool(_group_members(pgid))


def _group_members(pgid: int | None) -> list[int]:
    """Live (non-zombie) processes of the run's process group: supervisor, torchrun, workers.

    A zombie is dead but keeps its group id until its parent reaps it, so `killpg(pgid, 0)`
    alone would report a cancelled run as alive; on Linux /proc tells them apart (elsewhere
    the group leader stands for the group).
    """
    if not pgid:
        return []
    try:
        os.waitpid(pgid, os.WNOHANG)  # reap the supervisor if this process started it
    except ChildProcessError:
        pass
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [pgid]
    members = []
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def _records(path: Path) -> Iterator[dict]:
    """The JSON records of a stage's metrics.jsonl, skipping a line being written right now."""
    if not path.exists():
        return
    with path.open() as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def _last_jsonl(path: Path) -> dict:
    """Last metrics record of a stage (the runtime appends one every logEverySteps), with
    `cadence`: the seconds between it and the record before (how often records come)."""
    last: dict = {}
    for record in _records(path):
        if "step" in record and "loss" in record:
            if last.get("time") and record.get("time"):
                record["cadence"] = record["time"] - last["time"]
            last = record
    return last


#: A running stage whose newest step record is older than this many record intervals (and a
#: minute) is stalled: a frozen step and an ETA would otherwise look like progress.
STALL_INTERVALS = 5
STALL_MIN_S = 60.0


def _stalled_for(record: dict, now: float) -> float | None:
    """Seconds since the last step record, when that is long enough to call the stage stalled."""
    if not record.get("time"):
        return None
    age = now - record["time"]
    expected = max(record.get("cadence") or 0.0, record.get("step_seconds") or 0.0)
    return age if age > max(STALL_MIN_S, STALL_INTERVALS * expected) else None


def _identity(job: JobSpec) -> str:
    """Hash of the spec that tells "the same job" from a changed one. A step to resume from
    (`checkpoint.resumeStep`, `submit --resume-step`) is left out: it says where to continue,
    not what to run."""
    spec = resolved(job)
    body = spec.get("spec", {})
    for stage in body.get("stages", [body]):
        stage.get("checkpoint", {}).pop("resumeStep", None)
    return hashlib.sha256(yaml.safe_dump(spec, sort_keys=True).encode()).hexdigest()[:16]


def _check_storage(job: JobSpec) -> None:
    """Every object store the job names (checkpoints, data) is usable from here, or one line
    says why: the workers would otherwise retry a misconfiguration for their whole budget."""
    from ps3_platform.runtime.storage import StorageError, check_storage

    uris = set()
    for stage in stages_of(job):
        uris |= {stage.checkpoint.uri} | {src.uri for src in [*stage.data.sources, *stage.data.eval_sources]}
    for uri in sorted(u for u in uris if u):
        try:
            check_storage(uri)
        except StorageError as exc:
            raise BackendError(f"storage check failed: {exc}") from None


def _storage_trouble(stage_dir: Path) -> str:
    """One line on failing checkpoint uploads, from the records each rank's checkpointer writes
    (`checkpoint-rank-N.jsonl`) on every storage failure and on the first commit after them;
    "" when every rank's last upload went through. The rank failing longest is shown."""
    troubled = []
    for path in stage_dir.glob("checkpoint-rank-*.jsonl"):
        last = next((r for r in reversed(list(_records(path))) if "checkpoint" in r), {})
        if last.get("checkpoint") in ("failing", "failed"):
            troubled.append(last)
    if not troubled:
        return ""
    last = min(troubled, key=lambda r: r.get("since", r.get("time", 0)))
    since = time.strftime("%H:%M:%S", time.localtime(last.get("since", last.get("time", 0))))
    verb = "failing" if last["checkpoint"] == "failing" else "FAILED (retry budget spent)"
    failed = last.get("retries", 0)
    return (f"checkpoint uploads {verb} since {since} ({failed} failed request{'s' * (failed != 1)}); "
            f"last error: {last.get('error', '?')}")


def _last_event(path: Path) -> dict:
    """The record a stage's rank 0 writes when it ends: {"event", "step", "committed"}."""
    return next((r for r in reversed(list(_records(path))) if "event" in r), {})


def _committed_step(stage_dir: Path) -> int | None:
    """The newest committed step of a stage's checkpoints in a run directory (a manifest marks one)."""
    steps = [int(p.parent.name.split("-")[1]) for p in stage_dir.glob("step-*/manifest.json")]
    return max(steps, default=None)


class LocalBackend(Backend):
    name = "local"

    def __init__(self, home: Path | None = None):
        self.runs = (home or platform_home()) / "runs"

    def run_dir(self, name: str) -> Path:
        return self.runs / name

    # ---- submit -------------------------------------------------------------------------
    def _submit(self, job: JobSpec, objects: list[dict], *, replace: bool,
                delete_checkpoints: bool = False) -> SubmitResult:
        name = job.metadata.name
        run_dir = self.run_dir(name)
        spec_text = yaml.safe_dump(resolved(job), sort_keys=True)
        digest = _identity(job)
        if delete_checkpoints and not replace:
            raise BackendError("--delete-checkpoints goes with --replace (it deletes the replaced run's checkpoints)")
        _check_storage(job)
        kept = ""
        if (run_dir / "state.json").exists():
            state = json.loads((run_dir / "state.json").read_text())
            if state.get("spec_hash") == digest and not replace:
                if state.get("phase") in ("Cancelled", "Failed"):
                    (run_dir / "spec.yaml").write_text(spec_text)  # may name a step to resume from
                    return self._resume(run_dir, state)
                return SubmitResult(name, False, f"job {name!r} already exists, unchanged (local run {run_dir})")
            if not replace:
                raise BackendError(f"job {name!r} exists with a different spec; use --replace or cancel it first")
            if state.get("phase") not in TERMINAL_PHASES:
                self._cancel(name)
            kept = self._set_checkpoints_aside(run_dir, delete=delete_checkpoints)
            shutil.rmtree(run_dir)
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        (run_dir / "spec.yaml").write_text(spec_text)
        stages = {s.name: {"phase": "Pending", "task": s.task, "total_steps": s.train.total_steps}
                  for s in stages_of(job)}
        state = {"name": name, "kind": job.kind, "phase": "Pending", "created": time.time(),
                 "spec_hash": digest, "stages": stages, "order": list(stages)}
        (run_dir / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
        self._start_supervisor(run_dir)
        return SubmitResult(name, True, f"job {name!r} submitted to the local backend (run directory {run_dir}){kept}")

    def _resume(self, run_dir: Path, state: dict) -> SubmitResult:
        """Start a Cancelled or Failed run again in place: its Succeeded stages stay done, the others
        resume from their newest committed checkpoint (the runtime finds it)."""
        name, was = state["name"], state["phase"]
        where = []
        for stage_name in state["order"]:
            entry = state["stages"][stage_name]
            if entry.get("phase") == "Succeeded":
                continue
            step = _committed_step(run_dir / "checkpoints" / name / stage_name)  # the default location
            where.append(f"{stage_name} from step {step}" if step is not None
                         else f"{stage_name} from its newest committed checkpoint, if any")
            state["stages"][stage_name] = {k: v for k, v in entry.items() if k in ("task", "total_steps")} | {
                "phase": "Pending"}
        state.update(phase="Pending", resumed=state.get("resumed", 0) + 1)
        state.pop("finished", None)
        write_state(run_dir / "state.json", state)
        self._start_supervisor(run_dir)
        return SubmitResult(name, True, f"job {name!r} was {was}; resuming it in place: {', '.join(where)} "
                                        f"(local run {run_dir})")

    def _set_checkpoints_aside(self, run_dir: Path, *, delete: bool) -> str:
        """The replaced run's checkpoints (the default location, inside its run directory) are
        moved beside it, or deleted when asked, listing them: replacing never loses them silently."""
        ckpt = run_dir / "checkpoints"
        steps = sorted(str(p.relative_to(ckpt)) for p in ckpt.glob("*/*/step-*")) if ckpt.is_dir() else []
        if not steps:
            return ""
        if delete:
            shutil.rmtree(ckpt)
            return "; deleted the replaced run's checkpoints: " + ", ".join(steps)
        aside = run_dir.parent / f"{run_dir.name}.replaced-{time.strftime('%Y%m%dT%H%M%S')}"
        aside.mkdir(parents=True)
        shutil.move(str(ckpt), str(aside / "checkpoints"))
        return (f"; the replaced run's checkpoints ({len(steps)} steps) are kept in {aside / 'checkpoints'} "
                f"(--delete-checkpoints deletes them instead)")

    def _start_supervisor(self, run_dir: Path) -> None:
        log = (run_dir / "supervisor.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "ps3_platform.backends.local_supervisor", str(run_dir)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: cancel signals the whole tree
        )
        state = json.loads((run_dir / "state.json").read_text())
        state["supervisor_pid"] = proc.pid
        state["pgid"] = proc.pid
        write_state(run_dir / "state.json", state)

    # ---- status -------------------------------------------------------------------------
    def _read_state(self, name: str) -> dict:
        path = self.run_dir(name) / "state.json"
        for _ in range(5):
            try:
                return json.loads(path.read_text())
            except FileNotFoundError:
                raise JobNotFoundError(f"no local job named {name!r} (looked in {self.runs})") from None
            except json.JSONDecodeError:
                time.sleep(0.05)  # replaced while reading
        raise BackendError(f"cannot read {path}")

    def _status(self, name: str) -> JobStatus:
        state = self._read_state(name)
        run_dir = self.run_dir(name)
        phase = state["phase"]
        orphans = []
        if phase not in TERMINAL_PHASES and state.get("supervisor_pid") and not _alive(state["supervisor_pid"]):
            # The supervisor died without writing a final phase. Its workers get SIGTERM and stop
            # with a checkpoint; until they are gone the job is not Failed yet.
            orphans = _group_members(state.get("pgid"))
            phase = "Running" if orphans else "Failed"
        order = state.get("order", list(state["stages"]))  # state.json's keys are sorted; keep run order
        stages = [self._stage_status(run_dir, name_, state["stages"][name_]) for name_ in order]
        evaluation, curation = {}, {}
        for stage in stages:
            eval_file = run_dir / stage.name / "eval.json"
            if eval_file.exists():
                evaluation.update(json.loads(eval_file.read_text()))
            curation_file = run_dir / stage.name / CURATION_RECORD
            if curation_file.exists():
                curation[stage.name] = json.loads(curation_file.read_text())
        message = (f"the supervisor (pid {state['supervisor_pid']}) is gone; {len(orphans)} of its processes are "
                   f"still running and stop with a checkpoint (`platformctl cancel {name}` stops them now)"
                   if orphans else "")
        return JobStatus(name=name, kind=state["kind"], backend="local", phase=phase, stages=stages,
                         eval=evaluation, curation=curation, checkpoints=self._checkpoint_location(run_dir),
                         created=state.get("created"), finished=state.get("finished"), message=message)

    def _stage_status(self, run_dir: Path, name: str, entry: dict) -> StageStatus:
        record = _last_jsonl(run_dir / name / "metrics.jsonl")
        status = StageStatus(name=name, phase=entry["phase"], total_steps=entry.get("total_steps"),
                             exit_code=entry.get("exit_code"), workers=entry.get("workers"))
        if record:
            status.step, status.loss = record["step"], record["loss"]
            status.samples_per_s = record.get("samples_per_s")
            status.total_steps = record.get("total", status.total_steps)
            status.unit = record.get("unit", "steps")
            status.failures = record.get("failures") or record.get("bad_samples") or {}  # data stages; training
            status.restart_to_first_step_s = record.get("restart_to_first_step_s")
            status.lost_steps = record.get("lost_steps")
            stalled = _stalled_for(record, time.time()) if status.phase == "Running" else None
            if stalled is not None:  # no ETA: it would pretend the stage is moving
                status.message = f"stalled: no step for {int(stalled)} s (last: step {status.step})"
            elif status.phase == "Running" and record.get("step_seconds"):
                status.eta_s = round((status.total_steps - status.step) * record["step_seconds"], 1)
        if status.phase == "Running":
            status.storage = _storage_trouble(run_dir / name)
        status.restarts = len(list((run_dir / "logs" / name).glob("*/attempt_*"))) - 1 if (
            run_dir / "logs" / name).exists() else 0
        status.restarts = max(0, status.restarts)
        return status

    def _checkpoint_location(self, run_dir: Path) -> str | None:
        spec = yaml.safe_load((run_dir / "spec.yaml").read_text())
        stages = spec["spec"]["stages"] if spec["kind"] == "Pipeline" else [spec["spec"]]
        uris = {s["checkpoint"]["uri"] for s in stages if s["checkpoint"]["uri"]}
        return ", ".join(sorted(uris)) if uris else f"file://{run_dir.resolve()}/checkpoints"

    def _list(self) -> list[JobStatus]:
        if not self.runs.exists():
            return []
        return [self._status(p.name) for p in sorted(self.runs.iterdir()) if (p / "state.json").exists()]

    # ---- logs ---------------------------------------------------------------------------
    def _rank_logs(self, run_dir: Path, stage: str | None, rank: int | None) -> list[Path]:
        """Per-rank files torchrun writes: logs/STAGE/<run id>/attempt_N/RANK/{stdout,stderr}.log."""
        pattern = f"{stage or '*'}/*/attempt_*/{'*' if rank is None else rank}/stderr.log"
        return sorted((run_dir / "logs").glob(pattern), key=lambda p: (p.stat().st_mtime, str(p)))

    def _logs(self, name: str, *, stage: str | None, rank: int | None, follow: bool) -> Iterator[str]:
        self._read_state(name)
        run_dir = self.run_dir(name)
        offsets: dict[Path, int] = {}
        while True:
            for path in self._rank_logs(run_dir, stage, rank):
                with path.open() as f:
                    f.seek(offsets.get(path, 0))
                    chunk = f.read()
                    offsets[path] = f.tell()
                label = f"[{path.parts[-5]} {path.parts[-3]} rank {path.parts[-2]}] "
                for line in chunk.splitlines():
                    yield label + line
            if not follow or self._status(name).done:
                if follow:  # one last pass for lines written just before the end
                    follow = False
                    continue
                return
            time.sleep(0.5)

    # ---- cancel -------------------------------------------------------------------------
    def _cancel(self, name: str, grace_s: float = 45.0) -> str:
        state = self._read_state(name)
        pgid = state.get("pgid")
        if state["phase"] in TERMINAL_PHASES and not _group_alive(pgid):
            return f"job {name!r} already {state['phase'].lower()}"
        started_before = time.time()
        orphans = [] if _alive(state.get("supervisor_pid")) else _group_members(pgid)
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGTERM)  # workers checkpoint and exit; supervisor records Cancelled
            deadline = time.time() + grace_s
            while _group_alive(pgid) and time.time() < deadline:
                time.sleep(0.2)
            if _group_alive(pgid):
                os.killpg(pgid, signal.SIGKILL)
                while _group_alive(pgid):
                    time.sleep(0.1)
        state = self._read_state(name)
        if state["phase"] not in TERMINAL_PHASES:  # the supervisor was killed before it could say so
            state["phase"] = "Cancelled"
            state["finished"] = time.time()
            for entry in state["stages"].values():
                if entry["phase"] in ("Pending", "Running"):
                    entry["phase"] = "Cancelled"
            write_state(self.run_dir(name) / "state.json", state)
        saved = [self._what_was_saved(name, stage, started_before)
                 for stage, entry in state["stages"].items() if entry.get("phase") == "Cancelled"
                 and entry.get("started")]
        if orphans:
            saved.append(f"its supervisor was already gone: stopped {len(orphans)} orphaned processes")
        return f"job {name!r} cancelled; " + "".join(f"{line}; " for line in saved if line) + "no process left running"

    def _what_was_saved(self, name: str, stage: str, cancelled_at: float) -> str:
        """One clause on a stopped stage: its step and the checkpoint a resume starts from."""
        event = _last_event(self.run_dir(name) / stage / "metrics.jsonl")
        if not event or event.get("time", cancelled_at) < cancelled_at:
            return f"stage {stage} stopped without reporting its last checkpoint (killed after the grace period?)"
        step, committed = event.get("step"), event.get("committed")
        if committed is None:
            return f"stage {stage} stopped at step {step} with no committed checkpoint: a resume starts it afresh"
        if committed >= step:
            return f"stage {stage} stopped at step {step}, checkpoint committed"
        return (f"stage {stage} stopped at step {step} but its final save did NOT commit: the last committed "
                f"checkpoint is step {committed} (steps {committed + 1}-{step} are recomputed on resume)")

    def _wait(self, name: str, *, on_status, poll_s: float) -> int:
        try:
            return super()._wait(name, on_status=on_status, poll_s=poll_s)
        except KeyboardInterrupt:
            print(f"\ninterrupted: cancelling {name!r}", file=sys.stderr, flush=True)
            print(self._cancel(name), file=sys.stderr)
            return 130
