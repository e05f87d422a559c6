"""Preemption: turn SIGTERM/SIGINT into "finish this step, checkpoint, exit retryable"."""

from __future__ import annotations

import signal
import threading
import time

#: Exit code after a preemption checkpoint. The PyTorchJob `ExitCode` restart policy treats
#: 128-255 as retryable (143 = 128 + SIGTERM), so the operator recreates the pod.
PREEMPTED_EXIT_CODE = 143


class StopFlag:
    """Set by a signal handler; the trainer polls it once per step (collectively)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_name: str | None = None
        self.requested_at: float | None = None  # time.monotonic() of the first signal

    def install(self) -> "StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name
        if self.requested_at is None:
            self.requested_at = time.monotonic()
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()
