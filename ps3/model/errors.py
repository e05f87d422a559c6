"""Typed errors of ``ps3.model``: each message names the input, field or file at fault."""

from __future__ import annotations

__all__ = ["PS3InputError", "CheckpointError"]


class PS3InputError(ValueError):
    """An input tensor whose shape or size the model cannot use; the message names it."""


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: other architecture, missing/extra/misshaped tensors."""
