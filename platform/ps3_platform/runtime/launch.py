"""torchrun, exiting with a retryable code when it is stopped by a signal.

On SIGTERM (a preempted or drained pod) torchrun's agent forwards the signal to the
workers, which finish the step and commit a checkpoint, and then re-raises it as an
uncaught `SignalException`: the container exits 1. A PyTorchJob with the `ExitCode`
restart policy treats 1-127 as permanent failures, so a plain preemption would fail the
job. This wrapper runs torchrun unchanged and turns that exception into 128 + signal
(143 for SIGTERM), which the operator restarts. Arguments are torchrun's.

The grace between the agent's SIGTERM to the workers and its SIGKILL is torchrun's
`TORCH_ELASTIC_SHUTDOWN_TIMEOUT` (30 s by default); the compiler sets it from the pod's
termination grace period so the final checkpoint has time to upload.
"""

from __future__ import annotations

import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main as torchrun


def main(argv: list[str] | None = None) -> int:
    try:
        torchrun(argv)
    except SignalException as exc:
        code = 128 + int(exc.sigval)
        print(f"ps3-launch: stopped by {signal.Signals(exc.sigval).name}; exiting {code} (retryable)",
              file=sys.stderr, flush=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
