"""A pool's GPU peak reaches its workers' environment (MFU's denominator), and only then."""

from __future__ import annotations

from ps3_platform.compile import compile_job, pytorchjobs_in
from ps3_platform.spec import load_text, parse_pools
from ps3_platform.spec.pools import PEAK_TFLOPS_ENV

POOLS = parse_pools("pools:\n  h100: {gpusPerNode: 8, gpuPeakTflops: 989}\n  cpu: {}\n", "test-pools")


def _env(pool: str, env: str = "{}") -> dict:
    text = f"""
apiVersion: ps3.platform/v1
kind: TrainingJob
metadata: {{name: exp}}
spec:
  task: noop
  resources: {{pool: {pool}, gpusPerNode: {8 if pool == "h100" else 0}}}
  env: {env}
"""
    (job,) = pytorchjobs_in(compile_job(load_text(text).job, POOLS))
    container = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value") for e in container["env"]}


def test_gpu_pool_sets_the_peak():
    assert _env("h100")[PEAK_TFLOPS_ENV] == "989"


def test_pool_without_a_peak_and_stage_that_sets_its_own():
    assert PEAK_TFLOPS_ENV not in _env("cpu")
    assert _env("h100", f"{{{PEAK_TFLOPS_ENV}: '495'}}")[PEAK_TFLOPS_ENV] == "495"
