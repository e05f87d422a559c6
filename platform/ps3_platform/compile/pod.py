"""The pod template of a stage: container, volumes, security, placement on its pool.

Every replica (Master and Worker) uses the same template; the training operator adds
the rendezvous environment (`PET_*`, `MASTER_ADDR`, ...) that torchrun reads, so the
command carries no distributed flags.

The root filesystem is read-only: a worker writes only to its emptyDirs, `/tmp` (the run
directory, torchrun's error files, Ray's session), `$HOME` (library caches: Triton,
Hugging Face, matplotlib) and `/dev/shm` (checkpoint staging, data loader tensors; sized
from the data settings by `shm.shm_size` unless the spec gives resources.shmSize).
`make rehearse` (ops/rehearse.py) runs these pods' command under exactly that layout.
"""

from __future__ import annotations

from ps3_platform.ports import RAY_PORTS
from ps3_platform.spec import JobSpec, Pool, Stage, storage_of
from ps3_platform.spec.pools import pool_env
from ps3_platform.spec.models import RAY_TASKS

from .configmap import SPEC_PATH, spec_mount, spec_volume
from .errors import CompileError
from .options import CompileOptions
from .shm import shm_size

CONTAINER_NAME = "pytorch"  # the operator requires a container of this name
RDZV_PORT_NAME = "pytorchjob-port"
RDZV_PORT = 23456
METRICS_PORT_NAME = "metrics"
SHM_VOLUME = "dshm"
#: Writable emptyDirs under the read-only root: volume name -> mount path.
SCRATCH_VOLUMES = {"tmp": "/tmp", "home": "/home/ps3"}
#: The image's home (Containerfile); set in the env too, so any image's caches land in the emptyDir.
HOME_DIR = SCRATCH_VOLUMES["home"]
#: Numeric ids so `runAsNonRoot` can be verified even for images whose USER is a name.
RUN_AS_ID = 1000
#: Environment the compiler derives from spec.storage (a stage's env may not set these).
PLATFORM_ENV = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
#: torchrun's grace for workers between its SIGTERM and SIGKILL, set from the pod's grace period
#: minus the seconds kept back for the agent itself.
SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
AGENT_SHUTDOWN_MARGIN = 10


def command(stage_name: str) -> list[str]:
    """torchrun through `ps3_platform.runtime.launch`, so a preempted pod exits 143 (retryable), not 1."""
    return ["python", "-m", "ps3_platform.runtime.launch",
            "--module", "ps3_platform.runtime", "--spec", SPEC_PATH, "--stage", stage_name]


def _env(job: JobSpec, stage: Stage, grace_seconds: int) -> list[dict]:
    """Stage env (sorted, so output is stable), HOME, the agent's shutdown timeout, then storage settings.

    Credentials only by reference. HOME is the writable home emptyDir unless the stage sets
    it. The shutdown timeout is how long torchrun lets workers finish their SIGTERM
    checkpoint before it kills them: most of the pod's grace period.
    """
    storage = storage_of(job)
    clash = sorted(set(stage.env) & set(PLATFORM_ENV))
    if clash:
        raise CompileError(f"stage {stage.name!r}: env {', '.join(clash)} is set by the platform from spec.storage; "
                           "remove it from env")
    env = [{"name": k, "value": v} for k, v in sorted(stage.env.items())]
    if "HOME" not in stage.env:
        env.append({"name": "HOME", "value": HOME_DIR})
    if SHUTDOWN_TIMEOUT_ENV not in stage.env:  # a stage may choose its own
        env.append({"name": SHUTDOWN_TIMEOUT_ENV, "value": str(max(1, grace_seconds - AGENT_SHUTDOWN_MARGIN))})
    if storage.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": storage.endpoint})
    if storage.region:
        env += [{"name": name, "value": storage.region} for name in ("AWS_REGION", "AWS_DEFAULT_REGION")]
    if storage.credentials_secret:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": storage.credentials_secret, "key": key}}})
    return env


def _ports(stage: Stage) -> list[dict]:
    """Rendezvous port, one metrics port per local rank (the runtime serves base + local rank), then
    a Ray node's fixed ports for stages whose workers form a Ray cluster."""
    ports = [{"name": RDZV_PORT_NAME, "containerPort": RDZV_PORT, "protocol": "TCP"}]
    base = stage.monitoring.port
    for local_rank in range(stage.resources.nproc):
        name = METRICS_PORT_NAME if local_rank == 0 else f"{METRICS_PORT_NAME}-{local_rank}"
        ports.append({"name": name, "containerPort": base + local_rank, "protocol": "TCP"})
    if stage.task in RAY_TASKS:  # rank 0's pod is the Ray head, the others join it (ps3.curation.ray_cluster)
        ports += [{"name": name, "containerPort": port, "protocol": "TCP"} for name, port in RAY_PORTS.items()]
    return ports


def _resources(stage: Stage, pool: Pool) -> dict:
    """Requests for cpu/memory/GPUs; limits for memory and GPUs (no CPU limit: throttling hurts)."""
    res = stage.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if res.cpu is not None:
        requests["cpu"] = str(res.cpu)
    if res.memory is not None:
        requests["memory"] = limits["memory"] = str(res.memory)
    if res.gpus_per_node:
        requests[pool.gpu_resource] = limits[pool.gpu_resource] = str(res.gpus_per_node)
    out = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _container(job: JobSpec, stage: Stage, pool: Pool, image: str, grace_seconds: int) -> dict:
    container = {
        "name": CONTAINER_NAME,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": command(stage.name),
        "env": _env(job, stage, grace_seconds) + pool_env(pool, stage.env),  # + the pool's GPU peak, for MFU
        "ports": _ports(stage),
        "volumeMounts": [spec_mount(), {"name": SHM_VOLUME, "mountPath": "/dev/shm"},
                         *({"name": name, "mountPath": path} for name, path in SCRATCH_VOLUMES.items())],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if resources := _resources(stage, pool):
        container["resources"] = resources
    return container


def pod_template(job: JobSpec, stage: Stage, pool: Pool, labels: dict[str, str], options: CompileOptions,
                 image: str | None) -> dict:
    """PodTemplateSpec for every replica of `stage` on `pool`."""
    shutdown_s = options.termination_grace_seconds - AGENT_SHUTDOWN_MARGIN
    if stage.checkpoint.stop_grace_seconds >= shutdown_s:
        raise CompileError(
            f"stage {stage.name}: checkpoint.stopGraceSeconds ({stage.checkpoint.stop_grace_seconds:g}) must be below "
            f"the {shutdown_s} s a worker gets between SIGTERM and SIGKILL (terminationGracePeriodSeconds "
            f"{options.termination_grace_seconds} minus {AGENT_SHUTDOWN_MARGIN} s for the agent)")
    spec: dict = {
        "serviceAccountName": options.job_service_account,
        "terminationGracePeriodSeconds": options.termination_grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_ID,
            "runAsGroup": RUN_AS_ID,
            "fsGroup": RUN_AS_ID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(job, stage, pool, options.image_for(image), options.termination_grace_seconds)],
        "volumes": [
            spec_volume(job.metadata.name),
            {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": shm_size(stage)}},
            *({"name": name, "emptyDir": {}} for name in SCRATCH_VOLUMES),
        ],
    }
    if pool.node_selector:
        spec["nodeSelector"] = dict(pool.node_selector)
    if pool.tolerations:
        spec["tolerations"] = [dict(t) for t in pool.tolerations]
    if pool.priority_class:
        spec["priorityClassName"] = pool.priority_class
    return {"metadata": {"labels": dict(labels)}, "spec": spec}
