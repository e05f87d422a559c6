"""STAND-IN for a local training run: serves ps3_platform.runtime.metrics registries.

Run as a subprocess by tests/ops/conftest.py (`training_metrics_targets`) until the local
backend can start real workers for the live dashboard test. It uses the runtime's own
`Metrics` class (so names, labels and types are the real ones) and moves every metric
the way a training loop would, ten steps a second.

    python standin_worker.py JOB STAGE PORT [PORT ...]    # one rank per port
"""

from __future__ import annotations

import math
import sys
import time

from ps3_platform.runtime.metrics import Metrics

STEP_SECONDS = 0.1
CHECKPOINT_EVERY = 10
TOTAL_STEPS = 100_000


def advance(m: Metrics, step: int) -> None:
    """One fake optimizer step: counters, gauges and histograms the trainer updates."""
    m.get("ps3_steps_total").inc()
    m.get("ps3_step").set(step)
    m.get("ps3_total_steps").set(TOTAL_STEPS)
    m.get("ps3_samples_total").inc(8)
    m.get("ps3_samples_per_second").set(160.0)
    m.get("ps3_tokens_per_second").set(160.0 * 4096)
    m.get("ps3_loss").set(2.0 * math.exp(-step / 500) + 0.5)
    m.get("ps3_learning_rate").set(1e-4 * min(1.0, step / 100))
    m.get("ps3_grad_norm").set(1.0 + 0.1 * math.sin(step))
    m.get("ps3_step_seconds").observe(STEP_SECONDS)
    m.get("ps3_data_wait_seconds_total").inc(0.2 * STEP_SECONDS)
    m.get("ps3_mfu").set(0.41)
    m.get("ps3_restarts").set(1)
    m.get("ps3_gpu_utilization_percent", gpu="0").set(90)
    m.get("ps3_gpu_memory_used_bytes", gpu="0").set(40 * 2**30)
    if step % 50 == 0:  # 1 bad sample per 400: healthy, below the alert
        m.get("ps3_data_bad_samples_total", reason="decode").inc()
    if step % CHECKPOINT_EVERY == 0:
        m.get("ps3_checkpoint_save_seconds").observe(0.4)
        m.get("ps3_checkpoint_upload_seconds").set(1.5)
        m.get("ps3_checkpoint_load_seconds").set(2.0)
        m.checkpoint_committed(time.time(), 123_456_789)


def main(argv: list[str]) -> None:
    job, stage, *ports = argv
    workers = [Metrics(job=job, stage=stage, rank=rank) for rank in range(len(ports))]
    for worker, port in zip(workers, ports, strict=True):
        worker.serve(int(port), addr="127.0.0.1")
    print("ready", flush=True)
    step = 0
    while True:
        step += 1
        for worker in workers:
            advance(worker, step)
        time.sleep(STEP_SECONDS)


if __name__ == "__main__":
    main(sys.argv[1:])
