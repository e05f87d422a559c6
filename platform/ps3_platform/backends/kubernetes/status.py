"""PyTorchJob / Workflow status -> the backend-neutral `JobStatus` (pure functions).

Phase rule: the *last* condition whose status is "True" wins (the operator appends the
newest condition last, and flips Running to False on Succeeded/Failed/Suspended; the
`kubectl get pytorchjob` STATE column reads the last entry the same way).

Progress (step/total, loss, samples/s) is not in any Kubernetes object; rank 0 logs
`step N/T loss L lr X S samples/s` every `monitoring.logEverySteps` steps (a data stage such
as curate logs `N/T images R images/s`), so a running stage's progress is the last such
line in the tail of its rank-0 pod log.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime

from ps3_platform.compile.labels import STAGE_LABEL

from ..base import StageStatus

log = logging.getLogger(__name__)

PYTORCHJOB_PHASES = ("Created", "Running", "Restarting", "Succeeded", "Failed", "Suspended")
#: Argo Workflow phases -> ours ("Error" is an Argo-side failure, e.g. the executor died).
WORKFLOW_PHASES = {"": "Pending", "Pending": "Pending", "Running": "Running", "Succeeded": "Succeeded",
                   "Failed": "Failed", "Error": "Failed"}
_PROGRESS = re.compile(r"step (\d+)/(\d+) loss (\S+) lr \S+ ([0-9.]+) samples/s")
RECORD_TIMEOUT_S = 5.0  # seconds per request for a record beside the checkpoints
_IMAGES = re.compile(r"(\d+)/(\d+) images ([0-9.]+) images/s")


def parse_time(stamp: str | None) -> float | None:
    """RFC 3339 timestamp of the API server -> epoch seconds."""
    if not stamp:
        return None
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def last_true_condition(obj: dict | None) -> dict | None:
    conditions = ((obj or {}).get("status") or {}).get("conditions") or []
    true = [c for c in conditions if c.get("status") == "True" and c.get("type") in PYTORCHJOB_PHASES]
    return true[-1] if true else None


def pytorchjob_phase(obj: dict | None) -> tuple[str, str]:
    """(phase, message) of a PyTorchJob; Pending when it does not exist or has no condition yet."""
    if obj is None:
        return "Pending", ""
    condition = last_true_condition(obj)
    if condition is None:
        return "Pending", ""
    return condition["type"], condition.get("message", "")


def active_workers(obj: dict | None) -> int | None:
    replicas = ((obj or {}).get("status") or {}).get("replicaStatuses") or {}
    return sum(int(r.get("active") or 0) for r in replicas.values()) if replicas else None


def parse_progress(text: str) -> dict | None:
    """The newest progress line in a log tail: step, total, loss, samples/s (or images done,
    planned and images/s for a data stage, with unit "images")."""
    steps, images = list(_PROGRESS.finditer(text)), list(_IMAGES.finditer(text))
    last_step, last_images = (steps[-1] if steps else None), (images[-1] if images else None)
    if last_images is not None and (last_step is None or last_images.start() > last_step.start()):
        done, total, rate = last_images.groups()
        return {"step": int(done), "total_steps": int(total), "loss": None, "samples_per_s": float(rate),
                "unit": "images"}
    if last_step is None:
        return None
    step, total, loss, rate = last_step.groups()
    return {"step": int(step), "total_steps": int(total), "loss": float(loss), "samples_per_s": float(rate)}


def eta_seconds(progress: dict, global_batch: int | None) -> float | None:
    if not progress.get("samples_per_s"):
        return None
    if progress.get("unit") == "images":  # one image per unit of progress
        return max(0.0, (progress["total_steps"] - progress["step"]) / progress["samples_per_s"])
    if not global_batch:
        return None
    steps_per_s = progress["samples_per_s"] / global_batch
    return max(0.0, (progress["total_steps"] - progress["step"]) / steps_per_s)


def progress_from_record(record: dict) -> dict | None:
    """The progress fields of a stage's `progress.json` (what rank 0 writes at each log interval)."""
    try:
        return {"step": int(record["step"]), "total_steps": int(record["total_steps"]),
                "loss": record.get("loss"), "samples_per_s": record.get("samples_per_s"),
                "eta_s": record.get("eta_s")}
    except (KeyError, TypeError, ValueError):
        return None


def stage_status(name: str, obj: dict | None, *, total_steps: int | None = None,
                 progress: dict | None = None, record: dict | None = None,
                 global_batch: int | None = None) -> StageStatus:
    """A stage from its PyTorchJob, its progress (the workers' record, or the rank-0 log's last
    progress line) and, from the record, what its last restart cost."""
    phase, message = pytorchjob_phase(obj)
    status = StageStatus(name=name, phase=phase, total_steps=total_steps, workers=active_workers(obj), message=message)
    if progress:
        status.step = progress["step"]
        status.total_steps = progress["total_steps"]
        status.loss = progress["loss"]
        status.samples_per_s = progress["samples_per_s"]
        status.unit = progress.get("unit", "steps")
        if phase in ("Running", "Restarting"):
            status.eta_s = progress.get("eta_s", eta_seconds(progress, global_batch))
    if record:
        status.restart_to_first_step_s = record.get("restart_to_first_step_s")
        status.lost_steps = record.get("lost_steps")
    return status


def workflow_phase(obj: dict) -> str:
    return WORKFLOW_PHASES.get((obj.get("status") or {}).get("phase", ""), "Pending")


def pipeline_phase(stages: list[StageStatus]) -> str:
    """A Pipeline's phase from its stages, when there is no Workflow to ask."""
    phases = [s.phase for s in stages]
    if "Failed" in phases:
        return "Failed"
    if phases and all(p == "Succeeded" for p in phases):
        return "Succeeded"
    if any(p in ("Running", "Restarting", "Created") for p in phases) or "Succeeded" in phases:
        return "Running"
    return "Pending"


def by_stage(objects: list[dict]) -> dict[str, dict]:
    return {o["metadata"].get("labels", {}).get(STAGE_LABEL, o["metadata"]["name"]): o for o in objects}


def pod_rank(pod: dict, has_master: bool) -> int:
    """Node rank of a pod as the operator numbers them: master-0 is 0, worker-i is i+1
    (or i when there is no Master, as in elastic stages)."""
    labels = pod["metadata"].get("labels", {})
    index = int(labels.get("training.kubeflow.org/replica-index", 0))
    if labels.get("training.kubeflow.org/replica-type") == "master":
        return 0
    return index + 1 if has_master else index


def ranked_pods(pods: list[dict]) -> list[tuple[int, dict]]:
    types = {p["metadata"].get("labels", {}).get("training.kubeflow.org/replica-type") for p in pods}
    has_master = "master" in types
    return sorted(((pod_rank(p, has_master), p) for p in pods), key=lambda rp: rp[0])


def read_record(uri: str) -> dict | None:
    """A JSON record a stage wrote to its checkpoint store, or None when it cannot be read
    from here (no credentials, not written yet): status must not fail on a nicety."""
    import fsspec

    from ps3_platform.runtime.storage import storage_options

    try:  # a few seconds at most: status must answer even when the store does not
        with fsspec.open(uri, "r", **storage_options(uri, request_timeout_s=RECORD_TIMEOUT_S)) as f:
            record = json.load(f)
    except Exception as exc:  # noqa: BLE001 - any store error (botocore, OSError, JSON) means "not available"
        log.debug("no record at %s: %s", uri, exc)
        return None
    return record if isinstance(record, dict) else None


#: Container states that keep a pod from starting, and what a user should look at.
_WAITING_REASONS = {"ErrImagePull": "image pull", "ImagePullBackOff": "image pull",
                    "InvalidImageName": "image pull", "CreateContainerConfigError": "container config",
                    "CreateContainerError": "container config"}


def why_waiting(pods: list[dict]) -> str:
    """Why a stage's pods are not running yet, from their status (scheduler and kubelet say
    it there): "" when none is held up."""
    reasons = []
    for pod in pods:
        status = pod.get("status") or {}
        if status.get("phase") != "Pending":
            continue
        name = pod["metadata"]["name"]
        for condition in status.get("conditions") or []:
            if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                reasons.append(f"{name} unschedulable: {_one_line(condition.get('message') or condition.get('reason'))}")
        for container in status.get("containerStatuses") or []:
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in _WAITING_REASONS:
                reasons.append(f"{name} {_WAITING_REASONS[waiting['reason']]} ({waiting['reason']}): "
                               f"{_one_line(waiting.get('message') or '')}")
    if not reasons:
        return ""
    more = f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else ""
    return f"waiting: {reasons[0]}{more}"


def _one_line(text: str | None) -> str:
    return " ".join(str(text or "").split())[:300]


def why_not_created(events: list[dict]) -> str:
    """Why the operator could not create a stage's pods (a ResourceQuota, an admission webhook),
    from the Warning events on its PyTorchJob: "" when there is none."""
    warnings = sorted((e for e in events if e.get("type") == "Warning" and "create" in
                       f"{e.get('reason', '')} {e.get('message', '')}".lower()),
                      key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
    if not warnings:
        return ""
    message = _one_line(warnings[-1].get("message"))
    kind = "quota" if "exceeded quota" in message else "cannot create pods"
    return f"waiting: {kind}: {message}"
