"""What a restart costs: seconds from process start to the first step after it, and steps lost.

Elastic training is only as good as its restarts. Two figures say how good: the time a
restarted worker takes from its process starting (interpreter, imports, rendezvous, model
build, checkpoint load, first batch) to its first completed step, and the work thrown away,
the steps the previous attempt had done past the checkpoint this one resumed from. The
second needs the previous attempt's progress, which died with it: rank 0 leaves a small
`progress.json` beside the checkpoints at every log interval (the record `platformctl
status` reads on a cluster), so it is known to within one log interval (a lower bound).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from ps3_platform.spec.models import PROGRESS_RECORD

PROGRESS = PROGRESS_RECORD
_IMPORTED_AT = time.time()  # fallback process start where /proc is not there


def process_start_time() -> float:
    """Unix time this process started (Linux: from /proc; elsewhere: when this module loaded)."""
    try:
        with open("/proc/self/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of proc(5), counted after the command name
        with open("/proc/stat") as boot:
            btime = next(int(line.split()[1]) for line in boot if line.startswith("btime "))
        return btime + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED_AT


@dataclass
class RestartCost:
    """This attempt's restart figures: None until known (and forever on a first start)."""

    resumed_step: int | None = None
    lost_steps: int | None = None
    first_step_seconds: float | None = None

    def resumed(self, step: int, previous_progress: dict | None) -> None:
        """Record the step resumed from and, if the previous attempt left its progress, the loss."""
        self.resumed_step = step
        reached = (previous_progress or {}).get("step")
        self.lost_steps = max(0, int(reached) - step) if isinstance(reached, int) else None

    def first_step_done(self) -> float | None:
        """Seconds from process start to now, the first time after a resume; None otherwise."""
        if self.resumed_step is None or self.first_step_seconds is not None:
            return None
        self.first_step_seconds = round(time.time() - process_start_time(), 3)
        return self.first_step_seconds

    def record(self) -> dict:
        """The fields a metrics record carries for the rest of this attempt."""
        if self.resumed_step is None:
            return {}
        return {"resumed_step": self.resumed_step, "lost_steps": self.lost_steps,
                "restart_to_first_step_s": self.first_step_seconds}
