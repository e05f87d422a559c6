"""Prometheus metrics every worker serves, and the JSON-lines log the local backend reads.

Names start with `ps3_` and carry the labels `job`, `stage`, `rank` (Prometheus adds
`namespace`/`pod` from the PodMonitor, which is how dashboards join DCGM's GPU metrics).
The dashboards, alert rules and the helm chart's tests use exactly these names: change
one here and `tests/ops` will say which panel broke.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

BASE_LABELS = ("job", "stage", "rank")

#: name -> (type, help, extra labels). The single list of what a worker exports.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "ps3_step_seconds": ("histogram", "Wall time of one optimizer step, data wait included.", ()),
    "ps3_steps_total": ("counter", "Optimizer steps completed by this process.", ()),
    "ps3_step": ("gauge", "Current optimizer step of the run.", ()),
    "ps3_total_steps": ("gauge", "Optimizer steps the stage will run.", ()),
    "ps3_samples_total": ("counter", "Samples this rank consumed.", ()),
    "ps3_samples_per_second": ("gauge", "Global samples per second over the last step.", ()),
    "ps3_tokens_per_second": ("gauge", "Global tokens (patches + text tokens) per second.", ()),
    "ps3_loss": ("gauge", "Training loss of the last step (all ranks averaged).", ()),
    "ps3_learning_rate": ("gauge", "Learning rate of the last step.", ()),
    "ps3_grad_norm": ("gauge", "Gradient norm before clipping.", ()),
    "ps3_data_wait_seconds_total": ("counter", "Time the step spent waiting for the data loader.", ()),
    "ps3_checkpoint_save_seconds": ("histogram", "Training stall of a checkpoint save.", ()),
    "ps3_checkpoint_upload_seconds": ("gauge", "Duration of the last checkpoint upload (async: in background).", ()),
    "ps3_checkpoint_load_seconds": ("gauge", "Time to load the checkpoint at start.", ()),
    "ps3_checkpoint_bytes": ("gauge", "Bytes this rank wrote in the last committed checkpoint.", ()),
    "ps3_checkpoint_load_bytes": ("gauge", "Size of the committed checkpoint loaded at start.", ()),
    "ps3_checkpoint_last_success_timestamp_seconds": ("gauge", "Unix time of the last committed checkpoint.", ()),
    "ps3_checkpoint_age_seconds": ("gauge", "Seconds since the last committed checkpoint (or since start).", ()),
    "ps3_checkpoint_interval_seconds": ("gauge", "Expected seconds between checkpoints (intervalSteps x step time).", ()),
    "ps3_checkpoint_failures_total": ("counter", "Checkpoint save attempts that failed (retried).", ()),
    "ps3_restarts": ("gauge", "Times this run has been resumed from a checkpoint.", ()),
    "ps3_restart_to_first_step_seconds": ("gauge", "Seconds from this worker's process start to its first step "
                                                   "after resuming from a checkpoint.", ()),
    "ps3_lost_steps": ("gauge", "Steps the previous attempt had done past the checkpoint this one resumed from "
                                "(as of its last log interval).", ()),
    "ps3_data_bad_samples_total": ("counter", "Samples skipped as unreadable, by reason (reason read_retries: data reads retried during a storage outage).", ("reason",)),
    "ps3_nonfinite_loss_total": ("counter", "Steps whose loss was NaN or infinite.", ()),
    "ps3_mfu": ("gauge", "Model FLOPs utilisation estimate (0..1) against the device's peak.", ()),
    "ps3_curate_images_total": ("counter", "Curation inputs finished, by source and outcome (written/skipped).",
                                ("source", "outcome")),
    "ps3_curate_boxes_total": ("counter", "Boxes written by curation, by source.", ("source",)),
    "ps3_curate_failures_total": ("counter", "Curation inputs skipped, by kind of failure.", ("kind",)),
    "ps3_curate_images_per_second": ("gauge", "Curation throughput of this run (inputs per second).", ()),
    "ps3_curate_images_planned": ("gauge", "Curation inputs in this run's plan.", ()),
    "ps3_curate_images_done": ("gauge", "Curation inputs finished (committed shards included).", ()),
    "ps3_gpu_utilization_percent": ("gauge", "GPU utilisation from NVML.", ("gpu",)),
    "ps3_gpu_memory_used_bytes": ("gauge", "GPU memory used, from NVML.", ("gpu",)),
}

_TYPES = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}
_STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


@dataclass
class Metrics:
    """The metrics of one worker process, pre-labelled with its job/stage/rank."""

    job: str
    stage: str
    rank: int
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self._families = {}
        for name, (kind, doc, extra) in METRICS.items():
            kwargs = {"buckets": _STEP_BUCKETS} if kind == "histogram" else {}
            metric_name = name.removesuffix("_total") if kind == "counter" else name
            self._families[name] = _TYPES[kind](
                metric_name, doc, BASE_LABELS + extra, registry=self.registry, **kwargs
            )
        self._base = {"job": self.job, "stage": self.stage, "rank": str(self.rank)}
        # Until the first commit the age counts from start, so a run that never manages to
        # checkpoint still trips the stale-checkpoint alert.
        self._last_checkpoint = time.time()
        age = self._families["ps3_checkpoint_age_seconds"].labels(**self._base)
        age.set_function(lambda: time.time() - self._last_checkpoint)
        # Make every label-less series visible from the first scrape (dashboards need data, not gaps).
        for name, (kind, _, extra) in METRICS.items():
            if not extra and name != "ps3_checkpoint_age_seconds":
                self.get(name)

    def get(self, name: str, **labels: str):
        """The labelled child of metric `name` (extra labels such as reason= or gpu=)."""
        return self._families[name].labels(**self._base, **labels)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)

    def checkpoint_committed(self, when: float, nbytes: int) -> None:
        self._last_checkpoint = when
        self.get("ps3_checkpoint_last_success_timestamp_seconds").set(when)
        self.get("ps3_checkpoint_bytes").set(nbytes)


class JsonlLog:
    """Append-only JSON-lines log of per-step figures (what `platformctl status` reads)."""

    def __init__(self, path: Path | None):
        self._file: IO[str] | None = None
        self._lock = threading.Lock()  # the checkpointer's upload thread writes too
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", buffering=1)

    def write(self, record: dict) -> None:
        if self._file is not None:
            line = json.dumps({"time": round(time.time(), 3), **record}) + "\n"
            with self._lock:
                self._file.write(line)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
