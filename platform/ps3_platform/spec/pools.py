"""Node pools: platform configuration that maps a pool name to where and how pods run.

Specs only name a pool; admins describe pools once (Helm values -> the `ps3-platform-pools`
ConfigMap in cluster, or a pools.yaml file locally). The compiler turns a pool into a
nodeSelector, tolerations, GPU requests, a PriorityClass and an optional Kueue queue.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

#: Name of the ConfigMap the Helm chart writes, and its data key.
POOLS_CONFIGMAP = "ps3-platform-pools"
POOLS_KEY = "pools.yaml"
DEFAULT_POOLS_FILE = Path(__file__).with_name("default_pools.yaml")
#: Set on a pool's workers (by the compiler) to its `gpuPeakTflops`: the denominator of their MFU.
PEAK_TFLOPS_ENV = "PS3_GPU_PEAK_TFLOPS"


class Pool(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)

    gpus_per_node: int = Field(0, ge=0, description="GPUs on each node of the pool.")
    gpu_resource: str = Field("nvidia.com/gpu", description="Extended resource name of the GPUs.")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    priority_class: str | None = Field(None, description="PriorityClass of the pool's pods.")
    kueue_queue: str | None = Field(None, description="Kueue LocalQueue; adds kueue.x-k8s.io/queue-name.")
    scheduler_queue: str | None = Field(None, description="Gang-scheduler queue (runPolicy.schedulingPolicy.queue).")
    gpu_peak_tflops: float | None = Field(
        None, gt=0, description="Dense bf16 peak TFLOP/s of one GPU (H100 SXM: 989, A100: 312): MFU's denominator "
                                "on the workers and `platformctl estimate`'s step time.")
    gpu_memory_gb: float | None = Field(
        None, gt=0, description="Memory of one GPU in GiB (H100 80GB: 80): what `platformctl estimate` checks "
                                "a stage's peak against.")
    price_per_gpu_hour: float | None = Field(
        None, ge=0, description="Price of one GPU-hour, in whatever currency the admin bills in: "
                                "`platformctl estimate` prices a stage with it.")


def pool_env(pool: Pool, stage_env: dict[str, str]) -> list[dict]:
    """Container env a pool gives its workers: its GPUs' peak FLOP/s, unless the stage sets it."""
    if pool.gpu_peak_tflops is None or PEAK_TFLOPS_ENV in stage_env:
        return []
    return [{"name": PEAK_TFLOPS_ENV, "value": f"{pool.gpu_peak_tflops:g}"}]


class PoolConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)

    pools: dict[str, Pool]
    job_network_policies: bool = Field(
        False, description="Give every job a NetworkPolicy admitting only its own pods (the chart sets this "
                           "with networkPolicy.enabled, whose baseline policy admits metrics scraping).")


class PoolConfigError(Exception):
    """The platform configuration itself is broken (not the user's spec)."""


def parse_pools(text: str, source: str) -> PoolConfig:
    try:
        return PoolConfig.model_validate(yaml.safe_load(text) or {})
    except (yaml.YAMLError, ValidationError) as exc:
        first = str(exc).splitlines()
        raise PoolConfigError(f"{source}: invalid pool configuration: {' '.join(first[:3])}") from None


def pools_file() -> Path:
    """Where local pool configuration comes from: $PS3_PLATFORM_POOLS, then the home, then built-in."""
    if env := os.environ.get("PS3_PLATFORM_POOLS"):
        return Path(env)
    home = Path(os.environ.get("PS3_PLATFORM_HOME", Path.home() / ".ps3-platform"))
    candidate = home / "pools.yaml"
    return candidate if candidate.exists() else DEFAULT_POOLS_FILE


def load_pools(path: str | Path | None = None) -> PoolConfig:
    path = Path(path) if path else pools_file()
    try:
        return parse_pools(path.read_text(), str(path))
    except OSError as exc:
        raise PoolConfigError(f"{path}: cannot read pool configuration: {exc.strerror}") from None
