"""Pool fields for cost and MFU: parsed from camelCase, checked, and passed to the workers."""

from __future__ import annotations

import pytest

from ps3_platform.spec import load_pools, parse_pools
from ps3_platform.spec.pools import PEAK_TFLOPS_ENV, PoolConfigError, pool_env


def test_gpu_fields_parse_and_default_to_unset():
    pools = parse_pools("pools:\n  h100: {gpusPerNode: 8, gpuPeakTflops: 989, gpuMemoryGb: 80, pricePerGpuHour: 2.5}\n"
                        "  cpu: {}\n", "test")
    h100, cpu = pools.pools["h100"], pools.pools["cpu"]
    assert (h100.gpu_peak_tflops, h100.gpu_memory_gb, h100.price_per_gpu_hour) == (989, 80, 2.5)
    assert (cpu.gpu_peak_tflops, cpu.gpu_memory_gb, cpu.price_per_gpu_hour) == (None, None, None)


@pytest.mark.parametrize("field", ["gpuPeakTflops: 0", "gpuMemoryGb: -1", "pricePerGpuHour: -0.5"])
def test_gpu_fields_must_be_positive(field):
    with pytest.raises(PoolConfigError, match="invalid pool configuration"):
        parse_pools(f"pools:\n  h100: {{{field}}}\n", "test")


def test_built_in_gpu_pools_state_their_peak_and_memory():
    pools = load_pools().pools
    assert (pools["h100"].gpu_peak_tflops, pools["a100"].gpu_peak_tflops) == (989, 312)
    assert pools["h100"].gpu_memory_gb == pools["a100"].gpu_memory_gb == 80


def test_pool_env_gives_workers_the_peak_unless_the_stage_sets_it():
    pool = parse_pools("pools:\n  h100: {gpuPeakTflops: 989}\n  cpu: {}\n", "test").pools
    assert pool_env(pool["h100"], {}) == [{"name": PEAK_TFLOPS_ENV, "value": "989"}]
    assert pool_env(pool["h100"], {PEAK_TFLOPS_ENV: "495"}) == []
    assert pool_env(pool["cpu"], {}) == []
