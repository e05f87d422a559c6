"""Backend errors, importable without the backends themselves (the CLI catches them)."""

from .base import BackendError, JobNotFoundError

__all__ = ["BackendError", "JobNotFoundError"]
