"""GPU utilisation and memory from NVML, sampled in a daemon thread when a GPU is present.

In cluster the DCGM exporter is the source of truth for dashboards; these per-worker
figures let a local run (and `platformctl status`) show the same without DCGM.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from .metrics import Metrics

log = logging.getLogger(__name__)


def start_gpu_sampler(metrics: Metrics, device: torch.device, every_s: float = 5.0) -> threading.Thread | None:
    if device.type != "cuda":
        return None
    try:
        import pynvml  # nvidia-ml-py, a dependency of the platform
    except ImportError:
        log.warning("pynvml is not installed (pip install nvidia-ml-py): no ps3_gpu_* metrics from this worker")
        return None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
    except pynvml.NVMLError:
        return None
    util = metrics.get("ps3_gpu_utilization_percent", gpu=str(device.index or 0))
    memory = metrics.get("ps3_gpu_memory_used_bytes", gpu=str(device.index or 0))

    def sample() -> None:
        while True:
            try:
                util.set(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                memory.set(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
            except pynvml.NVMLError:
                return
            time.sleep(every_s)

    thread = threading.Thread(target=sample, name="nvml-sampler", daemon=True)
    thread.start()
    return thread
