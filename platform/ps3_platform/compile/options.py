"""Knobs of the compiled objects that are platform policy, not part of a job spec.

Defaults follow what the training operator and Argo need for the runtime's restart
model: `ExitCode` restarts (exit 128-255 is retryable, the runtime exits 143 after a
SIGTERM checkpoint), and a grace period long enough to write that checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import CompileError

#: Allowed values the CRD schema does not enforce (plain strings there; the webhook checks).
RESTART_POLICIES = ("Always", "OnFailure", "Never", "ExitCode")
CLEAN_POD_POLICIES = ("None", "Running", "All")

DEFAULT_IMAGE_REPO = "ghcr.io/ps3-platform/ps3-platform"
JOB_SERVICE_ACCOUNT = "ps3-platform-job"
WORKFLOW_SERVICE_ACCOUNT = "ps3-platform-workflow"


def default_image() -> str:
    """The platform image matching this package version (stages that name no image)."""
    from ps3_platform import __version__

    return f"{DEFAULT_IMAGE_REPO}:{__version__}"


@dataclass(frozen=True, kw_only=True)
class CompileOptions:
    """Platform-wide settings of compiled objects (the CLI uses the defaults)."""

    #: Image for stages whose spec names none.
    image: str | None = None
    #: Job-level budget of pod restarts before the PyTorchJob is Failed.
    backoff_limit: int = 6
    #: `Running`: when the Master succeeds, still-running workers are deleted
    #: (kubeflow/trainer#1982, #1579), while finished pods stay for `logs`.
    clean_pod_policy: str = "Running"
    #: Finished jobs (and, through owner references, their ConfigMaps) go after a week.
    ttl_seconds_after_finished: int | None = 7 * 24 * 3600
    restart_policy: str = "ExitCode"
    #: Seconds between SIGTERM and SIGKILL: the runtime checkpoints in between.
    termination_grace_seconds: int = 120
    job_service_account: str = JOB_SERVICE_ACCOUNT
    workflow_service_account: str = WORKFLOW_SERVICE_ACCOUNT

    def __post_init__(self) -> None:
        if self.clean_pod_policy not in CLEAN_POD_POLICIES:
            raise CompileError(f"cleanPodPolicy {self.clean_pod_policy!r} is not one of "
                               f"{', '.join(CLEAN_POD_POLICIES)}")
        if self.restart_policy not in RESTART_POLICIES:
            raise CompileError(f"restartPolicy {self.restart_policy!r} is not one of {', '.join(RESTART_POLICIES)}")
        if self.backoff_limit < 0:
            raise CompileError(f"backoffLimit must be >= 0, got {self.backoff_limit}")
        if self.ttl_seconds_after_finished is not None and self.ttl_seconds_after_finished < 0:
            raise CompileError(f"ttlSecondsAfterFinished must be >= 0, got {self.ttl_seconds_after_finished}")
        if self.termination_grace_seconds < 0:
            raise CompileError(f"terminationGracePeriodSeconds must be >= 0, got {self.termination_grace_seconds}")

    def image_for(self, image: str | None) -> str:
        return image or self.image or default_image()
