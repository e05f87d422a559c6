"""Where jobs run: `kubernetes` (PyTorchJobs via the API server) and `local` (torchrun here)."""

from .base import Backend, BackendError, JobNotFoundError, JobStatus, StageStatus, SubmitResult

__all__ = ["Backend", "BackendError", "JobNotFoundError", "JobStatus", "StageStatus", "SubmitResult"]
