"""Every listed metric is on /metrics of a running worker, with job/stage/rank labels."""

from __future__ import annotations

import json
import time
import urllib.request

from ps3_platform.backends.local import LocalBackend
from ps3_platform.runtime.metrics import METRICS
from ps3_platform.spec import load_text

JOB = """
apiVersion: ps3.platform/v1
kind: TrainingJob
metadata: {name: scrape}
spec:
  task: sleep
  resources: {pool: cpu, procsPerNode: 2}
  train: {globalBatch: 2, steps: 1000}
  params: {stepSeconds: 0.05}
  checkpoint: {intervalSteps: 3}
"""


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_every_metric_is_served_by_each_worker(platform_home):
    backend = LocalBackend()
    backend.submit(load_text(JOB).job, [])
    try:
        log = backend.run_dir("scrape") / "train" / "metrics.jsonl"
        deadline = time.time() + 120
        while not (log.exists() and log.read_text().count("\n") >= 4):
            assert time.time() < deadline, backend.status("scrape")
            time.sleep(0.2)
        ports = json.loads((backend.run_dir("scrape") / "state.json").read_text())["stages"]["train"]["metrics_ports"]
        for rank, port in enumerate(ports):
            text = _scrape(port)
            for name, (kind, _, extra) in METRICS.items():
                assert f"# TYPE {name} {kind}" in text, name
                if not extra:  # labelled-only families (reason=, gpu=) have series once they happen
                    sample = f"{name}_count" if kind == "histogram" else name
                    assert f'{sample}{{job="scrape",rank="{rank}",stage="train"}}' in text, (name, rank)
            assert "ps3_checkpoint_last_success_timestamp_seconds" in text
            # values move, not just series that exist from the start at 0
            values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith("ps3_") and f'rank="{rank}"' in line}
            for name in ("ps3_step", "ps3_samples_per_second", "ps3_tokens_per_second", "ps3_learning_rate"):
                assert values[name] > 0, (name, rank)
        record = json.loads(log.read_text().splitlines()[-1])
        for field in ("step", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "step_seconds",
                      "data_wait_s"):
            assert field in record, field
    finally:
        backend.cancel("scrape")


def test_gpu_sampler_reads_nvml_into_the_gpu_metrics(monkeypatch):
    """NVML itself needs a GPU; a stand-in with pynvml's API shows the sampler's wiring."""
    import types

    import pynvml  # the dependency must be installed, or GPU workers serve no ps3_gpu_* series
    import torch

    from ps3_platform.runtime.gpu import start_gpu_sampler
    from ps3_platform.runtime.metrics import Metrics

    calls = []
    monkeypatch.setattr(pynvml, "nvmlInit", lambda: calls.append("init"))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: ("gpu", i))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetUtilizationRates", lambda h: types.SimpleNamespace(gpu=87))
    monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", lambda h: types.SimpleNamespace(used=123 << 20))
    metrics = Metrics(job="j", stage="s", rank=0)
    assert start_gpu_sampler(metrics, torch.device("cpu")) is None
    thread = start_gpu_sampler(metrics, torch.device("cuda", 0), every_s=0.01)
    assert thread is not None
    labels = {"job": "j", "stage": "s", "rank": "0", "gpu": "0"}
    deadline = time.time() + 5
    while metrics.registry.get_sample_value("ps3_gpu_memory_used_bytes", labels) != float(123 << 20):
        assert time.time() < deadline
        time.sleep(0.01)
    assert metrics.registry.get_sample_value("ps3_gpu_utilization_percent", labels) == 87.0
    assert calls == ["init"]

    def gone(handle):  # the device goes away: the sampler ends quietly
        raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

    monkeypatch.setattr(pynvml, "nvmlDeviceGetUtilizationRates", gone)
    thread.join(timeout=5)
    assert not thread.is_alive()
