"""The Kubernetes backend: jobs are compiled objects in a namespace, driven by operators.

- submit: the ConfigMap (pods mount it) and the job's NetworkPolicy first, then the
  PyTorchJob (TrainingJob) or Argo Workflow (Pipeline); then those get an owner reference
  to it, so the operator's ttlSecondsAfterFinished (or a Workflow's deletion) removes them too.
  Idempotent: the `ps3.platform/spec-hash` annotation tells "unchanged" from "changed".
- status/list: PyTorchJob conditions (and the Workflow phase for Pipelines), the stage
  list from the job's spec ConfigMap, progress from the tail of the rank-0 pod log.
- logs: pods by the operator's `training.kubeflow.org/job-name` label.
- cancel: Workflow, PyTorchJobs, ConfigMap and NetworkPolicy (the ConfigMap's annotation
  says whether there is one), Foreground propagation.
"""

from __future__ import annotations

import time
from typing import Iterator

from kubernetes import client

from ps3_platform.compile.configmap import configmap_name
from ps3_platform.compile.labels import (
    BASE_LABELS,
    COMPONENT_LABEL,
    JOB_LABEL,
    KIND_ANNOTATION,
    NETWORK_POLICY_ANNOTATION,
    OPERATOR_JOB_NAME_LABEL,
    SPEC_HASH_ANNOTATION,
    STAGE_LABEL,
)
from ps3_platform.compile.pytorchjob import pytorchjob_name
from ps3_platform.spec import (
    POOLS_CONFIGMAP,
    POOLS_KEY,
    JobSpec,
    PoolConfig,
    SpecError,
    load_pools,
    load_text,
    parse_pools,
    stages_of,
)
from ps3_platform.spec.models import CURATION_RECORD, EVAL_RECORD, PROGRESS_RECORD

from ..base import Backend, BackendError, JobNotFoundError, JobStatus, StageStatus, SubmitResult
from . import status as st
from .api import CONFIGMAP, EVENT, NETWORKPOLICY, POD, PYTORCHJOB, WORKFLOW, Conflict, Kube, Resource
from .config import connect
from .logs import follow_streams, prefixed

RESOURCES = {"ConfigMap": CONFIGMAP, "NetworkPolicy": NETWORKPOLICY, "PyTorchJob": PYTORCHJOB, "Workflow": WORKFLOW}
#: Created before the workload and owned by it.
SUPPORT_KINDS = ("ConfigMap", "NetworkPolicy")
MANAGED = f"app.kubernetes.io/managed-by={BASE_LABELS['app.kubernetes.io/managed-by']}"
#: Log lines read to find a running stage's progress.
PROGRESS_TAIL_LINES = 200


def _meta(obj: dict | None, key: str, field: str = "annotations") -> str | None:
    return (((obj or {}).get("metadata") or {}).get(field) or {}).get(key)


class KubernetesBackend(Backend):
    """Jobs as PyTorchJobs / Argo Workflows in one namespace of a cluster."""

    name = "kubernetes"

    def __init__(self, *, config_file: str | None = None, context: str | None = None, namespace: str | None = None,
                 api_client: client.ApiClient | None = None, poll_s: float = 1.0, delete_timeout_s: float = 300.0):
        """`api_client` bypasses kubeconfig loading (tests); `namespace` beats the context's."""
        if api_client is None:
            api_client, default_namespace = connect(config_file, context)
        else:
            default_namespace = "default"
        self.namespace = namespace or default_namespace
        self.kube = Kube(api_client)
        self.poll_s = poll_s
        self.delete_timeout_s = delete_timeout_s

    # ---- pools ------------------------------------------------------------------------
    def fetch_pools(self, namespace: str | None = None) -> PoolConfig:
        """Pool configuration from the `ps3-platform-pools` ConfigMap the Helm chart writes."""
        ns = namespace or self.namespace
        cm = self.kube.get(CONFIGMAP, POOLS_CONFIGMAP, ns)
        if cm is None or POOLS_KEY not in (cm.get("data") or {}):
            raise BackendError(f"no pool configuration: ConfigMap {POOLS_CONFIGMAP!r} with key {POOLS_KEY!r} not found "
                               f"in namespace {ns!r}; install the ps3-platform Helm chart there or pass --pools FILE")
        return parse_pools(cm["data"][POOLS_KEY], f"configmap {ns}/{POOLS_CONFIGMAP}")

    def pools(self, path: str | None = None) -> PoolConfig:
        """`--pools FILE` when given, else the cluster's pool ConfigMap."""
        return load_pools(path) if path else self.fetch_pools()

    # ---- submit -----------------------------------------------------------------------
    def _submit(self, job: JobSpec, objects: list[dict], *, replace: bool,
                delete_checkpoints: bool = False) -> SubmitResult:
        # Checkpoints live in object storage, never in the cluster objects replace deletes.
        if delete_checkpoints:
            raise BackendError("--delete-checkpoints is for local runs: a cluster job's checkpoints are in its "
                               "checkpoint URI; delete them there")
        name = job.metadata.name
        if not objects:
            raise BackendError(f"job {name!r}: nothing to submit (compile the spec for the kubernetes backend first)")
        ns = next((o["metadata"]["namespace"] for o in objects if o["metadata"].get("namespace")), self.namespace)
        objects = [{**o, "metadata": {**o["metadata"], "namespace": ns}} for o in objects]
        support = [o for o in objects if o["kind"] in SUPPORT_KINDS]
        workloads = [o for o in objects if o["kind"] not in SUPPORT_KINDS]
        new_hash = _meta(workloads[0], SPEC_HASH_ANNOTATION)
        live = self._live_record(job, workloads[0], ns)
        if live is not None:
            old_hash = _meta(live, SPEC_HASH_ANNOTATION)
            if old_hash == new_hash and _meta(live, KIND_ANNOTATION) == job.kind:
                return SubmitResult(name, False, f"job {name!r} already exists in namespace {ns!r}, unchanged")
            if not replace:
                raise BackendError(
                    f"job {name!r} already exists in namespace {ns!r} with a different spec (spec-hash "
                    f"{str(old_hash)[:12]} -> {str(new_hash)[:12]}); use --replace to delete and recreate it")
            deleted = self._delete_all(name, ns)
            new = [(RESOURCES[o["kind"]], o["metadata"]["name"]) for o in workloads + support]
            self._wait_deleted(deleted + [item for item in new if item not in deleted], ns)
        return self._create(name, ns, support, workloads, replaced=live is not None)

    def _live_record(self, job: JobSpec, primary: dict, ns: str) -> dict | None:
        """The running object this submit would collide with: the workload itself, or a
        different kind of job of the same name (recognised by its spec ConfigMap)."""
        existing = self.kube.get(RESOURCES[primary["kind"]], primary["metadata"]["name"], ns)
        if existing is not None:
            return existing
        cm = self.kube.get(CONFIGMAP, configmap_name(job.metadata.name), ns)
        if cm is not None and _meta(cm, KIND_ANNOTATION) not in (None, job.kind):
            return cm
        return None

    def _create(self, name: str, ns: str, support: list[dict], workloads: list[dict], *, replaced: bool):
        for obj in support:
            try:
                self.kube.create(RESOURCES[obj["kind"]], obj, ns)
            except Conflict:
                self.kube.replace(RESOURCES[obj["kind"]], obj, ns)  # a leftover of an earlier job: no workload uses it
        created = []
        try:
            for obj in workloads:
                created.append(self.kube.create(RESOURCES[obj["kind"]], obj, ns))
        except BackendError:
            for obj in support:  # do not leave a spec or policy behind that no job uses
                self.kube.delete(RESOURCES[obj["kind"]], obj["metadata"]["name"], ns)
            raise
        warning = self._adopt(support, created[0], ns)
        names = ", ".join(f"{o['kind']} {o['metadata']['name']}" for o in support + workloads)
        verb = "replaced" if replaced else "created"
        return SubmitResult(name, True, f"job {name!r} {verb} in namespace {ns!r}: {names}{warning}")

    def _adopt(self, support: list[dict], owner: dict, ns: str) -> str:
        """Make the workload own the ConfigMap and policy (garbage-collected with it); best effort."""
        ref = {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": owner["metadata"]["name"],
               "uid": owner["metadata"]["uid"], "blockOwnerDeletion": False}
        for obj in support:
            what = f"{obj['kind']} {obj['metadata']['name']}"
            try:
                self.kube.patch(RESOURCES[obj["kind"]], obj["metadata"]["name"],
                                {"metadata": {"ownerReferences": [ref]}}, ns)
            except BackendError as exc:
                return f" (warning: {what} will not be garbage-collected: {exc})"
        return ""

    def _wait_deleted(self, objects: list[tuple[Resource, str]], ns: str) -> None:
        """Foreground deletion finishes when the dependents (pods) are gone: wait for it, so
        the new objects (same names) do not collide with terminating ones."""
        deadline = time.monotonic() + self.delete_timeout_s
        for res, obj_name in objects:
            while self.kube.get(res, obj_name, ns, missing_api_ok=True) is not None:
                if time.monotonic() > deadline:
                    raise BackendError(f"timed out after {self.delete_timeout_s:.0f}s waiting for {res.kind} "
                                       f"{obj_name!r} to be deleted; try again later")
                time.sleep(self.poll_s)

    # ---- status -----------------------------------------------------------------------
    def _spec(self, cm: dict | None) -> JobSpec | None:
        text = ((cm or {}).get("data") or {}).get("spec.yaml")
        if not text:
            return None
        try:
            return load_text(text, f"configmap {cm['metadata']['name']}").job
        except SpecError:
            return None  # written by another platformctl version: fall back to the objects

    def _status(self, name: str) -> JobStatus:
        ns = self.namespace
        cm = self.kube.get(CONFIGMAP, configmap_name(name), ns)
        jobs = self.kube.list(PYTORCHJOB, ns, f"{JOB_LABEL}={name}")
        kind = _meta(cm, KIND_ANNOTATION) or next((_meta(j, KIND_ANNOTATION) for j in jobs), None)
        workflow = None
        if kind in (None, "Pipeline"):
            workflow = self.kube.get(WORKFLOW, name, ns, missing_api_ok=True)
        if cm is None and not jobs and workflow is None:
            raise JobNotFoundError(f"job {name!r} not found in namespace {ns!r}")
        return self._assemble(name, cm, jobs, workflow, progress=True)

    def _assemble(self, name: str, cm: dict | None, jobs: list[dict], workflow: dict | None, *,
                  progress: bool) -> JobStatus:
        """One JobStatus from the objects of job `name` (any of them may be missing)."""
        spec = self._spec(cm)
        kind = _meta(cm, KIND_ANNOTATION) or ("Pipeline" if workflow else None) or \
            next((_meta(j, KIND_ANNOTATION) for j in jobs), None) or "TrainingJob"
        stages = self._stages(spec, st.by_stage(jobs), progress=progress)
        if kind == "Pipeline":
            main, phase = workflow, (st.workflow_phase(workflow) if workflow else st.pipeline_phase(stages))
            if phase in ("Succeeded", "Failed"):
                for stage in stages:  # the Workflow will not start them any more
                    stage.phase = "Skipped" if stage.phase == "Pending" else stage.phase
            finished_at = ((workflow or {}).get("status") or {}).get("finishedAt")
        else:
            main, phase = next(iter(jobs), None), (stages[0].phase if stages else "Pending")
            finished_at = ((main or {}).get("status") or {}).get("completionTime")
        conditions = ((main or {}).get("status") or {}).get("conditions") or []
        uri = stages_of(spec)[0].checkpoint.uri if spec else None
        curation = self._curation(name, spec, stages) if progress else {}
        evaluation = self._evaluation(name, spec, stages) if progress else {}
        return JobStatus(name=name, kind=kind, backend=self.name, phase=phase, stages=stages, curation=curation,
                         eval=evaluation,
                         conditions=[dict(c) for c in conditions],
                         checkpoints=f"{uri.rstrip('/')}/{name}" if uri else None,
                         created=st.parse_time(((main or cm or {}).get("metadata") or {}).get("creationTimestamp")),
                         finished=st.parse_time(finished_at))

    def _stages(self, spec: JobSpec | None, objs: dict[str, dict], *, progress: bool) -> list[StageStatus]:
        """Stage statuses in dependency order (from the spec; else whatever PyTorchJobs exist)."""
        stage_specs = {s.name: s for s in stages_of(spec)} if spec else {}
        out = []
        for stage_name in list(stage_specs) or sorted(objs):
            stage_spec, obj = stage_specs.get(stage_name), objs.get(stage_name)
            phase = st.pytorchjob_phase(obj)[0]
            record = self._record(spec, stage_spec, PROGRESS_RECORD) if progress and obj is not None else None
            found = st.progress_from_record(record) if record else None
            pods = self._pods(obj) if progress and obj is not None and (
                phase in ("Created", "Restarting") or phase == "Running" and found is None) else []
            if found is None and phase in ("Running", "Restarting"):
                found = self._progress(pods)  # no record readable from here: the rank-0 log's last line
            status = st.stage_status(
                stage_name, obj, progress=found, record=record,
                total_steps=stage_spec.train.total_steps if stage_spec else None,
                global_batch=stage_spec.train.global_batch if stage_spec else None)
            waiting = st.why_waiting(pods)  # unschedulable, image pull
            if not waiting and progress and phase == "Created" and not any(_running(p) for p in pods):
                waiting = st.why_not_created(self._events(obj))  # no pods at all: quota, admission
            status.message = waiting or status.message
            out.append(status)
        return out

    def _events(self, obj: dict) -> list[dict]:
        """Events about the stage's PyTorchJob (where the operator reports failed pod creation)."""
        try:
            return self.kube.list(EVENT, self.namespace, "", fields=f"involvedObject.name={obj['metadata']['name']}")
        except BackendError:
            return []

    def _pods(self, obj: dict) -> list[dict]:
        """The stage's pods; none when this user may not list them (status must still answer)."""
        try:
            return self.kube.list(POD, self.namespace, f"{OPERATOR_JOB_NAME_LABEL}={obj['metadata']['name']}")
        except BackendError:
            return []

    @staticmethod
    def _record(spec: JobSpec | None, stage, name: str) -> dict | None:
        """A record the stage's workers left beside its checkpoints, if this machine can read it."""
        if spec is None or stage is None or not stage.checkpoint.uri:
            return None
        return st.read_record(f"{stage.checkpoint.uri.rstrip('/')}/{spec.metadata.name}/{stage.name}/{name}")

    def _evaluation(self, name: str, spec: JobSpec | None, stages: list[StageStatus]) -> dict:
        """Results of finished stages that evaluated, from beside their checkpoints (as local runs
        read them from their run directories)."""
        done = {s.name for s in stages if s.phase == "Succeeded"}
        evaluation: dict = {}
        for stage in stages_of(spec) if spec else []:
            if stage.name in done:
                evaluation.update(self._record(spec, stage, EVAL_RECORD) or {})
        return evaluation

    @staticmethod
    def _curation(name: str, spec: JobSpec | None, stages: list[StageStatus]) -> dict:
        """Summaries of finished curate stages, read from beside their checkpoints (the pods'
        own run directories are gone); a store this machine cannot read just leaves them out."""
        done = {s.name for s in stages if s.phase == "Succeeded"}
        out = {}
        for stage in stages_of(spec) if spec else []:
            if stage.task == "curate" and stage.name in done and stage.checkpoint.uri:
                record = st.read_record(f"{stage.checkpoint.uri.rstrip('/')}/{name}/{stage.name}/{CURATION_RECORD}")
                if record is not None:
                    out[stage.name] = record
        return out

    def _progress(self, pods: list[dict]) -> dict | None:
        """Last progress line of the pod running rank 0 (any pod, for elastic stages)."""
        try:
            for _, pod in st.ranked_pods(pods)[:4]:
                if (pod.get("status") or {}).get("phase") != "Running":
                    continue
                found = st.parse_progress(self.kube.pod_log(pod["metadata"]["name"], self.namespace,
                                                            tail_lines=PROGRESS_TAIL_LINES))
                if found:
                    return found
        except BackendError:
            return None  # progress is a nicety: no log permission must not break status
        return None

    def _list(self) -> list[JobStatus]:
        ns = self.namespace
        cms = self.kube.list(CONFIGMAP, ns, f"{MANAGED},{COMPONENT_LABEL}=spec")
        jobs = self.kube.list(PYTORCHJOB, ns, MANAGED)
        workflows = self.kube.list(WORKFLOW, ns, MANAGED, missing_api_ok=True)
        names = sorted({_meta(o, JOB_LABEL, "labels") for o in cms + jobs + workflows} - {None})
        return [
            self._assemble(name,
                           next((c for c in cms if _meta(c, JOB_LABEL, "labels") == name), None),
                           [j for j in jobs if _meta(j, JOB_LABEL, "labels") == name],
                           next((w for w in workflows if _meta(w, JOB_LABEL, "labels") == name), None),
                           progress=False)
            for name in names
        ]

    # ---- logs -------------------------------------------------------------------------
    def _default_stage(self, name: str) -> str:
        """The newest stage that has a PyTorchJob (the one running, or the last to run)."""
        jobs = self.kube.list(PYTORCHJOB, self.namespace, f"{JOB_LABEL}={name}")
        if not jobs:
            raise JobNotFoundError(f"job {name!r} has no started stage in namespace {self.namespace!r}")
        newest = max(jobs, key=lambda j: (j["metadata"].get("creationTimestamp") or "", j["metadata"]["name"]))
        return _meta(newest, STAGE_LABEL, "labels") or newest["metadata"]["name"].removeprefix(f"{name}-")

    def _logs(self, name: str, *, stage: str | None, rank: int | None, follow: bool) -> Iterator[str]:
        ns = self.namespace
        stage = stage or self._default_stage(name)
        job_name = pytorchjob_name(name, stage)
        pods = st.ranked_pods(self.kube.list(POD, ns, f"{OPERATOR_JOB_NAME_LABEL}={job_name}"))
        if not pods:
            if self.kube.get(PYTORCHJOB, job_name, ns) is None:
                raise JobNotFoundError(f"job {name!r} has no stage {stage!r} in namespace {ns!r}")
            raise BackendError(f"stage {stage!r} of job {name!r} has no pods yet (pending scheduling or admission)")
        if rank is not None:
            pods = [(r, p) for r, p in pods if r == rank]
            if not pods:
                raise BackendError(f"stage {stage!r} of job {name!r} has no rank {rank} "
                                   f"(ranks are pods: 0 = master-0, then the workers)")
        many = len(pods) > 1
        if follow:
            streams = [(f"[rank {r}] " if many else "", self.kube.pod_log_stream(p["metadata"]["name"], ns))
                       for r, p in pods]
            return follow_streams(streams)
        return self._log_lines(pods, ns, many)

    def _log_lines(self, pods: list[tuple[int, dict]], ns: str, many: bool) -> Iterator[str]:
        texts = [(r, self.kube.pod_log(p["metadata"]["name"], ns)) for r, p in pods]  # errors before any output
        for r, text in texts:
            yield from prefixed(text.splitlines(keepends=True), f"[rank {r}] " if many else "")

    # ---- cancel -----------------------------------------------------------------------
    def _delete_all(self, name: str, ns: str) -> list[tuple[Resource, str]]:
        """Delete every object of job `name` (Foreground); returns what was deleted."""
        cm = self.kube.get(CONFIGMAP, configmap_name(name), ns)
        targets: list[tuple[Resource, str]] = []
        # The Workflow first, so it cannot start another stage while its jobs go.
        if _meta(cm, KIND_ANNOTATION) in (None, "Pipeline"):
            targets.append((WORKFLOW, name))
        targets += [(PYTORCHJOB, j["metadata"]["name"]) for j in self.kube.list(PYTORCHJOB, ns, f"{JOB_LABEL}={name}")]
        if policy := _meta(cm, NETWORK_POLICY_ANNOTATION):
            targets.append((NETWORKPOLICY, policy))
        if cm is not None:
            targets.append((CONFIGMAP, configmap_name(name)))
        return [(res, obj_name) for res, obj_name in targets if self.kube.delete(res, obj_name, ns)]

    def _cancel(self, name: str) -> str:
        deleted = self._delete_all(name, self.namespace)
        if not deleted:
            raise JobNotFoundError(f"job {name!r} not found in namespace {self.namespace!r}")
        what = ", ".join(f"{res.kind} {obj_name}" for res, obj_name in deleted)
        return f"job {name!r} cancelled in namespace {self.namespace!r}: deleted {what}"


def _running(pod: dict) -> bool:
    return (pod.get("status") or {}).get("phase") == "Running"
